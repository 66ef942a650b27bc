"""The paper's scores over a batch's results (``freecure eval``): PC, IF and their harmonic mean.

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
* **hMean**: ``2 * PC * IF / (PC + IF)``, per job, and per table row from the row's mean PC and mean IF; only
  defined for PC > 0 and IF > 0 (otherwise blank, with the reason in the ``note`` column, and not plotted).

Tables: per method (``baseline`` = the personalization model alone, ``freecure``) and per number of
attributes the prompt asks for (1, 2, 3, ..., and ``all``): ``eval_summary.csv`` and ``eval_summary.png``;
per job: ``eval_jobs.csv``; settings and the summary: ``eval.json``. Only jobs whose status is ok count, and
each is checked against its record (``job.json``): a job whose record is gone, failed or holds another
fingerprint than the index (a later run touched it and did not finish) is a ``stale`` row, and an ok job whose
``pd.png`` is gone or unreadable a ``missing`` row, each with a note (not scored, not in the tables).
"""
from __future__ import annotations

import csv
import io
import math
import sys
from pathlib import Path

__all__ = ["evaluate", "ClipScorer", "harmonic_mean", "hmean_note", "record_problem", "summarize", "plot_summary",
           "format_table", "csv_text", "JOB_COLUMNS", "SUMMARY_COLUMNS"]


def harmonic_mean(a: float, b: float) -> float:
    """``2ab / (a + b)`` for positive ``a`` and ``b``; NaN otherwise (the harmonic mean of a negative score has
    no meaning: -10 and 30 would give -30, and -30 and 20 a sum of -10, which used to leave it blank)."""
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or a <= 0 or b <= 0:
        return float("nan")
    return 2.0 * a * b / (a + b)


def hmean_note(pc, idf) -> str:
    """Why :func:`harmonic_mean` of ``pc`` and ``idf`` is blank ("" when it is not, or when IF is absent:
    the IF note says why)."""
    if idf is None or not math.isfinite(idf) or pc is None or not math.isfinite(pc):
        return ""
    bad = [f"{name} is {v:.2f}" for name, v in (("PC", pc), ("IF", idf)) if v <= 0]
    return f"hMean undefined: {' and '.join(bad)} (it needs PC and IF > 0)" if bad else ""


class ClipScorer:
    """CLIP image-text similarity x100 with transformers' CLIP (``CLIPModel`` + its processor) from a local
    folder or a Hugging Face Hub id, resolved by :func:`freecure_ops.hub.load_pretrained` (downloaded at
    ``revision`` unless ``offline`` / ``HF_HUB_OFFLINE=1``)."""

    def __init__(self, folder, device="cpu", *, revision=None, offline=None):
        import torch
        from transformers import AutoProcessor, CLIPModel

        from .hub import load_pretrained

        self.device = torch.device(device)
        spec = folder if isinstance(folder, str) else str(folder)
        self.model = load_pretrained(CLIPModel, spec, revision=revision, offline=offline).to(self.device).eval()
        self.processor = load_pretrained(AutoProcessor, spec, revision=revision, offline=offline)

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
            if_jobs = sum(r["if"] is not None and math.isfinite(r["if"]) for r in rows)
            note = hmean_note(pc, idf).replace("PC is", "mean PC is").replace("IF is", "mean IF is")
            out.append(dict(method=method, n_attributes=group, jobs=len(rows), if_jobs=if_jobs, pc=pc,
                            **{"if": idf}, hmean=harmonic_mean(pc, idf),
                            note=note or ("" if if_jobs else "no IF: no job of this row has one")))
    return out


def _row(r: dict, pc, score, ref, status: str, note: str) -> dict:
    note = "; ".join(n for n in (note, hmean_note(pc, score)) if n)
    return dict(id=r["id"], method=r["method"], identity=r.get("identity"), n_attributes=_n_attributes(r),
                status=status, pc=pc, **{"if": score}, hmean=harmonic_mean(pc, score) if score is not None else None,
                pc_text=_pc_text(r), reference=None if ref is None else str(ref), note=note)


def _open_rgb(path: Path):
    """``(RGB image, None)`` or ``(None, why not)``: missing, truncated, not an image, or a header claiming
    more pixels than PIL will decode (DecompressionBombError, which is not an OSError)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB"), None
    except Exception as e:  # noqa: BLE001  (OSError, Image.DecompressionBombError, SyntaxError, ValueError, ...)
        return None, " ".join(f"{type(e).__name__}: {e}".split())


def record_problem(results_dir: Path, row: dict) -> str | None:
    """Why the index row ``row`` (status ok) no longer describes its job (None: it does). The index is written
    when a run ends; a later run that was killed may have deleted the job's record and written new images
    with other settings, which the old row would score as the old job."""
    from .results import RECORD, read_record

    rec = read_record(results_dir, row["id"])
    if rec is None:
        return f"no {RECORD}: a later batch run started this job and did not finish it (rerun freecure batch)"
    if rec.get("status") != "ok":
        return f"{RECORD} says {rec.get('status')!r}, the index ok: the index is from an earlier run"
    if row.get("fingerprint") is not None and rec.get("fingerprint") != row["fingerprint"]:
        return f"{RECORD} is from other settings than the index (fingerprint {rec.get('fingerprint')}, index " \
               f"{row['fingerprint']}): the index is from an earlier run"
    return None


def evaluate(results_dir, clip, *, face_model=None, references=None, crop="center:1.0", detector=None,
             device="cpu", batch_size=16, progress=False):
    """Score every ok job of a batch's results: ``(job_rows, summary_rows)`` (see the module docstring).
    ``clip``: a folder or a :class:`ClipScorer`; ``face_model``: None (no IF), a path or a callable;
    ``references``: identity -> image path."""
    import numpy as np

    from .face_embed import cosine_similarity, crop_face, load_face_embedder
    from .results import read_index

    results_dir = Path(results_dir)
    rows, job_rows = [], []
    for r in read_index(results_dir):
        if r.get("status") != "ok" or "pd.png" not in (r.get("files") or []):
            continue
        stale = record_problem(results_dir, r)
        if stale:  # the index is older than the record: a later run touched the job and did not finish
            job_rows.append(_row(r, None, None, None, "stale", stale))
        else:
            rows.append(r)
    scorer = clip if isinstance(clip, ClipScorer) else ClipScorer(clip, device)
    embed = None if face_model is None else load_face_embedder(face_model)
    size = getattr(embed, "input_size", (112, 112))
    references = {k: Path(v) for k, v in (references or {}).items()}
    ref_cache: dict[str, object] = {}

    def face_embedding(img):
        face = crop_face(img, crop, detector, size)
        return None if face is None else embed(np.asarray(face.convert("RGB")))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), desc="freecure eval", unit="image", file=sys.stderr)
    def reference_embedding(ref: Path):
        key = str(ref)
        if key not in ref_cache:  # (embedding, note): an unreadable reference is a note per job, not a crash
            img, problem = _open_rgb(ref)
            ref_cache[key] = (None, f"reference not readable: {problem}") if img is None else \
                (face_embedding(img), "no face in the reference")
        return ref_cache[key]

    for start in range(0, len(rows), max(1, batch_size)):
        chunk, images = [], []
        for r in rows[start:start + batch_size]:
            img, problem = _open_rgb(results_dir / r["dir"] / "pd.png")
            if img is None:  # deleted or damaged since the batch ran: recorded as missing, the others go on
                job_rows.append(_row(r, None, None, None, "missing", f"pd.png missing or unreadable: {problem}"))
            else:
                images.append(img)
                chunk.append(r)
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

def csv_text(rows: list[dict], columns) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else
                        f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


JOB_COLUMNS = ("id", "method", "identity", "n_attributes", "status", "pc", "if", "hmean", "pc_text", "reference",
               "note")
SUMMARY_COLUMNS = ("method", "n_attributes", "jobs", "if_jobs", "pc", "if", "hmean", "note")


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
    if methods:  # nothing scored (every job stale or missing): an empty plot, without matplotlib's warning
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
    lines += [f"{r['method']} {r['n_attributes']}: {r['note']}" for r in summary if r.get("note")]
    return "\n".join(lines)
