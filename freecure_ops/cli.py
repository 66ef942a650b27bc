"""``freecure``: the command line.

    freecure generate --model PATH_OR_ID --prompt "a photo of sks man with red hair" \\
                      --fd-prompt "a photo of a man with red hair" --parser-weights 79999_iter.pth --out out/
    freecure bench [benchmark options]          # the FASA benchmark (python -m bench)
    freecure manifest --identity alice=woman ... --out grid.jsonl      # the paper's evaluation grid
    freecure batch --manifest grid.jsonl --model DIR --out runs/grid  # many jobs; resumable; accelerate launch
    freecure eval --results runs/grid --clip CLIP_DIR --face-model arcface.onnx --reference alice=a.jpg

``generate`` loads a diffusers SD1.x/SD2.x, SDXL or FLUX pipeline with ``DiffusionPipeline.from_pretrained(...,
local_files_only=True)`` (nothing is downloaded), runs :class:`freecure_ops.pipeline.freecure.FreeCure` and
writes ``pd.png`` (the FreeCure image), ``fd.png`` (the foundation image), ``mask.png`` (the attribute mask)
and ``freecure.json`` (prompts, attributes, settings, timings) to ``--out``. The PD prompt carries the
identity (e.g. a DreamBooth / textual-inversion token), the FD prompt is the same without it. The mask comes
from ``--mask PNG`` (white = attribute) or from a BiSeNet face parser (``--parser-weights``).

Every argument is checked before the model (or the parser) is loaded: a bad value, a missing or unreadable
file, an ``--out`` that cannot be written, a device that does not exist. Exit status: 0 on success, 2 for a
usage problem (bad option, missing weights, unknown model family, empty mask, ...), with a one-line
``freecure: error: ...`` message that names the flag. Output files are written atomically.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

from .outputs import atomic_write, atomic_write_text, output_dir_problem

__all__ = ["main", "build_parser"]

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
#: the images ``generate`` writes; one a run did not produce is removed from ``--out`` (nothing else is)
GENERATE_OUTPUTS = ("pd.png", "fd.png", "mask.png")


class CLIError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``freecure: error: argument --omega: ...``), exit status 2."""

    def error(self, message):
        self.exit(2, f"freecure: error: {' '.join(str(message).split())} (see {self.prog} --help)\n")


#: Python argument names (as library messages spell them) -> the CLI flag
_FLAGS = {"omega": "--omega", "layers": "--layers", "style_fidelity": "--style-fidelity", "mode": "--mode",
          "backend": "--backend", "empty_mask": "--empty-mask", "gamma": "--gamma", "height": "--height",
          "width": "--width", "guidance_scale": "--guidance-scale", "num_inference_steps": "--steps",
          "apg_template": "--apg-template", "seed": "--seed", "mask": "--mask", "fd_reuse": "--fd-reuse"}


def flag_message(text: str) -> str:
    """Rewrite a library message for the CLI user: ``layers='all'`` -> ``--layers all``, ``layers=None`` ->
    ``no --layers``, a leading ``layers ...`` -> ``--layers ...``."""
    names = "|".join(sorted(_FLAGS, key=len, reverse=True))

    def repl(m):
        flag, value = _FLAGS[m.group(1)], m.group(2).strip("'\"")
        return f"no {flag}" if value == "None" else f"{flag} {value}"

    text = re.sub(rf"\b({names})=('[^']*'|\"[^\"]*\"|[^\s,;:)]+)", repl, text)
    return re.sub(rf"^({names})\b", lambda m: _FLAGS[m.group(1)], text)


def _layers(text: str):
    if text == "all":
        return "all"
    try:
        return sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers must be 'all' or comma-separated block indices, got {text!r}")


def _fraction(text: str) -> float:
    v = float(text)
    if not 0.0 < v <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="freecure", description="FreeCure (FASA + APG) for diffusers pipelines.")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="generate one image with FreeCure",
                       description="Two passes: the FD image, its attribute mask, then PD + FD with FASA.")
    g.add_argument("--model", required=True, help="local pipeline folder or a Hugging Face id already in the cache")
    g.add_argument("--prompt", required=True, help="PD prompt (with the identity, e.g. a DreamBooth token)")
    g.add_argument("--fd-prompt", help="FD prompt (the same without the identity); default: --prompt")
    g.add_argument("--negative-prompt", help="negative prompt for both branches")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--mask", type=Path, help="attribute mask PNG (white = attribute); skips pass 1")
    src.add_argument("--parser-weights", type=Path, help="BiSeNet face-parser checkpoint (e.g. 79999_iter.pth)")
    g.add_argument("--omega", type=float, help="FASA strength (default: the model family's preset)")
    g.add_argument("--layers", type=_layers, help="'all' or block indices, e.g. 50,51,52 (default: preset)")
    g.add_argument("--style-fidelity", type=float, default=1.0,
                   help="blend of the unconditional PD row: (1 - sf) * FASA + sf * plain, in [0, 1]")
    g.add_argument("--mode", choices=("bias", "scale"), default="bias")
    g.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto")
    g.add_argument("--fd-reuse", choices=("auto", "device", "host", "off"), default="auto",
                   help="keep pass 1's FD keys/values for pass 2, which then runs the PD rows alone: on the device, "
                        "in pinned host memory, or off (recompute); auto: the device when it fits, else host, else off")
    g.add_argument("--apg", action="store_true", help="apply Asymmetric Prompt Guidance")
    g.add_argument("--gamma", type=_fraction, default=0.5, help="APG inversion depth (fraction of the steps)")
    g.add_argument("--apg-template", help="APG template prompt (default: --prompt without its attribute words)")
    g.add_argument("--empty-mask", choices=("error", "warn"), default="error",
                   help="what to do when parsing finds no attribute pixel")
    g.add_argument("--steps", type=int, default=30, help="denoising steps")
    g.add_argument("--guidance-scale", type=float, help="default: the pipeline's")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--height", type=int, help="image height in pixels, a multiple of 8 (default: the pipeline's)")
    g.add_argument("--width", type=int, help="image width in pixels, a multiple of 8 (default: the pipeline's)")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    g.add_argument("--dtype", choices=tuple(_DTYPES), help="default: fp16 on cuda, fp32 on cpu")
    g.add_argument("--out", required=True, type=Path, help="output folder (created; checked before any work)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    from . import batch, evaluate, grid  # their argparse setup only; nothing heavy is imported

    batch.add_arguments(sub)
    evaluate.add_arguments(sub)
    grid.add_arguments(sub)
    sub.add_parser("bench", help="the FASA benchmark (all further arguments go to it)", add_help=False)
    return ap


def _model_path_problem(model: str) -> str | None:
    """What is wrong with ``--model`` as a local folder (None: a pipeline folder, or a Hub id to look up)."""
    # a Hub id is "name" or "org/name"; anything else is meant as a folder
    looks_local = os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1 \
        or model.endswith("/") or (os.sep != "/" and os.sep in model)
    path = Path(model).expanduser()
    if path.exists() and not path.is_dir():
        return "expected a pipeline folder (with model_index.json), got a file"
    if path.is_dir() and not (path / "model_index.json").is_file():
        return ("no model_index.json in this folder; it is not a diffusers pipeline "
                "(save one with pipe.save_pretrained(folder))")
    if not path.exists() and looks_local:
        return "no such folder"
    return None


def _load_pipeline(model: str, device, dtype):
    from diffusers import DiffusionPipeline

    problem = _model_path_problem(model)
    if problem:
        raise CLIError(f"--model {model}: {problem}")
    path = Path(model).expanduser()
    try:
        with warnings.catch_warnings():  # torch_dtype: understood by every diffusers >= 0.32 (newer ones prefer dtype)
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(str(path) if path.exists() else model, local_files_only=True,
                                                     torch_dtype=dtype)
    except (OSError, ValueError) as e:  # EnvironmentError, missing files, not in the cache
        where = "folder" if path.exists() else "Hugging Face cache (downloads are off: local_files_only=True)"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"--model {model}: could not load the pipeline weights from the local {where}: {first}") from e
    return pipe.to(device)


def _save_mask(mask, path: Path) -> None:
    import numpy as np
    from PIL import Image

    m = mask.detach().float().cpu()
    if m.dim() == 3:
        m = m[0]
    m = (m / m.max()).nan_to_num(0.0) if float(m.max()) > 0 else m
    img = Image.fromarray((m.clamp(0, 1).numpy() * 255).round().astype(np.uint8), mode="L")
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


# ----------------------------------------------------------------------------------------------------------
# checks done before anything is loaded
# ----------------------------------------------------------------------------------------------------------

def read_mask_png(path: Path):
    """``--mask`` file -> float32 numpy ``[H, W]`` in [0, 1] (white = attribute; the rule of
    :func:`freecure_ops.masks.image_mask`, which the Python API applies to PIL masks too). Raises CLIError
    naming ``--mask`` for a missing, empty, truncated or undecodable file."""
    from PIL import Image

    from .masks import image_mask

    if not path.is_file():
        raise CLIError(f"--mask {path}: no such file")
    try:
        with Image.open(path) as im:
            return image_mask(im)
    except Exception as e:  # noqa: BLE001  (PIL raises UnidentifiedImageError, OSError, SyntaxError, ...)
        detail = " ".join(str(e).split()) or type(e).__name__
        raise CLIError(f"--mask {path}: not a readable image (empty, truncated or not PNG/JPEG/...): {detail}") from e


def _check_finite(flag: str, value, lo=None, hi=None) -> None:
    if value is None:
        return
    if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f" in [{lo}, {hi}]" if lo is not None and hi is not None else f" >= {lo}" if lo is not None else ""
        raise CLIError(f"{flag} must be a finite number{rng}, got {value}")
    problem = real_problem(flag, value)
    if problem:
        raise CLIError(problem)


def real_problem(name: str, value) -> str | None:
    """The op's rule for a scalar (finite, within float32 range: the kernel computes in float32), checked
    here so that 1e308 is refused before any model loads rather than at the first FASA call."""
    from freecure_ops.validation import check_real

    try:
        check_real(name, value)
    except (TypeError, ValueError) as e:
        return str(e)
    return None


def _model_index(model: str) -> dict:
    """model_index.json of a local pipeline folder ({} when it is not one; the loader reports that)."""
    path = Path(model).expanduser() / "model_index.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _size_multiple(model: str) -> int:
    """Height/width granularity of the pipeline in ``model`` (8 for SD/SDXL; FLUX packs 2x2 latent patches:
    2 * the VAE's scale factor, 16 for FLUX.1), read from the folder's configs without loading anything."""
    index = _model_index(model)
    if "flux" not in str(index.get("_class_name", "")).lower():
        return 8
    try:
        vae = json.loads((Path(model).expanduser() / "vae" / "config.json").read_text())
        return 2 * 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    except (OSError, ValueError):
        return 16


_UNET_ATTN_DOWN = ("CrossAttnDownBlock2D",)
_UNET_PLAIN_DOWN = ("DownBlock2D",)
_UNET_ATTN_UP = ("CrossAttnUpBlock2D",)
_UNET_PLAIN_UP = ("UpBlock2D",)


def _per_block(value, n):
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def model_blocks(model: str):
    """``(family, number of self-attention blocks)`` of the pipeline folder ``model``, read from its UNet or
    transformer config.json without loading anything (the count :func:`find_self_attention_blocks` gives),
    or None when the folder or its block types are not ones counted here (the loader reports later)."""
    root = Path(model).expanduser()
    try:
        cfg = json.loads((root / "transformer" / "config.json").read_text())
        if "Flux" in str(cfg.get("_class_name", "")):
            return "flux", int(cfg["num_layers"]) + int(cfg["num_single_layers"])
        return None
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        cfg = json.loads((root / "unet" / "config.json").read_text())
        down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
        if cfg.get("only_cross_attention") or not set(down) <= set(_UNET_ATTN_DOWN + _UNET_PLAIN_DOWN) \
                or not set(up) <= set(_UNET_ATTN_UP + _UNET_PLAIN_UP):
            return None
        n = len(down)
        layers = _per_block(cfg.get("layers_per_block", 2), n)
        depth = _per_block(cfg.get("transformer_layers_per_block", 1), n)
        rdepth = cfg.get("reverse_transformer_layers_per_block") or list(reversed(depth))
        rlayers = list(reversed(layers))
        total = sum(layers[i] * depth[i] for i in range(n) if down[i] in _UNET_ATTN_DOWN)
        mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        if mid == "UNetMidBlock2DCrossAttn":
            total += depth[-1]
        elif mid is not None:
            return None
        for i in range(n):  # a decoder stage has one more attention than its encoder twin
            if up[i] in _UNET_ATTN_UP:
                total += sum(rdepth[i]) if isinstance(rdepth[i], (list, tuple)) else (rlayers[i] + 1) * rdepth[i]
        family = "sdxl" if cfg.get("addition_embed_type") == "text_time" else "sd1"
        return family, int(total)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def layers_problem(layers, model_info) -> str | None:
    """What is wrong with ``layers`` (None: the preset, "all", or indices) for a model of ``model_info``
    (:func:`model_blocks`; None: unknown, nothing to check). Phrased after ``layers``."""
    if model_info is None or layers == "all":
        return None
    family, total = model_info
    if layers is None:
        from freecure_ops.adapters.presets import preset_blocks

        if family == "flux":
            return None  # the FLUX preset is relative to the block counts: never too small
        try:
            preset_blocks(family, [None] * total)
        except ValueError as e:
            return f"not given: {e}"
        return None
    bad = [i for i in layers if not 0 <= i < total]
    if bad:
        return f"{','.join(map(str, bad))}: the model has {total} self-attention blocks (0..{total - 1})"
    return None


def parser_weights_problem(path: Path) -> str | None:
    """What is wrong with ``--parser-weights`` as a file, from its first bytes (None: it may be a checkpoint;
    loading it decides). A text file would otherwise reach torch.load and be blamed on pickled objects."""
    if not path.is_file():
        return "no such file (the BiSeNet checkpoint, e.g. 79999_iter.pth, is not downloaded for you)"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        return f"not readable ({e.strerror or e})"
    if path.suffix.lower() == ".safetensors":
        return None
    if not head:
        return "not a PyTorch checkpoint (the file is empty)"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save's zip archive; a legacy pickle
        return None
    return f"not a PyTorch checkpoint (neither torch.save's zip archive nor a pickle; it starts with {head!r})"


def parser_weights_error(path: Path, e: Exception) -> CLIError:
    """A parser checkpoint that failed to load, as one line (torch's own detail spans many lines)."""
    text = " ".join(str(e).split()).removeprefix("path: ")
    text = text.split(" Detail: ")[0]
    return CLIError(f"--parser-weights {path}: {text}")


def _interpreting() -> bool:
    """Triton runs kernels on CPU tensors through its interpreter (TRITON_INTERPRET=1, as the tests set)."""
    from freecure_ops.kernels import interpreting

    return interpreting()


def _pick_device(text: str | None):
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as e:
        raise CLIError(f"--device {text}: not a device (use cpu, cuda or cuda:N)") from e
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    is_available = getattr(backend, "is_available", None)
    if not callable(is_available) or not is_available():
        raise CLIError(f"--device {text}: no {device.type} device is available here"
                       + (" (this torch has no CUDA, or no GPU is visible)" if device.type == "cuda" else ""))
    count = getattr(backend, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        raise CLIError(f"--device {text}: there are only {count()} {device.type} devices (0..{count() - 1})")
    return device


def check_generate_args(args):
    """Every check that needs no model: returns ``(device, dtype, mask array or None)``. Raises CLIError."""
    if args.steps < 1:
        raise CLIError(f"--steps must be >= 1, got {args.steps}")
    if not -2 ** 63 <= args.seed < 2 ** 64:
        raise CLIError(f"--seed must fit a 64-bit integer, got {args.seed}")
    _check_finite("--omega", args.omega)
    _check_finite("--style-fidelity", args.style_fidelity, 0.0, 1.0)
    _check_finite("--guidance-scale", args.guidance_scale, 0.0)
    multiple = _size_multiple(args.model)
    for flag, v in (("--height", args.height), ("--width", args.width)):
        if v is not None and (v <= 0 or v % multiple):
            raise CLIError(f"{flag} must be a positive multiple of {multiple} (pixels), got {v}")
    problem = output_dir_problem(args.out)
    if problem:
        raise CLIError(f"--out {args.out}: {problem}")
    if args.apg_template is not None and not args.apg:
        raise CLIError("--apg-template is only used with --apg")
    problem = _model_path_problem(args.model)
    if problem:
        raise CLIError(f"--model {args.model}: {problem}")

    mask = None
    if args.mask is not None:
        mask = read_mask_png(args.mask)
        if not (mask > 0).any():
            what = f"--mask {args.mask}: the mask is empty (all black / fully transparent: no attribute pixel)"
            if args.empty_mask == "error":
                raise CLIError(what + "; FASA would change nothing. Pass --empty-mask warn to run anyway")
            print(f"freecure: warning: {what}; FASA changes nothing", file=sys.stderr)
    elif args.parser_weights is None:
        raise CLIError("give --mask PNG or --parser-weights PTH (the face parser that finds the attributes)")
    problem = None if args.parser_weights is None else parser_weights_problem(args.parser_weights)
    if problem:
        raise CLIError(f"--parser-weights {args.parser_weights}: {problem}")

    import torch

    device = _pick_device(args.device)
    if args.backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        raise CLIError(f"--backend triton needs a CUDA --device (got {device}); use --backend torch or auto")
    dtype = getattr(torch, _DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")])
    return device, dtype, mask


# ----------------------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------------------

def _versions() -> dict:
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("freecure-ops", "torch", "diffusers", "transformers", "triton"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _effective_settings(fc, pipe, args, device, dtype, call) -> dict:
    """What actually ran: preset values filled in, the resolved backend, the pipeline's defaults."""
    from freecure_ops.pipeline.apg import default_guidance_scale
    from freecure_ops.adapters.discovery import find_self_attention_blocks
    from freecure_ops.adapters.presets import PRESETS, preset_blocks

    blocks = find_self_attention_blocks(pipe)
    if args.layers is None:
        layers = list(preset_blocks(fc.family, blocks))
    elif args.layers == "all":
        layers = [b.index for b in blocks]
    else:
        layers = list(args.layers)
    height, width = fc._size({k: call[k] for k in ("height", "width") if k in call})
    gs = call.get("guidance_scale", default_guidance_scale(pipe))
    return dict(omega=PRESETS[fc.family].omega if args.omega is None else args.omega,
                omega_source="preset" if args.omega is None else "--omega",
                layers=layers, layers_source="preset" if args.layers is None else "--layers",
                mode=args.mode, backend=("triton" if device.type == "cuda" else "torch") if args.backend == "auto"
                else args.backend, style_fidelity=args.style_fidelity, guidance_scale=float(gs),
                height=height, width=width, empty_mask=args.empty_mask)


@contextmanager
def _quiet_libraries(quiet: bool):
    """--quiet: no loading bars or notes from diffusers / transformers; their settings are restored after."""
    if not quiet:
        yield
        return
    libs = []
    try:
        from diffusers.utils import logging as d_log

        libs.append(d_log)
    except ImportError:  # freecure eval needs transformers only
        pass
    try:
        from transformers.utils import logging as t_log

        libs.append(t_log)
    except ImportError:  # pragma: no cover
        pass
    saved = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libs]
    for lib in libs:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, (level, bars) in zip(libs, saved):
            lib.set_verbosity(level)
            if bars:
                lib.enable_progress_bar()


def _generate(args) -> int:
    device, dtype, mask = check_generate_args(args)
    with _quiet_libraries(args.quiet):
        return _run_generate(args, device, dtype, mask)


def _run_generate(args, device, dtype, mask) -> int:
    import torch

    from freecure_ops.pipeline.freecure import EmptyMaskError, FreeCure, FreeCureWarning

    parser = None
    if args.parser_weights is not None:
        from freecure_ops.pipeline.face_parser import BiSeNetParser

        try:
            parser = BiSeNetParser.from_checkpoint(args.parser_weights, device=device)
        except (ValueError, OSError) as e:
            raise parser_weights_error(args.parser_weights, e) from e

    pipe = _load_pipeline(args.model, device, dtype)
    if args.quiet:
        pipe.set_progress_bar_config(disable=True)
    try:
        fc = FreeCure(pipe, parser, omega=args.omega, layers=args.layers, style_fidelity=args.style_fidelity,
                      mode=args.mode, backend=args.backend, empty_mask=args.empty_mask, fd_reuse=args.fd_reuse)
    except (TypeError, ValueError) as e:
        raise CLIError(f"--model {args.model}: {flag_message(str(e))}") from e

    call = dict(fd_prompt=args.fd_prompt or args.prompt, mask=None if mask is None else torch.from_numpy(mask),
                seed=args.seed, apg=args.apg, gamma=args.gamma, apg_template=args.apg_template,
                num_inference_steps=args.steps, output_type="pil")
    for key in ("negative_prompt", "guidance_scale", "height", "width"):
        if getattr(args, key) is not None:
            call[key] = getattr(args, key)

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"freecure: warning: {flag_message(str(message))}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", FreeCureWarning)
        old_show, warnings.showwarning = warnings.showwarning, show
        try:
            out = fc(args.prompt, **call)
        except EmptyMaskError as e:
            raise CLIError(flag_message(str(e))) from e
        finally:
            warnings.showwarning = old_show

    problem = output_dir_problem(args.out)  # checked before any work; checked again in case it changed since
    if problem:
        raise CLIError(f"--out {args.out}: {problem}")
    args.out.mkdir(parents=True, exist_ok=True)
    written = []

    def save_image(img, name):
        atomic_write(args.out / name, lambda tmp: img.save(tmp, format="PNG"))
        written.append(name)

    save_image(out.images[0], "pd.png")
    if out.fd_images is not None:
        save_image(out.fd_images[0], "fd.png")
    if out.mask is not None:
        _save_mask(out.mask, args.out / "mask.png")
        written.append("mask.png")
    meta = dict(model=args.model, family=fc.family, prompt=args.prompt, fd_prompt=call["fd_prompt"],
                attributes=out.attributes, fasa_applied=out.fasa_applied, template_prompts=out.template_prompts,
                **_effective_settings(fc, pipe, args, device, dtype, call), apg=args.apg,
                gamma=args.gamma if args.apg else None, steps=args.steps, seed=args.seed,
                mask_source=str(args.mask) if args.mask is not None else "parser", device=str(device),
                dtype=str(dtype).replace("torch.", ""), versions=_versions(),
                timings_s={k: round(v, 4) for k, v in out.timings.items()}, fd_reuse=out.fd_reuse, files=written)
    atomic_write_text(args.out / "freecure.json", json.dumps(meta, indent=2) + "\n")
    for name in GENERATE_OUTPUTS:  # a previous run's image beside this run's would read as this run's
        if name not in written:
            try:
                (args.out / name).unlink()
            except FileNotFoundError:
                pass
    print(f"freecure: wrote {', '.join(written)} and freecure.json to {args.out}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from freecure_ops.bench.__main__ import main as bench_main  # lazy: the benchmark pulls in its own deps

        return int(bench_main(argv[1:], prog="freecure bench") or 0)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "batch":
            from .batch import run
        elif args.command == "eval":
            from .evaluate import run
        elif args.command == "manifest":
            from .grid import run
        else:
            run = _generate
        return run(args)
    except CLIError as e:
        print(f"freecure: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    # python -m freecure_ops.cli (what accelerate launch / torchrun run): use the package's module, not this
    # __main__ copy, so that the CLIError other modules raise is the one main() catches
    from freecure_ops.cli import main as _main

    sys.exit(_main())
