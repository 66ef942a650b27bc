"""Checks of install_fasa's arguments, done before the model is touched. Errors name the argument."""
from __future__ import annotations

import numbers
from collections.abc import Iterable

import torch

from freecure_ops.api import BACKENDS
from freecure_ops.fasa_mask import MASK_DTYPES
from freecure_ops.validation import MODES, check_mask_values, check_omega_times_mask, check_real

__all__ = ["BACKENDS", "LAYOUTS", "MODES", "check_bool", "check_choice", "check_grid", "check_layers", "check_mask",
           "check_omega_times_mask", "check_real", "check_steps"]

LAYOUTS = ("cfg", "plain")


def check_mask(mask) -> tuple[torch.Tensor, float | None]:
    """An attribute mask ``[h, w]`` or ``[n, h, w]``, bool or float >= 0, refused where ``fasa_attention``
    refuses it. Returns (a float32 copy, its largest value: the bound of ``omega * m``; None for a meta mask)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor of shape [h, w] or [n, h, w], got {type(mask).__name__}")
    if mask.dim() not in (2, 3):
        raise ValueError(f"mask must have shape [h, w] (shared) or [n, h, w] (one per PD/FD pair), "
                         f"got {mask.dim()} dims {tuple(mask.shape)}")
    if mask.numel() == 0:
        raise ValueError(f"mask must not be empty, got shape {tuple(mask.shape)}")
    if mask.dtype not in MASK_DTYPES:
        raise TypeError(f"mask must be bool or floating point (float16/bfloat16/float32/float64), got {mask.dtype}")
    if mask.requires_grad:
        raise ValueError("mask must not require grad: FASA does not differentiate through the mask")
    # checked in the caller's dtype: a float64 value that float32 cannot hold is refused, not rounded to 0
    max_value = check_mask_values(mask)
    return mask.to(torch.float32), max_value


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _int_collection(name: str, value) -> frozenset:
    if isinstance(value, (str, bytes, torch.Tensor)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be None or a collection/range of ints, got {type(value).__name__}")
    items = list(value)
    for item in items:  # numpy integers (np.arange(50, 70)) are ints too; bools are not
        if isinstance(item, bool) or type(item).__name__ == "bool_" or not isinstance(item, numbers.Integral):
            raise TypeError(f"{name} must hold ints, got an item of type {type(item).__name__}")
        if item < 0:
            raise ValueError(f"{name} must hold indices >= 0, got {item}")
    if not items:
        raise ValueError(f"{name} must not be empty (pass None for the default)")
    return frozenset(int(item) for item in items)


def check_steps(steps) -> frozenset | None:
    """None (every step) or a collection/range of denoising step indices."""
    return None if steps is None else _int_collection("steps", steps)


def check_layers(layers, n_blocks: int) -> frozenset | str | None:
    """None (preset), "all", or a collection of block indices below ``n_blocks``."""
    if layers is None:
        return None
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers must be None, 'all' or a collection of block indices, got {layers!r}")
        return "all"
    chosen = _int_collection("layers", layers)
    bad = sorted(i for i in chosen if i >= n_blocks)
    if bad:
        raise ValueError(f"layers holds block indices {bad} but the model has {n_blocks} transformer blocks "
                         f"(0..{n_blocks - 1} in execution order)")
    return chosen


def check_grid(grid) -> tuple[int, int] | None:
    """None, or an ``(h, w)`` pair of positive ints (a token grid)."""
    if grid is None:
        return None
    if not isinstance(grid, (tuple, list)) or len(grid) != 2 or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in grid):
        raise ValueError(f"grid must be None or (h, w), two positive ints, got {grid!r}")
    return int(grid[0]), int(grid[1])
