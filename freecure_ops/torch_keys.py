"""The keys of the PyTorch backend: what :mod:`.torch_attend` attends over, in three forms (which runs where is
:mod:`.op`'s table). Every form reads a mask as a :class:`~freecure_ops.FasaMask` (a prepared one, or one built
for this call from the tensors that crossed the registered op) and nothing above this module.

Gathered ("bias" mode, the CPU): the live FD image keys are gathered from the mask's packed list next to the PD
keys, so SDPA runs over ``Np + L`` keys instead of ``Np + Nimg``, with ``omega * m`` in an additive
``[R, 1, 1, Np + L]`` mask (0 on PD keys). The gather index and the bias depend on the mask alone: a prepared
mask keeps them (``FasaMask.cached``), so a call that reuses it only gathers. In ``[B, N, H, D]`` memory
(diffusers' layout) the gather runs on whole token rows, 2-4x faster than along dim 2 of the ``[B, H, N, D]``
view, and a full mask over FD tokens that follow the PD tokens in one storage needs no copy (:func:`joint_view`).

Folded ("bias" mode off the CPU): the same keys, with ``omega * m`` folded into one extra head-dim column so that
SDPA runs unmasked (CUDA's flash and cuDNN kernels take no mask): ``softmax_j(scale * q.k_j + omega * m_j)`` is
plain attention (SDPA scale 1) of ``q' = [scale * q, 1, 0...]`` against ``k'_j = [k_j, b_j, 0...]`` with
``b_j = 0`` on PD keys and ``omega * m_j`` on FD keys, V zero-padded alike, all to a width of ``D + 1`` rounded
up to a multiple of 8 (what SDPA's CUDA kernels need; the CPU's takes any width). Scaling q instead of dividing
``omega * m`` by ``scale`` keeps the column within float32 whatever the scale.

Dense ("scale" mode, vmap, the backward): K/V ``[PD; FD image]`` and a per-key bias, ``-inf`` on excluded keys
(whose K/V are zeroed) in "bias" mode; "scale" mode excludes no key and folds ``omega * m`` into the FD keys.

Padding. How many slots to gather is data: on the CPU it is read from ``fd_count`` for free (host memory, no
device to wait for); elsewhere that read would be a device sync per call, so every ``Nimg`` slot is gathered,
the excluded ones as padding. A row with fewer live keys than the longest gets padding slots: K and V zero and
the bias ``PAD_LOGIT`` = -1e30, whose weight ``exp(-1e30 - M)`` (``M`` the row's running maximum, at least its
largest PD logit) is exactly 0 in float32 whenever some PD logit of the row exceeds -1e30 + 104. A finite value,
unlike -inf, gives no ``-inf - (-inf)`` in a kernel that meets a key block of padding alone first. Padding slots
point at the row's first live key and are overwritten with zeros by ``torch.where``; a row with no live key at
all, while another row has some, is the one case that reads an excluded key, and ``where`` drops it (its NaN
cannot propagate through ``where``). Excluded keys and FD text keys are never gathered otherwise, so NaN/inf
stored there cannot reach the output.
"""
from __future__ import annotations

import torch

from .fasa_mask import FasaMask, MaskParts
from .torch_attend import acc_dtype, as_dtype

PAD_LOGIT = -1e30  # the bias of a padding slot (see the module docstring)
ALIGN = 8          # head-dim multiple that SDPA's flash and cuDNN backends need on CUDA


# ------------------------------------------------------------------------------ which FD keys to gather

def live_slots(fd_count: torch.Tensor, n_img: int) -> tuple[int, bool]:
    """``(L, padded)``: how many slots of the packed list to gather (the largest live count of the rows) and
    whether some row has fewer live keys than that. Read on the host only for a CPU mask (module docstring)."""
    if fd_count.device.type != "cpu":
        return n_img, True
    counts = fd_count.numpy()  # host memory: no op, no sync
    top = int(counts.max())
    return top, bool(int(counts.min()) < top)


def _slot_valid(fd_count: torch.Tensor, n_slots: int) -> torch.Tensor:
    """``[R, L]``: True on the slots that hold a live key, False on padding."""
    slots = torch.arange(n_slots, device=fd_count.device, dtype=fd_count.dtype)
    return slots[None, :] < fd_count[:, None]


def live_index(parts: MaskParts, n_txt: int):
    """``(index, keep)``: the long index into the FD keys (``n_txt`` included) of the slots to gather, ``[L]``
    for a shared mask or ``[B, 1, L, 1]`` for per-row masks, None when the slots are every FD image key in
    order; ``keep`` ``[B, 1, L, 1]``: False on padding slots (None: no padding)."""
    _, fd_index, _, fd_count = parts
    n_slots, padded = live_slots(fd_count, fd_index.shape[1])
    index, keep = fd_index[:, :n_slots], None
    if padded:
        valid = _slot_valid(fd_count, n_slots)
        index = torch.where(valid, index, index[:, :1])  # the row's first listed key: a live one if it has any
        keep = valid[:, None, :, None]
    elif n_slots == fd_index.shape[1]:  # every row lists every key, ascending: the identity
        return None, None
    index = index.long() + n_txt
    return (index[0], keep) if index.shape[0] == 1 else (index[:, None, :, None], keep)


def live_column(parts: MaskParts | None, n_img: int, omega: float, dtype, device) -> torch.Tensor:
    """``[R, L]``: the bias of the gathered slots, ``omega * m`` on live keys, ``PAD_LOGIT`` on padding (no mask:
    ``omega`` on every FD image key)."""
    if parts is None:
        return torch.full((1, n_img), omega, dtype=dtype, device=device)
    _, fd_index, fd_value, fd_count = parts
    n_slots, padded = live_slots(fd_count, fd_index.shape[1])
    column = omega * fd_value[:, :n_slots].to(dtype)
    if padded:
        column = torch.where(_slot_valid(fd_count, n_slots), column, torch.full_like(column, PAD_LOGIT))
    return column


def take(t: torch.Tensor, index, keep, n_txt: int) -> torch.Tensor:
    """The FD slots of ``t`` ``[B, H, Nf, D]`` that :func:`live_index` lists, padding zeroed."""
    if index is None:
        return t[:, :, n_txt:]
    if index.dim() == 1:
        out = t.index_select(2, index)
    else:
        b, h, _, d = t.shape
        out = t.gather(2, index.expand(b, h, index.shape[2], d))
    return out if keep is None else torch.where(keep, out, t.new_zeros(()))


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


def pd_and_live(t_p, t_f, index, keep, n_txt: int, dtype) -> torch.Tensor:
    """``[PD; gathered FD]`` of K or V in ``dtype``: a view where :func:`joint_view` finds one (every FD key, no
    text), whole token rows in ``[B, N, H, D]`` memory, else along dim 2."""
    if index is None and n_txt == 0:
        joint = joint_view(t_p, t_f)
        if joint is not None:
            return as_dtype(joint, dtype)
    if (index is None or index.dim() == 1) and t_p.stride(1) < t_p.stride(2) and t_f.stride(1) < t_f.stride(2):
        fd = t_f.transpose(1, 2)
        fd = fd[:, n_txt:] if index is None else fd.index_select(1, index)
        return torch.cat([as_dtype(t_p.transpose(1, 2), dtype), as_dtype(fd, dtype)], dim=1).transpose(1, 2)
    return torch.cat([as_dtype(t_p, dtype), as_dtype(take(t_f, index, keep, n_txt), dtype)], dim=2)


# ------------------------------------------------------------------------------ the three forms

def gathered_kv(k_p, v_p, k_f, v_f, mask: FasaMask | None, n_txt: int, omega: float, dtype):
    """``(k, v, bias)`` in ``dtype``: K/V ``[PD; live FD]`` and the additive SDPA mask ``[R, 1, 1, Np + L]`` (0 on
    PD keys, ``omega * m`` on live FD keys, ``PAD_LOGIT`` on padding slots). ``mask`` holds its packed list
    (:func:`~freecure_ops.fasa_mask.with_live_keys`); what depends on it alone (the index, the bias) is built
    once per mask and kept on it."""
    n_p, n_img = k_p.shape[2], k_f.shape[2] - n_txt
    parts = None if mask is None else mask._parts

    def bias():
        column = live_column(parts, n_img, omega, dtype, k_p.device)
        return torch.cat([column.new_zeros(column.shape[0], n_p), column], dim=1)[:, None, None, :]

    if mask is None:  # every FD image key, in order: nothing to gather
        index, keep, bias = None, None, bias()
    else:
        index, keep = mask.cached(("gather", n_txt), lambda: live_index(parts, n_txt))
        bias = mask.cached(("bias", n_p, omega, dtype), bias)
    return pd_and_live(k_p, k_f, index, keep, n_txt, dtype), pd_and_live(v_p, v_f, index, keep, n_txt, dtype), bias


def folded_width(head_dim: int, device: torch.device | str = "cuda") -> int:
    """``D + 1`` (the bias column), rounded up to a multiple of ``ALIGN`` except on the CPU (module docstring)."""
    align = 1 if torch.device(device).type == "cpu" else ALIGN
    return -(-(head_dim + 1) // align) * align


def folded_qkv(q, k_p, v_p, k_f, v_f, mask: FasaMask | None, n_txt: int, omega: float, scale: float, dtype):
    """``(q', k', v')`` in ``dtype`` for SDPA with ``scale=1`` and no mask: keys ``[PD; live FD]`` (the first ``Np``
    are the PD keys), width :func:`folded_width` on q's device. ``mask`` holds its packed list
    (:func:`~freecure_ops.fasa_mask.with_live_keys`)."""
    _, _, n_q, d = q.shape
    n_p = k_p.shape[2]
    parts = None if mask is None else mask._parts
    index, keep = (None, None) if parts is None else live_index(parts, n_txt)
    column = live_column(parts, k_f.shape[2] - n_txt, omega, dtype, q.device)[:, None, :]
    k_live, v_live = take(k_f, index, keep, n_txt), take(v_f, index, keep, n_txt)
    n_k = n_p + k_live.shape[2]
    width = folded_width(d, q.device)
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


def mask_rows(rows, n_img: int, device, dtype) -> torch.Tensor:
    """The mask rows ``[1|B, Nimg]`` in ``dtype`` (None: all ones, shared)."""
    if rows is None:
        return torch.ones(1, n_img, device=device, dtype=dtype)
    return rows.to(device=device, dtype=dtype)


def dense_kv(q, k_p, k_f, v_p, v_f, rows, mode: str, omega: float, n_txt: int):
    """``(q, k, v, bias)`` in the accumulation dtype: K/V ``[PD; FD image]`` and the per-key bias ``[1|B, Np + Nimg]``.
    "bias": ``omega * m`` where ``m > 0``, ``-inf`` where ``m == 0``, the excluded keys and values zeroed.
    "scale": the per-key factor ``omega * m`` folded into the keys; the bias is zero. ``rows``: the mask rows or
    None. What the dense path attends over and the backward differentiates."""
    acc = acc_dtype(q.dtype)
    n_p = k_p.shape[2]
    rows = mask_rows(rows, k_f.shape[2] - n_txt, q.device, acc)
    k_img, v_img = k_f[:, :, n_txt:].to(acc), v_f[:, :, n_txt:].to(acc)
    if mode == "scale":
        # omega * m_j * (q . k_j) == q . (omega * m_j * k_j), exact up to float32 rounding
        k_img = k_img * (omega * rows)[:, None, :, None]
        fd_bias = torch.zeros_like(rows)
    else:
        live = (rows > 0)[:, None, :, None]
        zero = k_img.new_zeros(())
        k_img = torch.where(live, k_img, zero)   # NaN/inf in excluded keys never meet a query
        v_img = torch.where(live, v_img, zero)   # and never meet a zero weight (0 * NaN = NaN)
        fd_bias = torch.where(rows > 0, omega * rows, torch.full_like(rows, float("-inf")))
    k = torch.cat([k_p.to(acc), k_img], dim=2)
    v = torch.cat([v_p.to(acc), v_img], dim=2)
    bias = torch.cat([fd_bias.new_zeros(fd_bias.shape[0], n_p), fd_bias], dim=1)
    return q.to(acc), k, v, bias
