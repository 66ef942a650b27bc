"""``freecure batch``: run a manifest of jobs (:mod:`freecure_ops.manifest`), sharded over processes, resumable.
The output folder's layout (records, fingerprints, the index) is :mod:`freecure_ops.results`.

    freecure batch --manifest grid.jsonl --model DIR_OR_HUB_ID --out runs/grid [--parser-weights 79999_iter.pth ...]
    accelerate launch --multi_gpu --num_processes 8 -m freecure_ops.cli batch --manifest ... --out ...
    torchrun --nproc_per_node 8 -m freecure_ops.cli batch ...

Processes: Accelerate's :class:`~accelerate.PartialState` gives each process its rank and device (one
process per GPU; without CUDA, CPU processes over gloo); a plain ``freecure batch`` is one process. Every
process reads the manifest and the output folder, finds the jobs that are not complete yet, waits for the
others (so that all see the same list), then takes its contiguous part of that list from Accelerate's
``split_between_processes`` (a deterministic shard by position; part sizes differ by at most one job). A
grid in identity-major order (as ``freecure manifest`` writes it) gives each process whole identities, with
baseline and FreeCure jobs in the same proportion. Each process loads the pipeline once and runs its jobs in
order.

Per job, under ``--out/jobs/<id>/``: ``pd.png`` (the image), ``fd.png`` and ``mask.png`` (FreeCure jobs) and
``job.json`` (the record: status, settings that ran, timings, attributes, error). Every file is written
atomically (temporary file + rename) and ``job.json`` last, so a job counts as complete only when its record
says ``ok``, its fingerprint (the job, its settings, the model and the size and mtime of each of its files,
the parser checkpoint's size and mtime, the mask file's bytes; for a Hub id, of the cached snapshot it resolved
to, and the commit) matches and every file
it lists exists: a killed run never leaves a half-written image counted as done, and a job whose manifest line
changed is redone. A job that raises is recorded with its error and the others go on; so is one whose image or
record cannot be written (disk full: the error names the file; a job left without any record is redone by a
rerun). A run with jobs to do
first removes the old results index (it would outlive the records the run deletes); at the end the main
process writes it again (``results.jsonl`` and ``results.csv``, manifest order, one row per job);
each process also appends one line per job to ``logs/<run>-rank<r>.jsonl``.

One run per ``--out``: rank 0 takes ``--out/.freecure-batch.lock`` (:mod:`.out_lock`) for the whole launch before
anything in ``--out`` is read, and removes it when the run ends (an exception or Ctrl-C included). A second run
finding it held exits 2 naming the holder's pid and host; a lock a killed run left on this host is replaced.

Exit status: 0 when every job is complete, 1 when any failed (see the index), 2 for a usage problem (found
before anything loads; one line naming the flag, or the manifest line; ``--out`` in use by another run).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..manifest import Job, ManifestError, read_manifest
from ..outputs import atomic_write, atomic_write_text
from ..results import (INDEX, INDEX_CSV, OUTPUT_FILES, RECORD, content_identity, fingerprint, index_row, job_complete,
                       job_dir, write_index)
from .args import (add_weights_arguments, apg_steps_problem, check_run_flags, empty_mask_effect, fraction_arg,
                   interpreting, layers_arg, pick_device, read_mask_png, real_problem, torch_dtype, user_path)
from .errors import CLIError
from .model_files import check_model_flags, layers_problem
from .out_lock import OutLock
from .pipeline import effective_settings, load_parser, load_pipeline, quiet_libraries, save_mask
from .weights import Weights, is_local, resolve_model, resolve_parser

__all__ = ["add_arguments", "check_batch_args", "run"]
#: test hook: a process exits hard (os._exit) while saving its (N+1)-th job, after pd.png and with a
#: half-written temporary file left behind: what a kill mid-write leaves.
KILL_ENV = "_FREECURE_TEST_KILL_AFTER"

#: the command's defaults for the per-job settings (None: the pipeline's or the family preset's)
DEFAULTS = dict(steps=30, guidance_scale=None, omega=None, layers=None, style_fidelity=1.0, mode="bias", apg=False,
                gamma=0.5, apg_template=None, height=None, width=None, negative_prompt=None, empty_mask="error")


def add_arguments(sub) -> None:
    """The ``batch`` subcommand (argparse only: nothing heavy is imported here)."""
    b = sub.add_parser("batch", help="run a manifest of jobs (JSONL/CSV), sharded over processes, resumable",
                       description="Run every job of a manifest; complete jobs are skipped on rerun. Scale out "
                                   "with `accelerate launch --multi_gpu --num_processes N -m freecure_ops.cli batch "
                                   "...` (one process per GPU) or torchrun.")
    b.add_argument("--manifest", required=True, type=user_path,
                   help="JSONL or CSV, one job per line (freecure manifest)")
    add_weights_arguments(b)
    b.add_argument("--out", required=True, type=user_path,
                   help="output folder (jobs/<id>/..., results.jsonl, results.csv)")
    b.add_argument("--parser-weights", help="face parser for FreeCure jobs without a mask: a BiSeNet checkpoint "
                                            "(file or Hub file org/name/79999_iter.pth) or a SegFormer model")
    b.add_argument("--parser-revision", help="Hub revision of --parser-weights (branch, tag or commit)")
    b.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="denoising steps (per job: steps)")
    b.add_argument("--guidance-scale", type=float, help="default: the pipeline's")
    b.add_argument("--omega", type=float, help="FASA strength (default: the model family's preset)")
    b.add_argument("--layers", type=layers_arg, help="'all' or block indices (default: preset)")
    b.add_argument("--style-fidelity", type=float, default=DEFAULTS["style_fidelity"])
    b.add_argument("--mode", choices=("bias", "scale"), default=DEFAULTS["mode"])
    b.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto")
    b.add_argument("--apg", action="store_true", help="Asymmetric Prompt Guidance for FreeCure jobs")
    b.add_argument("--gamma", type=fraction_arg, default=DEFAULTS["gamma"], help="APG inversion depth")
    b.add_argument("--empty-mask", choices=("error", "warn"), default=DEFAULTS["empty_mask"])
    b.add_argument("--negative-prompt", help="negative prompt for both branches")
    b.add_argument("--height", type=int, help="pixels, a multiple of 8 (default: the pipeline's)")
    b.add_argument("--width", type=int, help="pixels, a multiple of 8 (default: the pipeline's)")
    b.add_argument("--device", help="cpu, cuda or cuda:N (default: the launcher's device for this process)")
    b.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="default: fp16 on cuda, fp32 on cpu")
    b.add_argument("--quiet", action="store_true", help="no progress bars")


# ----------------------------------------------------------------------------------------------------------
# checks before anything loads
# ----------------------------------------------------------------------------------------------------------

def _settings(args, job: Job) -> dict:
    base = {k: getattr(args, k, DEFAULTS[k]) for k in DEFAULTS}
    return {**base, **job.settings}


def _image_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable image (None: it is): missing, unreadable, or not an image PIL knows
    (the header is verified; ``freecure eval`` decodes it later)."""
    if not path.is_file() or not os.access(path, os.R_OK):
        return "no such file or not readable"
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # noqa: BLE001  (PIL raises UnidentifiedImageError, OSError, SyntaxError, ...)
        return f"not a readable image: {' '.join(str(e).split()) or type(e).__name__}"
    return None


def _outside_out_problem(out: Path, jobs: list[Job]) -> str | None:
    """A folder batch writes in that is a symlink (it would write outside ``--out``, wherever the link points)
    or not a folder (None: every write stays inside)."""
    for rel in ("jobs", "logs", *(f"jobs/{j.id}" for j in jobs)):
        p = Path(out) / rel
        if p.is_symlink():
            return (f"{rel} is a symlink (to {os.readlink(p)}): batch writes only inside --out; remove the link "
                    "(its target is left alone)")
        if p.exists() and not p.is_dir():
            return f"{rel} is not a folder; remove it"
    return None


def _where(args, job: Job) -> str:
    return f"--manifest {args.manifest} line {job.line}"


def check_batch_args(args):
    """Every check before anything loads: returns ``(jobs, device or None, model, parser)`` (the resolved
    :class:`~.weights.Weights` of --model and --parser-weights; parser None without it). Hub references resolve
    once the flags and the manifest's own checks that need no model passed (they may download). Raises
    CLIError."""
    check_run_flags(args)
    offline = args.offline or None
    parser = None
    if args.parser_weights is not None and is_local(args.parser_weights):  # local files before any download
        parser = resolve_parser(args.parser_weights, revision=args.parser_revision, offline=offline)
    try:
        jobs = read_manifest(args.manifest)
    except ManifestError as e:
        raise CLIError(f"--manifest {args.manifest}{' ' if e.line else ': '}{e}") from None
    problem = _outside_out_problem(args.out, jobs)
    if problem:
        raise CLIError(f"--out {args.out}: {problem}")
    model = resolve_model(args.model, revision=args.revision, variant=args.variant, offline=offline, quiet=args.quiet)
    multiple, blocks = check_model_flags(args, model.path)

    masks_seen: dict[Path, bool] = {}
    refs_seen: dict[Path, str | None] = {}
    for job in jobs:
        where = _where(args, job)
        s = _settings(args, job)
        for key in ("height", "width"):
            v = job.settings.get(key)
            if v is not None and v % multiple:
                raise CLIError(f"{where}: {key} must be a multiple of {multiple} (pixels), got {v}")
        if s["apg_template"] is not None and not s["apg"]:
            raise CLIError(f"{where}: apg_template is only used with apg")
        problem = apg_steps_problem(s["steps"], s["gamma"]) if s["apg"] and job.method == "freecure" else None
        if problem and not {"apg", "gamma", "steps"} & set(job.settings):  # the flags alone: name them
            raise CLIError(f"--apg with --gamma {args.gamma} and --steps {args.steps} {problem}: raise --gamma or "
                           "--steps")
        if problem:
            raise CLIError(f"{where}: apg with gamma {s['gamma']} and steps {s['steps']} {problem}: raise gamma or "
                           "steps")
        if job.reference is not None:
            if job.reference not in refs_seen:
                refs_seen[job.reference] = _image_problem(job.reference)
            if refs_seen[job.reference]:
                raise CLIError(f"{where}: reference {job.reference}: {refs_seen[job.reference]}")
        for key in ("omega", "guidance_scale"):  # the flags were checked above; a job's own value here
            problem = real_problem(key, job.settings[key]) if job.settings.get(key) is not None else None
            if problem:
                raise CLIError(f"{where}: {problem}")
        if job.method != "freecure":
            continue
        problem = layers_problem(s["layers"], blocks)
        if problem:
            raise CLIError(f"{where}: layers {problem}")
        if job.mask is not None:
            if job.mask not in masks_seen:
                try:
                    masks_seen[job.mask] = bool((read_mask_png(job.mask) > 0).any())
                except CLIError as e:
                    raise CLIError(f"{where}: {str(e).replace('--mask ', 'mask ', 1)}") from None
            if not masks_seen[job.mask] and s["empty_mask"] == "error":
                raise CLIError(f"{where}: mask {job.mask} is empty (no attribute pixel); "
                               f"{empty_mask_effect(s['mode'])} (set empty_mask to warn, or --empty-mask warn, to "
                               "run anyway)")
        elif args.parser_weights is None:
            raise CLIError(f"{where}: job {job.id!r} has no mask; give it one or pass --parser-weights PTH (the face "
                           "parser that finds the attributes)")

    if args.parser_weights is not None and parser is None:  # a Hub reference: after every other manifest check
        parser = resolve_parser(args.parser_weights, revision=args.parser_revision, offline=offline,
                                quiet=args.quiet)
    device = None
    if args.device is not None:
        device = pick_device(args.device)
    if args.backend == "triton":
        import torch

        dev = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if dev.type != "cuda" and not (dev.type == "cpu" and interpreting()):
            raise CLIError(f"--backend triton needs a CUDA device (got {dev}); use --backend torch or auto")
    return jobs, device, model, parser


def _parser_identity(parser: Weights | None):
    """The fingerprint's identity of the parser weights: the file's (size, mtime) or the local folder's files;
    a Hub SegFormer model's weights download only when it loads, so its identity is its ``config.json`` and
    the commit (in :meth:`Weights.key`): the commit's files never change."""
    if parser is None:
        return None
    if parser.hub and parser.path.is_dir():
        return content_identity(parser.path / "config.json")
    return content_identity(parser.path)


# ----------------------------------------------------------------------------------------------------------
# processes
# ----------------------------------------------------------------------------------------------------------

class _Single:
    """The process state without a launcher (or without accelerate): one process."""

    process_index, num_processes, is_main_process = 0, 1, True

    def __init__(self, device):
        self.device = device

    def wait_for_everyone(self):
        pass

    @contextmanager
    def split_between_processes(self, items):
        yield items


def _launched_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_main_env() -> bool:
    """Rank 0, or no launcher: the process that prints usage errors (one line, not one per process)."""
    return os.environ.get("RANK", "0") in ("0", "")


def process_state(device=None):
    """Accelerate's process state (rank, world size, this process's device); CPU processes talk over gloo."""
    import torch

    cpu = (device is not None and device.type == "cpu") or not torch.cuda.is_available()
    try:
        from accelerate import PartialState
    except ImportError:
        if _launched_world() > 1:
            raise CLIError(f"launched as {_launched_world()} processes, but accelerate is not installed: "
                           "pip install 'freecure-ops[batch]'") from None
        return _Single(device or torch.device("cpu" if cpu else "cuda"))
    state = PartialState(cpu=cpu)
    return state


# ----------------------------------------------------------------------------------------------------------
# running jobs
# ----------------------------------------------------------------------------------------------------------

@dataclass
class _Context:
    args: object
    pipe: object
    device: object
    dtype: object
    parser: object = None
    weights: dict = field(default_factory=dict)
    run_id: str = ""
    rank: int = 0
    world: int = 1
    ran: int = 0
    kill_after: int | None = None
    warned: set = field(default_factory=set)


def _clean_job_dir(d: Path) -> None:
    """Before a job runs: drop its old record first (so nothing stale counts), then old outputs and the
    temporary files a killed write left. A symlink made since the checks is replaced, never written through."""
    if d.is_symlink():
        d.unlink()
    d.mkdir(parents=True, exist_ok=True)
    for name in (RECORD,) + OUTPUT_FILES:
        try:
            (d / name).unlink()
        except FileNotFoundError:
            pass
    for p in d.glob(".*.tmp"):
        try:
            p.unlink()
        except OSError:
            pass


def _kill_point(ctx: _Context, d: Path) -> None:
    if ctx.kill_after is not None and ctx.ran == ctx.kill_after:
        (d / ".fd.png.killed.tmp").write_bytes(b"\x89PNG\r\n\x1a\n half-written")
        sys.stderr.flush()
        os._exit(137)


def _error_text(e: BaseException, writing: str | None) -> str:
    """A failed job's ``error``: one line, naming the output file a failed write was for (disk full, ...)."""
    where = f" (writing {writing})" if writing and isinstance(e, OSError) else ""
    return f"{type(e).__name__}: {' '.join(str(e).split())}{where}"


def _unlink_written(d: Path, written: list) -> None:
    """A failed job's outputs go: they are not a result, and on a full disk the space is needed."""
    for name in written:
        try:
            (d / name).unlink()
        except OSError:
            pass
    written.clear()


def _write_record(d: Path, rec: dict, written: list, settings: dict) -> None:
    """Write ``job.json``. A record that cannot be written (disk full, I/O error) fails its job as a failed image
    does: the outputs go, the record says error (naming job.json) and is tried once more (smaller, and the
    images' space is free now). If that fails too the job has no record, so it counts as not done and a rerun
    redoes it; ``rec`` (returned to the caller for the log and the summary) says so in ``unrecorded``."""
    try:
        atomic_write_text(d / RECORD, json.dumps(rec, indent=2, default=str) + "\n")
        return
    except OSError as e:
        if rec["status"] == "ok":
            _unlink_written(d, written)
            rec.update(status="error", files=[], error=_error_text(e, RECORD), traceback=traceback.format_exc(),
                       settings=dict(settings))
        else:  # the job had failed already: its first error stays the one that counts
            rec["error"] += f"; then {_error_text(e, RECORD)}"
    try:
        atomic_write_text(d / RECORD, json.dumps(rec, indent=2, default=str) + "\n")
    except OSError as e:
        rec["unrecorded"] = _error_text(e, RECORD)


def _run_job(ctx: _Context, job: Job, s: dict, fp: str) -> dict:
    import torch

    from ..pipeline.freecure import FreeCure, FreeCureWarning, step_generators

    args, pipe = ctx.args, ctx.pipe
    d = job_dir(args.out, job.id)
    t0 = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    rec = dict(id=job.id, status="error", method=job.method, job=job.spec(), fingerprint=fp, model=args.model,
               weights=ctx.weights, files=[], warnings=[])
    written = []
    writing = None  # the output being written: a failed write's error names it

    def save(img, name):
        nonlocal writing
        writing = name
        atomic_write(d / name, lambda tmp: img.save(tmp, format="PNG"))
        written.append(name)
        writing = None

    try:
        _clean_job_dir(d)  # in the try: a folder that cannot be made (disk full) fails this job, not the run
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call = dict(num_inference_steps=s["steps"], output_type="pil")
            for key in ("guidance_scale", "height", "width", "negative_prompt"):
                if s[key] is not None:
                    call[key] = s[key]
            if job.method == "baseline":
                # FreeCure's noise for this seed (initial latents and per-step noise): the baseline and the
                # freecure job of a prompt differ by FreeCure alone, with stochastic samplers too
                fc = FreeCure(pipe, None, layers="all")
                h, w = fc._size(call)
                latents, seeds = fc.noise(1, h, w, seed=job.seed)
                image = pipe(prompt=job.prompt, latents=latents, generator=step_generators(seeds),
                             **{**call, "height": h, "width": w}).images[0]
                from ..pipeline.apg import default_guidance_scale

                settings = dict(steps=s["steps"], guidance_scale=float(call.get("guidance_scale",
                                                                                 default_guidance_scale(pipe))),
                                height=h, width=w, negative_prompt=s["negative_prompt"])
                save(image, "pd.png")
                _kill_point(ctx, d)
                extra = dict(fasa_applied=False, attributes=None, timings_s={"total": time.perf_counter() - t0})
            else:
                fc = FreeCure(pipe, ctx.parser if job.mask is None else None, omega=s["omega"], layers=s["layers"],
                              style_fidelity=s["style_fidelity"], mode=s["mode"], backend=args.backend,
                              empty_mask=s["empty_mask"])
                mask = None if job.mask is None else torch.from_numpy(read_mask_png(job.mask))
                out = fc(job.prompt, fd_prompt=job.fd_prompt or job.prompt, mask=mask, seed=job.seed, apg=s["apg"],
                         gamma=s["gamma"], apg_template=s["apg_template"], **call)
                from types import SimpleNamespace

                ns = SimpleNamespace(layers=s["layers"], omega=s["omega"], mode=s["mode"], backend=args.backend,
                                     style_fidelity=s["style_fidelity"], empty_mask=s["empty_mask"])
                settings = dict(effective_settings(fc, pipe, ns, ctx.device, ctx.dtype, call), steps=s["steps"],
                                apg=s["apg"], gamma=s["gamma"] if s["apg"] else None,
                                negative_prompt=s["negative_prompt"])
                save(out.images[0], "pd.png")
                _kill_point(ctx, d)
                if out.fd_images is not None:
                    save(out.fd_images[0], "fd.png")
                if out.mask is not None:
                    writing = "mask.png"
                    save_mask(out.mask, d / "mask.png")
                    written.append("mask.png")
                    writing = None
                extra = dict(fasa_applied=out.fasa_applied, attributes=out.attributes[0] if out.attributes else [],
                             template_prompts=out.template_prompts, fd_reuse=out.fd_reuse,
                             timings_s={k: round(v, 4) for k, v in out.timings.items()})
        msgs = []
        for w in caught:
            text = f"{w.category.__name__}: {w.message}"
            if text not in msgs and (issubclass(w.category, FreeCureWarning) or w.category is UserWarning):
                msgs.append(text)
        rec.update(status="ok", files=written, settings=settings, warnings=msgs, **extra)
    except Exception as e:  # noqa: BLE001  (a failing job is recorded; the others go on)
        _unlink_written(d, written)
        rec.update(status="error", files=[], error=_error_text(e, writing), traceback=traceback.format_exc(),
                   settings=dict(s))
    rec["seconds"] = round(time.perf_counter() - t0, 4)
    rec["run"] = dict(run_id=ctx.run_id, rank=ctx.rank, world_size=ctx.world, device=str(ctx.device),
                      host=socket.gethostname(), pid=os.getpid(), started=started,
                      finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    rec["dtype"] = str(ctx.dtype).replace("torch.", "")
    _write_record(d, rec, written, s)
    return rec


def run(args) -> int:
    """``freecure batch``: check, shard, run, index. Returns the exit status."""
    try:
        jobs, device, model, parser_ref = check_batch_args(args)
    except CLIError:
        if not is_main_env():  # every process finds the same problem: rank 0 alone says it
            raise SystemExit(2) from None
        raise
    state = process_state(device)
    lock = _lock_out(args, state)
    try:
        return _run(args, state, jobs, device, model, parser_ref)
    finally:  # also on an exception or Ctrl-C; a kill leaves the lock, which the next run finds stale
        if lock is not None:
            lock.release()


def _lock_out(args, state) -> OutLock | None:
    """Rank 0 takes ``--out``'s lock for the whole launch (its other processes are the same run). When another
    run holds it every process exits 2 before anything is read or loaded; rank 0 says why."""
    lock = problem = None
    if state.is_main_process:
        try:
            lock = OutLock.acquire(args.out)
        except CLIError as e:
            problem = str(e)
    if state.num_processes > 1:  # the others learn rank 0's answer (refused, they would wait at a barrier)
        from accelerate.utils import broadcast_object_list

        problem = broadcast_object_list([problem])[0]
    if problem is not None and state.num_processes > 1:
        if state.is_main_process:
            print(f"freecure: error: {problem}", file=sys.stderr, flush=True)
        state.wait_for_everyone()  # said before any process exits: the launcher stops the rest at the first exit
        raise SystemExit(2)
    if problem is not None:
        raise CLIError(problem)
    return lock


class _Log:
    """This process's ``logs/<run>-rank<r>.jsonl``: a convenience beside the records, so a write that fails
    (disk full) is said once and logging stops, instead of ending the run."""

    def __init__(self, path: Path):
        self.path, self.file = path, None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", encoding="utf-8")
        except OSError as e:
            self._lost(e)

    def _lost(self, e: OSError) -> None:
        print(f"freecure batch: cannot write the log {self.path} ({_error_text(e, None)}); the job records "
              "stay the truth", file=sys.stderr)
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
        self.file = None

    def write(self, entry: dict) -> None:
        if self.file is None:
            return
        try:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()
        except OSError as e:
            self._lost(e)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass


def _run(args, state, jobs, device, model, parser_ref) -> int:
    import torch

    rank, world = state.process_index, state.num_processes
    if device is None:
        device = torch.device(state.device)
        if device.type == "cpu":
            device = torch.device("cpu")
    dtype = torch_dtype(args.dtype, device)
    dtype_name = str(dtype).replace("torch.", "")

    identities = dict(model=content_identity(model.path), parser=_parser_identity(parser_ref))
    parser_key = None if parser_ref is None else parser_ref.key()
    fps = {j.id: fingerprint(j, _settings(args, j), model.key(), dtype_name, args.backend, parser_key, identities)
           for j in jobs}
    done_before = {j.id for j in jobs if job_complete(args.out, j.id, fps[j.id])}
    pending = [j for j in jobs if j.id not in done_before]
    if pending and state.is_main_process:  # the old index would outlive the records this run is about to delete
        for name in (INDEX, INDEX_CSV):
            (Path(args.out) / name).unlink(missing_ok=True)
    state.wait_for_everyone()  # every process has listed the pending jobs (and the index is gone) before any writes
    with state.split_between_processes(pending) as part:  # contiguous, sizes differing by at most one
        mine = list(part)

    failed_here = 0
    unrecorded = {}  # job id -> error, for jobs whose record could not be written (the index calls them missing)
    if mine:
        with quiet_libraries(True):  # library notes would repeat per job and break the progress bars
            parser = None
            if parser_ref is not None and any(j.method == "freecure" and j.mask is None for j in mine):
                parser = load_parser(parser_ref, device, offline=args.offline or None)
            pipe = load_pipeline(model, device, dtype)
            pipe.set_progress_bar_config(disable=True)
            ctx = _Context(args=args, pipe=pipe, device=device, dtype=dtype, parser=parser, rank=rank, world=world,
                           run_id=time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}",
                           weights=dict(model=model.record(),
                                        parser=None if parser_ref is None else parser_ref.record()))
            kill = os.environ.get(KILL_ENV)
            ctx.kill_after = int(kill) if kill else None
            log_path = Path(args.out) / "logs" / f"{ctx.run_id}-rank{rank}.jsonl"
            from tqdm.auto import tqdm

            bar = tqdm(total=len(mine), desc=f"freecure batch [{rank}/{world}]", unit="job", position=rank,
                       disable=args.quiet, file=sys.stderr, dynamic_ncols=True, leave=True)
            with bar, _Log(log_path) as log:
                for job in mine:
                    rec = _run_job(ctx, job, _settings(args, job), fps[job.id])
                    ctx.ran += 1
                    failed_here += rec["status"] != "ok"
                    if "unrecorded" in rec:  # said now: rank 0's summary knows only its own
                        unrecorded[job.id] = rec["error"]
                        why = "" if rec["unrecorded"] == rec["error"] else f" ({rec['unrecorded']})"
                        print(f"freecure batch: job {job.id} (line {job.line}) failed: {rec['error']}; it has no "
                              f"record{why}: a rerun redoes it", file=sys.stderr)
                    log.write(dict(id=job.id, status=rec["status"], seconds=rec["seconds"], rank=rank,
                                   world_size=world, error=rec.get("error")))
                    bar.set_postfix(failed=failed_here, refresh=False)
                    bar.update(1)

    state.wait_for_everyone()  # every record is written
    rows, index_error = None, None
    if state.is_main_process:
        try:
            rows = write_index(args.out, jobs, fps)
        except OSError as e:  # disk full at the end: the records are complete and a rerun writes the index
            index_error = _error_text(e, INDEX)
    state.wait_for_everyone()
    if rows is None:
        rows = [index_row(args.out, j, fps[j.id]) for j in jobs]
    bad = [r for r in rows if r["status"] != "ok"]
    if state.is_main_process:
        pending_ids = {j.id for j in pending}
        ok_now = sum(r["status"] == "ok" and r["id"] in pending_ids for r in rows)
        print(f"freecure batch: {len(jobs)} jobs: {len(jobs) - len(bad)} complete ({len(done_before)} already done, "
              f"{ok_now} run now on {world} process{'es' if world > 1 else ''}), {len(bad)} failed; "
              f"index: {Path(args.out) / INDEX}")
        for r in bad[:10]:
            print(f"freecure batch: job {r['id']} (line {r['line']}): {r['status']}: "
                  f"{r['error'] or unrecorded.get(r['id'])}", file=sys.stderr)
        if len(bad) > 10:
            print(f"freecure batch: ... and {len(bad) - 10} more (see the index)", file=sys.stderr)
        if index_error:
            print(f"freecure batch: the index was not written ({index_error}); the job records are complete: "
                  "rerun to write it", file=sys.stderr)
    return 1 if bad or index_error else 0
