"""The backward of FASA, by recomputation with stock PyTorch ops (every backend's forward shares it).

For ``out = softmax(S) V`` with ``S = scale * q K^T + bias`` over the keys ``K = [k_p; FD image keys]``:
``P = softmax(S)``, ``dV = P^T dO``, ``dS = P * (dO V^T - rowsum(dO * out))`` (plus ``P * dlse`` when the
log-sum-exp is an output too), ``dq = scale * dS K``, ``dK = scale * dS^T q``. The FD image keys enter as the
forward's dense path builds them (:func:`freecure_ops.torch_keys.dense_kv`): "bias" mode zeroes excluded
keys (their weight is exactly 0, so their gradient is 0 as well), "scale" mode folds ``omega * m`` into the
keys (the chain rule multiplies their gradient by the same factor). FD text keys (``n_txt``) are never
attended: zero gradient. In the FLUX variant text query rows see the PD keys only.

The scores are materialized one query chunk at a time (``[B, H, chunk, Np + Nimg]``), in float32 (float64 for
float64 inputs). This is the "recompute through the torch path" backward: correct everywhere and traceable
by AOTAutograd (plain aten ops), not fast; a fused Triton backward is future work.
"""
from __future__ import annotations

import torch

from .torch_attend import acc_dtype, no_autocast
from .torch_keys import dense_kv, mask_rows
from .validation import FasaProblem

BWD_CHUNK = 1024  # query rows per chunk


def fasa_torch_backward(q, k_p, k_f, v_p, v_f, rows, g_out, g_lse, p: FasaProblem):
    """Gradients ``(dq, dk_p, dk_f, dv_p, dv_f)`` of FASA for the output gradient ``g_out`` ``[B, H, Nq, D]``
    and (optionally, else None) the log-sum-exp gradient ``g_lse`` ``[B, H, Nq]``; each in its input's dtype.
    ``rows``: the mask rows ``[1|B, Nimg]`` the forward used (None: all ones). Autocast is off inside: the
    recomputation runs in the accumulation dtype, as the forward does."""
    with no_autocast(q.device.type):
        return _backward(q, k_p, k_f, v_p, v_f, rows, g_out, g_lse, p)


def _backward(q, k_p, k_f, v_p, v_f, rows, g_out, g_lse, p: FasaProblem):
    acc = acc_dtype(q.dtype)
    q32, k, v, bias = dense_kv(q, k_p, k_f, v_p, v_f, rows, p.mode, p.omega, p.n_txt)
    bias = bias[:, None, None, :]
    n_k = k.shape[2]
    go = g_out.to(acc)
    gl = None if g_lse is None else g_lse.to(acc)
    fd_keys = torch.arange(n_k, device=q.device) >= p.n_p
    dq_parts = []
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    for start in range(0, p.n_q, BWD_CHUNK):
        stop = min(start + BWD_CHUNK, p.n_q)
        qc = q32[:, :, start:stop]
        s = torch.einsum("bhqd,bhkd->bhqk", qc, k) * p.scale + bias
        if p.n_txt > start:  # FLUX text query rows see the PD keys only
            txt_rows = torch.arange(start, stop, device=q.device) < p.n_txt
            s = s.masked_fill(txt_rows[:, None] & fd_keys[None, :], float("-inf"))
        prob = torch.softmax(s, dim=-1)
        out = torch.einsum("bhqk,bhkd->bhqd", prob, v)
        goc = go[:, :, start:stop]
        dv = dv + torch.einsum("bhqk,bhqd->bhkd", prob, goc)
        dp = torch.einsum("bhqd,bhkd->bhqk", goc, v)
        ds = prob * (dp - (goc * out).sum(dim=-1, keepdim=True))
        if gl is not None:
            ds = ds + prob * gl[:, :, start:stop, None]
        dq_parts.append(torch.einsum("bhqk,bhkd->bhqd", ds, k) * p.scale)
        dk = dk + torch.einsum("bhqk,bhqd->bhkd", ds, qc) * p.scale
    dq = torch.cat(dq_parts, dim=2)
    dk_img, dv_img = dk[:, :, p.n_p:], dv[:, :, p.n_p:]
    if p.mode == "scale":  # the forward used (omega * m) * k
        dk_img = dk_img * (p.omega * mask_rows(rows, p.n_img, q.device, acc))[:, None, :, None]
    if p.n_txt:
        zeros = dk_img.new_zeros(dk_img.shape[0], dk_img.shape[1], p.n_txt, dk_img.shape[3])
        dk_img = torch.cat([zeros, dk_img], dim=2)
        dv_img = torch.cat([zeros, dv_img], dim=2)
    return (dq.to(q.dtype), dk[:, :, :p.n_p].to(k_p.dtype), dk_img.to(k_f.dtype), dv[:, :, :p.n_p].to(v_p.dtype),
            dv_img.to(v_f.dtype))
