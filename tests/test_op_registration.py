"""FASA as a registered PyTorch op (``torch.ops.freecure_ops.fasa``): torch.library's own checks, torch.compile
with no graph break for every kind of mask, and autograd on every backend (gradcheck in float64 on the PyTorch
backend; the Triton backend's gradients against it; compiled backward).

On CPU the Triton backend runs in the interpreter (TRITON_INTERPRET=1, tests/conftest.py). Compile tests use
the "aot_eager" backend (dynamo + AOTAutograd + the op's fake implementation: what can break a graph or a
backward) except one Inductor compile of the op.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from freecure_ops import fasa_attention, fasa_reference, prepare_fasa_mask

B, H, NQ, NP, NF, D = 2, 2, 12, 12, 12, 8


def inputs(dtype=torch.float32, seed=0, n=(NQ, NP, NF), requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    nq, np_, nf = n
    shapes = [(B, H, nq, D), (B, H, np_, D), (B, H, nf, D), (B, H, np_, D), (B, H, nf, D)]
    # drawn in float64 and cast: every dtype gets the same numbers
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad) for s in shapes]


def masks(n_img=NF, seed=1):
    g = torch.Generator().manual_seed(seed)
    soft = torch.rand(B, n_img, generator=g)
    soft[:, ::3] = 0.0
    return {"none": None, "bool": torch.rand(n_img, generator=g) > 0.4, "float": soft,
            "prepared": prepare_fasa_mask(soft)}


# ---- torch.library ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    """Schema, fake tensor (shapes, strides, dtypes of both outputs), autograd registration, AOT dispatch."""
    q, k_p, k_f, v_p, v_f = inputs(requires_grad=True)
    m = prepare_fasa_mask(masks()["float"])
    for args in [(m.rows, m.fd_index, m.fd_value, m.fd_count, 0.3, 1.5, "bias", 0, backend, True),
                 (None, None, None, None, 0.3, 0.7, "scale", 3, backend, False)]:
        rows = args[0] if args[7] == 0 else None
        res = torch.library.opcheck(torch.ops.freecure_ops.fasa.default, (q, k_p, k_f, v_p, v_f, rows, *args[1:]))
        assert all(v == "SUCCESS" for v in res.values()), res


def test_one_op_for_every_backend_and_its_output_layout():
    q, k_p, k_f, v_p, v_f = inputs()
    m = masks()["prepared"]
    outs = {}
    for backend in ("torch", "triton"):
        # A plain eager call runs the implementation directly (the dispatcher would only add host time); a call
        # autograd must track goes through the registered op, with the same result.
        with torch.profiler.profile() as prof:
            outs[backend] = fasa_attention(q, k_p, k_f, v_p, v_f, m, 1.5, backend=backend)
        assert not any(e.name == "freecure_ops::fasa" for e in prof.events())
        qg = q.detach().requires_grad_()
        with torch.profiler.profile() as prof:
            tracked = fasa_attention(qg, k_p, k_f, v_p, v_f, m, 1.5, backend=backend)
        assert any(e.name == "freecure_ops::fasa" for e in prof.events())
        assert torch.equal(tracked.detach(), outs[backend]) and tracked.requires_grad
        for out in (outs[backend], tracked):
            assert out.stride() == out.transpose(1, 2).contiguous().transpose(1, 2).stride()
    torch.testing.assert_close(outs["torch"], outs["triton"], rtol=1e-5, atol=1e-5)


# ---- torch.compile ------------------------------------------------------------------------------------------

def _user_fn(q, k_p, k_f, v_p, v_f, mask):
    out = fasa_attention(q, k_p, k_f, v_p, v_f, mask, 1.5)
    return out.transpose(1, 2).reshape(B, NQ, H * D) * 2.0


@pytest.mark.parametrize("kind", ["none", "bool", "float", "prepared"])
def test_explain_reports_one_graph_and_no_break(kind):
    mask = masks()[kind]
    args = (*inputs(), mask)
    torch._dynamo.reset()
    ex = torch._dynamo.explain(_user_fn)(*args)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons
    compiled = torch.compile(_user_fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), _user_fn(*args), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["float", "prepared"])
def test_triton_backend_inside_a_compiled_graph(kind):
    args = (*inputs(), masks()[kind])

    def fn(q, k_p, k_f, v_p, v_f, mask):
        return fasa_attention(q, k_p, k_f, v_p, v_f, mask, 1.5, backend="triton", return_lse=True)

    torch._dynamo.reset()
    out, lse = torch.compile(fn, backend="aot_eager", fullgraph=True)(*args)
    ref_out, ref_lse = fn(*args)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)


def test_inductor_compiles_the_op_and_a_new_mask_of_the_same_shape_does_not_recompile():
    q, k_p, k_f, v_p, v_f = inputs()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(_user_fn, fullgraph=True)  # Inductor
    for seed in (1, 2, 3):
        mask = prepare_fasa_mask(masks(seed=seed)["float"])
        torch.testing.assert_close(compiled(q, k_p, k_f, v_p, v_f, mask), _user_fn(q, k_p, k_f, v_p, v_f, mask),
                                   rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1


def test_raw_mask_values_are_checked_eagerly_and_not_while_tracing():
    # The value check of a raw float mask needs the device's answer on the host: eager calls make it (and
    # raise); compiled calls skip it (documented: compiled callers pass a prepared mask). A prepared mask was
    # checked when it was prepared.
    args = inputs()
    bad = masks()["float"].clone()
    bad[0, 1] = -1.0
    with pytest.raises(ValueError, match="mask must hold finite values"):
        _user_fn(*args, bad)
    with pytest.raises(ValueError, match="mask must hold finite values"):
        prepare_fasa_mask(bad)
    torch._dynamo.reset()
    out = torch.compile(_user_fn, backend="aot_eager", fullgraph=True)(*args, bad)
    clean = bad.clamp(min=0)  # unchecked: a negative entry excludes its key like 0
    torch.testing.assert_close(out, _user_fn(*args, clean), rtol=0, atol=0)


# ---- autograd -----------------------------------------------------------------------------------------------

CASES = [("bias", 0, "float"), ("bias", 3, "bool"), ("scale", 0, "float"), ("scale", 3, "none"),
         ("bias", 0, "prepared"), ("bias", 4, "none")]


@pytest.mark.parametrize("mode,n_txt,kind", CASES)
def test_gradcheck_float64_torch_backend(mode, n_txt, kind):
    args = inputs(torch.float64, seed=3, requires_grad=True)
    mask = masks(NF - n_txt)[kind]

    def f(*t):
        return fasa_attention(*t, mask, 1.3, mode=mode, n_txt=n_txt, backend="torch", return_lse=True)

    assert torch.autograd.gradcheck(f, args, fast_mode=True)
    raw = masks(NF - n_txt)["float"] if kind == "prepared" else mask
    ref = fasa_reference(*[a.detach() for a in args], raw, 1.3, mode=mode, n_txt=n_txt)
    torch.testing.assert_close(f(*args)[0].detach(), ref, rtol=1e-12, atol=1e-12)


def _grads(backend, dtype, mode, n_txt, mask):
    args = inputs(dtype, seed=4, requires_grad=True)
    out, lse = fasa_attention(*args, mask, 1.3, mode=mode, n_txt=n_txt, backend=backend, return_lse=True)
    assert out.requires_grad and lse.requires_grad
    g = torch.Generator().manual_seed(5)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
    (out * weights).sum().add(lse.sum()).backward()
    return [a.grad for a in args]


@pytest.mark.parametrize("mode,n_txt", [("bias", 0), ("scale", 3)])
def test_triton_backend_is_differentiable(mode, n_txt):
    """The Triton forward gets the recomputing backward: its gradients match the float64 ones (gradchecked
    above) at float32 accuracy. Never a silently detached result."""
    mask = masks(NF - n_txt)["float"]
    got = _grads("triton", torch.float32, mode, n_txt, mask)
    ref = _grads("torch", torch.float64, mode, n_txt, mask)
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_float64_on_the_triton_backend_is_a_clear_error():
    args = inputs(torch.float64, requires_grad=True)
    with pytest.raises(TypeError, match="float64.*backend='torch'"):
        fasa_attention(*args, backend="triton")


def test_fp16_grads_are_in_the_input_dtype():
    args = inputs(torch.float16, requires_grad=True)
    fasa_attention(*args, masks()["bool"], 1.5).float().sum().backward()
    assert all(a.grad is not None and a.grad.dtype == torch.float16 and torch.isfinite(a.grad).all() for a in args)


def test_only_some_inputs_require_grad():
    q, k_p, k_f, v_p, v_f = inputs()
    q.requires_grad_()
    fasa_attention(q, k_p, k_f, v_p, v_f, masks()["float"], 1.5).sum().backward()
    assert q.grad is not None and k_p.grad is None


def test_compiled_backward_matches_eager():
    mask = masks()["prepared"]

    def loss(*t):
        return fasa_attention(*t, mask, 1.5).pow(2).sum()

    eager = inputs(seed=6, requires_grad=True)
    loss(*eager).backward()
    comp = inputs(seed=6, requires_grad=True)
    torch._dynamo.reset()
    torch.compile(loss, backend="aot_eager", fullgraph=True)(*comp).backward()
    for a, b in zip(comp, eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)


def test_excluded_and_text_fd_keys_get_zero_gradient_even_when_poisoned():
    args = inputs(torch.float64, seed=7, requires_grad=False)
    k_f, v_f = args[2].clone(), args[4].clone()
    mask = torch.ones(NF - 2)
    mask[3] = 0.0
    k_f[:, :, 2 + 3] = float("nan")   # an excluded FD image key
    v_f[:, :, 0] = float("inf")       # an FD text key
    k_f.requires_grad_()
    v_f.requires_grad_()
    out = fasa_attention(args[0], args[1], k_f, args[3], v_f, mask, 1.0, n_txt=2, backend="torch")
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(k_f.grad).all() and torch.isfinite(v_f.grad).all()
    assert (k_f.grad[:, :, :2] == 0).all() and (k_f.grad[:, :, 5] == 0).all() and (v_f.grad[:, :, 5] == 0).all()
