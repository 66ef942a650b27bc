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
from pathlib import Path

from ..outputs import atomic_write, atomic_write_text, output_dir_problem
from .args import check_finite, check_run_flags, number_list_arg, seed_problem
from .errors import CLIError
from .flags import (MASK_WITH_FOUNDATION, add_device_arguments, add_fasa_arguments, add_fd_reuse_argument,
                    add_mask_arguments, add_output_arguments, add_pipeline_arguments, add_prompt_arguments,
                    add_sampling_arguments, fd_prompt_of)
from .pipeline import effective_settings, library_versions, quiet_libraries, save_mask
from .two_pass import Plan, TwoPass, check_pipeline_args, omega_text, require_model_or_pipeline

__all__ = ["add_arguments", "check_sweep_args", "run", "image_name", "SHEET", "RECORD"]

SHEET, RECORD = "sweep.png", "sweep.json"


def add_arguments(sub) -> None:
    s = sub.add_parser("sweep", help="one foundation per seed, pass 2 at several omegas, on one contact sheet",
                       description="Pass 1 once per seed (FD image, mask, FD keys/values), pass 2 once per (seed, "
                                   "omega); writes sweep.png (rows = omega, columns = seed), the images and "
                                   "sweep.json.")
    add_pipeline_arguments(s)
    add_prompt_arguments(s)
    add_mask_arguments(s, mask_effect=MASK_WITH_FOUNDATION)
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


def check_sweep_args(args) -> Plan:
    """Every check before anything loads (generate's, and the sweep's own). Raises CLIError."""
    require_model_or_pipeline(args)
    check_run_flags(args)
    for w in args.omegas:
        check_finite("--omegas", w)
    for seed in args.seeds:
        problem = seed_problem("--seeds", seed)
        if problem:
            raise CLIError(problem)
    return check_pipeline_args(args, args.prompt)


def image_name(seed: int, omega: float) -> str:
    return f"images/seed{seed}_omega{omega_text(omega)}.png"


def run(args) -> int:
    plan = check_sweep_args(args)
    with quiet_libraries(args.quiet):
        return _run_sweep(args, plan)


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
        from .contact_sheet import foundation_overlay

        fd_img = found.images[0]
        self.save(f"fd/seed{seed}.png", fd_img)
        (self.out / "mask").mkdir(exist_ok=True)
        save_mask(found.mask, self.out / f"mask/seed{seed}.png")
        self.written.add(f"mask/seed{seed}.png")
        self.fd[seed] = fd_img
        self.overlay[seed] = foundation_overlay(found)
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
        sheet, _ = contact_sheet(cells, ["FD", "FD + mask"] + [f"omega {omega_text(w)}" for w in self.omegas],
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
    t_start = time.perf_counter()
    runner = TwoPass(args, plan)
    fc, device, dtype = runner.fc, runner.device, runner.dtype
    common = runner.common(args.steps, args.guidance_scale, args.negative_prompt)
    fd_prompt = fd_prompt_of(args.prompt, args.fd_prompt, args.identity_words)

    problem = output_dir_problem(args.out)  # checked before any work; checked again in case it changed since
    if problem:
        raise CLIError(f"--out {args.out}: {problem}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = _Results(args.out, args.seeds, args.omegas)
    settings = effective_settings(fc, runner.fd_pipe, argparse.Namespace(**{**vars(args), "omega": None}), device,
                                  dtype, common)
    for key in ("omega", "omega_source"):  # one per row here: "omegas"
        settings.pop(key)

    def record(complete: bool, error: str | None = None) -> dict:
        return dict(command="sweep", complete=complete, error=error, model=args.model, pipeline=args.pipeline,
                    weights=dict(model=None if plan.model is None else plan.model.record(),
                                 parser=None if plan.parser is None else plan.parser.record()),
                    pass2_pipeline=type(runner.pd_pipe).__name__, family=fc.family, prompt=args.prompt,
                    fd_prompt=fd_prompt, negative_prompt=args.negative_prompt,
                    attributes=results.foundations[0]["attributes"] if results.foundations else None,
                    **settings, steps=args.steps, omegas=list(args.omegas), seeds=list(args.seeds),
                    pd_kwargs=_jsonable(runner.pd_kwargs),
                    mask_source=str(args.mask) if args.mask is not None else "parser", device=str(device),
                    dtype=str(dtype).replace("torch.", ""), versions=library_versions(),
                    sheet=SHEET if SHEET in results.written else None,
                    sheet_rows=["FD", "FD + mask"] + [f"omega {omega_text(w)}" for w in args.omegas],
                    sheet_columns=[f"seed {s}" for s in args.seeds],
                    foundations=results.foundations, images=results.cells,
                    timings_s=results.timings(runner.load_s, time.perf_counter() - t_start))

    try:
        for seed in args.seeds:
            found = runner.foundation(fd_prompt, args.prompt, seed, common, seed_flag="--seeds")  # pass 1, once
            try:
                results.add_foundation(seed, found)
                for w in args.omegas:  # pass 2 per omega, from the one record
                    image, seconds = runner.pass2(found, args.prompt, w, seed, common)
                    results.add_image(seed, w, image, seconds)
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
