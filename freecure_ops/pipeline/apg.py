"""Asymmetric Prompt Guidance (APG) for FreeCure: invert a finished latent with the template prompt (the
attribute words removed) to ``gamma * T``, then denoise it back to t = 0 with the full prompt.

* SD1.x / SDXL (UNet, epsilon / v / sample prediction): DDIM. The inversion runs
  ``DDIMInverseScheduler.from_config(pipe.scheduler.config)`` over its first ``int(gamma * N)`` timesteps, the
  denoising ``DDIMScheduler.from_config(...)`` over its last ``int(gamma * N)``; both share ``steps_offset``,
  ``timestep_spacing`` and ``set_alpha_to_one``, so a model that predicts zero noise gives back its input.
  Classifier-free guidance as the pipeline does it (``[uncond, cond]`` batch); SDXL's ``added_cond_kwargs``
  (pooled embeddings and time ids) come from the pipeline's own ``encode_prompt`` / ``_get_add_time_ids``.
* FLUX (flow matching, ``x_sigma = (1 - sigma) x_0 + sigma * noise``): Euler integration of the velocity
  field on the pipeline's own (shifted) sigma grid, backwards from sigma = 0 up to the ``gamma`` point, then
  forwards down to 0 on the same grid. Guidance-distilled models (FLUX.1-dev) get the ``guidance`` input;
  true CFG (``true_cfg_scale``) is not applied during APG.

The conditioning is given as pipeline keyword arguments (``prompt`` / ``prompt_2`` / ``negative_prompt`` or
the ``*_embeds`` tensors), the same keys the pipeline's ``__call__`` takes; :func:`encode_conditioning` turns
them into model inputs with the pipeline's own ``encode_prompt``. The math-only cores
(:func:`ddim_invert_then_denoise`, :func:`flow_invert_then_denoise`) take a prediction callable, so they can be
held against a stub model.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from freecure_ops.adapters.discovery import resolve_model

__all__ = ["TEXT_KEYS", "Conditioning", "pipeline_family", "default_guidance_scale", "uses_cfg",
           "encode_conditioning", "apg_steps", "ddim_schedulers", "ddim_invert_then_denoise", "flow_sigmas",
           "flow_invert_then_denoise", "apply_apg"]

#: pipeline keyword arguments that describe the text conditioning (what APG re-encodes).
TEXT_KEYS = ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2", "prompt_embeds", "negative_prompt_embeds",
             "pooled_prompt_embeds", "negative_pooled_prompt_embeds", "clip_skip", "max_sequence_length")


def pipeline_family(pipe) -> str:
    """``"sd1"`` (SD1.x/SD2.x), ``"sdxl"`` or ``"flux"`` for a diffusers pipeline; TypeError otherwise."""
    if isinstance(pipe, torch.nn.Module) or not callable(pipe):
        raise TypeError(f"pipe must be a diffusers pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline, "
                        f"FluxPipeline or a pipeline built on one), got {type(pipe).__name__}")
    try:
        _, family = resolve_model(pipe)
    except TypeError as e:
        raise TypeError(f"unknown pipeline family: {type(pipe).__name__} has neither a UNet2DConditionModel "
                        f"(.unet, SD1.x/SD2.x/SDXL) nor a FluxTransformer2DModel (.transformer)") from e
    return family


def default_guidance_scale(pipe) -> float:
    """The ``guidance_scale`` default of the pipeline's ``__call__`` (7.5 for SD, 5.0 for SDXL, 3.5 for FLUX)."""
    try:
        p = inspect.signature(pipe.__call__).parameters.get("guidance_scale")
    except (TypeError, ValueError):  # pragma: no cover
        p = None
    if p is None or p.default is inspect.Parameter.empty or p.default is None:
        return 7.5
    return float(p.default)


def uses_cfg(pipe, family: str, guidance_scale: float) -> bool:
    """Whether the pipeline batches ``[uncond, cond]`` (classifier-free guidance) for this guidance scale."""
    if family == "flux":
        return False
    return guidance_scale > 1.0 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None


@dataclass
class Conditioning:
    """Encoded conditioning for direct model calls (already ``[uncond, cond]`` when ``cfg``)."""

    kwargs: dict = field(default_factory=dict)  # UNet / transformer keyword inputs besides sample and timestep
    cfg: bool = False
    batch: int = 1


def _sub(kwargs: Mapping, keys) -> dict:
    return {k: kwargs[k] for k in keys if kwargs.get(k) is not None}


def encode_conditioning(pipe, kwargs: Mapping, *, family: str | None = None, guidance_scale: float | None = None,
                        height: int, width: int) -> Conditioning:
    """Encode pipeline-style text conditioning (``prompt`` or ``*_embeds``, negatives) with the pipeline's own
    ``encode_prompt`` into the keyword inputs of its UNet or FLUX transformer."""
    family = family or pipeline_family(pipe)
    gs = default_guidance_scale(pipe) if guidance_scale is None else float(guidance_scale)
    device = pipe._execution_device
    if family == "flux":
        kw = _sub(kwargs, ("prompt", "prompt_2", "prompt_embeds", "pooled_prompt_embeds", "max_sequence_length"))
        embeds, pooled, text_ids = pipe.encode_prompt(device=device, num_images_per_prompt=1, **kw)
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = torch.full([embeds.shape[0]], gs, device=device, dtype=torch.float32)
        return Conditioning(dict(encoder_hidden_states=embeds, pooled_projections=pooled, txt_ids=text_ids,
                                 guidance=guidance), cfg=False, batch=embeds.shape[0])

    cfg = uses_cfg(pipe, family, gs)
    if family == "sd1":
        kw = _sub(kwargs, ("prompt", "negative_prompt", "prompt_embeds", "negative_prompt_embeds", "clip_skip"))
        kw.setdefault("prompt", None)
        embeds, neg = pipe.encode_prompt(device=device, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
                                         **kw)
        batch = embeds.shape[0]
        enc = torch.cat([neg, embeds]) if cfg else embeds
        return Conditioning(dict(encoder_hidden_states=enc), cfg=cfg, batch=batch)

    # sdxl
    kw = _sub(kwargs, ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2", "prompt_embeds",
                       "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds", "clip_skip"))
    kw.setdefault("prompt", None)
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(device=device, num_images_per_prompt=1,
                                                         do_classifier_free_guidance=cfg, **kw)
    batch = embeds.shape[0]
    if getattr(pipe, "text_encoder_2", None) is not None:
        proj_dim = pipe.text_encoder_2.config.projection_dim
    else:
        proj_dim = int(pooled.shape[-1])
    original = tuple(kwargs.get("original_size") or (height, width))
    target = tuple(kwargs.get("target_size") or (height, width))
    crops = tuple(kwargs.get("crops_coords_top_left") or (0, 0))
    time_ids = pipe._get_add_time_ids(original, crops, target, dtype=embeds.dtype, text_encoder_projection_dim=proj_dim)
    neg_time_ids = time_ids
    if kwargs.get("negative_original_size") is not None and kwargs.get("negative_target_size") is not None:
        neg_time_ids = pipe._get_add_time_ids(tuple(kwargs["negative_original_size"]),
                                              tuple(kwargs.get("negative_crops_coords_top_left") or (0, 0)),
                                              tuple(kwargs["negative_target_size"]), dtype=embeds.dtype,
                                              text_encoder_projection_dim=proj_dim)
    if cfg:
        embeds, pooled = torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])
        time_ids = torch.cat([neg_time_ids, time_ids])
    time_ids = time_ids.to(device).repeat(batch, 1)
    return Conditioning(dict(encoder_hidden_states=embeds.to(device),
                             added_cond_kwargs={"text_embeds": pooled.to(device), "time_ids": time_ids}),
                        cfg=cfg, batch=batch)


# ----------------------------------------------------------------------------------------------------------
# math-only cores
# ----------------------------------------------------------------------------------------------------------

def apg_steps(num_inference_steps: int, gamma: float) -> int:
    """``int(gamma * N)``: the number of inversion (and of denoising) steps."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) \
            or not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be a number in (0, 1], got {gamma!r}")
    return int(gamma * num_inference_steps)


def ddim_schedulers(scheduler_config, num_inference_steps: int, device=None):
    """``(inverse, forward)``: DDIMInverseScheduler and DDIMScheduler from one config, timesteps set. A spacing
    the inverse scheduler lacks ("linspace") becomes "leading" for both, so the two grids pair up; sample
    clipping and thresholding are off (a config from another scheduler class would switch clipping on)."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    overrides = {"clip_sample": False, "thresholding": False}  # latents are not images in [-1, 1]
    if dict(scheduler_config).get("timestep_spacing", "leading") not in ("leading", "trailing"):
        overrides["timestep_spacing"] = "leading"
    inverse = DDIMInverseScheduler.from_config(scheduler_config, **overrides)
    forward = DDIMScheduler.from_config(scheduler_config, **overrides)
    # the inverse scheduler's first source alpha and the forward scheduler's last target alpha must agree
    forward.final_alpha_cumprod = inverse.initial_alpha_cumprod.clone()
    inverse.set_timesteps(num_inference_steps, device=device)
    forward.set_timesteps(num_inference_steps, device=device)
    return inverse, forward


def ddim_invert_then_denoise(predict: Callable, latents: torch.Tensor, scheduler_config, num_inference_steps: int,
                             gamma: float = 0.5, *, template=None, full=None, progress=None) -> torch.Tensor:
    """DDIM-invert ``latents`` over the first ``int(gamma*N)`` inverse timesteps with ``predict(x, t, template)``,
    then denoise over the last ``int(gamma*N)`` timesteps with ``predict(x, t, full)``. ``predict`` returns the
    model output (CFG already applied) in the scheduler's prediction type. ``progress``: optional callable
    run after each step."""
    k = apg_steps(num_inference_steps, gamma)
    if k == 0:
        return latents
    inverse, forward = ddim_schedulers(scheduler_config, num_inference_steps, device=latents.device)
    x = latents
    for t in inverse.timesteps[:k]:
        x = inverse.step(predict(x, t, template), t, x, return_dict=False)[0]
        if progress:
            progress()
    for t in forward.timesteps[num_inference_steps - k:]:
        x = forward.step(predict(x, t, full), t, x, eta=0.0, return_dict=False)[0]
        if progress:
            progress()
    return x.to(latents.dtype)


def flow_sigmas(pipe, num_inference_steps: int, image_seq_len: int, sigmas=None, device=None) -> torch.Tensor:
    """The sigma grid the FLUX pipeline denoises on (``N + 1`` values from ~1 down to 0), built as
    :class:`~diffusers.FluxPipeline` builds it (shift ``mu`` from the image token count)."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    if sigmas is None:
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    if getattr(scheduler.config, "use_flow_sigmas", False):
        sigmas = None
    cfg = scheduler.config
    mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    retrieve_timesteps(scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
    return scheduler.sigmas.to(device=device, dtype=torch.float32)


def flow_invert_then_denoise(velocity: Callable, latents: torch.Tensor, sigmas: torch.Tensor, gamma: float = 0.5, *,
                             template=None, full=None, progress=None) -> torch.Tensor:
    """Flow-matching Euler inversion and re-denoising. ``sigmas``: the denoising grid ``[s_0 ~ 1, ..., s_{N-1},
    0]``. With ``k = int(gamma * N)`` the inversion integrates ``dx/dsigma = v(x, sigma)`` from 0 up through
    ``s_{N-1}, ..., s_{N-k}`` with ``velocity(x, sigma, template)`` evaluated at the start of each step; the
    denoising integrates back down the same grid with ``velocity(x, sigma, full)``."""
    n = sigmas.numel() - 1
    k = apg_steps(n, gamma)
    if k == 0:
        return latents
    tail = [float(s) for s in sigmas[n - k:]]          # s_{N-k} > ... > s_{N-1} > 0
    up = tail[::-1]                                    # 0 < s_{N-1} < ... < s_{N-k}
    x = latents.float()
    for s_from, s_to in zip(up[:-1], up[1:]):
        x = x + (s_to - s_from) * velocity(x.to(latents.dtype), s_from, template).float()
        if progress:
            progress()
    for s_from, s_to in zip(tail[:-1], tail[1:]):
        x = x + (s_to - s_from) * velocity(x.to(latents.dtype), s_from, full).float()
        if progress:
            progress()
    return x.to(latents.dtype)


# ----------------------------------------------------------------------------------------------------------
# pipeline-level APG
# ----------------------------------------------------------------------------------------------------------

def _unet_predictor(pipe, guidance_scale: float, cross_attention_kwargs=None):
    unet = pipe.unet

    def predict(x, t, cond: Conditioning):
        inp = torch.cat([x, x]) if cond.cfg else x
        out = unet(inp, t, cross_attention_kwargs=cross_attention_kwargs, return_dict=False, **cond.kwargs)[0]
        if cond.cfg:
            uncond, text = out.chunk(2)
            out = uncond + guidance_scale * (text - uncond)
        return out

    return predict


def _flux_velocity(pipe, img_ids, joint_attention_kwargs=None):
    transformer = pipe.transformer

    def velocity(x, sigma, cond: Conditioning):
        t = torch.full((x.shape[0],), float(sigma), device=x.device, dtype=x.dtype)
        return transformer(hidden_states=x, timestep=t, img_ids=img_ids, joint_attention_kwargs=joint_attention_kwargs,
                           return_dict=False, **cond.kwargs)[0]

    return velocity


@torch.no_grad()
def apply_apg(pipe, latents: torch.Tensor, *, full: Mapping, template: Mapping, num_inference_steps: int,
              gamma: float = 0.5, guidance_scale: float | None = None, height: int, width: int,
              sigmas=None, cross_attention_kwargs=None, joint_attention_kwargs=None) -> torch.Tensor:
    """APG on finished latents (``[n, C, h, w]`` for SD/SDXL, packed ``[n, tokens, C*4]`` for FLUX, as the
    pipeline returns them with ``output_type="latent"``). ``full`` / ``template``: pipeline-style text
    conditioning of the full and the template prompt (n items each). Progress bar as the pipeline's."""
    family = pipeline_family(pipe)
    gs = default_guidance_scale(pipe) if guidance_scale is None else float(guidance_scale)
    k = apg_steps(num_inference_steps, gamma)
    if k == 0:
        return latents
    enc = dict(family=family, guidance_scale=gs, height=height, width=width)
    cond_full = encode_conditioning(pipe, full, **enc)
    cond_tmpl = encode_conditioning(pipe, template, **enc)
    n = latents.shape[0]
    for name, c in (("full", cond_full), ("template", cond_tmpl)):
        if c.batch != n:
            raise ValueError(f"APG: the {name} conditioning holds {c.batch} prompts but there are {n} latents")
    with pipe.progress_bar(total=2 * k) as bar:
        if family == "flux":
            vsf = pipe.vae_scale_factor
            lh, lw = 2 * (int(height) // (vsf * 2)), 2 * (int(width) // (vsf * 2))
            img_ids = pipe._prepare_latent_image_ids(n, lh // 2, lw // 2, latents.device, latents.dtype)
            grid = flow_sigmas(pipe, num_inference_steps, latents.shape[1], sigmas=sigmas, device=latents.device)
            return flow_invert_then_denoise(_flux_velocity(pipe, img_ids, joint_attention_kwargs), latents, grid,
                                            gamma, template=cond_tmpl, full=cond_full, progress=bar.update)
        return ddim_invert_then_denoise(_unet_predictor(pipe, gs, cross_attention_kwargs), latents,
                                        pipe.scheduler.config, num_inference_steps, gamma, template=cond_tmpl,
                                        full=cond_full, progress=bar.update)
