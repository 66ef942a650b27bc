"""freecure-ops: fused Foundation-Aware Self-Attention (FreeCure, arXiv 2411.15277) for diffusers models."""
from .api import fasa_attention
from .fasa_mask import FasaMask, prepare_fasa_mask
from .reference import fasa_reference

__version__ = "0.1.0"
__all__ = ["FasaMask", "fasa_attention", "fasa_reference", "prepare_fasa_mask", "__version__"]
