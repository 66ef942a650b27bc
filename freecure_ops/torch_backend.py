"""FASA with stock PyTorch: SDPA over [PD; FD] keys with a per-key additive bias broadcast as [B, 1, 1, Nk].

For CPUs and machines without Triton. Nothing of size [B, H, Nq, Nk] is built, except by SDPA's own math
fallback and by the chunked LSE path (``return_lse=True``), which materializes one query chunk at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .validation import FasaProblem, mask_as_rows

_LSE_CHUNK = 1024  # query rows per chunk when the LSE is asked for


def _fd_keys_and_bias(k_f, mask_rows, p: FasaProblem):
    """FD image keys and their per-key logit bias ``[1|B, Nimg]`` (or scaled keys in "scale" mode)."""
    k_img = k_f[:, :, p.n_txt:]
    if p.mode == "scale":
        # omega * m_j * (q . k_j) == q . (omega * m_j * k_j): fold the per-key scale into the keys.
        factor = (p.omega * mask_rows).to(k_f.dtype)[:, None, :, None]
        return k_img * factor, torch.zeros_like(mask_rows)
    bias = torch.where(mask_rows > 0, p.omega * mask_rows, torch.full_like(mask_rows, float("-inf")))
    return k_img, bias


def _attend(q, k, v, bias, scale, return_lse):
    """softmax(scale * q k^T + bias) v with bias [1|B, Nk]; optionally also the natural-log LSE (fp32)."""
    if not return_lse:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype)[:, None, None, :], scale=scale)
    outs, lses = [], []
    for start in range(0, q.shape[2], _LSE_CHUNK):
        s = torch.einsum("bhqd,bhkd->bhqk", q[:, :, start:start + _LSE_CHUNK].float(), k.float()) * scale
        s = s + bias[:, None, None, :]
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.einsum("bhqk,bhkd->bhqd", torch.exp(s - lse[..., None]), v.float()).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def fasa_torch(q, k_p, k_f, v_p, v_f, mask, p: FasaProblem, return_lse: bool = False):
    mask_rows = mask_as_rows(mask, p.batch, p.n_img, q.device)
    k_img, fd_bias = _fd_keys_and_bias(k_f, mask_rows, p)
    batch_bias = fd_bias.shape[0]
    k = torch.cat([k_p, k_img], dim=2)
    v = torch.cat([v_p, v_f[:, :, p.n_txt:]], dim=2)
    bias = torch.cat([fd_bias.new_zeros(batch_bias, p.n_p), fd_bias], dim=1)
    if p.n_txt == 0:
        return _attend(q, k, v, bias, p.scale, return_lse)
    # FLUX joint sequence: text query rows see PD keys only; image rows see PD keys and FD image keys.
    txt = _attend(q[:, :, :p.n_txt], k_p, v_p, bias[:, :p.n_p], p.scale, return_lse)
    img = _attend(q[:, :, p.n_txt:], k, v, bias, p.scale, return_lse)
    if return_lse:
        return torch.cat([txt[0], img[0]], dim=2), torch.cat([txt[1], img[1]], dim=2)
    return torch.cat([txt, img], dim=2)
