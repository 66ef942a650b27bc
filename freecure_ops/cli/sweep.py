"""``freecure sweep``: one foundation per seed, pass 2 at every omega, on one contact sheet.

    freecure sweep --model DIR_OR_HUB_ID --prompt "a photo of sks man with red hair" \\
                   --fd-prompt "a photo of a man with red hair" --parser-weights 79999_iter.pth \\
                   --omegas 0.5,1,1.5,2 --seeds 0,1,2 --out sweeps/red-hair

Per seed, pass 1 runs once (:meth:`~freecure_ops.pipeline.freecure.FreeCure.foundation`: the FD image, its
attribute mask, the FD keys/values FASA reads), then pass 2 once per omega
(:meth:`~freecure_ops.pipeline.foundation.Foundation.run`): ``len(seeds)`` pass-1 runs, not
``len(seeds) * len(omegas)``. The image at an omega is the one ``freecure generate --omega W --seed S`` makes.

Pass 2 can run a personalization pipeline of the user's (``--pipeline module:function``, :mod:`.entry_point`:
PhotoMaker, InstantID, a LoRA'd SDXL): with ``--model`` too, ``--model`` runs pass 1 (the foundation: the plain
base model) and is handed to the function, which builds pass 2's pipeline on it; without ``--model`` the
function's pipeline runs both passes. ``--pd-kwargs JSON`` adds pass-2 arguments (e.g.
``{"start_merge_step": 10}``); ones that need Python objects come from the function, as ``(pipeline, dict)``.

Writes to ``--out``: ``images/seed{S}_omega{W}.png`` (each as soon as it is made), ``fd/seed{S}.png``,
``mask/seed{S}.png``, ``sweep.png`` (rows: FD, FD with the mask over it, then one row per omega; columns: one
per seed; labels drawn in) and ``sweep.json`` (prompts, attributes, settings, omegas, seeds, the files, and the
timings: pass 1 per seed, pass 2 per (seed, omega), their totals). Every file is written atomically. A run
that fails or is interrupted part-way still writes the sheet and the JSON of what it made (``"complete":
false`` and the error), so no finished image is lost. Checks and errors are ``generate``'s, plus ``--omegas``
(each checked as ``--omega``; none twice), ``--seeds``, ``--pipeline`` and ``--pd-kwargs``; all before any
model loads, except what only the loaded pipelines can tell (what the function returns, whether its pipeline
fits the foundation, which is checked before pass 1)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..outputs import atomic_write, atomic_write_text, output_dir_problem
from .args import (add_weights_arguments, check_backend_device, check_finite, check_mask_source, check_run_flags,
                   json_object_arg, number_list_arg, pick_device, seed_problem, torch_dtype)
from .errors import CLIError, flag_message
from .flags import (add_device_arguments, add_fasa_arguments, add_fd_reuse_argument, add_mask_arguments,
                    add_output_arguments, add_prompt_arguments, add_sampling_arguments)
from .pipeline import (effective_settings, library_versions, load_parser, load_pipeline, quiet_libraries, save_mask,
                       show_warnings)
from .weights import resolve_run_weights

__all__ = ["add_arguments", "check_sweep_args", "run", "image_name", "SHEET", "RECORD"]

SHEET, RECORD = "sweep.png", "sweep.json"


def add_arguments(sub) -> None:
    s = sub.add_parser("sweep", help="one foundation per seed, pass 2 at several omegas, on one contact sheet",
                       description="Pass 1 once per seed (FD image, mask, FD keys/values), pass 2 once per (seed, "
                                   "omega); writes sweep.png (rows = omega, columns = seed), the images and "
                                   "sweep.json.")
    add_weights_arguments(s, required=False, extra_help="; optional with --pipeline (then it runs pass 1 and is "
                                                        "handed to the function)")
    s.add_argument("--pipeline", metavar="MODULE:FUNCTION",
                   help="pass 2's pipeline from your Python: MODULE (imported from the current folder, or a .py "
                        "path) FUNCTION(base) gets the --model pipeline (None without --model) and returns a "
                        "diffusers pipeline, or (pipeline, dict of pass-2 arguments); without --model it runs "
                        "both passes")
    s.add_argument("--pd-kwargs", type=json_object_arg, metavar="JSON",
                   help="extra pass-2 pipeline arguments as a JSON object, e.g. '{\"start_merge_step\": 10}'")
    add_prompt_arguments(s)
    add_mask_arguments(s, mask_effect="skips the parser (pass 1 still runs: pass 2 reads its keys/values)")
    s.add_argument("--omegas", required=True, type=number_list_arg(float), metavar="W,W,...",
                   help="FASA strengths, one row each, e.g. 0.5,1,1.5,2 (a list starting with a minus: "
                        "--omegas=-0.5,1)")
    s.add_argument("--seeds", type=number_list_arg(int), default=[0], metavar="S,S,...",
                   help="seeds, one column (and one pass 1) each (default: 0)")
    add_fasa_arguments(s)
    add_fd_reuse_argument(s, choices=("auto", "device", "host"))
    add_sampling_arguments(s)
    add_device_arguments(s, what=" of --model")
    add_output_arguments(s)


@dataclass(frozen=True)
class _Plan:
    """What the checks found: the mask array (None: a parser makes it), the resolved weights, the entry point,
    the device and dtype of --model (None without it)."""

    mask: object
    model: object
    parser: object
    entry: object
    device: object
    dtype: object


def check_sweep_args(args) -> _Plan:
    """Every check before anything loads (generate's, and the sweep's own). Raises CLIError."""
    from .entry_point import load_entry_point, reserved_pd_kwargs_problem

    if args.model is None and args.pipeline is None:
        raise CLIError("give --model (a pipeline folder or Hub id) or --pipeline module:function (or both)")
    check_run_flags(args)
    for w in args.omegas:
        check_finite("--omegas", w)
    for seed in args.seeds:
        problem = seed_problem("--seeds", seed)
        if problem:
            raise CLIError(problem)
    if args.model is None:  # the entry point loads its own pipeline: these would do nothing
        for flag in ("revision", "variant", "device", "dtype"):
            if getattr(args, flag) is not None:
                raise CLIError(f"--{flag} applies to --model; the --pipeline function (without --model) chooses its "
                               "pipeline's weights, device and dtype")
    problem = reserved_pd_kwargs_problem(args.pd_kwargs or {})
    if problem:
        raise CLIError(f"--pd-kwargs {problem}")
    mask = check_mask_source(args)
    if mask is None:
        _check_attribute_words(args.prompt)
    entry = None if args.pipeline is None else load_entry_point(args.pipeline)
    device = dtype = None
    if args.model is not None:
        device = pick_device(args.device)
        check_backend_device(args.backend, device)
        dtype = torch_dtype(args.dtype, device)
    model, parser = resolve_run_weights(args)
    return _Plan(mask=mask, model=model, parser=parser, entry=entry, device=device, dtype=dtype)


def _check_attribute_words(prompt: str) -> None:
    """A parsed mask needs an attribute named in the prompt; without one there would be nothing to sweep."""
    from ..pipeline.attributes import DEFAULT_VOCABULARY, find_attributes

    if not find_attributes(prompt):
        known = ", ".join(DEFAULT_VOCABULARY.attributes)
        raise CLIError(f"--prompt names none of the attributes FreeCure knows ({known}): FASA would have nothing to "
                       "do at any omega; name one (e.g. 'red hair') or give --mask")


def _number(w: float) -> str:
    """An omega as a file name and label: the shortest text that reads back as the same float (1.0 -> "1")."""
    text = repr(float(w))
    return text[:-2] if text.endswith(".0") else text


def image_name(seed: int, omega: float) -> str:
    return f"images/seed{seed}_omega{_number(omega)}.png"


def run(args) -> int:
    plan = check_sweep_args(args)
    with quiet_libraries(args.quiet):
        return _run_sweep(args, plan)


def _pipelines(args, plan):
    """Load: ``(foundation pipeline, pass-2 pipeline, pass-2 kwargs, device, dtype)``."""
    from .entry_point import call_entry_point, pass2_pipeline_problem, unnamed_kwargs

    base = None if plan.model is None else load_pipeline(plan.model, plan.device, plan.dtype)
    pd_pipe, pd_kwargs = base, {}
    if plan.entry is not None:
        pd_pipe, pd_kwargs = call_entry_point(plan.entry, base)
    fd_pipe = base if base is not None else pd_pipe
    problem = pass2_pipeline_problem(fd_pipe, pd_pipe)
    if problem:
        raise CLIError(f"--pipeline {args.pipeline}: {problem}")
    for source, kwargs in ((f"--pipeline {args.pipeline}", pd_kwargs), ("--pd-kwargs", args.pd_kwargs or {})):
        unnamed, strict = unnamed_kwargs(pd_pipe, kwargs)
        what = f"{source}: {type(pd_pipe).__name__}.__call__ takes no {', '.join(unnamed)}"
        if unnamed and strict:
            raise CLIError(what)
        if unnamed:  # a typo would change nothing, silently: say so before the sweep runs
            print(f"freecure: warning: {what} by name (it takes **kwargs, and may ignore them)", file=sys.stderr)
    pd_kwargs = {**pd_kwargs, **(args.pd_kwargs or {})}  # the command line has the last word
    device, dtype = plan.device, plan.dtype
    if base is None:  # the function placed its pipeline: FASA runs where it is
        import torch

        from ..adapters.discovery import resolve_model

        denoiser, _ = resolve_model(fd_pipe)
        device, dtype = torch.device(fd_pipe.device), denoiser.dtype
        check_backend_device(args.backend, device)
    if args.quiet:
        for pipe in {id(fd_pipe): fd_pipe, id(pd_pipe): pd_pipe}.values():
            pipe.set_progress_bar_config(disable=True)
    return fd_pipe, pd_pipe, pd_kwargs, device, dtype


def _jsonable(kwargs: dict) -> dict:
    """Pass-2 arguments as sweep.json records them: JSON values as they are, Python objects by type."""
    out = {}
    for key, value in kwargs.items():
        try:
            json.dumps(value)
            out[key] = value
        except (TypeError, ValueError):
            out[key] = f"<{type(value).__module__}.{type(value).__name__}>"
    return out


class _Results:
    """What the sweep made so far, written as it comes: the single images at once, the sheet and the JSON at
    the end (or when the run stops early)."""

    def __init__(self, out: Path, seeds, omegas):
        self.out, self.seeds, self.omegas = out, list(seeds), list(omegas)
        self.fd, self.overlay, self.images = {}, {}, {}     # seed -> PIL; (seed, omega) -> PIL
        self.foundations, self.cells = [], []               # the JSON's records
        self.written: set[str] = set()

    def save(self, name: str, img) -> None:
        (self.out / name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.out / name, lambda tmp: img.save(tmp, format="PNG"))
        self.written.add(name)

    def add_foundation(self, seed: int, found) -> None:
        from .contact_sheet import mask_overlay

        fd_img = found.images[0]
        self.save(f"fd/seed{seed}.png", fd_img)
        (self.out / "mask").mkdir(exist_ok=True)
        save_mask(found.mask, self.out / f"mask/seed{seed}.png")
        self.written.add(f"mask/seed{seed}.png")
        self.fd[seed] = fd_img
        self.overlay[seed] = mask_overlay(fd_img, found.mask.detach().float().cpu().numpy())
        self.foundations.append(dict(seed=seed, fd=f"fd/seed{seed}.png", mask=f"mask/seed{seed}.png",
                                     attributes=found.attributes, fd_reuse=found.fd_reuse,
                                     pass1_s=round(found.timings.get("pass1", 0.0), 4),
                                     mask_s=round(found.timings.get("mask", 0.0), 4)))

    def add_image(self, seed: int, omega: float, img, seconds: float) -> None:
        name = image_name(seed, omega)
        self.save(name, img)
        self.images[(seed, omega)] = img
        self.cells.append(dict(seed=seed, omega=omega, file=name, pass2_s=round(seconds, 4)))

    def write_sheet(self) -> bool:
        from .contact_sheet import contact_sheet

        if not self.fd:
            return False
        cells = [[self.fd.get(s) for s in self.seeds], [self.overlay.get(s) for s in self.seeds]]
        cells += [[self.images.get((s, w)) for s in self.seeds] for w in self.omegas]
        sheet, _ = contact_sheet(cells, ["FD", "FD + mask"] + [f"omega {_number(w)}" for w in self.omegas],
                                 [f"seed {s}" for s in self.seeds])
        self.save(SHEET, sheet)
        return True

    def timings(self, load_s: float, total_s: float) -> dict:
        pass1 = [dict(seed=f["seed"], s=f["pass1_s"], mask_s=f["mask_s"]) for f in self.foundations]
        pass2 = [dict(seed=c["seed"], omega=c["omega"], s=c["pass2_s"]) for c in self.cells]
        return dict(load=round(load_s, 4),
                    pass1=dict(runs=len(pass1), per_seed=pass1,
                               total=round(sum(p["s"] + p["mask_s"] for p in pass1), 4)),
                    pass2=dict(runs=len(pass2), per_image=pass2, total=round(sum(p["s"] for p in pass2), 4)),
                    total=round(total_s, 4))

    def remove_stale(self) -> list[str]:
        """Images a previous sweep left in images/, fd/, mask/ that this one did not make (they would read as
        this sweep's); other files are left alone."""
        removed = []
        for pattern in ("images/seed*_omega*.png", "fd/seed*.png", "mask/seed*.png"):
            for path in sorted(self.out.glob(pattern)):
                name = path.relative_to(self.out).as_posix()
                if name not in self.written:
                    path.unlink(missing_ok=True)
                    removed.append(name)
        return removed


def _run_sweep(args, plan) -> int:
    import torch

    from ..pipeline.apg import default_guidance_scale
    from ..pipeline.freecure import EmptyMaskError, FreeCure, FreeCureWarning

    t_start = time.perf_counter()
    fd_pipe, pd_pipe, pd_kwargs, device, dtype = _pipelines(args, plan)
    parser = None if plan.parser is None else load_parser(plan.parser, device, offline=args.offline or None)
    blame = f"--model {args.model}" if args.model is not None else f"--pipeline {args.pipeline}"
    try:
        fc = FreeCure(fd_pipe, parser, layers=args.layers, style_fidelity=args.style_fidelity, mode=args.mode,
                      backend=args.backend, empty_mask=args.empty_mask, fd_reuse=args.fd_reuse)
    except (TypeError, ValueError) as e:
        raise CLIError(f"{blame}: {flag_message(str(e))}") from e
    # one guidance scale for both passes, said explicitly: a personalization pipeline's default may differ
    gs = args.guidance_scale if args.guidance_scale is not None else default_guidance_scale(fd_pipe)
    common = dict(num_inference_steps=args.steps, guidance_scale=gs)
    for key in ("negative_prompt", "height", "width"):
        if getattr(args, key) is not None:
            common[key] = getattr(args, key)
    pd_common = {k: v for k, v in common.items() if k in ("guidance_scale", "negative_prompt")}  # run() adds the rest
    pass2_blame = f"--pipeline {args.pipeline}" if args.pipeline is not None else \
        "--pd-kwargs" if args.pd_kwargs else blame
    mask = None if plan.mask is None else torch.from_numpy(plan.mask)
    fd_prompt = args.fd_prompt or args.prompt
    load_s = time.perf_counter() - t_start

    problem = output_dir_problem(args.out)  # checked before any work; checked again in case it changed since
    if problem:
        raise CLIError(f"--out {args.out}: {problem}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = _Results(args.out, args.seeds, args.omegas)
    settings = effective_settings(fc, fd_pipe, argparse.Namespace(**{**vars(args), "omega": None}), device, dtype,
                                  common)
    for key in ("omega", "omega_source"):  # one per row here: "omegas"
        settings.pop(key)

    def record(complete: bool, error: str | None = None) -> dict:
        return dict(command="sweep", complete=complete, error=error, model=args.model, pipeline=args.pipeline,
                    weights=dict(model=None if plan.model is None else plan.model.record(),
                                 parser=None if plan.parser is None else plan.parser.record()),
                    pass2_pipeline=type(pd_pipe).__name__, family=fc.family, prompt=args.prompt, fd_prompt=fd_prompt,
                    negative_prompt=args.negative_prompt,
                    attributes=results.foundations[0]["attributes"] if results.foundations else None,
                    **settings, steps=args.steps, omegas=list(args.omegas), seeds=list(args.seeds),
                    pd_kwargs=_jsonable(pd_kwargs),
                    mask_source=str(args.mask) if args.mask is not None else "parser", device=str(device),
                    dtype=str(dtype).replace("torch.", ""), versions=library_versions(),
                    sheet=SHEET if SHEET in results.written else None,
                    sheet_rows=["FD", "FD + mask"] + [f"omega {_number(w)}" for w in args.omegas],
                    sheet_columns=[f"seed {s}" for s in args.seeds],
                    foundations=results.foundations, images=results.cells,
                    timings_s=results.timings(load_s, time.perf_counter() - t_start))

    try:
        for seed in args.seeds:
            with show_warnings(FreeCureWarning):
                try:  # pass 1, once per seed; its attributes are read from the PD prompt, as generate does
                    found = fc.foundation(fd_prompt, seed=seed, mask=mask, attribute_prompt=args.prompt,
                                          output_type="pil", **common)
                except EmptyMaskError as e:
                    raise CLIError(f"--seeds {seed}: {flag_message(str(e))}") from e
                except (TypeError, ValueError) as e:
                    raise CLIError(f"{blame}: {flag_message(str(e))}") from e
            try:
                results.add_foundation(seed, found)
                for w in args.omegas:  # pass 2 per omega, from the one record
                    t0 = time.perf_counter()
                    try:
                        out = found.run(pd_pipe, prompt=args.prompt, omega=w, output_type="pil", **pd_common,
                                        **pd_kwargs)
                    except (TypeError, ValueError) as e:  # the pass-2 pipeline or its arguments do not fit
                        raise CLIError(f"{pass2_blame}: pass 2 (seed {seed}, omega {_number(w)}): "
                                       f"{flag_message(str(e))}") from e
                    results.add_image(seed, w, out.images[0], time.perf_counter() - t0)
            finally:
                found.release()  # the record is the big allocation: one seed's at a time
    except BaseException as e:
        _write_partial(results, record, e)
        raise
    results.write_sheet()
    atomic_write_text(args.out / RECORD, json.dumps(record(True), indent=2) + "\n")
    stale = results.remove_stale()
    print(f"freecure: wrote {SHEET}, {len(results.cells)} images ({len(args.seeds)} pass 1, {len(results.cells)} "
          f"pass 2) and {RECORD} to {args.out}"
          + (f"; removed {len(stale)} images an earlier sweep left there" if stale else ""))
    return 0


def _write_partial(results: _Results, record, e: BaseException) -> None:
    """A run that stops part-way keeps what it made: the sheet of the finished cells and the JSON, marked
    incomplete with the error. A failure here must not hide the one that stopped the run."""
    if not results.foundations:
        return
    error = f"{type(e).__name__}: {' '.join(str(e).split())}" if not isinstance(e, CLIError) else str(e)
    try:
        results.write_sheet()
        atomic_write_text(results.out / RECORD, json.dumps(record(False, error), indent=2) + "\n")
    except Exception as inner:  # noqa: BLE001
        print(f"freecure: warning: could not write the partial {RECORD}: {inner}", file=sys.stderr)
