"""The command line with Hub references (issue 18): ``--model org/tiny-sd``, ``--parser-weights
org/parser/79999_iter.pth`` or a SegFormer id, ``--clip org/tiny-clip``, from a pre-filled offline Hugging Face
cache (tests/hub_cache.py: HF_HUB_OFFLINE=1, and any network connection fails the test). ``--revision`` pins,
a miss is one line naming the flag before anything loads, batch fingerprints the resolved snapshot."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from freecure_ops.cli import main
from hub_cache import HubCache, offline_hub
from tiny_pipes import IMAGE, tiny_clip, tiny_sd_pipe

FREECURE = str(Path(sys.executable).with_name("freecure"))
PD = "a photo of sks man with red hair"
FD = "a photo of man with red hair"
COMMON = ["--steps", "2", "--height", str(IMAGE), "--width", str(IMAGE), "--layers", "all", "--quiet",
          "--device", "cpu"]


def _tiny_segformer(folder: Path) -> Path:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    id2label = {0: "background", 1: "skin", 2: "hair"}
    torch.manual_seed(0)
    cfg = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                          patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                          decoder_hidden_size=16, num_labels=3, id2label=id2label,
                          label2id={v: k for k, v in id2label.items()})
    SegformerForSemanticSegmentation(cfg).eval().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
         "image_std": [0.229, 0.224, 0.225], "image_processor_type": "SegformerImageProcessor", "resample": 2,
         "rescale_factor": 1 / 255, "size": {"height": 32, "width": 32}}))
    return folder


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """What the cache holds: two tiny SD pipelines (different weights), a BiSeNet-named checkpoint, a tiny
    SegFormer, a tiny CLIP; and a mask."""
    root = tmp_path_factory.mktemp("hub_src")
    for name, seed in (("sd_a", 0), ("sd_b", 5)):
        tiny_sd_pipe(seed).save_pretrained(root / name)
    torch.save({"w": torch.zeros(2)}, root / "79999_iter.pth")
    _tiny_segformer(root / "segformer")
    tiny_clip(root / "clip")
    m = np.zeros((IMAGE, IMAGE), np.uint8)
    m[: IMAGE // 2] = 255
    Image.fromarray(m, mode="L").save(root / "hair.png")
    return root


@pytest.fixture
def cache(tmp_path, src, monkeypatch):
    """org/tiny-sd (main -> sd_b, tag v1 -> sd_a), org/parser, org/segformer, org/tiny-clip; HF_HUB_OFFLINE=1.
    ``cache.commits`` holds the commits."""
    c = HubCache(tmp_path / "hub")
    c.commits = {"sd_a": c.add("org/tiny-sd", src / "sd_a", refs=("v1",)),
                 "sd_b": c.add("org/tiny-sd", src / "sd_b"),
                 "parser": c.add("org/parser", {"79999_iter.pth": src / "79999_iter.pth"}),
                 "segformer": c.add("org/segformer", src / "segformer"),
                 "clip": c.add("org/tiny-clip", src / "clip")}
    offline_hub(monkeypatch, c.root)
    return c


def _generate(model, out, *extra):
    return ["generate", "--model", model, "--prompt", PD, "--fd-prompt", FD, *COMMON, "--out", str(out), *extra]


def _no_loading(monkeypatch):
    """Loading any pipeline or parser fails the test (the checks must find the problem first)."""
    from diffusers import DiffusionPipeline

    import freecure_ops.pipeline.parsers as parsers

    def boom(*a, **k):
        raise AssertionError("weights were loaded before the checks finished")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", boom)
    monkeypatch.setattr(parsers, "load_face_parser", boom)


def test_generate_from_a_hub_id_in_the_cache_and_revision_pins(cache, src, tmp_path):
    mask = ["--mask", str(src / "hair.png")]
    assert main(_generate("org/tiny-sd", tmp_path / "main", *mask)) == 0
    meta = json.loads((tmp_path / "main" / "freecure.json").read_text())
    w = meta["weights"]["model"]
    assert meta["model"] == "org/tiny-sd" and w["source"] == "hub" and w["commit"] == cache.commits["sd_b"]
    assert Path(w["path"]) == cache.repo_dir("org/tiny-sd") / "snapshots" / cache.commits["sd_b"]
    for rev in ("v1", cache.commits["sd_a"]):  # a tag and a commit pin the other weights
        assert main(_generate("org/tiny-sd", tmp_path / rev, *mask, "--revision", rev)) == 0
        meta = json.loads((tmp_path / rev / "freecure.json").read_text())
        assert meta["weights"]["model"]["commit"] == cache.commits["sd_a"]
        assert meta["weights"]["model"]["revision"] == rev
    assert main(_generate(str(src / "sd_a"), tmp_path / "local", *mask)) == 0  # the same image as the folder's
    pd = {k: np.asarray(Image.open(tmp_path / k / "pd.png")) for k in ("main", "v1", "local")}
    assert np.array_equal(pd["v1"], pd["local"]) and not np.array_equal(pd["main"], pd["v1"])


def test_offline_flag_reads_only_the_cache(cache, src, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=0: --offline alone keeps every lookup in the cache (a connection would fail the test)."""
    offline_hub(monkeypatch, cache.root, offline=False)
    assert main(_generate("org/tiny-sd", tmp_path / "o", "--mask", str(src / "hair.png"), "--offline")) == 0
    assert json.loads((tmp_path / "o" / "freecure.json").read_text())["weights"]["model"]["commit"] == \
        cache.commits["sd_b"]
    assert main(_generate("org/not-cached", tmp_path / "x", "--mask", str(src / "hair.png"), "--offline")) == 2


@pytest.mark.parametrize("model,extra,expect", [
    ("org/not-cached", [], ["--model org/not-cached: ", "Hugging Face cache", "HF_HUB_OFFLINE=1"]),
    ("org/tiny-sd", ["--revision", "v9"], ["--model org/tiny-sd --revision v9: ", "not (completely) in the"]),
    ("org/tiny-sd", ["--variant", "fp16"], ["--variant fp16: ", "has no fp16 weights"]),
    ("org/tiny-sd", ["--revision", ""], ["--revision must not be empty"]),
    ("{src}/sd_a", ["--revision", "v1"], ["--revision v1: only used with a Hub reference"]),
    ("org/parser", [], ["--model org/parser: ", "no model_index.json; it is not a diffusers pipeline"]),
    ("org/tiny-sd", ["--parser-weights", "org/parser/nope.pth"], ["--parser-weights org/parser/nope.pth: "]),
    ("org/tiny-sd", ["--parser-weights", "org/no-parser"], ["--parser-weights org/no-parser: ", "a local folder"]),
    ("org/tiny-sd", ["--parser-weights", "79999_iter.pth"], ["nor a Hub file of the form org/name/79999_iter.pth"]),
    ("org/tiny-sd", ["--parser-weights", "org/parser/79999_iter.pth", "--parser-revision", "v2"],
     ["--parser-weights org/parser/79999_iter.pth --parser-revision v2: "]),
    ("org/tiny-sd", ["--parser-weights", "{src}/79999_iter.pth", "--parser-revision", "v1"],
     ["--parser-revision v1: only used with a Hub reference"]),
    ("org/tiny-sd", ["--mask", "{src}/hair.png", "--parser-revision", "v1"],
     ["--parser-revision is only used with --parser-weights"]),
])
def test_hub_reference_problems_are_one_line_before_loading(model, extra, expect, cache, src, tmp_path, capsys,
                                                            monkeypatch):
    _no_loading(monkeypatch)
    extra = [e.format(src=src) for e in extra]
    if "--mask" not in extra and "--parser-weights" not in extra:
        extra += ["--mask", str(src / "hair.png")]
    assert main(_generate(model.format(src=src), tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("freecure: error: ") and err.count("\n") == 1, err
    assert all(e in err for e in expect), err
    assert not (tmp_path / "out").exists()


def test_missing_hub_id_in_a_real_process_is_one_line(cache, src, tmp_path):
    """The command as a user runs it (HF_HUB_OFFLINE=1 in the environment): no library notes, no traceback."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([FREECURE, *_generate("org/not-cached", tmp_path / "out", "--mask", str(src / "hair.png"))],
                       capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("freecure: error: --model org/not-cached: ") and str(cache.root) in p.stderr


def test_parser_weights_from_a_hub_file_and_a_segformer_id(cache, src, tmp_path, monkeypatch):
    import freecure_ops.pipeline.face_parser as fp

    loaded = []

    class Stub:
        labels = dict(fp.BISENET_CELEBAMASK_LABELS)

        def __call__(self, image):
            lm = torch.zeros(image.shape[-2:], dtype=torch.int64)
            lm[: IMAGE // 2] = 17
            return lm

    monkeypatch.setattr(fp.BiSeNetParser, "from_checkpoint",
                        classmethod(lambda cls, path, **kw: loaded.append(Path(path)) or Stub()))
    assert main(_generate("org/tiny-sd", tmp_path / "b", "--parser-weights", "org/parser/79999_iter.pth")) == 0
    snap = cache.repo_dir("org/parser") / "snapshots" / cache.commits["parser"]
    assert loaded == [snap / "79999_iter.pth"]
    meta = json.loads((tmp_path / "b" / "freecure.json").read_text())
    assert meta["weights"]["parser"]["commit"] == cache.commits["parser"] and meta["attributes"] == [["hair"]]
    # a SegFormer face-parsing model by id: the real parser runs (random weights: the mask may be empty)
    assert main(_generate("org/tiny-sd", tmp_path / "s", "--parser-weights", "org/segformer",
                          "--empty-mask", "warn")) == 0
    meta = json.loads((tmp_path / "s" / "freecure.json").read_text())
    assert meta["weights"]["parser"]["commit"] == cache.commits["segformer"] and meta["mask_source"] == "parser"


def test_batch_with_a_hub_id_fingerprints_the_snapshot(cache, src, tmp_path, capsys):
    rows = [{"id": "b", "prompt": PD, "seed": 0, "method": "baseline"},
            {"id": "f", "prompt": PD, "fd_prompt": FD, "seed": 0, "mask": str(src / "hair.png")}]
    man = tmp_path / "m.jsonl"
    man.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o"
    args = ["batch", "--manifest", str(man), "--model", "org/tiny-sd", "--out", str(out), *COMMON]

    def run(*extra):
        assert main(args + list(extra)) == 0
        return capsys.readouterr().out

    assert "2 complete (0 already done, 2 run now" in run()
    rec = json.loads((out / "jobs" / "b" / "job.json").read_text())
    assert rec["model"] == "org/tiny-sd" and rec["weights"]["model"]["commit"] == cache.commits["sd_b"]
    assert "2 complete (2 already done, 0 run now" in run()
    assert "2 complete (2 already done, 0 run now" in run("--offline")   # the same weights
    cfg = cache.repo_dir("org/tiny-sd") / "snapshots" / cache.commits["sd_b"] / "unet" / "config.json"
    st = cfg.stat()
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))         # a snapshot file changed: all rerun
    assert "2 complete (0 already done, 2 run now" in run()
    assert "2 complete (0 already done, 2 run now" in run("--revision", "v1")  # other weights: all rerun
    rec = json.loads((out / "jobs" / "f" / "job.json").read_text())
    assert rec["weights"]["model"]["commit"] == cache.commits["sd_a"] and rec["weights"]["model"]["revision"] == "v1"
    assert "2 complete (2 already done, 0 run now" in run("--revision", cache.commits["sd_a"])  # the same commit
    assert main(args + ["--model", "org/not-cached"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("freecure: error: --model org/not-cached: ") and err.count("\n") == 1, err

    # eval's CLIP by Hub id, from the cache
    assert main(["eval", "--results", str(out), "--clip", "org/tiny-clip", "--out", str(tmp_path / "ev"),
                 "--quiet"]) == 0
    meta = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert meta["clip"] == "org/tiny-clip" and meta["clip_weights"]["commit"] == cache.commits["clip"]
    assert meta["jobs"] == 2
    capsys.readouterr()
    for extra, expect in ((["--clip", "org/no-clip"], "--clip org/no-clip: "),
                          (["--clip", "org/tiny-clip", "--clip-revision", "v3"],
                           "--clip org/tiny-clip --clip-revision v3: "),
                          (["--clip", str(src / "clip"), "--clip-revision", "v3"],
                           "--clip-revision v3: only used with a Hub reference")):
        assert main(["eval", "--results", str(out), *extra, "--out", str(tmp_path / "ev2"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("freecure: error: " + expect) and err.count("\n") == 1, err


def test_online_hub_errors_that_diffusers_wraps_are_one_line(cache):
    """Online, diffusers falls back to the cache and, on a miss, raises "Cannot load model ..." from the Hub's
    own error: the line names that error (no network here: the exceptions are built)."""
    from types import SimpleNamespace

    from huggingface_hub.errors import RepositoryNotFoundError

    from freecure_ops.cli.weights import hub_reason

    class ConnectError(Exception):
        pass

    ConnectError.__module__ = "httpx"
    wrapped = OSError("Cannot load model org/x: the model is not fully cached locally (...) and an error occurred")
    wrapped.__cause__ = ConnectError("[Errno -2] Name or service not known")
    reason = hub_reason(wrapped, offline=None, kind="folder", repo="org/x")
    assert reason.startswith("the Hub could not be reached ([Errno -2] Name or service not known)"), reason
    response = SimpleNamespace(headers={}, status_code=404, request=None, url="https://huggingface.co/api/models/x")
    missing = RepositoryNotFoundError("404 Client Error. Repository Not Found for url: x", response=response)
    wrapped.__cause__ = missing
    assert hub_reason(wrapped, offline=None, kind="folder", repo="org/x") == \
        "not a local folder, and there is no Hub repository org/x (or it is private: log in with hf auth login)"


@pytest.mark.parametrize("command", ["batch", "generate"])
def test_a_hub_models_configs_are_read_before_loading(cache, src, tmp_path, capsys, monkeypatch, command):
    """The checks that read the model's config files (block count for --layers) read the resolved snapshot,
    in batch and generate alike, before any weights load."""
    _no_loading(monkeypatch)
    if command == "batch":
        man = tmp_path / "m.jsonl"
        man.write_text(json.dumps({"id": "f", "prompt": PD, "seed": 0, "mask": str(src / "hair.png")}) + "\n")
        what = ["--manifest", str(man)]
    else:
        what = ["--prompt", PD, "--mask", str(src / "hair.png")]
    args = [command, *what, "--model", "org/tiny-sd", "--out", str(tmp_path / "o"), *COMMON]
    assert main(args + ["--layers", "0,99"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("freecure: error: --layers 99: the model has 4 self-attention blocks") and \
        err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_variant_picks_the_variant_weights(cache, src, tmp_path):
    """A repository with default weights (sd_a) and fp16-variant files (sd_b's weights, saved in float32 under
    the variant's names): --variant fp16 loads the variant's."""
    import shutil

    both = tmp_path / "both"
    shutil.copytree(src / "sd_a", both)
    tiny_sd_pipe(5).save_pretrained(both, variant="fp16")
    assert any(".fp16." in p.name for p in both.rglob("*"))
    commit = cache.add("org/tiny-sd-variants", both)
    mask = ["--mask", str(src / "hair.png")]
    runs = {"default": [], "fp16": ["--variant", "fp16"]}
    for name, extra in runs.items():
        assert main(_generate("org/tiny-sd-variants", tmp_path / name, *mask, *extra)) == 0
        w = json.loads((tmp_path / name / "freecure.json").read_text())["weights"]["model"]
        assert w["commit"] == commit and w.get("variant") == (None if name == "default" else "fp16")
    for name in ("sd_a", "sd_b"):
        assert main(_generate(str(src / name), tmp_path / name, *mask)) == 0
    pd = {k: np.asarray(Image.open(tmp_path / k / "pd.png")) for k in ("default", "fp16", "sd_a", "sd_b")}
    assert np.array_equal(pd["default"], pd["sd_a"]) and np.array_equal(pd["fp16"], pd["sd_b"])
