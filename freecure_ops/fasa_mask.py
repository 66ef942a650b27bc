"""The prepared FD-token mask: FASA's analogue of FlexAttention's ``BlockMask``.

A raw mask (``[Nimg]`` or ``[B, Nimg]``, bool or float >= 0) is checked once and turned into what the kernel
reads: the float32 mask rows, and per row the packed list of live FD keys (``m > 0``) with their mask values,
so that the "bias"-mode FD loop visits ``ceil(nnz / BLOCK_N)`` key tiles and never loads an excluded key.
Everything is built on the mask's device without a host sync (the value check of a float mask is the one
sync, paid once here instead of once per attention call).

A ``FasaMask`` owns copies, never views of the user's tensor: editing the raw mask afterwards changes
nothing (prepare it again). Nor does it hand its own tensors out: its public parts are fresh copies, so no
write (an in-place op, ``.data``, a numpy or DLPack alias) reaches what the backends read.
``fasa_attention`` accepts either form; a raw mask is prepared inside every call (no hidden cache), so
reuse a prepared one across layers and steps. At the op boundary a ``FasaMask`` crosses as its four
tensors (``torch.ops.freecure_ops.fasa`` takes tensors and scalars only).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["FasaMask", "prepare_fasa_mask"]

MASK_DTYPES = (torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CACHE_MAX = 16  # derived entries kept per prepared mask (a few per dtype and omega in a real model)


class MaskParts(NamedTuple):
    """A prepared mask's own tensors (internal): what the kernel and the PyTorch backend read, never edited.
    The launcher takes any object with these four attributes (``kernels/fasa_fwd.py``)."""
    rows: torch.Tensor
    fd_index: torch.Tensor
    fd_value: torch.Tensor
    fd_count: torch.Tensor


class FasaMask:
    """An immutable, validated FD-token mask. Build it with :func:`prepare_fasa_mask`.

    ``rows``: float32 ``[R, Nimg]`` (R = 1 shared by the batch, or R = B). ``fd_index``: int32 ``[R, Nimg]``,
    per row the indices of the live keys (``rows > 0``) in ascending order, then padding. ``fd_value``:
    float32 ``[R, Nimg]``, the mask value of each listed key (0 in the padding). ``fd_count``: int32 ``[R]``,
    the number of live keys per row. ``max_value``: the largest mask value (a float read when the mask was
    checked; None when it was not read, e.g. prepared while tracing), which bounds ``omega * m``. ``binary``:
    True when every live value is the same (a bool mask, or a float mask whose check found it so): the
    kernel's FD loop then adds one scalar bias instead of loading each key's value.

    The four tensors are read-only in effect: each read of ``rows``/``fd_index``/``fd_value``/``fd_count``
    returns a fresh copy (torch has no read-only tensors, and writes through ``.data``, numpy or DLPack
    aliases bump no version counter that a cache could check). The backends read the mask's own tensors
    (``_parts``, internal), which nothing outside can reach: no copy per call.

    What the PyTorch backend derives from the mask alone (the gather index, the additive bias per dtype and
    omega) is kept in a small private cache on the mask: the parts never change, so it is never stale, and
    every call that reuses the mask skips rebuilding it (:func:`cached`).
    """

    __slots__ = ("_parts", "max_value", "binary", "_cache")

    def __init__(self, *args, **kwargs):
        # The kernel gathers K/V rows at fd_index: parts that do not agree would read out of bounds.
        raise TypeError("FasaMask is built by prepare_fasa_mask(mask), which checks the mask and derives the "
                        "packed key list from it; it cannot be assembled from parts")

    @classmethod
    def _from_parts(cls, rows: torch.Tensor, fd_index: torch.Tensor, fd_value: torch.Tensor,
                    fd_count: torch.Tensor, max_value: float | None = None, binary: bool = False) -> "FasaMask":
        """The parts as :func:`pack_checked_mask` derives them (internal: nothing is checked here)."""
        self = object.__new__(cls)
        for name, value in (("_parts", MaskParts(rows, fd_index, fd_value, fd_count)), ("max_value", max_value),
                            ("binary", bool(binary)), ("_cache", {})):
            object.__setattr__(self, name, value)
        return self

    # Copies: a write to one must not reach the tensors the backends read (the class docstring).
    @property
    def rows(self) -> torch.Tensor:
        return self._parts.rows.clone()

    @property
    def fd_index(self) -> torch.Tensor:
        return self._parts.fd_index.clone()

    @property
    def fd_value(self) -> torch.Tensor:
        return self._parts.fd_value.clone()

    @property
    def fd_count(self) -> torch.Tensor:
        return self._parts.fd_count.clone()

    def cached(self, key, build):
        """``build()``, computed once per ``key`` for this mask (internal: tensors derived from the parts alone,
        e.g. the PyTorch backend's gather index and bias). Bounded: a caller cycling through many keys (an
        omega schedule) clears it rather than growing it."""
        cache = self._cache
        value = cache.get(key)
        if value is None:
            if len(cache) >= _CACHE_MAX:
                cache.clear()
            value = cache[key] = build()
        return value

    def __setattr__(self, name, value):
        raise AttributeError("FasaMask is immutable: prepare a new one with prepare_fasa_mask")

    def __reduce__(self):  # copy, deepcopy and pickle rebuild it from its parts (copy.copy shares them: never edited)
        return FasaMask._from_parts, (*self._parts, self.max_value, self.binary)

    @property
    def n_rows(self) -> int:
        return self._parts.rows.shape[0]

    @property
    def n_img(self) -> int:
        return self._parts.rows.shape[1]

    @property
    def device(self) -> torch.device:
        return self._parts.rows.device

    @property
    def shared(self) -> bool:
        """True when one row serves every batch entry."""
        return self.n_rows == 1

    def live_keys(self) -> torch.Tensor:
        """Fraction of live FD keys per row, float32 ``[R]`` on the mask's device (no host sync)."""
        return self._parts.fd_count.float() / self.n_img

    def fd_tiles(self, block_n: int) -> torch.Tensor:
        """Key tiles of width ``block_n`` the "bias"-mode FD loop visits per row: ``ceil(nnz / block_n)``."""
        return (self._parts.fd_count + block_n - 1) // block_n

    def __repr__(self) -> str:
        return f"FasaMask(rows={self.n_rows}, n_img={self.n_img}, device={self.device})"


def _check_raw(mask) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype not in MASK_DTYPES:
        raise TypeError(f"mask must be bool or floating point (float16/bfloat16/float32/float64), got {mask.dtype}")
    if mask.dim() not in (1, 2) or mask.shape[-1] < 1 or mask.shape[0] < 1:
        raise ValueError(f"mask must have shape [Nimg] or [B, Nimg] with Nimg >= 1, got {tuple(mask.shape)}")
    if mask.requires_grad:
        raise ValueError("mask must not require grad: FASA does not differentiate through the mask")
    return mask


def check_mask_values(mask: torch.Tensor) -> float | None:
    """A float mask holds finite values >= 0 that stay finite and keep their sign in float32 (one host sync;
    bool masks need no check). A value too small for float32 would silently become "excluded". Returns the
    largest value (1.0 for bool masks; None where the values were not read), which bounds ``omega * m``.

    Skipped for meta and fake tensors (they hold no values) and while ``torch.compile`` traces
    (``torch.compiler.is_compiling()``): the answer is data on the device, and reading it would break the
    graph (and sync the host in every compiled call). Compiled callers prepare their masks outside the
    compiled region (:func:`prepare_fasa_mask`, once), or accept unchecked values: there a negative or NaN
    entry excludes its key like 0, and +inf gives a non-finite output."""
    return _check_values(mask)[0]


def _check_values(mask: torch.Tensor) -> tuple[float | None, bool]:
    """:func:`check_mask_values`, and whether every live value equals the largest (a binary mask), read in the
    same sync (False where the values were not read)."""
    if mask.dtype == torch.bool:
        return 1.0, True
    if torch.compiler.is_compiling() or mask.device.type == "meta" or _is_fake(mask):
        return None, False  # no values to read (meta and fake tensors have none)
    mask = _functorch_values(mask)
    f32 = mask.to(torch.float32)
    bad = ~torch.isfinite(mask) | (mask < 0) | ~torch.isfinite(f32) | ((mask > 0) & (f32 == 0))
    top = mask.max()
    other = (mask > 0) & (mask != top)
    any_bad, top, any_other = torch.stack([bad.any().to(torch.float64), top.to(torch.float64),
                                           other.any().to(torch.float64)]).tolist()  # one sync
    if any_bad:
        raise ValueError("mask must hold finite values >= 0 that are representable in float32 "
                         "(found a negative, NaN, inf, overflowing or underflowing entry)")
    return top, not any_other


def _functorch_values(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor under torch.func wrappers: a per-sample mask under ``vmap`` is a BatchedTensor, which
    has no storage to read; the tensor it wraps holds every sample's values (all of them are checked)."""
    from torch._C._functorch import get_unwrapped, is_functorch_wrapped_tensor

    while is_functorch_wrapped_tensor(t):
        t = get_unwrapped(t)
    return t


def _is_fake(t: torch.Tensor) -> bool:
    """A FakeTensor (shapes and dtypes only, e.g. under FakeTensorMode or torch.export's tracing)."""
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def pack_live_keys(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For float32 rows ``[R, N]``: (int32 live-key indices ``[R, N]`` ascending then padding, float32 values
    of those keys ``[R, N]`` with 0 padding, int32 counts ``[R]``). On the rows' device, no host sync."""
    live = rows > 0
    order = torch.argsort((~live).to(torch.int8), dim=1, stable=True)  # live keys first, in key order
    values = torch.where(live, rows, torch.zeros_like(rows)).gather(1, order)
    return order.to(torch.int32), values, live.sum(dim=1).to(torch.int32)


def prepare_fasa_mask(mask) -> FasaMask:
    """Check and prepare an FD-token mask (``[Nimg]`` shared by the batch, or ``[B, Nimg]``; bool or float
    >= 0) for :func:`freecure_ops.fasa_attention`. Raises ``TypeError``/``ValueError`` on bad input.

    The result holds its own float32 copy on the mask's device: reuse it for every call with the same mask
    (every layer of one token grid, every step). Its memory is about 3x a float32 copy of the mask.
    """
    if isinstance(mask, FasaMask):
        return mask
    mask = _check_raw(mask)
    return pack_checked_mask(mask, *_check_values(mask))


def raw_mask_rows(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A checked raw mask ``[Nimg]`` / ``[B, Nimg]`` as a contiguous copy ``[1 | B, Nimg]`` of ``dtype``: float32
    (what the kernel reads), or float64 for float64 attention (gradcheck), which float32 rows would round."""
    return mask.detach().to(dtype, copy=True).reshape(-1, mask.shape[-1]).contiguous()


def pack_checked_mask(mask: torch.Tensor, max_value: float | None = None, binary: bool | None = None) -> FasaMask:
    """:func:`prepare_fasa_mask` for a raw mask already checked (no host sync); ``max_value``: what the check
    returned; ``binary``: every live value is equal (None: known only for a bool mask; a caller that knows it,
    e.g. of a resized bool mask, may say True)."""
    rows = raw_mask_rows(mask)
    if binary is None:
        binary = mask.dtype == torch.bool
    return FasaMask._from_parts(rows, *pack_live_keys(rows), max_value, binary)


def call_mask(rows: torch.Tensor | None, fd_index: torch.Tensor | None = None, fd_value: torch.Tensor | None = None,
              fd_count: torch.Tensor | None = None, binary: bool = False) -> FasaMask | None:
    """The mask of one op call from the tensors that crossed ``torch.ops.freecure_ops.fasa`` (internal: the caller
    validated them; None for no mask). The packed list may be absent (a raw mask's rows): :func:`with_live_keys`
    derives it where a path needs it. Its cache lives as long as the call."""
    return None if rows is None else FasaMask._from_parts(rows, fd_index, fd_value, fd_count, None, binary)


def with_live_keys(mask: FasaMask | None) -> FasaMask | None:
    """``mask`` with its packed list of live keys: itself when it has one (a prepared mask), else the same mask
    with the list derived from its rows (:func:`pack_live_keys`: on their device, no host sync)."""
    if mask is None or mask._parts.fd_index is not None:
        return mask
    rows = mask._parts.rows
    return FasaMask._from_parts(rows, *pack_live_keys(rows), mask.max_value, mask.binary)


def fold_omega(mask: FasaMask, omega: torch.Tensor) -> FasaMask:
    """``mask`` with every value times ``omega`` (a 0-d float32 tensor on the mask's device); passed to
    ``fasa_attention`` with ``omega=1`` it computes what ``omega`` would ("bias": ``s + omega * m`` on the live
    keys, "scale": ``omega * m * s``). The packed key list is kept as it is, so which keys are live stays the
    mask's own (also for ``omega <= 0``). What it is for: a compiled caller passes omega as data the graph
    reads, not as a Python constant dynamo guards on (a new omega would recompile). Forward only: the
    backward reads liveness from ``rows > 0``, which a non-positive omega would change. ``omega`` is not read
    on the host (no sync): the caller has checked ``omega * max(mask)``."""
    rows, fd_index, fd_value, fd_count = mask._parts
    return FasaMask._from_parts(rows * omega, fd_index, fd_value * omega, fd_count, None, mask.binary)
