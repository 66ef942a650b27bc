"""``freecure eval``: the paper's scores over a batch's results: PC, IF and their harmonic mean.

    freecure eval --results runs/grid --clip clip-vit-large-patch14/ --face-model w600k_r50.onnx \\
                  --reference alice=refs/alice.jpg --reference bob=refs/bob.jpg

* **PC** (prompt consistency): ``100 * cos(CLIP image embedding, CLIP text embedding)`` of the PD image and
  the job's ``eval_prompt`` (default: its FD prompt, i.e. the prompt without the identity token; else its
  prompt), with transformers' ``CLIPModel`` and processor loaded from a local folder (the paper's x100
  convention; no clipping at 0).
* **IF** (identity fidelity): ``100 * cos(face embedding of the PD image, face embedding of the identity's
  reference image)``, both through the same crop/alignment step and face model
  (:mod:`freecure_ops.face_embed`). The reference is ``--reference ID=IMAGE`` for the job's ``identity``,
  else the job's own ``reference`` field.
* **hMean**: ``2 * PC * IF / (PC + IF)``, per job, and per table row from the row's mean PC and mean IF.

Tables: per method (``baseline`` = the personalization model alone, ``freecure``) and per number of
attributes the prompt asks for (1, 2, 3, ..., and ``all``): ``eval_summary.csv`` and ``eval_summary.png``;
per job: ``eval_jobs.csv``; settings and the summary: ``eval.json``. Only jobs whose status is ok count; an
ok job whose ``pd.png`` is gone or unreadable is a ``missing`` row with a note (not scored, not in the tables).
"""
from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path

__all__ = ["add_arguments", "run", "evaluate", "ClipScorer", "harmonic_mean", "summarize"]


def add_arguments(sub) -> None:
    from pathlib import Path as _P

    e = sub.add_parser("eval", help="score a batch's results: PC (CLIP), IF (face embeddings), hMean",
                       description="Prompt consistency, identity fidelity and their harmonic mean per method and "
                                   "attribute count. Models come from local paths; nothing is downloaded.")
    e.add_argument("--results", required=True, type=_P, help="a `freecure batch` output folder (results.jsonl)")
    e.add_argument("--clip", required=True, type=_P, help="local CLIP folder (CLIPModel + processor)")
    e.add_argument("--face-model", help="ONNX face-recognition model (ArcFace-style), or module:function "
                                        "(face RGB uint8 [h, w, 3] -> embedding)")
    e.add_argument("--reference", action="append", default=[], metavar="ID=IMAGE",
                   help="reference image of an identity (repeat per identity)")
    e.add_argument("--face-crop", default="center:1.0",
                   help="crop without a detector: center[:F] (centred square, F of the shorter side) or full")
    e.add_argument("--face-detector", metavar="MODULE:FUNCTION",
                   help="image RGB uint8 -> None | box (x0, y0, x1, y1) | 5 landmarks [5, 2] (ArcFace alignment)")
    e.add_argument("--out", type=_P, help="where the tables go (default: --results)")
    e.add_argument("--device", help="cpu, cuda or cuda:N for CLIP (default: cuda when available)")
    e.add_argument("--batch-size", type=int, default=16, help="CLIP images per forward")
    e.add_argument("--quiet", action="store_true", help="no progress bar")


def harmonic_mean(a: float, b: float) -> float:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or a + b <= 0:
        return float("nan")
    return 2.0 * a * b / (a + b)


class ClipScorer:
    """CLIP image-text similarity x100 with transformers' CLIP from a local folder."""

    def __init__(self, folder, device="cpu"):
        import torch
        from transformers import AutoProcessor, CLIPModel

        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)

    def __call__(self, images, texts) -> list[float]:
        import torch

        tok = getattr(self.processor, "tokenizer", None)
        max_len = getattr(tok, "model_max_length", None)
        kw = dict(truncation=True, max_length=max_len) if isinstance(max_len, int) and max_len < 10 ** 6 else {}
        inputs = self.processor(text=list(texts), images=list(images), return_tensors="pt", padding=True, **kw)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.no_grad():
            out = self.model(**inputs)
        img = out.image_embeds.float()
        txt = out.text_embeds.float()
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return [100.0 * float(v) for v in (img * txt).sum(-1).cpu()]


def _n_attributes(row: dict) -> int:
    if row.get("n_attributes") is not None:
        return int(row["n_attributes"])
    if row.get("attributes"):
        return len(row["attributes"])
    from .pipeline.attributes import find_attributes

    return len(find_attributes(row.get("prompt") or ""))


def _pc_text(row: dict) -> str:
    return row.get("eval_prompt") or row.get("fd_prompt") or row["prompt"]


def _mean(values):
    v = [x for x in values if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else float("nan")


def summarize(job_rows: list[dict]) -> list[dict]:
    """Per method and attribute count (and ``all``): jobs, mean PC, mean IF, hMean of the two means. Jobs
    whose image is missing (``status`` "missing") are not counted."""
    out = []
    job_rows = [r for r in job_rows if r.get("status", "ok") == "ok"]
    methods = sorted({r["method"] for r in job_rows}, key=lambda m: (m != "baseline", m))
    counts = sorted({r["n_attributes"] for r in job_rows})
    for method in methods:
        for group in [*counts, "all"]:
            rows = [r for r in job_rows if r["method"] == method and (group == "all" or r["n_attributes"] == group)]
            if not rows:
                continue
            pc, idf = _mean(r["pc"] for r in rows), _mean(r["if"] for r in rows)
            out.append(dict(method=method, n_attributes=group, jobs=len(rows),
                            if_jobs=sum(r["if"] is not None and math.isfinite(r["if"]) for r in rows),
                            pc=pc, **{"if": idf}, hmean=harmonic_mean(pc, idf)))
    return out


def _row(r: dict, pc, score, ref, status: str, note: str) -> dict:
    return dict(id=r["id"], method=r["method"], identity=r.get("identity"), n_attributes=_n_attributes(r),
                status=status, pc=pc, **{"if": score}, hmean=harmonic_mean(pc, score) if score is not None else None,
                pc_text=_pc_text(r), reference=None if ref is None else str(ref), note=note)


def evaluate(results_dir, clip, *, face_model=None, references=None, crop="center:1.0", detector=None,
             device="cpu", batch_size=16, progress=False):
    """Score every ok job of a batch's results: ``(job_rows, summary_rows)`` (see the module docstring).
    ``clip``: a folder or a :class:`ClipScorer`; ``face_model``: None (no IF), a path or a callable;
    ``references``: identity -> image path."""
    import numpy as np
    from PIL import Image

    from .batch import read_index
    from .face_embed import cosine_similarity, crop_face, load_face_embedder

    results_dir = Path(results_dir)
    rows = [r for r in read_index(results_dir) if r.get("status") == "ok" and "pd.png" in (r.get("files") or [])]
    scorer = clip if isinstance(clip, ClipScorer) else ClipScorer(clip, device)
    embed = None if face_model is None else load_face_embedder(face_model)
    size = getattr(embed, "input_size", (112, 112))
    references = {k: Path(v) for k, v in (references or {}).items()}
    ref_cache: dict[str, object] = {}

    def face_embedding(img):
        face = crop_face(img, crop, detector, size)
        return None if face is None else embed(np.asarray(face.convert("RGB")))

    job_rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), desc="freecure eval", unit="image", file=sys.stderr)
    def reference_embedding(ref: Path):
        key = str(ref)
        if key not in ref_cache:  # (embedding, note): an unreadable reference is a note per job, not a crash
            try:
                with Image.open(ref) as im:
                    ref_cache[key] = (face_embedding(im.convert("RGB")), "no face in the reference")
            except OSError as e:  # PIL's UnidentifiedImageError is an OSError
                ref_cache[key] = (None, f"reference not readable: {' '.join(str(e).split())}")
        return ref_cache[key]

    for start in range(0, len(rows), max(1, batch_size)):
        chunk, images = [], []
        for r in rows[start:start + batch_size]:
            try:  # deleted or damaged since the batch ran: recorded as missing, the others go on
                with Image.open(results_dir / r["dir"] / "pd.png") as im:
                    images.append(im.convert("RGB"))
                chunk.append(r)
            except OSError as e:
                job_rows.append(_row(r, None, None, None, "missing",
                                     f"pd.png missing or unreadable: {' '.join(str(e).split())}"))
        pcs = scorer(images, [_pc_text(r) for r in chunk]) if chunk else []
        for r, img, pc in zip(chunk, images, pcs):
            ident = r.get("identity")
            ref = references.get(ident) if ident is not None else None
            ref = ref or (Path(r["reference"]) if r.get("reference") else None)
            score, note = None, ""
            if embed is not None:
                if ref is None:
                    note = "no reference image"
                else:
                    ref_emb, ref_note = reference_embedding(ref)
                    gen = None if ref_emb is None else face_embedding(img)
                    if ref_emb is None:
                        note = ref_note
                    elif gen is None:
                        note = "no face found"
                    else:
                        score = 100.0 * cosine_similarity(gen, ref_emb)
                        if not math.isfinite(score):  # a zero embedding has no direction
                            score, note = None, "IF undefined: a face embedding is zero (NaN cosine)"
            job_rows.append(_row(r, pc, score, ref, "ok", note))
        if bar is not None:
            bar.update(len(rows[start:start + batch_size]))
    if bar is not None:
        bar.close()
    return job_rows, summarize(job_rows)


# ----------------------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------------------

def _csv(rows: list[dict], columns) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else
                        f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


JOB_COLUMNS = ("id", "method", "identity", "n_attributes", "status", "pc", "if", "hmean", "pc_text", "reference", "note")
SUMMARY_COLUMNS = ("method", "n_attributes", "jobs", "if_jobs", "pc", "if", "hmean")


def plot_summary(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .outputs import atomic_write

    methods = list(dict.fromkeys(r["method"] for r in summary))
    groups = list(dict.fromkeys(r["n_attributes"] for r in summary))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    width = 0.8 / max(1, len(methods))
    for ax, (key, title) in zip(axes, (("pc", "PC (CLIP x100)"), ("if", "IF (face cos x100)"), ("hmean", "hMean"))):
        for i, m in enumerate(methods):
            vals = []
            for g in groups:
                hit = [r[key] for r in summary if r["method"] == m and r["n_attributes"] == g]
                vals.append(hit[0] if hit and hit[0] is not None else float("nan"))
            ax.bar([x + (i - (len(methods) - 1) / 2) * width for x in range(len(groups))], vals, width, label=m)
        ax.set_xticks(range(len(groups)), [str(g) for g in groups])
        ax.set_xlabel("attributes per prompt")
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def format_table(summary: list[dict]) -> str:
    def f(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"

    lines = [f"{'method':<10} {'attrs':>5} {'jobs':>5} {'PC':>7} {'IF':>7} {'hMean':>7}"]
    for r in summary:
        lines.append(f"{r['method']:<10} {str(r['n_attributes']):>5} {r['jobs']:>5} {f(r['pc']):>7} "
                     f"{f(r['if']):>7} {f(r['hmean']):>7}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------------------

def check_eval_args(args):
    """Checks before any model loads: returns (references, detector). Raises CLIError."""
    from .batch import INDEX, read_index
    from .cli import CLIError
    from .face_embed import load_callable, parse_crop
    from .outputs import output_dir_problem

    if not args.results.is_dir():
        raise CLIError(f"--results {args.results}: no such folder")
    if not (args.results / INDEX).is_file():
        raise CLIError(f"--results {args.results}: no {INDEX} (the index `freecure batch` writes) in this folder")
    try:
        rows = read_index(args.results)
    except (OSError, ValueError) as e:
        raise CLIError(f"--results {args.results}: {e}") from None
    if not any(r.get("status") == "ok" for r in rows):
        raise CLIError(f"--results {args.results}: no completed job to score")
    if not args.clip.is_dir() or not (args.clip / "config.json").is_file():
        raise CLIError(f"--clip {args.clip}: expected a local CLIP folder with config.json (saved with "
                       "save_pretrained; nothing is downloaded)")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        parse_crop(args.face_crop)
    except ValueError as e:
        raise CLIError(f"--face-crop {args.face_crop}: {e}") from None
    out = args.out or args.results
    problem = output_dir_problem(out)
    if problem:
        raise CLIError(f"--out {out}: {problem}")
    refs = {}
    for item in args.reference:
        ident, sep, path = item.partition("=")
        if not sep or not ident or not path:
            raise CLIError(f"--reference {item}: expected ID=IMAGE")
        if ident in refs:
            raise CLIError(f"--reference {item}: identity {ident!r} given twice")
        p = Path(path).expanduser()
        try:
            from PIL import Image

            with Image.open(p) as im:
                im.load()
        except Exception as e:  # noqa: BLE001
            detail = "no such file" if not p.exists() else " ".join(str(e).split()) or type(e).__name__
            raise CLIError(f"--reference {item}: not a readable image: {detail}") from None
        refs[ident] = p
    detector = None
    if args.face_detector is not None:
        if args.face_model is None:
            raise CLIError("--face-detector is only used with --face-model")
        try:
            detector = load_callable(args.face_detector)
        except ValueError as e:
            raise CLIError(f"--face-detector {args.face_detector}: {e}") from None
    if args.face_model is not None:
        ok = [r for r in rows if r.get("status") == "ok"]
        if not any((r.get("identity") in refs) or r.get("reference") for r in ok):
            raise CLIError("--face-model needs reference images: pass --reference ID=IMAGE for the identities of "
                           "the manifest (or give jobs a reference field)")
        for r in ok:
            if r.get("identity") not in refs and r.get("reference") and not Path(r["reference"]).is_file():
                raise CLIError(f"--results {args.results}: job {r['id']}: reference {r['reference']}: no such file")
    elif refs:
        raise CLIError("--reference is only used with --face-model")
    return refs, detector


def run(args) -> int:
    from .cli import CLIError, _pick_device
    from .face_embed import load_face_embedder
    from .outputs import atomic_write_text

    refs, detector = check_eval_args(args)
    device = _pick_device(args.device)
    embed = None
    if args.face_model is not None:
        try:
            embed = load_face_embedder(args.face_model)
        except Exception as e:  # noqa: BLE001  (onnxruntime raises its own types for a bad model)
            raise CLIError(f"--face-model {args.face_model}: {' '.join(str(e).split())}") from None
    from .cli import _quiet_libraries

    try:
        with _quiet_libraries(args.quiet):  # transformers' "Loading weights" bar too
            scorer = ClipScorer(args.clip, device)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"--clip {args.clip}: could not load CLIP from the folder: {first}") from None
    job_rows, summary = evaluate(args.results, scorer, face_model=embed, references=refs, crop=args.face_crop,
                                 detector=detector, device=device, batch_size=args.batch_size,
                                 progress=not args.quiet)
    out = args.out or args.results
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "eval_jobs.csv", _csv(job_rows, JOB_COLUMNS))
    atomic_write_text(out / "eval_summary.csv", _csv(summary, SUMMARY_COLUMNS))
    plot_summary(summary, out / "eval_summary.png")
    meta = dict(results=str(args.results), clip=str(args.clip), face_model=args.face_model,
                face_crop="detector" if detector is not None else args.face_crop, face_detector=args.face_detector,
                references={k: str(v) for k, v in refs.items()}, pc="100 * cos(CLIP image, CLIP text)",
                if_="100 * cos(face(generated), face(reference))", hmean="2 * PC * IF / (PC + IF) of the means",
                jobs=len(job_rows), summary=[{k: (None if isinstance(v, float) and math.isnan(v) else v)
                                              for k, v in r.items()} for r in summary])
    atomic_write_text(out / "eval.json", json.dumps(meta, indent=2) + "\n")
    print(format_table(summary))
    from .batch import read_index

    unscored = sum(r.get("status") != "ok" for r in read_index(args.results))
    if unscored:
        print(f"freecure eval: warning: {unscored} jobs are not complete (failed or not run) and are not scored; "
              "rerun freecure batch to finish them", file=sys.stderr)
    gone = sum(r["status"] == "missing" for r in job_rows)
    if gone:
        print(f"freecure eval: warning: {gone} of {len(job_rows)} ok jobs have no readable pd.png and are not "
              "scored (status missing in eval_jobs.csv); rerun freecure batch to redo them", file=sys.stderr)
    missing = sum(r["status"] == "ok" and (r["if"] is None or not math.isfinite(r["if"]))
                  for r in job_rows) if embed is not None else 0
    if missing:
        print(f"freecure eval: warning: {missing} of {len(job_rows) - gone} images have no IF (see the note column "
              "of eval_jobs.csv)", file=sys.stderr)
    print(f"freecure eval: wrote eval_jobs.csv, eval_summary.csv, eval_summary.png and eval.json to {out}")
    return 0
