"""``freecure_ops.kernels``: Triton kernels and their launchers. No model knowledge here.

The package module (an ``__init__.py`` would shadow PyPI's ``kernels`` from the checkout root: see
``freecure_ops/subpackages.py``)."""
from .fasa_fwd import fasa_fwd, interpreting

__all__ = ["fasa_fwd", "interpreting"]
