"""``install_fasa`` and the handle that turns FASA on/off, swaps the mask and removes it again."""
from __future__ import annotations

import inspect
import sys
import warnings
import weakref

import torch

from . import diffusers_helpers
from .controller import FasaController
from .discovery import compiled_wrapper, find_self_attention_blocks, resolve_model
from .hooks import eager_post_hook, eager_pre_hook, flux_pre_hook, unet_pre_hook
from .options import (BACKENDS, LAYOUTS, MODES, check_bool, check_choice, check_grid, check_layers, check_mask,
                      check_omega_times_mask, check_real, check_steps)
from .presets import PRESETS, preset_blocks
from .unet_processor import FasaAttnProcessor

_MARK = "_freecure_fasa_handle"


def fasa_processor_types() -> tuple:
    """The FASA processor classes (the FLUX one only once its module was imported: none exists before)."""
    flux = sys.modules.get(f"{__package__}.flux_processor")
    return (FasaAttnProcessor,) if flux is None else (FasaAttnProcessor, flux.FasaFluxAttnProcessor)


def _flux_attn_processor_type():
    try:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
    except ImportError:  # older diffusers: no FLUX processor of this name
        return None
    return FluxAttnProcessor


def _stock_processor_kind(proc, block_kind: str) -> str | None:
    """For a block of ``block_kind`` ("unet", "flux_double", "flux_single"): "sdpa" / "fused" / "legacy" for
    diffusers' own plain self-attention processor of that model (UNet: ``AttnProcessor2_0`` /
    ``FusedAttnProcessor2_0`` / ``AttnProcessor``; FLUX: ``FluxAttnProcessor``, "sdpa"), None for anything else
    (a UNet processor on a FLUX layer, or the reverse, is custom: FASA does not reproduce it)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0

    kind = type(proc)
    if block_kind != "unet":
        return "sdpa" if kind is _flux_attn_processor_type() and kind is not None else None
    if kind is AttnProcessor2_0:
        return "sdpa"
    if kind is FusedAttnProcessor2_0:
        return "fused"
    if kind is AttnProcessor:
        return "legacy"
    return None


def _pipeline_cfg_reader(pipe):
    """A callable telling whether ``pipe`` batches classifier-free guidance in its running call (diffusers'
    ``do_classifier_free_guidance`` property, set from ``guidance_scale`` at the start of each call), or None
    when the pipeline has no such property."""
    if not isinstance(getattr(type(pipe), "do_classifier_free_guidance", None), property):
        return None
    ref = weakref.ref(pipe)
    return lambda: ref().do_classifier_free_guidance


def _scheduler_reader(model, scheduler):
    """A callable giving the scheduler whose loop counts the steps: ``scheduler`` when given, else the
    pipeline's current ``.scheduler`` (read per forward); None when there is neither."""
    if scheduler is not None:
        if not (callable(getattr(scheduler, "step", None)) and callable(getattr(scheduler, "set_timesteps", None))):
            raise TypeError("scheduler must be a diffusers scheduler (with set_timesteps() and step()), got "
                            f"{type(scheduler).__name__}")
        return lambda: scheduler
    if isinstance(model, torch.nn.Module) or getattr(model, "scheduler", None) is None:
        return None
    ref = weakref.ref(model)
    return lambda: getattr(ref(), "scheduler", None)


def _pipeline_ref(model):
    """A weak reference to ``model`` when it is a diffusers pipeline (whose own calls FASA then follows), else
    None (a bare model, or a pipeline-like object holding one)."""
    from diffusers import DiffusionPipeline

    return weakref.ref(model) if isinstance(model, DiffusionPipeline) else None


def model_device(module: torch.nn.Module) -> torch.device:
    """Where the mask copy is kept: the model's device, or the CPU for a model whose weights are offloaded
    (accelerate's sequential offload leaves them on "meta" between forwards; each grid's mask is moved to the
    forward's device when it is prepared)."""
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


class FasaHandle:
    """What :func:`install_fasa` returns. ``remove()`` restores the original processor objects and drops the
    hook; ``enabled`` switches FASA off (stock behaviour) and on; ``set_mask`` swaps the attribute mask;
    ``reset()`` restarts the step counter. Usable as a context manager (removes on exit)."""

    def __init__(self, model, family: str, controller: FasaController, installed, hooks, patches=()):
        self.model = model
        self.family = family
        self.controller = controller
        self._installed = installed  # [[block, original processor, FASA processor]]
        self._hooks = list(hooks)
        self._patches = list(patches)
        self._dropped = []           # layer names whose FASA processor diffusers replaced (warned at the time)
        # every FASA processor of ours -> the stock processor it stands in for (restored by remove())
        self._stands_for = {ours: original for _, original, ours in installed}
        self.removed = False

    @property
    def layers(self) -> tuple[int, ...]:
        """Block indices (execution order) that carry FASA."""
        return tuple(block.index for block, _, _ in self._installed)

    def add_patches(self, patches) -> None:
        self._patches.extend(patches)

    def reclaim(self, source: str) -> None:
        """After diffusers set processors (``set_attn_processor``, ``set_default_attn_processor``,
        ``fuse_qkv_projections``, IP-Adapter loading): put FASA back on its layers where the new processor is
        a re-created FASA processor or one of diffusers' stock self-attention processors (FASA keeps working;
        ``remove()`` then restores the new stock processor), and warn at once, naming the layers, where it is
        anything else (FASA no longer runs there)."""
        dropped, kinds = [], set()
        for entry in self._installed:
            block, _, ours = entry
            current = block.attn.processor
            if current is ours:
                continue
            if isinstance(current, fasa_processor_types()):
                if current in self._stands_for:  # one of ours set back, e.g. unfuse_qkv_projections restoring
                    entry[1], entry[2] = self._stands_for[current], current  # the processors from before fusing
                else:  # a FASA processor diffusers re-created
                    block.attn.set_processor(ours)
                continue
            kind = _stock_processor_kind(current, block.kind)
            if kind is not None:
                if isinstance(ours, FasaAttnProcessor) and ours.kind != kind:
                    # a new object for the new kind (fused / not): the old one may be set back later and must
                    # keep its kind
                    ours = entry[2] = FasaAttnProcessor(self.controller, block.name, kind=kind)
                for attr in ("_attention_backend", "_parallel_config"):
                    if hasattr(type(ours), attr):
                        setattr(ours, attr, getattr(current, attr, None))
                entry[1] = current
                self._stands_for[ours] = current
                block.attn.set_processor(ours)
            else:
                dropped.append(entry)
                kinds.add(type(current).__name__)
        if dropped:
            self._installed = [e for e in self._installed if all(e is not d for d in dropped)]
            self._dropped += [block.name for block, _, _ in dropped]
            names = ", ".join(block.name for block, _, _ in dropped[:3]) + (", ..." if len(dropped) > 3 else "")
            warnings.warn(f"{source} put {'/'.join(sorted(kinds))} on {len(dropped)} FASA self-attention layer(s) "
                          f"({names}): FASA no longer runs there", stacklevel=3)

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(block.name for block, _, _ in self._installed)

    @property
    def omega(self) -> float:
        return self.controller.omega

    @property
    def step(self) -> int:
        """Index of the denoising-loop iteration of the latest forward (the index the pipeline's step callback
        gets): the number of ``scheduler.step()`` calls since the loop's ``set_timesteps``. -1 before the first
        forward, and always when no scheduler is known (bare model without ``scheduler=``)."""
        return self.controller.step

    @property
    def enabled(self) -> bool:
        return self.controller.enabled

    @enabled.setter
    def enabled(self, value) -> None:
        self.controller.enabled = check_bool("enabled", value)

    def set_mask(self, mask) -> None:
        """Replace the attribute mask (``[h, w]`` or ``[n, h, w]``) with a copy of ``mask``: later in-place
        edits of the caller's tensor are not seen (call ``set_mask`` again). Resized masks are recomputed
        lazily."""
        mask, max_value = check_mask(mask)
        check_omega_times_mask(self.controller.omega, max_value)
        self.controller.set_mask(_own_copy(mask, model_device(self.model)), max_value)

    def reset(self) -> None:
        """Restart the step counter (the next forward is step 0)."""
        self.controller.reset()

    def at_step(self, step, *, uncond: bool = False) -> None:
        """For a denoising loop of your own (no diffusers scheduler: k-diffusion samplers, ComfyUI, research
        code): the model calls from now on belong to loop iteration ``step`` (0, 1, ...; what ``steps=``
        selects). Call it once per iteration, before its model calls; a second-order sampler's second call
        stays in the iteration. A step below the previous one starts a new loop. ``uncond=True`` (layout
        "plain"): the calls hold the unconditional rows of CFG run as separate calls, which ``style_fidelity``
        then blends as it does the unconditional half of a CFG batch; ``uncond=False`` the conditional ones."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        self.controller.at_step(step, check_bool("uncond", uncond))

    def remove(self) -> None:
        """Put back the processors that were there before install (the same objects; where diffusers set a stock
        processor since, that one). Idempotent."""
        if self.removed:
            return
        for patch in reversed(self._patches):
            patch.undo()
        for block, original, ours in self._installed:
            current = block.attn.processor
            if current is ours or isinstance(current, fasa_processor_types()):
                block.attn.set_processor(original)
            else:
                warnings.warn(f"{block.name}: its FASA processor was replaced after install_fasa; leaving "
                              f"{type(current).__name__} in place", stacklevel=2)
        for hook in self._hooks:
            hook.remove()
        self.controller.detach()
        if getattr(self.model, _MARK, None) is self:
            delattr(self.model, _MARK)
        self.controller.drop_masks()
        self.removed = True

    def __deepcopy__(self, memo):
        # the model's hooks and processors hold this installation's controller: a copy would drive the
        # original's state
        raise TypeError("a model carrying FASA cannot be deep-copied: copy it before install_fasa or after "
                        "handle.remove()")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def __repr__(self):
        state = "removed" if self.removed else ("enabled" if self.enabled else "disabled")
        return f"FasaHandle({self.family}, {len(self._installed)} layers, omega={self.omega}, {state})"


def _take_keywords_of(ours, original) -> None:
    """diffusers hands a ``cross_attention_kwargs`` entry only to a processor whose ``__call__`` names it and
    logs a warning per layer and call for the rest: a FASA processor forced over a custom one names the
    keywords that one took (PuLID's ``id_embedding``, ``id_scale``), which it ignores as plain self-attention
    does, so a run with them logs nothing. The names live on this instance's ``__call__`` (what diffusers
    inspects); calling the processor still runs the class's ``__call__``."""
    try:
        theirs = inspect.signature(original.__call__).parameters
    except (TypeError, ValueError):
        return
    sig = inspect.signature(ours.__call__)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n, p in theirs.items()
             if n not in sig.parameters and p.kind in kinds]
    if not extra:
        return
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    var_kw = [p for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    names = {p.name for p in extra}
    call = ours.__call__  # the class's, bound

    def named_call(*args, **kwargs):
        return call(*args, **{k: v for k, v in kwargs.items() if k not in names})
    named_call.__signature__ = sig.replace(parameters=params + extra + var_kw)
    ours.__call__ = named_call


def _own_copy(mask: torch.Tensor, device) -> torch.Tensor:
    """A float32 copy of a validated mask on ``device`` that shares no memory with the caller's tensor."""
    return mask.to(device=device, dtype=torch.float32, copy=True)


def install_fasa(model, mask, omega=None, *, layers=None, steps=None, style_fidelity=1.0, layout=None,
                 mode="bias", backend="auto", force=False, scheduler=None, grid=None) -> FasaHandle:
    """Turn a diffusers SD1.x/SD2.x/SDXL UNet or FLUX transformer (or a pipeline holding one) into a FASA model.

    ``mask``: attribute mask ``[h, w]`` (shared) or ``[n, h, w]`` (one per PD/FD pair), bool or float >= 0,
    any resolution; copied at install (later in-place edits of your tensor are not seen: use
    ``handle.set_mask``), resized per layer grid (nearest) and cached. ``omega``: None takes the family preset.
    ``layers``: None (preset), "all", or block indices in execution order. ``steps``: None (all) or the
    denoising-loop iterations where FASA runs (the index the pipeline's step callback gets; counted from the
    scheduler's ``step()`` calls, so second-order schedulers count each of their loop iterations).
    ``style_fidelity``: blend of the unconditional PD rows, ``(1 - sf) * FASA + sf * plain``.
    ``layout``: how the batch pairs PD and FD rows. "cfg": each guidance half is ``[PD_1..PD_n, FD_1..FD_n]``;
    "plain": the whole batch is. None: FLUX takes "plain" (its pipelines never batch CFG); for a UNet
    *pipeline* FASA asks the pipeline at every call whether it batches CFG (``guidance_scale > 1``) and pairs
    accordingly; a bare UNet (or an object without ``do_classifier_free_guidance``) must be told.
    ``mode``/``backend``: passed to :func:`freecure_ops.fasa_attention`. ``force``: replace unknown custom
    self-attention processors too. ``scheduler``: the scheduler whose loop counts the steps; default: the
    pipeline's (read at every forward); for ``steps=`` on a bare model pass it, or call ``handle.at_step(i)``
    from a loop without a diffusers scheduler. ``grid``: FLUX only, the
    ``(h, w)`` image-token grid (latent size / 2) for a bare transformer; a FLUX pipeline tells it by itself,
    and without either it is read from ``img_ids`` (a host sync per forward; refused under ``torch.compile``).
    Presets: see :mod:`.presets`.

    Compiled models work: ``model`` (or the pipeline's ``.unet`` / ``.transformer``) may be
    ``torch.compile(...)``'s ``OptimizedModule``; FASA goes into the model inside, and the compiled forward
    traces it with no graph break (see docs/adapters.md, "Compile and CUDA graphs").

    While installed, diffusers' helpers keep FASA: ``set_attn_processor`` / ``set_default_attn_processor`` /
    ``fuse_qkv_projections`` with stock processors and IP-Adapter loading on a UNet leave FASA on its layers
    (``remove()`` restores what they set); any other processor set on a FASA layer is warned about at once.
    IP-Adapter loading that would replace a FASA layer of a FLUX model is refused before anything changes.
    """
    denoiser, family = resolve_model(model)
    mask, mask_max = check_mask(mask)
    omega = check_real("omega", omega, allow_none=True)
    omega = PRESETS[family].omega if omega is None else omega
    check_omega_times_mask(omega, mask_max)  # what the op would refuse at the first FASA layer, refused now
    steps = check_steps(steps)
    style_fidelity = check_real("style_fidelity", style_fidelity, lo=0.0, hi=1.0)
    mode = check_choice("mode", mode, MODES)
    backend = check_choice("backend", backend, BACKENDS)
    force = check_bool("force", force)
    grid = check_grid(grid)
    if grid is not None and family != "flux":
        raise ValueError("grid= is for FLUX transformers; a UNet takes its grid from the latent it is called with")
    if layout is not None:
        layout = check_choice("layout", layout, LAYOUTS)
    blocks = find_self_attention_blocks(denoiser)
    layers = check_layers(layers, len(blocks))
    # a pipeline that says whether it batches CFG is asked at every call, also when layout= was given
    cfg_of_call = None if isinstance(model, torch.nn.Module) else _pipeline_cfg_reader(model)
    if layout is None and PRESETS[family].layout == "plain":
        layout = "plain"
    elif layout is None:
        if cfg_of_call is None:
            raise ValueError("layout=None works with a diffusers pipeline, which says per call whether it batches "
                             f"classifier-free guidance; for a bare {type(model).__name__} pass layout='cfg' (each "
                             "guidance half of the batch is [PD_1..PD_n, FD_1..FD_n]) or layout='plain' (the whole "
                             "batch is, no CFG batch)")
        layout = "auto"
    scheduler_of = _scheduler_reader(model, scheduler)  # None: a loop of your own tells steps by handle.at_step

    if getattr(denoiser, _MARK, None) is not None or any(isinstance(b.attn.processor, fasa_processor_types())
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
        kinds[b.name] = _stock_processor_kind(b.attn.processor, b.kind)
        if kinds[b.name] is None and not force:
            raise ValueError(f"self-attention layer {b.name} carries a custom processor "
                             f"{type(b.attn.processor).__name__}; FASA would replace it (and restore it on remove): "
                             "pass force=True to allow that")

    controller = FasaController(mask=_own_copy(mask, model_device(denoiser)), mask_max=mask_max, omega=omega,
                                steps=steps,
                                style_fidelity=style_fidelity, layout=layout, mode=mode, backend=backend,
                                cfg_of_call=cfg_of_call, scheduler_of=scheduler_of, grid=grid,
                                owner=_pipeline_ref(model))
    if family == "flux":
        from .flux_processor import FasaFluxAttnProcessor
    installed = []
    for b in chosen:
        original = b.attn.processor
        if b.kind == "unet":
            ours = FasaAttnProcessor(controller, b.name, kind=kinds[b.name] or "sdpa")
        else:
            ours = FasaFluxAttnProcessor(controller, b.name)
            for attr in ("_attention_backend", "_parallel_config"):
                if getattr(original, attr, None) is not None:
                    setattr(ours, attr, getattr(original, attr))
        if kinds[b.name] is None:  # forced over a custom processor
            _take_keywords_of(ours, original)
        installed.append([b, original, ours])
    hook_fn = flux_pre_hook(controller) if family == "flux" else unet_pre_hook(controller)
    hooks = [denoiser.register_forward_pre_hook(hook_fn, with_kwargs=True)]
    wrapper = compiled_wrapper(model)
    if wrapper is not None:  # torch.compile(model): the bookkeeping runs eagerly around each compiled forward
        controller.compiled_wrapper = weakref.ref(wrapper)
        hooks.append(wrapper.register_forward_pre_hook(eager_pre_hook(controller, family), with_kwargs=True))
        hooks.append(wrapper.register_forward_hook(eager_post_hook(controller, family), with_kwargs=True))
    for b, _, ours in installed:
        b.attn.set_processor(ours)
    handle = FasaHandle(denoiser, family, controller, installed, hooks)
    handle.add_patches(diffusers_helpers.follow(handle, None if isinstance(model, torch.nn.Module) else model))
    setattr(denoiser, _MARK, handle)
    return handle
