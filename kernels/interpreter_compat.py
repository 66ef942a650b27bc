"""Keep Triton's CPU interpreter working with numpy >= 2.4 under Triton releases that predate the fix.

The interpreter holds a scalar kernel argument as a one-element numpy array and turns it into a Python int
(a loop bound such as ``range(0, n, BLOCK)``) with ``int(array)``. numpy 2.4 made ``int()`` of a 1-d array an
error; Triton 3.9 converts with ``int(array.squeeze())``, Triton 3.6 (the one torch 2.11 pins) does not, so
every kernel with a runtime loop bound fails there with "only 0-dimensional arrays can be converted to Python
scalars". ``apply()`` makes the interpreter convert one-element arrays the way newer Triton does. It changes
nothing on a GPU (no interpreter) or where ``int()`` of a one-element array still works.
"""
from __future__ import annotations

import numpy as np


def _int_of_one_element_arrays_fails() -> bool:
    try:
        int(np.zeros(1, dtype=np.int32))
    except TypeError:
        return True
    return False


def apply(interpreter=None) -> bool:
    """Install the conversion in Triton's interpreter (``interpreter``: that module, by default Triton's own)
    when this numpy needs it; True when installed."""
    if not _int_of_one_element_arrays_fails():
        return False
    if interpreter is None:
        from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "_freecure_compat", False):
        return patch_tensor is not None

    def _patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        # after Triton's own attributes, so that its other patches stay as they are
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0])
                       if self.handle.data.size == 1 else int(self.handle.data))

    _patch_lang_tensor._freecure_compat = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True
