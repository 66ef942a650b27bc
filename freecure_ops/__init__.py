"""freecure-ops: fused Foundation-Aware Self-Attention (FreeCure, arXiv 2411.15277) for diffusers models."""
from pathlib import Path as _Path

from . import subpackages as _subpackages

_subpackages.install(__name__, _Path(__file__).resolve().parent)  # first: .kernels, .adapters, .bench (see there)

from .api import fasa_attention  # noqa: E402
from .fasa_mask import FasaMask, prepare_fasa_mask  # noqa: E402
from .reference import fasa_reference  # noqa: E402

__version__ = "0.1.0"
__all__ = ["FasaMask", "fasa_attention", "fasa_reference", "prepare_fasa_mask", "__version__"]
