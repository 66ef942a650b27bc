"""BiSeNet face parser with the architecture of the common ``79999_iter.pth`` CelebAMask-HQ checkpoint.

The network reproduces the module tree of zllrunning/face-parsing.PyTorch (``BiSeNet(n_classes=19)``) so
that the checkpoint's state-dict keys load strictly: a ResNet18 context path (``cp.resnet.*``), attention
refinement modules (``cp.arm16``, ``cp.arm32``), heads (``cp.conv_head32``, ``cp.conv_head16``,
``cp.conv_avg``), the feature fusion module (``ffm.*``) and three output heads (``conv_out``, ``conv_out16``,
``conv_out32``). As in that checkpoint, there is no separate spatial-path module: the ResNet's 1/8-scale
feature takes its place, so no ``sp.*`` keys exist.

The ResNet18 backbone is built here (no torchvision) with random initial weights, and weights come only from
a file the caller names, loaded with ``torch.load(weights_only=True)`` (no pickled code runs) or from
safetensors: :meth:`BiSeNetParser.from_checkpoint` reads a local file and never downloads;
:meth:`BiSeNetParser.from_pretrained` also takes a Hub file (``"org/name/79999_iter.pth"``, see
:mod:`freecure_ops.hub`).

Labels of the checkpoint (SPEC.md, "Face-parsing labels") are in :data:`BISENET_CELEBAMASK_LABELS`; other
parsers bring their own name -> id table (see :func:`freecure_ops.pipeline.attributes.label_table_for`).
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "BISENET_CELEBAMASK_LABELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BiSeNet",
    "BiSeNetParser",
    "load_state_dict_file",
]

#: Class ids of the BiSeNet CelebAMask-HQ checkpoint (``79999_iter.pth``), name -> id. Read-only.
BISENET_CELEBAMASK_LABELS: Mapping[str, int] = MappingProxyType({
    "background": 0, "skin": 1, "l_brow": 2, "r_brow": 3, "l_eye": 4, "r_eye": 5, "eye_g": 6,
    "l_ear": 7, "r_ear": 8, "ear_r": 9, "nose": 10, "mouth": 11, "u_lip": 12, "l_lip": 13, "neck": 14,
    "neck_l": 15, "cloth": 16, "hair": 17, "hat": 18,
})

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------------
# Network (module and attribute names follow the checkpoint's state-dict keys; do not rename)
# ----------------------------------------------------------------------------------------------------------

class ConvBNReLU(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU. Keys: ``conv.weight``, ``bn.*``."""

    def __init__(self, in_chan: int, out_chan: int, ks: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chan, out_chan, kernel_size=ks, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_chan)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet basic block; the shortcut is ``downsample.0`` (1x1 conv) + ``downsample.1`` (BN) when needed."""

    def __init__(self, in_chan: int, out_chan: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chan, out_chan, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chan)
        self.conv2 = nn.Conv2d(out_chan, out_chan, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chan)
        self.downsample = None
        if in_chan != out_chan or stride != 1:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chan, out_chan, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chan),
            )

    def forward(self, x):
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


def _basic_layer(in_chan: int, out_chan: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_chan, out_chan, stride)]
    layers += [BasicBlock(out_chan, out_chan, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet18Backbone(nn.Module):
    """ResNet18 without the classifier; returns the 1/8, 1/16 and 1/32 scale features (128, 256, 512 ch)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _basic_layer(64, 64, 2, 1)
        self.layer2 = _basic_layer(64, 128, 2, 2)
        self.layer3 = _basic_layer(128, 256, 2, 2)
        self.layer4 = _basic_layer(256, 512, 2, 2)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        feat8 = self.layer2(x)
        feat16 = self.layer3(feat8)
        feat32 = self.layer4(feat16)
        return feat8, feat16, feat32


class AttentionRefinementModule(nn.Module):
    def __init__(self, in_chan: int, out_chan: int):
        super().__init__()
        self.conv = ConvBNReLU(in_chan, out_chan, ks=3, stride=1, padding=1)
        self.conv_atten = nn.Conv2d(out_chan, out_chan, kernel_size=1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_chan)

    def forward(self, x):
        feat = self.conv(x)
        atten = torch.sigmoid(self.bn_atten(self.conv_atten(F.adaptive_avg_pool2d(feat, 1))))
        return feat * atten


class ContextPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.resnet = ResNet18Backbone()
        self.arm16 = AttentionRefinementModule(256, 128)
        self.arm32 = AttentionRefinementModule(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128, ks=3, stride=1, padding=1)
        self.conv_head16 = ConvBNReLU(128, 128, ks=3, stride=1, padding=1)
        self.conv_avg = ConvBNReLU(512, 128, ks=1, stride=1, padding=0)

    def forward(self, x):
        feat8, feat16, feat32 = self.resnet(x)
        avg = self.conv_avg(F.adaptive_avg_pool2d(feat32, 1))
        avg_up = F.interpolate(avg, feat32.shape[2:], mode="nearest")
        feat32_sum = self.arm32(feat32) + avg_up
        feat32_up = self.conv_head32(F.interpolate(feat32_sum, feat16.shape[2:], mode="nearest"))
        feat16_sum = self.arm16(feat16) + feat32_up
        feat16_up = self.conv_head16(F.interpolate(feat16_sum, feat8.shape[2:], mode="nearest"))
        return feat8, feat16_up, feat32_up  # 1/8, 1/8, 1/16


class FeatureFusionModule(nn.Module):
    def __init__(self, in_chan: int, out_chan: int):
        super().__init__()
        self.convblk = ConvBNReLU(in_chan, out_chan, ks=1, stride=1, padding=0)
        self.conv1 = nn.Conv2d(out_chan, out_chan // 4, kernel_size=1, bias=False)
        self.conv2 = nn.Conv2d(out_chan // 4, out_chan, kernel_size=1, bias=False)

    def forward(self, fsp, fcp):
        feat = self.convblk(torch.cat([fsp, fcp], dim=1))
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(F.adaptive_avg_pool2d(feat, 1)))))
        return feat * atten + feat


class BiSeNetOutput(nn.Module):
    def __init__(self, in_chan: int, mid_chan: int, n_classes: int):
        super().__init__()
        self.conv = ConvBNReLU(in_chan, mid_chan, ks=3, stride=1, padding=1)
        self.conv_out = nn.Conv2d(mid_chan, n_classes, kernel_size=1, bias=False)

    def forward(self, x):
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """BiSeNet of face-parsing.PyTorch. ``forward(x)`` returns the main logits ``[B, n_classes, H, W]``
    (bilinear, align_corners=True, as the original); ``return_aux=True`` also returns the two auxiliary
    heads' logits (used only in training, kept so the checkpoint loads strictly)."""

    def __init__(self, n_classes: int = 19):
        super().__init__()
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
            raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}")
        self.n_classes = n_classes
        self.cp = ContextPath()
        self.ffm = FeatureFusionModule(256, 256)
        self.conv_out = BiSeNetOutput(256, 256, n_classes)
        self.conv_out16 = BiSeNetOutput(128, 64, n_classes)
        self.conv_out32 = BiSeNetOutput(128, 64, n_classes)

    def forward(self, x, return_aux: bool = False):
        size = x.shape[2:]
        feat_res8, feat_cp8, feat_cp16 = self.cp(x)
        out = self.conv_out(self.ffm(feat_res8, feat_cp8))
        out = F.interpolate(out, size, mode="bilinear", align_corners=True)
        if not return_aux:
            return out
        out16 = F.interpolate(self.conv_out16(feat_cp8), size, mode="bilinear", align_corners=True)
        out32 = F.interpolate(self.conv_out32(feat_cp16), size, mode="bilinear", align_corners=True)
        return out, out16, out32


# ----------------------------------------------------------------------------------------------------------
# Checkpoint loading
# ----------------------------------------------------------------------------------------------------------

def _check_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: face-parser checkpoint not found: {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"path: expected a checkpoint file (.pth/.pt/.safetensors), got a directory: {path!r}")
    return path


def load_state_dict_file(path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path`` without executing pickled code.

    ``*.safetensors`` goes through safetensors; anything else through ``torch.load(path, map_location="cpu",
    weights_only=True)``, which refuses pickles holding arbitrary objects (raised here as ValueError). A dict
    wrapping the weights under ``"state_dict"`` or ``"model"``, and a ``"module."`` prefix from
    DataParallel, are unwrapped.
    """
    path = _check_path(path)
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - safetensors comes with diffusers
            raise ImportError(f"path: {path!r} is a .safetensors file but the safetensors package is not "
                              f"installed (pip install safetensors)") from e
        try:
            obj = load_file(path, device="cpu")
        except Exception as e:
            raise ValueError(f"path: could not read safetensors checkpoint {path!r}: {e}") from e
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"path: refused to load {path!r} with weights_only=True: it holds objects other than tensors "
                f"and plain containers, and loading it would execute pickled code. Re-save its state_dict "
                f"(torch.save(model.state_dict(), ...)) or convert it to safetensors. Detail: {e}") from e
        except Exception as e:
            raise ValueError(f"path: could not read checkpoint {path!r}: {type(e).__name__}: {e}") from e
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in obj.items()):
        raise ValueError(f"path: {path!r} does not hold a state dict (a mapping of str -> tensor); got "
                         f"{type(obj).__name__}")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


#: the most classes a parser head may have (CelebAMask-HQ has 19; LaPa 11; generous for custom label sets)
MAX_CLASSES = 1024


def _classes_from_head(state: Mapping[str, torch.Tensor], path: str) -> int:
    """The class count of a checkpoint's main head, checked against the architecture before anything is built."""
    head = state.get("conv_out.conv_out.weight")
    if not isinstance(head, torch.Tensor) or head.dim() != 4:
        return 19  # the strict key/shape check reports what is wrong
    n = int(head.shape[0])
    if not 2 <= n <= MAX_CLASSES or tuple(head.shape[1:]) != (256, 1, 1):
        raise ValueError(f"path: {path!r} is not a BiSeNet (face-parsing.PyTorch) checkpoint: its head "
                         f"conv_out.conv_out.weight has shape {tuple(head.shape)}, expected [n_classes, 256, 1, 1] "
                         f"with 2 <= n_classes <= {MAX_CLASSES}")
    return n


def _load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], path: str) -> None:
    """Strict key and shape check with a readable error; missing BatchNorm ``num_batches_tracked`` buffers
    (absent from checkpoints saved by old PyTorch releases, unused in eval) are tolerated. ``model`` may live
    on the meta device: then only the check runs (nothing is loaded or allocated)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def _fmt(keys, limit=12):
            shown = ", ".join(keys[:limit])
            return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_fmt(shapes, 6)}")
        raise ValueError(f"path: {path!r} is not a BiSeNet (face-parsing.PyTorch, n_classes="
                         f"{getattr(model, 'n_classes', '?')}) checkpoint: " + "; ".join(parts))
    if any(v.is_meta for v in own.values()):
        return
    full = dict(state)
    for k, v in own.items():
        if k not in full:  # num_batches_tracked only
            full[k] = v
    model.load_state_dict(full, strict=True)


# ----------------------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------------------

def _check_size(name: str, size) -> tuple[int, int]:
    if isinstance(size, bool):
        raise TypeError(f"{name} must be an int or a (height, width) pair, got bool")
    if isinstance(size, int):
        size = (size, size)
    if (not isinstance(size, Sequence) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in size)):
        raise TypeError(f"{name} must be an int or a (height, width) pair of ints, got {size!r}")
    if min(size) < 32:
        raise ValueError(f"{name} must be at least 32 pixels per side (the backbone downsamples by 32), "
                         f"got {tuple(size)}")
    return int(size[0]), int(size[1])


def _image_to_batch(image) -> tuple[torch.Tensor, bool]:
    """Any accepted image kind -> (float tensor [B, 3, H, W] in [0, 1], whether the input was batched)."""
    if isinstance(image, (list, tuple)):
        if len(image) == 0:
            raise ValueError("image: got an empty list")
        items = [_image_to_batch(im)[0] for im in image]
        shapes = {tuple(t.shape[2:]) for t in items}
        if len(shapes) != 1:
            raise ValueError(f"image: all images of a list must have one size, got {sorted(shapes)}")
        return torch.cat([t.to(items[0].device) for t in items]), True
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))  # a writable copy
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image: a numpy image must be uint8 [H, W, 3], got dtype {image.dtype}")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image: a numpy image must have shape [H, W, 3], got {image.shape}")
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        return t.unsqueeze(0), False
    if isinstance(image, torch.Tensor):
        if not image.dtype.is_floating_point:
            raise TypeError(f"image: a tensor image must be floating point in [0, 1] with shape [3, H, W] or "
                            f"[B, 3, H, W], got dtype {image.dtype}")
        if image.dim() not in (3, 4) or image.shape[-3] != 3:
            raise ValueError(f"image: a tensor image must have shape [3, H, W] or [B, 3, H, W], "
                             f"got {tuple(image.shape)}")
        if image.numel() == 0:
            raise ValueError(f"image: got an empty tensor of shape {tuple(image.shape)}")
        lo, hi = float(image.min()), float(image.max())
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"image: tensor values must be finite and in [0, 1], got range [{lo:.4g}, {hi:.4g}] "
                             f"(an image in [-1, 1] needs (x + 1) / 2 first)")
        batched = image.dim() == 4
        return (image if batched else image.unsqueeze(0)), batched
    raise TypeError(f"image must be a PIL image, a uint8 numpy array [H, W, 3], a float tensor [3, H, W] or "
                    f"[B, 3, H, W] in [0, 1], or a list of those; got {type(image).__name__}")


class BiSeNetParser:
    """A face parser: ``parser(image) -> label map`` (int64 ``[H, W]``, or ``[B, H, W]`` for a batched tensor
    or a list of images), at the input's size, with the ids of ``labels``.

    Preprocessing as the checkpoint was trained and evaluated: RGB in [0, 1], resized to ``input_size``
    (default 512x512; bilinear with antialiasing, which matches PIL's bilinear resize of the original
    script), ImageNet mean/std normalization. The net runs in eval mode under ``torch.no_grad``; the argmax
    label map is resized back to the input size with nearest interpolation (source index ``floor(i * 512 / H)``,
    the rule of torch's "nearest", OpenCV's INTER_NEAREST and ``freecure_ops.masks.resize_mask_to_grid``). A tensor
    input gets its result on its own device; PIL and numpy inputs get a CPU tensor.
    """

    def __init__(self, net: BiSeNet | None = None, *, labels: Mapping[str, int] | None = None,
                 input_size=512, device=None, dtype: torch.dtype | None = None):
        if net is None:
            net = BiSeNet(19)
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module (BiSeNet), got {type(net).__name__}")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        n_classes = getattr(net, "n_classes", None)
        if labels is None:
            labels = BISENET_CELEBAMASK_LABELS if n_classes in (None, 19) else None
        if labels is not None:
            if not isinstance(labels, Mapping) or not all(isinstance(k, str) and isinstance(v, int)
                                                          for k, v in labels.items()):
                raise TypeError("labels must be a mapping of label name (str) -> class id (int)")
            if n_classes is not None and any(not 0 <= v < n_classes for v in labels.values()):
                raise ValueError(f"labels: every id must be in [0, {n_classes}), got {dict(labels)}")
        self.labels = labels
        self.input_size = _check_size("input_size", input_size)
        self.net = net.to(device=device, dtype=dtype).eval()

    @classmethod
    def from_checkpoint(cls, path, *, device="cpu", dtype: torch.dtype = torch.float32,
                        n_classes: int | None = None, labels: Mapping[str, int] | None = None,
                        input_size=512) -> BiSeNetParser:
        """Build the net and load ``path`` (e.g. ``79999_iter.pth``) strictly, then move it to ``device`` /
        ``dtype``. ``n_classes`` defaults to the checkpoint's (from ``conv_out.conv_out.weight``).

        Raises FileNotFoundError for a missing file and ValueError (naming the path and the missing,
        unexpected or mis-shaped keys) for a file that is not this architecture's state dict, and for a
        pickle that holds arbitrary objects (never executed).
        """
        state = load_state_dict_file(path)
        if n_classes is None:
            n_classes = _classes_from_head(state, os.fspath(path))
        elif isinstance(n_classes, bool) or not isinstance(n_classes, int) or not 2 <= n_classes <= MAX_CLASSES:
            raise ValueError(f"n_classes must be an int in [2, {MAX_CLASSES}], got {n_classes!r}")
        with torch.device("meta"):  # keys and shapes first, at no memory cost: nothing sized by the file is built
            _load_strict(BiSeNet(n_classes), state, os.fspath(path))
        net = BiSeNet(n_classes)
        _load_strict(net, state, os.fspath(path))
        return cls(net, labels=labels, input_size=input_size, device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, spec, *, revision: str | None = None, offline: bool | None = None,
                        **kwargs) -> BiSeNetParser:
        """:meth:`from_checkpoint` of a local file or a Hub file ``"org/name/79999_iter.pth"`` (downloaded into
        the Hugging Face cache at ``revision`` unless offline: ``offline=True`` or ``HF_HUB_OFFLINE=1``), as
        :func:`freecure_ops.hub.resolve_file` resolves it. ``kwargs``: those of :meth:`from_checkpoint`."""
        from freecure_ops.hub import resolve_file

        return cls.from_checkpoint(resolve_file(spec, revision=revision, offline=offline), **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    def preprocess(self, batch: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> normalized [B, 3, *input_size] on the net's device and dtype."""
        x = batch.to(device=self.device, dtype=torch.float32)
        if tuple(x.shape[2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.dtype)

    @torch.no_grad()
    def logits(self, image) -> torch.Tensor:
        """Class logits ``[B, n_classes, *input_size]`` (float32) of any accepted image kind."""
        batch, _ = _image_to_batch(image)
        self.net.eval()
        return self.net(self.preprocess(batch)).float()

    @torch.no_grad()
    def __call__(self, image) -> torch.Tensor:
        batch, batched = _image_to_batch(image)
        out_device = batch.device
        height, width = batch.shape[2:]
        self.net.eval()
        labels = self.net(self.preprocess(batch)).argmax(dim=1)  # [B, *input_size]
        if tuple(labels.shape[1:]) != (height, width):
            labels = F.interpolate(labels[:, None].float(), size=(height, width), mode="nearest")[:, 0]
        labels = labels.to(device=out_device, dtype=torch.int64)
        return labels if batched else labels[0]
