"""``freecure demo`` without a browser (issue 28 item 2): the page's state (:class:`DemoSession`) on the tiny SD
pipeline saved to a folder, built from the command's own arguments. Moving omega reruns pass 2 only; what pass 1
depends on reruns it; the images are ``freecure sweep``'s (and ``generate``'s) at the same settings; bad input
on the page is refused with the command line's one-line message, before any work. The command's own errors
(no Gradio, a port in use) come before anything loads, and nothing but the demo page imports Gradio.
The browser test is tests/test_demo_browser.py."""
from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from freecure_ops.cli import build_parser, main
from freecure_ops.cli.demo import load_session
from freecure_ops.cli.contact_sheet import sheet_layout
from freecure_ops.cli.errors import CLIError
from freecure_ops.demo.session import HISTORY_MAX, PageInputs
from freecure_ops.pipeline.prompts import foundation_prompt
from tiny_pipes import IMAGE, count_sd_calls, install_stub_parser, write_cli_inputs

PD = "a photo of sks man with red hair"
FD = "a photo of man with red hair"     # what the page derives from PD (identity words sks, img)
COMMON = ["--steps", "2", "--height", str(IMAGE), "--width", str(IMAGE), "--layers", "all", "--backend", "torch",
          "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_cli_inputs(root)
    torch.save({"stub": torch.zeros(1)}, root / "79999_iter.pth")  # a real checkpoint file (its header is checked)
    return root


@pytest.fixture
def stub_parser(monkeypatch):
    return install_stub_parser(monkeypatch)


@pytest.fixture
def calls(monkeypatch):
    """The prompt of every StableDiffusionPipeline call (pass 1: the FD prompt; pass 2: the PD prompt)."""
    return count_sd_calls(monkeypatch)


def _demo_args(files, *extra):
    return build_parser().parse_args(["demo", "--model", str(files / "tiny-sd"), *COMMON, *extra])


def _session(files, *extra):
    args = list(extra)
    if "--mask" not in args:
        args += ["--parser-weights", str(files / "79999_iter.pth")]
    return load_session(_demo_args(files, *args))


def _arr(img):
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def _png(path):
    return _arr(Image.open(path))


def test_moving_omega_reruns_pass_2_only(files, stub_parser, calls):
    s = _session(files)
    seen = []
    r1 = s.run(PageInputs(prompt=PD, seed=3, steps=2, omega=0.5), progress=lambda t, f: seen.append((t, f)))
    assert calls == [FD, PD] and stub_parser.calls == 1                  # pass 1 (FD, parsed), then pass 2
    assert r1.pass1_ran and r1.pass1_reason == "the first foundation" and r1.fd_prompt == FD
    assert (r1.pass1_runs, r1.pass2_runs) == (1, 1) and r1.attributes == ["hair"]
    texts = [t for t, _ in seen]
    assert texts[0] == "pass 1 (foundation)" and "pass 1 (foundation): step 2/2" in texts
    assert "pass 2 at omega=0.5" in texts and "pass 2 at omega=0.5: step 2/2" in texts and texts[-1] == "done"
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0

    r2 = s.run(PageInputs(prompt=PD, seed=3, steps=2, omega=2.5))
    assert calls == [FD, PD, PD] and stub_parser.calls == 1               # pass 2 alone, from the held record
    assert not r2.pass1_ran and r2.pass2_ran and (r2.pass1_runs, r2.pass2_runs) == (1, 2)
    assert r2.summary().startswith("**Pass 2 only** at omega = 2.5: ") and "Pass 1 has run 1 time," in r2.summary()
    assert (_arr(r2.pd_image) != _arr(r1.pd_image)).any() and r2.fd_image is r1.fd_image
    assert [w for w, _ in r2.history] == [0.5, 2.5]

    r3 = s.run(PageInputs(prompt=PD, seed=3, steps=2, omega=0.5))        # made before: shown again, nothing runs
    assert calls == [FD, PD, PD] and not r3.pass1_ran and not r3.pass2_ran and r3.pass2_runs == 2
    assert r3.pd_image is r1.pd_image and "shown again, no pass ran" in r3.summary()

    r4 = s.run(PageInputs(prompt=PD, seed=4, steps=2, omega=0.5))        # what pass 1 depends on: it reruns
    assert calls[3:] == [FD, PD] and r4.pass1_ran and r4.pass1_reason == "seed 3 -> 4" and r4.pass1_runs == 2
    assert [w for w, _ in r4.history] == [0.5] and (_arr(r4.fd_image) != _arr(r1.fd_image)).any()

    # another identity token with the same foundation prompt and attributes: pass 1's inputs are unchanged
    r5 = s.run(PageInputs(prompt="a photo of zwx man with red hair", fd_prompt=FD, seed=4, steps=2, omega=0.5))
    assert calls[5:] == ["a photo of zwx man with red hair"] and not r5.pass1_ran and r5.pass1_runs == 2
    r6 = s.run(PageInputs(prompt="a photo of sks man with red hair and glasses", seed=4, steps=2, omega=0.5))
    assert r6.pass1_ran and r6.pass1_reason == "foundation prompt changed, attribute words hair -> hair, glasses"
    r7 = s.run(PageInputs(prompt="a photo of sks man with red hair and glasses", seed=4, steps=3, omega=0.5,
                          guidance_scale=5.0, negative_prompt="blurry"))
    assert r7.pass1_reason == "steps 2 -> 3, guidance scale 7.5 -> 5, negative prompt changed"
    assert (r7.pass1_runs, r7.pass2_runs) == (4, 6) and len(calls) == 10


def test_the_history_keeps_the_latest_omegas(files, stub_parser, calls):
    s = _session(files, "--mask", str(files / "mask.png"), "--steps", "1")
    omegas = [0.05 * i for i in range(HISTORY_MAX + 2)]
    for w in omegas:
        r = s.run(PageInputs(prompt=PD, seed=0, steps=1, omega=w))
    assert r.pass1_runs == 1 and r.pass2_runs == len(omegas) and [w for w, _ in r.history] == omegas[2:]
    r = s.run(PageInputs(prompt=PD, seed=0, steps=1, omega=omegas[0]))   # dropped: made again
    assert r.pass2_ran and r.pass2_runs == len(omegas) + 1


def test_the_images_are_the_sweep_s_and_generate_s(files, tmp_path, calls):
    mask = ["--mask", str(files / "mask.png")]
    s = _session(files, *mask)
    page = {w: s.run(PageInputs(prompt=PD, seed=3, steps=2, omega=w)) for w in (0.5, 2.5)}
    assert page[0.5].fd_prompt == FD and calls.count(FD) == 1

    out = tmp_path / "sweep"
    assert main(["sweep", "--model", str(files / "tiny-sd"), "--prompt", PD, "--fd-prompt", FD, *COMMON, *mask,
                 "--omegas", "0.5,2.5", "--seeds", "3", "--out", str(out)]) == 0
    for w, r in page.items():
        assert (_arr(r.pd_image) == _png(out / f"images/seed3_omega{w:g}.png")).all(), w
    assert (_arr(page[0.5].fd_image) == _png(out / "fd/seed3.png")).all()
    layout = sheet_layout((IMAGE, IMAGE), ["FD", "FD + mask", "omega 0.5", "omega 2.5"], ["seed 3"])
    cell = Image.open(out / "sweep.png").convert("RGB").crop(layout.cell_box(1, 0))
    assert (_arr(page[0.5].fd_overlay) == _arr(cell)).all()               # the mask over FD: the sheet's
    assert (_arr(page[0.5].fd_overlay) != _arr(page[0.5].fd_image)).any()

    gen = tmp_path / "gen"
    assert main(["generate", "--model", str(files / "tiny-sd"), "--prompt", PD, "--fd-prompt", FD, *COMMON, *mask,
                 "--omega", "2.5", "--seed", "3", "--out", str(gen)]) == 0
    # generate with --mask runs PD and FD in one batch (no pass 1): equal up to float rounding, as the sweep's
    assert np.abs(_png(gen / "pd.png") - _arr(page[2.5].pd_image)).max() <= 1


# ---- bad input: the command line's words -----------------------------------------------------------------

@pytest.mark.parametrize("page,cli", [
    (dict(steps=0), ["generate", "--steps", "0"]),
    (dict(steps=1.5), ["generate", "--steps", "1.5"]),
    (dict(steps=None), ["generate", "--steps"]),
    (dict(seed=2 ** 64), ["generate", "--seed", str(2 ** 64)]),
    (dict(seed=None), ["demo", "--seed"]),
    (dict(omega=float("inf")), ["generate", "--omega", "inf"]),
    (dict(omega=1e39), ["demo", "--omega", "1e39"]),
    (dict(guidance_scale=-1.0), ["generate", "--guidance-scale", "-1"]),
    (dict(prompt="a photo of sks man"), ["sweep", "--prompt", "a photo of sks man", "--omegas", "1"]),
])
def test_bad_input_gets_the_command_line_s_message(files, tmp_path, stub_parser, calls, capsys, monkeypatch,
                                                   page, cli):
    import freecure_ops.cli.demo as demo_cli

    # a check that let the value through would start a server: fail instead of hanging
    monkeypatch.setattr(demo_cli, "load_session", lambda *a, **k: pytest.fail("the check passed"))
    command, *flags = cli
    argv = [command, "--model", str(files / "tiny-sd"), *COMMON, "--parser-weights", str(files / "79999_iter.pth")]
    if command != "demo":
        argv += ["--out", str(tmp_path / "out")]
    if "--prompt" not in flags and command != "demo":
        argv += ["--prompt", PD]
    try:
        rc = main(argv + flags)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("freecure: error: ") and err.count("\n") == 1, err
    expected = err.removeprefix("freecure: error: ").rstrip("\n")
    expected = expected.split(" (see freecure ")[0]  # argparse's pointer to --help: the page has no --help

    s = _session(files)
    inputs = {**dict(prompt=PD, seed=0, steps=2, omega=0.5), **page}
    with pytest.raises(CLIError) as e:
        s.run(PageInputs(**inputs))
    assert str(e.value) == expected and "\n" not in str(e.value)
    assert calls == [] and stub_parser.calls == 0 and s.pass1_runs == 0 and not s.holds_foundation


def test_an_empty_parsed_mask_is_refused_naming_the_seed(files, stub_parser, calls):
    s = _session(files)
    s.run(PageInputs(prompt=PD, seed=3, steps=2, omega=0.5))
    stub_parser.empty_from = stub_parser.calls + 1
    with pytest.raises(CLIError) as e:
        s.run(PageInputs(prompt=PD, seed=5, steps=2, omega=0.5))
    assert str(e.value).startswith("--seed 5: the attribute mask is empty after parsing")
    assert not s.holds_foundation and s.fd_view(True) is None and calls == [FD, PD, FD]  # no pass 2 after it
    stub_parser.empty_from = None
    r = s.run(PageInputs(prompt=PD, seed=5, steps=2, omega=0.5))         # the next request starts over
    assert r.pass1_ran and r.pass1_reason == "no foundation was held" and r.pass1_runs == 2


def test_the_derived_foundation_prompt():
    words = ("sks", "img")
    assert foundation_prompt(PD, words) == FD
    assert foundation_prompt("a photo of a man img, smiling", words) == "a photo of a man, smiling"
    assert foundation_prompt("sks, a woman with glasses", words) == "a woman with glasses"
    assert foundation_prompt("Sks asks for SKS hair", words) == "asks for hair"     # whole words, any case
    assert foundation_prompt("a photo of <alice> woman", ["<alice>"]) == "a photo of woman"
    assert foundation_prompt("a photo of sks man", []) == "a photo of sks man"
    with pytest.raises(ValueError, match="is not one word"):
        foundation_prompt(PD, ["two words"])


def test_identity_words_choose_the_derived_prompt(files, capsys):
    s = _session(files, "--mask", str(files / "mask.png"), "--identity-words", "zwx")
    assert s.derived_fd_prompt("a zwx man with red hair") == "a man with red hair"
    assert s.derived_fd_prompt(PD) == PD
    s = _session(files, "--mask", str(files / "mask.png"), "--identity-words", "")
    assert s.identity_words == () and s.derived_fd_prompt(PD) == PD    # as generate: the FD prompt is the prompt
    with pytest.raises(SystemExit):
        _demo_args(files, "--identity-words", "a b")
    assert "argument --identity-words: 'a b' is not one word" in capsys.readouterr().err


# ---- the command's own errors, before anything loads -------------------------------------------------------

def test_without_gradio_the_command_says_how_to_install_it(files, monkeypatch, capsys):
    import importlib.util

    import freecure_ops.cli.demo as demo_cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    monkeypatch.setattr(demo_cli, "load_session", lambda *a, **k: pytest.fail("loaded without Gradio"))
    assert main(["demo", "--model", str(files / "tiny-sd"), "--mask", str(files / "mask.png")]) == 2
    err = capsys.readouterr().err
    assert err == 'freecure: error: freecure demo needs Gradio, an optional extra: pip install -e ".[demo]" ' \
                  '(or pip install "gradio>=6")\n'


def test_a_port_in_use_or_out_of_range_is_refused(files, monkeypatch, capsys):
    import freecure_ops.cli.demo as demo_cli

    monkeypatch.setattr(demo_cli, "load_session", lambda *a, **k: pytest.fail("loaded with a bad --port"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        argv = ["demo", "--model", str(files / "tiny-sd"), "--mask", str(files / "mask.png"), "--host", "127.0.0.1"]
        assert main(argv + ["--port", str(port)]) == 2
        assert capsys.readouterr().err == f"freecure: error: --port {port}: already in use on 127.0.0.1 (another " \
                                          "server listens there; pick another --port)\n"
    assert main(argv + ["--port", "70000"]) == 2
    assert capsys.readouterr().err == "freecure: error: --port must be in 1..65535, got 70000\n"


def test_nothing_but_the_page_imports_gradio():
    """``import freecure_ops``, the command line's parser (every subcommand's flags, demo's included) and the
    page's session import no Gradio (seconds to import, and an optional extra)."""
    code = ("import sys, freecure_ops, freecure_ops.pipeline, freecure_ops.demo.session, freecure_ops.cli.demo\n"
            "from freecure_ops.cli import build_parser\n"
            "build_parser().parse_args(['demo', '--model', 'x'])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('gradio', 'fastapi', 'uvicorn')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])
