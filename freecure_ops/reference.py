"""The eager FASA oracle: materialized scores, one softmax, exactly SPEC.md read line by line.

It is the ground truth for tests (run it in float64) and the "authors' code" baseline in benchmarks
(run it in the input dtype). It shares no code with the kernel, the torch backend or the input validation
on purpose: its default scale (``D ** -0.5``), its reading of ``mask=None`` (all ones), of bool and float
masks and of shared ``[Nimg]`` masks, and its input checks are all written out here, so that a bug in the
code under test (validation.py, torch_backend.py, kernels/) cannot also be a bug of the oracle.
"""
from __future__ import annotations

import math

import torch

_MODES = ("bias", "scale")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(q, k_p, k_f, v_p, v_f, mask, omega, scale, mode, n_txt):
    """The oracle's own input checks (TypeError / ValueError naming the argument); returns (omega, scale)."""
    named = (("q", q), ("k_p", k_p), ("k_f", k_f), ("v_p", v_p), ("v_f", v_f))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be a 4 dims tensor [B, H, N, D], got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q must have dtype float16/bfloat16/float32/float64, got {q.dtype}")
    for name, t in named:
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, q has {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on device {t.device}, q on {q.device}")
        if t.shape[0] != q.shape[0] or t.shape[1] != q.shape[1]:
            raise ValueError(f"{name} must have the batch and heads of q {tuple(q.shape[:2])}, got {tuple(t.shape)}")
        if t.shape[3] != q.shape[3]:
            raise ValueError(f"{name} must have the head dim of q ({q.shape[3]}), got {tuple(t.shape)}")
        if t.shape[2] < 1:
            raise ValueError(f"{name} must hold at least one token, got {tuple(t.shape)}")
    if v_p.shape[2] != k_p.shape[2]:
        raise ValueError(f"v_p must have as many tokens as k_p, got {v_p.shape[2]} vs {k_p.shape[2]}")
    if v_f.shape[2] != k_f.shape[2]:
        raise ValueError(f"v_f must have as many tokens as k_f, got {v_f.shape[2]} vs {k_f.shape[2]}")
    if isinstance(n_txt, bool) or not isinstance(n_txt, int):
        raise TypeError(f"n_txt must be an int, got {type(n_txt).__name__}")
    if not (0 <= n_txt < k_f.shape[2] and n_txt <= q.shape[2] and n_txt <= k_p.shape[2]):
        raise ValueError(f"n_txt must be in [0, Nf) and at most Nq and Np, got {n_txt}")
    if mode not in _MODES:
        raise ValueError(f"mode must be 'bias' or 'scale', got {mode!r}")
    reals = {}
    for name, x in (("omega", omega), ("scale", scale)):
        if x is None and name == "scale":
            reals[name] = None
            continue
        if isinstance(x, torch.Tensor):
            if x.dim() != 0:
                raise ValueError(f"{name} must be a number or a 0-dim tensor, got shape {tuple(x.shape)}")
            x = x.item()
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
        if not math.isfinite(x):
            raise ValueError(f"{name} must be finite, got {x}")
        reals[name] = float(x)
    n_img = k_f.shape[2] - n_txt
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            raise TypeError(f"mask must be bool or floating point, got {mask.dtype}")
        if mask.dim() not in (1, 2):
            raise ValueError(f"mask must be [Nimg] or [B, Nimg], got {mask.dim()} dims")
        if mask.shape[-1] != n_img or (mask.dim() == 2 and mask.shape[0] not in (1, q.shape[0])):
            raise ValueError(f"mask must have shape [Nimg]=[{n_img}], [1, Nimg] or [B, Nimg]=[{q.shape[0]}, "
                             f"{n_img}], got {tuple(mask.shape)}")
        if mask.device != q.device:
            raise ValueError(f"mask must be on q's device {q.device}, got {mask.device}")
        if mask.dtype != torch.bool and bool((~torch.isfinite(mask) | (mask < 0)).any()):
            raise ValueError("mask must hold finite values >= 0 (found a negative, NaN or inf entry)")
    return reals["omega"], reals["scale"]


def fasa_reference(q, k_p, k_f, v_p, v_f, mask=None, omega=1.0, *, scale=None, mode="bias", n_txt=0,
                   return_lse=False):
    """Eager FASA in the inputs' dtype (any floating dtype, float64 included). Same semantics as
    :func:`freecure_ops.fasa_attention`; the scores are computed in the inputs' dtype, the softmax in at
    least float32 (float64 for float64 inputs). With ``return_lse`` also the natural-log LSE of each row."""
    omega, scale = _check(q, k_p, k_f, v_p, v_f, mask, omega, scale, mode, n_txt)
    b, _, n_q, d = q.shape
    n_f = k_f.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(d)  # SPEC.md: scale defaults to D ** -0.5
    soft = torch.float64 if q.dtype == torch.float64 else torch.float32

    # m_j for every FD key j: text keys (j < n_txt) carry none, image key j carries mask entry j - n_txt;
    # mask=None means m = 1 on every image key; a [Nimg] mask is shared by the whole batch.
    m = torch.zeros(b, n_f, dtype=soft, device=q.device)
    if mask is None:
        m[:, n_txt:] = 1.0
    else:
        m[:, n_txt:] = mask.to(soft).expand(b, n_f - n_txt)
    # FD keys that are not part of the computation (text keys; in "bias" mode also m == 0) get zero K/V, so
    # that whatever they hold (NaN, inf) cannot reach the output through 0 * inf.
    part = (m > 0) if mode == "bias" else (torch.arange(n_f, device=q.device) >= n_txt).expand(b, n_f)
    k_f = torch.where(part[:, None, :, None], k_f, torch.zeros((), dtype=k_f.dtype, device=k_f.device))
    v_f = torch.where(part[:, None, :, None], v_f, torch.zeros((), dtype=v_f.dtype, device=v_f.device))

    s_p = (torch.einsum("bhqd,bhkd->bhqk", q, k_p) * scale).to(soft)   # [B, H, Nq, Np]
    s_f = (torch.einsum("bhqd,bhkd->bhqk", q, k_f) * scale).to(soft)   # [B, H, Nq, Nf]
    m = m[:, None, None, :]                                             # [B, 1, 1, Nf]
    if mode == "bias":  # logit = s + omega * m where m > 0, the key excluded where m == 0
        s_f = torch.where(m > 0, s_f + omega * m, torch.full_like(s_f, -math.inf))
    else:               # logit = omega * m * s, nothing excluded
        s_f = omega * m * s_f
    if n_txt > 0:       # FD text keys are never attended; PD text query rows see PD keys only
        s_f[:, :, :, :n_txt] = -math.inf
        s_f[:, :, :n_txt, :] = -math.inf

    logits = torch.cat([s_p, s_f], dim=-1)
    lse = torch.logsumexp(logits, dim=-1)
    weights = torch.exp(logits - lse[..., None]).to(q.dtype)
    out = torch.einsum("bhqk,bhkd->bhqd", weights, torch.cat([v_p, v_f], dim=2))
    if return_lse:
        return out, lse  # float32, or float64 for float64 inputs
    return out
