"""``freecure manifest`` / ``batch`` / ``eval`` (issue 13) on a tiny random SD pipeline, a tiny random CLIP built
from a config and a tiny random ONNX face model written here; nothing is downloaded.

The multi-process runs are real: ``accelerate launch --multi_gpu --num_processes 2`` starts two CPU processes
(no CUDA here, so the processes talk over gloo) running ``-m freecure_ops.cli batch``. Two launches in all (a
full run, and a run killed midway), each about 8 s on 2 cores; everything else runs in this process."""
from __future__ import annotations

import csv
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from freecure_ops.cli import main
from tiny_pipes import IMAGE, tiny_clip, tiny_sd_pipe

FREECURE = str(Path(sys.executable).with_name("freecure"))
FACE = 16          # the ONNX face model's input side
EMBED = 8          # its embedding size
# every job: 2 denoising steps at 16x16 on all 4 self-attention blocks of the tiny UNet
COMMON = ["--steps", "2", "--height", str(IMAGE), "--width", str(IMAGE), "--layers", "all", "--quiet"]


def _env():
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # a user's machine: the torch backend on CPU
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, n=2, env_extra=None, cwd=None):
    """``accelerate launch`` with n CPU processes; (returncode, stdout, stderr)."""
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), "-m", "freecure_ops.cli", "batch", *args]
    p = subprocess.run(argv, capture_output=True, text=True, env={**_env(), **(env_extra or {})}, cwd=cwd,
                       timeout=300)
    return p.returncode, p.stdout, p.stderr


def _onnx_face_model(path: Path, seed=0) -> np.ndarray:
    """A linear 'face recogniser': flatten [N, 3, 16, 16] -> @ W [768, 8]. Returns W."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).standard_normal((3 * FACE * FACE, EMBED)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input.1"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "W"], ["emb"])],
        "tiny_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, FACE, FACE])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["N", EMBED])],
        initializer=[numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return w


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Model, masks, reference images, the grid manifest (2 identities x 2 prompts x baseline/FreeCure = 8 jobs
    with 1 and 3 attributes), a tiny CLIP folder and an ONNX face model."""
    root = tmp_path_factory.mktemp("grid")
    tiny_sd_pipe().save_pretrained(root / "model")
    m = np.zeros((IMAGE, IMAGE), np.uint8)
    m[: IMAGE // 2] = 255
    Image.fromarray(m, mode="L").save(root / "hair.png")
    rng = np.random.default_rng(0)
    for name in ("alice", "bob"):  # non-square: the centre crop matters
        Image.fromarray(rng.integers(0, 256, (28, 20, 3), dtype=np.uint8)).save(root / f"{name}.png")
    assert main(["manifest", "--identity", "alice=woman", "--identity", "bob=man", "--prompts", "2", "--counts", "1,3",
                 "--attributes", "hair,eye,glasses", "--out", str(root / "grid.jsonl")]) == 0
    rows = [json.loads(t) for t in (root / "grid.jsonl").read_text().splitlines()]
    for r in rows:  # no parser weights exist here: FreeCure jobs use a mask file (relative to the manifest)
        if r["method"] == "freecure":
            r["mask"] = "hair.png"
    (root / "grid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny_clip(root / "clip")
    w = _onnx_face_model(root / "face.onnx")
    return dict(root=root, rows=rows, W=w)


def _batch_args(assets, out):
    root = assets["root"]
    return ["--manifest", str(root / "grid.jsonl"), "--model", str(root / "model"), "--out", str(out), *COMMON]


def _records(out: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in (out / "jobs").glob("*/job.json")}


def _log_events(out: Path) -> list[dict]:
    return [json.loads(t) for p in sorted((out / "logs").glob("*.jsonl")) for t in p.read_text().splitlines()]


@pytest.fixture(scope="module")
def two_process_run(assets):
    out = assets["root"] / "run2"
    rc, so, se = _launch(_batch_args(assets, out), cwd=assets["root"])
    assert rc == 0, se[-3000:]
    return out, so


def test_manifest_is_the_paper_grid(assets):
    rows = assets["rows"]
    assert len(rows) == 8 and len({r["id"] for r in rows}) == 8
    from freecure_ops.pipeline.attributes import find_attributes

    for r in rows:
        assert len(find_attributes(r["prompt"])) == r["n_attributes"] == len(r["attributes"])
        assert "sks" in r["prompt"] and "sks" not in r["fd_prompt"] and r["eval_prompt"] == r["fd_prompt"]
    # both methods of one (identity, prompt) share prompt and seed; prompts are the same for every identity
    pairs = {}
    for r in rows:
        pairs.setdefault(r["id"].rsplit("_", 1)[0], []).append(r)
    for a, b in pairs.values():
        assert {a["method"], b["method"]} == {"baseline", "freecure"}
        assert (a["prompt"], a["seed"]) == (b["prompt"], b["seed"])
    assert sorted({r["n_attributes"] for r in rows}) == [1, 3]
    assert len({r["seed"] for r in rows}) == 4
    alice = [r["fd_prompt"] for r in rows if r["identity"] == "alice"]
    bob = [r["fd_prompt"].replace(" man", " woman") for r in rows if r["identity"] == "bob"]
    assert alice == bob


def test_two_process_launch_runs_every_job_exactly_once(assets, two_process_run):
    out, stdout = two_process_run
    events = _log_events(out)
    ids = [e["id"] for e in events]
    assert sorted(ids) == sorted(r["id"] for r in assets["rows"])   # every job, exactly once
    assert {e["rank"] for e in events} == {0, 1} and {e["world_size"] for e in events} == {2}
    recs = _records(out)
    assert len(recs) == 8 and all(r["status"] == "ok" for r in recs.values())
    for job_id, rec in recs.items():
        want = ["pd.png"] if rec["method"] == "baseline" else ["pd.png", "fd.png", "mask.png"]
        assert rec["files"] == want
        for f in want:
            assert Image.open(out / "jobs" / job_id / f).size == (IMAGE, IMAGE)
        assert rec["run"]["world_size"] == 2 and rec["settings"]["height"] == IMAGE
    index = [json.loads(t) for t in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in index] == [r["id"] for r in assets["rows"]]            # manifest order
    assert all(r["status"] == "ok" and r["seconds"] > 0 for r in index)
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 8
    assert "8 jobs: 8 complete (0 already done, 8 run now on 2 processes), 0 failed" in stdout
    assert not list(out.rglob("*.tmp")) and not (out / ".freecure-batch.lock").exists()


def test_two_process_launch_on_a_locked_out_exits_2_from_every_process(assets, tmp_path):
    """Rank 0 finds --out held by another live run; every process exits 2 (rank 1 learns it from rank 0 instead
    of waiting at a barrier), the message is said once, nothing is written."""
    out = tmp_path / "locked"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        lock = json.dumps(dict(pid=holder.pid, host=socket.gethostname(), started="2025-01-01T00:00:00+0000"))
        (out / ".freecure-batch.lock").write_text(lock)
        rc, _, se = _launch(_batch_args(assets, out), cwd=tmp_path)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    lines = [t for t in se.splitlines() if t.startswith("freecure: error:")]
    assert rc != 0 and len(lines) == 1, se[-3000:]
    assert lines[0].startswith(f"freecure: error: --out {out} is in use by another freecure batch (pid {holder.pid} ")
    assert not re.search(r'File "[^"]*freecure_ops', se), se[-3000:]  # only the launcher's own failure report
    assert sorted(p.name for p in out.iterdir()) == [".freecure-batch.lock"]
    assert (out / ".freecure-batch.lock").read_text() == lock


@pytest.mark.parametrize("rank", [0, 1])
def test_every_process_of_a_launch_gets_rank_0s_answer_about_the_lock(rank, tmp_path, monkeypatch, capsys):
    """Rank 0 alone takes the lock; the others get its answer from a broadcast (going on, they would run jobs in an
    --out another run holds). Refused: rank 0 says it once, every process meets at a barrier (so that the launcher,
    which stops the rest at the first exit, cannot cut rank 0's message) and exits 2."""
    import types

    import accelerate.utils

    from freecure_ops.cli import batch

    out = tmp_path / "out"
    out.mkdir()
    holder = json.dumps(dict(pid=os.getpid(), host=socket.gethostname(), started="x"))  # alive: this process
    (out / ".freecure-batch.lock").write_text(holder)
    calls = []
    state = types.SimpleNamespace(is_main_process=rank == 0, num_processes=2,
                                  wait_for_everyone=lambda: calls.append("barrier"))
    said = "--out X is in use by another freecure batch (rank 0's words)"

    def broadcast(objs, from_process=0):
        calls.append(("broadcast", objs[0]))
        return objs if rank == 0 else [said]

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", broadcast)
    with pytest.raises(SystemExit) as e:
        batch._lock_out(types.SimpleNamespace(out=out), state)
    assert e.value.code == 2 and calls[-1] == "barrier"
    err = capsys.readouterr().err
    if rank == 0:
        assert calls[0][0] == "broadcast" and f"pid {os.getpid()} " in calls[0][1]
        assert err.startswith(f"freecure: error: --out {out} is in use") and err.count("\n") == 1
    else:
        assert calls[0] == ("broadcast", None) and err == ""
    assert (out / ".freecure-batch.lock").read_text() == holder


def test_baseline_is_the_plain_pipeline_from_the_same_noise(assets, two_process_run):
    """method "baseline": the personalization model alone, with the PD prompt and the job's seed, drawn as
    FreeCure draws its initial latents."""
    out, _ = two_process_run
    from diffusers import StableDiffusionPipeline

    job = next(r for r in assets["rows"] if r["method"] == "baseline")
    pipe = StableDiffusionPipeline.from_pretrained(assets["root"] / "model", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(job["seed"])
    lat = torch.randn(1, 4, IMAGE // 2, IMAGE // 2, generator=g)
    img = pipe(job["prompt"], latents=lat, num_inference_steps=2, height=IMAGE, width=IMAGE).images[0]
    got = np.asarray(Image.open(out / "jobs" / job["id"] / "pd.png"), dtype=np.int16)
    assert np.abs(got - np.asarray(img, dtype=np.int16)).max() <= 1    # 1 level: threads may round differently


def test_killed_run_resumes_without_redoing_finished_jobs(assets, tmp_path):
    """Each process dies hard while saving its second job (after pd.png, with a half-written temporary file
    left). The rerun (one process, no launcher) runs only the rest; no partial output counts as done."""
    out = tmp_path / "killed"
    rc, _, se = _launch(_batch_args(assets, out), env_extra={"_FREECURE_TEST_KILL_AFTER": "1"}, cwd=tmp_path)
    assert rc != 0
    assert (out / ".freecure-batch.lock").exists()        # a killed run leaves its lock: the rerun finds it stale
    first = _records(out)
    done = {k for k, r in first.items() if r["status"] == "ok"}
    assert 1 <= len(done) < 8
    partial = [p.parent.name for p in (out / "jobs").glob("*/pd.png") if p.parent.name not in done]
    assert partial and list(out.rglob("*.tmp"))          # what a kill mid-write leaves
    snapshot = {k: (out / "jobs" / k / "job.json").read_bytes() for k in done}
    mtimes = {k: (out / "jobs" / k / "pd.png").stat().st_mtime_ns for k in done}

    p = subprocess.run([FREECURE, "batch", *_batch_args(assets, out)], capture_output=True, text=True, env=_env(),
                       cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"8 complete ({len(done)} already done, {8 - len(done)} run now on 1 process)" in p.stdout
    assert "replaced a stale lock" in p.stderr and not (out / ".freecure-batch.lock").exists()
    recs = _records(out)
    assert len(recs) == 8 and all(r["status"] == "ok" for r in recs.values())
    for k in done:                                        # finished jobs untouched
        assert (out / "jobs" / k / "job.json").read_bytes() == snapshot[k]
        assert (out / "jobs" / k / "pd.png").stat().st_mtime_ns == mtimes[k]
    second_run = [e["id"] for e in _log_events(out) if e["world_size"] == 1]
    assert sorted(second_run) == sorted(set(recs) - done)  # the rest, each once; the partial ones included
    assert set(partial) <= set(second_run)
    assert not list(out.rglob("*.tmp"))


def test_failing_job_is_recorded_and_the_others_go_on(assets, tmp_path, capsys, monkeypatch):
    """A job that raises (here: FreeCure's call, patched to fail while the job's style_fidelity is 0.25) is
    recorded with its error; exit status 1; a rerun skips the complete jobs and retries the failed one; a
    changed manifest line is run again."""
    from freecure_ops.pipeline.freecure import FreeCure

    real_call = FreeCure.__call__

    def flaky(self, *a, **kw):
        if self.style_fidelity == 0.25:
            raise ValueError("block 99 is out of range (patched failure)")
        return real_call(self, *a, **kw)

    monkeypatch.setattr(FreeCure, "__call__", flaky)
    root = assets["root"]
    rows = [dict(r) for r in assets["rows"][:3]]
    for r in rows:
        r.pop("mask", None)
        r["method"] = "baseline"
    rows[1] = {**rows[1], "method": "freecure", "mask": str(root / "hair.png"), "style_fidelity": 0.25}
    man = tmp_path / "m.jsonl"
    man.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = ["batch", "--manifest", str(man), "--model", str(root / "model"), "--out", str(out), *COMMON]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "2 complete" in captured.out and "1 failed" in captured.out
    assert f"job {rows[1]['id']} (line 2): error: ValueError" in captured.err
    index = [json.loads(t) for t in (out / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in index] == ["ok", "error", "ok"] and "99" in index[1]["error"]
    rec = json.loads((out / "jobs" / rows[1]["id"] / "job.json").read_text())
    assert rec["status"] == "error" and rec["files"] == [] and "Traceback" in rec["traceback"]
    assert not (out / "jobs" / rows[1]["id"] / "pd.png").exists()

    before = (out / "jobs" / rows[0]["id"] / "job.json").read_bytes()
    rows[1]["style_fidelity"] = 0.5
    rows[2]["seed"] += 1                                   # changed: must run again
    man.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(args) == 0
    assert "3 complete (1 already done, 2 run now on 1 process), 0 failed" in capsys.readouterr().out
    assert (out / "jobs" / rows[0]["id"] / "job.json").read_bytes() == before
    assert json.loads((out / "jobs" / rows[2]["id"] / "job.json").read_text())["job"]["seed"] == rows[2]["seed"]


def _bad_manifests(root: Path, tmp: Path) -> dict:
    good = {"id": "a", "prompt": "a photo of sks man with red hair", "seed": 0, "mask": str(root / "hair.png")}
    j = lambda *rows: "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)  # noqa: E731
    return {
        # name: (file name, content, expected text)
        "missing_seed": ("m.jsonl", j(good, {"id": "b", "prompt": "x"}), "line 2: missing required field 'seed'"),
        "duplicate_id": ("m.jsonl", j(good, {**good, "id": "b", "seed": 1}, {**good, "id": "A"}),
                         "line 3: duplicate id 'A' (first on line 1"),
        "missing_mask": ("m.jsonl", j(good, {**good, "id": "b", "mask": "nowhere.png"}),
                         "line 2: mask " + str(tmp / "nowhere.png") + ": no such file"),
        "truncated_mask": ("m.jsonl", j({**good, "mask": "trunc.png"}), "line 1: mask "),
        "missing_reference": ("m.jsonl", j({**good, "reference": "ref.png"}), "line 1: reference "),
        "bad_json": ("m.jsonl", j(good, '{"id": "b", "prompt": '), "line 2: not valid JSON"),
        "unknown_field": ("m.jsonl", j({**good, "promt": "x"}), "line 1: unknown field 'promt'"),
        "bad_seed": ("m.jsonl", j({**good, "seed": "zero"}), "line 1: seed must be an integer"),
        "bad_method": ("m.jsonl", j({**good, "method": "plain"}), "line 1: method must be one of"),
        "bad_setting": ("m.jsonl", j({**good, "settings": {"gamma": 2}}), "line 1: gamma must be in (0, 1]"),
        "bad_id": ("m.jsonl", j({**good, "id": "../x"}), "line 1: id must be"),
        "no_mask_no_parser": ("m.jsonl", j(good, {"id": "b", "prompt": "x", "seed": 1}),
                              "line 2: job 'b' has no mask; give it one or pass --parser-weights"),
        "empty": ("m.jsonl", "\n", "no jobs in the manifest"),
        "csv_missing_column": ("m.csv", "id,prompt\na,x\n", "line 1: the CSV header lacks the required column(s) seed"),
        "csv_duplicate": ("m.csv", f"id,prompt,seed,mask\na,x,0,{root / 'hair.png'}\nb,x,1,{root / 'hair.png'}\n"
                                   f"a,y,2,{root / 'hair.png'}\n", "line 4: duplicate id 'a' (first on line 2"),
        "csv_extra_cell": ("m.csv", "id,prompt,seed\na,x,0,5\n", "line 2: 4 cells for 3 columns"),
        "no_file": (None, None, "no such file"),
        "unreadable_reference": ("m.jsonl", j({**good, "reference": "notimage.png"}),
                                 "line 1: reference " + str(tmp / "notimage.png") + ": not a readable image"),
        "layer_out_of_range": ("m.jsonl", j(good, {**good, "id": "b", "layers": [2, 99]}),
                               "line 2: layers 99: the model has 4 self-attention blocks (0..3)"),
        "omega_beyond_float32": ("m.jsonl", j({**good, "omega": 1e308}), "line 1: omega must be within float32 range"),
        "guidance_beyond_float32": ("m.jsonl", j({**good, "settings": {"guidance_scale": 1e300}}),
                                    "line 1: guidance_scale must be within float32 range"),
        "height_off_grid": ("m.jsonl", j(good, {**good, "id": "b", "height": 20}),
                            "line 2: height must be a multiple of 8 (pixels), got 20"),
        "apg_zero_steps": ("m.jsonl", j({**good, "apg": True, "steps": 1}),
                           "line 1: apg with gamma 0.5 and steps 1 runs int(gamma * steps) = int(0.5 * 1) = 0 APG"),
    }


@pytest.mark.parametrize("case", list(_bad_manifests(Path("r"), Path("t"))))
def test_bad_manifest_is_one_line_naming_the_line(case, assets, tmp_path, capsys):
    name, content, expect = _bad_manifests(assets["root"], tmp_path)[case]
    (tmp_path / "trunc.png").write_bytes((assets["root"] / "hair.png").read_bytes()[:30])
    (tmp_path / "notimage.png").write_text("not an image\n")
    path = tmp_path / (name or "absent.jsonl")
    if content is not None:
        path.write_text(content)
    out = tmp_path / "out"
    rc = main(["batch", "--manifest", str(path), "--model", str(assets["root"] / "model"), "--out", str(out),
               *COMMON])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"freecure: error: --manifest {path}") and err.count("\n") == 1, err
    assert expect in err, err
    assert not (out / "jobs").exists()


def test_apg_flags_with_zero_apg_steps_are_refused_up_front(assets, tmp_path, capsys):
    """--apg --gamma 0.4 --steps 2 runs int(0.8) = 0 APG steps: one line naming the flags before anything loads
    (a baseline job ignores APG and is not refused for it)."""
    root = assets["root"]
    man = tmp_path / "m.jsonl"
    man.write_text(json.dumps({"id": "a", "prompt": "a photo of sks man with red hair", "seed": 0,
                               "mask": str(root / "hair.png")}) + "\n")
    out = tmp_path / "out"
    args = ["batch", "--manifest", str(man), "--model", str(root / "model"), "--out", str(out), *COMMON]
    assert main([*args, "--apg", "--gamma", "0.4"]) == 2
    err = capsys.readouterr().err
    assert err == ("freecure: error: --apg with --gamma 0.4 and --steps 2 runs int(gamma * steps) = int(0.4 * 2) = 0 "
                   "APG steps: raise --gamma or --steps\n")
    assert not out.exists()


def _direct_pc(clip_dir: Path, image: Image.Image, text: str) -> float:
    """CLIP image-text cosine x100, from the towers and projections directly."""
    from transformers import AutoProcessor, CLIPModel

    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    proc = AutoProcessor.from_pretrained(clip_dir, local_files_only=True)
    t = proc.tokenizer([text], return_tensors="pt", padding=True, truncation=True, max_length=12)
    px = proc.image_processor([image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ti = model.text_projection(model.text_model(**t).pooler_output)[0]
        ii = model.visual_projection(model.vision_model(pixel_values=px).pooler_output)[0]
    return 100.0 * float(ti @ ii / (ti.norm() * ii.norm()))


def _direct_face(img: Image.Image, w: np.ndarray) -> np.ndarray:
    """Centre square crop (the default), bilinear resize to 16x16, (x - 127.5) / 127.5, NCHW, @ W."""
    a = np.asarray(img.convert("RGB"))
    h, wd = a.shape[:2]
    s = min(h, wd)
    a = a[(h - s) // 2:(h - s) // 2 + s, (wd - s) // 2:(wd - s) // 2 + s]
    a = np.asarray(Image.fromarray(a).resize((FACE, FACE), Image.BILINEAR), np.float32)
    x = ((a - 127.5) / 127.5).transpose(2, 0, 1).reshape(-1)
    return x.astype(np.float64) @ w.astype(np.float64)


def test_eval_pc_if_hmean_equal_a_direct_computation(assets, two_process_run, tmp_path, capsys):
    out, _ = two_process_run
    root = assets["root"]
    ev = tmp_path / "eval"
    assert main(["eval", "--results", str(out), "--clip", str(root / "clip"), "--face-model", str(root / "face.onnx"),
                 "--reference", f"alice={root / 'alice.png'}", "--reference", f"bob={root / 'bob.png'}",
                 "--out", str(ev), "--device", "cpu", "--batch-size", "3", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "method" in printed and "hMean" in printed
    with open(ev / "eval_jobs.csv", newline="") as f:
        jobs = {r["id"]: r for r in csv.DictReader(f)}
    assert set(jobs) == {r["id"] for r in assets["rows"]}
    refs = {k: _direct_face(Image.open(root / f"{k}.png"), assets["W"]) for k in ("alice", "bob")}
    direct = {}
    for r in assets["rows"]:
        img = Image.open(out / "jobs" / r["id"] / "pd.png").convert("RGB")
        pc = _direct_pc(root / "clip", img, r["fd_prompt"])
        e = _direct_face(img, assets["W"])
        ref = refs[r["identity"]]
        idf = 100.0 * float(e @ ref / (np.linalg.norm(e) * np.linalg.norm(ref)))
        direct[r["id"]] = (r["method"], r["n_attributes"], pc, idf)
        got = jobs[r["id"]]
        assert float(got["pc"]) == pytest.approx(pc, abs=2e-4)
        assert float(got["if"]) == pytest.approx(idf, abs=2e-4)
        if pc > 0 and idf > 0:
            assert float(got["hmean"]) == pytest.approx(2 * pc * idf / (pc + idf), abs=1e-3)
        else:                                              # only defined for positive scores: blank, with why
            assert got["hmean"] == "" and "hMean undefined" in got["note"]
        assert int(got["n_attributes"]) == r["n_attributes"] and got["pc_text"] == r["fd_prompt"]
    with open(ev / "eval_summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert [(s["method"], s["n_attributes"]) for s in summary] == [
        ("baseline", "1"), ("baseline", "3"), ("baseline", "all"),
        ("freecure", "1"), ("freecure", "3"), ("freecure", "all")]
    for s in summary:
        sel = [v for v in direct.values() if v[0] == s["method"] and (s["n_attributes"] == "all"
                                                                      or v[1] == int(s["n_attributes"]))]
        pc, idf = np.mean([v[2] for v in sel]), np.mean([v[3] for v in sel])
        assert int(s["jobs"]) == len(sel)
        assert float(s["pc"]) == pytest.approx(pc, abs=2e-4) and float(s["if"]) == pytest.approx(idf, abs=2e-4)
        want = 2 * pc * idf / (pc + idf) if pc > 0 and idf > 0 else math.nan
        assert (s["hmean"] == "" and math.isnan(want)) or float(s["hmean"]) == pytest.approx(want, abs=1e-3)
    assert Image.open(ev / "eval_summary.png").size[0] > 100
    meta = json.loads((ev / "eval.json").read_text())
    assert meta["face_crop"] == "center:1.0" and meta["jobs"] == 8


def test_eval_with_a_python_face_model_and_a_landmark_detector(assets, two_process_run, tmp_path, monkeypatch):
    """--face-model module:function and --face-detector module:function (5 landmarks -> ArcFace alignment)."""
    import types

    from freecure_ops.face_embed import ARCFACE_TEMPLATE_112

    mod = types.ModuleType("fc_test_faces")
    seen = []

    def embed(face):
        seen.append(face.shape)
        return face.astype(np.float64).reshape(-1)[:32] + 1.0

    def detect(image):  # landmarks of the template scaled to the image: alignment = a plain resize
        h, w = image.shape[:2]
        return ARCFACE_TEMPLATE_112 * np.array([w / 112.0, h / 112.0])

    mod.embed, mod.detect = embed, detect
    monkeypatch.setitem(sys.modules, "fc_test_faces", mod)
    out, _ = two_process_run
    root = assets["root"]
    assert main(["eval", "--results", str(out), "--clip", str(root / "clip"), "--face-model", "fc_test_faces:embed",
                 "--face-detector", "fc_test_faces:detect", "--reference", f"alice={root / 'alice.png'}",
                 "--out", str(tmp_path), "--device", "cpu", "--quiet"]) == 0
    assert seen and all(s == (112, 112, 3) for s in seen)
    with open(tmp_path / "eval_jobs.csv", newline="") as f:
        jobs = list(csv.DictReader(f))
    assert all((r["if"] != "") == (r["identity"] == "alice") for r in jobs)
    assert all(r["note"] == "no reference image" for r in jobs if r["identity"] == "bob")


@pytest.mark.parametrize("argv,expect", [
    (["--results", "{tmp}/none"], "--results {tmp}/none: no such folder"),
    (["--results", "{tmp}"], "no results.jsonl"),
    (["--clip", "{tmp}"], "--clip {tmp}: expected a local CLIP folder"),
    (["--face-model", "{root}/face.onnx"], "--face-model needs reference images"),
    (["--reference", "alice={tmp}/none.png", "--face-model", "{root}/face.onnx"], "--reference alice="),
    (["--reference", "alice"], "--reference alice: expected ID=IMAGE"),
    (["--face-crop", "center:2"], "--face-crop center:2"),
    (["--face-detector", "nosuchmodule_x:f", "--face-model", "{root}/face.onnx"], "--face-detector"),
])
def test_eval_errors_are_one_line(argv, expect, assets, two_process_run, tmp_path, capsys):
    out, _ = two_process_run
    root = assets["root"]
    base = {"--results": str(out), "--clip": str(root / "clip"), "--out": str(tmp_path / "ev")}
    fmt = {"tmp": str(tmp_path), "root": str(root)}
    given = [a.format(**fmt) for a in argv]
    for flag, value in base.items():
        if flag not in given:
            given += [flag, value]
    assert main(["eval", *given, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("freecure: error:") and err.count("\n") == 1 and expect.format(**fmt) in err, err


def test_manifest_command_is_deterministic_and_checks_its_arguments(tmp_path, capsys):
    args = ["manifest", "--identity", "a=woman", "--prompts", "6", "--methods", "freecure", "--seed", "7"]
    assert main([*args, "--out", str(tmp_path / "1.jsonl")]) == 0
    assert main([*args, "--out", str(tmp_path / "2.csv")]) == 0
    assert main([*args, "--out", str(tmp_path / "3.jsonl")]) == 0
    assert (tmp_path / "1.jsonl").read_bytes() == (tmp_path / "3.jsonl").read_bytes()
    from freecure_ops.manifest import read_manifest

    a, b = read_manifest(tmp_path / "1.jsonl"), read_manifest(tmp_path / "2.csv")
    assert [j.spec() for j in a] == [j.spec() for j in b]
    assert [j.n_attributes for j in a] == [1, 2, 3, 1, 2, 3] and [j.seed for j in a] == list(range(7, 13))
    capsys.readouterr()
    for extra, expect in ((["--counts", "0"], "--counts"), (["--attributes", "hair,wings"], "--attributes"),
                          (["--reference", "zed=x.png"], "--reference zed=x.png: no such identity"),
                          (["--pd-subject", "{who}"], "--pd-subject")):
        assert main([*args, *extra, "--out", str(tmp_path / "x.jsonl")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("freecure: error:") and expect in err and err.count("\n") == 1, err


def test_face_alignment_recovers_a_similarity_transform():
    from freecure_ops.face_embed import ARCFACE_TEMPLATE_112, align_face, crop_face, similarity_transform

    ang, scale, t = 0.3, 1.7, np.array([5.0, -3.0])
    rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
    src = ARCFACE_TEMPLATE_112
    dst = scale * src @ rot.T + t
    m = similarity_transform(src, dst)
    assert np.allclose(m[:, :2], scale * rot) and np.allclose(m[:, 2], t)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (112, 112, 3), dtype=np.uint8))
    same = align_face(img, ARCFACE_TEMPLATE_112, (112, 112))              # landmarks already on the template
    assert np.abs(np.asarray(same, np.int16) - np.asarray(img, np.int16))[2:-2, 2:-2].max() <= 1
    assert crop_face(Image.new("RGB", (40, 20)), "center:0.5").size == (10, 10)
    assert crop_face(Image.new("RGB", (40, 20)), "full").size == (40, 20)
    assert crop_face(Image.new("RGB", (40, 20)), detector=lambda a: None) is None
    assert crop_face(Image.new("RGB", (40, 20)), detector=lambda a: (10, 2, 16, 14)).size == (12, 12)


def test_module_entry_usage_error_is_one_line_from_rank_0_only(assets, tmp_path):
    """``python -m freecure_ops.cli`` (what the launchers run): a usage error is one line, exit 2, said by rank 0
    alone (every process finds the same problem before anything loads)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "prompt": "x"}) + "\n")
    argv = [sys.executable, "-m", "freecure_ops.cli", "batch", "--manifest", str(bad), "--model",
            str(assets["root"] / "model"), "--out", str(tmp_path / "o")]
    for rank, lines in (("0", 1), ("1", 0)):
        p = subprocess.run(argv, capture_output=True, text=True, env={**_env(), "RANK": rank}, timeout=120)
        err = [t for t in p.stderr.splitlines() if t.startswith("freecure")]
        assert p.returncode == 2 and len(err) == lines and "Traceback" not in p.stderr, p.stderr
        if lines:
            assert err[0] == f"freecure: error: --manifest {bad} line 1: missing required field 'seed'"


def test_model_too_small_for_the_preset_and_bad_layer_flags_are_found_up_front(assets, tmp_path, capsys):
    """The block count comes from the model folder's unet/config.json: a FreeCure job without layers on a
    model smaller than the family's preset, and --layers beyond the model, fail before anything loads."""
    root = assets["root"]
    man = tmp_path / "m.jsonl"
    man.write_text(json.dumps({"id": "a", "prompt": "a photo of sks man with red hair", "seed": 0,
                               "mask": str(root / "hair.png")}) + "\n")
    base = ["batch", "--manifest", str(man), "--model", str(root / "model"), "--out", str(tmp_path / "o"),
            *COMMON]
    no_layers = base[:base.index("--layers")] + base[base.index("--layers") + 2:]
    assert main(no_layers) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"freecure: error: --manifest {man} line 1: layers not given: ") and "sd1 preset" in err
    assert "only 4 transformer blocks" in err and err.count("\n") == 1, err
    assert main([*no_layers, "--layers", "0,4"]) == 2
    err = capsys.readouterr().err
    assert err == "freecure: error: --layers 4: the model has 4 self-attention blocks (0..3)\n", err
    assert main([*no_layers, "--omega", "1e300"]) == 2
    assert "--omega must be within float32 range" in capsys.readouterr().err
    assert not (tmp_path / "o" / "jobs").exists()


def test_model_blocks_from_config_match_the_loaded_models(tmp_path):
    """The config-only block count equals discovery's count on SD1.5 and SDXL layouts (built on the meta
    device: no weights) and on the tiny SD pipeline."""
    from diffusers import UNet2DConditionModel

    from freecure_ops.adapters.discovery import _unet_blocks
    from freecure_ops.cli.model_files import model_blocks

    sd15 = dict(block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, layers_per_block=2)
    sdxl = dict(block_out_channels=[320, 640, 1280], cross_attention_dim=2048, attention_head_dim=[5, 10, 20],
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                transformer_layers_per_block=[1, 2, 10], layers_per_block=2, addition_embed_type="text_time",
                addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, use_linear_projection=True)
    for name, cfg, want in (("sd15", sd15, ("sd1", 16)), ("sdxl", sdxl, ("sdxl", 70))):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**cfg)
        (tmp_path / name / "unet").mkdir(parents=True)
        (tmp_path / name / "unet" / "config.json").write_text(json.dumps(dict(unet.config)))
        assert model_blocks(tmp_path / name) == want == (want[0], len(_unet_blocks(unet)))
    tiny = tiny_sd_pipe()
    tiny.save_pretrained(tmp_path / "tiny")
    assert model_blocks(tmp_path / "tiny") == ("sd1", len(_unet_blocks(tiny.unet)))
    assert model_blocks(tmp_path / "nowhere") is None


def test_resume_reruns_jobs_when_the_model_files_or_parser_weights_change(assets, tmp_path, capsys, monkeypatch):
    """The fingerprint holds the model folder's and the parser checkpoint's (size, mtime_ns): the same paths
    with changed files are not 'already done'."""
    import shutil

    import freecure_ops.pipeline.face_parser as fp

    class Parser:  # hair on the top half: what the real BiSeNet would find
        labels = dict(fp.BISENET_CELEBAMASK_LABELS)

        def __call__(self, image):
            lm = torch.zeros(image.shape[-2:], dtype=torch.int64)
            lm[: IMAGE // 2] = 17
            return lm

    monkeypatch.setattr(fp.BiSeNetParser, "from_checkpoint", classmethod(lambda cls, path, **kw: Parser()))
    root = assets["root"]
    model = tmp_path / "model"
    shutil.copytree(root / "model", model)
    weights = tmp_path / "79999_iter.pth"
    torch.save({"w": torch.zeros(2)}, weights)
    rows = [{"id": "b", "prompt": "a photo of sks man with red hair", "seed": 0, "method": "baseline"},
            {"id": "f", "prompt": "a photo of sks man with red hair", "seed": 0}]  # no mask: the parser
    man = tmp_path / "m.jsonl"
    man.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["batch", "--manifest", str(man), "--model", str(model), "--out", str(tmp_path / "o"),
            "--parser-weights", str(weights), *COMMON]

    def run():
        assert main(args) == 0
        return capsys.readouterr().out

    assert "2 complete (0 already done, 2 run now" in run()
    assert "2 complete (2 already done, 0 run now" in run()
    torch.save({"w": torch.ones(2)}, weights)               # new weights, same path: the FreeCure job reruns
    os.utime(weights, ns=(1, 1))
    assert "2 complete (1 already done, 1 run now" in run()
    cfg = model / "unet" / "config.json"                    # a model file touched: every job reruns
    st = cfg.stat()
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert "2 complete (0 already done, 2 run now" in run()
    assert "2 complete (2 already done, 0 run now" in run()


def test_eval_records_missing_images_and_zero_face_embeddings(assets, two_process_run, tmp_path, capfd,
                                                             monkeypatch):
    """A job image deleted after an ok run is a 'missing' row with a note (the others are scored); a zero
    face embedding (NaN cosine) is a missing IF with a note; --quiet shows no loading bar of transformers."""
    import shutil
    import types

    from transformers.utils import logging as t_log

    out, _ = two_process_run
    results = tmp_path / "results"
    shutil.copytree(out, results)
    gone = assets["rows"][2]["id"]
    (results / "jobs" / gone / "pd.png").unlink()
    mod = types.ModuleType("fc_zero_faces")
    mod.embed = lambda face: np.zeros(8)
    monkeypatch.setitem(sys.modules, "fc_zero_faces", mod)
    bars = t_log.is_progress_bar_enabled()
    capfd.readouterr()
    root = assets["root"]
    assert main(["eval", "--results", str(results), "--clip", str(root / "clip"), "--face-model", "fc_zero_faces:embed",
                 "--reference", f"alice={root / 'alice.png'}", "--reference", f"bob={root / 'bob.png'}",
                 "--out", str(tmp_path / "ev"), "--device", "cpu", "--quiet"]) == 0
    err = capfd.readouterr().err
    assert t_log.is_progress_bar_enabled() == bars         # restored after --quiet
    assert "Loading weights" not in err and "%|" not in err, err
    assert "1 of 8 ok jobs have no readable pd.png" in err and "7 of 7 images have no IF" in err, err
    with open(tmp_path / "ev" / "eval_jobs.csv", newline="") as f:
        jobs = {r["id"]: r for r in csv.DictReader(f)}
    assert len(jobs) == 8 and jobs[gone]["status"] == "missing" and jobs[gone]["pc"] == ""
    assert "pd.png missing" in jobs[gone]["note"]
    scored = [r for k, r in jobs.items() if k != gone]
    assert all(r["status"] == "ok" and r["pc"] != "" and r["if"] == "" and "zero" in r["note"] for r in scored)
    with open(tmp_path / "ev" / "eval_summary.csv", newline="") as f:
        summary = {(r["method"], r["n_attributes"]): r for r in csv.DictReader(f)}
    method = assets["rows"][2]["method"]
    assert sum(int(summary[(m, "all")]["jobs"]) for m in ("baseline", "freecure")) == 7
    assert all(r["if_jobs"] == "0" for r in summary.values()) and summary[(method, "all")]["jobs"] == "3"


@pytest.mark.parametrize("extra,expect", [
    (["--identity", "Alice=man"], "--identity Alice=man: 'Alice' and 'alice' differ only in case"),
    (["--methods", "freecure,freecure"], "--methods freecure,freecure: freecure given twice"),
    (["--methods", ""], "--methods '': empty"),
    (["--methods", " , "], "--methods ' , ': empty"),
    (["--attributes", "hair,hair"], "--attributes hair,hair: hair given twice"),
    (["--identity", "bob=man with glasses"], "--identity bob=man with glasses: the identity or class word names"),
    (["--pd-subject", "sks {class} with a hat"], "--pd-subject sks {class} with a hat: the subject names"),
    (["--templates", "{dir}/foo.txt"], "--templates {dir}/foo.txt line 2: unknown placeholder {foo}"),
    (["--templates", "{dir}/pos.txt"], "--templates {dir}/pos.txt line 1: unknown placeholder {0}"),
    (["--templates", "{dir}/brace.txt"], "--templates {dir}/brace.txt line 1: not a valid template (Single '}'"),
    (["--templates", "{dir}/hat.txt"], "--templates {dir}/hat.txt line 1: the template itself names"),
])
def test_manifest_refuses_what_batch_would_refuse(extra, expect, tmp_path, capsys):
    (tmp_path / "foo.txt").write_text("a {subject} with {attributes}\na {subject} with {attributes} {foo}\n")
    (tmp_path / "pos.txt").write_text("a {subject} with {attributes} {0}\n")
    (tmp_path / "brace.txt").write_text("a {subject} with {attributes} }\n")
    (tmp_path / "hat.txt").write_text("a {subject} in a hat with {attributes}\n")
    extra = [e.replace("{dir}", str(tmp_path)) for e in extra]
    rc = main(["manifest", "--identity", "alice=woman", *extra, "--out", str(tmp_path / "m.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("freecure: error: " + expect.replace("{dir}", str(tmp_path))), err
    assert err.count("\n") == 1 and not (tmp_path / "m.jsonl").exists()
