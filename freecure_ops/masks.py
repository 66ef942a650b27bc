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


def image_mask(im):
    """A mask image (PIL) -> float32 numpy ``[H, W]`` in [0, 1] (white = attribute), one rule for the Python API
    and the CLI's ``--mask``: grey or colour images give their luminance; images with transparency give the
    alpha channel where the colour channels are uniform (a mask painted only in alpha), else luminance times
    alpha (strokes on a transparent background); 16-bit and float images are scaled by their maximum."""
    import numpy as np

    im.load()
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = float(arr.max()) if arr.size else 0.0
        return (arr / top if top > 0 else np.zeros_like(arr)).clip(0, 1).astype(np.float32)
    has_alpha = "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info)
    if not has_alpha:
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    rgba_image = im.convert("RGBA")
    rgba = np.asarray(rgba_image, dtype=np.float32) / 255.0
    lum = np.asarray(rgba_image.convert("L"), dtype=np.float32) / 255.0
    alpha = rgba[..., 3]
    if float(alpha.min()) >= 1.0:
        return lum
    if float(np.ptp(rgba[..., :3])) == 0.0:
        return alpha.copy()
    return lum * alpha
