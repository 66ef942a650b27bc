"""The "bias"-mode keys of the PyTorch backend: the live FD keys gathered, their bias folded into the head dim.

``softmax_j(scale * q.k_j + omega * m_j)`` over the PD keys and the live FD keys is plain attention (SDPA
scale 1, no ``attn_mask``) of ``q' = [scale * q, 1, 0...]`` against ``k'_j = [k_j, b_j, 0...]`` with
``b_j = 0`` on PD keys and ``omega * m_j`` on FD keys, V zero-padded alike, all to a width of ``D + 1``,
rounded up to a multiple of 8 off the CPU (what SDPA's CUDA flash and cuDNN kernels need). The CPU flash
kernel takes any width, and there the round-up would only add work (width 48 instead of 41 at D = 40 is 17%
more per key; 72 instead of 65 at D = 64, 11%).
With no mask, SDPA may take its flash kernel (CPU; on CUDA flash or
cuDNN in fp16/bf16, which this float32 path does not feed). Scaling q instead of dividing ``omega * m`` by
``scale`` keeps the column within float32 whatever the scale.

Only live keys are read: the prepared mask's packed list (``fd_index``, ``fd_value``, ``fd_count``) is gathered
up to the largest live count of its rows. A row with fewer live keys gets padding slots: K and V zero and
the column ``PAD_LOGIT`` = -1e30. Its weight is ``exp(-1e30 - M)`` with ``M`` the running maximum of the row,
at least its largest PD logit: float32 ``exp`` is exactly 0 below -104, so the weight is exactly 0 whenever
some PD logit of the row exceeds -1e30 + 104 (any input whose logits are not themselves near float32
overflow). A finite value, unlike -inf, gives no ``-inf - (-inf)`` in a kernel that meets a key block of
padding alone first: that block's terms are rescaled by ``exp(-1e30 - M) = 0`` when a real key arrives.
Padding slots point at the row's first live key (never an excluded key, whose K/V may hold NaN) and are
overwritten with zeros by ``torch.where``; a row with no live key at all, while another row has some, is
the one case that reads an excluded key, and ``where`` drops it (its NaN cannot propagate through ``where``).

How many slots to gather is data: on the CPU it is read from ``fd_count`` for free (host memory, no
device to wait for). On another device that read would be a device sync per call, so there all ``Nimg``
slots are gathered (the excluded ones as padding): right, never faster than the dense bias. The CUDA fast
path is the Triton kernel; this backend is for CPUs.
"""
from __future__ import annotations

import torch

PAD_LOGIT = -1e30  # the folded column of a padding slot (see the module docstring)
ALIGN = 8          # head-dim multiple that SDPA's flash and cuDNN backends need on CUDA


def folded_width(head_dim: int, device: torch.device | str = "cuda") -> int:
    """``D + 1`` (the bias column), rounded up to a multiple of ``ALIGN`` except on the CPU (module docstring)."""
    align = 1 if torch.device(device).type == "cpu" else ALIGN
    return -(-(head_dim + 1) // align) * align


def live_slots(fd_count: torch.Tensor, n_img: int) -> tuple[int, bool]:
    """``(L, padded)``: how many slots of the packed list to gather (the largest live count of the rows) and
    whether some row has fewer live keys than that. Read on the host only for a CPU mask (module docstring)."""
    if fd_count.device.type != "cpu":
        return n_img, True
    counts = fd_count.numpy()  # host memory: no op, no sync
    top = int(counts.max())
    return top, bool(int(counts.min()) < top)


def _gather(t_img: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t_img[b, :, index[b or 0]]``: ``[B, H, L, D]`` from ``t_img`` ``[B, H, Nimg, D]`` and ``index`` ``[R, L]``."""
    if index.shape[0] == 1:
        return t_img.index_select(2, index[0])  # int32 indices are fine here
    b, h, _, d = t_img.shape
    return t_img.gather(2, index.long()[:, None, :, None].expand(b, h, index.shape[1], d))


def folded_qkv(q, k_p, v_p, k_img, v_img, packed, omega: float, scale: float, dtype: torch.dtype):
    """``(q', k', v')`` in ``dtype`` for SDPA with ``scale=1`` and no mask: keys ``[PD; live FD]``, width
    :func:`folded_width` on q's device. ``packed``: ``(fd_index, fd_value, fd_count)`` of the mask (rows ``[1|B, Nimg]``), or
    None for the all-ones mask (every FD image key live, bias ``omega``). The first ``Np`` keys are PD keys."""
    b, h, n_q, d = q.shape
    n_p = k_p.shape[2]
    width = folded_width(d, q.device)
    if packed is None:
        k_live, v_live = k_img, v_img
        column = torch.full((1, 1, k_img.shape[2]), omega, dtype=dtype, device=q.device)
    else:
        k_live, v_live, column = _live_keys(k_img, v_img, packed, omega, dtype)
    n_k = n_p + k_live.shape[2]
    # q' as [B, Nq, H, W] memory: SDPA's output follows q's layout, and the op returns [B, Nq, H, D] memory
    qf = _widened(q, n_q, width, dtype, queries=True)
    qf[..., :d] = q
    qf[..., :d] *= scale  # in dtype: q * scale in fp16/bf16 would round the product
    qf[..., d] = 1.0
    kf = _widened(q, n_k, width, dtype)
    kf[:, :, :n_p, :d] = k_p
    kf[:, :, n_p:, :d] = k_live
    kf[:, :, :n_p, d] = 0.0
    kf[:, :, n_p:, d] = column
    vf = _widened(q, n_k, width, dtype, zero_from=d)
    vf[:, :, :n_p, :d] = v_p
    vf[:, :, n_p:, :d] = v_live
    return qf, kf, vf


def gathered_kv(k_p, v_p, k_img, v_img, packed, omega: float, dtype):
    """``(k, v, bias)`` in ``dtype``: keys/values ``[PD; live FD]`` and the per-key bias ``[R, Np + L]`` (0 on PD
    keys, ``omega * m`` on live FD keys, ``PAD_LOGIT`` on padding slots) for SDPA with an additive mask, the
    CPU's form of the same attention (the backend's module docstring says why)."""
    if packed is None:
        k_live, v_live = k_img, v_img
        column = torch.full((1, 1, k_img.shape[2]), omega, dtype=dtype, device=k_img.device)
    else:
        k_live, v_live, column = _live_keys(k_img, v_img, packed, omega, dtype)
    k = torch.cat([k_p.to(dtype), k_live.to(dtype)], dim=2)
    v = torch.cat([v_p.to(dtype), v_live.to(dtype)], dim=2)
    column = column[:, 0, :]
    bias = torch.cat([column.new_zeros(column.shape[0], k_p.shape[2]), column], dim=1)
    return k, v, bias


def prepared_kv(k_p, v_p, k_f, v_f, mask, n_txt: int, omega: float, dtype):
    """:func:`gathered_kv` for a prepared mask (a :class:`~freecure_ops.FasaMask`), with what depends on the
    mask alone (the gather index, the bias) built once and kept on the mask: per call, only the gather of
    K/V and their concatenation with the PD keys. Gathers from ``k_f``/``v_f`` themselves (the index is
    offset by ``n_txt``); with every FD image key live (a full mask) nothing is gathered at all."""
    n_p = k_p.shape[2]
    bias = mask.cached(("bias", n_p, omega, dtype), lambda: _prepared_bias(mask, n_p, omega, dtype))
    return _pd_and_live(k_p, k_f, mask, n_txt, dtype), _pd_and_live(v_p, v_f, mask, n_txt, dtype), bias


def _pd_and_live(t_p, t_f, mask, n_txt: int, dtype) -> torch.Tensor:
    """``[PD; live FD]`` of K or V in ``dtype``. A full mask over FD tokens that follow the PD tokens in memory
    needs no copy (:func:`joint_view`). In ``[B, N, H, D]`` memory (diffusers' layout) the gather and the
    concatenation run on whole token rows there: 2-4x faster than along dim 2 of the ``[B, H, N, D]`` view."""
    index, keep = mask.cached(("gather", n_txt), lambda: _prepared_index(mask, n_txt))
    if index is None and n_txt == 0:
        joint = joint_view(t_p, t_f)
        if joint is not None:
            return as_dtype(joint, dtype)
    if (index is None or index.dim() == 1) and t_p.stride(1) < t_p.stride(2) and t_f.stride(1) < t_f.stride(2):
        fd = t_f.transpose(1, 2)
        fd = fd[:, n_txt:] if index is None else fd.index_select(1, index)
        return torch.cat([as_dtype(t_p.transpose(1, 2), dtype), as_dtype(fd, dtype)], dim=1).transpose(1, 2)
    return torch.cat([as_dtype(t_p, dtype), as_dtype(_take(t_f, index, keep, n_txt), dtype)], dim=2)


def joint_view(t_p: torch.Tensor, t_f: torch.Tensor) -> torch.Tensor | None:
    """``[1, H, Np + Nf, D]``: PD then FD tokens as one view, without a copy, where ``t_f``'s tokens follow
    ``t_p``'s in one storage with the same strides (B = 1 rows of one ``[.., N, H, D]`` batch, as the adapters
    pass them: ``k[pd]``, ``k[fd]``); else None. Every element of the view is the element of ``t_p`` or
    ``t_f`` at the same address."""
    if t_p.shape[0] != 1 or t_p.stride()[1:] != t_f.stride()[1:]:
        return None
    n_p = t_p.shape[2]
    if t_f.data_ptr() != t_p.data_ptr() + n_p * t_p.stride(2) * t_p.element_size():
        return None
    if t_f.untyped_storage().data_ptr() != t_p.untyped_storage().data_ptr():  # two allocations side by side
        return None
    _, h, _, d = t_p.shape
    return t_p.as_strided((1, h, n_p + t_f.shape[2], d), t_p.stride())


def _prepared_index(mask, n_txt: int):
    """``(index, keep)``: the long index into the FD keys (``n_txt`` included) of the slots to gather, ``[L]``
    for a shared mask or ``[B, 1, L, 1]`` for per-row masks, None when the slots are every FD image key in
    order; ``keep`` ``[B, 1, L, 1]``: False on padding slots (None: no padding). Padding as in :func:`_live_keys`."""
    _, fd_index, _, fd_count = mask._parts  # the mask's own tensors (its public parts are copies)
    n_slots, padded = live_slots(fd_count, mask.n_img)
    index, keep = fd_index[:, :n_slots], None
    if padded:
        slots = torch.arange(n_slots, device=index.device, dtype=fd_count.dtype)
        valid = slots[None, :] < fd_count[:, None]
        index = torch.where(valid, index, index[:, :1])  # the row's first listed key: a live one if it has any
        keep = valid[:, None, :, None]
    elif n_slots == mask.n_img:  # every row lists every key, ascending: the identity
        return None, None
    index = index.long() + n_txt
    return (index[0], keep) if index.shape[0] == 1 else (index[:, None, :, None], keep)


def _prepared_bias(mask, n_p: int, omega: float, dtype) -> torch.Tensor:
    """The additive SDPA mask ``[R, 1, 1, Np + L]`` of :func:`gathered_kv`: 0 on PD keys, ``omega * m`` on live
    FD keys, ``PAD_LOGIT`` on padding slots."""
    _, _, fd_value, fd_count = mask._parts
    n_slots, padded = live_slots(fd_count, mask.n_img)
    column = omega * fd_value[:, :n_slots].to(dtype)
    if padded:
        slots = torch.arange(n_slots, device=column.device, dtype=fd_count.dtype)
        column = torch.where(slots[None, :] < fd_count[:, None], column, torch.full_like(column, PAD_LOGIT))
    bias = torch.cat([column.new_zeros(column.shape[0], n_p), column], dim=1)
    return bias[:, None, None, :]


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, skipping the dispatch when it would return ``t`` itself (a microsecond a call)."""
    return t if t.dtype == dtype else t.to(dtype)


def _take(t: torch.Tensor, index, keep, n_txt: int) -> torch.Tensor:
    """The FD slots of ``t`` ``[B, H, Nf, D]`` that :func:`_prepared_index` lists, padding zeroed."""
    if index is None:
        return t[:, :, n_txt:]
    if index.dim() == 1:
        out = t.index_select(2, index)
    else:
        b, h, _, d = t.shape
        out = t.gather(2, index.expand(b, h, index.shape[2], d))
    return out if keep is None else torch.where(keep, out, t.new_zeros(()))


def _live_keys(k_img, v_img, packed, omega: float, dtype):
    """``(k_live, v_live, column [R, 1, L])``: the gathered live keys/values and their folded bias; padding
    slots (rows with fewer live keys than the longest) zeroed, with the column ``PAD_LOGIT``."""
    fd_index, fd_value, fd_count = packed
    n_slots, padded = live_slots(fd_count, k_img.shape[2])
    index = fd_index[:, :n_slots]
    value = omega * fd_value[:, :n_slots].to(dtype)
    if not padded:  # every row has exactly n_slots live keys (always so for a shared mask)
        return _gather(k_img, index), _gather(v_img, index), value[:, None, :]
    slots = torch.arange(n_slots, device=fd_count.device, dtype=fd_count.dtype)
    valid = slots[None, :] < fd_count[:, None]                       # [R, L]
    index = torch.where(valid, index, index[:, :1])  # the row's first listed key: a live one if it has any
    keep = valid[:, None, :, None]
    k_live = torch.where(keep, _gather(k_img, index), k_img.new_zeros(()))
    v_live = torch.where(keep, _gather(v_img, index), v_img.new_zeros(()))
    return k_live, v_live, torch.where(valid, value, torch.full_like(value, PAD_LOGIT))[:, None, :]


def _widened(q, n: int, width: int, dtype, zero_from: int | None = None, queries: bool = False) -> torch.Tensor:
    """An uninitialized ``[B, H, n, width]`` buffer (``queries``: laid out as ``[B, n, H, width]`` memory) whose
    columns from ``zero_from`` (default: past the bias column) are zero: the caller writes the rest (every
    buffer here is written once, never cleared first)."""
    b, h, _, d = q.shape
    if queries:
        out = torch.empty((b, n, h, width), dtype=dtype, device=q.device).transpose(1, 2)
    else:
        out = torch.empty((b, h, n, width), dtype=dtype, device=q.device)
    start = d + 1 if zero_from is None else zero_from
    if start < width:
        out[..., start:].zero_()
    return out
