"""FD key/value reuse: pass 1 records the FD keys/values FASA will read, pass 2 runs the PD rows alone.

Pass 2's FD branch replays pass 1 (same latents, FD conditioning and scheduler; FASA never changes FD rows),
so :class:`FdRecord` keeps, per FASA layer and FASA step, the FD image keys/values of the guidance halves
whose PD rows get FASA (with ``style_fidelity=1`` the unconditional PD rows keep plain attention: only the
conditional half is kept), in the model's dtype. Once the mask is known (after pass 1) :meth:`FdRecord.compact`
keeps only the live keys of each token grid (the prepared mask's packed list ``fd_index[:, :nnz]``); the
mask FASA then reads is the packed values ``fd_value[:, :nnz]`` over those packed keys (every entry > 0
except padding of per-pair rows with fewer live keys, which is 0 = excluded): the same math in "bias" mode.
"scale" mode excludes no key, so there the record keeps every key and the full mask.

FLUX (``n_txt > 0``): FD text keys are never attended, so they are never recorded; the op wants ``k_f`` to
hold the text prefix, so :meth:`FdRecord.get` puts ``n_txt`` zero rows in front (never read by the kernel,
excluded by the torch backend).

The record is an explicit object owned by :class:`.freecure.FreeCure` and handed to the FASA controller of
one pass (``controller.fd_record`` / ``controller.fd_role``); nothing global.

A ``torch.compile``'d model keeps FD reuse with no graph break and no recompilation from step to step: the
step-keyed bookkeeping stays in eager Python around the compiled call. In pass 1 the traced processors only
hand their FD keys/values to :meth:`FdRecord.stash` (graph outputs to dynamo), and the compiled wrapper's
eager forward hook files them under the step with :meth:`FdRecord.flush`. In pass 2 the wrapper's eager
pre-hook puts this forward's entries in place with :meth:`FdRecord.stage` (checking batch, grid and
entries, as the eager path does at each layer), and the traced processors read them with
:meth:`FdRecord.staged`: the same shapes every step, so the compiled code guards on nothing that changes.
"""
from __future__ import annotations

import os

import torch

from freecure_ops.fasa_mask import FasaMask, pack_checked_mask, prepare_fasa_mask
from freecure_ops.masks import resize_mask_to_grid

__all__ = ["FdRecord", "FD_REUSE_CHOICES", "estimate_record_bytes", "choose_placement"]

FD_REUSE_CHOICES = ("auto", "device", "host", "off")


class FdRecord:
    """FD keys/values by ``(layer, step, uncond, call)``: ``[n, H, Nimg, D]`` each (image tokens only). ``call``
    counts the model calls of one step that reach the layer (FLUX's true CFG runs the transformer twice a
    step, positive then negative prompt): pass 2 makes its calls in the order pass 1 did, so the i-th call
    of a step reads what the i-th call recorded.

    ``placement``: "device" (kept on ``device``) or "host" (CPU; pinned when ``device`` is CUDA: pass 2 copies
    each entry back on a side stream one use ahead, in the order pass 1 recorded them, so the copy overlaps
    the attention before it). ``halves``: which guidance halves are recorded, a tuple of ``uncond`` flags."""

    def __init__(self, placement: str, device: torch.device, halves=(False,)):
        if placement not in ("device", "host"):
            raise ValueError(f"placement must be 'device' or 'host', got {placement!r}")
        self.placement = placement
        self.device = torch.device(device)
        self.halves = tuple(halves)
        self.entries: dict = {}   # (layer, step, uncond, call) -> [k, v, (h, w)]
        self.rows = None          # images per guidance half (the n of [PD_1..PD_n])
        self.heads: dict = {}     # layer -> (heads, head_dim) recorded there
        self.dtype = None
        self.timesteps = None     # pass 1's schedule (CPU float64), which pass 2 must run again
        self.scheduler = None     # pass 1's scheduler: (class name, public config), which pass 2 must run again
        self.mask_max = None      # the largest value of the mask (after pass 1): bounds omega * m in pass 2
        self.released = False     # clear() ran: nothing is left to read
        self._calls: dict = {}    # (layer, step, uncond) -> calls seen in the current pass
        self.masks: dict = {}     # (h, w) -> FasaMask over the kept keys, on ``device``
        self.compacted = False
        self._pin = placement == "host" and self.device.type == "cuda"
        self._order: dict = {}       # key -> the key recorded after it (pass 2 reads them in the same order)
        self._last = None
        self._inflight: dict = {}    # key -> (k, v, event): host-to-device copies started ahead of use
        self._copy_stream = None
        self.latent_hw = None        # the grid the model was called with in pass 1 (UNet latent / FLUX tokens)
        self._stash: dict = {}       # (layer, uncond) -> (k, v, grid) of the compiled forward in flight (pass 1)
        self._staged: dict | None = None  # (layer, uncond) -> (k, v, mask) of the compiled forward in flight
                                          # (pass 2), None between forwards

    # ---- pass 1 ----------------------------------------------------------------------------------------
    def _store(self, t: torch.Tensor) -> torch.Tensor:
        if self.placement == "device":
            return t.contiguous().clone() if t.is_contiguous() else t.contiguous()
        out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self._pin)
        out.copy_(t, non_blocking=self._pin)
        return out

    def _key(self, layer: str, step: int, uncond: bool) -> tuple:
        base = (layer, step, uncond)
        call = self._calls.get(base, 0)
        self._calls[base] = call + 1
        return base + (call,)

    def begin_generation(self, scheduler, replay: bool) -> None:
        """The denoising loop of a pass starts (its scheduler's ``set_timesteps`` just ran). Pass 1 keeps the
        scheduler and its schedule; pass 2 must run the same ones (a step of pass 2 reads what the same step of
        pass 1 recorded: the same timesteps under another sampler, or another config of it, are another
        trajectory) and counts its model calls afresh, so one record serves any number of pass-2 runs."""
        self._check_live()
        self.unstage()  # a compiled forward that raised left its entries staged: never read by a new loop
        timesteps = torch.as_tensor(scheduler.timesteps).detach().to("cpu", torch.float64)
        kind = scheduler_identity(scheduler)
        if not replay:
            self.timesteps, self.scheduler = timesteps, kind
            return
        self._calls = {}
        if self.scheduler is not None and kind != self.scheduler:
            (name, config), (rec_name, rec_config) = kind, self.scheduler
            if name != rec_name:
                raise ValueError(f"FD reuse: the foundation pass was recorded with {rec_name}, pass 2 runs {name}: "
                                 "the same timesteps under another sampler are another trajectory; give pass 2 the "
                                 f"foundation pipeline's scheduler ({rec_name}.from_config(...))")
            diff = ", ".join(f"{k}: {rec_config.get(k)!r} -> {config.get(k)!r}" for k in sorted(set(config) |
                             set(rec_config)) if config.get(k) != rec_config.get(k))
            raise ValueError(f"FD reuse: pass 2's {name} scheduler config differs from the foundation pass's ({diff}): "
                             "give pass 2 the foundation pipeline's scheduler config")
        if self.timesteps is None:
            return
        if timesteps.shape != self.timesteps.shape:
            raise ValueError(f"FD reuse: pass 2 runs {timesteps.numel()} denoising-loop iterations but the foundation "
                             f"pass ran {self.timesteps.numel()}: give both the same num_inference_steps (or "
                             "timesteps/sigmas)")
        if not torch.equal(timesteps, self.timesteps):
            i = int((timesteps != self.timesteps).nonzero()[0])
            raise ValueError(f"FD reuse: pass 2's timesteps differ from the foundation pass's (iteration {i}: "
                             f"{timesteps[i].item():g} vs {self.timesteps[i].item():g}): give both the same "
                             "num_inference_steps, timesteps or sigmas")

    def begin_loop(self, replay: bool) -> None:
        """A denoising loop FASA does not see starts (``handle.at_step`` went back): pass 2 counts its model calls
        afresh. No schedule to keep or check: the caller's loop owns it."""
        self._check_live()
        self.unstage()
        if replay:
            self._calls = {}

    def _check_live(self) -> None:
        if self.released:
            raise ValueError("FD reuse: this foundation was released (Foundation.release()) while it was applied to a "
                             "pipeline, so its recorded keys/values are gone: release it after the runs that use it "
                             "(after handle.remove() or the end of the `with found.apply(...)` block)")

    def put(self, layer: str, step: int, uncond: bool, k: torch.Tensor, v: torch.Tensor, grid) -> None:
        """Record the FD image keys/values ``[n, H, Nimg, D]`` of one guidance half."""
        self.rows = k.shape[0]
        self.heads[layer] = (k.shape[1], k.shape[3])
        self.dtype = k.dtype
        key = self._key(layer, step, uncond)
        if key not in self.entries and self._last is not None:
            self._order[self._last] = key
        self._last = key
        self.entries[key] = [self._store(k), self._store(v), tuple(grid)]

    def stash(self, layer: str, uncond: bool, k: torch.Tensor, v: torch.Tensor, grid) -> None:
        """Pass 1 in a compiled forward: keep this layer's FD keys/values until :meth:`flush` (no step index and
        no copy inside the compiled code; dynamo makes them outputs of the graph)."""
        self._stash[(layer, uncond)] = (k, v, tuple(grid))

    def flush(self, step: int, latent_hw) -> None:
        """After a compiled forward of pass 1 (eager): file what its layers stashed under ``step``."""
        stash, self._stash = self._stash, {}
        if stash:
            self.note_grid(latent_hw)
        for (layer, uncond), (k, v, grid) in stash.items():
            self.put(layer, step, uncond, k, v, grid)

    def note_grid(self, latent_hw) -> None:
        if latent_hw is not None:
            self.latent_hw = tuple(latent_hw)

    # ---- after pass 1 -----------------------------------------------------------------------------------
    def compact(self, mask: torch.Tensor, mode: str = "bias", max_value: float | None = None) -> None:
        """Keep only the live keys of ``mask`` (``[h, w]`` or ``[n, h, w]``, float32, checked; ``max_value`` its
        largest value, from the check) per token grid. One host sync per grid (the live-key count)."""
        self.mask_max = max_value
        if self._pin:
            torch.cuda.current_stream(self.device).synchronize()  # pass 1's asynchronous copies have landed
        store_dev = self.device if self.placement == "device" else torch.device("cpu")
        plans = {}
        for grid in {e[2] for e in self.entries.values()}:
            m = pack_checked_mask(resize_mask_to_grid(mask, *grid).to(device=store_dev, dtype=torch.float32))
            if mode != "bias":
                plans[grid] = None
                self.masks[grid] = pack_checked_mask(m.rows.to(self.device), max_value)
                continue
            nnz = max(int(m.fd_count.max()), 1)  # an empty mask keeps one excluded key (value 0)
            idx = m.fd_index[:, :nnz].long()
            plans[grid] = idx
            self.masks[grid] = prepare_fasa_mask(m.fd_value[:, :nnz].contiguous().to(self.device))
        for key, (k, v, grid) in list(self.entries.items()):
            idx = plans[grid]
            if idx is None:
                continue
            self.entries[key] = [self._gather(k, idx), self._gather(v, idx), grid]
        self.compacted = True
        self._calls = {}  # pass 1 is over: pass 2 counts its calls afresh

    def _gather(self, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if idx.shape[0] == 1:
            out = t.index_select(2, idx[0])
        else:
            if idx.shape[0] != t.shape[0]:
                raise ValueError(f"the mask holds {idx.shape[0]} per-pair masks for {t.shape[0]} recorded rows")
            out = torch.stack([t[i].index_select(1, idx[i]) for i in range(t.shape[0])])
        return out.pin_memory() if self._pin else out

    # ---- pass 2 -----------------------------------------------------------------------------------------
    def replay_plan(self, batch: int, layer: str, layout: str, uncond: bool = False) -> list[tuple[int, int, bool]]:
        """``(start, n, is_uncond)`` per guidance half of a pass-2 batch of PD rows laid out as ``layout``
        ("plain": the record's n images, unconditional ones when ``uncond``; "cfg": ``[uncond_1..n,
        cond_1..n]``)."""
        n = self.rows
        if n is None:
            raise ValueError(f"FD reuse at {layer}: the foundation pass recorded nothing (no FASA layer ran in it)")
        if layout == "cfg" and batch == 2 * n:
            return [(0, n, True), (n, n, False)]
        if layout == "plain" and batch == n:
            return [(0, n, uncond)]
        how = ("batches classifier-free guidance in this call: 2 rows per image" if layout == "cfg" else
               "runs without classifier-free guidance in this call: 1 row per image")
        images = batch / 2 if layout == "cfg" else batch
        raise ValueError(f"FD reuse at {layer}: pass 2's batch holds {batch} rows (the pipeline {how}, so "
                         f"{images:g} image(s)) but the foundation pass recorded {n} image(s): run pass 2 with {n} "
                         f"prompt(s) and num_images_per_prompt=1")

    def get(self, layer: str, step: int, uncond: bool, n_txt: int, device, grid=None) -> tuple[torch.Tensor,
                                                                                                torch.Tensor, FasaMask]:
        """``(k_f, v_f, mask)`` for ``fasa_attention`` at one layer, step and guidance half, on ``device``.
        ``grid``: the layer's token grid in pass 2, which must be the recorded one."""
        self._check_live()
        key = self._key(layer, step, uncond)
        try:
            k, v, recorded = self.entries[key]
        except KeyError:
            half = "unconditional" if uncond else "conditional"
            if not any(e[0] == layer and e[1] == step and e[2] == uncond for e in self.entries):
                why = ("the foundation pass did not record this guidance half (it ran without classifier-free "
                       "guidance, or with style_fidelity=1): give pass 2 the same guidance" if uncond not in
                       self.halves else "pass 2 runs FASA at a layer or step the foundation pass did not record")
            else:
                why = (f"pass 2 calls the model {key[3] + 1} times in this step, the foundation pass fewer (FLUX "
                       "true CFG: give both passes the same negative prompt and true_cfg_scale)")
            raise ValueError(f"FD reuse: nothing recorded for {layer}, step {step}, call {key[3]} ({half} half): "
                             f"{why}") from None
        if grid is not None and tuple(grid) != recorded:
            raise ValueError(f"FD reuse at {layer}: pass 2 runs a {grid[0]}x{grid[1]} token grid but the foundation "
                             f"pass recorded {recorded[0]}x{recorded[1]}: give both the same height and width")
        grid = recorded
        device = torch.device(device)
        if self._pin and device.type == "cuda":
            k, v = self._fetch(key, device)
        elif k.device != device:
            k, v = k.to(device, non_blocking=True), v.to(device, non_blocking=True)
        if n_txt:
            pad = k.new_zeros(k.shape[0], k.shape[1], n_txt, k.shape[3])
            k, v = torch.cat([pad, k], dim=2), torch.cat([pad, v], dim=2)
        return k, v, self.masks[grid]

    def stage(self, step: int, batch: int, layout: str, uncond: bool, latent_hw, n_txt: int, device,
              style_fidelity: float) -> None:
        """Before a compiled forward of pass 2 (eager): put the entries this forward's FASA layers read in place
        for :meth:`staged`, after the checks the eager path makes at each layer (batch, grid, what was recorded).
        With ``style_fidelity`` 1 the unconditional rows keep plain attention and read nothing."""
        self._staged = None
        if self.latent_hw is not None and latent_hw is not None and tuple(latent_hw) != self.latent_hw:
            (h, w), (rh, rw) = latent_hw, self.latent_hw
            raise ValueError(f"FD reuse: pass 2 runs the model on a {h}x{w} grid but the foundation pass ran "
                             f"{rh}x{rw}: give both the same height and width")
        layers = list(self.heads)
        plan = self.replay_plan(batch, layers[0] if layers else "the model", layout, uncond)
        staged = {}
        for layer in layers:
            for _, _, uncond in plan:
                if uncond and style_fidelity == 1.0:
                    continue
                staged[(layer, uncond)] = self.get(layer, step, uncond, n_txt, device)
        self._staged = staged

    @property
    def is_staged(self) -> bool:
        """Whether a compiled forward's entries are in place (between :meth:`stage` and :meth:`unstage`)."""
        return self._staged is not None

    def staged(self, layer: str, uncond: bool) -> tuple[torch.Tensor, torch.Tensor, FasaMask]:
        """In a compiled forward of pass 2: ``(k_f, v_f, mask)`` that :meth:`stage` put in place for this layer."""
        return self._staged[(layer, uncond)]

    def unstage(self) -> None:
        """After a compiled forward of pass 2 (eager): drop what :meth:`stage` put in place (FLUX's padded and
        host placement's device copies would otherwise stay alive until the next forward or release())."""
        self._staged = None

    def _start_copy(self, key, device) -> None:
        """Copy one pinned entry to ``device`` on a side stream (overlapping the attention in flight)."""
        if key is None or key in self._inflight or key not in self.entries:
            return
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device)
        k, v, _ = self.entries[key]
        with torch.cuda.stream(self._copy_stream):
            kd, vd = k.to(device, non_blocking=True), v.to(device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        self._inflight[key] = (kd, vd, event)

    def _fetch(self, key, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Host placement on CUDA: this entry's device copy (started one use ahead, or now), and the next
        entry's copy started on the side stream."""
        self._start_copy(key, device)
        kd, vd, event = self._inflight.pop(key)
        stream = torch.cuda.current_stream(device)
        stream.wait_event(event)
        kd.record_stream(stream)  # allocated on the side stream, used (and freed) on this one
        vd.record_stream(stream)
        self._start_copy(self._order.get(key), device)
        return kd, vd

    # ---- bookkeeping ------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for k, v, _ in self.entries.values() for t in (k, v))

    def clear(self) -> None:
        self.released = True
        self.entries = {}
        self._calls = {}
        self.masks = {}
        self._inflight = {}
        self._order = {}
        self._last = None
        self._stash = {}
        self._staged = None

    def __len__(self) -> int:
        return len(self.entries)


def scheduler_identity(scheduler) -> tuple[str, dict]:
    """(class name, public config) of a diffusers scheduler: what fixes its trajectory besides the timesteps
    (the sampler and its settings, e.g. ``clip_sample``, ``prediction_type``, the betas). Keys starting with
    "_" (diffusers' bookkeeping: version, which values were defaults) are left out."""
    config = getattr(scheduler, "config", None) or {}
    return type(scheduler).__name__, {k: v for k, v in dict(config).items() if not k.startswith("_")}


# ----------------------------------------------------------------------------------------------------------
# size estimate and placement
# ----------------------------------------------------------------------------------------------------------

def _unet_tokens(name: str, latent_hw, n_stages: int) -> int:
    """Token count of a UNet attn1 from its module name: down_blocks.i at latent / 2^i, mid at the lowest
    resolution, up_blocks.i at latent / 2^(stages - 1 - i) (stride-2 resampling, rounding up)."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        level = int(parts[1])
    elif parts[0] == "up_blocks":
        level = n_stages - 1 - int(parts[1])
    else:
        level = n_stages - 1
    h, w = latent_hw
    for _ in range(level):
        h, w = -(-h // 2), -(-w // 2)
    return h * w


def estimate_record_bytes(blocks, family: str, latent_hw, n_stages: int, n_steps: int, n_images: int,
                          n_halves: int, itemsize: int) -> int:
    """layers x steps x tokens x channels x 2 (K and V) x bytes, for ``n_images`` x ``n_halves`` rows: the
    recording's size before compaction (its peak, during pass 1). FLUX: image tokens only."""
    total = 0
    for b in blocks:
        channels = int(b.attn.inner_dim)
        tokens = latent_hw[0] * latent_hw[1] if family == "flux" else _unet_tokens(b.name, latent_hw, n_stages)
        total += tokens * channels
    return total * 2 * itemsize * n_steps * n_images * n_halves


def _host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 0


def default_budgets(device: torch.device) -> tuple[int, int]:
    """(device budget, host budget) in bytes: half the free GPU memory (CUDA) or a quarter of the host memory
    (CPU models), and half the host memory for pinned host placement."""
    host = _host_memory()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2, host // 2
    return host // 4, host // 2


def choose_placement(requested: str, estimate: int, device: torch.device, device_budget: int | None = None,
                     host_budget: int | None = None) -> str:
    """"device" / "host" / "off" for ``requested`` in :data:`FD_REUSE_CHOICES`. "auto": the device when the
    estimate fits its budget, else pinned host memory when the model is on a GPU and it fits there, else off
    (recompute the FD rows in pass 2). An explicit "device"/"host" is taken as asked."""
    if requested != "auto":
        return requested
    dev_default, host_default = default_budgets(device)
    device_budget = dev_default if device_budget is None else device_budget
    host_budget = host_default if host_budget is None else host_budget
    if estimate <= device_budget:
        return "device"
    if device.type == "cuda" and estimate <= host_budget:
        return "host"
    return "off"
