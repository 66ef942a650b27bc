"""The public op: validate once, then dispatch to the Triton kernel or the PyTorch path."""
from __future__ import annotations

import functools

import torch

from .fasa_mask import FasaMask, pack_checked_mask
from .torch_backend import fasa_torch
from .validation import check_fasa_inputs

BACKENDS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=None)
def _kernels():
    """The Triton side, imported on first use: importing triton fixes whether kernels run interpreted, so
    ``import freecure_ops`` must not do it (the benchmark and tests set TRITON_INTERPRET first)."""
    from . import kernels

    return kernels


def _pick_backend(backend, device: torch.device) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda":
        if device.type != "cpu" or not _kernels().interpreting():
            raise ValueError(f"backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set "
                             f"before triton is imported; got tensors on {device}")
    return backend


def fasa_attention(q, k_p, k_f, v_p, v_f, mask=None, omega=1.0, *, scale=None, mode="bias", n_txt=0,
                   backend="auto", return_lse=False):
    """Foundation-Aware Self-Attention (FASA), SPEC.md semantics.

    q ``[B, H, Nq, D]``; k_p, v_p ``[B, H, Np, D]``; k_f, v_f ``[B, H, Nf, D]`` (any strides; one dtype
    among fp16/bf16/fp32; one device). ``mask``: ``[Nimg]`` or ``[B, Nimg]`` with ``Nimg = Nf - n_txt``,
    bool or float >= 0, None for all ones; or a :class:`FasaMask` from :func:`prepare_fasa_mask` (reuse one
    across calls: a raw mask is checked and prepared again in every call, which costs a host sync for float
    masks). ``mode``: "bias" (``logit = s + omega*m`` where ``m > 0``,
    excluded where ``m == 0``) or "scale" (``logit = omega*m*s``). ``n_txt > 0`` selects the FLUX joint-sequence
    variant. Returns ``[B, H, Nq, D]`` in q's dtype, and with ``return_lse`` also the fp32 natural-log
    log-sum-exp ``[B, H, Nq]`` of each row's logits.
    """
    p = check_fasa_inputs(q, k_p, k_f, v_p, v_f, mask, omega, scale=scale, mode=mode, n_txt=n_txt)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    backend = _pick_backend(backend, q.device)
    prepared = mask if mask is None or isinstance(mask, FasaMask) else pack_checked_mask(mask)
    if backend == "torch":
        return fasa_torch(q, k_p, k_f, v_p, v_f, None if prepared is None else prepared.rows, p, return_lse=return_lse)
    return _kernels().fasa_fwd(q, k_p, k_f, v_p, v_f, prepared, scale=p.scale, omega=p.omega, mode=p.mode,
                    n_txt=p.n_txt, return_lse=return_lse)
