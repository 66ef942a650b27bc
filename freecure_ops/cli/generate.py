"""``freecure generate``: one FreeCure image from a diffusers pipeline (a local folder or a Hub id).

Writes ``pd.png`` (the FreeCure image), ``fd.png`` (the foundation image), ``mask.png`` (the attribute mask)
and ``freecure.json`` (prompts, attributes, settings, timings) to ``--out``. Every argument is checked
before the model (or the parser) is loaded; Hub references are resolved (downloaded unless offline) by the
checks, after every check that needs no weights."""
from __future__ import annotations

import json

from ..outputs import atomic_write, atomic_write_text, output_dir_problem
from .args import (add_weights_arguments, apg_steps_problem, check_backend_device, check_mask_source, check_run_flags,
                   fraction_arg, pick_device, seed_problem, torch_dtype)
from .errors import CLIError, flag_message
from .flags import (add_device_arguments, add_fasa_arguments, add_fd_reuse_argument, add_mask_arguments,
                    add_output_arguments, add_prompt_arguments, add_sampling_arguments, fd_prompt_of)
from .pipeline import (effective_settings, library_versions, load_parser, load_pipeline, quiet_libraries, save_mask,
                       show_warnings)
from .weights import resolve_run_weights

__all__ = ["add_arguments", "check_generate_args", "run", "GENERATE_OUTPUTS"]

#: the images ``generate`` writes; one a run did not produce is removed from ``--out`` (nothing else is)
GENERATE_OUTPUTS = ("pd.png", "fd.png", "mask.png")


def add_arguments(sub) -> None:
    g = sub.add_parser("generate", help="generate one image with FreeCure",
                       description="Two passes: the FD image, its attribute mask, then PD + FD with FASA.")
    add_weights_arguments(g)
    add_prompt_arguments(g)
    add_mask_arguments(g)
    g.add_argument("--omega", type=float, help="FASA strength (default: the model family's preset)")
    add_fasa_arguments(g)
    add_fd_reuse_argument(g)
    g.add_argument("--apg", action="store_true", help="apply Asymmetric Prompt Guidance")
    g.add_argument("--gamma", type=fraction_arg, default=0.5, help="APG inversion depth (fraction of the steps)")
    g.add_argument("--apg-template", help="APG template prompt (default: --prompt without its attribute words)")
    add_sampling_arguments(g)
    g.add_argument("--seed", type=int, default=0)
    add_device_arguments(g)
    add_output_arguments(g)


def check_generate_args(args):
    """Every check before anything loads: returns ``(device, dtype, mask array or None, model, parser)``
    (``model``/``parser``: the resolved :class:`~.weights.Weights`, parser None without --parser-weights).
    Hub references resolve last (they may download). Raises CLIError."""
    check_run_flags(args)
    problem = seed_problem("--seed", args.seed)
    if problem:
        raise CLIError(problem)
    if args.apg_template is not None and not args.apg:
        raise CLIError("--apg-template is only used with --apg")
    problem = apg_steps_problem(args.steps, args.gamma) if args.apg else None
    if problem:
        raise CLIError(f"--apg with --gamma {args.gamma} and --steps {args.steps} {problem}: raise --gamma or --steps")
    mask = check_mask_source(args)
    device = pick_device(args.device)
    check_backend_device(args.backend, device)
    model, parser = resolve_run_weights(args)
    return device, torch_dtype(args.dtype, device), mask, model, parser


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

    call = dict(fd_prompt=fd_prompt_of(args.prompt, args.fd_prompt, args.identity_words),
                mask=None if mask is None else torch.from_numpy(mask),
                seed=args.seed, apg=args.apg, gamma=args.gamma, apg_template=args.apg_template,
                num_inference_steps=args.steps, output_type="pil")
    for key in ("negative_prompt", "guidance_scale", "height", "width"):
        if getattr(args, key) is not None:
            call[key] = getattr(args, key)

    with show_warnings(FreeCureWarning):
        try:
            out = fc(args.prompt, **call)
        except EmptyMaskError as e:
            raise CLIError(flag_message(str(e))) from e

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
                dtype=str(dtype).replace("torch.", ""), versions=library_versions(),
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
