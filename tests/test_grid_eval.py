"""``freecure eval`` on inputs that used to crash or mislead (issue 20 item 5): a decompression-bomb PNG, ONNX
face models with a float16 input or a fixed batch, a 1-value embedding, non-positive PC or IF."""
from __future__ import annotations

import json
import math
import struct
import sys
import types
import zlib

import numpy as np
import pytest
from PIL import Image

from freecure_ops.cli import main
from freecure_ops.evaluate import ClipScorer, evaluate, harmonic_mean, plot_summary, summarize

FACE, EMBED = 16, 8


class FixedClip(ClipScorer):
    """PC without a CLIP model: a fixed score per image."""

    def __init__(self, pc=30.0):
        self.pc = pc

    def __call__(self, images, texts):
        return [self.pc] * len(images)


def _bomb_png(path, side=40_000):
    """A PNG whose header claims side x side pixels (far over PIL's decompression-bomb limit)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))


def _results(root, ids=("a", "b"), identity="alice"):
    """A batch output folder by hand: index rows and records agree, each job has a random pd.png."""
    rng = np.random.default_rng(0)
    rows = []
    for i in ids:
        d = root / "jobs" / i
        d.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (FACE, FACE, 3), dtype=np.uint8)).save(d / "pd.png")
        (d / "job.json").write_text(json.dumps({"id": i, "status": "ok", "fingerprint": f"fp-{i}",
                                                "files": ["pd.png"]}))
        rows.append(dict(id=i, method="baseline", identity=identity, status="ok", prompt="a photo of sks man",
                         fd_prompt="a photo of man", n_attributes=1, dir=f"jobs/{i}", files=["pd.png"],
                         fingerprint=f"fp-{i}"))
    (root / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    Image.fromarray(rng.integers(0, 256, (FACE, FACE, 3), dtype=np.uint8)).save(root / "ref.png")
    return root


def test_a_decompression_bomb_is_that_jobs_error_not_a_traceback(tmp_path):
    root = _results(tmp_path)
    _bomb_png(root / "jobs" / "a" / "pd.png")
    jobs, _ = evaluate(root, FixedClip())
    by_id = {r["id"]: r for r in jobs}
    assert by_id["a"]["status"] == "missing" and "DecompressionBombError" in by_id["a"]["note"]
    assert by_id["b"]["status"] == "ok" and by_id["b"]["pc"] == 30.0

    _bomb_png(root / "bomb_ref.png")                       # a reference that is one: a note per job
    embed = lambda face: face.reshape(-1)[:4].astype(np.float64) + 1.0  # noqa: E731
    jobs, _ = evaluate(root, FixedClip(), face_model=embed, references={"alice": root / "bomb_ref.png"})
    b = next(r for r in jobs if r["id"] == "b")
    assert b["if"] is None and b["note"].startswith("reference not readable: DecompressionBombError")


def _onnx_face_model(path, *, dtype="float", batch="N", out_dim=EMBED):
    """flatten [batch, 3, 16, 16] (cast to float) @ W [768, out_dim]. Returns W."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(1).standard_normal((3 * FACE * FACE, out_dim)).astype(np.float32)
    elem = {"float": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[dtype]
    nodes = [helper.make_node("Cast", ["input.1"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("Flatten", ["x"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "W"], ["emb"])]
    graph = helper.make_graph(nodes, "tiny_arcface", [helper.make_tensor_value_info("input.1", elem,
                                                                                    [batch, 3, FACE, FACE])],
                              [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [batch, out_dim])],
                              initializer=[numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return w


@pytest.mark.parametrize("dtype,batch", [("float16", "N"), ("float", 4), ("float16", 2), ("float", 1)])
def test_onnx_models_with_a_float16_input_or_a_fixed_batch(dtype, batch, tmp_path):
    from freecure_ops.face_embed import OnnxFaceEmbedder

    w = _onnx_face_model(tmp_path / "f.onnx", dtype=dtype, batch=batch)
    embed = OnnxFaceEmbedder(tmp_path / "f.onnx")
    face = np.random.default_rng(2).integers(0, 256, (FACE, FACE, 3), dtype=np.uint8)
    x = ((face.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1).reshape(-1)
    if dtype == "float16":
        x = x.astype(np.float16).astype(np.float32)
    got = embed(face)
    assert got.shape == (EMBED,)
    np.testing.assert_allclose(got, x @ w, rtol=1e-4, atol=1e-3)


def test_a_one_value_embedding_is_refused(tmp_path, monkeypatch, capsys):
    from freecure_ops.face_embed import OnnxFaceEmbedder, cosine_similarity

    _onnx_face_model(tmp_path / "one.onnx", out_dim=1)
    with pytest.raises(ValueError, match="the embedding has 1 value"):
        OnnxFaceEmbedder(tmp_path / "one.onnx")
    with pytest.raises(ValueError, match="at least 2"):
        cosine_similarity([0.5], [-2.0])                   # was -1: IF = -100
    root = _results(tmp_path / "results")
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text("{}")   # never loaded: the face model is refused first
    mod = types.ModuleType("fc_one_value")
    mod.embed = lambda face: np.array([float(face.mean())])
    monkeypatch.setitem(sys.modules, "fc_one_value", mod)
    for model in ("fc_one_value:embed", str(tmp_path / "one.onnx")):
        rc = main(["eval", "--results", str(root), "--clip", str(tmp_path / "clip"), "--face-model", model,
                   "--reference", f"alice={root / 'ref.png'}", "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"freecure: error: --face-model {model}: ") and err.count("\n") == 1, err
        assert "the embedding has 1 value" in err


def test_hmean_is_defined_for_positive_scores_only_and_says_why_not(tmp_path, monkeypatch):
    assert harmonic_mean(20.0, 30.0) == pytest.approx(24.0)
    assert math.isnan(harmonic_mean(-10.0, 30.0))           # was -30
    assert math.isnan(harmonic_mean(20.0, -30.0))           # was blank without a reason (sum < 0)
    jobs = [dict(id=f"j{i}", method="freecure", n_attributes=n, status="ok", pc=pc, **{"if": idf})
            for i, (n, pc, idf) in enumerate([(1, 30.0, 20.0), (3, 30.0, -40.0), (3, 25.0, 10.0)])]
    summary = {(r["method"], r["n_attributes"]): r for r in summarize(jobs)}
    assert summary[("freecure", 1)]["hmean"] == pytest.approx(24.0) and summary[("freecure", 1)]["note"] == ""
    three = summary[("freecure", 3)]                        # mean IF -15: blank, with the reason
    assert math.isnan(three["hmean"]) and "mean IF is -15.00" in three["note"]

    import matplotlib.axes

    heights = []
    real_bar = matplotlib.axes.Axes.bar
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", lambda self, x, h, *a, **k: heights.append(list(h))
                        or real_bar(self, x, h, *a, **k))
    plot_summary(list(summary.values()), tmp_path / "s.png")
    pc, idf, hmean = heights                               # one method: one bar call per panel, groups 1, 3, all
    assert hmean[0] == pytest.approx(24.0) and all(math.isnan(v) for v in hmean[1:])   # not drawn below zero
    assert idf[1] == pytest.approx(-15.0)                  # IF itself is defined and shown


def test_per_job_rows_say_why_hmean_is_blank(tmp_path):
    root = _results(tmp_path)
    # the reference's embedding first, then each job's: both jobs point away from the reference
    embeds = iter([np.array([1.0, 0.0]), np.array([-1.0, 0.1]), np.array([-1.0, 0.1])])
    jobs, _ = evaluate(root, FixedClip(), face_model=lambda face: next(embeds),
                       references={"alice": root / "ref.png"})
    neg = [r for r in jobs if r["if"] is not None and r["if"] < 0]
    assert len(neg) == 2 and all(r["hmean"] is not None and math.isnan(r["hmean"]) and "hMean undefined: IF is" in r["note"]
                       for r in neg)


def test_nothing_left_to_score_plots_without_a_warning(tmp_path):
    """Every job stale (a later run deleted their records): rows that say so, an empty summary and plot."""
    import warnings

    root = _results(tmp_path)
    for i in ("a", "b"):
        (root / "jobs" / i / "job.json").unlink()
    jobs, summary = evaluate(root, FixedClip())
    assert [r["status"] for r in jobs] == ["stale", "stale"] and summary == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_summary(summary, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 0
