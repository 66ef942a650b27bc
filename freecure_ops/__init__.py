"""freecure-ops: fused Foundation-Aware Self-Attention (FreeCure, arXiv 2411.15277) for diffusers models."""
from .api import fasa_attention
from .reference import fasa_reference

__version__ = "0.1.0"
__all__ = ["fasa_attention", "fasa_reference", "__version__"]
