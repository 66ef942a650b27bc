"""The whole-generation benchmark (``python -m freecure_ops.bench.e2e``) on CPU at tiny sizes: the code path runs,
the branch-passes are counted from the denoiser's forward batch sizes (authors 4, recompute 3, reuse 2), and the
three variants' PD images agree where they should. No timing is asserted (timing targets live in benchmarks)."""
from __future__ import annotations

import csv

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from bench import e2e  # noqa: E402
from tiny_pipes import IMAGE, FakeParser, tiny_sd_pipe  # noqa: E402

# recompute vs reuse: the same math with the FD keys/values recomputed in pass 2 vs read from pass 1's record
# (the bound).
TOL_REUSE = 2e-5
# authors vs recompute: pass 2 is the same FreeCure call (same latents, mask, layers, omega) except that FASA is
# computed eagerly the authors' way (einsum scores, one softmax over [PD, FD], einsum) instead of the library's
# op. Both are float32; they differ only in summation order, ~1e-7 relative per attention output, and that
# rounding goes through every FASA layer and step and the VAE decode: measured 1.1e-6..1.4e-6 max abs on these
# images (0..1). 1e-4 leaves ~70x room for another BLAS or CPU, and is still >= 100x below what FASA does to
# the image (asserted below), so an authors path that lost or mis-weighted FASA cannot pass.
TOL_AUTHORS = 1e-4
FASA_EFFECT = 1e-2


def _tiny_generation(**kw):
    return e2e.whole_generation(tiny_sd_pipe(), FakeParser(), "a photo of sks man with red hair",
                                "a photo of man with red hair",
                                dict(num_inference_steps=2, height=IMAGE, width=IMAGE, seed=0), device="cpu",
                                fc_kwargs=dict(layers="all", omega=2.0), **kw)


def test_whole_generation_counts_branch_passes_and_images_agree():
    rows = _tiny_generation(repeats=2, warmup=0)
    got = {r["variant"]: r for r in rows}
    assert list(got) == ["authors", "recompute", "reuse"]
    # counted from the denoiser's forward batch sizes, in every timed run
    assert [got[v]["branch_passes"] for v in got] == [4.0, 3.0, 2.0]
    assert all(r["counts_agree"] for r in rows)
    # 2 steps, CFG: every variant runs 2 passes of 2 forwards; the rows per forward make the difference
    # (authors 4 + 4, recompute 2 + 4, reuse 2 + 2)
    assert [got[v]["forwards"] for v in got] == [4, 4, 4]
    assert [got[v]["rows"] for v in got] == [16, 12, 8]
    assert got["reuse"]["fd_reuse"] == "device" and got["recompute"]["fd_reuse"] == "off"
    assert got["authors"]["fd_reuse"] == "off"  # its pass 2 is FreeCure with the mask of its own pass 1
    assert all(len(r["s_runs"]) == 2 and r["s"] > 0 and 0 < r["denoiser_s"] <= r["s"] for r in rows)
    # same seed, steps and mask
    for v in ("authors", "recompute"):
        torch.testing.assert_close(got[v]["mask"], got["reuse"]["mask"], rtol=0, atol=0)
    pd = {v: got[v]["pd"] for v in got}
    assert all(p.shape == (1, 3, IMAGE, IMAGE) for p in pd.values())
    plain = rows[0]["plain_pd"]
    # FASA moved the PD image (so that the agreements below say something)
    assert (pd["reuse"] - plain).abs().max() > FASA_EFFECT
    assert (pd["recompute"] - pd["reuse"]).abs().max() <= TOL_REUSE
    assert (pd["authors"] - pd["recompute"]).abs().max() <= TOL_AUTHORS
    assert (pd["authors"] - pd["reuse"]).abs().max() <= TOL_AUTHORS


def test_whole_generation_rejects_unknown_variants():
    with pytest.raises(ValueError, match="unknown variants"):
        _tiny_generation(variants=("authors", "fastest"), repeats=1, warmup=0)
    with pytest.raises(ValueError, match="repeats"):
        _tiny_generation(repeats=0, warmup=0)


@pytest.mark.parametrize("n_txt, per_row", [(0, False), (0, True), (3, False)])
def test_authors_fasa_matches_the_oracle(n_txt, per_row):
    from freecure_ops import fasa_reference

    g = torch.Generator().manual_seed(0)
    b, h, n_img, d = 2, 2, 12, 8
    n = n_txt + n_img
    q, k_p, k_f, v_p, v_f = (torch.randn(b, h, n, d, generator=g) for _ in range(5))
    mask = torch.rand(b if per_row else 1, n_img, generator=g)
    mask = torch.where(mask > 0.5, mask, torch.zeros(()))  # soft values and excluded keys
    mask = mask if per_row else mask[0]
    k_f[..., n_txt:, :][..., (mask if not per_row else mask[0]) == 0, :] = 0  # excluded keys hold no signal
    out = e2e.authors_fasa(q, k_p, k_f, v_p, v_f, mask, 1.5, n_txt=n_txt)
    want = fasa_reference(q.double(), k_p.double(), k_f.double(), v_p.double(), v_f.double(), mask.double(), 1.5,
                          n_txt=n_txt)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    # FASA did something: not plain self-attention over PD
    plain = torch.softmax(q @ k_p.transpose(-1, -2) * d ** -0.5, dim=-1) @ v_p
    assert (out - plain)[..., n_txt:, :].abs().max() > 1e-2
    if n_txt:  # text query rows see PD keys only
        torch.testing.assert_close(out[..., :n_txt, :], plain[..., :n_txt, :], atol=1e-5, rtol=1e-5)


def test_cli_generation_on_cpu_writes_csv_and_table(tmp_path, capsys):
    rc = e2e.main(["--device", "cpu", "--what", "generation", "--widths", "32,32,32,32", "--heads", "1", "--image",
                   "64", "--steps", "1", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "e2e_generation.csv")))
    assert [r["variant"] for r in rows] == ["authors", "recompute", "reuse"]
    assert [float(r["branch_passes"]) for r in rows] == [4.0, 3.0, 2.0]
    assert all(r["cpu"] and r["cores"] and r["torch"] and r["diffusers"] for r in rows)
    assert float(rows[2]["x_reuse"]) == 1.0 and float(rows[1]["pd_max_diff_vs_reuse"]) <= TOL_REUSE
    # the SD1.5 architecture: 16 transformer blocks, so the SD1.x preset (blocks 10..15) applies as on SD1.5
    assert "blocks 10..15" in rows[0]["fasa_layers"]
    text = (tmp_path / "e2e_generation.txt").read_text()
    assert "authors/reuse" in text and "recompute/reuse" in text and "torch " + torch.__version__ in text
    assert not (tmp_path / "e2e.csv").exists()  # --what generation only


def test_cli_rejects_bad_arguments():
    for argv in (["--what", "steps"], ["--image", "100"], ["--widths", "32,32"], ["--device", "tpu"]):
        with pytest.raises(SystemExit):
            e2e.main(argv)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            e2e.main(["--device", "cuda"])
