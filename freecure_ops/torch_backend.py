"""FASA with stock PyTorch, for CPUs and machines without Triton: the PyTorch paths of :mod:`.op`'s table.

Each path builds its keys (:mod:`.torch_keys`) and attends once (:mod:`.torch_attend`: float32 whatever the
input dtype, FLUX's text rows over the PD keys alone); the op runs them with autocast off. The output comes
back in q's dtype, the LSE in float32 (float64 for float64 inputs). Every path takes
``(q, k_p, k_f, v_p, v_f, mask, p, return_lse)``, ``mask`` a :class:`~freecure_ops.FasaMask` or None and ``p``
the call's :class:`~freecure_ops.validation.FasaProblem`, and returns ``(out, lse or None)``.
"""
from __future__ import annotations

from .fasa_mask import with_live_keys
from .torch_attend import acc_dtype, as_dtype, text_and_image
from .torch_keys import dense_kv, folded_qkv, gathered_kv


def torch_gathered(q, k_p, k_f, v_p, v_f, mask, p, return_lse: bool):
    """"bias" mode: SDPA over the PD keys and the live FD keys gathered from the mask's packed list, ``omega * m``
    as an additive mask (the CPU's flash kernel takes one at no measurable cost)."""
    acc = acc_dtype(q.dtype)
    k, v, bias = gathered_kv(k_p, v_p, k_f, v_f, with_live_keys(mask), p.n_txt, p.omega, acc)
    out, lse = text_and_image(as_dtype(q, acc), k, v, bias, p.scale, p.n_txt, p.n_p, return_lse)
    return as_dtype(out, q.dtype), lse


def torch_folded(q, k_p, k_f, v_p, v_f, mask, p, return_lse: bool):
    """"bias" mode: the same keys as :func:`torch_gathered` with ``omega * m`` folded into one extra head-dim
    column, SDPA unmasked (scale 1); the extra columns of the output dropped."""
    qf, kf, vf = folded_qkv(q, k_p, v_p, k_f, v_f, with_live_keys(mask), p.n_txt, p.omega, p.scale,
                            acc_dtype(q.dtype))
    out, lse = text_and_image(qf, kf, vf, None, 1.0, p.n_txt, p.n_p, return_lse)
    return out[..., :q.shape[-1]].to(q.dtype), lse


def torch_dense(q, k_p, k_f, v_p, v_f, mask, p, return_lse: bool):
    """Every mode: SDPA over ``[PD; FD image]`` with a per-key bias ("bias": ``-inf`` on excluded keys, zeroed;
    "scale": ``omega * m`` folded into the FD keys, no bias). No gather, no host read of the live count."""
    rows = None if mask is None else mask._parts.rows
    q32, k, v, bias = dense_kv(q, k_p, k_f, v_p, v_f, rows, p.mode, p.omega, p.n_txt)
    bias = None if p.mode == "scale" else bias[:, None, None, :]
    out, lse = text_and_image(q32, k, v, bias, p.scale, p.n_txt, p.n_p, return_lse)
    return out.to(q.dtype), lse
