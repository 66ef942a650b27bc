"""Values derived from a tensor, kept while that tensor lives and is not modified in place.

A diffusers model hands the same cached attribute mask to every FASA layer at every step; what is derived
from it (that its values are valid, the kernel's list of live FD tiles) is computed once instead of per
call. An in-place change bumps the tensor's version counter and invalidates the entry; inference tensors
have no version counter and are never memoized.
"""
from __future__ import annotations

import weakref

import torch


class TensorMemo:
    def __init__(self):
        self._entries: dict[int, tuple[weakref.ref, int, dict]] = {}

    def _entry(self, t: torch.Tensor):
        e = self._entries.get(id(t))
        return e if e is not None and e[0]() is t and e[1] == t._version else None

    def get(self, t: torch.Tensor, key):
        """The value stored for ``(t, key)`` at ``t``'s current version, else None."""
        if t.is_inference():
            return None
        e = self._entry(t)
        return None if e is None else e[2].get(key)

    def put(self, t: torch.Tensor, key, value):
        """Store ``value`` for ``(t, key)`` at ``t``'s current version; returns ``value``."""
        if t.is_inference():
            return value
        e = self._entry(t)
        if e is None:
            tid = id(t)
            e = (weakref.ref(t, lambda _: self._entries.pop(tid, None)), t._version, {})
            self._entries[tid] = e
        e[2][key] = value
        return value

    def __len__(self):
        return len(self._entries)
