"""The attention core of the PyTorch backend: the dtype it attends in, autocast kept off, one SDPA call (or the
chunked matmul form when the log-sum-exp is asked for), and FLUX's text/image split. The bottom layer of the
backend: it imports nothing of ours. The keys it attends over come from :mod:`.torch_keys`; which path runs is
:mod:`.op`'s table.

Precision: the attention runs in float32 whatever the input dtype (float64 inputs, accepted for
``torch.autograd.gradcheck``, run in float64), and the output is cast back to q's dtype once. In fp16/bf16 the
bias ``omega * m`` (an additive mask or a folded column) would be rounded (bf16 keeps 8 bits: an error of up to
0.04 in a logit of 10) or overflow (fp16 past 65504); folding the "scale" mode factor into fp16/bf16 keys rounds
it the same way. The float32 copies cost memory of the same order as the gathered K/V themselves, and they keep
the backend within the accuracy rule the Triton kernel meets
(``max|out - ref64| <= 2 * max|same_dtype_eager - ref64| + floor``). Autocast would run SDPA in fp16/bf16 and
round the same bias, so the op runs every path with it off (:func:`no_autocast`, :func:`autocast_on`).

Nothing of size ``[B, H, Nq, Nk]`` is built, except by SDPA's own math fallback and by the LSE form, which
materializes one query chunk at a time.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

LSE_CHUNK = 1024  # query rows per chunk when the LSE is asked for
ACC = torch.float32


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for inputs of ``dtype``: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else ACC


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, skipping the dispatch when it would return ``t`` itself (a microsecond a call)."""
    return t if t.dtype == dtype else t.to(dtype)


def no_autocast(device_type: str):
    """A context with autocast off on ``device_type`` (where autocast exists: CPU and CUDA; meta has none)."""
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (a per-call check far cheaper than entering
    :func:`no_autocast`)."""
    if device_type not in ("cpu", "cuda"):
        return False
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # a torch without the per-device query: take no_autocast every time, as safe
        return True


def attend(q, k, v, bias, scale: float, return_lse: bool):
    """``(softmax(scale * q k^T + bias) v, lse)`` in q's dtype; ``bias`` ``[1|B, 1, 1, Nk]`` or None; ``lse``
    (natural log, ``[B, H, Nq]``) only when ``return_lse``, else None. Without the LSE one SDPA call; with it,
    scores one query chunk at a time."""
    if not return_lse:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale), None
    outs, lses = [], []
    for start in range(0, max(q.shape[2], 1), LSE_CHUNK):  # one (empty) chunk for zero rows (n_txt == Nq)
        s = torch.einsum("bhqd,bhkd->bhqk", q[:, :, start:start + LSE_CHUNK], k) * scale
        if bias is not None:
            s = s + bias
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.einsum("bhqk,bhkd->bhqd", torch.exp(s - lse[..., None]), v))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def text_and_image(q, k, v, bias, scale: float, n_txt: int, n_p: int, return_lse: bool):
    """:func:`attend` over ``[PD keys; FD keys]``; in the FLUX joint sequence (``n_txt > 0``) the text query rows
    see the first ``n_p`` keys (PD) only."""
    if n_txt == 0:
        return attend(q, k, v, bias, scale, return_lse)
    pd_bias = None if bias is None else bias[..., :n_p]
    txt, txt_lse = attend(q[:, :, :n_txt], k[:, :, :n_p], v[:, :, :n_p], pd_bias, scale, return_lse)
    img, img_lse = attend(q[:, :, n_txt:], k, v, bias, scale, return_lse)
    lse = torch.cat([txt_lse, img_lse], dim=2) if return_lse else None
    return torch.cat([txt, img], dim=2), lse
