"""``freecure_ops.adapters``: drop-in FASA for SD1.x/SD2.x, SDXL and FLUX.

    handle = install_fasa(pipe, mask)   # pipe.unet / pipe.transformer, presets from .presets
    images = pipe(...)                  # batch per guidance half: [PD_1..PD_n, FD_1..FD_n]
    handle.remove()                     # the original processors, the same objects

Only self-attention is touched (``attn1`` of UNet transformer blocks, the joint attention of FLUX blocks);
processors hold no math: PD rows go through :func:`freecure_ops.fasa_attention`, FD rows through the stock
attention.

This is the package module (an ``__init__.py`` would shadow PyPI's ``adapters`` from the checkout root: see
``freecure_ops/subpackages.py``).
"""
from .discovery import SelfAttentionBlock, find_self_attention_blocks
from .install import FasaHandle, install_fasa
from .presets import PRESETS, FasaPreset, preset_blocks
from .unet_processor import FasaAttnProcessor

__all__ = ["install_fasa", "FasaHandle", "FasaAttnProcessor", "FasaFluxAttnProcessor", "find_self_attention_blocks",
           "SelfAttentionBlock", "PRESETS", "FasaPreset", "preset_blocks"]


# The whole method (two passes, APG) lives one layer up, in freecure_ops.pipeline; these names stay importable
# from here (``from freecure_ops.adapters import FreeCure``) without this package importing upwards.
_METHOD_NAMES = ("FreeCure", "FreeCureOutput", "FreeCureWarning", "EmptyMaskError", "collate_branches", "apply_apg")


def __getattr__(name):
    # The FLUX processor needs diffusers' FLUX attention pieces (diffusers >= 0.35): imported on first use only,
    # so that SD/SDXL users of older diffusers can import the adapters.
    if name == "FasaFluxAttnProcessor":
        from .flux_processor import FasaFluxAttnProcessor

        return FasaFluxAttnProcessor
    if name in _METHOD_NAMES:
        from freecure_ops import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
