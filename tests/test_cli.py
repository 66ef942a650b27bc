"""The ``freecure`` command line on a tiny SD pipeline saved to a temporary folder (offline)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from freecure_ops.cli import main
from tiny_pipes import IMAGE, tiny_sd_pipe  # noqa: F401

PD = "a photo of sks man with red hair"
FD = "a photo of man with red hair"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipe().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mask_png(tmp_path_factory):
    m = np.zeros((IMAGE, IMAGE), np.uint8)
    m[: IMAGE // 2] = 255
    path = tmp_path_factory.mktemp("mask") / "hair.png"
    Image.fromarray(m, mode="L").save(path)
    return path


def _args(model_dir, out, *extra):
    return ["generate", "--model", str(model_dir), "--prompt", PD, "--fd-prompt", FD, "--steps", "2", "--seed", "0",
            "--height", str(IMAGE), "--width", str(IMAGE), "--layers", "all", "--quiet", "--out", str(out), *extra]


def test_generate_writes_images_mask_and_metadata(model_dir, mask_png, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(model_dir, out, "--mask", str(mask_png), "--omega", "2.0")) == 0
    for name in ("pd.png", "fd.png", "mask.png"):
        assert Image.open(out / name).size == (IMAGE, IMAGE)
    saved = np.array(Image.open(out / "mask.png"))
    assert (saved[: IMAGE // 2] == 255).all() and (saved[IMAGE // 2:] == 0).all()
    meta = json.loads((out / "freecure.json").read_text())
    assert meta["family"] == "sd1" and meta["attributes"] == [["hair"]] and meta["fasa_applied"]
    assert set(meta["timings_s"]) >= {"pass2", "total"}
    # a given mask skips pass 1, so there is nothing to record: FD reuse is off and says why
    assert meta["fd_reuse"]["requested"] == "auto" and meta["fd_reuse"]["choice"] == "off"
    assert "mask given" in meta["fd_reuse"]["reason"]
    assert "wrote pd.png, fd.png, mask.png" in capsys.readouterr().out


def test_generate_with_apg(model_dir, mask_png, tmp_path):
    out = tmp_path / "apg"
    assert main(_args(model_dir, out, "--mask", str(mask_png), "--apg", "--steps", "4")) == 0
    meta = json.loads((out / "freecure.json").read_text())
    assert meta["template_prompts"] == ["a photo of sks man"] and "apg" in meta["timings_s"]
    assert Image.open(out / "pd.png").size == (IMAGE, IMAGE)


@pytest.fixture
def stub_parser(monkeypatch, tmp_path):
    """--parser-weights PATH loads this parser (hair on the top half, nothing else); returns (weights, parser)."""
    import freecure_ops.pipeline.face_parser as fp

    class Stub:
        labels = dict(fp.BISENET_CELEBAMASK_LABELS)
        hair = True
        calls = 0

        def __call__(self, image):
            Stub.calls += 1
            lm = torch.zeros(image.shape[-2:], dtype=torch.int64)
            if self.hair:
                lm[: IMAGE // 2] = 17
            return lm

    parser = Stub()
    monkeypatch.setattr(fp.BiSeNetParser, "from_checkpoint", classmethod(lambda cls, path, **kw: parser))
    weights = tmp_path / "79999_iter.pth"
    torch.save({"stub": torch.zeros(1)}, weights)  # a real checkpoint file: the CLI checks its header first
    return weights, parser


def test_generate_with_a_parser(model_dir, tmp_path, stub_parser):
    weights, parser = stub_parser
    out = tmp_path / "parsed"
    assert main(_args(model_dir, out, "--parser-weights", str(weights))) == 0
    assert parser.calls == 1 and (np.array(Image.open(out / "mask.png"))[: IMAGE // 2] == 255).all()


def test_prompt_without_attribute_words_runs_the_plain_pipeline(model_dir, tmp_path, capsys, stub_parser):
    weights, parser = stub_parser
    out = tmp_path / "plain"
    args = _args(model_dir, out, "--parser-weights", str(weights))
    args[args.index("--prompt") + 1] = "a photo of sks man"
    args[args.index("--fd-prompt") + 1] = "a photo of man"
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "freecure: warning: " in err and "FASA has nothing to do" in err
    meta = json.loads((out / "freecure.json").read_text())
    assert not meta["fasa_applied"] and meta["files"] == ["pd.png"] and parser.calls == 0


@pytest.mark.parametrize("case,expect", [
    ("missing_model", "no such folder"),
    ("not_a_pipeline", "no model_index.json"),
    ("hub_id_not_cached", "not (completely) in the Hugging Face cache"),
    ("missing_parser", "--parser-weights"),
    ("missing_mask", "--mask"),
    ("no_mask_source", "give --mask PNG or --parser-weights"),
])
def test_generate_errors_are_one_line(case, expect, model_dir, mask_png, tmp_path, capsys, monkeypatch):
    model, extra = str(model_dir), ["--mask", str(mask_png)]
    if case == "missing_model":
        model = str(tmp_path / "nowhere" / "model")
    elif case == "not_a_pipeline":
        model = str(tmp_path)
    elif case == "hub_id_not_cached":  # an empty cache, offline: nothing is downloaded
        from hub_cache import HubCache, offline_hub

        offline_hub(monkeypatch, HubCache(tmp_path / "hub").root)
        model = "no-such-org/no-such-model-freecure-test"
    elif case == "missing_parser":
        extra = ["--parser-weights", str(tmp_path / "79999_iter.pth")]
    elif case == "missing_mask":
        extra = ["--mask", str(tmp_path / "none.png")]
    elif case == "no_mask_source":
        extra = []
    args = _args(model_dir, tmp_path / "out", *extra)
    args[args.index("--model") + 1] = model
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("freecure: error:") and expect in err and err.count("\n") == 1


def test_unknown_model_family(tmp_path, mask_png, capsys):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    path = tmp_path / "ddpm"
    torch.manual_seed(0)  # the DDPM UNet's random init
    DDPMPipeline(unet=UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=8,
                                  down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2),
                 scheduler=DDPMScheduler()).save_pretrained(path)
    assert main(_args(path, tmp_path / "out", "--mask", str(mask_png))) == 2
    assert "unknown pipeline family" in capsys.readouterr().err


def test_empty_mask_after_parsing_is_an_error(model_dir, tmp_path, capsys, stub_parser):
    """A parser that finds nothing: a clear error (or, with --empty-mask warn, a run)."""
    weights, parser = stub_parser
    parser.hair = False
    assert main(_args(model_dir, tmp_path / "out", "--parser-weights", str(weights))) == 2
    err = capsys.readouterr().err
    assert "empty after parsing" in err and "--empty-mask warn" in err and "empty_mask=" not in err
    assert main(_args(model_dir, tmp_path / "out", "--parser-weights", str(weights), "--empty-mask", "warn")) == 0
    assert "freecure: warning: the attribute mask is empty after parsing" in capsys.readouterr().err


def test_bench_is_delegated(monkeypatch):
    import freecure_ops.bench.__main__ as bench_main

    seen = []
    monkeypatch.setattr(bench_main, "main", lambda argv=None, prog=None: seen.append((argv, prog)) or 0)
    assert main(["bench", "--quick", "--models", "sd15"]) == 0
    assert seen == [(["--quick", "--models", "sd15"], "freecure bench")]


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "x"])
    assert e.value.code == 2


def test_second_run_into_the_same_out_removes_outputs_it_did_not_produce(model_dir, tmp_path, stub_parser):
    """A run without FASA (no attribute words) into a folder a FreeCure run filled: the old fd.png and
    mask.png go (they would read as this run's); files generate does not write are left alone."""
    weights, _ = stub_parser
    out = tmp_path / "same"
    assert main(_args(model_dir, out, "--parser-weights", str(weights))) == 0
    assert {"fd.png", "mask.png"} <= {p.name for p in out.iterdir()}
    (out / "notes.txt").write_text("mine")
    args = _args(model_dir, out, "--parser-weights", str(weights))
    args[args.index("--prompt") + 1] = "a photo of sks man"
    args[args.index("--fd-prompt") + 1] = "a photo of man"
    assert main(args) == 0
    meta = json.loads((out / "freecure.json").read_text())
    assert meta["files"] == ["pd.png"]
    assert sorted(p.name for p in out.iterdir()) == ["freecure.json", "notes.txt", "pd.png"]


@pytest.mark.parametrize("content,expect", [
    (b"garbage\n", "--parser-weights {w}: not a PyTorch checkpoint (neither torch.save's zip archive nor a pickle"),
    (b"", "--parser-weights {w}: not a PyTorch checkpoint (the file is empty)"),
])
def test_parser_weights_that_are_not_a_checkpoint_are_one_line(content, expect, model_dir, tmp_path, capsys):
    weights = tmp_path / "garbage.pth"
    weights.write_bytes(content)
    assert main(_args(model_dir, tmp_path / "out", "--parser-weights", str(weights))) == 2
    err = capsys.readouterr().err
    assert err.startswith("freecure: error: " + expect.format(w=weights)) and err.count("\n") == 1, err
    assert "pickled code" not in err and not (tmp_path / "out").exists()


def test_parser_checkpoint_load_failure_is_one_line(model_dir, tmp_path, capsys):
    """A real zip checkpoint holding an object weights_only refuses: torch's multi-line detail is cut."""
    import argparse

    weights = tmp_path / "objects.pth"
    torch.save({"x": argparse.Namespace(a=1)}, weights)
    assert main(_args(model_dir, tmp_path / "out", "--parser-weights", str(weights))) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"freecure: error: --parser-weights {weights}: ") and err.count("\n") == 1, err
    assert "pickled code" in err and "Weights only load failed" not in err, err  # torch's paragraph is cut


def test_bench_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--models", "foo"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("freecure: error: --models: unknown model ['foo']") and err.count("\n") == 1, err
    assert "freecure bench --help" in err


@pytest.mark.parametrize("extra, fd", [((), FD),                                     # sks left out by default
                                        (("--identity-words", "man,sks"), "a photo of with red hair"),
                                        (("--identity-words", ""), PD),              # none: the prompt itself
                                        (("--fd-prompt", "a photo of a person"), "a photo of a person")])
def test_the_default_fd_prompt_leaves_out_the_identity_words(model_dir, mask_png, tmp_path, monkeypatch, extra, fd):
    """generate, sweep and demo derive the FD prompt alike: --prompt without --identity-words (sks, img)."""
    from tiny_pipes import count_sd_calls

    prompts = count_sd_calls(monkeypatch)
    args = _args(model_dir, tmp_path / "o", "--mask", str(mask_png), "--steps", "1")
    del args[args.index("--fd-prompt"):args.index("--fd-prompt") + 2]
    assert main(args + list(extra)) == 0
    meta = json.loads((tmp_path / "o" / "freecure.json").read_text())
    assert meta["fd_prompt"] == fd and prompts == [[PD, fd]], prompts  # with --mask: one batched [PD, FD] call


def test_identity_words_must_be_words(model_dir, tmp_path, capsys):
    args = _args(model_dir, tmp_path / "o") + ["--identity-words", "sks,two words"]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--identity-words" in err and "is not one word" in err and len(err.strip().splitlines()) == 1
