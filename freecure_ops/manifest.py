"""Batch manifests: one generation job per line, JSONL or CSV (``freecure batch --manifest FILE``).

JSONL (``.jsonl``, ``.ndjson``, ``.json``; blank lines are skipped)::

    {"id": "alice_p00_freecure", "prompt": "a photo of sks woman with red hair",
     "fd_prompt": "a photo of a woman with red hair", "seed": 0, "method": "freecure", "mask": "masks/a.png",
     "identity": "alice", "settings": {"steps": 30, "omega": 1.5}}

CSV (``.csv``): a header row naming the fields, one job per row; an empty cell means "not given"; settings
are plain columns (``steps``, ``omega``, ...); ``layers`` as ``all`` or ``50,51,52``, ``attributes`` as
``hair;eye``.

Fields (:data:`FIELDS`): ``id`` (required; letters, digits, ``. _ -``, unique ignoring case: it names the
job's output folder), ``prompt`` (required; the PD prompt, with the identity), ``seed`` (required int),
``fd_prompt`` (the FD prompt, the same without the identity; default: ``prompt``), ``method`` (``freecure``,
the default, or ``baseline``: the plain pipeline with the PD inputs and the same seed), ``mask`` (attribute
mask PNG, white = attribute, relative to the manifest's folder; otherwise the face parser makes it),
``identity`` (name of the identity, for ``freecure eval --reference ID=IMAGE``), ``reference`` (the
identity's reference image), ``eval_prompt`` (text that prompt consistency is scored against; default
``fd_prompt``), ``n_attributes`` / ``attributes`` (the attributes the prompt asks for; default: found in the
prompt), and per-job settings (:data:`SETTINGS`) overriding the command's. Unknown fields are errors (a typo
must not silently drop a setting).

Every problem is a :class:`ManifestError` naming the line (``line 7: duplicate id 'x' (first on line 3)``).
Standard library only.
"""
from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Job", "ManifestError", "FIELDS", "SETTINGS", "read_manifest", "write_manifest", "manifest_format",
           "check_setting", "parse_json_line"]

METHODS = ("freecure", "baseline")
_MODES = ("bias", "scale")
_EMPTY = ("error", "warn")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # fullmatch: "$" would let "a1\n" in


class ManifestError(ValueError):
    """A problem in a manifest; ``line`` is its 1-based line number (0: the file as a whole)."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}" if line else message)
        self.line = line
        self.message = message


# ----------------------------------------------------------------------------------------------------------
# settings a job may override: name -> (kind, check)
# ----------------------------------------------------------------------------------------------------------

def _int(name, v):
    if isinstance(v, bool):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, str):
        try:
            v = int(v.strip())
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {v!r}") from None
    if not isinstance(v, int):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    return v


def _float(name, v):
    if isinstance(v, bool):
        raise ValueError(f"{name} must be a number, got {v!r}")
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            raise ValueError(f"{name} must be a number, got {v!r}") from None
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def _bool(name, v):
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "1", "yes", "y"):
        return True
    if isinstance(v, str) and v.strip().lower() in ("false", "0", "no", "n"):
        return False
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise ValueError(f"{name} must be true or false, got {v!r}")


def _str(name, v):
    if not isinstance(v, str):
        raise ValueError(f"{name} must be a string, got {v!r}")
    return v


def _layers(name, v):
    if isinstance(v, str):
        if v.strip() == "all":
            return "all"
        v = [t for t in v.split(",") if t.strip()]
    if not isinstance(v, (list, tuple)) or not v:
        raise ValueError(f"{name} must be 'all' or a list of block indices, got {v!r}")
    out = sorted({_int(name, t) for t in v})
    if out[0] < 0:
        raise ValueError(f"{name}: block indices must be >= 0, got {out[0]}")
    return out


def check_setting(name: str, value):
    """Convert and check one per-job setting (ValueError naming it)."""
    if name == "steps":
        v = _int(name, value)
        if v < 1:
            raise ValueError(f"steps must be >= 1, got {v}")
        return v
    if name in ("height", "width"):
        v = _int(name, value)
        if v < 1:
            raise ValueError(f"{name} must be a positive number of pixels, got {v}")
        return v
    if name in ("guidance_scale", "omega", "style_fidelity", "gamma"):
        v = _float(name, value)
        if name == "guidance_scale" and v < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {v}")
        if name == "style_fidelity" and not 0 <= v <= 1:
            raise ValueError(f"style_fidelity must be in [0, 1], got {v}")
        if name == "gamma" and not 0 < v <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {v}")
        return v
    if name == "apg":
        return _bool(name, value)
    if name == "layers":
        return _layers(name, value)
    if name in ("mode", "empty_mask"):
        choices = _MODES if name == "mode" else _EMPTY
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return value
    if name in ("negative_prompt", "apg_template"):
        return _str(name, value)
    raise KeyError(name)


#: per-job settings (override the command's options of the same name; CLI flags use dashes)
SETTINGS = ("steps", "guidance_scale", "omega", "layers", "style_fidelity", "mode", "apg", "gamma",
            "apg_template", "height", "width", "negative_prompt", "empty_mask")
_REQUIRED = ("id", "prompt", "seed")
#: every field a manifest line may hold
FIELDS = _REQUIRED + ("fd_prompt", "method", "mask", "identity", "reference", "eval_prompt", "n_attributes",
                      "attributes", "settings") + SETTINGS


@dataclass
class Job:
    """One line of a manifest. Paths are resolved against the manifest's folder."""

    line: int
    id: str
    prompt: str
    seed: int
    fd_prompt: str | None = None
    method: str = "freecure"
    mask: Path | None = None
    identity: str | None = None
    reference: Path | None = None
    eval_prompt: str | None = None
    n_attributes: int | None = None
    attributes: list | None = None
    settings: dict = field(default_factory=dict)

    def spec(self) -> dict:
        """The job as JSON-able data (what a record stores and a resume compares)."""
        d = asdict(self)
        d.pop("line")
        for k in ("mask", "reference"):
            d[k] = None if d[k] is None else str(d[k])
        return d


def parse_json_line(text: str):
    """One JSON line -> its value; ValueError ``not valid JSON (...)`` for anything json refuses, including
    what it refuses with other exceptions: nesting deeper than the recursion limit, an over-long integer."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise ValueError("not valid JSON (nested too deeply to read)") from None
    except ValueError as e:  # "Exceeds the limit (4300 digits) for integer string conversion ..."
        raise ValueError(f"not valid JSON ({str(e).split(';')[0]})") from None


def manifest_format(path: Path) -> str:
    """"csv" or "jsonl", from the extension (else from the first non-blank character)."""
    ext = path.suffix.lower()
    if ext == ".csv":
        return "csv"
    if ext in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    with open(path, encoding="utf-8-sig") as f:
        for text in f:
            if text.strip():
                return "jsonl" if text.lstrip().startswith("{") else "csv"
    return "jsonl"


def _rows(path: Path):
    """(line number, dict of raw values) per job line."""
    fmt = manifest_format(path)
    with open(path, encoding="utf-8-sig", newline="") as f:
        if fmt == "jsonl":
            for n, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    row = parse_json_line(text)
                except ValueError as e:
                    raise ManifestError(n, str(e)) from None
                if not isinstance(row, dict):
                    raise ManifestError(n, f"expected a JSON object per line, got {type(row).__name__}")
                yield n, row
            return
        reader = csv.DictReader(f)
        header = reader.fieldnames
        if not header:
            return
        header = [h.strip() if h else h for h in header]
        reader.fieldnames = header
        for name in header:
            if not name:
                raise ManifestError(1, "the CSV header has an empty column name")
            if name not in FIELDS or name == "settings":
                raise ManifestError(1, f"unknown column {name!r} (known: {', '.join(f for f in FIELDS if f != 'settings')})")
        missing = [k for k in _REQUIRED if k not in header]
        if missing:
            raise ManifestError(1, f"the CSV header lacks the required column(s) {', '.join(missing)}")
        for row in reader:
            n = reader.line_num  # the row's (last) physical line
            if None in row:
                raise ManifestError(n, f"{len(header) + len(row[None])} cells for {len(header)} columns")
            if all(v is None or not v.strip() for v in row.values()):
                continue
            yield n, {k: v for k, v in row.items() if v is not None and v.strip() != ""}


def _path(base: Path, name: str, value) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a file path, got {value!r}")
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _job(n: int, row: dict, base: Path) -> Job:
    unknown = [k for k in row if k not in FIELDS]
    if unknown:
        raise ManifestError(n, f"unknown field {unknown[0]!r} (known: {', '.join(FIELDS)})")
    missing = [k for k in _REQUIRED if row.get(k) in (None, "")]
    if missing:
        raise ManifestError(n, f"missing required field {', '.join(repr(k) for k in missing)}")
    try:
        jid = row["id"]
        if isinstance(jid, int) and not isinstance(jid, bool):
            jid = str(jid)
        if not isinstance(jid, str) or not _ID_RE.fullmatch(jid):
            raise ValueError(f"id must be 1-128 letters, digits, '.', '_' or '-' (not starting with '.', '_' or "
                             f"'-'): it names the job's output folder; got {jid!r}")
        prompt = row["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        seed = _int("seed", row["seed"])
        if not -2 ** 63 <= seed < 2 ** 64:
            raise ValueError(f"seed must fit a 64-bit integer, got {seed}")
        job = Job(line=n, id=jid, prompt=prompt, seed=seed)
        for key in ("fd_prompt", "identity", "eval_prompt"):
            if key in row and row[key] is not None:
                setattr(job, key, _str(key, row[key]))
        if job.identity is not None and not job.identity.strip():
            raise ValueError("identity must not be empty")
        method = row.get("method", "freecure")
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        job.method = method
        if row.get("mask") is not None:
            job.mask = _path(base, "mask", row["mask"])
        if row.get("reference") is not None:
            job.reference = _path(base, "reference", row["reference"])
        if row.get("n_attributes") is not None:
            job.n_attributes = _int("n_attributes", row["n_attributes"])
            if job.n_attributes < 0:
                raise ValueError(f"n_attributes must be >= 0, got {job.n_attributes}")
        if row.get("attributes") is not None:
            a = row["attributes"]
            a = [t.strip() for t in a.split(";") if t.strip()] if isinstance(a, str) else a
            if not isinstance(a, list) or not all(isinstance(t, str) for t in a):
                raise ValueError(f"attributes must be a list of attribute names, got {row['attributes']!r}")
            job.attributes = a
        nested = row.get("settings") or {}
        if not isinstance(nested, dict):
            raise ValueError(f"settings must be an object of per-job settings, got {nested!r}")
        for key in nested:
            if key not in SETTINGS:
                raise ValueError(f"unknown setting {key!r} in settings (known: {', '.join(SETTINGS)})")
            if key in row:
                raise ValueError(f"{key!r} is given both as a field and in settings")
        for key, value in {**nested, **{k: row[k] for k in SETTINGS if k in row}}.items():
            if value is not None:
                job.settings[key] = check_setting(key, value)
    except ValueError as e:
        raise ManifestError(n, str(e)) from None
    return job


def read_manifest(path) -> list[Job]:
    """Parse and check a manifest (fields, types, duplicate ids). Files are resolved, not opened: the
    caller checks masks and references (:class:`ManifestError` naming the line either way)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(0, "no such file" if not path.exists() else "not a file")
    base = path.parent.absolute()
    jobs: list[Job] = []
    seen: dict[str, int] = {}
    try:
        for n, row in _rows(path):
            job = _job(n, row, base)
            key = job.id.lower()
            if key in seen:
                raise ManifestError(n, f"duplicate id {job.id!r} (first on line {seen[key]}; ids are compared "
                                    "ignoring case, as they name folders)")
            seen[key] = n
            jobs.append(job)
    except UnicodeDecodeError as e:
        raise ManifestError(0, f"not UTF-8 text ({e.reason})") from None
    except csv.Error as e:
        raise ManifestError(0, f"not valid CSV: {e}") from None
    if not jobs:
        raise ManifestError(0, "no jobs in the manifest")
    return jobs


def write_manifest(path, rows: list[dict[str, Any]]) -> Path:
    """Write job dicts as JSONL (or CSV for a ``.csv`` path) atomically."""
    from .outputs import atomic_write_text

    path = Path(path)
    if path.suffix.lower() != ".csv":
        return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    import io

    cols = [f for f in FIELDS if f != "settings" and any(f in r for r in rows)]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (";".join(v) if k == "attributes" else ",".join(map(str, v)) if k == "layers" else v)
                    if isinstance(v, list) else ("true" if v is True else "false" if v is False else v)
                    for k, v in r.items()})
    return atomic_write_text(path, buf.getvalue())
