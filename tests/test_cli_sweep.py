"""``freecure sweep`` (issue 28 item 1) on a tiny SD pipeline saved to a temporary folder (offline), in-process
through ``main()``: one pass 1 per seed, pass 2 per (seed, omega), the contact sheet, the single images (the
ones ``freecure generate`` makes), sweep.json, ``--pipeline`` entry points, and its errors before any load."""
from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from freecure_ops.cli import main
from freecure_ops.cli.contact_sheet import contact_sheet, mask_overlay, sheet_layout
from tiny_pipes import IMAGE, count_sd_calls, install_stub_parser, tiny_sd_pipe, write_cli_inputs

PD = "a photo of sks man with red hair"
FD = "a photo of man with red hair"
OMEGAS, SEEDS = [0.5, 1.0, 2.5], [0, 3]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    write_cli_inputs(root)
    torch.save({"stub": torch.zeros(1)}, root / "79999_iter.pth")  # a real checkpoint file (its header is checked)
    (root / "my_pipes.py").write_text(textwrap.dedent("""
        from tiny_pipes import tiny_sd_pipe, tiny_sdxl_pipe

        SEEN = []
        NOT_CALLABLE = 3

        def same(base):                 # the --model pipeline, with a pass-2 argument only Python can give
            SEEN.append(base)
            return base, {"cross_attention_kwargs": {"scale": 1.0}}

        def fresh():                    # no arguments: builds its own pipeline
            return tiny_sd_pipe()

        def not_a_pipe(base):
            return 42

        def sdxl(base):
            return tiny_sdxl_pipe()

        def raises(base):
            raise RuntimeError("no weights here")

        def two(a, b):
            return a
    """))
    return root


@pytest.fixture
def stub_parser(monkeypatch):
    return install_stub_parser(monkeypatch)


def _args(root, out, *extra, model="tiny-sd", omegas=OMEGAS, seeds=SEEDS):
    base = ["sweep", "--prompt", PD, "--fd-prompt", FD, "--steps", "2", "--height", str(IMAGE), "--width",
            str(IMAGE), "--layers", "all", "--backend", "torch", "--quiet", "--out", str(out),
            "--omegas", ",".join(map(str, omegas)), "--seeds", ",".join(map(str, seeds))]
    if model is not None:
        base += ["--model", str(root / model)]
    if not {"--mask", "--parser-weights"} & set(extra):
        base += ["--parser-weights", str(root / "79999_iter.pth")]
    return base + list(extra)


@pytest.fixture(scope="module")
def swept(files, tmp_path_factory):
    """One sweep (3 omegas x 2 seeds) with the stub parser and a pipeline-call counter:
    ``(out folder, prompts of every pipeline call, parser)``. No --fd-prompt: the FD prompt is PD without the
    default --identity-words (sks), i.e. FD, as generate and demo derive it."""
    out = tmp_path_factory.mktemp("swept") / "out"
    args = _args(files, out)
    del args[args.index("--fd-prompt"):args.index("--fd-prompt") + 2]
    with pytest.MonkeyPatch.context() as mp:
        parser = install_stub_parser(mp)
        prompts = count_sd_calls(mp)
        assert main(args) == 0
    return out, prompts, parser


def _img(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_pass_1_runs_once_per_seed_and_pass_2_once_per_image(swept):
    out, prompts, parser = swept
    assert prompts.count(FD) == len(SEEDS) and parser.calls == len(SEEDS)
    assert prompts.count(PD) == len(SEEDS) * len(OMEGAS) and len(prompts) == len(SEEDS) * (1 + len(OMEGAS))
    t = json.loads((out / "sweep.json").read_text())["timings_s"]
    assert t["pass1"]["runs"] == len(SEEDS) and [p["seed"] for p in t["pass1"]["per_seed"]] == SEEDS
    assert t["pass2"]["runs"] == len(SEEDS) * len(OMEGAS)
    assert [(p["seed"], p["omega"]) for p in t["pass2"]["per_image"]] == [(s, w) for s in SEEDS for w in OMEGAS]
    assert t["pass1"]["total"] == pytest.approx(sum(p["s"] + p["mask_s"] for p in t["pass1"]["per_seed"]), abs=1e-3)
    assert t["pass2"]["total"] == pytest.approx(sum(p["s"] for p in t["pass2"]["per_image"]), abs=1e-3)
    assert t["total"] >= t["pass1"]["total"] + t["pass2"]["total"] > 0


def test_files_and_record(swept, files):
    out, _, _ = swept
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    singles = {f"images/seed{s}_omega{w:g}.png" for s in SEEDS for w in OMEGAS}
    assert names == singles | {f"fd/seed{s}.png" for s in SEEDS} | {f"mask/seed{s}.png" for s in SEEDS} \
        | {"sweep.png", "sweep.json"}                                          # no temporary files left
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["complete"] and meta["error"] is None and meta["command"] == "sweep"
    assert meta["omegas"] == OMEGAS and meta["seeds"] == SEEDS and meta["family"] == "sd1"
    assert meta["prompt"] == PD and meta["fd_prompt"] == FD and meta["attributes"] == [["hair"]]
    assert meta["layers"] == [0, 1, 2, 3] and meta["backend"] == "torch" and meta["guidance_scale"] == 7.5
    assert meta["steps"] == 2 and meta["height"] == IMAGE and meta["mask_source"] == "parser"
    assert meta["weights"]["model"]["path"] == str(files / "tiny-sd") and meta["sheet"] == "sweep.png"
    assert {c["file"] for c in meta["images"]} == singles
    assert [(f["seed"], f["fd"], f["mask"]) for f in meta["foundations"]] == \
        [(s, f"fd/seed{s}.png", f"mask/seed{s}.png") for s in SEEDS]
    assert all(f["fd_reuse"]["choice"] in ("device", "host") for f in meta["foundations"])
    mask = np.asarray(Image.open(out / "mask/seed0.png"))
    assert (mask[: IMAGE // 2] == 255).all() and (mask[IMAGE // 2:] == 0).all()


def test_contact_sheet_cells_are_the_images(swept):
    out, _, _ = swept
    rows = ["FD", "FD + mask"] + [f"omega {w:g}" for w in OMEGAS]
    layout = sheet_layout((IMAGE, IMAGE), rows, [f"seed {s}" for s in SEEDS])
    assert (layout.rows, layout.cols) == (2 + len(OMEGAS), len(SEEDS))
    sheet = Image.open(out / "sweep.png").convert("RGB")
    assert sheet.size == layout.size
    for c, s in enumerate(SEEDS):
        fd = _img(out / f"fd/seed{s}.png")
        assert (np.asarray(sheet.crop(layout.cell_box(0, c)), dtype=np.int16) == fd).all()
        over = np.asarray(sheet.crop(layout.cell_box(1, c)), dtype=np.int16)
        assert (over[IMAGE // 2 + 1:] == fd[IMAGE // 2 + 1:]).all()          # no mask: the FD image
        assert (over[: IMAGE // 2 - 1] != fd[: IMAGE // 2 - 1]).any(axis=-1).all()  # the mask: tinted
        for r, w in enumerate(OMEGAS, start=2):
            cell = np.asarray(sheet.crop(layout.cell_box(r, c)), dtype=np.int16)
            assert (cell == _img(out / f"images/seed{s}_omega{w:g}.png")).all(), (s, w)
    # the labels are drawn: ink left of the first image row and above the first column
    ink = np.asarray(sheet.convert("L"))
    x0, y0, _, y1 = layout.cell_box(0, 0)
    assert (ink[y0:y1, :x0] < 128).any() and (ink[:y0, x0:] < 128).any()


def test_the_omegas_change_the_image(swept):
    out, _, _ = swept
    for s in SEEDS:
        imgs = [_img(out / f"images/seed{s}_omega{w:g}.png") for w in OMEGAS]
        for i in range(len(imgs)):
            for j in range(i + 1, len(imgs)):
                assert (imgs[i] != imgs[j]).any(), (s, OMEGAS[i], OMEGAS[j])
    assert (_img(out / "fd/seed0.png") != _img(out / "fd/seed3.png")).any()   # the seeds change the foundation


@pytest.mark.parametrize("seed,omega", [(3, 2.5), (0, 0.5)])
def test_an_image_is_the_one_generate_makes(swept, files, tmp_path, stub_parser, seed, omega):
    out, _, _ = swept
    gen = tmp_path / "gen"
    args = ["generate", "--model", str(files / "tiny-sd"), "--prompt", PD, "--fd-prompt", FD, "--steps", "2",
            "--height", str(IMAGE), "--width", str(IMAGE), "--layers", "all", "--backend", "torch", "--quiet",
            "--parser-weights", str(files / "79999_iter.pth"), "--omega", str(omega), "--seed", str(seed),
            "--out", str(gen)]
    assert main(args) == 0
    assert np.abs(_img(gen / "pd.png") - _img(out / f"images/seed{seed}_omega{omega:g}.png")).max() <= 1
    assert (_img(gen / "fd.png") == _img(out / f"fd/seed{seed}.png")).all()


def test_with_a_mask_file_it_is_generate_s_image_too(files, tmp_path):
    """--mask: generate skips pass 1 (PD and FD in one batch), the sweep still runs it (pass 2 reads its
    keys/values): the same image."""
    out, gen = tmp_path / "sweep", tmp_path / "gen"
    assert main(_args(files, out, "--mask", str(files / "mask.png"), omegas=[2.0], seeds=[1])) == 0
    args = ["generate", "--model", str(files / "tiny-sd"), "--prompt", PD, "--fd-prompt", FD, "--steps", "2",
            "--height", str(IMAGE), "--width", str(IMAGE), "--layers", "all", "--backend", "torch", "--quiet",
            "--mask", str(files / "mask.png"), "--omega", "2", "--seed", "1", "--out", str(gen)]
    assert main(args) == 0
    assert np.abs(_img(gen / "pd.png") - _img(out / "images/seed1_omega2.png")).max() <= 1
    assert (_img(gen / "mask.png") == _img(out / "mask/seed1.png")).all()
    assert json.loads((out / "sweep.json").read_text())["mask_source"] == str(files / "mask.png")


def test_a_pass_2_failure_is_one_line_naming_the_flag(files, tmp_path, capsys, stub_parser):
    """A pass-2 argument the pipeline rejects: one line naming --pd-kwargs; the foundation is kept."""
    out = tmp_path / "out"
    assert main(_args(files, out, "--pd-kwargs", '{"timesteps": [999, 1]}', seeds=[0])) == 2
    err = capsys.readouterr().err
    assert err.startswith("freecure: error: --pd-kwargs: pass 2 (seed 0, omega 0.5): ") and err.count("\n") == 1
    meta = json.loads((out / "sweep.json").read_text())
    assert not meta["complete"] and meta["images"] == [] and (out / "fd/seed0.png").is_file()


# ---- --pipeline module:function -------------------------------------------------------------------------

@pytest.fixture
def entry_module(files, monkeypatch):
    """``my_pipes`` importable from the current folder (as `freecure` run there finds it); sys.path and the
    module cache are restored afterwards."""
    monkeypatch.chdir(files)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield "my_pipes"
    sys.modules.pop("my_pipes", None)


def test_pipeline_with_model_gets_the_base_pipeline(files, swept, tmp_path, stub_parser, entry_module):
    out = tmp_path / "pm"
    assert main(_args(files, out, "--pipeline", f"{entry_module}:same", "--pd-kwargs",
                      '{"guidance_rescale": 0.0}')) == 0
    seen = sys.modules[entry_module].SEEN
    assert len(seen) == 1 and type(seen[0]).__name__ == "StableDiffusionPipeline"
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["pipeline"] == f"{entry_module}:same" and meta["pass2_pipeline"] == "StableDiffusionPipeline"
    assert meta["pd_kwargs"] == {"cross_attention_kwargs": {"scale": 1.0}, "guidance_rescale": 0.0}
    assert stub_parser.calls == len(SEEDS)
    for s in SEEDS:  # pass 2 on the base pipeline with neutral extra arguments: the plain sweep's images
        for w in OMEGAS:
            name = f"images/seed{s}_omega{w:g}.png"
            assert (_img(out / name) == _img(swept[0] / name)).all(), name


def test_pipeline_from_a_file_without_model(files, swept, tmp_path, stub_parser):
    out = tmp_path / "own"
    assert main(_args(files, out, "--pipeline", f"{files / 'my_pipes.py'}:fresh", model=None)) == 0
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["model"] is None and meta["weights"]["model"] is None and meta["device"] == "cpu"
    for s in SEEDS:  # the same weights, built in memory: the same images
        for w in OMEGAS:
            name = f"images/seed{s}_omega{w:g}.png"
            assert np.abs(_img(out / name) - _img(swept[0] / name)).max() <= 1, name


# ---- errors ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,expect", [
    (["--omegas", "0.5,nan"], "--omegas must be a finite number"),
    (["--omegas", "1,1e39"], "--omegas"),
    (["--omegas", ""], "argument --omegas: expected comma-separated numbers, got an empty list"),
    (["--omegas", "1,1.0"], "argument --omegas: 1.0 given twice"),
    (["--omegas", "1,big"], "argument --omegas"),
    (["--seeds", "0,0"], "argument --seeds: 0 given twice"),
    (["--seeds", "1.5"], "argument --seeds"),
    (["--seeds", str(2 ** 64)], "--seeds must fit a 64-bit integer"),
    (["--pipeline", "no_such_module_fc28:load"], "--pipeline no_such_module_fc28:load: no module named"),
    (["--pipeline", "my_pipes:missing"], "my_pipes has no missing"),
    (["--pipeline", "my_pipes:NOT_CALLABLE"], "NOT_CALLABLE is a int, not a function"),
    (["--pipeline", "my_pipes:two"], "must take one argument"),
    (["--pipeline", "my_pipes"], "expected module:function"),
    (["--pipeline", "nowhere/x.py:load"], "no such file"),
    (["--pd-kwargs", "[1]"], "argument --pd-kwargs: expected a JSON object"),
    (["--pd-kwargs", "{oops"], "argument --pd-kwargs: not JSON"),
    (["--pd-kwargs", '{"prompt": "x"}'], "--pd-kwargs sets prompt"),
    (["--steps", "0"], "--steps"),
    (["--style-fidelity", "2"], "--style-fidelity"),
    (["--out", "{root}/mask.png"], "--out"),
    (["--mask", "{root}/nothing.png"], "--mask"),
    (["--prompt", "a photo of sks man"], "--prompt names none of the attributes"),
    (["--no-model"], "give --model"),
    (["--no-model", "--pipeline", "my_pipes:fresh", "--device", "cpu"], "--device applies to --model"),
    (["--no-model", "--pipeline", "my_pipes:fresh", "--revision", "v1"], "--revision applies to --model"),
])
def test_errors_are_one_line_before_anything_loads(files, tmp_path, capsys, entry_module, extra, expect):
    """The broken model would fail to load naming --model: each error here comes first, and creates nothing."""
    extra = [e.replace("{root}", str(files)) for e in extra]
    no_model = "--no-model" in extra
    extra = [e for e in extra if e != "--no-model"]
    args = _args(files, tmp_path / "out", *extra, model=None if no_model else "broken-model")
    for flag in ("--prompt", "--omegas", "--seeds", "--out"):  # given again: drop _args' own (the first)
        if args.count(flag) == 2:
            i = args.index(flag)
            del args[i:i + 2]
    if expect.startswith("argument"):
        with pytest.raises(SystemExit) as e:
            main(args)
        rc = e.value.code
    else:
        rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("freecure: error: ") and err.count("\n") == 1 and expect in err, err
    assert "could not load" not in err and not (tmp_path / "out").exists(), err


def test_the_broken_model_fails_at_the_load(files, tmp_path, capsys, stub_parser):
    """The control of the test above: good flags with the broken model fail when it loads, naming --model."""
    assert main(_args(files, tmp_path / "out", model="broken-model")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"freecure: error: --model {files / 'broken-model'}: could not load"), err


@pytest.mark.parametrize("function,expect", [
    ("not_a_pipe", "--pipeline my_pipes:not_a_pipe returned a int, not a diffusers pipeline"),
    ("raises", "--pipeline my_pipes:raises raised RuntimeError: no weights here (my_pipes.py:"),
    ("sdxl", "StableDiffusionXLPipeline holds a sdxl model, --model a sd1 model"),
])
def test_what_the_function_returns_is_checked_before_pass_1(files, tmp_path, capsys, stub_parser, entry_module,
                                                            function, expect):
    assert main(_args(files, tmp_path / "out", "--pipeline", f"{entry_module}:{function}")) == 2
    err = capsys.readouterr().err
    assert err.startswith("freecure: error: ") and err.count("\n") == 1 and expect in err, err
    assert stub_parser.calls == 0 and not (tmp_path / "out").exists()


def test_pd_kwargs_the_pipeline_does_not_name(files, tmp_path, capsys, stub_parser):
    """diffusers' SD pipeline takes **kwargs and drops unknown ones silently: a warning names them (a typo would
    otherwise sweep nothing); a pipeline without **kwargs is refused before pass 1."""
    from freecure_ops.cli.entry_point import unnamed_kwargs

    assert main(_args(files, tmp_path / "out", "--pd-kwargs", '{"start_merge_step": 10}', seeds=[0],
                      omegas=[1.0])) == 0
    err = capsys.readouterr().err
    assert "freecure: warning: --pd-kwargs: StableDiffusionPipeline.__call__ takes no start_merge_step by name" in err

    class Strict:
        def __call__(self, prompt, latents=None, start_merge_step=0):
            pass

    assert unnamed_kwargs(Strict(), {"start_merge_step": 1, "strat": 2}) == (["strat"], True)
    assert unnamed_kwargs(tiny_sd_pipe(), {"guidance_rescale": 0.0, "strat": 2}) == (["strat"], False)


def test_a_failed_seed_keeps_what_was_made(files, tmp_path, capsys, stub_parser):
    """The second seed's mask is empty: exit 2 naming it, and seed 0's images, the sheet of what was made and
    sweep.json (incomplete, with the error) are all written."""
    stub_parser.empty_from = 2
    out = tmp_path / "out"
    assert main(_args(files, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("freecure: error: --seeds 3: ") and "empty" in err and err.count("\n") == 1, err
    meta = json.loads((out / "sweep.json").read_text())
    assert not meta["complete"] and meta["error"].startswith("--seeds 3: ") and meta["sheet"] == "sweep.png"
    assert [c["file"] for c in meta["images"]] == [f"images/seed0_omega{w:g}.png" for w in OMEGAS]
    assert meta["timings_s"]["pass1"]["runs"] == 1 and all((out / c["file"]).is_file() for c in meta["images"])
    assert not (out / "images" / "seed3_omega1.png").exists()
    layout = sheet_layout((IMAGE, IMAGE), ["FD", "FD + mask"] + [f"omega {w:g}" for w in OMEGAS],
                          [f"seed {s}" for s in SEEDS])
    sheet = np.asarray(Image.open(out / "sweep.png").convert("RGB"))
    x0, y0, x1, y1 = layout.cell_box(2, 1)
    assert (sheet[y0:y1, x0:x1] == 200).all()                                  # the missing cell: grey


def test_a_second_sweep_removes_the_first_ones_images_only(files, tmp_path, stub_parser):
    out = tmp_path / "out"
    assert main(_args(files, out, omegas=[1.0, 2.0], seeds=[0, 1])) == 0
    (out / "notes.txt").write_text("mine")
    assert main(_args(files, out, omegas=[1.0], seeds=[0])) == 0
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == ["fd/seed0.png", "images/seed0_omega1.png", "mask/seed0.png", "notes.txt", "sweep.json",
                     "sweep.png"]


# ---- the contact sheet --------------------------------------------------------------------------------

def test_labels_scale_with_the_images():
    small = sheet_layout((64, 64), ["omega 1"], ["seed 0"])
    large = sheet_layout((1024, 1024), ["omega 1"], ["seed 0"])
    assert small.font_px == 12 and large.font_px == 64
    assert large.label_h >= 4 * small.label_h and large.label_w >= 4 * small.label_w
    # a label wider than its thumbnail widens the column instead of running into the next one
    tiny = sheet_layout((8, 8), ["omega 1"], ["seed 123456"])
    assert tiny.col_w > 8 and tiny.cell_box(0, 0)[2] <= tiny.cell_box(0, 1)[0]
    sheet, layout = contact_sheet([[Image.new("RGB", (1024, 1024), (90, 60, 30))]], ["omega 1"], ["seed 0"])
    ink = np.asarray(sheet.convert("L"))
    rows = np.nonzero((ink[: layout.label_h] < 128).any(axis=1))[0]
    assert rows.max() - rows.min() >= 40                                      # the column label is big text


def test_mask_overlay_tints_the_masked_pixels_only():
    img = Image.new("RGB", (32, 32), (100, 100, 100))
    m = np.zeros((8, 8), np.float32)
    m[:4] = 0.25                                                               # any scale: brightest = masked
    over = np.asarray(mask_overlay(img, m), dtype=np.int16)
    assert (over[20:] == 100).all() and (over[:12] != 100).any(axis=-1).all()
