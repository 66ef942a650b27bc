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
four tensors (``rows``, ``fd_index``, ``fd_value``, ``fd_count``; all None for "no mask"). Inputs are
validated by :func:`freecure_ops.fasa_attention` before the op is called; call that, not the op.

Outputs: ``out`` ``[B, H, Nq, D]`` in q's dtype, laid out as ``[B, Nq, H, D]`` memory (what the kernel
writes; the PyTorch path is copied into that layout when it differs, so that the fake and real strides
agree), and the log-sum-exp ``[B, H, Nq]`` (float32; float64 for float64 inputs), or an empty tensor when
``return_lse`` is False.

Autograd: :func:`freecure_ops.torch_backward.fasa_torch_backward` (recomputation with stock ops) for every
backend; the mask is not differentiable (``fasa_attention`` refuses a mask that requires grad).
"""
import functools
from types import SimpleNamespace
from typing import Optional, Tuple

import torch
from torch import Tensor

from .torch_backend import acc_dtype, fasa_prepared, fasa_torch, takes_prepared
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


def fasa_run(q: Tensor, k_p: Tensor, k_f: Tensor, v_p: Tensor, v_f: Tensor, rows: Optional[Tensor],
             fd_index: Optional[Tensor], fd_value: Optional[Tensor], fd_count: Optional[Tensor], binary: bool,
             scale: float, omega: float, mode: str, n_txt: int, backend: str, return_lse: bool, prepared=None):
    """FASA on validated inputs (see the module docstring): ``(out, lse)``, ``lse`` None unless asked for.
    ``binary``: every live value of each mask row is equal (the kernel's scalar-bias FD loop). ``backend``:
    "torch" or "triton", resolved. ``prepared``: the :class:`~freecure_ops.FasaMask` the four mask tensors
    come from, when the caller has it (eager calls; the op itself takes tensors only): the PyTorch path
    then reuses what it derived from the mask in earlier calls."""
    if backend == "triton":
        mask = None if rows is None else SimpleNamespace(rows=rows, fd_index=fd_index, fd_value=fd_value,
                                                         fd_count=fd_count, binary=binary)
        res = _launcher()(q, k_p, k_f, v_p, v_f, mask, scale=scale, omega=omega, mode=mode, n_txt=n_txt,
                          return_lse=return_lse)
        return res if return_lse else (res, None)
    if prepared is not None and mode == "bias" and n_txt == 0 and not return_lse and takes_prepared(q.device):
        out, lse = fasa_prepared(q, k_p, k_f, v_p, v_f, prepared, scale, omega), None  # the common eager call
    else:
        p = _problem(q, k_p, k_f, scale, omega, mode, n_txt)
        packed = None if fd_index is None else (fd_index, fd_value, fd_count)
        res = fasa_torch(q, k_p, k_f, v_p, v_f, rows, p, return_lse=return_lse, packed=packed, prepared=prepared)
        out, lse = res if return_lse else (res, None)
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
    """The registered op's implementation: :func:`fasa_run` with an empty LSE when none is asked for (an op
    returns tensors)."""
    out, lse = fasa_run(q, k_p, k_f, v_p, v_f, rows, fd_index, fd_value, fd_count, binary, scale, omega, mode,
                        n_txt, backend, return_lse)
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
