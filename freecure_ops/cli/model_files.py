"""What a pipeline folder's config files say, read without loading anything: whether ``--model`` is a
pipeline folder, its height/width granularity, its self-attention block count (so ``--layers`` is checked
before the weights load)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import CLIError

__all__ = ["model_path_problem", "size_multiple", "model_blocks", "layers_problem", "check_model_flags"]


def model_path_problem(model: str) -> str | None:
    """What is wrong with ``--model`` as a local folder (None: a pipeline folder, or a Hub id to look up)."""
    # a Hub id is "name" or "org/name"; anything else is meant as a folder
    looks_local = os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1 \
        or model.endswith("/") or (os.sep != "/" and os.sep in model)
    path = Path(model).expanduser()
    if path.exists() and not path.is_dir():
        return "expected a pipeline folder (with model_index.json), got a file"
    if path.is_dir() and not (path / "model_index.json").is_file():
        return ("no model_index.json in this folder; it is not a diffusers pipeline "
                "(save one with pipe.save_pretrained(folder))")
    if not path.exists() and looks_local:
        return "no such folder"
    return None


def _model_index(model: str) -> dict:
    """model_index.json of a local pipeline folder ({} when it is not one; the loader reports that)."""
    path = Path(model).expanduser() / "model_index.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def size_multiple(model: str) -> int:
    """Height/width granularity of the pipeline in ``model`` (8 for SD/SDXL; FLUX packs 2x2 latent patches:
    2 * the VAE's scale factor, 16 for FLUX.1), read from the folder's configs without loading anything."""
    index = _model_index(model)
    if "flux" not in str(index.get("_class_name", "")).lower():
        return 8
    try:
        vae = json.loads((Path(model).expanduser() / "vae" / "config.json").read_text())
        return 2 * 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    except (OSError, ValueError):
        return 16


_UNET_ATTN_DOWN = ("CrossAttnDownBlock2D",)
_UNET_PLAIN_DOWN = ("DownBlock2D",)
_UNET_ATTN_UP = ("CrossAttnUpBlock2D",)
_UNET_PLAIN_UP = ("UpBlock2D",)


def _per_block(value, n):
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def model_blocks(model: str):
    """``(family, number of self-attention blocks)`` of the pipeline folder ``model``, read from its UNet or
    transformer config.json without loading anything (the count :func:`find_self_attention_blocks` gives),
    or None when the folder or its block types are not ones counted here (the loader reports later)."""
    root = Path(model).expanduser()
    try:
        cfg = json.loads((root / "transformer" / "config.json").read_text())
        if "Flux" in str(cfg.get("_class_name", "")):
            return "flux", int(cfg["num_layers"]) + int(cfg["num_single_layers"])
        return None
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        cfg = json.loads((root / "unet" / "config.json").read_text())
        down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
        if cfg.get("only_cross_attention") or not set(down) <= set(_UNET_ATTN_DOWN + _UNET_PLAIN_DOWN) \
                or not set(up) <= set(_UNET_ATTN_UP + _UNET_PLAIN_UP):
            return None
        n = len(down)
        layers = _per_block(cfg.get("layers_per_block", 2), n)
        depth = _per_block(cfg.get("transformer_layers_per_block", 1), n)
        rdepth = cfg.get("reverse_transformer_layers_per_block") or list(reversed(depth))
        rlayers = list(reversed(layers))
        total = sum(layers[i] * depth[i] for i in range(n) if down[i] in _UNET_ATTN_DOWN)
        mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        if mid == "UNetMidBlock2DCrossAttn":
            total += depth[-1]
        elif mid is not None:
            return None
        for i in range(n):  # a decoder stage has one more attention than its encoder twin
            if up[i] in _UNET_ATTN_UP:
                total += sum(rdepth[i]) if isinstance(rdepth[i], (list, tuple)) else (rlayers[i] + 1) * rdepth[i]
        family = "sdxl" if cfg.get("addition_embed_type") == "text_time" else "sd1"
        return family, int(total)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def layers_problem(layers, model_info) -> str | None:
    """What is wrong with ``layers`` (None: the preset, "all", or indices) for a model of ``model_info``
    (:func:`model_blocks`; None: unknown, nothing to check). Phrased after ``layers``."""
    if model_info is None or layers == "all":
        return None
    family, total = model_info
    if layers is None:
        from ..adapters.presets import preset_blocks

        if family == "flux":
            return None  # the FLUX preset is relative to the block counts: never too small
        try:
            preset_blocks(family, [None] * total)
        except ValueError as e:
            return f"not given: {e}"
        return None
    bad = [i for i in layers if not 0 <= i < total]
    if bad:
        return f"{','.join(map(str, bad))}: the model has {total} self-attention blocks (0..{total - 1})"
    return None


def check_model_flags(args, model_path) -> tuple[int, int | None]:
    """``--height`` / ``--width`` / ``--layers`` against the resolved model's config files, before anything
    loads. Returns the size granularity (pixels) and the self-attention block count (None when the configs
    cannot be read cheaply)."""
    multiple = size_multiple(str(model_path))
    for flag, v in (("--height", args.height), ("--width", args.width)):
        if v is not None and (v <= 0 or v % multiple):
            raise CLIError(f"{flag} must be a positive multiple of {multiple} (pixels), got {v}")
    blocks = model_blocks(str(model_path))
    problem = layers_problem(args.layers, blocks) if args.layers is not None else None
    if problem:
        raise CLIError(f"--layers {problem}")
    return multiple, blocks
