"""``freecure batch`` writes only inside ``--out`` (issue 20 item 9) and never leaves an index that outlives
the records it summarises (item 1); ``freecure eval`` scores only jobs whose record is complete."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from freecure_ops.cli import main
from tiny_pipes import IMAGE, tiny_sd_pipe

COMMON = ["--steps", "2", "--height", str(IMAGE), "--width", str(IMAGE), "--layers", "all", "--quiet",
          "--device", "cpu"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    tiny_sd_pipe().save_pretrained(root / "model")
    return root / "model"


def _manifest(path, ids=("a",)):
    path.write_text("".join(json.dumps({"id": i, "prompt": "a photo of sks man with red hair", "seed": n,
                                        "method": "baseline"}) + "\n" for n, i in enumerate(ids)))
    return path


@pytest.mark.parametrize("link", ["jobs/a", "jobs", "logs"])
def test_a_symlinked_folder_in_out_is_refused_before_anything_is_written(link, model, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    (out / link).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(elsewhere, out / link)
    rc = main(["batch", "--manifest", str(_manifest(tmp_path / "m.jsonl")), "--model", str(model), "--out", str(out),
               *COMMON])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"freecure: error: --out {out}: {link} is a symlink") and err.count("\n") == 1
    assert not list(elsewhere.iterdir())                   # nothing written through the link
    assert (out / link).is_symlink()                       # and the link itself left for the user


def test_a_job_folder_that_is_a_file_is_refused(model, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "jobs").mkdir(parents=True)
    (out / "jobs" / "a").write_text("x")
    rc = main(["batch", "--manifest", str(_manifest(tmp_path / "m.jsonl")), "--model", str(model), "--out", str(out),
               *COMMON])
    assert rc == 2 and "--out " + str(out) + ": jobs/a is not a folder" in capsys.readouterr().err


def test_a_link_made_after_the_checks_is_replaced_not_followed(tmp_path):
    from freecure_ops.cli.batch import _clean_job_dir

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "job.json").write_text("{}")
    os.symlink(elsewhere, tmp_path / "a")
    _clean_job_dir(tmp_path / "a")
    assert (tmp_path / "a").is_dir() and not (tmp_path / "a").is_symlink()
    assert (elsewhere / "job.json").exists()               # the link's target is left alone


def test_a_symlinked_output_file_is_not_a_complete_job(model, tmp_path, capsys):
    out = tmp_path / "out"
    man = _manifest(tmp_path / "m.jsonl")
    args = ["batch", "--manifest", str(man), "--model", str(model), "--out", str(out), *COMMON]
    assert main(args) == 0
    pd = out / "jobs" / "a" / "pd.png"
    os.replace(pd, tmp_path / "moved.png")
    os.symlink(tmp_path / "moved.png", pd)
    capsys.readouterr()
    assert main(args) == 0
    assert "1 complete (0 already done, 1 run now" in capsys.readouterr().out
    assert not pd.is_symlink() and pd.is_file()


@pytest.fixture(scope="module")
def killed_rerun(model, tmp_path_factory):
    """A complete 2-job run (index saved), then a rerun with another guidance scale killed hard right after
    the first job's new pd.png: that job's record is gone, its image is new."""
    import subprocess
    import sys
    from pathlib import Path

    root = tmp_path_factory.mktemp("rerun")
    man = _manifest(root / "m.jsonl", ids=("a", "b"))
    out = root / "out"
    args = ["batch", "--manifest", str(man), "--model", str(model), "--out", str(out), *COMMON]
    assert main(args) == 0
    old_index = {n: (out / n).read_bytes() for n in ("results.jsonl", "results.csv")}
    freecure = str(Path(sys.executable).with_name("freecure"))
    env = {**os.environ, "_FREECURE_TEST_KILL_AFTER": "0", "PYTHONWARNINGS": "ignore"}
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([freecure, *args, "--guidance-scale", "3.0"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 137, p.stderr[-2000:]
    assert not (out / "jobs" / "a" / "job.json").exists() and (out / "jobs" / "a" / "pd.png").exists()
    return root, out, old_index


def test_a_rerun_removes_the_index_before_it_touches_a_job(killed_rerun):
    _, out, _ = killed_rerun
    assert not (out / "results.jsonl").exists() and not (out / "results.csv").exists()


def test_eval_reports_a_job_whose_record_is_gone_instead_of_scoring_it(killed_rerun, capsys):
    """An index that survived anyway (an older freecure, a copy) still calls job a ok with the old settings:
    eval checks the record and reports a as stale; b (untouched) is scored."""
    import csv

    from tiny_pipes import tiny_clip

    root, out, old_index = killed_rerun
    for name, data in old_index.items():
        (out / name).write_bytes(data)
    tiny_clip(root / "clip")
    ev = root / "ev"
    assert main(["eval", "--results", str(out), "--clip", str(root / "clip"), "--out", str(ev), "--device", "cpu",
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "1 jobs the index calls ok were touched by a later batch run" in err, err
    with open(ev / "eval_jobs.csv", newline="") as f:
        jobs = {r["id"]: r for r in csv.DictReader(f)}
    assert jobs["a"]["status"] == "stale" and jobs["a"]["pc"] == "" and "no job.json" in jobs["a"]["note"]
    assert jobs["b"]["status"] == "ok" and jobs["b"]["pc"] != ""
    with open(ev / "eval_summary.csv", newline="") as f:
        assert [r["jobs"] for r in csv.DictReader(f)] == ["1", "1"]   # baseline x {1 attribute, all}


def test_record_problem_names_a_failed_or_refingerprinted_record(tmp_path):
    from freecure_ops.evaluate import record_problem

    (tmp_path / "jobs" / "a").mkdir(parents=True)
    row = {"id": "a", "status": "ok", "fingerprint": "f1"}
    assert "no job.json" in record_problem(tmp_path, row)
    for rec, expect in (({"status": "ok", "fingerprint": "f1"}, None),
                        ({"status": "ok", "fingerprint": "f2"}, "from other settings than the index"),
                        ({"status": "error", "fingerprint": "f1"}, "says 'error'")):
        (tmp_path / "jobs" / "a" / "job.json").write_text(json.dumps(rec))
        got = record_problem(tmp_path, row)
        assert (got is None) if expect is None else (expect in got), got
