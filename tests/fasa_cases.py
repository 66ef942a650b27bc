"""Shared helpers for FASA numeric tests: input builders and the flash-attention tolerance rule."""
from __future__ import annotations

import torch

from freecure_ops import fasa_reference

# Floors of the flash-attention rule: max|out - ref64| <= 2 * max|same_dtype - ref64| + floor.
FLOOR = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}


def randn(shape, dtype, device, *, layout="bhnd", gen=None):
    """Random [B, H, N, D] tensor in one of three memory layouts, all read in place by the kernel:
    "bhnd" contiguous, "bnhd" (what diffusers hands over: view(B, N, H, D).transpose(1, 2)),
    "strided_d" (every other element of a wider buffer: a non-unit stride on the head dim)."""
    b, h, n, d = shape
    if layout == "bhnd":
        return torch.randn(b, h, n, d, generator=gen).to(device=device, dtype=dtype)
    if layout == "bnhd":
        return torch.randn(b, n, h, d, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
    if layout == "strided_d":
        return torch.randn(b, h, n, 2 * d, generator=gen).to(device=device, dtype=dtype)[..., ::2]
    raise ValueError(layout)


def make_mask(kind, batch, n_img, device, *, shared=False, gen=None):
    rows = 1 if shared else batch
    u = torch.rand(rows, n_img, generator=gen)
    if kind == "binary":
        m = (u > 0.6).float()
    elif kind == "bool":
        m = u > 0.6
    elif kind == "soft":
        m = torch.where(u > 0.5, u * 2, torch.zeros_like(u))  # zeros plus values in (1, 2)
    elif kind == "zeros":
        m = torch.zeros(rows, n_img)
    elif kind == "ones":
        m = torch.ones(rows, n_img)
    else:
        raise ValueError(kind)
    m = m.to(device)
    return m[0] if shared else m


def make_inputs(b, h, n_q, n_p, n_f, d, dtype, device, *, layout="bhnd", seed=0, scale_qk=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = randn((b, h, n_q, d), dtype, device, layout=layout, gen=gen)
    k_p = randn((b, h, n_p, d), dtype, device, layout=layout, gen=gen)
    k_f = randn((b, h, n_f, d), dtype, device, layout=layout, gen=gen)
    v_p = randn((b, h, n_p, d), dtype, device, layout=layout, gen=gen)
    v_f = randn((b, h, n_f, d), dtype, device, layout=layout, gen=gen)
    if scale_qk != 1.0:
        q, k_p, k_f = q * scale_qk, k_p * scale_qk, k_f * scale_qk
    return q, k_p, k_f, v_p, v_f


def to64(t):
    return None if t is None else (t.double() if t.dtype != torch.bool else t)


def assert_close_to_ref(out, inputs, mask, omega, *, floor=None, **kw):
    """Check ``out`` against the float64 reference with the flash-attention rule, the same-dtype eager
    reference giving the error scale. Returns (kernel_err, same_dtype_err)."""
    q = inputs[0]
    ref64 = fasa_reference(*[to64(t) for t in inputs], to64(mask), omega, **kw)
    same = fasa_reference(*inputs, mask, omega, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), "output holds NaN/inf"
    err = (out.double() - ref64).abs().max().item()
    same_err = (same.double() - ref64).abs().max().item()
    bound = 2 * same_err + (FLOOR[q.dtype] if floor is None else floor)
    assert err <= bound, f"max error {err:.3e} > bound {bound:.3e} (same-dtype eager error {same_err:.3e})"
    return err, same_err
