"""Wrap a method on one object *instance* (the class is untouched) and undo it later.

Used to follow what diffusers does to a model or pipeline that carries FASA: the FLUX pipeline's image grid,
``set_attn_processor`` / ``set_default_attn_processor`` / IP-Adapter loading on the model. If someone else
wrapped the same method after us, undo leaves theirs in place and ours turns into a pass-through.
"""
from __future__ import annotations

import functools


class InstancePatch:
    """``wrapper_factory(original) -> wrapper``; the wrapper is installed as ``obj.<name>``."""

    def __init__(self, obj, name: str, wrapper_factory):
        self.obj = obj
        self.name = name
        self.original = getattr(obj, name)
        self.had_own = name in vars(obj)
        self.live = True
        inner = wrapper_factory(self.original)

        @functools.wraps(self.original)
        def wrapper(*args, **kwargs):
            if not self.live:
                return self.original(*args, **kwargs)
            return inner(*args, **kwargs)

        self.wrapper = wrapper
        setattr(obj, name, wrapper)

    def undo(self) -> None:
        self.live = False
        if vars(self.obj).get(self.name) is self.wrapper:
            if self.had_own:
                setattr(self.obj, self.name, self.original)
            else:
                delattr(self.obj, self.name)
