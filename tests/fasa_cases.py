"""Shared helpers for FASA numeric tests: seeded input builders and the tolerance rules.

Every random tensor here comes from an explicit ``torch.Generator``: no test depends on the global RNG.

Tolerances at the rounding floor (``assert_close_to_ref``)
----------------------------------------------------------
The unit is the error of the exact answer rounded to the output dtype: ``floor = max|ref64.to(dtype) - ref64|``
with ``ref64`` the float64 oracle (:func:`fasa_reference`, which shares no code with the kernel, the torch
backend or the validation), and at least half an ulp of ``dtype`` at ``max|ref64|`` (when only a few outputs
sit in the top binade they may happen to round well; a result right to fp32 accuracy can still land one
rounding step off there). A result passes when

    max|out - ref64| <= C[dtype] * floor + ATOL[dtype] + eps32 * max|logit| * max|v|.

The last term (``logit_term``) is what float32 logits cost any correct implementation; it matters only for
float32 at large |omega| (logits ~ 100 at omega 10, where a fixed C would need 100+).

C comes from the errors of the kernel and of the torch backend over every case of the suite
(tests/test_fasa_kernel.py, tests/test_fasa_identities.py with its 60 property examples,
tests/test_numerics_floor.py; CPU interpreter, kernel of ca86d12, 2026-11), with 1.5-2x headroom over the
worst case seen:

    dtype     worst err / floor seen                                    C    ATOL
    float32   39 (a D=129 property case); omega=8 "scale": 30            64   1e-7
    float16   4.5 torch backend ("scale" keys rounded to fp16); kernel 2  8    5e-5
    bfloat16  2.0 (bf16 dots upcast in the interpreter)                  4    5e-4

float32's C is the largest because its floor is a single float32 rounding of the output, while its error
comes from float32 logits (about eps32 * |logit| per weight); fp16/bf16 errors are the output rounding
plus the rounding of the probabilities for the P @ V dot. ATOL only matters where the floor is ~0 (one key:
the output is a value row). Recalibrate by running the numeric tests with ``FASA_TOL_LOG=file.jsonl``
(one line per check: test, dtype, err, floor, ratio).

What this rule catches that the old one (2x the error of the eager reference run in fp16/bf16: 5-50x slack)
did not: fp16 accumulation in ``tl.dot``, a dropped online-softmax rescale, a truncated log2(e), bf16
computed as fp16 (the range test in test_numerics_floor.py). ``python tests/mutation_probe.py`` checks it.

The flash-attention rule (``2 * max|same_dtype - ref64| + FLOOR``) stays only where the same-dtype
implementation is independent of the code under test (SDPA): ``check_against_sdpa``.
"""
from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F

from freecure_ops import fasa_reference

# The rounding-floor rule (see the module docstring for the derivation).
C = {torch.float32: 64.0, torch.float16: 8.0, torch.bfloat16: 4.0}
ATOL = {torch.float32: 1e-7, torch.float16: 5e-5, torch.bfloat16: 5e-4}

# Floors of the flash-attention rule against SDPA: max|out - ref64| <= 2 * max|sdpa_same_dtype - ref64| + floor.
FLOOR = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}


def randn(shape, dtype, device, *, layout="bhnd", gen=None):
    """Random [B, H, N, D] tensor in one of three memory layouts, all read in place by the kernel:
    "bhnd" contiguous, "bnhd" (what diffusers hands over: view(B, N, H, D).transpose(1, 2)),
    "strided_d" (every other element of a wider buffer: a non-unit stride on the head dim)."""
    gen = torch.Generator().manual_seed(0) if gen is None else gen
    b, h, n, d = shape
    if layout == "bhnd":
        return torch.randn(b, h, n, d, generator=gen).to(device=device, dtype=dtype)
    if layout == "bnhd":
        return torch.randn(b, n, h, d, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
    if layout == "strided_d":
        return torch.randn(b, h, n, 2 * d, generator=gen).to(device=device, dtype=dtype)[..., ::2]
    raise ValueError(layout)


def make_mask(kind, batch, n_img, device, *, shared=False, gen=None, seed=None):
    """An FD-token mask of ``kind`` from a seeded generator: ``gen`` when given, else one seeded with
    ``seed`` (default: a seed derived from the arguments, so that every call is reproducible)."""
    if gen is None:
        if seed is None:
            seed = 1000 * n_img + 10 * batch + int(shared) + sum(map(ord, kind))
        gen = torch.Generator().manual_seed(seed)
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


def rand(*shape, seed=0, device="cpu"):
    """``torch.rand`` from a generator seeded with ``seed``."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


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


def half_ulp(x: float, dtype: torch.dtype) -> float:
    """Half the spacing of ``dtype`` numbers at magnitude ``x`` (the worst rounding error there)."""
    if x == 0:
        return 0.0
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(x)) / 2


def rounding_floor(ref64: torch.Tensor, dtype: torch.dtype) -> float:
    """The error of the exact answer rounded to ``dtype``: ``max|ref64.to(dtype) - ref64|``, and at least half
    an ulp at the largest output magnitude (a few outputs in the top binade may happen to round well; a
    result that is right to fp32 accuracy can still land one rounding step off there)."""
    measured = (ref64.to(dtype).double() - ref64).abs().max().item()
    return max(measured, half_ulp(ref64.abs().max().item(), dtype))


def floor_bound(ref64: torch.Tensor, dtype: torch.dtype, *, c: float | None = None, atol: float | None = None):
    """The rounding-floor bound ``C[dtype] * floor + ATOL[dtype]`` for results of ``dtype``."""
    c = C[dtype] if c is None else c
    atol = ATOL[dtype] if atol is None else atol
    return c * rounding_floor(ref64, dtype) + atol


def logit_term(inputs, mask, omega, *, scale=None, mode="bias", **_) -> float:
    """What float32 logits alone cost a correct implementation: ``eps32 * max|logit| * max|v|`` (a logit off by
    eps32 relative moves its weight by eps32 * |logit|). Negligible against the output rounding of fp16/bf16,
    and for float32 at moderate logits; it dominates float32 at large ``omega`` (|logit| ~ 100 at omega 10)."""
    q, k_p, k_f, v_p, v_f = (t.double() for t in inputs)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = max(torch.einsum("bhqd,bhkd->bhqk", q, k).abs().max().item() for k in (k_p, k_f)) * abs(scale)
    m = 1.0 if mask is None else float(mask.double().max())
    logit = s + abs(omega) * m if mode == "bias" else max(s, abs(omega) * m * s)
    return torch.finfo(torch.float32).eps * logit * max(v_p.abs().max().item(), v_f.abs().max().item())


def assert_close_to_ref(out, inputs, mask, omega, *, c=None, atol=None, **kw):
    """Check ``out`` against the float64 oracle with the rounding-floor rule (module docstring), plus the
    float32-logit term (:func:`logit_term`). Returns (error, floor)."""
    q = inputs[0]
    ref64 = fasa_reference(*[to64(t) for t in inputs], to64(mask), omega, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), "output holds NaN/inf"
    err = (out.double() - ref64).abs().max().item()
    floor = rounding_floor(ref64, q.dtype)
    if os.environ.get("FASA_TOL_LOG"):  # recalibration: one JSON line per check (see the module docstring)
        with open(os.environ["FASA_TOL_LOG"], "a") as f:
            f.write(json.dumps(dict(test=os.environ.get("PYTEST_CURRENT_TEST"), dtype=str(q.dtype), err=err,
                                    floor=floor, ratio=err / max(floor, 1e-300))) + "\n")
    bound = floor_bound(ref64, q.dtype, c=c, atol=atol) + logit_term(inputs, mask, omega, **kw)
    assert err <= bound, (f"max error {err:.3e} > bound {bound:.3e} "
                          f"(rounding floor {floor:.3e}, {err / max(floor, 1e-300):.1f}x it)")
    return err, floor


def check_against_sdpa(out, q, k, v, **sdpa_kw):
    """The flash-attention rule with SDPA as both the float64 oracle and the same-dtype baseline: SDPA is an
    implementation independent of ours, so its same-dtype error is a fair error scale."""
    ref64 = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **sdpa_kw)
    same = F.scaled_dot_product_attention(q, k, v, **sdpa_kw)
    assert torch.isfinite(out).all(), "output holds NaN/inf"
    err = (out.double() - ref64).abs().max().item()
    bound = 2 * (same.double() - ref64).abs().max().item() + FLOOR[q.dtype]
    assert err <= bound, f"{err:.3e} > {bound:.3e}"
    return err
