"""Face embeddings for identity fidelity (IF): a crop/alignment step, then a pluggable recognition model.

IF of a generated image = ``100 * cos(embed(face(generated)), embed(face(reference)))``, where

* ``face(...)`` is the crop/alignment step (:func:`crop_face`), the same for both images:

  - with a *detector* (a Python callable ``image RGB uint8 [H, W, 3] -> None | box | landmarks``): five
    landmarks (left eye, right eye, nose, left and right mouth corners, ``[5, 2]`` pixels) are aligned to
    ArcFace's canonical 112x112 template (:data:`ARCFACE_TEMPLATE_112`, scaled to the model's input size) by a
    least-squares similarity transform (Umeyama), as InsightFace does; a box ``(x0, y0, x1, y1)`` is cut as
    the square around its centre with side ``max(w, h)``; None means no face (the job gets no IF);
  - without one, ``"center:F"`` (default ``center:1.0``): the centred square whose side is ``F`` times the
    image's shorter side; ``"full"``: the whole image. Generated portraits are face-centred, so this is a
    usable default, but not the detection + alignment the published numbers use: for comparable numbers,
    give a detector (e.g. a 3-line wrapper around InsightFace's RetinaFace/SCRFD returning ``kps``).

* ``embed(...)`` is any callable ``face RGB uint8 [h, w, 3] -> 1-D embedding``: an ONNX ArcFace-style model
  run with onnxruntime (:class:`OnnxFaceEmbedder`: resized to the model's input size with bilinear
  filtering, ``(x - 127.5) / 127.5``, RGB, NCHW, as InsightFace's ``w600k_r50.onnx`` / ``glintr100.onnx``
  expect) or a Python callable (``module:function``, :func:`load_face_embedder`).

Nothing is downloaded: models come from paths the user gives.
"""
from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["ARCFACE_TEMPLATE_112", "OnnxFaceEmbedder", "load_face_embedder", "load_callable", "parse_crop",
           "crop_face", "align_face", "similarity_transform", "embedding_size", "cosine_similarity"]

#: ArcFace's 5-point template (InsightFace ``arcface_dst``) for a 112x112 crop: eyes, nose, mouth corners.
ARCFACE_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)

#: onnxruntime's input types we can feed -> the numpy dtype
_ONNX_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
_CALLABLE_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")  # used with fullmatch


def load_callable(spec: str) -> Callable:
    """``"package.module:attr"`` -> the object (ValueError naming what is missing)."""
    if not _CALLABLE_RE.fullmatch(spec):
        raise ValueError(f"expected module:function, got {spec!r}")
    mod_name, attr = spec.split(":")
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"cannot import {mod_name}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{mod_name} has no {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec} is not callable")
    return obj


class OnnxFaceEmbedder:
    """An ArcFace-style recognition model in ONNX, run with onnxruntime: ``face -> embedding``.

    The input size and layout (NCHW or NHWC) are read from the model's first input (112x112 when its
    spatial dims are symbolic). ``mean``/``std``: per-pixel normalisation ``(x - mean) / std`` on 0..255
    values (ArcFace: 127.5 / 127.5). ``bgr``: feed BGR instead of RGB."""

    def __init__(self, path, *, mean: float = 127.5, std: float = 127.5, bgr: bool = False, providers=None):
        import onnxruntime as ort

        self.path = Path(path)
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(self.path), providers=providers)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = list(inp.shape)
        if len(shape) != 4:
            raise ValueError(f"{self.path}: expected a 4-D image input, got shape {shape}")
        if inp.type not in _ONNX_FLOATS:
            raise ValueError(f"{self.path}: expected a float image input, got {inp.type}")
        self.input_dtype = _ONNX_FLOATS[inp.type]
        # a model exported with a fixed batch takes exactly that many faces: the face is repeated to fill it
        self.batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else 1
        out = self.session.get_outputs()[0].shape
        size = out[-1] if out and isinstance(out[-1], int) else None
        if size is not None and size < 2:
            raise ValueError(f"{self.path}: the embedding has {size} value; identity fidelity is a cosine and needs "
                             "an embedding of at least 2 values")
        self.nhwc = shape[-1] == 3 and shape[1] != 3
        h, w = (shape[1], shape[2]) if self.nhwc else (shape[2], shape[3])
        self.input_size = (h if isinstance(h, int) else 112, w if isinstance(w, int) else 112)
        self.mean, self.std, self.bgr = float(mean), float(std), bool(bgr)

    def __repr__(self):
        return f"OnnxFaceEmbedder({str(self.path)!r}, input_size={self.input_size})"

    def preprocess(self, face: np.ndarray) -> np.ndarray:
        """RGB uint8 ``[h, w, 3]`` -> the model's input ``[batch, ...]`` in its float type."""
        from PIL import Image

        h, w = self.input_size
        img = Image.fromarray(np.asarray(face, dtype=np.uint8)).convert("RGB")
        if img.size != (w, h):
            img = img.resize((w, h), Image.BILINEAR)
        x = (np.asarray(img, dtype=np.float32) - self.mean) / self.std
        if self.bgr:
            x = x[..., ::-1]
        x = x[None] if self.nhwc else x.transpose(2, 0, 1)[None]
        return np.ascontiguousarray(np.repeat(x, self.batch, axis=0), dtype=self.input_dtype)

    def __call__(self, face: np.ndarray) -> np.ndarray:
        out = np.asarray(self.session.run(None, {self.input_name: self.preprocess(face)})[0], dtype=np.float64)
        if out.ndim >= 2 and out.shape[0] == self.batch:  # the first face's embedding (the rest are copies)
            out = out[0]
        return out.reshape(-1)


def load_face_embedder(spec) -> Callable:
    """``--face-model``: an ``.onnx`` file (or any existing file: ONNX) or ``module:function``."""
    if callable(spec):
        return spec
    text = str(spec)
    p = Path(text).expanduser()
    if p.is_file():
        return OnnxFaceEmbedder(p)
    if _CALLABLE_RE.fullmatch(text) and not p.suffix == ".onnx":
        return load_callable(text)
    raise ValueError("no such file (an ONNX face-recognition model) and not a module:function")


def parse_crop(text: str) -> tuple[str, float]:
    """``"full"`` or ``"center[:F]"`` with F in (0, 1] -> (mode, fraction)."""
    t = text.strip().lower()
    if t == "full":
        return "full", 1.0
    if t == "center" or t.startswith("center:"):
        frac = 1.0
        if ":" in t:
            try:
                frac = float(t.split(":", 1)[1])
            except ValueError:
                frac = float("nan")
        if not 0.0 < frac <= 1.0:  # NaN fails too
            raise ValueError(f"center:F needs F in (0, 1], got {text!r}")
        return "center", frac
    raise ValueError(f"expected full or center[:F], got {text!r}")


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping ``src`` points onto ``dst``
    (Umeyama 1991): a 2x3 matrix ``M`` with ``dst ~ M @ [x, y, 1]``."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    e = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        e[1, 1] = -1
    r = u @ e @ vt
    var = (s ** 2).sum() / len(src)
    scale = (sig * np.diag(e)).sum() / var if var > 0 else 1.0
    t = mu_d - scale * r @ mu_s
    return np.hstack([scale * r, t[:, None]])


def align_face(image, landmarks, size=(112, 112)):
    """Warp ``image`` (PIL) so its 5 landmarks land on ArcFace's template scaled to ``size`` (h, w)."""
    from PIL import Image

    h, w = size
    dst = ARCFACE_TEMPLATE_112 * np.array([w / 112.0, h / 112.0])
    m = np.vstack([similarity_transform(landmarks, dst), [0, 0, 1]])
    inv = np.linalg.inv(m)  # PIL maps output pixels back to input pixels
    return image.transform((w, h), Image.AFFINE, data=tuple(inv[:2].reshape(-1)), resample=Image.BILINEAR)


def crop_face(image, crop="center:1.0", detector: Callable | None = None, size=(112, 112)):
    """The face of ``image`` (PIL) as a PIL RGB image, or None when the detector finds none (see the module
    docstring for the rules)."""
    image = image.convert("RGB")
    if detector is not None:
        found = detector(np.asarray(image))
        if found is None:
            return None
        arr = np.asarray(found, dtype=np.float64)
        if arr.shape == (5, 2):
            return align_face(image, arr, size)
        if arr.shape == (4,):
            x0, y0, x1, y1 = arr
            cx, cy, side = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0)
            if not side > 0:
                return None
            return image.crop(tuple(int(round(v)) for v in (cx - side / 2, cy - side / 2, cx + side / 2,
                                                             cy + side / 2)))
        raise ValueError(f"the face detector must return None, a box (x0, y0, x1, y1) or 5 landmarks [5, 2], "
                         f"got shape {arr.shape}")
    mode, frac = parse_crop(crop) if isinstance(crop, str) else crop
    if mode == "full":
        return image
    w, h = image.size
    side = max(1, int(round(frac * min(w, h))))
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def embedding_size(embed: Callable, size=None) -> int | None:
    """The number of values ``embed`` returns for a mid-grey face of ``size`` (default: its ``input_size``, else
    112x112); None when it returns None (a callable may refuse a face it finds none in)."""
    h, w = size or getattr(embed, "input_size", (112, 112))
    out = embed(np.full((h, w, 3), 128, np.uint8))
    return None if out is None else int(np.asarray(out).size)


def cosine_similarity(a, b) -> float:
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"embeddings differ in size: {a.shape[0]} and {b.shape[0]}")
    if a.size < 2:  # the cosine of two numbers is their signs' product: IF would be +-100
        raise ValueError(f"embeddings of {a.size} value(s): a cosine similarity needs at least 2")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0 or not np.isfinite(na * nb):
        return float("nan")
    return float(a @ b / (na * nb))
