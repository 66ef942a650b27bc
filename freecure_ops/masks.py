"""Attribute-mask utilities."""
from __future__ import annotations

import torch


def resize_mask_to_grid(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Resize a mask ``[H, W]`` or ``[n, H, W]`` to a ``h x w`` token grid with nearest interpolation and
    flatten it row-major (token ``y * w + x``): returns ``[h * w]`` or ``[n, h * w]`` in the mask's dtype.

    Output cell ``(y, x)`` takes source cell ``(floor(y * H / h), floor(x * W / w))``, the rule of
    ``F.interpolate(mode="nearest")``, computed here in exact integer arithmetic (any dtype, bool included).
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() not in (2, 3):
        raise ValueError(f"mask must have shape [H, W] or [n, H, W], got {mask.dim()} dims {tuple(mask.shape)}")
    for name, value in (("h", h), ("w", w)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    src_h, src_w = mask.shape[-2:]
    if src_h < 1 or src_w < 1:
        raise ValueError(f"mask must have a non-empty spatial size, got {tuple(mask.shape)}")
    rows = torch.arange(h, device=mask.device) * src_h // h
    cols = torch.arange(w, device=mask.device) * src_w // w
    out = mask.index_select(-2, rows).index_select(-1, cols)
    return out.reshape(*mask.shape[:-2], h * w)
