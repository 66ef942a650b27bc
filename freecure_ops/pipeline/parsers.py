"""Pick and load a face parser from one weights spec (what ``--parser-weights`` takes)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["load_face_parser"]

_FILE_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".ckpt")


def load_face_parser(spec, *, revision: str | None = None, offline: bool | None = None, device="cpu",
                     dtype: torch.dtype = torch.float32):
    """A face parser from ``spec``:

    * a weights file (local, or the Hub file ``"org/name/79999_iter.pth"``) -> :class:`BiSeNetParser`;
    * a model folder (``save_pretrained``) or a Hub model id ``"org/name"`` (e.g. ``"jonathandinu/face-parsing"``)
      -> :class:`SegFormerParser`.

    Hub references resolve at ``revision`` and respect ``offline`` / ``HF_HUB_OFFLINE`` (see
    :mod:`freecure_ops.hub`). Each parser carries its own ``labels`` (name -> class id).
    """
    from freecure_ops.hub import _check_spec

    spec = _check_spec(spec)
    local = Path(os.path.expanduser(os.fspath(spec)))
    if local.is_dir():
        is_file = False
    elif local.is_file() or not isinstance(spec, str):
        is_file = True
    else:  # a Hub reference: org/name/file..., or a missing local file named by its suffix
        is_file = spec.replace("\\", "/").count("/") >= 2 or spec.lower().endswith(_FILE_SUFFIXES)
    if is_file:
        from .face_parser import BiSeNetParser

        return BiSeNetParser.from_pretrained(spec, revision=revision, offline=offline, device=device, dtype=dtype)
    from .segformer_parser import SegFormerParser

    return SegFormerParser.from_pretrained(spec, revision=revision, offline=offline, device=device, dtype=dtype)
