"""A batch's output folder, as ``freecure batch`` writes it and ``freecure eval`` reads it.

    OUT/jobs/<id>/pd.png, fd.png, mask.png    the job's images (FreeCure jobs: all three)
    OUT/jobs/<id>/job.json                    the record: status, fingerprint, settings that ran, files, error
    OUT/results.jsonl, OUT/results.csv        the index: one row per manifest job, manifest order

A job is complete when its record says ``ok``, its fingerprint (:func:`fingerprint`) is the one the current
settings give and every file it lists exists. The index is a summary written at the end of a run; the
records are the truth.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .manifest import Job, parse_json_line
from .outputs import atomic_write_text

__all__ = ["JOBS", "RECORD", "INDEX", "INDEX_CSV", "OUTPUT_FILES", "job_dir", "read_record", "job_complete",
           "content_identity", "fingerprint", "index_row", "write_index", "read_index"]

JOBS = "jobs"
RECORD = "job.json"
INDEX = "results.jsonl"
INDEX_CSV = "results.csv"
OUTPUT_FILES = ("pd.png", "fd.png", "mask.png")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_identity(path) -> object:
    """A cheap identity of a file or folder's content, so that a changed weights file reruns the jobs built on
    it: a file's (size, mtime_ns); a folder's sorted (relative path, size, mtime_ns) of every file. None for
    None; the plain string for a path that is not on disk (a Hub id: the loader resolves it)."""
    if path is None:
        return None
    p = Path(path).expanduser()
    try:
        if p.is_file():
            st = p.stat()
            return [st.st_size, st.st_mtime_ns]
        if p.is_dir():
            return sorted([f.relative_to(p).as_posix(), f.stat().st_size, f.stat().st_mtime_ns]
                          for f in p.rglob("*") if f.is_file())
    except OSError as e:  # a file vanishing mid-walk: still a change
        return f"unreadable: {e}"
    return str(path)


def fingerprint(job: Job, settings: dict, model: str, dtype: str, backend: str, parser_weights,
                identities: dict | None = None) -> str:
    """What makes a job's outputs what they are: a job whose fingerprint changed is run again. ``identities``:
    :func:`content_identity` of ``model`` and ``parser_weights`` (computed once per run by the caller)."""
    ids = identities if identities is not None else {}
    spec = {k: v for k, v in job.spec().items() if k in ("id", "prompt", "fd_prompt", "seed", "method", "mask")}
    data = dict(job=spec, settings={k: settings[k] for k in sorted(settings)}, model=str(model), dtype=dtype,
                backend=backend, model_files=ids.get("model"))
    if job.method == "freecure":
        data["mask_sha256"] = _file_digest(job.mask) if job.mask is not None else None
        data["parser"] = None if job.mask is not None else [str(parser_weights), ids.get("parser")]
    else:  # FreeCure-only settings do not change a baseline image
        for k in ("omega", "layers", "style_fidelity", "mode", "apg", "gamma", "apg_template", "empty_mask"):
            data["settings"].pop(k, None)
        data.pop("backend")
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:20]


def job_dir(out: Path, job_id: str) -> Path:
    return Path(out) / JOBS / job_id


def read_record(out: Path, job_id: str) -> dict | None:
    try:
        rec = json.loads((job_dir(out, job_id) / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # unreadable: the job is not complete
        return None
    return rec if isinstance(rec, dict) else None


def job_complete(out: Path, job_id: str, fp: str | None = None) -> bool:
    """The job's record says ok (for this fingerprint, when given) and every file it lists exists (a file, not a
    symlink to one: batch writes its own files, so a link is not its output)."""
    rec = read_record(out, job_id)
    if rec is None or rec.get("status") != "ok" or (fp is not None and rec.get("fingerprint") != fp):
        return False
    d = job_dir(out, job_id)
    files = rec.get("files")
    return isinstance(files, list) and bool(files) and all(
        (d / f).is_file() and not (d / f).is_symlink() and (d / f).stat().st_size > 0 for f in files)


_INDEX_COLUMNS = ("id", "line", "method", "identity", "status", "seconds", "prompt", "fd_prompt", "eval_prompt",
                  "seed", "n_attributes", "attributes", "reference", "mask", "dir", "files", "settings",
                  "timings_s", "fasa_applied", "error", "rank", "world_size", "device", "finished", "fingerprint")


def index_row(out: Path, job: Job, fp: str) -> dict:
    rec = read_record(out, job.id) or {}
    status = rec.get("status", "missing")
    if status == "ok" and not job_complete(out, job.id, fp):
        status = "stale" if rec.get("fingerprint") != fp else "incomplete"
    run = rec.get("run", {})
    return dict(id=job.id, line=job.line, method=job.method, identity=job.identity, status=status,
                seconds=rec.get("seconds"), prompt=job.prompt, fd_prompt=job.fd_prompt, eval_prompt=job.eval_prompt,
                seed=job.seed, n_attributes=job.n_attributes, attributes=job.attributes or rec.get("attributes"),
                reference=None if job.reference is None else str(job.reference),
                mask=None if job.mask is None else str(job.mask), dir=f"{JOBS}/{job.id}",
                files=rec.get("files", []) if status == "ok" else [], settings=rec.get("settings"),
                timings_s=rec.get("timings_s"), fasa_applied=rec.get("fasa_applied"), error=rec.get("error"),
                rank=run.get("rank"), world_size=run.get("world_size"), device=run.get("device"),
                finished=run.get("finished"), fingerprint=fp)


def write_index(out: Path, jobs: list[Job], fps: dict[str, str]) -> list[dict]:
    """``results.jsonl`` and ``results.csv`` (manifest order, one row per job), written atomically."""
    import csv
    import io

    rows = [index_row(out, j, fps[j.id]) for j in jobs]
    atomic_write_text(Path(out) / INDEX, "".join(json.dumps(r) + "\n" for r in rows))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_INDEX_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else ("" if v is None else v)
                    for k, v in r.items()})
    atomic_write_text(Path(out) / INDEX_CSV, buf.getvalue())
    return rows


def read_index(results_dir) -> list[dict]:
    path = Path(results_dir) / INDEX
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, 1):
            if text.strip():
                try:
                    rows.append(parse_json_line(text))
                except ValueError as e:
                    raise ValueError(f"{path} line {n}: {e}") from None
    return rows
