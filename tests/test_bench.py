"""The benchmark's pieces (bench/): case tables, FLOP counting, masks, provider agreement, report writers,
and a smoke run of the CPU main job. Everything here is CPU-sized; on CUDA the same tests run there."""
import collections
import csv
import os
import re
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from bench import measure, report
from bench.masks import HAIR, SKIN as SKIN_LABEL, case_mask, parsing_map, token_mask
from bench.providers import (PREPARE, PROVIDERS, Prepared, Skip, make_problem, oracle, sdpa_backends)
from bench.runner import annotate, run
from bench.shapes import FLUX, SD15, SDXL, Case, cases_for, reduced

# SPEC.md's "Real shapes" table rows, verbatim. SPEC.md lives outside the repository (shared/SPEC.md next to
# the checkout, in the project's workspace), so the shape test reads these copies and never skips; where
# SPEC.md can be found, test_spec_table_copy_is_current checks that the copies are still SPEC.md's text.
SPEC_ROWS = {
    "SD1.5": "| SD1.5 | 512 | 8 x 40 / 8 x 80 / 8 x 160 | 4096 (5), 1024 (5), 256 (5), mid 64 (1) |",
    "SDXL": "| SDXL | 1024 | 10 x 64 / 20 x 64 | 4096 (10), 1024 (60) |",
    "FLUX.1-dev": "| FLUX.1-dev | 1024 | 24 x 128 | 512 text + 4096 image, 57 blocks (19 double, 38 single) |",
}


def _find_spec():
    """shared/SPEC.md in any folder above this file (or $FREECURE_SPEC), None when there is none."""
    env = os.environ.get("FREECURE_SPEC")
    if env:
        return Path(env)
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared" / "SPEC.md").is_file():
            return parent / "shared" / "SPEC.md"
    return None


# ------------------------------------------------------------------------------------------------ shapes
def _table(cases):
    return sorted((c.heads, c.head_dim, c.n_txt, c.n_img, c.layers, c.batch) for c in cases)


def test_shape_tables_match_spec():
    # SPEC.md "Real shapes": (heads, head dim, text tokens, image tokens, layers, PD rows per call). The
    # adapters call FASA once per guidance half: one image is one PD row per call for every model.
    assert _table(SD15) == sorted([(8, 40, 0, 4096, 5, 1), (8, 80, 0, 1024, 5, 1), (8, 160, 0, 256, 5, 1),
                                   (8, 160, 0, 64, 1, 1)])
    assert _table(SDXL) == sorted([(10, 64, 0, 4096, 10, 1), (20, 64, 0, 1024, 60, 1)])
    assert _table(FLUX) == [(24, 128, 512, 4096, 57, 1)]
    assert sum(c.layers for c in SD15) == 16 and sum(c.layers for c in SDXL) == 70
    for c in cases_for(["sd15", "sdxl", "flux"]):
        assert c.n_q == c.n_p == c.n_f == c.n_txt + c.grid[0] * c.grid[1]
    assert [c.omega for c in SD15] == [0.5] * 4 and [c.omega for c in SDXL] == [1.5] * 2


def test_spec_table_copy_is_current():
    spec = _find_spec()
    if spec is None:
        pytest.skip("no shared/SPEC.md above this checkout (set FREECURE_SPEC to check the copied table rows)")
    rows = {m: line.strip() for line in spec.read_text().splitlines()
            for m in SPEC_ROWS if line.startswith(f"| {m} |")}
    assert rows == SPEC_ROWS


def test_shape_tables_match_spec_text():
    """Read SPEC.md's table text: head counts, head dims and token counts (with layer counts)."""
    rows = SPEC_ROWS
    for key, cases in (("SD1.5", SD15), ("SDXL", SDXL)):
        line = rows[key]
        heads_dims = {(int(h), int(d)) for h, d in re.findall(r"(\d+) x (\d+)", line)}
        tokens = {(int(n), int(k)) for n, k in re.findall(r"(\d+) \((\d+)\)", line)}
        assert {(c.heads, c.head_dim) for c in cases} == heads_dims
        assert {(c.n_img, c.layers) for c in cases} == tokens
    line = rows["FLUX.1-dev"]
    (c,) = FLUX
    assert f"{c.heads} x {c.head_dim}" in line and f"{c.n_txt} text + {c.n_img} image" in line
    assert f"{c.layers} blocks" in line


def test_shape_tables_match_the_architectures():
    """Independently of SPEC.md: the attn1 layers of the real SD1.5 / SDXL UNets and FLUX blocks (meta device)."""
    diffusers = pytest.importorskip("diffusers")
    from bench.configs import FLUX_DEV, SD15_UNET, SDXL_UNET, flux_self_attention, unet_self_attention

    for cases, cfg, latent in ((SD15, SD15_UNET, (64, 64)), (SDXL, SDXL_UNET, (128, 128))):
        with torch.device("meta"):
            unet = diffusers.UNet2DConditionModel(**cfg)
        got = collections.Counter(unet_self_attention(unet, latent))
        assert got == {(c.heads, c.head_dim, c.grid): c.layers for c in cases}
    with torch.device("meta"):
        flux = diffusers.FluxTransformer2DModel(**FLUX_DEV)
    got = flux_self_attention(flux)
    assert len(got) == FLUX[0].layers and {(h, d) for h, d, _ in got} == {(FLUX[0].heads, FLUX[0].head_dim)}


def test_reduced_cases_keep_head_dim_batch_and_aspect():
    c = reduced(Case("x", "x", 2, 20, 64, (32, 16), n_txt=512))
    assert (c.batch, c.head_dim, c.heads, c.grid, c.n_txt) == (2, 64, 2, (16, 8), 128)
    with pytest.raises(ValueError, match="unknown model"):
        cases_for(["sd3"])


# ------------------------------------------------------------------------------------------------- FLOPs
def test_flop_formula():
    # 4 * B * H * Nq * (Np + nnz) * D with no text tokens
    assert measure.fasa_flops(2, 10, 64, 4096, 4096, 1024) == 4 * 2 * 10 * 4096 * (4096 + 1024) * 64
    # text rows of FLUX see PD keys only
    assert measure.attended_pairs(512 + 4096, 512 + 4096, 1000, 512) == 4608 * 4608 + 4096 * 1000
    assert measure.tflops(2e12, 1000.0) == pytest.approx(2.0)
    assert measure.tflops(1, None) is None


@pytest.mark.parametrize("n_txt", [0, 3])
def test_flop_count_matches_attended_pairs_brute_force(n_txt):
    """Count finite logits of the reference (independent of the formula) on a tiny case."""
    from freecure_ops import fasa_reference

    case = Case("t", "t", 1, 1, 48, (3, 5), n_txt=n_txt)
    p = make_problem(case, torch.float64, 0.4, "cpu", seed=3)
    # The attended (query, key) pairs built explicitly from SPEC.md's rules.
    n_q, n_p = case.n_q, case.n_p
    keep = torch.zeros(n_q, n_p + case.n_f, dtype=torch.bool)
    keep[:, :n_p] = True
    fd = torch.cat([torch.zeros(n_txt, dtype=torch.bool), p.mask > 0])
    keep[n_txt:, n_p:] = fd[None, :]
    assert measure.attended_pairs(n_q, n_p, p.nnz, n_txt) == int(keep.sum())
    # and the reference agrees on which keys carry weight: put v = one-hot per key, read the weights back
    eye = torch.eye(n_p + case.n_f, dtype=torch.float64)
    pad = torch.zeros(1, 1, n_p + case.n_f, case.head_dim - n_p - case.n_f, dtype=torch.float64) \
        if case.head_dim > n_p + case.n_f else None
    if pad is None:
        pytest.skip("head dim too small for the one-hot read-back")
    v = torch.cat([eye[None, None], pad], dim=-1)
    w = fasa_reference(p.q, p.k_p, p.k_f, v[:, :, :n_p], v[:, :, n_p:], p.mask, p.omega, n_txt=n_txt)
    assert int((w[0, 0, :, :n_p + case.n_f] > 0).sum()) == int(keep.sum())


# ------------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("grid", [(64, 64), (32, 32), (16, 16), (32, 16), (12, 20)])
@pytest.mark.parametrize("coverage", [0.10, 0.25, 0.50, 1.00])
def test_mask_coverage_near_target(grid, coverage):
    mask, got = case_mask(grid, coverage)
    assert mask.dtype == torch.bool and mask.shape == (grid[0] * grid[1],)
    tol = 0.02 if min(grid) >= 16 else 0.05
    assert abs(got - coverage) <= tol, (grid, coverage, got)
    if coverage == 1.0:
        assert bool(mask.all())


def test_parsing_map_exact_coverage_and_labels():
    labels = parsing_map(96, 64, 0.25, seed=1)
    assert labels.shape == (96, 64)
    assert int((labels == HAIR).sum()) == round(0.25 * 96 * 64)
    assert set(labels.unique().tolist()) <= {0, 1, 14, 16, 17}
    assert bool((labels[0] == HAIR).any()), "hair starts at the top of the head"
    assert not torch.equal(parsing_map(32, 32, 0.5, seed=1), parsing_map(32, 32, 0.5, seed=2))


def test_token_mask_nearest_non_square_and_row_major():
    labels = torch.full((37, 53), SKIN_LABEL)
    labels[::3, ::2] = HAIR
    m = token_mask(labels, (12, 7))
    rows = [(i * 37) // 12 for i in range(12)]
    cols = [(j * 53) // 7 for j in range(7)]
    assert torch.equal(m, (labels[rows][:, cols] == HAIR).flatten())
    # token j of the mask is grid cell (j // w, j % w)
    lab = torch.zeros(6, 10, dtype=torch.int64)
    lab[1, 7] = HAIR
    m = token_mask(lab, (6, 10))
    assert m.nonzero().flatten().tolist() == [1 * 10 + 7]


# --------------------------------------------------------------------------------------------- providers
TINY = [Case("sd15", "tiny-sd", 2, 2, 40, (6, 8), omega=0.5),
        Case("flux", "tiny-flux", 1, 2, 32, (4, 6), n_txt=8, omega=1.5)]


@pytest.mark.parametrize("case", TINY, ids=lambda c: c.name)
def test_providers_agree_on_a_tiny_case(case, device):
    dtypes = [torch.float32] if device == "cpu" else [torch.float16, torch.bfloat16]
    providers = [p for p in PROVIDERS if device == "cuda" or p not in ("fasa", "fasa_pdsdpa", "flex", "sdpa_fold")]
    rows = run([case], dtypes, [0.25, 1.0], providers, device,
               timing={"cpu_max_reps": 1, "cpu_budget_s": 0.0, "warmup_ms": 1.0, "rep_ms": 2.0})
    assert len(rows) == len(dtypes) * 2 * len(providers)
    for r in rows:
        assert r["status"] == "ok", r
        assert r["max_err"] <= r["tol"] and r["ms"] > 0 and r["tflops"] > 0
        assert r["device"] and r["torch"] == torch.__version__ and r["triton"]
    backends = {r["sdpa_backend"] for r in rows if r["provider"].startswith("sdpa")}
    assert "unknown" not in backends and "" not in backends


def test_run_visits_every_case_at_the_headline_masks_first():
    # A run cut short by a time limit must already hold every case at the first mask and the full mask.
    seen = []
    rows = run(TINY, [torch.float32], [0.25, 0.5], ["sdpa_pd"], "cpu", masks=["hair", "band", "full"],
               timing={"cpu_max_reps": 1, "cpu_budget_s": 0.0, "warmup_ms": 1.0, "rep_ms": 1.0},
               on_progress=lambda rs: seen.append({(r["case"], r["mask"], r["coverage"]) for r in rs}))
    steps = [sorted(b - a)[0] for a, b in zip([set()] + seen, seen)]
    assert steps[:4] == [("tiny-sd", "hair", 0.25), ("tiny-flux", "hair", 0.25),
                         ("tiny-sd", "full", 1.0), ("tiny-flux", "full", 1.0)]
    assert len(steps) == 2 * 5
    assert [(r["case"], r["mask"], r["coverage"]) for r in rows][:5] == [
        ("tiny-sd", "hair", 0.25), ("tiny-sd", "hair", 0.5), ("tiny-sd", "band", 0.25), ("tiny-sd", "band", 0.5),
        ("tiny-sd", "full", 1.0)]


def test_fasa_provider_skips_on_cpu_and_kernel_runs_in_interpreter(device):
    if device != "cpu":
        pytest.skip("CPU behaviour")
    p = make_problem(TINY[0], torch.float32, 0.25, "cpu")
    with pytest.raises(Skip, match="need CUDA"):
        PREPARE["fasa"](p)
    from bench.kernel_check import run_kernel_check

    rows = run_kernel_check(log=lambda s: None)
    assert rows and all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]


def test_reference_query_chunking_matches(monkeypatch):
    import bench.providers as prov

    p = make_problem(TINY[1], torch.float32, 0.5, "cpu", seed=5)
    full = PREPARE["reference"](p).fn()
    monkeypatch.setattr(prov, "REFERENCE_MAX_SCORE_BYTES", 4096)
    prep = PREPARE["reference"](p)
    assert "chunked" in prep.note
    torch.testing.assert_close(prep.fn(), full, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(full, oracle(p, "fasa").float(), atol=1e-5, rtol=1e-4)


def test_disagreeing_provider_is_failed_not_timed(monkeypatch):
    import bench.providers as prov

    def broken(p):  # ignores the FD branch entirely
        return Prepared(lambda: torch.nn.functional.scaled_dot_product_attention(p.q, p.k_p, p.v_p, scale=p.scale))

    monkeypatch.setitem(prov.PREPARE, "sdpa_bias", broken)
    rows = run([TINY[0]], [torch.float32], [1.0], ["sdpa_bias", "sdpa_pd"], "cpu",
               timing={"cpu_max_reps": 1, "cpu_budget_s": 0.0}, log=lambda s: None)
    bad, good = rows
    assert bad["status"] == "FAIL" and bad["ms"] is None and bad["max_err"] > bad["tol"]
    assert good["status"] == "ok"


@pytest.mark.parametrize("case", TINY, ids=lambda c: c.name)
@pytest.mark.parametrize("coverage", [0.25, 1.0])
def test_fold_providers_agree_with_the_oracle(case, coverage):
    # fasa[torch] and the CUDA provider sdpa_fold (its arithmetic, run here in fp32) against the float64 oracle.
    import bench.providers as prov

    p = make_problem(case, torch.float32, coverage, "cpu", seed=3)
    for prep in (PREPARE["fasa[torch]"](p), prov.prepare_sdpa_fold(p, allow_cpu=True)):
        out = prep.fn()
        assert out.shape == p.q.shape
        assert (out.double() - oracle(p, "fasa")).abs().max() < 1e-5, prep.note
    with pytest.raises(Skip, match="CUDA"):
        PREPARE["sdpa_fold"](p)


def test_fastest_variant_keeps_the_fastest_that_agrees():
    from bench.runner import fastest_variant

    p = make_problem(TINY[0], torch.float32, 0.25, "cpu")
    right = PREPARE["sdpa_bias"](p).fn

    def slow():
        time.sleep(0.02)
        return right()

    def broken():
        raise RuntimeError("no kernel for this shape")

    variants = {"slow": slow, "wrong": lambda: right() + 1, "broken": broken, "fast": right}
    fn, note = fastest_variant(variants, p, {"cpu_max_reps": 2, "cpu_budget_s": 0.0})
    assert fn is right and note.startswith("kept fast (slow ") and "wrong disagrees" in note and "broken:" in note
    with pytest.raises(RuntimeError, match="no kernel"):
        fastest_variant({"broken": broken}, p, {"cpu_max_reps": 1, "cpu_budget_s": 0.0})


def test_provider_whose_pinned_variants_all_fail_is_timed_as_sdpa_picks(monkeypatch):
    import bench.providers as prov

    def pinned_broken(p):
        prepared = prov.prepare_sdpa_bias(p)
        prepared.variants = {"cudnn": lambda: (_ for _ in ()).throw(RuntimeError("no cuDNN here"))}
        return prepared

    monkeypatch.setitem(prov.PREPARE, "sdpa_bias", pinned_broken)
    row, = run([TINY[0]], [torch.float32], [1.0], ["sdpa_bias"], "cpu", masks=["full"],
               timing={"cpu_max_reps": 1, "cpu_budget_s": 0.0}, log=lambda s: None)
    assert row["status"] == "ok" and row["ms"] > 0 and "no pinned SDPA backend ran" in row["note"]


def test_torch_backend_is_the_baseline_without_the_kernel():
    rows = [{**r, "dtype": "fp32", "device": "cpu"} for r in _fake_rows() if r["provider"] != "fasa"]
    rows.insert(0, {**rows[0], "provider": "fasa[torch]", "ms": 0.125, "status": "ok"})
    annotate(rows)
    by = {r["provider"]: r for r in rows}
    assert by["fasa[torch]"]["x_fasa"] == 1.0 and by["sdpa_bias"]["x_fasa"] == pytest.approx(1.6)
    assert by["fasa[torch]"]["vs_bias"] == pytest.approx(1.6) and by["sdpa_bias"]["vs_bias"] == 1.0
    assert by["sdpa_bias"]["target"] == ">=1.4x ok" and by["authors"]["target"] == ""
    by["fasa[torch]"]["ms"] = 0.16
    annotate(rows)
    assert by["sdpa_bias"]["target"] == ">=1.4x MISS"


def test_plot_is_one_small_panel_per_shape(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    rows = []
    for label in ("sd15 4096 8x40", "sd15 1024 8x80", "sdxl 1024 20x64", "flux 512+4096 24x128", "sdxl 4096 10x64"):
        for kind, cov in (("hair", 0.1), ("hair", 0.25), ("hair", 0.5), ("band", 0.25), ("full", 1.0)):
            for prov, ms in (("fasa", 1.0), ("sdpa_bias", 2.0), ("sdpa_gather", 1.5), ("authors", 9.0)):
                rows.append({**_fake_rows()[0], "label": label, "case": label, "mask": kind, "coverage": cov,
                             "provider": prov, "ms": ms * (1 + cov), "status": "ok"})
    annotate(rows)
    png = report.plot(rows, tmp_path / "bench.png", title="t")
    height, width = imread(png).shape[:2]
    assert width <= 1400 and height <= 700  # 4 + 1 panels, not 80 bar groups in a row
    assert report.plot([{**r, "vs_bias": None} for r in rows], tmp_path / "none.png") is None


def test_sdpa_backend_is_logged():
    q = torch.randn(1, 2, 16, 32, generator=torch.Generator().manual_seed(0))
    name = sdpa_backends(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert name in {"flash", "flash_cpu", "mem_efficient", "cudnn", "math"}


# ------------------------------------------------------------------------------------------------ report
def _fake_rows():
    base = {"device": "NVIDIA H100 80GB HBM3", "driver": "580.65", "torch": "2.11.0", "triton": "3.6.0",
            "cuda": "12.8", "model": "sdxl",
            "case": "sdxl-1024", "label": "sdxl 1024 20x64", "batch": 2, "heads": 20, "head_dim": 64, "n_txt": 0,
            "n_img": 1024, "grid": "32x32", "layers": 60, "dtype": "fp16", "mask": "hair", "coverage": 0.25,
            "nnz": 266, "live_keys": 0.2598, "fd_tiles": 0.3125, "flops": 10 ** 10, "peak_mib": 5.0, "max_err": 1e-4,
            "tol": 1e-3, "sdpa_backend": "", "build_ms": None, "target": "", "note": "", "x_fasa": None}
    rows = []
    for prov, ms in (("fasa", 0.1), ("sdpa_bias", 0.2), ("authors", 2.0), ("flex", None)):
        rows.append({**base, "provider": prov, "ms": ms, "tflops": measure.tflops(10 ** 10, ms),
                     "status": "ok" if ms else "skip"})
    rows[1]["sdpa_backend"] = "mem_efficient"
    return rows


def test_targets_void_on_sdpa_math_and_tflops_on_flux_shapes():
    rows = _fake_rows()
    rows[1]["sdpa_backend"] = "math"
    annotate(rows)
    assert rows[1]["target"] == ">=1.3x: void (SDPA fell back to its math backend)"
    assert "TFLOP/s" not in rows[0]["target"]  # head dim 64, hair mask: no throughput target
    flux = [{**r, "head_dim": 128, "mask": "full", "coverage": 1.0} for r in _fake_rows()]
    flux[0]["tflops"] = 620.0
    annotate(flux)
    assert flux[0]["target"] == "mem O(N) ok; >=500 TFLOP/s ok"
    flux[0]["tflops"] = 300.0
    annotate(flux)
    assert flux[0]["target"].endswith(">=500 TFLOP/s MISS")


def test_csv_and_table_writers(tmp_path):
    rows = _fake_rows()
    annotate(rows)
    assert rows[1]["x_fasa"] == pytest.approx(2.0) and rows[1]["target"] == ">=1.3x ok"
    assert rows[2]["target"] == ">=10x ok" and rows[3]["target"] == ">=1.2x: n/a"
    assert rows[0]["target"].startswith("mem O(N) ok")
    path = report.write_csv(rows, tmp_path / "sub" / "bench.csv")
    back = report.read_csv(path)
    assert [r["provider"] for r in back] == ["fasa", "sdpa_bias", "authors", "flex"]
    assert all(r["device"] == "NVIDIA H100 80GB HBM3" and r["torch"] and r["triton"] for r in back)
    assert list(back[0]) == report.COLUMNS
    table = report.format_table(rows)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["case", "dtype", "mask", "cov"] and "mem_efficient" in table
    assert "31%" in table  # the fd_tiles column
    assert "2.00" in table
    # aligned columns: every cell of every row starts where its column's dash run starts
    starts = [m.start() for m in re.finditer(r"-+", lines[1])]
    assert len(starts) == len(report.TABLE)
    for line in [lines[0]] + [l for l in lines[2:] if l]:
        assert all(line[s] != " " and (s == 0 or line[s - 1] == " ") for s in starts), line
    assert report.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert report.device_slug("cpu x86_64 (2 threads)") == "cpu"
    png = report.plot(rows, tmp_path / "bench.png", title="t")
    if png is not None:
        assert png.stat().st_size > 1000


# --------------------------------------------------------------------------------------------------- e2e
def test_e2e_guard_and_eager_redirect(monkeypatch):
    from bench import e2e
    from freecure_ops import api

    if not torch.cuda.is_available():
        assert "CUDA" in e2e.why_not("cpu")
        assert e2e.run_e2e("unused", log=lambda s: None, device="cpu") == []
    fake = types.ModuleType("freecure_ops.adapters._fake_processor")
    fake.fasa_attention = api.fasa_attention
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    p = make_problem(TINY[0], torch.float32, 0.5, "cpu")
    with e2e.eager_attention() as calls:
        out = fake.fasa_attention(p.q, p.k_p, p.k_f, p.v_p, p.v_f, p.mask, p.omega, backend="auto")
    assert calls[0] == 1 and fake.fasa_attention is api.fasa_attention
    torch.testing.assert_close(out.double(), oracle(p, "fasa"), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------- main (smoke)
def test_main_smoke_run(tmp_path, capsys):
    from bench.__main__ import main

    rc = main(["--models", "sd15", "--coverages", "25", "--providers", "fasa,sdpa_bias,sdpa_pd", "--quick",
               "--masks", "hair,band,full", "--no-e2e", "--no-kernel-check", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    # run in rounds (hair 25% over every case, then full, then band), reported case by case
    first = [(r["case"], r["mask"]) for r in rows if r["provider"] == "sdpa_bias"][:3]
    assert [m for _, m in first] == ["hair", "band", "full"] and len({c for c, _ in first}) == 1
    assert {r["provider"] for r in rows} == {"fasa", "sdpa_bias", "sdpa_pd"}
    # 5 SD1.5 cases (4 shapes + the B=4 batch) x (hair 25%, band 25%, full)
    text = (tmp_path / "table.txt").read_text()
    assert sum(" sdpa_bias " in line for line in text.splitlines() if not line.startswith("#")) == 15
    assert text.splitlines()[-1].startswith("# done in ")  # the run's length, with the caveats on top
    if not torch.cuda.is_available():
        assert "KERNEL TIMINGS NEED CUDA" in text and "REDUCED" in text and "CPU ratios say nothing about GPUs" in text
    assert all(r["device"] and r["torch"] and r["triton"] for r in rows)
    if not torch.cuda.is_available():
        assert "KERNEL TIMINGS NEED CUDA" in out and "REDUCED" in out and "fp32" in out
        assert all(r["status"] == "skip" for r in rows if r["provider"] == "fasa")
    assert all(r["status"] == "ok" for r in rows if r["provider"] != "fasa")


def test_cpu_defaults_and_named_output_folder(tmp_path, monkeypatch):
    from bench.__main__ import CPU_MASKS, CPU_PROVIDERS, DEFAULT_OUT, main, parse_args

    assert str(parse_args([]).out) == DEFAULT_OUT == "bench_out"  # never the current folder itself
    assert "fasa[torch]" in CPU_PROVIDERS and "sdpa_bias" in CPU_PROVIDERS and CPU_MASKS == ("hair", "full")
    if torch.cuda.is_available():
        return
    monkeypatch.chdir(tmp_path)
    from dataclasses import replace

    monkeypatch.setattr("bench.__main__.reduced", lambda c: replace(TINY[0], name=c.name))
    assert main(["--models", "sd15", "--quick", "--no-e2e", "--no-kernel-check"]) == 0
    rows = list(csv.DictReader(open(tmp_path / DEFAULT_OUT / "bench.csv")))
    assert {r["provider"] for r in rows} == set(CPU_PROVIDERS) and {r["mask"] for r in rows} == {"hair", "full"}
    torch_rows = [r for r in rows if r["provider"] == "fasa[torch]"]
    assert torch_rows and all(r["status"] == "ok" and float(r["x_fasa"]) == 1.0 for r in torch_rows)
    assert all(r["vs_bias"] for r in rows if r["status"] == "ok")
    assert "vs bias" in (tmp_path / DEFAULT_OUT / "table.txt").read_text()


def test_cli_rejects_unknown_names():
    from bench.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--providers", "fasa,cudnn"])
    assert parse_args(["--coverages", "10,0.5,100%"]).coverages == [0.1, 0.5, 1.0]


def test_e2e_variants_on_tiny_models():
    """The end-to-end variants (stock / fasa / eager) on tiny SDXL-style and FLUX-style models on CPU."""
    pytest.importorskip("diffusers")
    adapters = pytest.importorskip("freecure_ops.adapters")
    if not hasattr(adapters, "install_fasa"):
        pytest.skip("freecure_ops.adapters.install_fasa not there yet")
    from bench import e2e
    from bench.configs import FLUX_DEV, SDXL_UNET

    timing = {"cpu_max_reps": 1, "cpu_budget_s": 0.0}
    unet_cfg = dict(SDXL_UNET, block_out_channels=(32, 64), layers_per_block=1, transformer_layers_per_block=(1, 1),
                    attention_head_dim=(2, 4), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 48, norm_num_groups=8,
                    sample_size=16)
    unet = e2e.build_unet(unet_cfg, "cpu", torch.float32)
    inputs = e2e.unet_inputs(unet_cfg, 4, (16, 12), "cpu", torch.float32)
    mask = parsing_map(16, 12, 0.25) == HAIR
    rows = e2e._variants(unet, inputs, mask, "cfg", adapters.install_fasa, torch.device("cpu"), timing,
                         lambda s: None, "sdxl-tiny")
    assert [r["variant"] for r in rows] == ["stock", "fasa", "eager"] and all(r["ms"] for r in rows), rows
    flux_cfg = dict(FLUX_DEV, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                    joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6), in_channels=16)
    flux = e2e.build_flux(flux_cfg, "cpu", torch.float32)
    inputs = e2e.flux_inputs(flux_cfg, 2, (4, 6), 8, "cpu", torch.float32)
    rows = e2e._variants(flux, inputs, parsing_map(4, 6, 0.5) == HAIR, "plain", adapters.install_fasa,
                         torch.device("cpu"), timing, lambda s: None, "flux-tiny")
    assert all(r["ms"] and "NON-FINITE" not in r["note"] for r in rows), rows


# ------------------------------------------------------------------------------ mask kinds and FD work
@pytest.mark.parametrize("kind", ["hair", "band"])
@pytest.mark.parametrize("coverage", [0.10, 0.25, 0.50])
def test_mask_kinds_reach_their_coverage(kind, coverage):
    mask, got = case_mask((64, 64), coverage, 0, kind)
    assert mask.dtype == torch.bool and mask.shape == (4096,)
    assert abs(got - coverage) <= 0.02 and got == mask.float().mean().item()
    rows_touched = mask.view(64, 64).any(dim=1).float().mean().item()
    if kind == "hair":
        assert coverage > 0.2 or rows_touched > 0.3   # blobs spread over the rows
        assert coverage < 0.2 or rows_touched > 0.85  # 25%: nearly every 64-key row tile is touched
    else:
        assert rows_touched <= coverage + 0.1         # a band spans few rows
    full, got = case_mask((8, 6), 0.3, 0, "full")
    assert full.all() and got == 1.0
    with pytest.raises(ValueError, match="unknown mask kind"):
        case_mask((8, 8), 0.25, 0, "beard")


def test_mask_configs_run_full_once():
    from bench.runner import mask_configs

    assert mask_configs(["hair", "band", "full"], [0.1, 0.25, 1.0]) == [
        ("hair", 0.1), ("hair", 0.25), ("band", 0.1), ("band", 0.25), ("full", 1.0)]
    assert mask_configs(["hair"], [0.25, 1.0]) == [("hair", 0.25), ("hair", 1.0)]


@pytest.mark.parametrize("case", cases_for(["sd15", "sdxl", "flux"]), ids=lambda c: c.name)
def test_fd_tiles_follow_live_keys_at_real_shapes(case):
    # The packed FD loop visits ceil(nnz / BLOCK_N) of the ceil(Nimg / BLOCK_N) FD tiles: at the 25% hair mask
    # at most the live-key fraction plus one tile of rounding, where tile skipping visited ~92%.
    from bench.runner import fd_work
    from freecure_ops.kernels.fasa_fwd import head_dim_split, tile_config

    d0, d1 = head_dim_split(case.head_dim)
    block_n = tile_config(d0 + d1, 2, case.n_q, case.heads, case.batch)[1]
    for kind in ("hair", "band"):
        mask, _ = case_mask(case.grid, 0.25, 0, kind)
        nnz = int(mask.sum())
        live_keys, fd_tiles = fd_work(case, nnz, 2)
        n_tiles = -(-case.n_img // block_n)
        assert live_keys == round(nnz / case.n_img, 4)
        assert fd_tiles == round(-(-nnz // block_n) / n_tiles, 4)
        assert fd_tiles <= live_keys + 1 / n_tiles + 1e-4


def test_bench_rows_carry_live_keys_and_fd_tiles(tmp_path):
    from bench.__main__ import main

    rc = main(["--models", "sdxl", "--coverages", "25", "--masks", "hair,full", "--providers", "sdpa_bias",
               "--quick", "--no-e2e", "--no-kernel-check", "--out", str(tmp_path)])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    assert {(r["mask"], r["coverage"]) for r in rows} == {("hair", "0.25"), ("full", "1.0")}
    for r in rows:
        assert float(r["live_keys"]) == round(int(r["nnz"]) / int(r["n_img"]), 4)
        assert 0 < float(r["live_keys"]) <= float(r["fd_tiles"]) <= 1.0
        if r["mask"] == "full":
            assert float(r["live_keys"]) == float(r["fd_tiles"]) == 1.0
    table = (tmp_path / "table.txt").read_text()
    assert "fd tiles" in table and "full" in table


def test_host_overhead_tool_runs_and_restores_the_launch():
    import sys as _sys

    import freecure_ops.kernels.fasa_fwd  # noqa: F401
    from bench.host_overhead import measure, no_launch

    module = _sys.modules["freecure_ops.kernels.fasa_fwd"]
    real = module._fasa_fwd_kernel
    rows = measure(calls=3, log=lambda s: None)
    assert module._fasa_fwd_kernel is real
    assert {r["case"] for r in rows} >= {"sd15-4096", "sdxl-1024", "flux-512+4096"}
    assert all(r["what"] == "before launch" and r["us"] > 0 for r in rows)
    with no_launch():
        assert module._fasa_fwd_kernel is not real
    assert module._fasa_fwd_kernel is real


def test_tile_sweep_summary_and_cpu_exit(capsys):
    from bench.tile_sweep import CANDIDATES, distinct_cases, main, summary

    names = [c.name for c in distinct_cases()]
    assert "sd15-4096" in names and "flux-512+4096" in names and "sdxl-1024-b4" in names
    assert len(set(CANDIDATES)) == len(CANDIDATES)
    rows = [{"case": "sdxl-1024", "mask": "hair", "config": cfg, "table": table, "ms": ms, "status": st}
            for cfg, table, ms, st in (("64x64x4x3", True, 0.20, "ok"), ("128x64x8x3", False, 0.10, "ok"),
                                       ("128x128x8x3", False, None, "error"))]
    text = summary(rows)
    assert "64x64x4x3" in text and "128x64x8x3" in text and "2.00" in text
    if not torch.cuda.is_available():
        assert main([]) == 0 and "no CUDA device" in capsys.readouterr().out


def test_whole_generation_three_ways_on_a_tiny_pipeline():
    """The authors' structure runs 4 branch-passes, ours recomputing 3, ours with FD reuse 2 (CPU, tiny SD1.5)."""
    from bench import e2e
    from tiny_pipes import IMAGE, FakeParser, tiny_sd_pipe

    rows = e2e.whole_generation(tiny_sd_pipe(), FakeParser(), "a photo of sks man with red hair",
                                "a photo of man with red hair",
                                dict(num_inference_steps=2, height=IMAGE, width=IMAGE, seed=0), device="cpu",
                                fc_kwargs=dict(layers="all", omega=2.0))
    got = {r["variant"]: r for r in rows}
    assert [got[v]["branch_passes"] for v in ("authors", "recompute", "reuse")] == [4.0, 3.0, 2.0]
    assert got["reuse"]["fd_reuse"] == "device" and got["recompute"]["fd_reuse"] == "off"
    assert all(r["s"] > 0 for r in rows)


def test_tile_sweep_compiles_each_distinct_kernel_once_in_worker_processes():
    from bench.shapes import Case
    from bench.tile_sweep import compile_jobs, distinct_cases, precompile

    cases = distinct_cases()
    weight = [c.layers * c.n_q * (c.n_p + c.n_f) * c.heads * c.head_dim for c in cases]
    assert weight == sorted(weight, reverse=True) and cases[0].name == "flux-512+4096"
    jobs = compile_jobs(cases, lambda c: [(64, 64, 4, 3), (128, 64, 8, 3)])
    # one job per (head dim, text or not, config): SD1.5 40/80/160, SDXL 64, FLUX 128 with text
    assert len(jobs) == 2 * 5 and len(set(jobs)) == len(jobs)
    # Workers launch the kernel (here: in the interpreter, on a tiny case); a config that cannot launch
    # is reported, not fatal, and the pool stops at its deadline.
    tiny = Case("sd15", "tiny", 1, 2, 16, (4, 4))
    logs = []
    failed = precompile([(tiny, (16, 16, 1, 1)), (tiny, (16, 24, 1, 1))], 2, time.perf_counter() + 120,
                        device="cpu", log=logs.append)
    assert list(failed) == [(tiny, (16, 24, 1, 1))], failed  # BLOCK_N 24: not a power of two
    assert "precompiled 2/2 kernels in 2 processes" in logs[0] and "1 failed" in logs[0]
    assert precompile([(tiny, (16, 16, 1, 1))], 0, time.perf_counter() + 1, device="cpu") == {}
    # past the deadline the workers are stopped, not left compiling beside the timings
    logs.clear()
    assert precompile([(tiny, (16, 16, 1, 1))], 1, time.perf_counter(), device="cpu", log=logs.append) == {}
    assert "precompiled 0/1 kernels" in logs[0]
