"""Overwrite the PD rows of a stock self-attention result with FASA. No math of its own beyond the
style-fidelity blend.

The processors first make the stock attention call over the whole batch, exactly as the stock processor
does, so FD rows are bit-identical to the stock model's (attention kernels choose their tiling by batch size,
so a call over the FD rows alone is not bit-identical). Then the PD rows of that result are replaced by
``fasa_attention`` with each PD row's FD partner's keys/values; the discarded plain PD results double as the
plain term of the style-fidelity blend of the unconditional PD rows.
"""
from __future__ import annotations

import torch

from freecure_ops import fasa_attention

from .controller import FasaController


def overwrite_pd_rows(ctl: FasaController, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      mask_hw: tuple[int, int], n_txt: int, layer: str, scale: float | None = None) -> torch.Tensor:
    """``q, k, v``: ``[B, H, N, D]`` views (sliced per row block, never copied); ``out``: the stock attention
    result as a ``[B, H, N, D]`` view, written in place (cloned first when autograd tracks it). ``scale``: the
    softmax scale (None: ``D ** -0.5``). Returns out."""
    plan = ctl.plan(q.shape[0], layer)
    mask = ctl.mask_for(mask_hw[0], mask_hw[1], q.device, plan[0][1], layer)
    if out.requires_grad:
        out = out.clone()
    for start, n, uncond in plan:
        sf = ctl.style_fidelity if uncond else 0.0
        if sf == 1.0:  # unconditional PD rows keep plain self-attention
            continue
        pd, fd = slice(start, start + n), slice(start + n, start + 2 * n)
        res = fasa_attention(q[pd], k[pd], k[fd], v[pd], v[fd], mask, ctl.omega, scale=scale, mode=ctl.mode,
                             n_txt=n_txt, backend=ctl.backend)
        if sf > 0.0:
            res = (1.0 - sf) * res + sf * out[pd]
        out[pd] = res
    return out
