"""``freecure eval``: score a batch's results (:mod:`freecure_ops.evaluate`) and write the tables.

    freecure eval --results runs/grid --clip openai/clip-vit-large-patch14 --face-model w600k_r50.onnx \\
                  --reference alice=refs/alice.jpg --reference bob=refs/bob.jpg
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from ..evaluate import JOB_COLUMNS, SUMMARY_COLUMNS, ClipScorer, csv_text, evaluate, format_table, plot_summary
from ..outputs import atomic_write_text, output_dir_problem
from ..results import INDEX, read_index
from .args import pick_device, user_path
from .errors import CLIError
from .pipeline import quiet_libraries
from .weights import is_local, resolve_clip

__all__ = ["add_arguments", "check_eval_args", "run"]


def add_arguments(sub) -> None:
    e = sub.add_parser("eval", help="score a batch's results: PC (CLIP), IF (face embeddings), hMean",
                       description="Prompt consistency, identity fidelity and their harmonic mean per method and "
                                   "attribute count. CLIP is a local folder or a Hub id (downloaded unless offline).")
    e.add_argument("--results", required=True, type=user_path, help="a `freecure batch` output folder (results.jsonl)")
    e.add_argument("--clip", required=True, help="CLIP (CLIPModel + processor): a local folder or a Hugging Face Hub "
                                                 "id, e.g. openai/clip-vit-large-patch14")
    e.add_argument("--clip-revision", help="Hub revision of --clip: branch, tag or commit (default: main)")
    e.add_argument("--offline", action="store_true",
                   help="download nothing: a Hub --clip comes from the Hugging Face cache (as HF_HUB_OFFLINE=1)")
    e.add_argument("--face-model", help="ONNX face-recognition model (ArcFace-style), or module:function "
                                        "(face RGB uint8 [h, w, 3] -> embedding)")
    e.add_argument("--reference", action="append", default=[], metavar="ID=IMAGE",
                   help="reference image of an identity (repeat per identity)")
    e.add_argument("--face-crop", default="center:1.0",
                   help="crop without a detector: center[:F] (centred square, F of the shorter side) or full")
    e.add_argument("--face-detector", metavar="MODULE:FUNCTION",
                   help="image RGB uint8 -> None | box (x0, y0, x1, y1) | 5 landmarks [5, 2] (ArcFace alignment)")
    e.add_argument("--out", type=user_path, help="where the tables go (default: --results)")
    e.add_argument("--device", help="cpu, cuda or cuda:N for CLIP (default: cuda when available)")
    e.add_argument("--batch-size", type=int, default=16, help="CLIP images per forward")
    e.add_argument("--quiet", action="store_true", help="no progress bar")


def check_eval_args(args):
    """Checks before any model loads: returns (references, detector, clip) (``clip``: the resolved
    :class:`~.weights.Weights`; a Hub id is looked up last). Raises CLIError."""
    from ..face_embed import load_callable, parse_crop

    if not args.results.is_dir():
        raise CLIError(f"--results {args.results}: no such folder")
    if not (args.results / INDEX).is_file():
        raise CLIError(f"--results {args.results}: no {INDEX} in this folder (the index `freecure batch` writes when "
                       "a run ends; a run that did not finish has none: rerun it)")
    try:
        rows = read_index(args.results)
    except (OSError, ValueError) as e:
        raise CLIError(f"--results {args.results}: {e}") from None
    if not any(r.get("status") == "ok" for r in rows):
        raise CLIError(f"--results {args.results}: no completed job to score")
    clip = None
    if is_local(args.clip):  # a Hub id: looked up after the other checks (it may download)
        clip = resolve_clip(args.clip, revision=args.clip_revision)
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
    if clip is None:
        clip = resolve_clip(args.clip, revision=args.clip_revision, offline=args.offline or None, quiet=args.quiet)
    return refs, detector, clip


def run(args) -> int:
    from ..face_embed import embedding_size, load_face_embedder

    refs, detector, clip = check_eval_args(args)
    device = pick_device(args.device)
    embed = None
    if args.face_model is not None:
        try:
            embed = load_face_embedder(args.face_model)
            values = embedding_size(embed)  # one face through the model: a model that cannot run fails here
        except Exception as e:  # noqa: BLE001  (onnxruntime raises its own types for a bad model)
            raise CLIError(f"--face-model {args.face_model}: {' '.join(str(e).split())}") from None
        if values is not None and values < 2:
            raise CLIError(f"--face-model {args.face_model}: the embedding has {values} value; identity fidelity is "
                           "a cosine and needs an embedding of at least 2 values")
    try:
        with quiet_libraries(args.quiet):  # transformers' "Loading weights" bar too
            # a Hub id loads at the commit the checks found: what eval.json records
            scorer = ClipScorer(args.clip if clip.hub else str(clip.path), device,
                                revision=clip.commit if clip.hub else None, offline=args.offline or None)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "the Hugging Face cache" if clip.hub else "the folder"
        raise CLIError(f"--clip {args.clip}: could not load CLIP from {where}: {first}") from None
    job_rows, summary = evaluate(args.results, scorer, face_model=embed, references=refs, crop=args.face_crop,
                                 detector=detector, device=device, batch_size=args.batch_size,
                                 progress=not args.quiet)
    out = args.out or args.results
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "eval_jobs.csv", csv_text(job_rows, JOB_COLUMNS))
    atomic_write_text(out / "eval_summary.csv", csv_text(summary, SUMMARY_COLUMNS))
    plot_summary(summary, out / "eval_summary.png")
    meta = dict(results=str(args.results), clip=str(args.clip), clip_weights=clip.record(),
                face_model=args.face_model,
                face_crop="detector" if detector is not None else args.face_crop, face_detector=args.face_detector,
                references={k: str(v) for k, v in refs.items()}, pc="100 * cos(CLIP image, CLIP text)",
                if_="100 * cos(face(generated), face(reference))", hmean="2 * PC * IF / (PC + IF) of the means",
                jobs=len(job_rows), summary=[{k: (None if isinstance(v, float) and math.isnan(v) else v)
                                              for k, v in r.items()} for r in summary])
    atomic_write_text(out / "eval.json", json.dumps(meta, indent=2) + "\n")
    print(format_table(summary))
    unscored = sum(r.get("status") != "ok" for r in read_index(args.results))
    if unscored:
        print(f"freecure eval: warning: {unscored} jobs are not complete (failed or not run) and are not scored; "
              "rerun freecure batch to finish them", file=sys.stderr)
    stale = sum(r["status"] == "stale" for r in job_rows)
    if stale:
        print(f"freecure eval: warning: {stale} jobs the index calls ok were touched by a later batch run that did "
              "not finish and are not scored (status stale in eval_jobs.csv); rerun freecure batch to finish them",
              file=sys.stderr)
    job_rows = [r for r in job_rows if r["status"] != "stale"] if stale else job_rows  # the counts below
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
