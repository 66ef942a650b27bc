"""The adapters through the compiled Triton kernel on CUDA (skipped without a GPU).

Tiny SD1.5-, SDXL- and FLUX-shaped models in fp16/bf16, FASA on every self-attention layer: no NaN/inf, and
the kernel path agrees with the torch path (itself held against the float64 oracle in the CPU tests) by the
flash-attention rule at model level, with the fp32 model as the reference.
"""
import pytest
import torch

from freecure_ops.adapters import install_fasa
from test_adapters_helpers import flux_inputs, random_mask, run, tiny_flux, tiny_sd15, tiny_sdxl, unet_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled Triton kernel)")


def _to(kw, dtype):
    def move(v):
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        if isinstance(v, torch.Tensor):
            return v.to("cuda", dtype if v.is_floating_point() and v.dim() > 0 else v.dtype)
        return v
    return {k: move(v) for k, v in kw.items()}


def _outputs(model, kw, mask, dtype, layout):
    model = model.to("cuda", dtype)
    with install_fasa(model, mask, 1.5, layers="all", layout=layout, backend="triton"):
        kernel = run(model, _to(kw, dtype)).float()
    with install_fasa(model, mask, 1.5, layers="all", layout=layout, backend="torch"):
        same = run(model, _to(kw, dtype)).float()
    model = model.to(torch.float32)
    with install_fasa(model, mask, 1.5, layers="all", layout=layout, backend="torch"):
        ref = run(model, _to(kw, torch.float32)).float()
    return kernel, same, ref


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_kernel_path_on_cuda(family, dtype):
    if family == "flux":
        model, kw, layout = tiny_flux(seed=5), flux_inputs(2, 6, 10, 5), "plain"
        mask = random_mask((6, 10))
    else:
        model = tiny_sd15(seed=5) if family == "sd15" else tiny_sdxl(seed=5)
        kw, layout = unet_inputs(model, 4, 12, 20), "cfg"
        mask = random_mask((12, 20))
    kernel, same, ref = _outputs(model, kw, mask, dtype, layout)
    assert torch.isfinite(kernel).all()
    err = (kernel - ref).abs().max().item()
    bound = 2 * (same - ref).abs().max().item() + 1e-3
    assert err <= bound, f"{family} {dtype}: kernel path error {err:.3e} > {bound:.3e}"
