"""Input checks for FASA, done once at the API edge before any kernel launch.

Every problem is reported as a ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape or value)
whose message starts with the argument's name.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from .fasa_mask import MASK_DTYPES, FasaMask, check_mask_values

MODES = ("bias", "scale")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


class FasaProblem(NamedTuple):
    """The validated sizes and scalars of one FASA call (a NamedTuple: built on every call, cheaply)."""

    batch: int
    heads: int
    n_q: int
    n_p: int
    n_f: int
    head_dim: int
    n_txt: int
    scale: float
    omega: float
    mode: str

    @property
    def n_img(self) -> int:
        return self.n_f - self.n_txt


def _check_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have shape [B, H, N, D] (4 dims), got {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t


F32_SAFE = float(torch.finfo(torch.float32).max) / 4  # a scalar the kernel scales by log2(e) and still holds


def check_real(name: str, value, *, allow_none: bool = False, lo: float | None = None,
               hi: float | None = None) -> float | None:
    """A finite real number (a Python or numpy int/float, or a 0-dim tensor) within ``[lo, hi]`` and within
    float32 range (the kernel computes in float32), as a Python float."""
    if type(value) is float and lo is None and hi is None and abs(value) <= F32_SAFE:  # the common case, fast
        return value  # (NaN fails the comparison and takes the checks below)
    if value is None and allow_none:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a Python number or a 0-dim tensor, got shape {tuple(value.shape)}")
        if torch.compiler.is_compiling():  # .item() of a traced tensor is data the graph cannot guard on
            raise TypeError(f"{name}: under torch.compile pass a Python float, not a tensor (its value would "
                            "have to be read from the device inside the graph)")
        if value.requires_grad:  # .item() would drop the graph without a word
            raise TypeError(f"{name} is a tensor that requires grad, and FASA does not differentiate with respect "
                            f"to {name}: pass a float or a detached tensor")
        value = value.item()
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float64
        raise ValueError(f"{name} must be within float32 range (|{name}| <= {F32_SAFE:.3g}), got an integer "
                         "beyond float64 range") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if abs(value) > F32_SAFE:
        raise ValueError(f"{name} must be within float32 range (|{name}| <= {F32_SAFE:.3g}), got {value}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def check_omega_times_mask(omega: float, max_value: float | None) -> None:
    """``omega * m`` enters every FD logit: beyond float32 range it would turn the output into NaN."""
    if max_value is not None and abs(omega) * max_value > F32_SAFE:
        raise ValueError(f"omega * max(mask) = {omega:.3g} * {max_value:.3g} is beyond float32 range "
                         f"(|omega * m| <= {F32_SAFE:.3g}): the FD logits would overflow")


def check_mask(mask, *, batch: int, n_img: int, device: torch.device, omega: float = 0.0) -> None:
    """Check an FD-token mask: None, a raw ``[n_img]`` / ``[batch, n_img]`` bool or float tensor (its values
    too: one host sync for a float mask), or a :class:`FasaMask` (checked when it was prepared) with 1 or
    ``batch`` rows."""
    if mask is None:
        return
    if isinstance(mask, FasaMask):
        if mask.n_img != n_img or mask.n_rows not in (1, batch):
            raise ValueError(f"mask: a prepared mask of {mask.n_rows} row(s) x {mask.n_img} tokens does not fit "
                             f"[Nimg]={n_img} (Nf - n_txt) shared or [B, Nimg]=[{batch}, {n_img}]")
        if mask.device != device:
            raise ValueError(f"mask must be on the same device as q ({device}), got {mask.device}")
        if not torch.compiler.is_compiling():  # a compiled graph must not guard on this per-mask float
            check_omega_times_mask(omega, mask.max_value)
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, a FasaMask or None, got {type(mask).__name__}")
    if mask.dtype not in MASK_DTYPES:
        raise TypeError(f"mask must be bool or floating point (float16/bfloat16/float32/float64), got {mask.dtype}")
    if mask.dim() == 1:
        if mask.shape[0] != n_img:
            raise ValueError(f"mask must have shape [Nimg]={n_img} (Nf - n_txt), got {tuple(mask.shape)}")
    elif mask.dim() == 2:
        if tuple(mask.shape) not in ((batch, n_img), (1, n_img)):  # [1, Nimg]: shared, as a prepared one is
            raise ValueError(f"mask must have shape [Nimg]=[{n_img}], [1, Nimg] or [B, Nimg]=[{batch}, {n_img}], "
                             f"got {tuple(mask.shape)}")
    else:
        raise ValueError(f"mask must have shape [Nimg] or [B, Nimg], got {mask.dim()} dims {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask must be on the same device as q ({device}), got {mask.device}")
    if mask.requires_grad:
        raise ValueError("mask must not require grad: FASA does not differentiate through the mask")
    check_omega_times_mask(omega, check_mask_values(mask))


_NAMES = ("q", "k_p", "k_f", "v_p", "v_f")


def _check_tensors(tensors, allowed_dtypes) -> None:
    """The slow, precise path: raise the first problem among q, k_p, k_f, v_p, v_f, naming the argument."""
    for name, t in zip(_NAMES, tensors):
        _check_tensor(name, t)
    q = tensors[0]
    if q.dtype not in allowed_dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed_dtypes)
        raise TypeError(f"q must have dtype in ({names}), got {q.dtype}")
    for name, t in zip(_NAMES, tensors):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: all of q, k_p, k_f, v_p, v_f "
                            "must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: all tensors must share one device")


def _check_shapes(tensors) -> None:
    """The slow, precise path of the shape checks: raise the first problem, naming the argument."""
    q, k_p, k_f, v_p, v_f = tensors
    batch, heads, n_q, head_dim = q.shape
    for name, t in zip(_NAMES, tensors):
        b, h, _, d = t.shape
        if b != batch or h != heads:
            raise ValueError(f"{name} must have batch and heads [B={batch}, H={heads}] like q, "
                             f"got shape {tuple(t.shape)}")
        if d != head_dim:
            raise ValueError(f"{name} must have head dim D={head_dim} like q, got shape {tuple(t.shape)}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q head dim D must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    if batch < 1 or heads < 1:
        raise ValueError(f"q must have B >= 1 and H >= 1, got shape {tuple(q.shape)}")
    n_p, n_f = k_p.shape[2], k_f.shape[2]
    if v_p.shape[2] != n_p:
        raise ValueError(f"v_p must have as many tokens as k_p ({n_p}), got shape {tuple(v_p.shape)}")
    if v_f.shape[2] != n_f:
        raise ValueError(f"v_f must have as many tokens as k_f ({n_f}), got shape {tuple(v_f.shape)}")
    for name, n, t in (("q", n_q, q), ("k_p", n_p, k_p), ("k_f", n_f, k_f)):
        if n < 1:
            raise ValueError(f"{name} must hold at least one token, got shape {tuple(t.shape)}")


def check_fasa_inputs(q, k_p, k_f, v_p, v_f, mask, omega, *, scale, mode, n_txt,
                      allowed_dtypes=KERNEL_DTYPES) -> FasaProblem:
    """Validate a FASA call; returns its sizes. Raises before anything is computed."""
    tensors = (q, k_p, k_f, v_p, v_f)
    # Fast path first (this runs on every call): the precise per-argument messages come from the slow path.
    dtype = getattr(q, "dtype", None)
    device = getattr(q, "device", None)
    if dtype not in allowed_dtypes:
        _check_tensors(tensors, allowed_dtypes)
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.dtype != dtype or t.device != device:
            _check_tensors(tensors, allowed_dtypes)

    batch, heads, n_q, head_dim = q_shape = q.shape
    kp_shape, kf_shape = k_p.shape, k_f.shape
    n_p, n_f = kp_shape[2], kf_shape[2]
    # Fast path (every call): one comparison per tensor; the precise messages come from _check_shapes.
    if not (kp_shape == (batch, heads, n_p, head_dim) and v_p.shape == kp_shape
            and kf_shape == (batch, heads, n_f, head_dim) and v_f.shape == kf_shape
            and 1 <= head_dim <= MAX_HEAD_DIM and batch >= 1 and heads >= 1 and n_q >= 1 and n_p >= 1
            and n_f >= 1):
        _check_shapes(tensors)
        raise AssertionError(f"_check_shapes passed shapes the fast check refused: {q_shape}")  # unreachable

    if type(n_txt) is not int:  # numpy and other integers are welcome; bools and floats are not
        if isinstance(n_txt, bool) or type(n_txt).__name__ == "bool_" or not isinstance(n_txt, numbers.Integral):
            raise TypeError(f"n_txt must be an int, got {type(n_txt).__name__}")
        n_txt = int(n_txt)
    if not 0 <= n_txt < n_f or n_txt > n_q or n_txt > n_p:
        raise ValueError(f"n_txt must satisfy 0 <= n_txt < Nf={n_f} and n_txt <= Nq={n_q}, Np={n_p} "
                         f"(text tokens lead every joint sequence), got {n_txt}")
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    omega = check_real("omega", omega)
    scale = check_real("scale", scale, allow_none=True)
    if scale is None:
        scale = head_dim ** -0.5
    check_mask(mask, batch=batch, n_img=n_f - n_txt, device=q.device, omega=omega)
    return FasaProblem(batch, heads, n_q, n_p, n_f, head_dim, n_txt, scale, omega, mode)
