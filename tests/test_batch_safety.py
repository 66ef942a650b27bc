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



# ----------------------------------------------------------------------------------------------------------
# one run per --out (issue 25 item 9): the lock, and a record that cannot be written
# ----------------------------------------------------------------------------------------------------------

LOCK = ".freecure-batch.lock"


def _snapshot(out):
    """Every file under ``out`` but the lock, with its bytes and mtime: what a refused run must not touch."""
    return {p.relative_to(out).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != LOCK}


def _write_lock(out, pid, host=None, **extra):
    import socket

    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK).write_text(json.dumps(dict(pid=pid, host=host or socket.gethostname(),
                                            started="2025-01-01T00:00:00+0000", **extra)))


@pytest.fixture
def sleeper():
    """A live process that is not this one (another run holding the lock, as far as batch can tell)."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield p.pid
    finally:
        p.kill()
        p.wait(timeout=30)


def _dead_pid():
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(timeout=60)
    return p.pid


@pytest.fixture
def finished(model, tmp_path):
    """A complete 2-job run and the arguments of a rerun that would redo both jobs (another guidance scale)."""
    out = tmp_path / "out"
    args = ["batch", "--manifest", str(_manifest(tmp_path / "m.jsonl", ids=("a", "b"))), "--model", str(model),
            "--out", str(out), *COMMON]
    assert main(args) == 0
    assert not (out / LOCK).exists()                       # a normal run leaves no lock
    return out, [*args, "--guidance-scale", "3.0"]


def test_a_run_on_an_out_another_live_run_holds_is_refused_untouched(finished, sleeper, capsys):
    out, rerun = finished
    _write_lock(out, sleeper)
    lock, before = (out / LOCK).read_bytes(), _snapshot(out)
    capsys.readouterr()
    assert main(rerun) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"freecure: error: --out {out} is in use by another freecure batch (pid {sleeper} on host ")
    assert err.count("\n") == 1, err
    assert _snapshot(out) == before and (out / LOCK).read_bytes() == lock   # index, records, images, lock: as they were


def test_a_lock_from_another_host_is_refused_with_how_to_remove_it(finished, capsys):
    out, rerun = finished
    _write_lock(out, 12345, host="some-other-node")
    before = _snapshot(out)
    capsys.readouterr()
    assert main(rerun) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"freecure: error: --out {out} is locked by a freecure batch on another host (pid 12345 on "
                          "host some-other-node") and err.rstrip().endswith(f"remove {out / LOCK}")
    assert err.count("\n") == 1, err
    assert _snapshot(out) == before and (out / LOCK).exists()


@pytest.mark.parametrize("holder", ["exited", "reused pid"])
def test_a_stale_lock_is_replaced_and_the_run_goes_on(holder, finished, capsys):
    """The pid of a process that has exited; or a live pid (this process's) that started at another tick than
    the lock says: the pid was reused."""
    out, rerun = finished
    if holder == "exited":
        pid, extra = _dead_pid(), {}
    else:
        if not os.path.exists(f"/proc/{os.getpid()}/stat"):
            pytest.skip("process start ticks need /proc")
        from freecure_ops.cli.out_lock import _proc_start

        pid, extra = os.getpid(), dict(proc_start=_proc_start(os.getpid()) - 1)
    _write_lock(out, pid, **extra)
    capsys.readouterr()
    assert main(rerun) == 0
    cap = capsys.readouterr()
    assert "2 complete (0 already done, 2 run now" in cap.out
    assert f"--out {out}: replaced a stale lock (pid {pid} on host " in cap.err
    assert not (out / LOCK).exists()


def test_the_lock_is_held_while_jobs_run_and_gone_after_a_failed_run(model, tmp_path, capsys, monkeypatch):
    """A job failing (exit 1) and a run interrupted (KeyboardInterrupt) both remove the run's lock."""
    from freecure_ops.cli import batch
    from freecure_ops.pipeline.freecure import FreeCure

    out = tmp_path / "out"
    args = ["batch", "--manifest", str(_manifest(tmp_path / "m.jsonl", ids=("a", "b"))), "--model", str(model),
            "--out", str(out), *COMMON]
    seen, real_noise = [], FreeCure.noise

    def noise(self, *a, seed, **kw):
        seen.append(json.loads((out / LOCK).read_text())["pid"])
        if seed == 1:
            raise RuntimeError("patched failure")
        return real_noise(self, *a, seed=seed, **kw)

    monkeypatch.setattr(FreeCure, "noise", noise)
    assert main(args) == 1
    assert seen == [os.getpid()] * 2 and not (out / LOCK).exists()
    assert "job b (line 2): error: RuntimeError: patched failure" in capsys.readouterr().err

    def interrupted(*a, **kw):
        assert (out / LOCK).exists()
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "load_pipeline", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert not (out / LOCK).exists()


@pytest.mark.parametrize("name", ["pd.png", "job.json"])
def test_a_disk_full_write_is_that_jobs_failure_for_an_image_and_the_record_alike(name, model, tmp_path, capsys,
                                                                                  monkeypatch):
    """The first write of job b's ``name`` fails with ENOSPC: b is recorded as failed (status, error naming the
    file, traceback in the record, its image removed), a and c complete, exit 1, no traceback on stderr."""
    import errno

    from freecure_ops import outputs
    from freecure_ops.cli import batch

    out = tmp_path / "out"
    target, fails = out / "jobs" / "b" / name, []

    def full(real):
        def write(path, *a, **kw):
            if os.fspath(path) == os.fspath(target) and not fails:
                fails.append(path)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(path, *a, **kw)
        return write

    monkeypatch.setattr(batch, "atomic_write", full(outputs.atomic_write))   # the images
    monkeypatch.setattr(outputs, "atomic_write", full(outputs.atomic_write))  # under atomic_write_text: the record
    args = ["batch", "--manifest", str(_manifest(tmp_path / "m.jsonl", ids=("a", "b", "c"))), "--model", str(model),
            "--out", str(out), *COMMON]
    assert main(args) == 1 and fails
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err and "2 complete" in cap.out and "1 failed" in cap.out
    error = f"OSError: [Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)} (writing {name})"
    assert f"job b (line 2): error: {error}" in cap.err
    rec = json.loads((out / "jobs" / "b" / "job.json").read_text())
    assert rec["status"] == "error" and rec["error"] == error and rec["files"] == []
    assert "Traceback" in rec["traceback"] and not (out / "jobs" / "b" / "pd.png").exists()
    index = [json.loads(t) for t in (out / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in index] == ["ok", "error", "ok"] and index[1]["error"] == error
    assert not (out / LOCK).exists()


def test_a_record_that_cannot_be_written_at_all_fails_its_job_not_the_run(model, tmp_path, capsys, monkeypatch):
    """Every write of job b's record fails (the disk stays full): b has no record (it will be redone) and no
    image, its failure is said on stderr and in the log, a and c complete, exit 1, no traceback."""
    import errno

    from freecure_ops import outputs

    out = tmp_path / "out"
    real = outputs.atomic_write

    def full(path, *a, **kw):
        if os.fspath(path) == os.fspath(out / "jobs" / "b" / "job.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, *a, **kw)

    monkeypatch.setattr(outputs, "atomic_write", full)
    args = ["batch", "--manifest", str(_manifest(tmp_path / "m.jsonl", ids=("a", "b", "c"))), "--model", str(model),
            "--out", str(out), *COMMON]
    assert main(args) == 1
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err and "2 complete" in cap.out and "1 failed" in cap.out
    error = f"OSError: [Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)} (writing job.json)"
    assert f"job b (line 2): missing: {error}" in cap.err, cap.err
    assert not (out / "jobs" / "b" / "job.json").exists() and not (out / "jobs" / "b" / "pd.png").exists()
    log = [json.loads(t) for p in (out / "logs").glob("*.jsonl") for t in p.read_text().splitlines()]
    assert {e["id"]: (e["status"], e["error"]) for e in log} == {"a": ("ok", None), "b": ("error", error),
                                                                  "c": ("ok", None)}
    assert f"job b (line 2) failed: {error}; it has no record: a rerun redoes it" in cap.err
    assert all((out / "jobs" / j / "job.json").exists() for j in ("a", "c"))
    monkeypatch.undo()                                     # space again: the rerun redoes b alone
    assert main(args) == 0
    assert "3 complete (2 already done, 1 run now" in capsys.readouterr().out


def test_lock_edges_unreadable_leftover_breaker_and_a_lock_taken_over(tmp_path, monkeypatch):
    """A lock that is not one (bounded wait, then refused naming the file), a leftover ``.break`` file from a
    run killed while replacing a stale lock (refused naming it), and a release that never removes a lock
    another run has put in its place."""
    from freecure_ops.cli import out_lock
    from freecure_ops.cli.errors import CLIError

    monkeypatch.setattr(out_lock, "PAUSE", 0.001)
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK).write_text("not json")
    with pytest.raises(CLIError, match=f"its lock {out / LOCK} is not a freecure batch lock .* remove it$"):
        out_lock.OutLock.acquire(out)
    _write_lock(out, _dead_pid())
    (out / (LOCK + ".break")).touch()
    with pytest.raises(CLIError, match=f"another run is replacing its stale lock; .*remove {out / LOCK}.break"):
        out_lock.OutLock.acquire(out)
    (out / (LOCK + ".break")).unlink()
    mine = out_lock.OutLock.acquire(out)                   # the stale lock replaced
    assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
    with pytest.raises(CLIError, match=f"in use by another freecure batch \\(pid {os.getpid()} "):
        out_lock.OutLock.acquire(out)                      # held: by this very process, which is alive
    (out / LOCK).write_text("another run's lock")
    mine.release()
    assert (out / LOCK).read_text() == "another run's lock"


def test_a_full_disk_for_the_log_or_the_index_is_said_not_a_traceback(model, tmp_path, capsys, monkeypatch):
    """The per-rank log and the index are summaries beside the records: a failed write of either is one line on
    stderr (the log: once, then logging stops), the jobs still complete; no index means exit 1."""
    import errno

    from freecure_ops.cli import batch

    class FullFile:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        flush = close = lambda self: None

    real_init = batch._Log.__init__

    def full_log(self, path):
        real_init(self, path)
        self.file.close()
        self.file = FullFile()

    def full_index(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(batch._Log, "__init__", full_log)
    monkeypatch.setattr(batch, "write_index", full_index)
    out = tmp_path / "out"
    args = ["batch", "--manifest", str(_manifest(tmp_path / "m.jsonl", ids=("a", "b"))), "--model", str(model),
            "--out", str(out), *COMMON]
    assert main(args) == 1
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err and "2 complete" in cap.out
    assert cap.err.count("freecure batch: cannot write the log ") == 1
    assert "the index was not written (OSError: [Errno 28] No space left on device (writing results.jsonl))" in cap.err
    assert all(json.loads((out / "jobs" / j / "job.json").read_text())["status"] == "ok" for j in ("a", "b"))
    assert not (out / LOCK).exists()
