"""``freecure``: the command line.

    freecure generate --model PATH_OR_ID --prompt "a photo of sks man with red hair" \\
                      --fd-prompt "a photo of a man with red hair" --parser-weights 79999_iter.pth --out out/
    freecure bench [benchmark options]          # the FASA benchmark (python -m bench)

``generate`` loads a diffusers SD1.x/SD2.x, SDXL or FLUX pipeline with ``DiffusionPipeline.from_pretrained(...,
local_files_only=True)`` (nothing is downloaded), runs :class:`freecure_ops.adapters.freecure.FreeCure` and
writes ``pd.png`` (the FreeCure image), ``fd.png`` (the foundation image), ``mask.png`` (the attribute mask)
and ``freecure.json`` (prompts, attributes, settings, timings) to ``--out``. The PD prompt carries the
identity (e.g. a DreamBooth / textual-inversion token), the FD prompt is the same without it. The mask comes
from ``--mask PNG`` (white = attribute) or from a BiSeNet face parser (``--parser-weights``).

Exit status: 0 on success, 2 for a usage problem (missing weights, unknown model family, empty mask, bad
option), with a one-line ``freecure: error: ...`` message.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

__all__ = ["main", "build_parser"]

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class CLIError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


def _layers(text: str):
    if text == "all":
        return "all"
    try:
        return sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers must be 'all' or comma-separated block indices, got {text!r}")


def _fraction(text: str) -> float:
    v = float(text)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="freecure", description="FreeCure (FASA + APG) for diffusers pipelines.")
    sub = ap.add_subparsers(dest="command", required=True)
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
    g.add_argument("--style-fidelity", type=float, default=1.0)
    g.add_argument("--mode", choices=("bias", "scale"), default="bias")
    g.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto")
    g.add_argument("--apg", action="store_true", help="apply Asymmetric Prompt Guidance")
    g.add_argument("--gamma", type=_fraction, default=0.5, help="APG inversion depth (fraction of the steps)")
    g.add_argument("--apg-template", help="APG template prompt (default: --prompt without its attribute words)")
    g.add_argument("--empty-mask", choices=("error", "warn"), default="error",
                   help="what to do when parsing finds no attribute pixel")
    g.add_argument("--steps", type=int, default=30, help="denoising steps")
    g.add_argument("--guidance-scale", type=float, help="default: the pipeline's")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--device", help="default: cuda when available, else cpu")
    g.add_argument("--dtype", choices=tuple(_DTYPES), help="default: fp16 on cuda, fp32 on cpu")
    g.add_argument("--out", required=True, type=Path, help="output folder (created)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    sub.add_parser("bench", help="the FASA benchmark (all further arguments go to it)", add_help=False)
    return ap


def _load_pipeline(model: str, device: str, dtype):
    from diffusers import DiffusionPipeline

    # a Hub id is "name" or "org/name"; anything else is meant as a folder
    looks_local = os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1 \
        or model.endswith("/") or (os.sep != "/" and os.sep in model)
    path = Path(model).expanduser()
    if path.exists() and not path.is_dir():
        raise CLIError(f"--model {model}: expected a pipeline folder (with model_index.json), got a file")
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise CLIError(f"--model {model}: no model_index.json in this folder; it is not a diffusers pipeline "
                       "(save one with pipe.save_pretrained(folder))")
    if not path.exists() and looks_local:
        raise CLIError(f"--model {model}: no such folder")
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
    Image.fromarray((m.clamp(0, 1).numpy() * 255).round().astype(np.uint8), mode="L").save(path)


def _generate(args) -> int:
    import torch

    from freecure_ops.adapters.freecure import EmptyMaskError, FreeCure, FreeCureWarning

    if args.steps < 1:
        raise CLIError(f"--steps must be >= 1, got {args.steps}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, _DTYPES[args.dtype or ("fp16" if str(device).startswith("cuda") else "fp32")])
    if args.mask is not None and not args.mask.is_file():
        raise CLIError(f"--mask {args.mask}: no such file")
    parser = None
    if args.parser_weights is not None:
        from freecure_ops.face_parser import BiSeNetParser

        if not args.parser_weights.is_file():
            raise CLIError(f"--parser-weights {args.parser_weights}: no such file (the BiSeNet checkpoint, e.g. "
                           "79999_iter.pth, is not downloaded for you)")
        try:
            parser = BiSeNetParser.from_checkpoint(args.parser_weights, device=device)
        except (ValueError, OSError) as e:
            raise CLIError(f"--parser-weights {args.parser_weights}: {e}") from e
    elif args.mask is None:
        raise CLIError("give --mask PNG or --parser-weights PTH (the face parser that finds the attributes)")

    pipe = _load_pipeline(args.model, device, dtype)
    if args.quiet:
        pipe.set_progress_bar_config(disable=True)
    try:
        fc = FreeCure(pipe, parser, omega=args.omega, layers=args.layers, style_fidelity=args.style_fidelity,
                      mode=args.mode, backend=args.backend, empty_mask=args.empty_mask)
    except (TypeError, ValueError) as e:
        raise CLIError(f"--model {args.model}: {e}") from e

    mask = None
    if args.mask is not None:
        from PIL import Image

        mask = Image.open(args.mask)
    call = dict(fd_prompt=args.fd_prompt or args.prompt, mask=mask, seed=args.seed, apg=args.apg, gamma=args.gamma,
                apg_template=args.apg_template, num_inference_steps=args.steps, output_type="pil")
    for key in ("negative_prompt", "guidance_scale", "height", "width"):
        if getattr(args, key) is not None:
            call[key] = getattr(args, key)

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"freecure: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", FreeCureWarning)
        old_show, warnings.showwarning = warnings.showwarning, show
        try:
            out = fc(args.prompt, **call)
        except EmptyMaskError as e:
            raise CLIError(str(e)) from e
        finally:
            warnings.showwarning = old_show

    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    out.images[0].save(args.out / "pd.png")
    written.append("pd.png")
    if out.fd_images is not None:
        out.fd_images[0].save(args.out / "fd.png")
        written.append("fd.png")
    if out.mask is not None:
        _save_mask(out.mask, args.out / "mask.png")
        written.append("mask.png")
    meta = dict(model=args.model, family=fc.family, prompt=args.prompt, fd_prompt=call["fd_prompt"],
                attributes=out.attributes, fasa_applied=out.fasa_applied, template_prompts=out.template_prompts,
                omega=args.omega, layers=args.layers, apg=args.apg, gamma=args.gamma if args.apg else None,
                steps=args.steps, seed=args.seed, timings_s={k: round(v, 4) for k, v in out.timings.items()},
                files=written)
    (args.out / "freecure.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"freecure: wrote {', '.join(written)} and freecure.json to {args.out}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from freecure_ops.bench.__main__ import main as bench_main  # lazy: the benchmark pulls in its own deps

        return int(bench_main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    try:
        return _generate(args)
    except CLIError as e:
        print(f"freecure: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
