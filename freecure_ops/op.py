"""``torch.ops.freecure_ops.fasa``: FASA as one registered PyTorch op for every backend.

Registered with ``torch.library.custom_op`` (torch >= 2.4), with a fake (meta) implementation and an autograd
formula, so that ``torch.compile`` traces a call as one opaque node (``fullgraph=True``, no graph break),
AOTAutograd differentiates it, and CUDA graphs can capture it (the CUDA implementation launches one Triton
kernel and never syncs with the host).

Why ``custom_op`` and not ``triton_op``/``wrap_triton``: ``triton_op`` needs torch >= 2.6 (the floor is
2.4), and it would have Inductor trace the launcher, which reads pointer alignment (``data_ptr()``) and the
device's SM count to pick its specialization and tiles: neither exists on a fake tensor. The kernel is one
fused launch with nothing around it for Inductor to fuse into, so an opaque op loses nothing, and a single
op can serve both backends (the Triton kernel on CUDA or under ``TRITON_INTERPRET=1``, the PyTorch path
elsewhere) with one schema, one fake and one backward.

The op takes tensors and scalars only: a prepared :class:`~freecure_ops.FasaMask` crosses the boundary as its
four tensors (``rows``, ``fd_index``, ``fd_value``, ``fd_count``; all None for "no mask"; a raw mask as its
rows alone, the packed three None). Inputs are validated by :func:`freecure_ops.fasa_attention` before the op
is called; call that, not the op.

Which path runs is one table, :data:`ROUTES` (backend, device, mode, vmap -> path, each row with why), read
in :func:`fasa_run`; docs/op.md shows it. The paths: :func:`triton_kernel` here, and the PyTorch backend's
``torch_gathered``, ``torch_folded`` and ``torch_dense`` (:mod:`.torch_backend`).

Outputs: ``out`` ``[B, H, Nq, D]`` in q's dtype, laid out as ``[B, Nq, H, D]`` memory (what the kernel
writes; the PyTorch path is copied into that layout when it differs, so that the fake and real strides
agree), and the log-sum-exp ``[B, H, Nq]`` (float32; float64 for float64 inputs), or an empty tensor when
``return_lse`` is False.

Autograd: :func:`freecure_ops.torch_backward.fasa_torch_backward` (recomputation with stock ops) for every
backend; the mask is not differentiable (``fasa_attention`` refuses a mask that requires grad).
"""
import functools
from typing import Callable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch._C._functorch import peek_interpreter_stack

from .fasa_mask import FasaMask, call_mask, with_live_keys
from .torch_attend import acc_dtype, autocast_on, no_autocast
from .torch_backend import torch_dense, torch_folded, torch_gathered
from .torch_backward import fasa_torch_backward
from .validation import FasaProblem

OP_NAME = "freecure_ops::fasa"


def _problem(q, k_p, k_f, scale, omega, mode, n_txt) -> FasaProblem:
    batch, heads, n_q, head_dim = q.shape
    return FasaProblem(batch, heads, n_q, k_p.shape[2], k_f.shape[2], head_dim, n_txt, scale, omega, mode)


def _empty_out(q: Tensor) -> Tensor:
    """An uninitialized output ``[B, H, Nq, D]`` laid out as ``[B, Nq, H, D]`` memory (the kernel's layout)."""
    b, h, n, d = q.shape
    return q.new_empty(b, n, h, d).transpose(1, 2)


def _empty_lse(q: Tensor, return_lse: bool) -> Tensor:
    b, h, n, _ = q.shape
    return q.new_empty((b, h, n) if return_lse else (0,), dtype=acc_dtype(q.dtype))


@functools.lru_cache(maxsize=None)
def _launcher():
    from .kernels import fasa_fwd  # on first use: importing triton fixes whether kernels run interpreted

    return fasa_fwd


def triton_kernel(q, k_p, k_f, v_p, v_f, mask, p: FasaProblem, return_lse: bool):
    """The fused Triton kernel (``kernels/fasa_fwd.py``, its default launch): one launch, no host sync. "bias"
    mode with a mask walks the mask's packed list of live keys (derived here for a raw mask's rows)."""
    if p.mode == "bias":
        mask = with_live_keys(mask)
    res = _launcher()(q, k_p, k_f, v_p, v_f, mask, scale=p.scale, omega=p.omega, mode=p.mode, n_txt=p.n_txt,
                      return_lse=return_lse)
    return res if return_lse else (res, None)


# ------------------------------------------------------------------------------------------ the dispatch table
# Which path runs, by the call's backend (api picks it: "auto" is triton on CUDA, torch elsewhere and for
# float64), device ("cpu" or "other": CUDA, meta, ...), mode and whether a torch.func transform (vmap) is active.
# ANY matches every value. The rows are disjoint and cover every call (checked below, at import); each path is
# one function taking (q, k_p, k_f, v_p, v_f, mask, p, return_lse) and returning (out, lse or None).
# Neither the mask's kind (none, raw, prepared) nor n_txt, return_lse or autocast picks a path: every path takes
# them all (a prepared FasaMask only spares rebuilding what the path derives from it; fasa_run switches autocast
# off around every path). The launcher's variants (split_kv, pd_sdpa, fd_block_n) are not rows: off by default,
# timed by the GPU sweep (bench/tile_sweep.py); a variant the timings pick becomes a row.

ANY = None


class Route(NamedTuple):
    """One row of :data:`ROUTES`: the conditions (a value, or ANY), the path, and why it runs there."""
    backend: str
    device: Optional[str]
    mode: Optional[str]
    transform: Optional[bool]
    path: Callable
    why: str


class CallKind(NamedTuple):
    """What the table reads from a call."""
    backend: str      # "triton" or "torch" (resolved)
    device: str       # "cpu" or "other"
    mode: str         # "bias" or "scale"
    transform: bool   # a torch.func transform (vmap) is active


ROUTES = (
    #     backend   device   mode     transform  path
    Route("triton", ANY,     ANY,     ANY,       triton_kernel,
          "the fused kernel, on CUDA or, under TRITON_INTERPRET=1, the CPU (api refuses vmap for it)"),
    Route("torch",  "cpu",   "bias",  False,     torch_gathered,
          "live FD keys gathered next to the PD keys, omega * m as SDPA's additive mask: the CPU flash kernel "
          "takes one at no cost, and folding it into the head dim was slower there (bench/results/cpu/fold)"),
    Route("torch",  "other", "bias",  False,     torch_folded,
          "the same keys, omega * m folded into an extra head-dim column: SDPA unmasked, which CUDA's fused "
          "kernels need (a float64 call on CUDA, backend='torch' there, meta tensors)"),
    Route("torch",  ANY,     "bias",  True,      torch_dense,
          "under vmap: [PD; FD image] with a -inf bias, no host read of the live count (a gather needs one)"),
    Route("torch",  ANY,     "scale", ANY,       torch_dense,
          "'scale' mode excludes no key: nothing to gather; omega * m folded into the FD keys, SDPA unmasked"),
)

KINDS = tuple(CallKind(b, d, m, t) for b in ("triton", "torch") for d in ("cpu", "other") for m in ("bias", "scale")
              for t in (False, True))


def _matches(route: Route, kind: CallKind) -> bool:
    return all(want is ANY or want == have for want, have in zip(route[:4], kind))


def _table(routes=ROUTES) -> dict:
    """Every call kind to its one route (a table that misses a kind or matches one twice fails at import)."""
    table = {}
    for kind in KINDS:
        rows = [r for r in routes if _matches(r, kind)]
        if len(rows) != 1:
            names = [r.path.__name__ for r in rows]
            raise AssertionError(f"the dispatch table has {len(rows)} rows for {kind}: {names}")
        table[kind] = rows[0]
    return table


ROUTE_OF = _table()


def route(backend: str, device_type: str, mode: str) -> Route:
    """The row of :data:`ROUTES` for a call (a dict lookup)."""
    return ROUTE_OF[backend, "cpu" if device_type == "cpu" else "other", mode, peek_interpreter_stack() is not None]


def fasa_run(q: Tensor, k_p: Tensor, k_f: Tensor, v_p: Tensor, v_f: Tensor, mask: Optional[FasaMask],
             p: FasaProblem, backend: str, return_lse: bool):
    """FASA on validated inputs by :func:`route`'s path: ``(out, lse)``, ``lse`` None unless asked for. ``mask``:
    a prepared :class:`~freecure_ops.FasaMask` (an eager call: a path reuses what it derived from the mask in
    earlier calls), one built for this call (:func:`~freecure_ops.fasa_mask.call_mask`), or None. ``backend``:
    "torch" or "triton", resolved. Every path runs with autocast off: the op computes in its own precision
    (the torch paths in float32; autocast would run their SDPA in fp16/bf16 and round ``omega * m``)."""
    device_type = q.device.type
    path = route(backend, device_type, p.mode).path
    if autocast_on(device_type):
        with no_autocast(device_type):
            out, lse = path(q, k_p, k_f, v_p, v_f, mask, p, return_lse)
    else:
        out, lse = path(q, k_p, k_f, v_p, v_f, mask, p, return_lse)
    if out.stride() != _out_strides(q):
        out = _empty_out(q).copy_(out)
    return out, None if lse is None else lse.contiguous()


def _out_strides(q: Tensor) -> tuple:
    """The strides of :func:`_empty_out` (``[B, Nq, H, D]`` memory), without allocating it. Dims of size 1
    take the strides ``new_empty`` gives them (validated inputs have no empty dim)."""
    _, h, n, d = q.shape
    return (n * h * d, d, h * d, 1)


def fasa_impl(q: Tensor, k_p: Tensor, k_f: Tensor, v_p: Tensor, v_f: Tensor, rows: Optional[Tensor],
              fd_index: Optional[Tensor], fd_value: Optional[Tensor], fd_count: Optional[Tensor], binary: bool,
              scale: float, omega: float, mode: str, n_txt: int, backend: str,
              return_lse: bool) -> Tuple[Tensor, Tensor]:
    """The registered op's implementation: :func:`fasa_run` on the mask the tensors make, with an empty LSE when
    none is asked for (an op returns tensors)."""
    out, lse = fasa_run(q, k_p, k_f, v_p, v_f, call_mask(rows, fd_index, fd_value, fd_count, binary),
                        _problem(q, k_p, k_f, scale, omega, mode, n_txt), backend, return_lse)
    return out, _empty_lse(q, False) if lse is None else lse


# The registered op. ``fasa_attention`` calls ``fasa_run`` directly in plain eager calls (nothing to trace,
# nothing to differentiate), where the dispatcher's ~25 us per call would be pure cost.
fasa_op = torch.library.custom_op(OP_NAME, mutates_args=())(fasa_impl)


@fasa_op.register_fake
def _fasa_fake(q, k_p, k_f, v_p, v_f, rows, fd_index, fd_value, fd_count, binary, scale, omega, mode, n_txt,
               backend, return_lse):
    return _empty_out(q), _empty_lse(q, return_lse)


def _setup_context(ctx, inputs, output):
    q, k_p, k_f, v_p, v_f, rows, _, _, _, _, scale, omega, mode, n_txt, _, return_lse = inputs
    ctx.save_for_backward(q, k_p, k_f, v_p, v_f, rows)
    ctx.problem = (scale, omega, mode, n_txt)
    ctx.return_lse = return_lse


def _backward(ctx, g_out, g_lse):
    q, k_p, k_f, v_p, v_f, rows = ctx.saved_tensors
    scale, omega, mode, n_txt = ctx.problem
    p = _problem(q, k_p, k_f, scale, omega, mode, n_txt)
    if g_out is None:
        g_out = _empty_out(q).zero_()
    grads = fasa_torch_backward(q, k_p, k_f, v_p, v_f, rows, g_out, g_lse if ctx.return_lse else None, p)
    return (*grads, None, None, None, None, None, None, None, None, None, None, None)


fasa_op.register_autograd(_backward, setup_context=_setup_context)
