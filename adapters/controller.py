"""Shared FASA state of one installation: settings, step counter, grid of the current forward, mask cache.

The controller holds Python numbers and the attribute masks only (no activations), so nothing of a finished
generation stays alive through it.
"""
from __future__ import annotations

import math

import torch

from freecure_ops.fasa_mask import FasaMask, prepare_fasa_mask
from freecure_ops.masks import resize_mask_to_grid


class FasaController:
    def __init__(self, *, mask: torch.Tensor, omega: float, steps, style_fidelity: float, layout: str, mode: str,
                 backend: str):
        self.omega = omega
        self.steps = steps                  # frozenset of step indices, or None for every step
        self.style_fidelity = style_fidelity
        self.layout = layout
        self.mode = mode
        self.backend = backend
        self.enabled = True
        self.reset()
        self.set_mask(mask)

    # ---- masks -----------------------------------------------------------------------------------------
    def set_mask(self, mask: torch.Tensor) -> None:
        """``mask``: validated float32 ``[h, w]`` or ``[n, h, w]``, already on the model's device."""
        self._mask = mask
        self._cache: dict = {}

    def drop_masks(self) -> None:
        """Release the mask and every resized copy (after remove)."""
        self._mask = self._mask.new_zeros(1, 1)
        self._cache = {}

    @property
    def mask_pairs(self) -> int | None:
        """Number of per-pair masks, or None for one mask shared by every pair."""
        return self._mask.shape[0] if self._mask.dim() == 3 else None

    def mask_for(self, h: int, w: int, device: torch.device, n_pairs: int, layer: str) -> FasaMask:
        """The mask on an ``h x w`` token grid, prepared for FASA (1 shared row or ``n_pairs`` rows) on ``device``.
        Resized, moved and prepared once per (grid, device), then reused by every layer and step."""
        pairs = self.mask_pairs
        if pairs is not None and pairs != n_pairs:
            raise ValueError(f"mask holds {pairs} per-pair masks but the batch at {layer} has {n_pairs} PD/FD pairs "
                             f"per guidance half (layout={self.layout!r})")
        key = (h, w, device)
        cached = self._cache.get(key)
        if cached is None:
            cached = prepare_fasa_mask(resize_mask_to_grid(self._mask, h, w).to(device=device, dtype=torch.float32))
            self._cache[key] = cached
        return cached

    # ---- steps and the current forward ------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the step counter; the next forward is step 0 of a new generation."""
        self.step = -1
        self._last_t = None
        self._direction = 0
        self.active = False
        self.latent_hw = None
        self.n_txt = None
        self.grid_error = None

    def observe_timestep(self, t: float) -> None:
        """Advance the step counter when the timestep changes. A change against the direction of the current
        run (a larger timestep after a decreasing run, as when a new denoising run starts) starts a new
        generation at step 0; repeated calls at one timestep (e.g. CFG run as two calls) are one step."""
        last = self._last_t
        if last is None:
            self.step, self._direction = 0, 0
        elif t != last:
            direction = 1 if t > last else -1
            if self._direction in (0, direction):
                self.step += 1
                self._direction = direction
            else:
                self.step, self._direction = 0, 0
        self._last_t = t

    def begin_forward(self, t: float) -> bool:
        """Called by the model's pre-hook: count the step, decide whether FASA runs in this forward, and
        clear the grid of the previous forward (the hook sets the new one). Returns whether FASA is active."""
        self.observe_timestep(t)
        self.active = self.enabled and (self.steps is None or self.step in self.steps)
        self.latent_hw = None
        self.n_txt = None
        self.grid_error = None
        return self.active

    # ---- per-layer queries ------------------------------------------------------------------------------
    def unet_grid(self, n_tokens: int, layer: str) -> tuple[int, int]:
        """(h, w) of a UNet layer with ``n_tokens`` tokens: the latent grid halved (rounding up, as the
        stride-2 downsamplers do) until the token count matches. Never derived from sqrt(N)."""
        if self.latent_hw is None:
            raise ValueError(f"FASA at {layer} needs the latent size: call the UNet itself, not the layer")
        h, w = self.latent_hw
        while h * w > n_tokens:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        if h * w != n_tokens:
            raise ValueError(f"FASA at {layer}: {n_tokens} tokens do not match any downsampling of the "
                             f"{self.latent_hw[0]}x{self.latent_hw[1]} latent")
        return h, w

    def flux_grid(self, n_img: int, layer: str) -> tuple[int, int]:
        if self.grid_error is not None:
            raise ValueError(f"FASA at {layer}: {self.grid_error}")
        if self.latent_hw is None:
            raise ValueError(f"FASA at {layer} needs img_ids: call the transformer itself, not the layer")
        h, w = self.latent_hw
        if h * w != n_img:
            raise ValueError(f"FASA at {layer}: {n_img} image tokens but img_ids describe a {h}x{w} grid")
        return h, w

    def plan(self, batch: int, layer: str) -> list[tuple[int, int, bool]]:
        """``(start, n, is_uncond)`` per guidance half: rows ``start..start+n-1`` are PD_1..PD_n and the next
        n rows their FD partners."""
        if self.layout == "cfg":
            if batch % 4:
                raise ValueError(f"layout='cfg' needs each guidance half to be [PD_1..PD_n, FD_1..FD_n] (a batch that "
                                 f"is a multiple of 4), got batch {batch} at {layer}; use layout='plain' without CFG")
            n = batch // 4
            return [(0, n, True), (2 * n, n, False)]
        if batch % 2:
            raise ValueError(f"layout='plain' needs the batch to be [PD_1..PD_n, FD_1..FD_n] (an even batch), "
                             f"got batch {batch} at {layer}")
        return [(0, batch // 2, False)]
