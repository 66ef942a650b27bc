"""The FreeCure pipeline wrapper: two passes around a diffusers SD1.x/SD2.x, SDXL or FLUX pipeline.

    fc = FreeCure(pipe, parser)                         # parser: image -> label map [H, W]
    out = fc(pd={"prompt_embeds": pd_embeds, ...},      # personalized (identity) conditioning
             fd={"prompt_embeds": fd_embeds, ...},      # foundation conditioning (identity removed)
             attribute_prompt="a man with red hair", seed=0, num_inference_steps=30)
    out.images, out.fd_images, out.mask, out.timings

1. Pass 1 runs the FD branch alone from initial latents drawn once from the seed.
2. The parser turns the FD image into a label map; the attributes named in the prompt
   (:func:`freecure_ops.pipeline.attributes.find_attributes`) select its classes: the attribute mask. Or the caller
   passes ``mask=``, and pass 1 is skipped.
3. Pass 2 runs PD and FD as one batch (``[PD_1..PD_n, FD_1..FD_n]``; with CFG the pipeline makes it
   ``[neg_PD, neg_FD, PD, FD]``, layout "cfg"; FLUX-dev has no CFG batch, layout "plain") from the same initial
   latents, with FASA installed for that call only (removed again, also when the call raises).
   With FD reuse (``fd_reuse``, on by default where the record fits: :mod:`.fd_reuse`) pass 1 records the FD
   keys/values FASA reads, the record is cut to the masked keys once the mask is known, and pass 2 runs the
   PD rows alone (half the batch), FASA reading the recorded FD keys/values.
4. Optionally APG (:mod:`.apg`) on the PD latents of pass 2.

PD and FD conditioning are pipeline keyword arguments: each branch's own (``prompt``, ``prompt_embeds``,
``negative_prompt_embeds``, ``pooled_prompt_embeds``, ``ip_adapter_image_embeds``, ...) in ``pd`` / ``fd``
(``fd`` may be a function of the PD kwargs), arguments common to both as plain keyword arguments. Batching
for pass 2 (:func:`collate_branches`): tensors are concatenated along dim 0, lists of tensors element by
element, prompt strings become lists, anything else must be equal in both branches.
"""
from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .attributes import (BISENET_ATTRIBUTE_LABELS, attribute_mask, find_attributes, label_table_for,
                                     template_prompt)

from .apg import TEXT_KEYS, apg_steps, apply_apg, default_guidance_scale, pipeline_family, uses_cfg
from .foundation import Foundation, step_generators
from freecure_ops.adapters.discovery import find_self_attention_blocks, resolve_model
from freecure_ops.adapters.fd_reuse import FD_REUSE_CHOICES, FdRecord, choose_placement, estimate_record_bytes
from freecure_ops.adapters.install import install_fasa
from freecure_ops.adapters.options import (BACKENDS, MODES, check_bool, check_choice, check_layers, check_mask,
                                           check_omega_times_mask, check_real, check_steps)
from freecure_ops.adapters.presets import PRESETS, preset_blocks
from freecure_ops.adapters.steps import loop_iterations
from freecure_ops.masks import image_mask

__all__ = ["FreeCure", "FreeCureOutput", "FreeCureWarning", "EmptyMaskError", "collate_branches",
           "step_generators", "BRANCH_KEYS"]

#: keyword arguments that belong to one branch; given as common kwargs, each branch gets a copy.
BRANCH_KEYS = ("negative_prompt", "negative_prompt_2", "negative_prompt_embeds", "negative_pooled_prompt_embeds",
               "ip_adapter_image_embeds", "negative_ip_adapter_image_embeds")
_SDXL_SIZE_KEYS = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                   "negative_crops_coords_top_left", "negative_target_size")
_OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class FreeCureWarning(UserWarning):
    """FreeCure ran, but not as asked (e.g. no attribute words: the plain pipeline ran instead)."""


class EmptyMaskError(ValueError):
    """The attribute mask is empty: FASA would have no attribute to restore (in "bias" mode it would equal
    plain self-attention; in "scale" mode it would still mix in every FD key, unguided)."""


@dataclass
class FreeCureOutput:
    """``images``: the PD images (FASA, and APG when asked) in ``output_type``. ``fd_images``: the FD images
    (pass 1 when it ran, else the FD rows of pass 2; with ``output_type="latent"``, pass 1's decoded images in
    ``"pt"`` form, or pass 2's FD latents when ``mask=`` skipped pass 1). ``mask``: the attribute mask FASA
    used (``[H, W]``, or ``[n, H, W]`` for n prompts). ``label_maps``: the parser's output.
    ``attributes``: per prompt, the attributes found. ``template_prompts``: APG's template prompts, when built
    from text. ``timings``: seconds per stage (``pass1``, ``mask``, ``pass2``, ``apg``, ``total``).
    ``fasa_applied``: False when FASA was skipped (no attribute words). ``fd_reuse``: the FD key/value reuse
    of this call (``requested``, ``choice`` "device"/"host"/"off", ``estimate_bytes`` before pass 1,
    ``bytes`` held after compaction to the masked keys, ``reason`` when it is off); None when no FASA ran."""

    images: Any
    fd_images: Any = None
    mask: torch.Tensor | None = None
    label_maps: torch.Tensor | None = None
    attributes: list = field(default_factory=list)
    template_prompts: list | None = None
    timings: dict = field(default_factory=dict)
    fasa_applied: bool = True
    fd_reuse: dict | None = None


# ----------------------------------------------------------------------------------------------------------
# batching of the two branches
# ----------------------------------------------------------------------------------------------------------

def _equal(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape \
            and bool(np.array_equal(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001  (objects whose == is not a plain bool)
        return False


def _is_str_batch(v) -> bool:
    return isinstance(v, str) or (isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(s, str) for s in v))


def _as_str_list(v) -> list:
    return [v] if isinstance(v, str) else list(v)


def _cat(key: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"{key}: PD {tuple(a.shape)} and FD {tuple(b.shape)} differ beyond the batch dimension "
                         "and cannot be batched (pad the FD conditioning to the PD shape)")
    return torch.cat([a, b.to(device=a.device, dtype=a.dtype)])


#: inputs a diffusers pipeline applies to every prompt of a call (IP-Adapter images and embeddings are repeated
#: over the batch): one value for both branches, never one per row
SHARED_PER_CALL = ("ip_adapter_image", "ip_adapter_image_embeds", "negative_ip_adapter_image",
                   "negative_ip_adapter_image_embeds")


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b.to(a.device)))
    return _equal(a, b)


def check_same_keys(pd: Mapping, fd: Mapping) -> None:
    """PD and FD conditioning name the same pipeline arguments (the FD branch is the PD one minus the
    identity), whether they share a batch or not."""
    if not isinstance(pd, Mapping) or not isinstance(fd, Mapping):
        raise TypeError("pd and fd must be mappings of pipeline keyword arguments")
    if set(pd) != set(fd):
        only_pd, only_fd = sorted(set(pd) - set(fd)), sorted(set(fd) - set(pd))
        raise ValueError(f"PD and FD conditioning must use the same keyword arguments (PD only: {only_pd}, FD only: "
                         f"{only_fd}); e.g. give FD zeroed identity embeddings instead of leaving them out")


def collate_branches(pd: Mapping, fd: Mapping) -> dict:
    """PD and FD pipeline kwargs -> the kwargs of one batched call whose prompt batch is
    ``[PD_1..PD_n, FD_1..FD_n]``. Tensors: concatenated along dim 0; lists/tuples of tensors: element by
    element; prompt strings (or lists of them): one list; other values must be equal and pass through once.
    IP-Adapter inputs (:data:`SHARED_PER_CALL`) apply to every prompt of a call in diffusers, so they must be
    equal in both branches: identity embeddings in PD and zeros in FD cannot share one batch (FreeCure's FD
    reuse runs each branch in a call of its own). Both branches must hold the same keys (ValueError naming the
    key)."""
    check_same_keys(pd, fd)
    out = {}
    for key, a in pd.items():
        b = fd[key]
        if key in SHARED_PER_CALL:
            if not _same(a, b):
                raise ValueError(f"{key}: PD and FD differ, but a diffusers pipeline applies one IP-Adapter input "
                                 "to every prompt of a call, so the branches cannot run in one batch; use FD reuse "
                                 "(fd_reuse='auto', 'device' or 'host'), which runs them in separate calls")
            out[key] = a
        elif a is None and b is None:
            out[key] = None
        elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            out[key] = _cat(key, a, b)
        elif (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b) and len(a) > 0
              and all(isinstance(x, torch.Tensor) for x in (*a, *b))):
            out[key] = [_cat(f"{key}[{i}]", x, y) for i, (x, y) in enumerate(zip(a, b))]
        elif _is_str_batch(a) and _is_str_batch(b):
            a_l, b_l = _as_str_list(a), _as_str_list(b)
            if len(a_l) != len(b_l):
                raise ValueError(f"{key}: PD holds {len(a_l)} prompts and FD {len(b_l)}; each PD prompt needs its "
                                 "FD partner")
            out[key] = a_l + b_l
        elif _equal(a, b):
            out[key] = a
        else:
            raise ValueError(f"{key}: PD and FD values differ ({type(a).__name__} vs {type(b).__name__}) and cannot "
                             "be batched; pass tensors, lists of tensors, prompt strings, or one shared value")
    return out


def _branch_size(kw: Mapping) -> int:
    p = kw.get("prompt")
    if isinstance(p, str):
        return 1
    if isinstance(p, (list, tuple)) and p:
        return len(p)
    pe = kw.get("prompt_embeds")
    if isinstance(pe, torch.Tensor):
        return int(pe.shape[0])
    return 1


# ----------------------------------------------------------------------------------------------------------
# images and masks
# ----------------------------------------------------------------------------------------------------------

def _mask_to_tensor(mask) -> tuple[torch.Tensor, float | None]:
    """The caller's ``mask=`` as a tensor, checked: ``(mask, its largest value)``."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None
    if Image is not None and isinstance(mask, Image.Image):
        mask = image_mask(mask)  # the CLI's --mask rule: luminance, or alpha for masks painted in alpha
    if isinstance(mask, np.ndarray):
        if mask.dtype == np.uint8:
            mask = torch.from_numpy(mask.astype(np.float32) / 255.0)
        elif mask.dtype == bool or np.issubdtype(mask.dtype, np.floating):
            mask = torch.from_numpy(np.ascontiguousarray(mask))
        else:
            raise TypeError(f"mask: a numpy mask must be bool, float or uint8, got {mask.dtype}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, numpy array or PIL image, got {type(mask).__name__}")
    return mask, check_mask(mask)[1]


def _to_output_type(pipe, pt: torch.Tensor, output_type: str):
    """``pt`` images ([B, 3, H, W] in [0, 1]) -> the pipeline's output type."""
    if output_type in ("pt", "latent"):
        return pt
    arr = pipe.image_processor.pt_to_numpy(pt)
    return arr if output_type == "np" else pipe.image_processor.numpy_to_pil(arr)


def _decode(pipe, family: str, latents: torch.Tensor, height: int, width: int, output_type: str):
    """Latents (as returned with ``output_type="latent"``) -> images, the way the pipeline decodes them."""
    if output_type == "latent":
        return latents
    vae = pipe.vae
    if family == "flux":
        lat = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        lat = lat / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(lat.to(vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type=output_type)
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False) and family == "sdxl"
    if upcast:
        vae.to(torch.float32)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    lat = latents.to(vae.dtype)
    if mean is not None and std is not None:
        c = lat.shape[1]
        mean = torch.tensor(mean).view(1, c, 1, 1).to(lat)
        std = torch.tensor(std).view(1, c, 1, 1).to(lat)
        lat = lat * std / vae.config.scaling_factor + mean
    else:
        lat = lat / vae.config.scaling_factor
    image = vae.decode(lat, return_dict=False)[0]
    if upcast:
        vae.to(torch.float16)
    if getattr(pipe, "safety_checker", None) is not None and hasattr(pipe, "run_safety_checker"):
        image, _ = pipe.run_safety_checker(image, image.device, image.dtype)
    if getattr(pipe, "watermark", None) is not None:
        image = pipe.watermark.apply_watermark(image)
    return pipe.image_processor.postprocess(image, output_type=output_type)


def _rows(images, start: int, stop: int):
    return images[start:stop]


#: progress-bar labels of the stages (tqdm ``desc``)
STAGE_LABELS = {"pass1": "FreeCure pass 1 (FD)", "pass2": "FreeCure pass 2 (PD+FD, FASA)",
                "pass2_reuse": "FreeCure pass 2 (PD, FASA, FD reused)",
                "apg": "FreeCure APG (invert + denoise)", "plain": "FreeCure plain (PD only)"}


@contextmanager
def _progress_label(pipe, stage: str):
    """Label the pipeline's progress bar for one stage (its other settings, ``disable`` included, are kept)."""
    had = "_progress_bar_config" in vars(pipe)
    old = vars(pipe).get("_progress_bar_config")
    pipe._progress_bar_config = {**(old if isinstance(old, dict) else {}), "desc": STAGE_LABELS[stage]}
    try:
        yield
    finally:
        if had:
            pipe._progress_bar_config = old
        else:
            del pipe._progress_bar_config


# ----------------------------------------------------------------------------------------------------------
# the wrapper
# ----------------------------------------------------------------------------------------------------------

class FreeCure:
    """FreeCure around a diffusers SD1.x/SD2.x, SDXL or FLUX pipeline (or a personalization pipeline built on
    one, whose ``__call__`` takes the stock keyword arguments).

    ``parser``: a face parser, any callable ``image -> label map [H, W]`` of int class ids (e.g.
    :class:`freecure_ops.pipeline.face_parser.BiSeNetParser`); it gets each FD image as a float tensor ``[3, H, W]`` in
    [0, 1]. Not needed when every call passes ``mask=``. ``label_table``: attribute -> class ids of that parser
    (default: from the parser's ``labels`` mapping when it has one, else the BiSeNet CelebAMask-HQ table).
    ``vocabulary``: attribute words (:class:`freecure_ops.pipeline.attributes.AttributeVocabulary` or a mapping).
    ``mask_dilate`` / ``mask_feather``: pixels of dilation / Gaussian feathering of the parsed mask.
    ``empty_mask``: "error" (raise :class:`EmptyMaskError` when the mask has no attribute pixel) or "warn"
    (go on; in "bias" mode FASA then equals plain self-attention, in "scale" mode it still attends every FD
    key, with logit 0). ``omega``, ``layers``, ``steps``, ``style_fidelity``,
    ``mode``, ``backend``, ``force``: as :func:`freecure_ops.adapters.install_fasa` (None = family preset).
    ``fd_reuse``: "auto" (default), "device", "host" or "off". Pass 1 records the FD keys/values FASA reads
    (FASA layers and steps, the guidance halves whose PD rows get FASA, the model's dtype), the record is
    compacted to the masked keys, and pass 2 runs the PD rows alone (half the batch). "auto" keeps the record
    on the device when its estimated size fits ``fd_reuse_budget`` (bytes; default half the free GPU memory,
    or a quarter of the host memory for a CPU model), else in pinned host memory (GPU models, up to half the
    host memory), else recomputes the FD rows in pass 2 ("off": both branches in one batch, as without
    reuse). Reuse needs pass 1: with ``mask=`` (pass 1 skipped) it is off. A ``torch.compile``'d model keeps
    it (the record's bookkeeping runs in eager hooks around the compiled forward: no graph break).
    """

    def __init__(self, pipe, parser: Callable | None = None, *, omega=None, layers=None, steps=None,
                 style_fidelity=1.0, mode="bias", backend="auto", force=False, label_table=None, vocabulary=None,
                 mask_dilate=0, mask_feather=0.0, empty_mask="error", fd_reuse="auto", fd_reuse_budget=None):
        self.family = pipeline_family(pipe)
        if getattr(pipe, "pag_applied_layers", None):  # diffusers' PAG pipelines
            raise ValueError(f"{type(pipe).__name__}: perturbed-attention guidance adds a third guidance batch that "
                             "FreeCure's batch layouts do not know; run FreeCure on the base pipeline (e.g. "
                             "StableDiffusionXLPipeline.from_pipe(pag_pipe))")
        self.pipe = pipe
        if parser is not None and not callable(parser):
            raise TypeError(f"parser must be a callable image -> label map, got {type(parser).__name__}")
        self.parser = parser
        self.omega = check_real("omega", omega, allow_none=True)
        self.steps = check_steps(steps)
        self.style_fidelity = check_real("style_fidelity", style_fidelity, lo=0.0, hi=1.0)
        self.mode = check_choice("mode", mode, MODES)
        self.backend = check_choice("backend", backend, BACKENDS)
        self.force = check_bool("force", force)
        blocks = find_self_attention_blocks(pipe)
        self.layers = layers
        if check_layers(layers, len(blocks)) is None:  # the preset must fit this model: fail here, not mid-call
            preset_blocks(self.family, blocks)
        if label_table is not None and not isinstance(label_table, Mapping):
            raise TypeError(f"label_table must be a mapping attribute -> class ids, got {type(label_table).__name__}")
        if label_table is None:
            labels = getattr(parser, "labels", None)
            label_table = label_table_for(labels) if isinstance(labels, Mapping) else BISENET_ATTRIBUTE_LABELS
        self.label_table = label_table
        self.vocabulary = vocabulary
        if isinstance(mask_dilate, bool) or not isinstance(mask_dilate, int) or mask_dilate < 0:
            raise ValueError(f"mask_dilate must be an int >= 0 (pixels), got {mask_dilate!r}")
        self.mask_dilate = mask_dilate
        self.mask_feather = check_real("mask_feather", mask_feather, lo=0.0)
        self.empty_mask = check_choice("empty_mask", empty_mask, ("error", "warn"))
        self.fd_reuse = check_choice("fd_reuse", fd_reuse, FD_REUSE_CHOICES)
        if fd_reuse_budget is not None and (isinstance(fd_reuse_budget, bool) or not isinstance(fd_reuse_budget, int)
                                            or fd_reuse_budget < 0):
            raise ValueError(f"fd_reuse_budget must be None or an int >= 0 (bytes), got {fd_reuse_budget!r}")
        self.fd_reuse_budget = fd_reuse_budget

    def __repr__(self):
        return f"FreeCure({type(self.pipe).__name__}, family={self.family!r}, omega={self.omega}, layers={self.layers})"

    # -- pieces ----------------------------------------------------------------------------------------------
    def _size(self, kwargs: Mapping) -> tuple[int, int]:
        pipe = self.pipe
        default = getattr(pipe, "default_sample_size", None)
        if default is None:
            default = pipe.unet.config.sample_size
        d = int(default) * int(pipe.vae_scale_factor)
        h, w = (d if kwargs.get(k) is None else kwargs[k] for k in ("height", "width"))
        for name, v in (("height", h), ("width", w)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        return h, w

    def initial_latents(self, n: int, height: int, width: int, generator=None) -> torch.Tensor:
        """The initial noise of ``n`` images, drawn as the pipeline draws it (packed for FLUX), unscaled."""
        from diffusers.utils.torch_utils import randn_tensor

        pipe = self.pipe
        device = pipe._execution_device
        if self.family == "flux":
            dtype = pipe.transformer.dtype
            lat, _ = pipe.prepare_latents(n, pipe.transformer.config.in_channels // 4, height, width, dtype, device,
                                          generator)
            return lat
        vsf = pipe.vae_scale_factor
        shape = (n, pipe.unet.config.in_channels, height // vsf, width // vsf)
        return randn_tensor(shape, generator=generator, device=device, dtype=pipe.unet.dtype)

    def noise(self, n: int, height: int, width: int, *, seed: int | None = None, generator=None,
              latents: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
        """The noise of a call: ``(initial latents, seeds of the per-image generators of the per-step noise)``.

        The latents (unless given) and then the seeds come from ``seed`` / ``generator`` (else torch's global
        RNG). Every pipeline call of FreeCure gets ``step_generators(seeds)`` for its rows, alike for PD and FD
        and in both passes, so that pass 2's FD rows replay pass 1 (and reusing them is exact) with stochastic
        samplers too. A plain-pipeline baseline run with ``latents=`` and ``generator=step_generators(seeds)``
        gets exactly the noise FreeCure's PD branch gets."""
        if generator is None and seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(seed)
        if latents is None:
            latents = self.initial_latents(n, height, width, generator)
        return latents, _draw_seeds(generator, n)

    def _attributes(self, pd_kw: Mapping, attribute_prompt, n: int) -> list[list[str]] | None:
        text = attribute_prompt if attribute_prompt is not None else pd_kw.get("prompt")
        if text is None:
            return None
        if not _is_str_batch(text):
            raise TypeError(f"attribute_prompt must be a string or a list of strings, got {type(text).__name__}")
        texts = _as_str_list(text)
        if len(texts) == 1 and n > 1:
            texts = texts * n
        if len(texts) != n:
            raise ValueError(f"attribute_prompt holds {len(texts)} prompts for {n} images")
        return [find_attributes(t, self.vocabulary) for t in texts]

    def mask_from_fd(self, fd_pt: torch.Tensor, attributes: list[list[str]]):
        """Parse each FD image (``[n, 3, H, W]`` in [0, 1]) and build the attribute mask: ``(mask, label_maps)``,
        ``[H, W]`` for one image, ``[n, H, W]`` for several."""
        if self.parser is None:
            raise ValueError("FreeCure needs a parser (FreeCure(pipe, parser)) or an explicit mask= to know where "
                             "the attributes are")
        maps, masks = [], []
        for i in range(fd_pt.shape[0]):
            lm = self.parser(fd_pt[i])
            if isinstance(lm, np.ndarray):
                lm = torch.from_numpy(lm.astype(np.int64))
            if not isinstance(lm, torch.Tensor) or lm.dim() != 2:
                raise ValueError(f"parser must return a label map [H, W] (tensor or numpy array of class ids), got "
                                 f"{type(lm).__name__}{tuple(lm.shape) if hasattr(lm, 'shape') else ''}")
            missing = [a for a in attributes[i] if a not in self.label_table]
            if missing:
                warnings.warn(f"attributes {missing} have no classes in the parser's label table "
                              f"({sorted(self.label_table)}); they get no mask", FreeCureWarning, stacklevel=3)
            maps.append(lm)
            masks.append(attribute_mask(lm, attributes[i], self.label_table, dilate=self.mask_dilate,
                                        feather=self.mask_feather, strict=False))
        if len(maps) == 1:
            return masks[0], maps[0]
        return torch.stack([m.float() for m in masks]), torch.stack(maps)

    def _call_shape(self, kwargs: Mapping, n: int, latents, branch: str):
        """``(height, width, common kwargs with the size, loop steps, guidance scale, whether CFG is batched)``
        of a call of ``n`` images; ``latents``, when given, must hold one row per ``branch`` prompt."""
        pipe = self.pipe
        height, width = self._size(kwargs)
        gs = check_real("guidance_scale", kwargs.get("guidance_scale", default_guidance_scale(pipe)))
        if latents is not None and (not isinstance(latents, torch.Tensor) or latents.shape[0] != n):
            raise ValueError(f"latents must be a tensor with one row per {branch} prompt ({n}), got "
                             f"{type(latents).__name__}{tuple(getattr(latents, 'shape', ()))}")
        return (height, width, {**kwargs, "height": height, "width": width}, _step_count(pipe, kwargs), gs,
                uses_cfg(pipe, self.family, gs))

    def _given_mask(self, mask, n: int) -> torch.Tensor:
        """A caller's ``mask=`` as a checked float32 tensor for ``n`` images; omega x its max within float32."""
        mask, mask_max = _mask_to_tensor(mask)
        check_omega_times_mask(PRESETS[self.family].omega if self.omega is None else self.omega, mask_max)
        if mask.dim() == 3 and mask.shape[0] != n:
            raise ValueError(f"mask holds {mask.shape[0]} masks [n, H, W] for {n} prompts")
        return mask

    def _check_mask_not_empty(self, mask: torch.Tensor, attributes, *, given: bool = False) -> None:
        """``empty_mask`` policy for a mask with no pixel > 0 (``given``: the caller's ``mask=``, not parsed)."""
        per = mask.reshape(mask.shape[0], -1) if mask.dim() == 3 else mask.reshape(1, -1)
        empty = [i for i in range(per.shape[0]) if not bool((per[i] > 0).any())]
        if not empty:
            return
        which = "the attribute mask is empty" if len(empty) == per.shape[0] else \
            f"the attribute masks of images {empty} are empty"
        cause = "as given (mask=)" if given else \
            f"after parsing: the parser found no pixel of {attributes} in the FD image"
        if self.mode == "bias":
            msg = f"{which} {cause}, so FASA has nothing to do there (plain self-attention)"
        else:  # "scale": logit omega * 0 * s = 0, no key excluded
            msg = (f"{which} {cause}; in mode 'scale' FASA still acts there: every FD key gets logit "
                   "omega * 0 * s = 0 and is attended, with no attribute to guide it")
        if self.empty_mask == "error" and len(empty) == per.shape[0]:
            fix = "pass a mask with attribute pixels" if given else \
                "check the parser and its label table, pass mask= yourself"
            raise EmptyMaskError(f"{msg}. {fix[0].upper()}{fix[1:]}, or use empty_mask='warn' to go on")
        warnings.warn(msg, FreeCureWarning, stacklevel=3)

    def _apg_conditioning(self, pd_kw: Mapping, common: Mapping, attributes, apg_template):
        full = {k: v for k, v in {**common, **pd_kw}.items() if k in TEXT_KEYS + _SDXL_SIZE_KEYS}
        base = {k: v for k, v in full.items() if k not in ("prompt", "prompt_2", "prompt_embeds",
                                                            "pooled_prompt_embeds")}
        if apg_template is not None:
            if _is_str_batch(apg_template):
                return full, {**base, "prompt": apg_template}, _as_str_list(apg_template)
            if isinstance(apg_template, Mapping):
                return full, {**base, **apg_template}, None
            raise TypeError(f"apg_template must be a prompt, a list of prompts or a mapping of pipeline keyword "
                            f"arguments, got {type(apg_template).__name__}")
        if not _is_str_batch(full.get("prompt")):
            raise ValueError("apg=True: the PD conditioning has no text prompt to remove the attribute words from; "
                             "pass apg_template= (the template conditioning as pipeline kwargs, e.g. "
                             "{'prompt_embeds': ..., 'pooled_prompt_embeds': ...})")
        template = dict(full)
        out_prompts = None
        for key in ("prompt", "prompt_2"):
            if _is_str_batch(full.get(key)):
                texts = _as_str_list(full[key])
                attrs = attributes if len(attributes) == len(texts) else [attributes[0]] * len(texts)
                tp = [template_prompt(t, a, self.vocabulary) for t, a in zip(texts, attrs)]
                template[key] = tp if isinstance(full[key], (list, tuple)) else tp[0]
                if key == "prompt":
                    out_prompts = tp
        return full, template, out_prompts

    def plan_fd_reuse(self, n: int, height: int, width: int, num_inference_steps: int, cfg: bool,
                      calls_per_step: int = 1, *, timesteps=None, sigmas=None) -> dict:
        """The FD-reuse decision of one call, before pass 1: ``{"requested", "choice", "estimate_bytes",
        "halves"}`` (``halves``: the ``uncond`` flags of the recorded guidance halves). ``calls_per_step``: model
        calls per denoising step (2 for FLUX's true CFG). ``timesteps`` / ``sigmas``: the call's custom
        schedule, if any."""
        pipe = self.pipe
        denoiser, _ = resolve_model(pipe)
        blocks = find_self_attention_blocks(pipe)
        chosen = check_layers(self.layers, len(blocks))
        idx = range(len(blocks)) if chosen == "all" else preset_blocks(self.family, blocks) if chosen is None \
            else chosen
        fasa_blocks = [blocks[i] for i in sorted(idx)]
        # the FASA steps the record will hold: the loop iterations the scheduler will run, within steps=
        n_steps = len(self._fasa_steps(num_inference_steps, timesteps=timesteps, sigmas=sigmas))
        halves = (True, False) if cfg and self.style_fidelity < 1.0 else (False,)
        vsf = int(pipe.vae_scale_factor)
        if self.family == "flux":
            latent_hw, n_stages = (height // (vsf * 2), width // (vsf * 2)), 1
        else:
            latent_hw, n_stages = (height // vsf, width // vsf), len(denoiser.config.block_out_channels)
        itemsize = torch.empty((), dtype=denoiser.dtype).element_size()
        estimate = estimate_record_bytes(fasa_blocks, self.family, latent_hw, n_stages, n_steps, n,
                                         len(halves) * calls_per_step, itemsize)
        info = {"requested": self.fd_reuse, "estimate_bytes": int(estimate), "halves": halves}
        choice = choose_placement(self.fd_reuse, estimate, torch.device(pipe._execution_device), self.fd_reuse_budget)
        info["choice"] = choice
        if choice == "off":
            info["reason"] = "asked" if self.fd_reuse == "off" else "does not fit the budgets"
        return info

    def _fasa_steps(self, num_inference_steps: int, *, timesteps=None, sigmas=None) -> list[int]:
        """The loop iterations of this call where FASA acts; a ``steps=`` that selects none of them is refused
        here, before anything runs (FASA would never act, and a foundation would record nothing)."""
        total = loop_iterations(self.pipe.scheduler, num_inference_steps, timesteps=timesteps, sigmas=sigmas)
        if self.steps is None:
            return list(range(total))
        chosen = sorted(s for s in self.steps if s < total)
        if not chosen:
            raise ValueError(f"steps={sorted(self.steps)} selects no iteration of the {total}-iteration denoising loop "
                             f"this call runs (iterations 0..{total - 1}): FASA would never act; choose steps below "
                             f"{total} or run more steps")
        return chosen

    def _pass1(self, common: Mapping, fd_kw: Mapping, latents, step_seeds, attributes, mask, record, timings,
               cfg: bool):
        """Pass 1: the FD rows alone from ``latents`` (recording into ``record`` when given), then the mask from
        the FD images unless ``mask`` is given. ``cfg``: whether the call batches classifier-free guidance.
        Returns ``(FD images as "pt", mask, label maps)``."""
        pipe = self.pipe
        t0 = time.perf_counter()
        rec_handle = None
        if record is not None:
            rec_handle = self._install(torch.ones(1, 1), "cfg" if cfg else "plain")
            rec_handle.controller.fd_record, rec_handle.controller.fd_role = record, "record"
        try:
            with _progress_label(pipe, "pass1"):
                fd_pt = pipe(**common, **fd_kw, latents=latents, generator=step_generators(step_seeds),
                             output_type="pt").images
        finally:
            if rec_handle is not None:
                rec_handle.remove()
        timings["pass1"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        label_maps = None
        if mask is None:
            mask, label_maps = self.mask_from_fd(fd_pt, attributes)
            self._check_mask_not_empty(mask, attributes if len(attributes) > 1 else attributes[0])
        if record is not None:
            checked, max_value = check_mask(mask)
            record.compact(checked.to(record.device), self.mode, max_value)
        timings["mask"] = time.perf_counter() - t0
        return fd_pt, mask, label_maps

    def _foundation(self, record, latents, step_seeds, mask, height, width, n_steps, **extra) -> Foundation:
        settings = dict(omega=self.omega, steps=self.steps, style_fidelity=self.style_fidelity, mode=self.mode,
                        backend=self.backend, force=self.force)
        return Foundation(family=self.family, record=record, latents=latents, step_seeds=list(step_seeds),
                          mask=mask, height=height, width=width, num_inference_steps=n_steps, settings=settings,
                          **extra)

    def _install(self, mask, layout: str):
        """FASA for one pass; ``layout``: how this call batches CFG as FreeCure reads the call, used where the
        pipeline cannot say it itself (a pipeline that can is asked at every call: layout=None)."""
        if isinstance(getattr(type(self.pipe), "do_classifier_free_guidance", None), property):
            layout = None
        return install_fasa(self.pipe, mask, self.omega, layers=self.layers, steps=self.steps,
                            style_fidelity=self.style_fidelity, layout=layout, mode=self.mode, backend=self.backend,
                            force=self.force)

    # -- the foundation pass alone ----------------------------------------------------------------------------
    @torch.no_grad()
    def foundation(self, prompt=None, *, fd: Mapping | None = None, mask=None, attribute_prompt=None,
                   seed: int | None = None, generator=None, latents: torch.Tensor | None = None,
                   output_type: str = "pil", **kwargs) -> Foundation:
        """Pass 1 alone: run this pipeline's FD branch (``prompt`` and/or ``fd``: pipeline kwargs without the
        identity; ``kwargs``: the rest of the call, e.g. ``num_inference_steps``, ``guidance_scale``, a
        ControlNet ``image``), record the FD keys/values FASA reads, make the attribute mask (the parser on the
        FD images, attributes read from ``attribute_prompt`` or the FD prompt; or ``mask=``), and return a
        :class:`~.foundation.Foundation` that applies FASA to any later run of a pipeline with the same
        architecture (``found.run(identity_pipe, ...)`` / ``found.apply(identity_pipe)``): the one record
        serves any number of such runs. The record is kept as ``fd_reuse`` chooses ("off" is refused: there
        would be nothing to apply); it holds the masked keys only."""
        pipe, family = self.pipe, self.family
        output_type = check_choice("output_type", output_type, _OUTPUT_TYPES)
        for key in ("fd_prompt", "pd", "apg", "apg_template", "gamma"):
            if key in kwargs:
                raise TypeError(f"foundation() runs the FD branch only and takes no {key}=: give the FD conditioning "
                                "as prompt= / fd=, and the PD inputs to the pipeline of pass 2")
        _check_rows_and_seed(kwargs, seed, generator)
        fd_kw = _branch_kwargs("fd", fd, prompt)
        for key in BRANCH_KEYS:
            if key in kwargs:
                fd_kw.setdefault(key, kwargs.pop(key))
        if not any(k in fd_kw for k in ("prompt", "prompt_embeds")):
            raise ValueError("no FD conditioning: pass prompt= or fd={...} (the inputs without the identity)")
        for key in fd_kw:
            if key in kwargs:
                raise ValueError(f"{key!r} is given both as a common argument and in fd")
        n = _branch_size(fd_kw)
        height, width, common, n_steps, gs, cfg = self._call_shape(kwargs, n, latents, "FD")
        self._fasa_steps(n_steps, timesteps=kwargs.get("timesteps"), sigmas=kwargs.get("sigmas"))
        if mask is not None:
            mask = self._given_mask(mask, n)
        attributes = self._attributes(fd_kw, attribute_prompt, n)
        if mask is None and attributes is None:
            raise ValueError("cannot tell which attributes to mask: the FD conditioning has no text prompt; pass "
                             "attribute_prompt= (the prompt as text) or mask=")
        if mask is None and not any(attributes):
            raise ValueError(f"the prompt names none of the attributes FreeCure knows ({_known(self.vocabulary)}): "
                             "FASA would have nothing to do; pass mask= or a prompt with attribute words")
        if mask is not None:
            self._check_mask_not_empty(mask, attributes, given=True)
        calls = _model_calls_per_step(self.pipe, family, common | fd_kw)
        reuse = self.plan_fd_reuse(n, height, width, n_steps, cfg, calls,
                                   timesteps=kwargs.get("timesteps"), sigmas=kwargs.get("sigmas"))
        if reuse["choice"] == "off":
            raise ValueError(f"foundation() keeps the FD keys/values for pass 2, but FD reuse is off "
                             f"({reuse.get('reason')}; estimated {reuse['estimate_bytes'] / 2 ** 30:.2f} GiB): use "
                             "FreeCure(..., fd_reuse='device' or 'host') or a larger fd_reuse_budget")
        latents, step_seeds = self.noise(n, height, width, seed=seed, generator=generator, latents=latents)
        record = FdRecord(reuse["choice"], torch.device(pipe._execution_device), reuse["halves"])
        timings = {}
        fd_pt, mask, label_maps = self._pass1(common, fd_kw, latents, step_seeds, attributes, mask, record, timings,
                                              cfg)
        reuse["bytes"] = record.nbytes()
        return self._foundation(record, latents, step_seeds, mask, height, width, n_steps,
                                images=_to_output_type(pipe, fd_pt, output_type), label_maps=label_maps,
                                attributes=attributes or [], timings=timings,
                                fd_reuse={k: v for k, v in reuse.items() if k != "halves"})

    # -- the call --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt=None, *, fd_prompt=None, pd: Mapping | None = None,
                 fd: Mapping | Callable | None = None, mask=None, attribute_prompt=None, seed: int | None = None,
                 generator=None, latents: torch.Tensor | None = None, apg: bool = False, gamma: float = 0.5,
                 apg_template=None, output_type: str = "pil", return_dict: bool = True, **kwargs):
        """Run FreeCure. PD conditioning: ``prompt`` and/or ``pd`` (pipeline kwargs of the personalized branch);
        FD conditioning: ``fd_prompt`` and/or ``fd`` (a mapping, or a function PD kwargs -> FD kwargs).
        ``kwargs``: pipeline arguments common to both (``num_inference_steps``, ``guidance_scale``, ``height``,
        ``width``, ``negative_prompt``, ...; the per-branch ones of :data:`BRANCH_KEYS` are copied to both).
        ``mask``: skip pass 1 and the parser and use this mask (tensor / numpy ``[H, W]`` or ``[n, H, W]``, or a
        PIL image). ``attribute_prompt``: the text the attributes are read from (default: the PD ``prompt``).
        ``seed`` / ``generator`` / ``latents``: the initial noise, drawn once and used by both passes and both
        rows; ``seed`` / ``generator`` also seed the per-step noise of stochastic samplers (one generator per
        image, alike for PD and FD and in both passes; without either, torch's global RNG draws them).
        ``apg``, ``gamma``, ``apg_template``: Asymmetric Prompt Guidance (template conditioning; default: the PD
        prompt without its attribute phrases). Returns a :class:`FreeCureOutput` (or just the images
        when ``return_dict=False``)."""
        t_start = time.perf_counter()
        pipe, family = self.pipe, self.family
        apg = check_bool("apg", apg)
        return_dict = check_bool("return_dict", return_dict)
        output_type = check_choice("output_type", output_type, _OUTPUT_TYPES)
        if apg:
            check_real("gamma", gamma, lo=0.0, hi=1.0)
            if not 0.0 < gamma <= 1.0:
                raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        _check_rows_and_seed(kwargs, seed, generator)

        # ---- branch kwargs
        pd_kw = _branch_kwargs("pd", pd, prompt)
        if not pd_kw:
            raise ValueError("no PD conditioning: pass prompt= or pd={...} (pipeline kwargs of the personalized "
                             "branch)")
        moved = {key: kwargs.pop(key) for key in BRANCH_KEYS if key in kwargs}
        for key, value in moved.items():
            pd_kw.setdefault(key, value)
        if callable(fd) and not isinstance(fd, Mapping):
            fd_kw = fd(dict(pd_kw))
            if not isinstance(fd_kw, Mapping):
                raise TypeError(f"fd (a function) must return a mapping of pipeline kwargs, got {type(fd_kw).__name__}")
            fd_kw = dict(fd_kw)
        elif fd is None or isinstance(fd, Mapping):
            fd_kw = dict(fd or {})
        else:
            raise TypeError(f"fd must be a mapping of pipeline kwargs or a function of the PD kwargs, "
                            f"got {type(fd).__name__}")
        for key, value in moved.items():
            fd_kw.setdefault(key, value)
        if fd_prompt is not None:
            if isinstance(fd, Mapping) and "prompt" in fd and not _equal(fd["prompt"], fd_prompt):
                raise ValueError("FD prompt given twice: as fd_prompt= and in fd")
            fd_kw["prompt"] = fd_prompt
        if not any(k in fd_kw for k in ("prompt", "prompt_embeds")):
            raise ValueError("no FD conditioning: pass fd_prompt= or fd={...} (the PD inputs without the identity) or "
                             "a function fd=lambda pd: {...}")
        for key in set(pd_kw) | set(fd_kw):
            if key in kwargs:
                raise ValueError(f"{key!r} is given both as a common argument and in pd/fd")

        n = _branch_size(pd_kw)
        if _branch_size(fd_kw) != n:
            raise ValueError(f"PD conditioning holds {n} prompts but FD holds {_branch_size(fd_kw)}")
        height, width, common, n_steps, gs, cfg = self._call_shape(kwargs, n, latents, "PD")
        self._fasa_steps(n_steps, timesteps=kwargs.get("timesteps"), sigmas=kwargs.get("sigmas"))

        timings = {}
        if mask is not None:
            mask = self._given_mask(mask, n)
        attributes = self._attributes(pd_kw, attribute_prompt, n)
        if mask is None and attributes is None:
            raise ValueError("cannot tell which attributes to mask: the PD conditioning has no text prompt; pass "
                             "attribute_prompt= (the prompt as text) or mask=")
        apg_inputs = None
        if apg:  # everything APG needs is checked before pass 1, not after pass 2
            if apg_steps(n_steps, gamma) == 0:
                raise ValueError(f"apg=True with gamma={gamma} and {n_steps} steps runs int(gamma * steps) = 0 APG "
                                 "steps: raise gamma or the number of steps")
            if _ip_adapter_in_use(pipe, {**common, **pd_kw}):
                raise ValueError("apg=True with IP-Adapter image conditioning: APG's template passes would drop the "
                                 "image embeddings (and the identity they carry); use apg=False")
            apg_inputs = self._apg_conditioning(pd_kw, common, attributes or [[]] * n, apg_template)
            if apg_inputs[2] is not None and len(apg_inputs[2]) != n:
                raise ValueError(f"apg_template holds {len(apg_inputs[2])} prompts for {n} images")
        if mask is not None:
            self._check_mask_not_empty(mask, attributes, given=True)

        latents, step_seeds = self.noise(n, height, width, seed=seed, generator=generator, latents=latents)

        # ---- nothing to do: the plain pipeline
        if mask is None and not any(attributes):
            warnings.warn(f"the prompt names none of the attributes FreeCure knows ({_known(self.vocabulary)}): "
                          "FASA has nothing to do; running the plain pipeline (PD only)", FreeCureWarning,
                          stacklevel=2)
            t0 = time.perf_counter()
            with _progress_label(pipe, "plain"):
                images = pipe(**common, **pd_kw, latents=latents, generator=step_generators(step_seeds),
                              output_type=output_type).images
            timings["plain"] = time.perf_counter() - t0
            timings["total"] = time.perf_counter() - t_start
            if not return_dict:
                return images
            return FreeCureOutput(images=images, attributes=attributes or [], timings=timings, fasa_applied=False)

        # ---- FD reuse: decided before pass 1 (it needs pass 1 to record)
        if mask is None:
            calls = _model_calls_per_step(self.pipe, family, {**common, **pd_kw})
            reuse = self.plan_fd_reuse(n, height, width, n_steps, cfg, calls, timesteps=kwargs.get("timesteps"),
                                       sigmas=kwargs.get("sigmas"))
        else:
            reuse = {"requested": self.fd_reuse, "choice": "off", "estimate_bytes": 0, "halves": (),
                     "reason": "mask given: no pass 1 to record"}
        layout = "cfg" if cfg else "plain"
        record = batched = None
        if reuse["choice"] != "off":
            record = FdRecord(reuse["choice"], torch.device(pipe._execution_device), reuse["halves"])
        else:  # PD and FD share pass 2's batch: checked before anything runs
            batched = collate_branches(pd_kw, fd_kw)
        check_same_keys(pd_kw, fd_kw)

        # ---- pass 1: FD only -> parser -> mask (recording the FD keys/values FASA will read)
        fd_images = label_maps = None
        if mask is None:
            fd_pt, mask, label_maps = self._pass1(common, fd_kw, latents, step_seeds, attributes, None, record,
                                                  timings, cfg)
            fd_images = _to_output_type(pipe, fd_pt, output_type)
            if record is not None:
                reuse["bytes"] = record.nbytes()

        # ---- pass 2: PD + FD in one batch (or PD alone, reading the recorded FD keys/values), FASA for this call
        pass2_type = "latent" if apg else output_type
        t0 = time.perf_counter()
        if record is not None:
            found = self._foundation(record, latents, step_seeds, mask, height, width, n_steps)
            try:
                with _progress_label(pipe, "pass2_reuse"):
                    pd_out = found.run(pipe, **common, **pd_kw, output_type=pass2_type).images
            finally:
                found.release()
            fd_out = None
        else:
            with self._install(mask, layout):
                with _progress_label(pipe, "pass2"):
                    out = pipe(**common, **batched, latents=torch.cat([latents, latents]),
                               generator=step_generators(step_seeds + step_seeds), output_type=pass2_type).images
            pd_out, fd_out = _rows(out, 0, n), _rows(out, n, 2 * n)
        timings["pass2"] = time.perf_counter() - t0

        # ---- APG on the PD latents
        template_prompts = None
        if apg:
            t0 = time.perf_counter()
            full, template, template_prompts = apg_inputs
            with _progress_label(pipe, "apg"):
                pd_lat = apply_apg(pipe, pd_out, full=full, template=template, num_inference_steps=n_steps,
                                   gamma=gamma, guidance_scale=gs, height=height, width=width,
                                   sigmas=kwargs.get("sigmas"),
                                   cross_attention_kwargs=kwargs.get("cross_attention_kwargs"),
                                   joint_attention_kwargs=kwargs.get("joint_attention_kwargs"))
            pd_out = _decode(pipe, family, pd_lat, height, width, output_type)
            if fd_images is None:
                fd_out = _decode(pipe, family, fd_out, height, width, output_type)
            timings["apg"] = time.perf_counter() - t0
        if fd_images is None:
            fd_images = fd_out
        timings["total"] = time.perf_counter() - t_start
        if not return_dict:
            return pd_out
        return FreeCureOutput(images=pd_out, fd_images=fd_images, mask=mask, label_maps=label_maps,
                              attributes=attributes or [], template_prompts=template_prompts, timings=timings,
                              fd_reuse={k: v for k, v in reuse.items() if k != "halves"})


def _check_rows_and_seed(kwargs: dict, seed, generator) -> None:
    """One image per prompt (``num_images_per_prompt`` is taken out of ``kwargs``), and at most one noise source."""
    if kwargs.pop("num_images_per_prompt", 1) not in (1, None):
        raise ValueError("num_images_per_prompt must be 1: pass a list of prompts (one PD/FD pair each) or call again "
                         "with another seed")
    if seed is not None and generator is not None:
        raise ValueError("pass seed= or generator=, not both")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")


def _branch_kwargs(name: str, kw, prompt) -> dict:
    """One branch's pipeline kwargs: the mapping ``kw`` (``pd=`` / ``fd=``) with ``prompt`` added."""
    if kw is not None and not isinstance(kw, Mapping):
        raise TypeError(f"{name} must be a mapping of pipeline keyword arguments, got {type(kw).__name__}")
    out = dict(kw or {})
    if prompt is not None:
        if "prompt" in out:
            raise ValueError(f"prompt given twice: as prompt= and in {name}")
        out["prompt"] = prompt
    return out


def _known(vocabulary) -> str:
    from .attributes import DEFAULT_VOCABULARY, AttributeVocabulary

    v = vocabulary if isinstance(vocabulary, AttributeVocabulary) else \
        AttributeVocabulary(vocabulary) if isinstance(vocabulary, Mapping) else DEFAULT_VOCABULARY
    return ", ".join(v.attributes)


def _step_count(pipe, kwargs: Mapping) -> int:
    """The denoising steps of this call: a custom ``timesteps`` or ``sigmas`` schedule sets them (as diffusers'
    ``retrieve_timesteps`` does), else ``num_inference_steps`` (default: the pipeline's)."""
    for key in ("timesteps", "sigmas"):
        if kwargs.get(key) is not None:
            return len(kwargs[key])
    steps = kwargs.get("num_inference_steps", _default_steps(pipe))
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps must be an int >= 1, got {steps!r}")
    return steps


def _model_calls_per_step(pipe, family: str, kwargs: Mapping) -> int:
    """2 when FLUX runs true CFG (a second transformer call per step, on the negative prompt), else 1.

    Both kinds of FLUX pipeline run it only with a negative prompt (text, or both negative embeddings). diffusers'
    pipelines (``true_cfg_scale``) run it when ``true_cfg_scale > 1``; InfiniteYou's ``FluxInfuseNetPipeline``
    (``true_guidance_scale``, bytedance/InfiniteYou aaa6ea5) runs it whenever a negative prompt is given."""
    has_negative = kwargs.get("negative_prompt") is not None or (
        kwargs.get("negative_prompt_embeds") is not None and kwargs.get("negative_pooled_prompt_embeds") is not None)
    if family != "flux" or not has_negative:
        return 1
    takes = inspect.signature(pipe.__call__).parameters
    if "true_cfg_scale" in takes:
        return 2 if float(kwargs.get("true_cfg_scale", takes["true_cfg_scale"].default) or 1.0) > 1.0 else 1
    return 2 if "true_guidance_scale" in takes else 1


def _ip_adapter_in_use(pipe, kwargs: Mapping) -> bool:
    """IP-Adapter image conditioning in this call (image inputs, or an IP-Adapter projection on the model)."""
    if any(kwargs.get(k) is not None for k in ("ip_adapter_image", "ip_adapter_image_embeds")):
        return True
    denoiser, _ = resolve_model(pipe)
    return "IPAdapter" in type(getattr(denoiser, "encoder_hid_proj", None)).__name__  # diffusers' projection


def _draw_seeds(generator, n: int) -> list[int]:
    """Seeds of the ``n`` per-image generators of the per-step noise: drawn from ``generator`` (one, or one per
    image) after the initial noise, else from torch's global RNG."""
    high = 2 ** 62
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise ValueError(f"generator: a list needs one generator per PD prompt ({n}), got {len(generator)}")
        return [int(torch.randint(high, (1,), generator=g, device=g.device)) for g in generator]
    if generator is not None:
        return [int(x) for x in torch.randint(high, (n,), generator=generator, device=generator.device)]
    return [int(x) for x in torch.randint(high, (n,))]


def _default_steps(pipe) -> int:
    import inspect

    p = inspect.signature(pipe.__call__).parameters.get("num_inference_steps")
    return int(p.default) if p is not None and isinstance(p.default, int) else 50
