"""The real ``freecure`` entry point in subprocesses (issue 11 items 6-8): user errors are one line naming the
flag, exit status 2, found before the model loads; a good run records its effective settings.

"Before the model loads" is checked with a broken pipeline folder (a model_index.json whose components are
missing): a check that ran after loading would report ``--model`` instead."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_pipes import IMAGE, write_cli_inputs

FREECURE = str(Path(sys.executable).with_name("freecure"))
PD = "a photo of sks man with red hair"
FD = "a photo of man with red hair"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_cli_inputs(root)
    Image.fromarray(np.zeros((IMAGE, IMAGE), np.uint8), mode="L").save(root / "black.png")
    rgba = np.zeros((IMAGE, IMAGE, 4), np.uint8)                   # black RGB, the mask only in alpha
    rgba[: IMAGE // 2, :, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(root / "alpha.png")
    (root / "empty.png").write_bytes(b"")
    good = (root / "mask.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "corrupt.png").write_bytes(good[:16] + bytes(64) + good[80:])
    (root / "a_file").write_text("x")
    return root


def _argv(model, out, *extra):
    return [FREECURE, "generate", "--model", str(model), "--prompt", PD, "--fd-prompt", FD, "--steps", "2",
            "--height", str(IMAGE), "--width", str(IMAGE), "--layers", "all", "--quiet", "--device", "cpu",
            "--out", str(out), *extra]


def _run_all(argvs, cwd):
    """Run the commands, as many at a time as there are cores (each starts Python and torch, about 1 s);
    [(returncode, stdout, stderr)] in order."""
    from concurrent.futures import ThreadPoolExecutor

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("TRITON_INTERPRET", None)  # a user's machine: the kernel needs CUDA (the tests' interpreter is opt-in)

    def one(argv):
        p = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env, timeout=240)
        return p.returncode, p.stdout, p.stderr

    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        return list(pool.map(one, argvs))


ERRORS = {
    # name: (extra argv, where the model is the broken one unless "model" is given, expected flag text)
    "out_is_a_file": (["--out", "{root}/a_file"], "--out"),
    "out_under_a_file": (["--out", "{root}/a_file/sub"], "--out"),
    "out_not_writable": (["--out", "/proc/freecure-out"], "--out"),
    "mask_empty_file": (["--mask", "{root}/empty.png"], "--mask"),
    "mask_truncated": (["--mask", "{root}/truncated.png"], "--mask"),
    "mask_all_black": (["--mask", "{root}/black.png"], "FASA would change nothing. Pass --empty-mask warn"),
    "mask_all_black_scale": (["--mask", "{root}/black.png", "--mode", "scale"],
                             "--mode scale would still attend every FD key"),
    "height_13": (["--height", "13"], "--height"),
    "height_0": (["--height", "0"], "--height"),
    "device_gpu9": (["--device", "gpu9"], "--device gpu9"),
    "guidance_nan": (["--guidance-scale", "nan"], "--guidance-scale"),
    "omega_nan": (["--omega", "nan"], "--omega"),
    "gamma_nan": (["--apg", "--gamma", "nan"], "--gamma"),
    "backend_triton_on_cpu": (["--backend", "triton"], "--backend triton"),
}
if not torch.cuda.is_available():
    ERRORS["device_cuda_without_cuda"] = (["--device", "cuda"], "--device cuda")


def test_user_errors_are_one_line_before_loading(files, tmp_path):
    root = files
    names = list(ERRORS)
    argvs = []
    for name in names:
        extra, _ = ERRORS[name]
        extra = [e.format(root=root) for e in extra]
        base = _argv(root / "broken-model", tmp_path / name)
        if "--mask" not in extra:
            extra = ["--mask", str(root / "mask.png"), *extra]
        if "--device" in extra:                                          # the later --device wins; drop ours
            i = base.index("--device")
            del base[i:i + 2]
        argvs.append(base + extra)
    results = _run_all(argvs, tmp_path)
    for name, (rc, out, err) in zip(names, results):
        expect = ERRORS[name][1]
        assert rc == 2, (name, rc, err)
        assert err.startswith("freecure: error: ") and err.count("\n") == 1, (name, err)
        assert expect in err, (name, err)
        assert "Traceback" not in err and "--model" not in err.replace(str(root), ""), (name, err)
    assert not any((tmp_path / n).exists() for n in names)             # nothing created


def test_good_run_records_effective_settings(files, tmp_path):
    root = files
    [(rc, out, err)] = _run_all([_argv(root / "tiny-sd", tmp_path / "mask", "--mask", str(root / "mask.png"))],
                                tmp_path)
    assert rc == 0, err
    assert err == "", err                                                       # --quiet: nothing on stderr
    meta = json.loads((tmp_path / "mask" / "freecure.json").read_text())
    assert meta["omega"] == 0.5 and meta["omega_source"] == "preset"          # sd1 preset, not null
    assert meta["layers"] == [0, 1, 2, 3] and meta["device"] == "cpu" and meta["dtype"] == "float32"
    assert meta["backend"] == "torch" and meta["height"] == IMAGE and meta["guidance_scale"] == 7.5
    assert {"torch", "diffusers", "transformers", "freecure-ops", "python"} <= set(meta["versions"])
    assert meta["versions"]["torch"] and meta["versions"]["diffusers"]
    assert sorted(p.name for p in (tmp_path / "mask").iterdir()) == ["fd.png", "freecure.json", "mask.png",
                                                                      "pd.png"]   # no temp files left


# more argument errors, in-process through main() (the same code path; a subprocess each costs a second)

@pytest.mark.parametrize("extra,expect", [
    (["--style-fidelity", "2"], "--style-fidelity"),
    (["--omega", "big"], "argument --omega"),
    (["--omega", "inf"], "--omega"),
    (["--guidance-scale", "-1"], "--guidance-scale"),
    (["--width", "20"], "--width"),
    (["--steps", "0"], "--steps"),
    (["--mask", "{root}/corrupt.png"], "--mask"),
    (["--apg-template", "a photo"], "--apg-template"),
    (["--apg", "--steps", "1"], "--apg with --gamma 0.5 and --steps 1 runs int(gamma * steps) = int(0.5 * 1) = 0"),
    (["--apg", "--gamma", "0.4"], "--apg with --gamma 0.4 and --steps 2 runs"),
    (["--device", "cuda:99"], "--device"),
])
def test_more_argument_errors(files, tmp_path, capsys, extra, expect):
    from freecure_ops.cli import main

    extra = [e.format(root=files) for e in extra]
    args = _argv(files / "broken-model", tmp_path / "o", *([] if "--mask" in extra else
                                                           ["--mask", str(files / "mask.png")]), *extra)[1:]
    if "--device" in extra:
        i = args.index("--device")
        del args[i:i + 2]
    with pytest.raises(SystemExit) if expect.startswith("argument") else _nothing() as e:
        rc = main(args)
    rc = e.value.code if expect.startswith("argument") else rc
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("freecure: error: ") and err.count("\n") == 1 and expect in err, err


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# errors that need the model (its block count), and masks that run: in-process through main()

def _main_args(root, out, *extra):
    return _argv(root / "tiny-sd", out, *extra)[1:]


@pytest.mark.parametrize("extra,expect", [
    (["--layers", "0,99"], "--layers 99: the model has 4 self-attention blocks"),
    (["--no-layers"], "pass --layers all"),
])
def test_model_dependent_errors_name_the_flag(files, tmp_path, capsys, extra, expect):
    from freecure_ops.cli import main

    args = _main_args(files, tmp_path / "o", "--mask", str(files / "mask.png"))
    if extra == ["--no-layers"]:
        i = args.index("--layers")
        del args[i:i + 2]                       # the sd1 preset (blocks 10..15) does not fit a 4-block model
    else:
        args += extra
    assert main(args) == 2
    err = capsys.readouterr().err
    assert expect in err and "layers=" not in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_alpha_mask_and_empty_mask_warn(files, tmp_path, capsys):
    from freecure_ops.cli import main
    from freecure_ops.cli.args import read_mask_png

    m = read_mask_png(files / "alpha.png")
    assert (m[: IMAGE // 2] == 1).all() and (m[IMAGE // 2:] == 0).all()        # the alpha channel, not black
    # strokes on a transparent background: luminance x alpha
    rgba = np.zeros((IMAGE, IMAGE, 4), np.uint8)
    rgba[:4, :, :] = 255
    rgba[4:8, :, :3] = 255                                                       # white but transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "strokes.png")
    m = read_mask_png(tmp_path / "strokes.png")
    assert (m[:4] == 1).all() and (m[4:] == 0).all()
    assert main(_main_args(files, tmp_path / "alpha", "--mask", str(files / "alpha.png"))) == 0
    saved = np.array(Image.open(tmp_path / "alpha" / "mask.png"))
    assert (saved[: IMAGE // 2] == 255).all() and (saved[IMAGE // 2:] == 0).all()
    capsys.readouterr()
    assert main(_main_args(files, tmp_path / "black", "--mask", str(files / "black.png"), "--empty-mask",
                           "warn")) == 0
    assert "freecure: warning: --mask" in capsys.readouterr().err


def test_bench_help_and_out(tmp_path, files):
    results = _run_all([[FREECURE, "bench", "--help"],
                        [FREECURE, "bench", "--out", str(files / "a_file"), "--quick"]], tmp_path)
    rc, out, err = results[0]
    assert rc == 0 and out.startswith("usage: freecure bench") and "(default: ./bench_out)" in " ".join(
        out.split())
    rc, out, err = results[1]
    assert rc == 2 and "--out" in err and "not a folder" in err


def test_crc_corrupt_png_is_really_corrupt(files):
    data = (files / "corrupt.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and zlib.crc32(data) != zlib.crc32((files / "mask.png").read_bytes())
