"""Shared FASA state of one installation: settings, step counter, grid of the current forward, mask cache.

The controller holds Python numbers and the attribute masks only (no activations), so nothing of a finished
generation stays alive through it.
"""
from __future__ import annotations

import math
import sys

import torch

from freecure_ops.fasa_mask import FasaMask, pack_checked_mask
from freecure_ops.masks import resize_mask_to_grid

from .discovery import compiled_wrapper
from .steps import SchedulerStepCounter


# Prepared masks kept per installation, one per token grid and device, least recently used dropped first: every
# grid of two image sizes of a 4-level UNet (a handle serving many sizes keeps no more than this).
MASK_GRIDS_KEPT = 8


class FasaController:
    """``layout``: "cfg" / "plain", or "auto" with ``cfg_of_call`` (a callable returning whether the pipeline
    batches classifier-free guidance in the running call). ``scheduler_of``: a callable giving the scheduler
    whose loop is counted (read at every eager forward, so a scheduler swapped on the pipeline after install is
    followed), or None when nothing tells the step (then ``step`` stays -1 and ``steps`` must be None).

    What a forward reads (``active``, ``call_layout``, the grid) is decided in eager Python, never from device
    data: by the model's pre-hook when the forward runs eagerly (:meth:`begin_forward`), and by the step
    counter's callbacks (``set_timesteps``/``step`` of the scheduler, which run outside any compiled region) for
    a forward that ``torch.compile`` traces. Compiled code therefore sees two gating states (FASA on / off)
    and guards on nothing that changes from step to step."""

    def __init__(self, *, mask: torch.Tensor, omega: float, steps, style_fidelity: float, layout: str, mode: str,
                 backend: str, cfg_of_call=None, scheduler_of=None, grid=None, owner=None, mask_max=None):
        self._owner = owner                 # weakref to the pipeline FASA was installed on (None: a bare model)
        self.omega = omega
        # omega as data for compiled forwards (see attend.omega_and_mask); fixed for this installation
        self.omega_data = torch.tensor(omega, dtype=torch.float32, device=mask.device)
        self._steps = steps                 # frozenset of step indices, or None for every step
        self.style_fidelity = style_fidelity
        self.layout = layout                # "cfg", "plain" or "auto" (asked from the pipeline per forward)
        self.mode = mode
        self.backend = backend
        self._enabled = True
        self._cfg_of_call = cfg_of_call
        self._scheduler_of = scheduler_of
        self.grid = grid                    # FLUX: (h, w) given at install, else None
        self.pipeline_grid = None           # FLUX: (h, w) the pipeline passed to _prepare_latent_image_ids
        self.counter = SchedulerStepCounter(on_change=self._on_counter)
        self.call_layout = None if layout == "auto" else layout
        self.step = -1
        self.active = False
        self.latent_hw = None
        self.n_txt = None
        self.grid_error = None
        self.layout_error = None            # why the running call's layout is unknown (see _decide)
        self.manual_step = None             # the step the caller's own loop said (at_step), None: not told
        self.call_uncond = False            # layout "plain": the calls hold unconditional rows (at_step)
        self.fd_record = None               # FD reuse (:mod:`.fd_reuse`): the record of this FreeCure call
        self.fd_role = None                 # None, "record" (pass 1, FD rows only) or "replay" (pass 2, PD rows)
        self.compiled_wrapper = None        # weakref to the OptimizedModule carrying our eager hooks, if any
        self.set_mask(mask, mask_max)
        sched = None if scheduler_of is None else scheduler_of()
        if sched is not None:
            self.counter.attach(sched)      # counted from install on: compiled forwards never attach it
        self._decide(self._next_step(), strict=False)

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = value
        self._decide(self._next_step(), strict=False)

    @property
    def steps(self):
        return self._steps

    @steps.setter
    def steps(self, value) -> None:
        self._steps = value
        self._decide(self._next_step(), strict=False)

    # ---- masks -----------------------------------------------------------------------------------------
    def set_mask(self, mask: torch.Tensor, max_value: float | None = None) -> None:
        """``mask``: validated float32 ``[h, w]`` or ``[n, h, w]``, already on the model's device; ``max_value``:
        its largest value (from the check), handed to every prepared mask so that the op checks
        ``omega * max(mask)`` in every call as it does for any prepared mask."""
        self._mask = mask
        self._mask_max = max_value
        # every live value equal (a bool or 0/c mask): the kernel's scalar-bias FD loop; one read at set time
        self._binary = max_value is not None and mask.device.type != "meta" and \
            not bool(((mask > 0) & (mask != max_value)).any())
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
        Eager forwards resize, move and prepare it once per (grid, device) and reuse it for every layer and
        step (the :data:`MASK_GRIDS_KEPT` most recently used are kept). No host sync: the values were checked
        when the mask was set. A forward that ``torch.compile`` traces prepares it inside the graph (a few cheap
        ops per layer) and leaves the cache alone, so that the compiled code guards on no cache state."""
        pairs = self.mask_pairs
        if pairs is not None and pairs != n_pairs:
            raise ValueError(f"mask holds {pairs} per-pair masks but the batch at {layer} has {n_pairs} PD/FD pairs "
                             f"per guidance half (layout={self.call_layout or self.layout!r})")
        if torch.compiler.is_compiling():
            return self._prepare(h, w, device)
        key = (h, w, device)
        cached = self._cache.pop(key, None)
        if cached is None:
            cached = self._prepare(h, w, device)
            if len(self._cache) >= MASK_GRIDS_KEPT:
                del self._cache[next(iter(self._cache))]  # the least recently used grid
        self._cache[key] = cached  # (re)inserted last: the dict's order is the recency order
        return cached

    def _prepare(self, h: int, w: int, device: torch.device) -> FasaMask:
        rows = resize_mask_to_grid(self._mask, h, w).to(device=device, dtype=torch.float32)
        # nearest resizing keeps values: max(rows) <= the mask's max, and a binary mask stays binary
        return pack_checked_mask(rows, self._mask_max, self._binary)

    # ---- steps and the current forward ------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the step counter; the next forward is step 0 of a new generation."""
        self.step = -1
        self.manual_step = None
        self.call_uncond = False
        self.counter.restart()
        self.latent_hw = None
        self.n_txt = None
        self.grid_error = None
        self._decide(self._next_step(), strict=False)

    def detach(self) -> None:
        """Stop counting (after remove): the scheduler gets its own methods back."""
        self.counter.detach()

    def at_step(self, step: int, uncond: bool) -> None:
        """A denoising loop FASA does not see (no diffusers scheduler: k-diffusion samplers, ComfyUI, research
        code) says which iteration its next model calls belong to, and, with layout "plain", whether they hold
        unconditional rows (CFG as separate calls). A step below the last one told starts a new loop (FD reuse
        then counts its calls afresh); the same step again keeps counting (a second-order sampler's second
        call, or the other guidance half)."""
        if self.layout == "cfg" and uncond:
            raise ValueError("at_step(uncond=True) is for layout='plain' (one guidance half per call); with "
                             "layout='cfg' each call holds both halves, [uncond..., cond...]")
        if self.manual_step is None or step < self.manual_step:
            if self.fd_record is not None and self.fd_role is not None:
                self.fd_record.begin_loop(replay=self.fd_role == "replay")
        self.manual_step, self.call_uncond = step, uncond
        self._decide(step, strict=False)

    def _next_step(self) -> int:
        """The step index the next forward gets as far as the counter knows (-1: no scheduler)."""
        if self.manual_step is not None:
            return self.manual_step
        return self.counter.count if self.counter.scheduler is not None else -1

    def _current_step(self) -> int:
        if self.manual_step is not None:
            return self.manual_step
        if self._scheduler_of is None:
            if self._steps is not None:
                raise ValueError(f"steps={sorted(self._steps)} needs the denoising loop's step index, and nothing "
                                 "told it: call handle.at_step(i) before each iteration's model calls (a loop "
                                 "without a diffusers scheduler), or pass the pipeline or scheduler= to "
                                 "install_fasa")
            return -1
        sched = self._scheduler_of()
        if sched is None:  # the pipeline is gone (a bare model now): no step index
            return self.step
        if sched is not self.counter.scheduler:
            # the pipeline got another scheduler since install: its set_timesteps already ran for this
            # generation, so this forward is its step 0
            self.counter.attach(sched)
        return self.counter.count

    def _layout_of_call(self) -> str:
        """"cfg" / "plain" for the running call. Where the pipeline can say whether it batches classifier-free
        guidance it is asked, also when the layout was given: a given layout it contradicts would pair the
        wrong rows, so it is refused rather than followed."""
        told = None
        if self._cfg_of_call is not None:
            try:
                told = "cfg" if bool(self._cfg_of_call()) else "plain"
            except Exception as e:  # noqa: BLE001  (a pipeline property read outside its __call__)
                if self.layout == "auto":
                    raise ValueError("layout=None: could not tell from the pipeline whether it batches "
                                     f"classifier-free guidance in this call ({type(e).__name__}: {e}); call the "
                                     "pipeline itself, or pass layout='cfg' or layout='plain' to install_fasa") from e
        if self.layout == "auto":
            return told
        if told is not None and told != self.layout:
            does = "batches classifier-free guidance" if told == "cfg" else "runs without classifier-free guidance"
            raise ValueError(f"layout={self.layout!r} was given, but the pipeline {does} in this call "
                             f"(guidance_scale {'>' if told == 'cfg' else '<='} 1), so its rows are not paired as "
                             f"{self.layout!r} says: leave layout=None (FASA then asks the pipeline at every call) "
                             "or call it with the guidance the layout describes")
        return self.layout

    def _decide(self, step: int, *, strict: bool) -> None:
        """Gate FASA for a forward at ``step`` and read the pipeline's layout (eager Python only). ``strict``:
        raise when the layout cannot be read or contradicts the pipeline (a forward), else keep the reason for
        :meth:`plan` (a callback, before a forward that may be compiled and run no eager hook)."""
        self.active = self._acts_at(step)
        self.layout_error = None
        if not self.active:
            self.call_layout = None
            return
        try:
            self.call_layout = self._layout_of_call()
        except ValueError as e:
            if strict:
                raise
            self.call_layout, self.layout_error = None, str(e)

    def _on_counter(self) -> None:
        """The scheduler's set_timesteps/step ran (outside the model): decide for the next forward, which may be
        compiled and then runs no eager hook. A count of 0 is a ``set_timesteps``: a denoising loop starts, which
        the FD record of a FreeCure pass keeps (pass 1) or checks against what it kept (pass 2)."""
        if self.counter.count == 0 and self.fd_record is not None and self.fd_role is not None:
            self._check_compiled_after_install()
            self.fd_record.begin_generation(self.counter.scheduler, replay=self.fd_role == "replay")
        self._decide(self.counter.count, strict=False)

    def _check_compiled_after_install(self) -> None:
        """FD reuse keeps its step-keyed bookkeeping in eager hooks on the compiled wrapper, which exist only
        when the model was compiled before FASA was installed: refused here, when the loop starts, instead of
        failing inside the traced forward."""
        owner = None if self._owner is None else self._owner()
        wrapper = None if owner is None else compiled_wrapper(owner)
        ours = None if self.compiled_wrapper is None else self.compiled_wrapper()
        if wrapper is not None and wrapper is not ours:
            raise ValueError("FD reuse: the model was compiled after FASA was installed, so the record's eager "
                             "bookkeeping around the compiled call is missing: compile the model first, then "
                             "run FreeCure / Foundation.apply on the pipeline holding the compiled model")

    def begin_forward(self) -> bool:
        """Called by the model's pre-hook when the forward runs eagerly: take the step index of the denoising
        loop, decide whether FASA runs in this forward, and clear the grid of the previous forward (the hook
        sets the new one). Python only: nothing is read from the device. Returns whether FASA is active."""
        self.step = self._current_step()
        if self._owner is not None:
            self._check_caller()
        self._decide(self.step, strict=True)
        self.latent_hw = None
        self.n_txt = None
        self.grid_error = None
        return self.active

    def _acts_at(self, step: int) -> bool:
        return self._enabled and (self._steps is None or step in self._steps)

    def _acts_from(self, step: int) -> bool:
        """Whether FASA runs at ``step`` or a later iteration of the running loop (as long as the scheduler's
        timesteps say; without them, any later step in ``steps``)."""
        if not self._enabled or self._steps is None:
            return self._enabled
        timesteps = getattr(self.counter.scheduler, "timesteps", None)
        end = len(timesteps) if timesteps is not None else None
        return any(s >= step and (end is None or s < end) for s in self._steps)

    def _check_caller(self) -> None:
        """FASA installed on a pipeline reads that pipeline's state (CFG pairing, scheduler steps, FLUX grid):
        a forward made by another pipeline sharing the model, or by a direct call of the model, would be paired
        and gated from stale state, so it is refused where FASA would act in it. A call of the installed
        pipeline with repeated prompts is refused at its first forward when FASA would act in any of its steps.
        Where FASA does not act (disabled, no FASA step) the rows are the stock model's: nothing is refused."""
        owner = self._owner()
        caller, local = calling_pipeline()
        if owner is not None and caller is owner:
            per_prompt = local.get("num_images_per_prompt")
            # a replay's rows are all PD: row i of the call is image i of the foundation, whatever repeats them
            if isinstance(per_prompt, int) and per_prompt > 1 and self.fd_role != "replay" and \
                    self._acts_from(self.step):
                # [p1, p1, p2, p2]: not [PD..., FD...] rows
                raise ValueError(f"num_images_per_prompt={per_prompt}: the pipeline repeats each prompt, so its rows "
                                 "are not [PD_1..PD_n, FD_1..FD_n]; pass the prompts as a list (one PD and one FD "
                                 "prompt per image) with num_images_per_prompt=1")
        if owner is None or caller is owner or not self._acts_at(self.step):
            return
        who = f"another pipeline sharing its model ({type(caller).__name__})" if caller is not None else \
            "a direct call of the model"
        raise ValueError(f"FASA was installed on a {type(owner).__name__}, and its model now runs from {who}: the "
                         "batch pairing, the steps and the FLUX grid are read from the pipeline FASA was installed "
                         "on. Install FASA on the pipeline that runs, or on the bare model (with layout=)")

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
            raise ValueError(f"FASA at {layer} needs the image grid: call the transformer itself (through a FLUX "
                             "pipeline, or with grid=(h, w) given to install_fasa), not the layer")
        h, w = self.latent_hw
        if h * w != n_img:
            raise ValueError(f"FASA at {layer}: {n_img} image tokens but the image grid is {h}x{w}")
        return h, w

    def row_layout(self, layer: str) -> str:
        """"cfg" or "plain": how the running call batches its rows (decided in eager Python, see _decide)."""
        if self.layout_error is not None:
            raise ValueError(f"FASA at {layer}: {self.layout_error}")
        return self.call_layout or self.layout

    def plan(self, batch: int, layer: str) -> list[tuple[int, int, bool]]:
        """``(start, n, is_uncond)`` per guidance half: rows ``start..start+n-1`` are PD_1..PD_n and the next
        n rows their FD partners."""
        layout = self.row_layout(layer)
        if layout == "auto":
            raise ValueError(f"FASA at {layer}: layout=None, and the pipeline has not told whether it batches "
                             "classifier-free guidance in this call; call the pipeline itself, or pass layout='cfg' "
                             "or layout='plain' to install_fasa")
        why = " (the pipeline batches CFG in this call)" if self.layout == "auto" and layout == "cfg" else \
            " (the pipeline runs without CFG in this call)" if self.layout == "auto" else ""
        if layout == "cfg":
            if batch % 4:
                raise ValueError(f"layout='cfg'{why} needs each guidance half to be [PD_1..PD_n, FD_1..FD_n] (a batch "
                                 f"that is a multiple of 4), got batch {batch} at {layer}: pass the prompts as "
                                 "[PD_1..PD_n, FD_1..FD_n] (e.g. [pd_prompt, fd_prompt]); with a bare model and no "
                                 "CFG batch use layout='plain'")
            n = batch // 4
            return [(0, n, True), (2 * n, n, False)]
        if batch % 2:
            raise ValueError(f"layout='plain'{why} needs the batch to be [PD_1..PD_n, FD_1..FD_n] (an even batch), "
                             f"got batch {batch} at {layer}: pass the prompts as [PD_1..PD_n, FD_1..FD_n] "
                             "(e.g. [pd_prompt, fd_prompt])")
        return [(0, batch // 2, self.call_uncond)]


def calling_pipeline():
    """``(pipeline, its __call__'s local variables)`` of the diffusers pipeline whose ``__call__`` is running on
    this thread (the innermost), or ``(None, {})``. Walks the Python frames (a few dozen, once per model
    forward) and looks only at ``__call__`` frames."""
    from diffusers import DiffusionPipeline

    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "__call__":
            local = frame.f_locals
            if isinstance(local.get("self"), DiffusionPipeline):
                return local["self"], local
        frame = frame.f_back
    return None, {}
