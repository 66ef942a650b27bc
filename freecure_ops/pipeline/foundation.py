"""The foundation pass as an object: what pass 1 leaves behind for FASA in any later pass 2.

    fc = FreeCure(sdxl_base, parser)                                   # settings: omega, layers, steps, ...
    found = fc.foundation("a photo of a man with red hair", seed=0, num_inference_steps=30, guidance_scale=5.0)
    image = found.run(identity_pipe, prompt=..., guidance_scale=5.0, **its_own_inputs).images[0]
    with found.apply(other_pipe, omega=2.0):                           # or install it yourself
        other_pipe(..., latents=found.latents, generator=found.generators(), num_inference_steps=30)

Pass 1 runs a foundation pipeline (any SD1.x/SDXL/FLUX pipeline, or the identity pipeline with its identity
switched off) once, recording the FD keys/values FASA reads (:class:`~freecure_ops.adapters.fd_reuse.FdRecord`,
already cut to the attribute mask's live keys), its schedule, the initial noise and the mask. Pass 2 is any
pipeline whose denoiser has the same architecture, run unchanged: its own batching, classifier-free guidance,
ControlNet residuals, IP-Adapter, LoRA or merge steps; FASA on its PD rows reads the record. What must match
is checked: the architecture when FASA is applied, the schedule when pass 2's loop starts, the token grids and
the batch at the first FASA layer; each mismatch is one ``ValueError``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from freecure_ops.adapters.discovery import find_self_attention_blocks, resolve_model
from freecure_ops.adapters.fd_reuse import FdRecord
from freecure_ops.adapters.install import FasaHandle, install_fasa, model_device
from freecure_ops.adapters.options import (LAYOUTS, check_choice, check_mask, check_omega_times_mask, check_real,
                                           check_steps)
from freecure_ops.adapters.presets import PRESETS

__all__ = ["Foundation", "FoundationRecorder", "record_foundation", "step_generators"]


class _Everything:
    """The parameters of a ``__call__(..., **kwargs)``: any name is taken."""

    def __contains__(self, name) -> bool:
        return True


def step_generators(seeds: list[int]) -> list:
    """One CPU generator per image row of a pipeline call (diffusers draws the per-step noise of row i from
    generator i; CPU generators give the same noise on every device)."""
    return [torch.Generator(device="cpu").manual_seed(s) for s in seeds]


@dataclass(eq=False)
class Foundation:
    """The record of one foundation pass (``FreeCure.foundation(...)``) and what pass 2 needs to replay it.

    ``latents``: the initial noise (``[n, ...]``, as the pipeline draws it, unscaled; packed for FLUX).
    ``step_seeds``: seeds of the per-image generators of stochastic samplers (:meth:`generators`).
    ``mask``: the attribute mask FASA uses (``[H, W]`` or ``[n, H, W]``). ``images``: the FD images.
    ``label_maps`` / ``attributes``: the parser's output and the attributes found. ``settings``: how FASA
    runs in pass 2 (omega, layers by name, steps, style_fidelity, mode, backend, force). ``fd_reuse``: the
    record's placement and sizes. ``timings``: seconds of pass 1 and of the mask."""

    family: str
    record: FdRecord
    latents: torch.Tensor
    step_seeds: list
    mask: torch.Tensor
    height: int
    width: int
    num_inference_steps: int
    settings: dict
    images: Any = None
    label_maps: torch.Tensor | None = None
    attributes: list = field(default_factory=list)
    fd_reuse: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    _released: bool = field(default=False, init=False, repr=False)

    @property
    def n_images(self) -> int:
        return int(self.latents.shape[0])

    @property
    def timesteps(self) -> torch.Tensor | None:
        """Pass 1's schedule (float64, CPU): pass 2 must run the same one."""
        return self.record.timesteps

    def nbytes(self) -> int:
        """Bytes the record holds (the masked FD keys/values)."""
        return self.record.nbytes()

    def generators(self) -> list:
        """Fresh per-image generators of the per-step noise, as pass 1 had them (one CPU generator per image)."""
        return step_generators(self.step_seeds)

    def release(self) -> None:
        """Free the recorded keys/values (the object cannot be applied afterwards)."""
        self.record.clear()
        self._released = True

    # -- pass 2 ----------------------------------------------------------------------------------------------
    def apply(self, pipe, *, omega=None, backend: str | None = None, force: bool | None = None,
              layout: str | None = None) -> FasaHandle:
        """Install FASA on ``pipe`` (a pipeline whose UNet / FLUX transformer has the foundation pipeline's
        architecture) reading this record; returns the handle (a context manager; ``remove()`` restores the
        processors). Its next runs must start from :attr:`latents` (and :meth:`generators` for stochastic
        samplers) with the foundation pass's schedule, size and images. ``omega`` may differ from pass 1's (it
        acts only in pass 2: sweep it without rerunning pass 1); ``backend`` and ``force`` (replace custom
        self-attention processors, e.g. InstantID's plain ``AttnProcessor`` copies) default to the settings
        the record was made with. ``layout``: which rows of a pass-2 batch are which, as for
        :func:`~freecure_ops.adapters.install_fasa`: None asks the pipeline at every call whether it batches
        classifier-free guidance (FLUX never does); a bare model, or an object that cannot say, must be told
        ("cfg": ``[uncond_1..n, cond_1..n]``, "plain": the n PD rows). Everything else is fixed by the record;
        ``omega * max(mask)`` beyond float32 range is refused here, before anything runs."""
        if self._released:
            raise ValueError("this Foundation was released: run the foundation pass again")
        if not self.record.heads:
            raise ValueError("the foundation pass recorded no FASA layer (its steps= selected no iteration of its "
                             "denoising loop): there is nothing to apply")
        denoiser, family = resolve_model(pipe)
        if family != self.family:
            raise ValueError(f"the foundation pass ran a {self.family} model, {type(pipe).__name__} holds a {family} "
                             "model: FASA reads keys/values of the same architecture")
        blocks = {b.name: b for b in find_self_attention_blocks(pipe)}
        layers = []
        for name, (heads, head_dim) in self.record.heads.items():
            block = blocks.get(name)
            if block is None:
                raise ValueError(f"{type(pipe).__name__} has no self-attention layer {name} (the foundation pass "
                                 "recorded there): the architectures differ")
            b_heads = int(block.attn.heads)
            b_dim = int(block.attn.inner_dim) // b_heads
            if (b_heads, b_dim) != (heads, head_dim):
                raise ValueError(f"{name}: {type(pipe).__name__} has {b_heads} heads x {b_dim}, the foundation pass "
                                 f"recorded {heads} x {head_dim}: the architectures differ")
            layers.append(block.index)
        if self.record.dtype is not None and denoiser.dtype != self.record.dtype:
            raise ValueError(f"the foundation pass ran in {self.record.dtype}, {type(pipe).__name__}'s model is in "
                             f"{denoiser.dtype}: give both pipelines the same torch_dtype")
        s = self.settings
        omega = s["omega"] if omega is None else check_real("omega", omega)
        check_omega_times_mask(PRESETS[family].omega if omega is None else omega, self.record.mask_max)
        if layout is not None:
            layout = check_choice("layout", layout, LAYOUTS)
        handle = install_fasa(pipe, torch.ones(1, 1), omega, layers=sorted(layers), steps=s["steps"],
                              style_fidelity=s["style_fidelity"], layout=layout, mode=s["mode"],
                              backend=s["backend"] if backend is None else backend,
                              force=s["force"] if force is None else force)
        handle.controller.fd_record, handle.controller.fd_role = self.record, "replay"
        return handle

    def run(self, pipe, *args, omega=None, backend: str | None = None, force: bool | None = None,
            layout: str | None = None, **kwargs):
        """Run ``pipe(*args, **kwargs)`` with FASA reading this record: the foundation's ``latents`` and per-step
        ``generator`` are passed, and ``num_inference_steps``, ``height``, ``width`` when not given. Returns
        what the pipeline returns; FASA is removed again afterwards (also when the call raises)."""
        try:
            params = inspect.signature(pipe.__call__).parameters
        except (TypeError, ValueError):
            params = {}
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            params = _Everything()  # a wrapper passing **kwargs on (e.g. to its parent class's __call__)
        if "latents" not in params:
            raise TypeError(f"{type(pipe).__name__}.__call__ takes no latents=: use foundation.apply(pipe) and start "
                            "it from the foundation's noise yourself (e.g. the same seed, drawn the same way)")
        for name in ("latents", "generator"):
            if name in kwargs:
                raise ValueError(f"run() passes the foundation's {name}: leave {name}= out, or use apply()")
        kwargs["latents"] = self.latents
        if "generator" in params:
            kwargs["generator"] = self.generators()
        for name, value in (("num_inference_steps", self.num_inference_steps), ("height", self.height),
                            ("width", self.width)):
            if name in params and kwargs.get(name) is None:
                kwargs[name] = value
        with self.apply(pipe, omega=omega, backend=backend, force=force, layout=layout):
            return pipe(*args, **kwargs)

    def __repr__(self):
        return (f"Foundation({self.family}, {self.n_images} image(s), {self.height}x{self.width}, "
                f"{self.num_inference_steps} steps, {len(self.record.heads)} FASA layers, "
                f"{self.nbytes() / 2 ** 20:.1f} MiB {self.record.placement})")


def record_foundation(model, *, layout: str, omega=None, layers=None, steps=None, style_fidelity=1.0, mode="bias",
                      backend="auto", force=False, placement: str = "device") -> "FoundationRecorder":
    """Pass 1 from a denoising loop of your own (k-diffusion samplers, ComfyUI, research code: anything that
    calls the UNet / FLUX transformer itself, with no diffusers scheduler for FASA to count). ``model``: the
    denoiser (or a pipeline holding it); ``layout``: how your calls batch their FD rows ("cfg": ``[uncond_1..n,
    cond_1..n]``, "plain": n rows per call, see ``at_step(uncond=)``); the FASA settings as for
    :class:`~.freecure.FreeCure` (they are the settings of pass 2); ``placement``: where the record is kept
    ("device" or "host"). Drive your loop inside ``with`` and say each iteration's index::

        with record_foundation(unet, layout="cfg") as rec:
            for i, sigma in enumerate(sigmas[:-1]):
                rec.at_step(i)
                x = sampler_step(x, sigma, ...)          # calls unet(...) on the FD rows
        found = rec.finish(mask, latents=x_T)            # the mask from your parser on the FD images

    Then ``with found.apply(unet, layout=...) as h:`` runs pass 2 in the same loop (``h.at_step(i)``) on the PD
    rows, from the same noise, schedule and model calls."""
    return FoundationRecorder(model, layout=layout, omega=omega, layers=layers, steps=steps,
                              style_fidelity=style_fidelity, mode=mode, backend=backend, force=force,
                              placement=placement)


class FoundationRecorder:
    """What :func:`record_foundation` returns: installed on the model until :meth:`finish` (or the end of its
    ``with`` block, or :meth:`remove`)."""

    def __init__(self, model, *, layout, omega, layers, steps, style_fidelity, mode, backend, force, placement):
        layout = check_choice("layout", layout, LAYOUTS)
        placement = check_choice("placement", placement, ("device", "host"))
        style_fidelity = check_real("style_fidelity", style_fidelity, lo=0.0, hi=1.0)
        denoiser, self.family = resolve_model(model)
        device = model_device(denoiser)
        # the unconditional half is read in pass 2 only where style_fidelity blends FASA into it
        halves = (False,) if style_fidelity == 1.0 else (True, False)
        self.record = FdRecord(placement, device, halves)
        self.handle = install_fasa(model, torch.ones(1, 1), omega, layers=layers, steps=steps,
                                   style_fidelity=style_fidelity, layout=layout, mode=mode, backend=backend,
                                   force=force)
        self.handle.controller.fd_record, self.handle.controller.fd_role = self.record, "record"
        self.settings = dict(omega=omega, steps=check_steps(steps), style_fidelity=style_fidelity,
                             mode=self.handle.controller.mode, backend=self.handle.controller.backend, force=force)

    def at_step(self, step, *, uncond: bool = False) -> None:
        """As :meth:`~freecure_ops.adapters.FasaHandle.at_step`: your loop's next model calls belong to
        iteration ``step``."""
        self.handle.at_step(step, uncond=uncond)

    def remove(self) -> None:
        self.handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def finish(self, mask, *, latents: torch.Tensor, step_seeds=(), height: int | None = None,
               width: int | None = None, images=None) -> Foundation:
        """The :class:`Foundation` of the loop that ran: FASA is removed, the record is cut to the live keys of
        ``mask`` (``[H, W]`` or ``[n, H, W]``, any resolution, e.g. your parser's output on the FD images).
        ``latents``: the loop's initial noise (pass 2 must start from it); ``step_seeds``, ``height``,
        ``width``, ``images``: kept for your pass 2 (a diffusers pipeline's ``run`` passes them on)."""
        self.remove()
        if not self.record.entries:
            raise ValueError("the loop recorded nothing: no FASA layer ran (call the model inside the with block, "
                             "and rec.at_step(i) before each iteration when steps= is given)")
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be the loop's initial noise as a tensor, got {type(latents).__name__}")
        checked, max_value = check_mask(mask)
        self.record.compact(checked.to(self.record.device), self.settings["mode"], max_value)
        n_steps = 1 + max(key[1] for key in self.record.entries)
        return Foundation(family=self.family, record=self.record, latents=latents, step_seeds=list(step_seeds),
                          mask=checked, height=height, width=width, num_inference_steps=n_steps,
                          settings=self.settings, images=images)
