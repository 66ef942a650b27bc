"""Every bad input is refused with a TypeError/ValueError naming the argument, before any launch."""
import math

import numpy as np
import pytest
import torch

from freecure_ops import fasa_attention, fasa_reference

B, H, NQ, NP, NF, D = 2, 3, 10, 12, 14, 16


_GEN = torch.Generator().manual_seed(0)  # the bad inputs below are drawn at import, from this generator only


def randn(*shape, **kw):
    """``torch.randn`` from this module's generator (never the global RNG)."""
    return torch.randn(*shape, generator=_GEN, **kw)


def good(**over):
    g = torch.Generator().manual_seed(0)
    args = dict(
        q=torch.randn(B, H, NQ, D, generator=g), k_p=torch.randn(B, H, NP, D, generator=g),
        k_f=torch.randn(B, H, NF, D, generator=g), v_p=torch.randn(B, H, NP, D, generator=g),
        v_f=torch.randn(B, H, NF, D, generator=g), mask=torch.ones(NF), omega=1.5,
    )
    args.update(over)
    return args


def call(fn=fasa_attention, backend="torch", **over):
    kw = {k: over.pop(k) for k in ("scale", "mode", "n_txt", "return_lse") if k in over}
    a = good(**over)
    if fn is fasa_attention:
        kw["backend"] = backend
    return fn(a["q"], a["k_p"], a["k_f"], a["v_p"], a["v_f"], a["mask"], a["omega"], **kw)


BAD = [
    # (override, error type, words the message must contain)
    (dict(q=randn(B, NQ, D)), ValueError, ["q", "4 dims"]),
    (dict(k_p=[1, 2]), TypeError, ["k_p", "torch.Tensor"]),
    (dict(v_f=randn(B, H, NF, D, 1)), ValueError, ["v_f"]),
    (dict(q=torch.randint(0, 3, (B, H, NQ, D), generator=_GEN)), TypeError, ["q", "floating"]),
    (dict(k_f=randn(B, H, NF, D, dtype=torch.float16)), TypeError, ["k_f", "dtype"]),
    (dict(k_p=randn(B + 1, H, NP, D)), ValueError, ["k_p", "batch"]),
    (dict(v_p=randn(B, H + 1, NP, D)), ValueError, ["v_p", "heads"]),
    (dict(k_f=randn(B, H, NF, D + 1)), ValueError, ["k_f", "head dim"]),
    (dict(v_p=randn(B, H, NP + 1, D)), ValueError, ["v_p", "k_p"]),
    (dict(v_f=randn(B, H, NF - 1, D)), ValueError, ["v_f", "k_f"]),
    (dict(k_p=randn(B, H, 0, D), v_p=randn(B, H, 0, D)), ValueError, ["k_p", "at least one"]),
    (dict(q=randn(B, H, NQ, 300), k_p=randn(B, H, NP, 300), k_f=randn(B, H, NF, 300),
          v_p=randn(B, H, NP, 300), v_f=randn(B, H, NF, 300), ), ValueError, ["head dim", "256"]),
    (dict(mask=torch.ones(NF + 1)), ValueError, ["mask", "Nimg"]),
    (dict(mask=torch.ones(B + 1, NF)), ValueError, ["mask", "[B, Nimg]"]),
    (dict(mask=torch.ones(1, 1, NF)), ValueError, ["mask", "3 dims"]),
    (dict(mask=torch.ones(NF, dtype=torch.int64)), TypeError, ["mask", "bool or floating"]),
    (dict(mask=[1.0] * NF), TypeError, ["mask", "torch.Tensor"]),
    (dict(mask=torch.ones(NF).index_fill(0, torch.tensor([3]), -0.5)), ValueError, ["mask", "negative"]),
    (dict(mask=torch.ones(NF).index_fill(0, torch.tensor([3]), math.nan)), ValueError, ["mask", "NaN"]),
    (dict(mask=torch.ones(NF).index_fill(0, torch.tensor([3]), math.inf)), ValueError, ["mask", "inf"]),
    (dict(omega=math.nan), ValueError, ["omega", "finite"]),
    (dict(omega=1e39), ValueError, ["omega", "float32 range"]),
    (dict(scale=-1e38), ValueError, ["scale", "float32 range"]),
    (dict(mask=torch.ones(NF, dtype=torch.float64).index_fill(0, torch.tensor([3]), 1e300)), ValueError,
     ["mask", "float32"]),
    (dict(mask=torch.ones(NF, dtype=torch.float64).index_fill(0, torch.tensor([3]), 1e-300)), ValueError,
     ["mask", "float32"]),
    (dict(mask=torch.ones(NF).to(torch.float8_e4m3fn)), TypeError, ["mask", "float32"]),
    (dict(omega=math.inf), ValueError, ["omega", "finite"]),
    (dict(omega="1.5"), TypeError, ["omega"]),
    (dict(omega=True), TypeError, ["omega"]),
    (dict(omega=torch.ones(2)), ValueError, ["omega", "0-dim"]),
    (dict(scale=math.inf), ValueError, ["scale", "finite"]),
    (dict(mode="multiply"), ValueError, ["mode", "bias"]),
    (dict(n_txt=-1), ValueError, ["n_txt"]),
    (dict(n_txt=NF), ValueError, ["n_txt"]),
    (dict(n_txt=NQ + 1), ValueError, ["n_txt"]),
    # n_txt above Np alone (Nq and Nf have room): text tokens lead every joint sequence, PD keys included
    (dict(q=randn(B, H, NP + 6, D), k_f=randn(B, H, NP + 8, D), v_f=randn(B, H, NP + 8, D),
          mask=torch.ones(8 - 1), n_txt=NP + 1), ValueError, ["n_txt", "Np"]),
    # tensors on two devices: the meta device stands in for a second one where there is no GPU
    (dict(k_p=torch.empty(B, H, NP, D, device="meta")), ValueError, ["k_p", "device"]),
    (dict(v_f=torch.empty(B, H, NF, D, device="meta")), ValueError, ["v_f", "device"]),
    (dict(n_txt=2.0), TypeError, ["n_txt", "int"]),
    (dict(n_txt=True), TypeError, ["n_txt", "int"]),
    (dict(n_txt=np.bool_(True)), TypeError, ["n_txt", "int"]),
    (dict(omega=torch.tensor(1.5, requires_grad=True)), TypeError, ["omega", "requires grad"]),
    (dict(scale=torch.tensor(0.25, requires_grad=True)), TypeError, ["scale", "requires grad"]),
    (dict(omega=10 ** 400), ValueError, ["omega", "float32 range"]),
    (dict(omega=1e37, mask=torch.full((NF,), 10.0)), ValueError, ["omega * max(mask)", "float32 range"]),
    (dict(mask=torch.ones(B + 1, NF)), ValueError, ["mask", "[1, Nimg]"]),  # neither 1 nor B rows
]


# Limits of the kernel, not of the semantics (the float64 oracle takes any head dim and any float64 value):
# head dim > 256, and scalars or mask values the float32 kernel cannot hold.
KERNEL_ONLY = {i for i, (_, _, words) in enumerate(BAD) if "256" in words or any("float32" in w for w in words)}
# A 0-dim tensor omega/scale that requires grad: the op does not differentiate with respect to them (and says
# so); the oracle is plain autograd-able eager code, where that is fine.
KERNEL_ONLY |= {i for i, (_, _, words) in enumerate(BAD) if "requires grad" in words}


@pytest.mark.parametrize("case,fn", [(i, fn) for fn in (fasa_attention, fasa_reference) for i in range(len(BAD))
                                     if fn is fasa_attention or i not in KERNEL_ONLY],
                         ids=lambda v: v.__name__ if callable(v) else f"bad{v}")
def test_bad_input_is_refused_with_named_argument(case, fn):
    over, err, words = BAD[case]
    with pytest.raises(err) as info:
        call(fn, **over)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in message: {msg}"


def test_float64_runs_on_the_torch_backend_only():
    # float64 exists for gradcheck: the PyTorch backend (and "auto" on CPU) takes it; the Triton kernel does not,
    # and says which backend to use.
    a = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in good().items()}
    with pytest.raises(TypeError, match="float64.*backend='torch'"):
        fasa_attention(*a.values(), backend="triton")
    out = fasa_attention(*a.values(), backend="torch")
    assert out.dtype == torch.float64
    assert fasa_reference(*a.values()).dtype == torch.float64
    torch.testing.assert_close(out, fasa_reference(*a.values()), rtol=1e-12, atol=1e-12)


def test_mask_length_follows_n_txt():
    # With n_txt text tokens the mask covers only the Nf - n_txt image tokens.
    with pytest.raises(ValueError, match="mask"):
        call(n_txt=4)
    call(n_txt=4, mask=torch.ones(NF - 4))


def test_unknown_backend_and_bad_flags():
    with pytest.raises(ValueError, match="backend"):
        call(backend="cuda")
    with pytest.raises(TypeError, match="return_lse"):
        call(return_lse="yes")


def test_triton_backend_on_cpu_without_interpreter_is_refused(monkeypatch):
    import sys

    import freecure_ops.kernels.fasa_fwd  # noqa: F401

    # Triton fixes interpreter mode when it decorates the kernels (import time): pretend it was off then.
    monkeypatch.setattr(sys.modules["freecure_ops.kernels.fasa_fwd"], "_INTERPRETING", False)
    with pytest.raises(ValueError, match="backend='triton'.*TRITON_INTERPRET"):
        call(backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mix devices")
def test_mixed_devices_are_refused():
    with pytest.raises(ValueError, match="k_p.*device"):
        call(k_p=torch.randn(B, H, NP, D, device="cuda"))
    with pytest.raises(ValueError, match="mask.*device"):
        a = {k: (v.cuda() if isinstance(v, torch.Tensor) and k != "mask" else v) for k, v in good().items()}
        fasa_attention(*a.values())


def test_mask_on_another_device_is_refused():
    # Without CUDA, the meta device stands in for "another device".
    with pytest.raises(ValueError, match="mask must be on the same device"):
        call(mask=torch.ones(NF, device="meta"))


def test_omega_as_zero_dim_tensor_and_int_accepted():
    a = call(omega=torch.tensor(1.5))
    b = call(omega=1.5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    call(omega=2)


def test_mask_values_rechecked_after_in_place_change():
    # A mask's values are checked once per version (the check syncs the device); an in-place edit of an
    # already accepted mask must not slip through.
    mask = torch.ones(NF)
    call(mask=mask)
    call(mask=mask)
    mask[2] = -1.0
    with pytest.raises(ValueError, match="mask must hold finite values"):
        call(mask=mask)
    mask[2] = float("nan")
    with pytest.raises(ValueError, match="mask must hold finite values"):
        call(mask=mask)


def test_inference_mode_masks_are_checked_every_time():
    with torch.inference_mode():
        mask = torch.ones(NF)
        call(mask=mask)
        mask[2] = -1.0
        with pytest.raises(ValueError, match="mask must hold finite values"):
            call(mask=mask)


@pytest.mark.parametrize("omega", [np.float32(1.5), np.float64(1.5), np.int64(2), np.float16(0.5)])
def test_numpy_scalars_are_real_numbers(omega):
    out = call(omega=omega, backend="torch")
    ref = call(omega=float(omega), backend="torch")
    assert torch.equal(out, ref)
    with pytest.raises(TypeError, match="omega"):
        call(omega=np.bool_(True))


def test_numpy_integer_n_txt_is_an_int():
    q = randn(B, H, NQ, D)
    assert torch.equal(call(q=q, mask=torch.ones(NF - 2), n_txt=np.int64(2)),
                       call(q=q, mask=torch.ones(NF - 2), n_txt=2))


def test_a_one_row_mask_is_shared_like_a_flat_one():
    flat = torch.rand(NF, generator=torch.Generator().manual_seed(3))
    assert torch.equal(call(mask=flat[None]), call(mask=flat))


def test_float_mask_on_meta_or_fake_tensors_needs_no_values():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from freecure_ops import prepare_fasa_mask

    meta = [torch.empty(B, H, n, D, device="meta") for n in (NQ, NP, NF, NP, NF)]
    assert fasa_attention(*meta, torch.ones(NF, device="meta"), 1.5).shape == (B, H, NQ, D)
    assert prepare_fasa_mask(torch.ones(NF, device="meta")).n_img == NF
    with FakeTensorMode():
        fake = [torch.empty(B, H, n, D) for n in (NQ, NP, NF, NP, NF)]
        assert fasa_attention(*fake, torch.ones(NF), 1.5).shape == (B, H, NQ, D)


def test_a_prepared_mask_bounds_omega_times_m_too():
    from freecure_ops import prepare_fasa_mask

    m = prepare_fasa_mask(torch.full((NF,), 10.0))
    assert m.max_value == 10.0 and prepare_fasa_mask(torch.ones(NF, dtype=torch.bool)).max_value == 1.0
    with pytest.raises(ValueError, match=r"omega \* max\(mask\)"):
        call(mask=m, omega=1e37)
    assert torch.isfinite(call(mask=m, omega=1e36)).all()
