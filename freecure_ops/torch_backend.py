"""FASA with stock PyTorch, for CPUs and machines without Triton: one SDPA call per query block kind.

"bias" mode (:mod:`.torch_fold`): the live FD keys are gathered from the prepared mask's packed list next to
the PD keys, so SDPA runs over ``Np + nnz`` keys instead of ``Np + Nimg``. On the CPU the bias ``omega * m``
goes in as an additive ``[1|B, 1, 1, Nk]`` mask: the CPU flash kernel takes one at no measurable cost, and
there the folded form below was slower (it copies q and widens every row; bench/results/cpu). On other devices
``omega * m`` is folded into one extra head-dim column so that SDPA runs unmasked (CUDA's flash and cuDNN
kernels take no mask). Excluded FD keys and FD text keys are never gathered, so NaN/inf stored there cannot
reach the output. "scale" mode (no exclusion) attends over ``[PD; FD image]`` with ``omega * m`` folded into
the FD keys, unmasked. Under a torch.func transform
(vmap) "bias" mode keeps the dense path: SDPA over ``[PD; FD image]`` with a per-key additive bias
``[1|B, 1, 1, Nk]`` (-inf on excluded keys, whose K/V are zeroed), the path the backward also differentiates.
Nothing of size [B, H, Nq, Nk] is built, except by SDPA's own math fallback and by the chunked LSE path
(``return_lse=True``), which materializes one query chunk at a time.

Per-call cost: with a prepared mask in an eager call (``fasa_run`` gets the ``FasaMask`` itself), the gather
index and the bias come from the mask's cache (:func:`.torch_fold.prepared_kv`), and the common call ("bias",
no text tokens, no LSE, CPU, no autocast, no transform) is :func:`fasa_prepared`: the gather, one SDPA call.

Precision: the attention runs in float32 whatever the input dtype (float64 inputs, accepted here for
``torch.autograd.gradcheck``, run in float64), and the output is cast back to q's dtype once. In fp16/bf16 the
folded column ``omega * m`` (or an additive mask) would be rounded (bf16 keeps 8 bits: an error of up to 0.04
in a logit of 10) or overflow (fp16 past 65504); folding the "scale" mode factor into fp16/bf16 keys rounds
it the same way. The float32 copies cost memory of the same order as the gathered K/V themselves, and they
keep this path within the accuracy rule the Triton kernel meets
(``max|out - ref64| <= 2 * max|same_dtype_eager - ref64| + floor``).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch._C._functorch import peek_interpreter_stack

from .fasa_mask import pack_live_keys
from .torch_fold import as_dtype, folded_qkv, gathered_kv, prepared_kv
from .validation import FasaProblem

_LSE_CHUNK = 1024  # query rows per chunk when the LSE is asked for
_ACC = torch.float32


def no_autocast(device: torch.device):
    """A context with autocast off on ``device`` (where autocast exists: CPU and CUDA; meta has none)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def autocast_on(device: torch.device) -> bool:
    """Whether autocast is on for ``device`` (a per-call check far cheaper than entering :func:`no_autocast`)."""
    if device.type not in ("cpu", "cuda"):
        return False
    try:
        return torch.is_autocast_enabled(device.type)
    except TypeError:  # a torch without the per-device query: take no_autocast every time, as safe
        return True


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for inputs of ``dtype``: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else _ACC


def mask_rows(mask, p: FasaProblem, device, dtype=_ACC) -> torch.Tensor:
    """The FD image-token mask as rows ``[1 | B, Nimg]`` of ``dtype`` (None: all ones, shared).

    The one place that knows the user's mask format (``[Nimg]`` / ``[B, Nimg]``, bool or float): a caller
    that already holds float32 rows ``[1|B, Nimg]`` can pass them straight through."""
    if mask is None:
        return torch.ones(1, p.n_img, device=device, dtype=dtype)
    rows = mask.to(device=device, dtype=dtype)
    return rows.unsqueeze(0) if rows.dim() == 1 else rows


def _fd_keys_values_bias(k_f, v_f, rows, p: FasaProblem):
    """FD image keys/values in the rows' dtype and their per-key logit bias ``[1|B, Nimg]``.

    "bias": ``omega * m`` where ``m > 0``, ``-inf`` where ``m == 0``; the excluded keys and values are zeroed.
    "scale": the per-key factor ``omega * m`` is folded into the (float32) keys; no bias, no exclusion."""
    k_img = k_f[:, :, p.n_txt:].to(rows.dtype)
    v_img = v_f[:, :, p.n_txt:].to(rows.dtype)
    if p.mode == "scale":
        # omega * m_j * (q . k_j) == q . (omega * m_j * k_j), exact up to float32 rounding
        factor = (p.omega * rows)[:, None, :, None]
        return k_img * factor, v_img, torch.zeros_like(rows)
    live = (rows > 0)[:, None, :, None]
    zero = k_img.new_zeros(())
    k_img = torch.where(live, k_img, zero)   # NaN/inf in excluded keys never meet a query
    v_img = torch.where(live, v_img, zero)   # and never meet a zero weight (0 * NaN = NaN)
    bias = torch.where(rows > 0, p.omega * rows, torch.full_like(rows, float("-inf")))
    return k_img, v_img, bias


def _key_mask(bias):
    """A per-key bias ``[1|B, Nk]`` as SDPA's ``[1|B, 1, 1, Nk]`` mask (a cached one already has that shape)."""
    return bias if bias is None or bias.dim() == 4 else bias[:, None, None, :]


def _attend(q, k, v, bias, scale, return_lse):
    """softmax(scale * q k^T + bias) v in q's dtype with bias [1|B, Nk] (or [1|B, 1, 1, Nk]) or None;
    optionally also the LSE (natural log)."""
    mask = _key_mask(bias)
    if not return_lse:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    outs, lses = [], []
    for start in range(0, max(q.shape[2], 1), _LSE_CHUNK):  # one (empty) chunk for zero rows (n_txt == Nq)
        s = torch.einsum("bhqd,bhkd->bhqk", q[:, :, start:start + _LSE_CHUNK], k) * scale
        if mask is not None:
            s = s + mask
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.einsum("bhqk,bhkd->bhqd", torch.exp(s - lse[..., None]), v))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def joint_keys(q, k_p, k_f, v_p, v_f, mask, p: FasaProblem):
    """``(q, k, v, bias)`` in the accumulation dtype: K/V ``[PD; FD image]`` (excluded FD keys zeroed in "bias"
    mode, scale folded into the keys in "scale" mode) and the per-key bias ``[1|B, Np + Nimg]``. What the
    forward attends over and the backward differentiates."""
    acc = acc_dtype(q.dtype)
    rows = mask_rows(mask, p, q.device, acc)
    k_img, v_img, fd_bias = _fd_keys_values_bias(k_f, v_f, rows, p)
    k = torch.cat([k_p.to(acc), k_img], dim=2)
    v = torch.cat([v_p.to(acc), v_img], dim=2)
    bias = torch.cat([fd_bias.new_zeros(fd_bias.shape[0], p.n_p), fd_bias], dim=1)
    return q.to(acc), k, v, bias


def fasa_torch(q, k_p, k_f, v_p, v_f, mask, p: FasaProblem, return_lse: bool = False, packed=None, prepared=None):
    """FASA (SPEC.md) on validated inputs; output in q's dtype, LSE in float32 (float64 for float64 inputs).
    ``mask``: the mask rows (or None); ``packed``: its ``(fd_index, fd_value, fd_count)`` when the caller has
    them (a prepared mask), else they are derived here; ``prepared``: the :class:`~freecure_ops.FasaMask`
    itself when the caller has it (eager calls), whose cache then holds the gather index and the bias.
    Autocast is off inside: it would run SDPA in fp16/bf16 and round ``omega * m`` (module docstring)."""
    if autocast_on(q.device):
        with no_autocast(q.device):
            return _fasa_torch(q, k_p, k_f, v_p, v_f, mask, p, return_lse, packed, prepared)
    return _fasa_torch(q, k_p, k_f, v_p, v_f, mask, p, return_lse, packed, prepared)


def _fasa_torch(q, k_p, k_f, v_p, v_f, mask, p: FasaProblem, return_lse: bool, packed, prepared):
    if p.mode == "bias" and peek_interpreter_stack() is None:
        return _fasa_folded(q, k_p, k_f, v_p, v_f, mask, p, return_lse, packed, prepared)
    return _fasa_dense(q, k_p, k_f, v_p, v_f, mask, p, return_lse)


def takes_prepared(device: torch.device) -> bool:
    """Whether :func:`fasa_prepared` may run a "bias"-mode call on ``device``: the additive-mask form (the
    CPU), autocast off, no torch.func transform (vmap takes the dense path)."""
    return not folds_bias(device) and peek_interpreter_stack() is None and not autocast_on(device)


def fasa_prepared(q, k_p, k_f, v_p, v_f, mask, scale: float, omega: float):
    """:func:`fasa_torch` for the common eager call, in one step: "bias" mode, a prepared mask (its cache holds
    the gather index and the bias), no text tokens, no LSE, where :func:`takes_prepared`. Output in q's dtype."""
    acc = acc_dtype(q.dtype)
    k, v, bias = prepared_kv(k_p, v_p, k_f, v_f, mask, 0, omega, acc)
    out = F.scaled_dot_product_attention(as_dtype(q, acc), k, v, attn_mask=bias, scale=scale)
    return as_dtype(out, q.dtype)


def folds_bias(device: torch.device) -> bool:
    """Whether "bias" mode folds ``omega * m`` into the head dim (unmasked SDPA) rather than passing it as an
    additive mask: everywhere but the CPU (module docstring)."""
    return device.type != "cpu"


def _fasa_folded(q, k_p, k_f, v_p, v_f, rows, p: FasaProblem, return_lse: bool, packed, prepared=None):
    """"bias" mode over the PD keys and the gathered live FD image keys (:mod:`.torch_fold`): the bias as a
    mask on the CPU, folded into the head dim elsewhere."""
    acc = acc_dtype(q.dtype)
    fold = folds_bias(q.device)
    if prepared is not None and not fold:  # the index and bias come from the mask's cache
        k, v, bias = prepared_kv(k_p, v_p, k_f, v_f, prepared, p.n_txt, p.omega, acc)
        return _finish(_text_and_image(as_dtype(q, acc), k, v, bias, p.scale, p, return_lse), q.dtype, return_lse)
    if rows is not None and packed is None:
        packed = pack_live_keys(rows)
    k_img, v_img = k_f[:, :, p.n_txt:], v_f[:, :, p.n_txt:]
    if not fold:
        k, v, bias = gathered_kv(k_p, v_p, k_img, v_img, packed, p.omega, acc)
        res = _text_and_image(q.to(acc), k, v, bias, p.scale, p, return_lse)
        if return_lse:
            return res[0].to(q.dtype), res[1]
        return res.to(q.dtype)
    qf, kf, vf = folded_qkv(q, k_p, v_p, k_img, v_img, packed, p.omega, p.scale, acc)
    res = _text_and_image(qf, kf, vf, None, 1.0, p, return_lse)
    d = q.shape[-1]
    if return_lse:
        return res[0][..., :d].to(q.dtype), res[1]
    return res[..., :d].to(q.dtype)


def _finish(res, dtype: torch.dtype, return_lse: bool):
    """The attention's output in ``dtype`` (and its LSE, as computed)."""
    if return_lse:
        return as_dtype(res[0], dtype), res[1]
    return as_dtype(res, dtype)


def _fasa_dense(q, k_p, k_f, v_p, v_f, mask, p: FasaProblem, return_lse: bool):
    q32, k, v, bias = joint_keys(q, k_p, k_f, v_p, v_f, mask, p)
    res = _text_and_image(q32, k, v, None if p.mode == "scale" else bias, p.scale, p, return_lse)
    if return_lse:
        return res[0].to(q.dtype), res[1]
    return res.to(q.dtype)


def _text_and_image(q, k, v, bias, scale, p: FasaProblem, return_lse: bool):
    """Attention over ``[PD keys; FD keys]`` (``bias`` per key or None); in the FLUX joint sequence the text
    query rows see the first ``Np`` keys (PD) only."""
    if p.n_txt == 0:
        return _attend(q, k, v, bias, scale, return_lse)
    pd_bias = None if bias is None else bias[..., :p.n_p]
    txt = _attend(q[:, :, :p.n_txt], k[:, :, :p.n_p], v[:, :, :p.n_p], pd_bias, scale, return_lse)
    img = _attend(q[:, :, p.n_txt:], k, v, bias, scale, return_lse)
    if return_lse:
        return torch.cat([txt[0], img[0]], dim=2), torch.cat([txt[1], img[1]], dim=2)
    return torch.cat([txt, img], dim=2)
