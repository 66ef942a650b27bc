"""A transformers SegFormer face parser (e.g. ``jonathandinu/face-parsing``, trained on CelebAMask-HQ), with the
call contract of :class:`~freecure_ops.pipeline.face_parser.BiSeNetParser`: ``parser(image) -> label map``.

Its class ids are the model's own (``config.id2label``; jonathandinu/face-parsing orders them 0 background,
1 skin, 2 nose, 3 eye_g, ..., 13 hair, 14 hat, unlike BiSeNet's 17 hair): :attr:`SegFormerParser.labels` is the
name -> id mapping built from those names, which :func:`~freecure_ops.pipeline.attributes.label_table_for`
turns into the attribute table. Preprocessing follows the model's ``preprocessor_config.json``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import torch
import torch.nn as nn
import torch.nn.functional as F

from .face_parser import IMAGENET_MEAN, IMAGENET_STD, _check_size, _image_to_batch

__all__ = ["SegFormerParser", "labels_from_id2label"]

# SegformerImageProcessor's defaults, for a model saved without a preprocessor_config.json
_DEFAULT_PREPROCESSING = {"size": {"height": 512, "width": 512}, "image_mean": list(IMAGENET_MEAN),
                          "image_std": list(IMAGENET_STD)}


def labels_from_id2label(id2label: Mapping) -> Mapping[str, int]:
    """``{name: id}`` from a transformers ``id2label`` (int or str ids). Names are lower-cased and stripped of a
    ``.png`` suffix (an early config of jonathandinu/face-parsing named its classes ``"hair.png"``, ...)."""
    if not isinstance(id2label, Mapping) or not id2label:
        raise ValueError(f"id2label must be a non-empty mapping of class id -> name, got {id2label!r}")
    labels: dict[str, int] = {}
    for i, name in id2label.items():
        if not isinstance(name, str):
            raise ValueError(f"id2label[{i!r}] must be a name (str), got {name!r}")
        key = name.strip().lower().removesuffix(".png")
        if key in labels:
            raise ValueError(f"id2label names class ids {labels[key]} and {i} both {key!r}; pass labels= instead")
        labels[key] = int(i)
    return MappingProxyType(labels)


def _preprocessor_config(spec, revision, offline) -> dict:
    """The model's preprocessor_config.json as a dict; ``{}`` when the folder or repo has none."""
    from freecure_ops.hub import WeightsNotFoundError, resolve_file, split_file_spec

    local = Path(os.path.expanduser(os.fspath(spec)))
    if local.is_dir():
        path = local / "preprocessor_config.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    file_spec = f"{spec}/preprocessor_config.json"
    try:
        path = resolve_file(file_spec, revision=revision, offline=offline)
    except WeightsNotFoundError:
        from huggingface_hub import _CACHED_NO_EXIST, try_to_load_from_cache

        # the Hub said so once (a 404 leaves a ".no_exist" marker in the cache): the repo has none
        if try_to_load_from_cache(*split_file_spec(file_spec), revision=revision) is _CACHED_NO_EXIST:
            return {}
        raise
    return json.loads(path.read_text(encoding="utf-8"))


def _preprocessing(cfg: Mapping) -> tuple[tuple[int, int] | None, tuple, tuple]:
    """(input size or None for the image's own, mean, std) from a SegformerImageProcessor config."""
    cfg = {**_DEFAULT_PREPROCESSING, **cfg}
    size = cfg["size"]
    if isinstance(size, Mapping):
        size = (size["height"], size["width"])
    size = _check_size("preprocessor_config.json size", size) if cfg.get("do_resize", True) else None
    if cfg.get("do_normalize", True):
        return size, tuple(cfg["image_mean"]), tuple(cfg["image_std"])
    return size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


class SegFormerParser:
    """A face parser over a transformers ``SegformerForSemanticSegmentation``: ``parser(image) -> label map``
    (int64 ``[H, W]``, or ``[B, H, W]`` for a batch or list), at the input's size, with the ids of ``labels``.

    As transformers' ``post_process_semantic_segmentation``: RGB in [0, 1] resized to ``input_size``
    (bilinear, antialiased), normalized with ``mean``/``std``; the logits (1/4 of the input size) are resized
    bilinearly to the image's size, then argmax. Accepts the image kinds BiSeNetParser accepts.
    """

    def __init__(self, model: nn.Module, *, labels: Mapping[str, int] | None = None, input_size=512,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, device=None, dtype: torch.dtype | None = None):
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"model must be a transformers SegformerForSemanticSegmentation, got "
                            f"{type(model).__name__}")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        n_classes = int(model.config.num_labels)
        labels = labels_from_id2label(model.config.id2label) if labels is None else labels
        if not isinstance(labels, Mapping) or not all(isinstance(k, str) and isinstance(v, int)
                                                      and not isinstance(v, bool) for k, v in labels.items()):
            raise TypeError("labels must be a mapping of label name (str) -> class id (int)")
        if any(not 0 <= v < n_classes for v in labels.values()):
            raise ValueError(f"labels: every id must be in [0, {n_classes}), got {dict(labels)}")
        from .attributes import label_table_for

        if not label_table_for(labels):
            raise ValueError(f"labels: none of the model's class names {sorted(labels)} is a face part this "
                             f"package knows (CelebAMask-HQ names: hair, l_eye, eye_g, hat, ...); pass labels= "
                             f"mapping those names to the model's ids")
        self.labels = labels
        self.input_size = None if input_size is None else _check_size("input_size", input_size)
        for name, v in (("mean", mean), ("std", std)):
            if (len(tuple(v)) != 3 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
                    or (name == "std" and min(v) <= 0)):
                raise ValueError(f"{name} must be three numbers (RGB){' > 0' if name == 'std' else ''}, got {v!r}")
        self.mean, self.std = tuple(float(x) for x in mean), tuple(float(x) for x in std)
        self.model = model.to(device=device, dtype=dtype).eval()

    @classmethod
    def from_pretrained(cls, spec, *, revision: str | None = None, offline: bool | None = None,
                        device="cpu", dtype: torch.dtype = torch.float32, labels: Mapping[str, int] | None = None,
                        input_size=None) -> SegFormerParser:
        """Load a SegFormer face-parsing model from a local folder (``save_pretrained``) or a Hub model id
        (``"jonathandinu/face-parsing"``; downloaded at ``revision`` unless offline: ``offline=True`` or
        ``HF_HUB_OFFLINE=1``, see :mod:`freecure_ops.hub`). ``input_size`` overrides the preprocessor
        config's size; ``labels`` overrides the names of ``config.id2label``."""
        from transformers import SegformerForSemanticSegmentation

        from freecure_ops.hub import load_pretrained

        model = load_pretrained(SegformerForSemanticSegmentation, spec, revision=revision, offline=offline)
        size, mean, std = _preprocessing(_preprocessor_config(spec, revision, offline))
        return cls(model, labels=labels, input_size=size if input_size is None else input_size, mean=mean, std=std,
                   device=device, dtype=dtype)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def preprocess(self, batch: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> normalized pixel values on the model's device and dtype."""
        x = batch.to(device=self.device, dtype=torch.float32)
        if self.input_size is not None and tuple(x.shape[2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.dtype)

    @torch.no_grad()
    def logits(self, image) -> torch.Tensor:
        """The model's class logits ``[B, n_classes, h, w]`` (float32, 1/4 of the network input)."""
        batch, _ = _image_to_batch(image)
        self.model.eval()
        return self.model(pixel_values=self.preprocess(batch)).logits.float()

    @torch.no_grad()
    def __call__(self, image) -> torch.Tensor:
        batch, batched = _image_to_batch(image)
        logits = self.logits(batch)
        logits = F.interpolate(logits, size=tuple(batch.shape[2:]), mode="bilinear", align_corners=False)
        labels = logits.argmax(dim=1).to(device=batch.device, dtype=torch.int64)
        return labels if batched else labels[0]
