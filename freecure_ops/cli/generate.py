"""``freecure generate``: one FreeCure image from a diffusers pipeline (a local folder or a Hub id).

Writes ``pd.png`` (the FreeCure image), ``fd.png`` (the foundation image), ``mask.png`` (the attribute mask)
and ``freecure.json`` (prompts, attributes, settings, timings) to ``--out``. Every argument is checked
before the model (or the parser) is loaded; Hub references are resolved (downloaded unless offline) by the
checks, after every check that needs no weights."""
from __future__ import annotations

import json
import sys
import warnings

from ..outputs import atomic_write, atomic_write_text, output_dir_problem
from .args import (DTYPES, add_weights_arguments, apg_steps_problem, check_run_flags, empty_mask_effect,
                   fraction_arg, interpreting, layers_arg, pick_device, read_mask_png, torch_dtype, user_path)
from .errors import CLIError, flag_message
from .model_files import check_model_flags
from .pipeline import effective_settings, load_parser, load_pipeline, quiet_libraries, save_mask
from .weights import is_local, resolve_model, resolve_parser

__all__ = ["add_arguments", "check_generate_args", "run", "GENERATE_OUTPUTS"]

#: the images ``generate`` writes; one a run did not produce is removed from ``--out`` (nothing else is)
GENERATE_OUTPUTS = ("pd.png", "fd.png", "mask.png")


def add_arguments(sub) -> None:
    g = sub.add_parser("generate", help="generate one image with FreeCure",
                       description="Two passes: the FD image, its attribute mask, then PD + FD with FASA.")
    add_weights_arguments(g)
    g.add_argument("--prompt", required=True, help="PD prompt (with the identity, e.g. a DreamBooth token)")
    g.add_argument("--fd-prompt", help="FD prompt (the same without the identity); default: --prompt")
    g.add_argument("--negative-prompt", help="negative prompt for both branches")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--mask", type=user_path, help="attribute mask PNG (white = attribute); skips pass 1")
    src.add_argument("--parser-weights", help="face parser: a BiSeNet checkpoint (79999_iter.pth, or a Hub file "
                                              "org/name/79999_iter.pth), or a SegFormer model (folder or Hub id)")
    g.add_argument("--parser-revision", help="Hub revision of --parser-weights (branch, tag or commit)")
    g.add_argument("--omega", type=float, help="FASA strength (default: the model family's preset)")
    g.add_argument("--layers", type=layers_arg, help="'all' or block indices, e.g. 50,51,52 (default: preset)")
    g.add_argument("--style-fidelity", type=float, default=1.0,
                   help="blend of the unconditional PD row: (1 - sf) * FASA + sf * plain, in [0, 1]")
    g.add_argument("--mode", choices=("bias", "scale"), default="bias")
    g.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto")
    g.add_argument("--fd-reuse", choices=("auto", "device", "host", "off"), default="auto",
                   help="keep pass 1's FD keys/values for pass 2, which then runs the PD rows alone: on the device, "
                        "in pinned host memory, or off (recompute); auto: the device when it fits, else host, else off")
    g.add_argument("--apg", action="store_true", help="apply Asymmetric Prompt Guidance")
    g.add_argument("--gamma", type=fraction_arg, default=0.5, help="APG inversion depth (fraction of the steps)")
    g.add_argument("--apg-template", help="APG template prompt (default: --prompt without its attribute words)")
    g.add_argument("--empty-mask", choices=("error", "warn"), default="error",
                   help="what to do when parsing finds no attribute pixel")
    g.add_argument("--steps", type=int, default=30, help="denoising steps")
    g.add_argument("--guidance-scale", type=float, help="default: the pipeline's")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--height", type=int, help="image height in pixels, a multiple of 8 (default: the pipeline's)")
    g.add_argument("--width", type=int, help="image width in pixels, a multiple of 8 (default: the pipeline's)")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    g.add_argument("--dtype", choices=tuple(DTYPES), help="default: fp16 on cuda, fp32 on cpu")
    g.add_argument("--out", required=True, type=user_path, help="output folder (created; checked before any work)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def check_generate_args(args):
    """Every check before anything loads: returns ``(device, dtype, mask array or None, model, parser)``
    (``model``/``parser``: the resolved :class:`~.weights.Weights`, parser None without --parser-weights).
    Hub references resolve last (they may download). Raises CLIError."""
    check_run_flags(args)
    if not -2 ** 63 <= args.seed < 2 ** 64:
        raise CLIError(f"--seed must fit a 64-bit integer, got {args.seed}")
    if args.apg_template is not None and not args.apg:
        raise CLIError("--apg-template is only used with --apg")
    problem = apg_steps_problem(args.steps, args.gamma) if args.apg else None
    if problem:
        raise CLIError(f"--apg with --gamma {args.gamma} and --steps {args.steps} {problem}: raise --gamma or --steps")

    mask = None
    if args.mask is not None:
        mask = read_mask_png(args.mask)
        if not (mask > 0).any():
            what = f"--mask {args.mask}: the mask is empty (all black / fully transparent: no attribute pixel)"
            if args.empty_mask == "error":
                raise CLIError(f"{what}; {empty_mask_effect(args.mode)}. Pass --empty-mask warn to run anyway")
            print(f"freecure: warning: {what}; {empty_mask_effect(args.mode)}", file=sys.stderr)
    elif args.parser_weights is None:
        raise CLIError("give --mask PNG or --parser-weights PTH (the face parser that finds the attributes)")

    device = pick_device(args.device)
    if args.backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise CLIError(f"--backend triton needs a CUDA --device (got {device}); use --backend torch or auto")

    offline = args.offline or None
    parser = None
    if args.parser_weights is not None and is_local(args.parser_weights):  # local files before any download
        parser = resolve_parser(args.parser_weights, revision=args.parser_revision, offline=offline)
    model = resolve_model(args.model, revision=args.revision, variant=args.variant, offline=offline, quiet=args.quiet)
    check_model_flags(args, model.path)
    if args.parser_weights is not None and parser is None:
        parser = resolve_parser(args.parser_weights, revision=args.parser_revision, offline=offline,
                                quiet=args.quiet)
    return device, torch_dtype(args.dtype, device), mask, model, parser


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


def run(args) -> int:
    device, dtype, mask, model, parser_ref = check_generate_args(args)
    with quiet_libraries(args.quiet):
        return _run_generate(args, device, dtype, mask, model, parser_ref)


def _run_generate(args, device, dtype, mask, model, parser_ref) -> int:
    import torch

    from ..pipeline.freecure import EmptyMaskError, FreeCure, FreeCureWarning

    parser = None if parser_ref is None else load_parser(parser_ref, device, offline=args.offline or None)
    pipe = load_pipeline(model, device, dtype)
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
        save_mask(out.mask, args.out / "mask.png")
        written.append("mask.png")
    meta = dict(model=args.model, weights=dict(model=model.record(),
                                               parser=None if parser_ref is None else parser_ref.record()),
                family=fc.family, prompt=args.prompt, fd_prompt=call["fd_prompt"],
                attributes=out.attributes, fasa_applied=out.fasa_applied, template_prompts=out.template_prompts,
                **effective_settings(fc, pipe, args, device, dtype, call), apg=args.apg,
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
