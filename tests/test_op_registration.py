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
    binary = prepare_fasa_mask(masks()["bool"])
    for args in [(m.rows, m.fd_index, m.fd_value, m.fd_count, False, 0.3, 1.5, "bias", 0, backend, True),
                 (binary.rows, binary.fd_index, binary.fd_value, binary.fd_count, True, 0.3, 1.5, "bias", 0,
                  backend, False),
                 (None, None, None, None, False, 0.3, 0.7, "scale", 3, backend, False)]:
        rows = args[0] if args[8] == 0 else None
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


# ---- real use around the op: autocast, transforms, edge rows ---------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_does_not_lower_the_precision(backend):
    # CPU autocast to bf16 would run the torch backend's SDPA in bf16 and round omega * m (0.04 at 10).
    from fasa_cases import assert_close_to_ref

    x = inputs(torch.float32, seed=21)
    m = masks()["float"] * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fasa_attention(*x, m, 1.5, backend=backend)
    assert out.dtype == torch.float32
    assert_close_to_ref(out, x, m, 1.5)
    # and the backward (recomputation) under autocast matches the one without
    xs = [t.clone().requires_grad_() for t in x]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fasa_attention(*xs, m, 1.5, backend=backend).square().sum().backward()
    ys = [t.clone().requires_grad_() for t in x]
    fasa_attention(*ys, m, 1.5, backend=backend).square().sum().backward()
    for a, b in zip(xs, ys):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_text_queries_with_lse(backend):
    # n_txt == Nq: every query row is a text row (no image query rows at all)
    x = inputs(torch.float32, seed=22, n=(4, NP, NF))
    out, lse = fasa_attention(*x, None, 1.5, n_txt=4, return_lse=True, backend=backend)
    ref, ref_lse = fasa_reference(*[t.double() for t in x], None, 1.5, n_txt=4, return_lse=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-6)


def test_float64_attention_keeps_a_float64_mask():
    x = inputs(torch.float64, seed=23)
    m = torch.tensor([0.1, 0.2, 1 / 3] * (NF // 3), dtype=torch.float64)
    for mode in ("bias", "scale"):
        err = (fasa_attention(*x, m, 1.5, mode=mode) - fasa_reference(*x, m, 1.5, mode=mode)).abs().max()
        assert err < 1e-13, f"{mode}: {err:.2e} (a float32 copy of the mask costs ~1e-8)"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_func_transforms(backend):
    x = inputs(torch.float64 if backend == "torch" else torch.float32, seed=24)
    m = masks()["float"].to(x[0].dtype)
    with pytest.raises(TypeError, match="torch.func.*grad.*torch.autograd"):
        torch.func.grad(lambda q: fasa_attention(q, *x[1:], m, 1.5, backend=backend).sum())(x[0])
    qs = torch.stack([x[0], 2 * x[0]])
    if backend == "torch":  # vmap runs on stock ops: right answers
        out = torch.func.vmap(lambda q: fasa_attention(q, *x[1:], m, 1.5, backend=backend))(qs)
        for i in range(2):
            torch.testing.assert_close(out[i], fasa_reference(qs[i], *x[1:], m, 1.5), rtol=1e-12, atol=1e-12)
    else:
        with pytest.raises(TypeError, match="vmap.*backend='torch'"):
            torch.func.vmap(lambda q: fasa_attention(q, *x[1:], m, 1.5, backend=backend))(qs)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = fwAD.make_dual(x[0], torch.ones_like(x[0]))
        with pytest.raises(TypeError, match="forward-mode AD"):
            fasa_attention(dual, *x[1:], m, 1.5, backend=backend)
        fasa_attention(*x, m, 1.5, backend=backend)  # no dual input: fine inside a dual level


@pytest.mark.parametrize("mode,n_txt", [("bias", 0), ("scale", 0), ("bias", 4)])
def test_vmap_with_a_per_sample_float_mask(mode, n_txt):
    """vmap over samples that each bring their own soft mask (a BatchedTensor has no storage: the value check
    reads the tensor it wraps), against the float64 oracle sample by sample."""
    from fasa_cases import assert_close_to_ref

    x = [torch.stack([t, 0.5 * t.flip(0)]) for t in inputs(seed=25)]  # 2 samples of [B, H, N, D]
    m = torch.rand(2, B, NF - n_txt, generator=torch.Generator().manual_seed(26))
    m[0, :, ::3] = 0.0
    m[1, 0] = 0.0

    def f(*a):
        return fasa_attention(*a, 1.5, mode=mode, n_txt=n_txt, backend="torch")

    out = torch.func.vmap(f)(*x, m)
    for i in range(2):
        assert_close_to_ref(out[i], [t[i] for t in x], m[i], 1.5, mode=mode, n_txt=n_txt)
    bad = m.clone()
    bad[1, 1, 2] = float("nan")                                  # one bad value in one sample is refused
    with pytest.raises(ValueError, match="^mask must hold finite"):
        torch.func.vmap(f)(*x, bad)
    with pytest.raises(TypeError, match="vmap.*backend='torch'"):  # the kernel: a clear refusal
        torch.func.vmap(lambda *a: fasa_attention(*a, 1.5, n_txt=n_txt, backend="triton"))(*x, m)


def test_prepared_masks_come_only_from_prepare():
    from freecure_ops import FasaMask

    with pytest.raises(TypeError, match="prepare_fasa_mask"):
        FasaMask(torch.ones(1, 4), torch.zeros(1, 4, dtype=torch.int32), torch.ones(1, 4),
                 torch.full((1,), 4, dtype=torch.int32))


def test_tensor_omega_under_compile_is_a_clear_error():
    x = inputs(torch.float32, seed=25)
    fn = torch.compile(lambda w: fasa_attention(*x, None, w, backend="torch"), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="pass a Python float"):
        fn(torch.tensor(1.5))


def test_the_op_hands_the_kernel_the_masks_binary_flag(monkeypatch):
    """A bool mask (raw or prepared) and a float mask whose live values are equal reach the kernel as binary
    (its scalar-bias FD loop), a soft mask does not; the results meet the reference either way."""
    import freecure_ops.op as op
    from fasa_cases import assert_close_to_ref

    seen, launcher = [], op._launcher()
    monkeypatch.setattr(op, "_launcher", lambda: lambda *a, **kw: (seen.append(a[5].binary), launcher(*a, **kw))[1])
    x = inputs()
    g = torch.Generator().manual_seed(3)
    hard = torch.rand(B, NF, generator=g) > 0.5
    soft = masks()["float"]
    cases = [(hard, True), (prepare_fasa_mask(hard), True), (prepare_fasa_mask(2.0 * hard.float()), True),
             (soft, False), (prepare_fasa_mask(soft), False)]
    for mask, binary in cases:
        out = fasa_attention(*x, mask, 1.5, backend="triton")
        assert seen.pop() is binary
        rows = mask.rows if hasattr(mask, "rows") else mask.float()
        assert_close_to_ref(out, x, rows, 1.5)
