"""The public op: validate once, then call the registered op ``torch.ops.freecure_ops.fasa`` (:mod:`.op`, whose
dispatch table picks the Triton kernel or a PyTorch path), which is differentiable and ``torch.compile``-able; a
plain eager call runs the op's implementation directly (:func:`_plain_eager`)."""
from __future__ import annotations

import functools

import torch
import torch.autograd.forward_ad as _forward_ad
from torch._C._functorch import TransformType, peek_interpreter_stack
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .fasa_mask import FasaMask, call_mask, raw_mask_rows
from . import op as _op  # noqa: F401  (registers torch.ops.freecure_ops.fasa)
from .validation import KERNEL_DTYPES, check_fasa_inputs

BACKENDS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=None)
def _kernels():
    """The Triton side, imported on first use: importing triton fixes whether kernels run interpreted, so
    ``import freecure_ops`` must not do it (the benchmark and tests set TRITON_INTERPRET first)."""
    from . import kernels

    return kernels


def _pick_backend(backend, device: torch.device, dtype: torch.dtype) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and dtype != torch.float64 else "torch"
    if backend == "triton" and dtype == torch.float64:
        raise TypeError("q has dtype float64, which backend='triton' does not take (fp16/bf16/fp32): use "
                        "backend='torch' (or 'auto') for float64, e.g. for torch.autograd.gradcheck")
    if backend == "triton" and device.type != "cuda":
        if device.type != "cpu" or not _kernels().interpreting():
            raise ValueError(f"backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set "
                             f"before triton is imported; got tensors on {device}")
    return backend


def fasa_attention(q, k_p, k_f, v_p, v_f, mask=None, omega=1.0, *, scale=None, mode="bias", n_txt=0,
                   backend="auto", return_lse=False):
    """Foundation-Aware Self-Attention (FASA), SPEC.md semantics.

    q ``[B, H, Nq, D]``; k_p, v_p ``[B, H, Np, D]``; k_f, v_f ``[B, H, Nf, D]`` (any strides; one dtype
    among fp16/bf16/fp32, or float64 on the PyTorch backend; one device). ``mask``: ``[Nimg]`` (or
    ``[1, Nimg]``) shared by the batch, or ``[B, Nimg]``, with ``Nimg = Nf - n_txt``, bool or float >= 0, None
    for all ones; or a :class:`FasaMask` from :func:`prepare_fasa_mask` (reuse one across calls: a raw mask is
    checked and prepared again in every call, which costs a host sync for float masks). ``mode``: "bias"
    (``logit = s + omega*m`` where ``m > 0``, excluded where ``m == 0``) or "scale" (``logit = omega*m*s``).
    ``n_txt > 0`` selects the FLUX joint-sequence variant. ``backend``: "auto" (the Triton kernel on CUDA, the
    PyTorch path otherwise and for float64), "triton" or "torch". Returns ``[B, H, Nq, D]`` in q's dtype, and
    with ``return_lse`` also the fp32 natural-log log-sum-exp ``[B, H, Nq]`` of each row's logits (float64 for
    float64 inputs).

    Autograd: q, k_p, k_f, v_p, v_f may require grad on every backend (the backward recomputes the attention
    with stock PyTorch ops, :mod:`.torch_backward`); the mask may not.

    Under ``torch.compile`` the call is one node (``torch.ops.freecure_ops.fasa``) and never breaks the graph.
    The value check of a *raw float* mask (finite, >= 0, representable in float32) needs the device's answer
    on the host, so it is skipped while tracing: a compiled caller passes a :class:`FasaMask` (checked when it
    was prepared, outside the compiled region) or accepts that its raw mask's values are not checked.
    """
    p = check_fasa_inputs(q, k_p, k_f, v_p, v_f, mask, omega, scale=scale, mode=mode, n_txt=n_txt,
                          allowed_dtypes=KERNEL_DTYPES + (torch.float64,))
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    backend = _pick_backend(backend, q.device, q.dtype)
    if not torch.compiler.is_compiling():
        _check_transforms((q, k_p, k_f, v_p, v_f), backend)
    # the mask as the op takes it: four tensors (a raw mask's rows alone: the op packs its live keys where a path
    # needs them), and whether every live value is equal (a prepared mask knows; a raw one if it is bool)
    if isinstance(mask, FasaMask):
        rows, fd_index, fd_value, fd_count = mask._parts  # its own tensors (the public ones are copies)
        binary = mask.binary
    else:
        fd_index = fd_value = fd_count = None
        rows = None if mask is None else raw_mask_rows(mask, torch.float64 if q.dtype == torch.float64 else
                                                       torch.float32)
        binary = mask is not None and mask.dtype == torch.bool
    if _plain_eager(q, k_p, k_f, v_p, v_f):  # the prepared mask itself: its cache spares per-call work
        mask = mask if isinstance(mask, FasaMask) else call_mask(rows, binary=binary)
        out, lse = _op.fasa_run(q, k_p, k_f, v_p, v_f, mask, p, backend, return_lse)
    else:
        out, lse = torch.ops.freecure_ops.fasa(q, k_p, k_f, v_p, v_f, rows, fd_index, fd_value, fd_count, binary,
                                               p.scale, p.omega, p.mode, p.n_txt, backend, return_lse)
    return (out, lse) if return_lse else out


def _check_transforms(tensors, backend: str) -> None:
    """Refuse, clearly, what the op cannot differentiate or batch: torch.func's grad/jvp/jacrev/... (the
    op's backward is registered for torch.autograd), vmap on the Triton backend (the kernel needs real
    storage), and forward-mode AD (no forward formula; the tangent would be dropped). vmap on the PyTorch
    backend runs on stock ops and works."""
    if peek_interpreter_stack() is not None:
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        kinds = {i.key() for i in retrieve_all_functorch_interpreters()} - {TransformType.Functionalize}
        if kinds - ({TransformType.Vmap} if backend == "torch" else set()):
            names = ", ".join(sorted(k.name.lower() for k in kinds))
            raise TypeError(f"fasa_attention under torch.func ({names}) with backend='{backend}': the one "
                            "transform it supports is vmap, with backend='torch'; for gradients use "
                            "torch.autograd (loss.backward(), torch.autograd.grad)")
    if _forward_ad._current_level >= 0 and any(_forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise TypeError("fasa_attention does not support forward-mode AD (dual tensors): its derivative is "
                        "registered for reverse mode only (torch.autograd)")


def _plain_eager(*tensors) -> bool:
    """True when the registered op's dispatch would add nothing: not traced (torch.compile), no input that
    autograd must track, no tensor subclass or dispatch mode (fake tensors, functionalization) in play. Then
    the implementation is called directly; otherwise through ``torch.ops.freecure_ops.fasa``."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:  # a plain loop: all() over a generator costs a microsecond more per call
        if type(t) is not torch.Tensor or (grad and t.requires_grad):
            return False
    return True
