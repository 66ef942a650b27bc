"""Synthetic attribute masks: a face-parsing label map with a hair-like region at a chosen coverage,
nearest-resized to a layer's token grid the way the adapters resize the parser's output; eye/glasses-like
bands; the full mask.

Three kinds (MASK_KINDS): "hair", a 2-D blob touching nearly every row of the grid (at 25% coverage about
92% of 64-key row tiles hold a live key: the case where skipping whole tiles saves nothing); "band", a
compact horizontal band at eye height (glasses, eyes: few rows touched); "full", every token.

Labels follow BiSeNet / CelebAMask-HQ (SPEC.md): 0 background, 1 skin, 14 neck, 16 cloth, 17 hair.
The hair region grows from the crown outward and down the sides (the face is reached last), with
low-frequency noise on its edge, and is cut at the quantile that gives the target coverage exactly at
the map's own resolution. After the nearest resize the token coverage is close to, not exactly, the target;
the benchmark reports the coverage it actually got.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from freecure_ops.masks import resize_mask_to_grid

BACKGROUND, SKIN, NECK, CLOTH, HAIR = 0, 1, 14, 16, 17
HAIR_LABELS = (HAIR,)
PIXELS_PER_TOKEN = 8  # the map is made at image-like resolution: 8 pixels per token side


def _noise(h: int, w: int, gen: torch.Generator, cells: int = 6) -> torch.Tensor:
    coarse = torch.rand(1, 1, cells, cells, generator=gen)
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)[0, 0]


def parsing_map(h: int, w: int, coverage: float, seed: int = 0) -> torch.Tensor:
    """An ``[h, w]`` int64 label map whose hair region (label 17) covers ``coverage`` of the pixels."""
    if not 0.0 <= coverage <= 1.0:
        raise ValueError(f"coverage must be in [0, 1], got {coverage}")
    gen = torch.Generator().manual_seed(seed)
    y = torch.linspace(0.0, 1.0, h)[:, None].expand(h, w)
    x = torch.linspace(-1.0, 1.0, w)[None, :].expand(h, w)
    face = ((x / 0.42) ** 2 + ((y - 0.55) / 0.32) ** 2) <= 1.0
    # Hairness: highest at the crown, falling off faster sideways than downwards (hair hangs down the
    # sides), lowered on the face so that the face is covered last; noise roughens the edge.
    score = -((x / 1.2) ** 2 + ((y - 0.12).clamp(min=0) / 1.6) ** 2).sqrt()
    score = score - 0.6 * face.float() + 0.15 * _noise(h, w, gen)
    labels = torch.full((h, w), BACKGROUND, dtype=torch.int64)
    labels[face] = SKIN
    labels[(x.abs() < 0.2) & (y > 0.85)] = NECK
    labels[(y > 0.93) & (x.abs() >= 0.2)] = CLOTH
    n_hair = round(coverage * h * w)
    if n_hair > 0:
        order = torch.argsort(score.flatten(), descending=True, stable=True)
        labels.view(-1)[order[:n_hair]] = HAIR
    return labels


def token_mask(labels: torch.Tensor, grid: tuple, label_ids=HAIR_LABELS) -> torch.Tensor:
    """The bool FD-token mask ``[h * w]`` (row-major, ``y * w + x``) of ``label_ids`` on the token grid,
    resized exactly as the adapters resize a parser's mask."""
    keep = torch.isin(labels, torch.tensor(label_ids, device=labels.device))
    return resize_mask_to_grid(keep, *grid)


MASK_KINDS = ("hair", "band", "full")


def band_map(h: int, w: int, coverage: float) -> torch.Tensor:
    """An ``[h, w]`` bool map of a band centred at eye height, about 3x wider than tall at small coverage
    (growing to full rows), cut at the quantile that gives ``coverage`` exactly at this resolution."""
    if not 0.0 <= coverage <= 1.0:
        raise ValueError(f"coverage must be in [0, 1], got {coverage}")
    y = torch.linspace(0.0, 1.0, h)[:, None].expand(h, w)
    x = torch.linspace(-1.0, 1.0, w)[None, :].expand(h, w)
    score = -torch.maximum((y - 0.42).abs() * 6.0, x.abs())  # rectangles, wide before tall
    keep = torch.zeros(h * w, dtype=torch.bool)
    keep[torch.argsort(score.flatten(), descending=True, stable=True)[:round(coverage * h * w)]] = True
    return keep.view(h, w)


def case_mask(grid: tuple, coverage: float, seed: int = 0, kind: str = "hair") -> tuple:
    """(bool mask ``[h * w]``, its actual coverage) for a token grid: a ``kind`` mask at a target coverage
    ("full" ignores the coverage)."""
    h, w = grid
    if kind == "hair":
        mask = token_mask(parsing_map(h * PIXELS_PER_TOKEN, w * PIXELS_PER_TOKEN, coverage, seed), grid)
    elif kind == "band":
        mask = resize_mask_to_grid(band_map(h * PIXELS_PER_TOKEN, w * PIXELS_PER_TOKEN, coverage), h, w)
    elif kind == "full":
        mask = torch.ones(h * w, dtype=torch.bool)
    else:
        raise ValueError(f"unknown mask kind {kind!r}; choose from {MASK_KINDS}")
    return mask, float(mask.float().mean())
