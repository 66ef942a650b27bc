"""What the grid tools read from the user (issue 20 item 7): manifest ids, JSON lines json itself refuses with
other exceptions, ``~`` in paths. Each is one line naming the file and line (or the flag), exit status 2."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from freecure_ops.cli import main

DEEP = "[" * 100_000 + "]" * 100_000
LONG = "1" * 5000


@pytest.mark.parametrize("line,expect", [
    (json.dumps({"id": "a1\n", "prompt": "x", "seed": 0}), "line 1: id must be"),
    ('{"id": "a", "prompt": "x", "seed": 0, "settings": ' + DEEP + "}", "line 1: not valid JSON (nested too deeply"),
    ('{"id": "a", "prompt": "x", "seed": ' + LONG + "}", "line 1: not valid JSON (Exceeds the limit"),
])
def test_manifest_lines_are_one_line_errors(line, expect, tmp_path, capsys):
    man = tmp_path / "m.jsonl"
    man.write_text(line + "\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    rc = main(["batch", "--manifest", str(man), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"freecure: error: --manifest {man} {expect}") and err.count("\n") == 1, err


def test_identity_with_a_newline_is_refused_by_the_grid():
    from freecure_ops.grid import paper_grid

    with pytest.raises(ValueError, match="identity 'a1\\\\n'"):
        paper_grid({"a1\n": "man"}, prompts=1)


@pytest.mark.parametrize("line", [DEEP, '{"id": ' + LONG + "}"])
def test_a_results_index_json_itself_refuses_is_one_line(line, tmp_path, capsys):
    (tmp_path / "results.jsonl").write_text(json.dumps({"id": "a", "status": "ok"}) + "\n" + line + "\n")
    rc = main(["eval", "--results", str(tmp_path), "--clip", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert f"--results {tmp_path}: {tmp_path / 'results.jsonl'} line 2: not valid JSON (" in err, err


def test_a_job_record_json_refuses_is_an_incomplete_job(tmp_path):
    from freecure_ops.results import job_complete, read_record

    (tmp_path / "jobs" / "a").mkdir(parents=True)
    (tmp_path / "jobs" / "a" / "job.json").write_text(DEEP)
    assert read_record(tmp_path, "a") is None and not job_complete(tmp_path, "a")


def test_tilde_in_paths_is_the_home_folder(tmp_path, monkeypatch, capsys):
    """--reference ID=~/x, a CSV reference ~/x and --out=~/x (which the shell leaves alone) all mean $HOME/x."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(home / "ref.png")
    (home / "ids.csv").write_text("id,class,reference\nbob,man,~/ref.png\n")
    assert main(["manifest", "--identity", "alice=woman", "--reference", "alice=~/ref.png", "--identities",
                 "~/ids.csv", "--prompts", "1", "--out", "~/grid.jsonl"]) == 0, capsys.readouterr().err
    rows = [json.loads(t) for t in (home / "grid.jsonl").read_text().splitlines()]
    assert {r["reference"] for r in rows} == {str(home / "ref.png")}
    assert not (tmp_path / "~").exists()
