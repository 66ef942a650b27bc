"""The adapters through the compiled Triton kernel on CUDA (skipped without a GPU).

Tiny SD1.5-, SDXL- and FLUX-shaped models in fp16/bf16, FASA on every self-attention layer: no NaN/inf, and
the kernel path is held against the float64 oracle at model level:

* ``ref``: the model in float64, FASA computed by the float64 oracle (``fasa_reference``);
* ``floor``: the model in fp16/bf16, FASA computed by the float64 oracle and rounded to fp16/bf16, i.e. the
  best any FASA implementation can do inside that low-precision model;
* ``kernel``: the model in fp16/bf16 with the Triton kernel.

``max|kernel - ref| <= C[dtype] * max|floor - ref| + 1e-3`` (C from tests/fasa_cases.py): the kernel may
cost a small multiple of what rounding the exact attention to the dtype costs, nothing more. Neither
baseline runs the project's own torch backend.
"""
import pytest
import torch

import freecure_ops.adapters.attend as attend
from fasa_cases import C
from freecure_ops import fasa_reference
from freecure_ops.adapters import install_fasa
from test_adapters_helpers import flux_inputs, random_mask, run, tiny_flux, tiny_sd15, tiny_sdxl, unet_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled Triton kernel)")


def _to(kw, device, dtype):
    def move(v):
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        if isinstance(v, torch.Tensor):
            return v.to(device, dtype if v.is_floating_point() and v.dim() > 0 else v.dtype)
        return v
    return {k: move(v) for k, v in kw.items()}


def _oracle_op(q, k_p, k_f, v_p, v_f, mask=None, omega=1.0, *, scale=None, mode="bias", n_txt=0, **_):
    """The adapters' FASA op replaced by the float64 oracle, its result rounded to the inputs' dtype."""
    f64 = [t.double() for t in (q, k_p, k_f, v_p, v_f)]
    m = None if mask is None else mask.double()
    return fasa_reference(*f64, m, omega, scale=scale, mode=mode, n_txt=n_txt).to(q.dtype)


def model_outputs(model, kw, mask, dtype, layout, device, monkeypatch):
    """(kernel, floor, ref) model outputs as float64 (see the module docstring)."""
    model = model.to(device, dtype)
    with install_fasa(model, mask, 1.5, layers="all", layout=layout, backend="triton"):
        kernel = run(model, _to(kw, device, dtype)).double()
    with monkeypatch.context() as mp:
        mp.setattr(attend, "fasa_attention", _oracle_op)
        with install_fasa(model, mask, 1.5, layers="all", layout=layout, backend="torch"):
            floor = run(model, _to(kw, device, dtype)).double()
        model = model.to(torch.float64)
        with install_fasa(model, mask, 1.5, layers="all", layout=layout, backend="torch"):
            ref = run(model, _to(kw, device, torch.float64))
    return kernel, floor, ref


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_kernel_path_on_cuda(family, dtype, monkeypatch):
    if family == "flux":
        model, kw, layout = tiny_flux(seed=5), flux_inputs(2, 6, 10, 5), "plain"
        mask = random_mask((6, 10))
    else:
        model = tiny_sd15(seed=5) if family == "sd15" else tiny_sdxl(seed=5)
        kw, layout = unet_inputs(model, 4, 12, 20), "cfg"
        mask = random_mask((12, 20))
    kernel, floor, ref = model_outputs(model, kw, mask, dtype, layout, "cuda", monkeypatch)
    assert torch.isfinite(kernel).all()
    err = (kernel - ref).abs().max().item()
    floor_err = (floor - ref).abs().max().item()
    bound = C[dtype] * floor_err + 1e-3
    assert err <= bound, f"{family} {dtype}: kernel path error {err:.3e} > {bound:.3e} (floor {floor_err:.3e})"


def test_compiled_unet_with_cuda_graphs_matches_eager():
    """torch.compile(fullgraph=True, mode="reduce-overhead") of a tiny UNet carrying FASA (Triton kernel inside
    the graph, CUDA graphs on): the same output as eager, and a second call compiles nothing new."""
    from torch._dynamo.utils import counters

    model = tiny_sd15(seed=6).to("cuda", torch.float16)
    kw = _to(unet_inputs(model, 4, 12, 20), "cuda", torch.float16)
    with install_fasa(model, random_mask((12, 20)), 1.5, layers="all", layout="cfg", backend="triton"):
        eager = run(model, kw)
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
        with torch.no_grad():
            outs = [compiled(**kw).sample.clone() for _ in range(3)]
        assert counters["stats"]["unique_graphs"] == 1
    for out in outs:
        torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2)


def test_model_cpu_offload_keeps_fasa():
    from tiny_pipes import FakeParser, tiny_sd_pipe
    from freecure_ops.pipeline import FreeCure

    pipe = tiny_sd_pipe().to("cuda")
    common = dict(fd_prompt="a photo of man with red hair", seed=0, output_type="pt", num_inference_steps=2,
                  height=16, width=16)
    ref = FreeCure(pipe, FakeParser(), layers="all", omega=2.0)("a photo of sks man with red hair", **common)
    pipe.to("cpu")
    pipe.enable_model_cpu_offload()
    out = FreeCure(pipe, FakeParser(), layers="all", omega=2.0)("a photo of sks man with red hair", **common)
    torch.testing.assert_close(out.images.cpu(), ref.images.cpu(), rtol=1e-4, atol=1e-4)


def test_freecure_fd_reuse_host_equals_device_on_cuda():
    """Pinned host placement (side-stream prefetch) gives the same images as device placement, on CUDA."""
    from freecure_ops.pipeline.freecure import FreeCure
    from tiny_pipes import IMAGE, FakeParser, tiny_sd_pipe

    pipe = tiny_sd_pipe().to("cuda")
    out = {c: FreeCure(pipe, FakeParser(), layers="all", omega=2.0, fd_reuse=c)(
        "a photo of sks man with red hair", fd_prompt="a photo of man with red hair", seed=0, output_type="pt",
        num_inference_steps=3, height=IMAGE, width=IMAGE) for c in ("off", "device", "host")}
    assert out["host"].fd_reuse["choice"] == "host"
    assert torch.equal(out["host"].images, out["device"].images)
    assert (out["off"].images - out["device"].images).abs().max().item() <= 1e-4


def test_compiled_fd_reuse_host_and_device_on_cuda():
    """A compiled UNet (Triton kernel inside) keeps FD reuse with both placements: the recorded keys/values
    staged in eager hooks around the compiled call (pinned host: copied on the side stream) give the eager
    reusing path's images. aot_eager: Inductor's compile time would not fit gpu_check.sh's test budget."""
    from freecure_ops.pipeline.freecure import FreeCure
    from tiny_pipes import IMAGE, FakeParser, tiny_sd_pipe

    pipe = tiny_sd_pipe().to("cuda")
    call = dict(fd_prompt="a photo of man with red hair", seed=0, output_type="pt", num_inference_steps=3,
                height=IMAGE, width=IMAGE)
    eager = FreeCure(pipe, FakeParser(), layers="all", omega=2.0, fd_reuse="device")(
        "a photo of sks man with red hair", **call)
    pipe.unet = torch.compile(pipe.unet, fullgraph=True, backend="aot_eager")
    for placement in ("device", "host"):
        out = FreeCure(pipe, FakeParser(), layers="all", omega=2.0, fd_reuse=placement)(
            "a photo of sks man with red hair", **call)
        assert out.fd_reuse["choice"] == placement
        torch.testing.assert_close(out.images, eager.images, rtol=1e-3, atol=1e-3)
