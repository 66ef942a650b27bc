"""``install_fasa`` and the handle that turns FASA on/off, swaps the mask and removes it again."""
from __future__ import annotations

import warnings

import torch

from .controller import FasaController
from .discovery import find_self_attention_blocks, resolve_model
from .flux_processor import FasaFluxAttnProcessor
from .hooks import flux_pre_hook, unet_pre_hook
from .options import (BACKENDS, LAYOUTS, MODES, check_bool, check_choice, check_layers, check_mask, check_real,
                      check_steps)
from .presets import PRESETS, preset_blocks
from .unet_processor import FasaAttnProcessor

_MARK = "_freecure_fasa_handle"
FASA_PROCESSORS = (FasaAttnProcessor, FasaFluxAttnProcessor)


def _stock_processor_kind(proc) -> str | None:
    """"plain" / "fused" for diffusers' own plain self-attention processors, None for anything else."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    kind = type(proc)
    if kind in (AttnProcessor, AttnProcessor2_0, FluxAttnProcessor):
        return "plain"
    if kind is FusedAttnProcessor2_0:
        return "fused"
    return None


def _model_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


class FasaHandle:
    """What :func:`install_fasa` returns. ``remove()`` restores the original processor objects and drops the
    hook; ``enabled`` switches FASA off (stock behaviour) and on; ``set_mask`` swaps the attribute mask;
    ``reset()`` restarts the step counter. Usable as a context manager (removes on exit)."""

    def __init__(self, model, family: str, controller: FasaController, installed, hook):
        self.model = model
        self.family = family
        self.controller = controller
        self._installed = installed  # [(block, original processor, FASA processor)]
        self._hook = hook
        self.removed = False

    @property
    def layers(self) -> tuple[int, ...]:
        """Block indices (execution order) that carry FASA."""
        return tuple(block.index for block, _, _ in self._installed)

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(block.name for block, _, _ in self._installed)

    @property
    def omega(self) -> float:
        return self.controller.omega

    @property
    def step(self) -> int:
        """Index of the current denoising step (-1 before the first forward)."""
        return self.controller.step

    @property
    def enabled(self) -> bool:
        return self.controller.enabled

    @enabled.setter
    def enabled(self, value) -> None:
        self.controller.enabled = check_bool("enabled", value)

    def set_mask(self, mask) -> None:
        """Replace the attribute mask (``[h, w]`` or ``[n, h, w]``); resized masks are recomputed lazily."""
        self.controller.set_mask(check_mask(mask).to(_model_device(self.model)))

    def reset(self) -> None:
        """Restart the step counter (the next forward is step 0)."""
        self.controller.reset()

    def remove(self) -> None:
        """Put back the processors that were there before install (the same objects). Idempotent."""
        if self.removed:
            return
        for block, original, ours in self._installed:
            if block.attn.processor is ours:
                block.attn.set_processor(original)
            else:
                warnings.warn(f"{block.name}: its FASA processor was replaced after install_fasa; leaving "
                              f"{type(block.attn.processor).__name__} in place", stacklevel=2)
        self._hook.remove()
        if getattr(self.model, _MARK, None) is self:
            delattr(self.model, _MARK)
        self.controller.drop_masks()
        self.removed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def __repr__(self):
        state = "removed" if self.removed else ("enabled" if self.enabled else "disabled")
        return f"FasaHandle({self.family}, {len(self._installed)} layers, omega={self.omega}, {state})"


def install_fasa(model, mask, omega=None, *, layers=None, steps=None, style_fidelity=1.0, layout=None,
                 mode="bias", backend="auto", force=False) -> FasaHandle:
    """Turn a diffusers SD1.x/SD2.x/SDXL UNet or FLUX transformer (or a pipeline holding one) into a FASA model.

    ``mask``: attribute mask ``[h, w]`` (shared) or ``[n, h, w]`` (one per PD/FD pair), bool or float >= 0,
    any resolution; resized per layer grid (nearest) and cached. ``omega``: None takes the family preset.
    ``layers``: None (preset), "all", or block indices in execution order. ``steps``: None (all) or the step
    indices where FASA runs. ``style_fidelity``: blend of the unconditional PD rows,
    ``(1 - sf) * FASA + sf * plain``. ``layout``: "cfg" (each guidance half is ``[PD_1..PD_n, FD_1..FD_n]``)
    or "plain" (the whole batch is); None takes the family's: "cfg" for UNets, "plain" for FLUX (no CFG batch). ``mode``/``backend``: passed to :func:`freecure_ops.fasa_attention`.
    ``force``: replace unknown custom self-attention processors too. Presets: see :mod:`.presets`.
    """
    denoiser, family = resolve_model(model)
    mask = check_mask(mask)
    omega = check_real("omega", omega, allow_none=True)
    steps = check_steps(steps)
    style_fidelity = check_real("style_fidelity", style_fidelity, lo=0.0, hi=1.0)
    layout = PRESETS[family].layout if layout is None else check_choice("layout", layout, LAYOUTS)
    mode = check_choice("mode", mode, MODES)
    backend = check_choice("backend", backend, BACKENDS)
    force = check_bool("force", force)
    blocks = find_self_attention_blocks(denoiser)
    layers = check_layers(layers, len(blocks))

    if getattr(denoiser, _MARK, None) is not None or any(isinstance(b.attn.processor, FASA_PROCESSORS)
                                                         for b in blocks):
        raise ValueError("model already carries FASA: call .remove() on the handle of the first install_fasa first")
    if layers is None:
        chosen_idx = set(preset_blocks(family, blocks))
    elif layers == "all":
        chosen_idx = {b.index for b in blocks}
    else:
        chosen_idx = set(layers)
    chosen = [b for b in blocks if b.index in chosen_idx]
    kinds = {}
    for b in chosen:
        kinds[b.name] = _stock_processor_kind(b.attn.processor)
        if kinds[b.name] is None and not force:
            raise ValueError(f"self-attention layer {b.name} carries a custom processor "
                             f"{type(b.attn.processor).__name__}; FASA would replace it (and restore it on remove): "
                             "pass force=True to allow that")

    controller = FasaController(mask=mask.to(_model_device(denoiser)),
                                omega=PRESETS[family].omega if omega is None else omega, steps=steps,
                                style_fidelity=style_fidelity, layout=layout, mode=mode, backend=backend)
    installed = []
    for b in chosen:
        original = b.attn.processor
        if b.kind == "unet":
            ours = FasaAttnProcessor(controller, b.name, fused=kinds[b.name] == "fused")
        else:
            ours = FasaFluxAttnProcessor(controller, b.name)
            for attr in ("_attention_backend", "_parallel_config"):
                if getattr(original, attr, None) is not None:
                    setattr(ours, attr, getattr(original, attr))
        installed.append((b, original, ours))
    hook_fn = flux_pre_hook(controller) if family == "flux" else unet_pre_hook(controller)
    hook = denoiser.register_forward_pre_hook(hook_fn, with_kwargs=True)
    for b, _, ours in installed:
        b.attn.set_processor(ours)
    handle = FasaHandle(denoiser, family, controller, installed, hook)
    setattr(denoiser, _MARK, handle)
    return handle
