"""The eager FASA oracle: materialized scores, one softmax, exactly SPEC.md read line by line.

It is the ground truth for tests (run it in float64) and the "authors' code" baseline in benchmarks
(run it in the input dtype). It shares no code with the kernel or the torch backend on purpose.
"""
from __future__ import annotations

import torch

from .validation import check_fasa_inputs, mask_as_rows


def fasa_reference(q, k_p, k_f, v_p, v_f, mask=None, omega=1.0, *, scale=None, mode="bias", n_txt=0,
                   return_lse=False):
    """Eager FASA in the inputs' dtype (any floating dtype, float64 included). Same semantics as
    :func:`freecure_ops.fasa_attention`; the softmax runs in at least float32."""
    p = check_fasa_inputs(q, k_p, k_f, v_p, v_f, mask, omega, scale=scale, mode=mode, n_txt=n_txt,
                          allowed_dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
    soft_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    s_p = torch.einsum("bhqd,bhkd->bhqk", q, k_p) * p.scale
    s_f = torch.einsum("bhqd,bhkd->bhqk", q, k_f) * p.scale
    s_p, s_f = s_p.to(soft_dtype), s_f.to(soft_dtype)

    m = mask_as_rows(mask, p.batch, p.n_img, q.device, soft_dtype)            # [1|B, Nimg]
    m = torch.cat([m.new_zeros(m.shape[0], p.n_txt), m], dim=1)[:, None, None, :]  # [1|B, 1, 1, Nf]
    neg_inf = torch.tensor(float("-inf"), dtype=soft_dtype, device=q.device)
    if mode == "bias":
        s_f = torch.where(m > 0, s_f + p.omega * m, neg_inf)
    else:
        s_f = p.omega * m * s_f
    if p.n_txt > 0:
        # FD text keys are never attended; PD text query rows see PD keys only.
        key_is_txt = torch.arange(p.n_f, device=q.device) < p.n_txt
        row_is_txt = torch.arange(p.n_q, device=q.device) < p.n_txt
        s_f = s_f.masked_fill(key_is_txt[None, None, None, :] | row_is_txt[None, None, :, None], float("-inf"))

    logits = torch.cat([s_p, s_f], dim=-1)
    lse = torch.logsumexp(logits, dim=-1)
    weights = torch.softmax(logits, dim=-1).to(q.dtype)
    out = torch.einsum("bhqk,bhkd->bhqd", weights, torch.cat([v_p, v_f], dim=2))
    if return_lse:
        return out, lse  # float32, or float64 for float64 inputs
    return out
