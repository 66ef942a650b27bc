"""Triton kernels and their launchers (installed as ``freecure_ops.kernels``). No model knowledge here."""
from .fasa_fwd import fasa_fwd, interpreting

__all__ = ["fasa_fwd", "interpreting"]
