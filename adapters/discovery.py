"""Find the model inside a pipeline, its family, and its self-attention layers in execution order."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SelfAttentionBlock:
    """One transformer block's self-attention: ``index`` in execution order, ``name`` of the attention module."""

    index: int
    name: str
    attn: torch.nn.Module
    kind: str  # "unet" (attn1), "flux_double" or "flux_single" (joint attention)


def unwrap_compiled(module):
    """The model inside ``torch.compile(model)`` (an ``OptimizedModule``, which keeps it as ``_orig_mod``);
    anything else unchanged."""
    while isinstance(module, torch.nn.Module) and isinstance(getattr(module, "_orig_mod", None), torch.nn.Module):
        module = module._orig_mod
    return module


def compiled_wrapper(model):
    """The ``OptimizedModule`` a model (or the pipeline's ``.unet`` / ``.transformer``) is wrapped in, or None."""
    target = model
    if not isinstance(target, torch.nn.Module):
        for attr in ("unet", "transformer"):
            candidate = getattr(model, attr, None)
            if isinstance(candidate, torch.nn.Module):
                target = candidate
                break
    if isinstance(target, torch.nn.Module) and isinstance(getattr(target, "_orig_mod", None), torch.nn.Module):
        return target
    return None


def resolve_model(model):
    """``(denoiser, family)`` for a UNet2DConditionModel, a FluxTransformer2DModel, or a pipeline holding one;
    compiled models (``torch.compile``'s ``OptimizedModule``) are unwrapped to the model inside."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    target = unwrap_compiled(model)
    if not isinstance(target, torch.nn.Module):
        for attr in ("unet", "transformer"):
            candidate = unwrap_compiled(getattr(model, attr, None))
            if isinstance(candidate, torch.nn.Module):
                target = candidate
                break
    if isinstance(target, UNet2DConditionModel):
        family = "sdxl" if getattr(target.config, "addition_embed_type", None) == "text_time" else "sd1"
        return target, family
    if isinstance(target, FluxTransformer2DModel):
        return target, "flux"
    raise TypeError("model must be a diffusers UNet2DConditionModel (SD1.x/SD2.x/SDXL), a FluxTransformer2DModel, "
                    f"or a pipeline with such a .unet or .transformer; got {type(model).__name__}")


def _unet_blocks(unet) -> list[SelfAttentionBlock]:
    # Execution order: encoder, mid block, decoder (the registration order puts up_blocks before mid_block).
    # Inside each, modules() yields the transformer blocks in the order they run.
    stages = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    if unet.mid_block is not None:
        stages.append(("mid_block", unet.mid_block))
    stages += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    blocks = []
    for prefix, stage in stages:
        for name, module in stage.named_modules():
            attn1 = getattr(module, "attn1", None)
            if isinstance(attn1, torch.nn.Module) and hasattr(attn1, "set_processor"):
                path = f"{prefix}.{name}" if name else prefix
                blocks.append(SelfAttentionBlock(len(blocks), f"{path}.attn1", attn1, "unet"))
    return blocks


def _flux_blocks(transformer) -> list[SelfAttentionBlock]:
    blocks = []
    for i, block in enumerate(transformer.transformer_blocks):
        blocks.append(SelfAttentionBlock(len(blocks), f"transformer_blocks.{i}.attn", block.attn, "flux_double"))
    for i, block in enumerate(transformer.single_transformer_blocks):
        blocks.append(SelfAttentionBlock(len(blocks), f"single_transformer_blocks.{i}.attn", block.attn,
                                         "flux_single"))
    return blocks


def find_self_attention_blocks(model) -> list[SelfAttentionBlock]:
    """All self-attention layers of a model (or pipeline) in execution order, one per transformer block."""
    denoiser, family = resolve_model(model)
    return _flux_blocks(denoiser) if family == "flux" else _unet_blocks(denoiser)
