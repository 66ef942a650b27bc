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
