"""Our top-level folders never shadow the PyPI packages of the same names, and the installed forms hold them.

``kernels``, ``adapters`` and ``bench`` are names of real PyPI packages (Hugging Face's ``kernels``, which
transformers >= 5.25 imports while diffusers loads a model; AdapterHub's ``adapters``; ``bench``). Anything
started from the checkout root has the root first on ``sys.path``, so a regular package folder of ours there
would be imported in their place (freecure_ops/subpackages.py has the layout that prevents it). These tests do
not need the real distributions: each name gets a throwaway distribution in a temporary site folder, and a
subprocess started from the repo root with ``python -m`` says which one Python imports.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("kernels", "adapters", "bench")
MARK = "throwaway distribution"

# Run with ``python -m shadow_probe``: for each name, where ``import <name>`` and ``find_spec(<name>)`` lead, and
# where ``freecure_ops.<name>`` comes from, one "key=value" line each.
PROBE = """
import importlib, importlib.util
for name in {names!r}:
    module = importlib.import_module(name)
    print(f"{{name}}.import={{module.__file__}}")
    print(f"{{name}}.mark={{getattr(module, 'MARK', None)}}")
    print(f"{{name}}.find_spec={{importlib.util.find_spec(name).origin}}")
import freecure_ops
print(f"freecure_ops={{freecure_ops.__file__}}")
for name in {names!r}:
    print(f"freecure_ops.{{name}}={{importlib.import_module('freecure_ops.' + name).__file__}}")
from freecure_ops.adapters import install_fasa
print(f"install_fasa={{install_fasa.__module__}}")
"""


def throwaway_site(site: Path) -> Path:
    """A site folder holding one throwaway distribution per name, plus the probe. ``kernels`` also registers an
    ``egg_info.writers`` entry point, as Hugging Face's does (setuptools imports it while building us)."""
    for name in NAMES:
        pkg = site / name
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text(f"MARK = {MARK!r}\n")
        (pkg / "__main__.py").write_text("from . import MARK\nprint(MARK, __file__)\n")
        info = site / f"{name}-0.0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
        (info / "RECORD").write_text("")
    (site / "kernels" / "writer.py").write_text("from pathlib import Path\n\n\ndef write(cmd, basename, filename):\n"
                                                "    (Path(__file__).parent / 'writer_ran').write_text(filename)\n")
    (site / "kernels-0.0.1.dist-info" / "entry_points.txt").write_text(
        "[egg_info.writers]\nthrowaway_lock.txt = kernels.writer:write\n")
    (site / "shadow_probe.py").write_text(PROBE.format(names=NAMES))
    return site


def run_python(args: list[str], cwd: Path, *path: Path) -> subprocess.CompletedProcess:
    """``python *args`` started in ``cwd`` (first on its sys.path, as for a user starting there), with ``path``
    as PYTHONPATH when given; it must succeed."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONSAFEPATH", None)  # it would keep cwd off sys.path, and with it the case under test
    if path:
        env["PYTHONPATH"] = os.pathsep.join(map(str, path))
    res = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"python {args[:2]} in {cwd} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res


def probe(cwd: Path, *path: Path) -> dict[str, str]:
    out = run_python(["-m", "shadow_probe"], cwd, *path).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def assert_ours_beside_or_inside(seen: dict[str, str]):
    """freecure_ops.<name> is the folder inside the imported freecure_ops (a wheel) or beside it (a checkout)."""
    package_dir = Path(seen["freecure_ops"]).parent
    for name in NAMES:
        folder = Path(seen[f"freecure_ops.{name}"]).parent
        assert folder in (package_dir / name, package_dir.parent / name), (name, seen)
    assert seen["install_fasa"] == "freecure_ops.adapters.install"


def assert_throwaways_win(seen: dict[str, str], site: Path):
    for name in NAMES:
        assert seen[f"{name}.mark"] == MARK, f"`import {name}` found {seen[f'{name}.import']}, not the installed one"
        assert Path(seen[f"{name}.import"]) == site / name / "__init__.py"
        assert Path(seen[f"{name}.find_spec"]) == site / name / "__init__.py"


def test_the_top_level_folders_are_not_regular_packages():
    """The layout itself: a regular package folder at the root is what shadows (Python takes a folder without
    ``__init__.py`` only as a namespace portion, which loses to a regular package anywhere on sys.path)."""
    for name in NAMES:
        assert (ROOT / name).is_dir() and (ROOT / name / "_package.py").is_file()
        assert not (ROOT / name / "__init__.py").exists(), f"{name}/__init__.py shadows PyPI's {name!r} at the root"


def test_from_the_repo_root_the_installed_packages_win(tmp_path):
    site = throwaway_site(tmp_path / "site")
    seen = probe(ROOT, site)
    assert_throwaways_win(seen, site)
    assert Path(seen["freecure_ops"]) == ROOT / "freecure_ops" / "__init__.py"  # the root's own, first on sys.path
    assert_ours_beside_or_inside(seen)
    for name in NAMES:  # python -m <name> at the root runs the installed package too
        assert run_python(["-m", name], ROOT, site).stdout.split() == [*MARK.split(), str(site / name / "__main__.py")]


def test_from_another_folder_as_installed(tmp_path):
    site = throwaway_site(tmp_path / "site")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    seen = probe(elsewhere, site)
    assert_throwaways_win(seen, site)
    assert_ours_beside_or_inside(seen)


def test_the_regression_is_seen(tmp_path):
    """The probe tells the two layouts apart: a copy of the checkout with ``kernels/__init__.py`` put back
    imports its own folder as ``kernels`` at the root."""
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copytree(ROOT / "kernels", copy / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "kernels" / "__init__.py").write_text("")
    site = throwaway_site(tmp_path / "site")
    res = run_python(["-c", "import kernels; print(kernels.__file__)"], copy, site)
    assert res.stdout.strip() == str(copy / "kernels" / "__init__.py")


def source_copy(dst: Path) -> Path:
    """What a source build reads: setup.py, README.md and the package folders."""
    dst.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy2(ROOT / name, dst / name)
    for folder in ("freecure_ops", *NAMES):
        shutil.copytree(ROOT / folder, dst / folder, ignore=shutil.ignore_patterns("__pycache__", "results"))
    return dst


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A wheel and an sdist built by setuptools (no isolation, nothing downloaded) with the source folder as the
    current folder and the throwaway ``kernels`` on the path: its ``egg_info.writers`` entry point is imported
    then, as Hugging Face's is under ``pip install --no-build-isolation``."""
    tmp = tmp_path_factory.mktemp("build")
    src = source_copy(tmp / "src")
    site = throwaway_site(tmp / "site")
    dist = tmp / "dist"
    code = ("from setuptools import build_meta as b; "
            f"print('built:' + b.build_wheel({str(dist)!r})); print('built:' + b.build_sdist({str(dist)!r}))")
    res = run_python(["-c", code], src, site)
    wheel, sdist = (dist / line[len("built:"):] for line in res.stdout.splitlines() if line.startswith("built:"))
    assert (site / "kernels" / "writer_ran").is_file(), "the installed kernels' egg_info writer did not run"
    return {"wheel": wheel, "sdist": sdist, "site": site, "tmp": tmp}


def test_the_wheel_holds_the_folders_inside_freecure_ops(built):
    names = set(zipfile.ZipFile(built["wheel"]).namelist())
    for name in NAMES:
        assert f"freecure_ops/{name}/_package.py" in names
        assert f"freecure_ops/{name}/__init__.py" not in names
    assert {"freecure_ops/__init__.py", "freecure_ops/subpackages.py", "freecure_ops/kernels/fasa_fwd.py",
            "freecure_ops/adapters/install.py", "freecure_ops/bench/__main__.py",
            "freecure_ops/cli/__init__.py", "freecure_ops/pipeline/__init__.py", "freecure_ops/cli/demo.py",
            "freecure_ops/demo/session.py", "freecure_ops/demo/page.py"} <= names
    meta = next(zipfile.Path(built["wheel"], n) for n in names if n.endswith(".dist-info/METADATA")).read_text()
    assert "Provides-Extra: demo" in meta and "Requires-Dist: gradio>=6.31; extra == \"demo\"" in meta  # freecure demo
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"freecure_ops"}, tops


def test_the_sdist_holds_the_source_layout(built):
    with tarfile.open(built["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"setup.py", "README.md", "freecure_ops/subpackages.py", "kernels/_package.py", "kernels/fasa_fwd.py",
            "adapters/_package.py", "bench/_package.py", "bench/__main__.py"} <= names
    assert not {f"{name}/__init__.py" for name in NAMES} & names


def test_the_installed_wheel_imports(built):
    """The wheel unpacked into a target folder (a pure-Python install), ahead of any other install."""
    target = built["tmp"] / "target"
    zipfile.ZipFile(built["wheel"]).extractall(target)
    site = built["site"]
    elsewhere = built["tmp"] / "elsewhere"
    elsewhere.mkdir()
    seen = probe(elsewhere, target, site)
    assert Path(seen["freecure_ops"]) == target / "freecure_ops" / "__init__.py"
    assert_ours_beside_or_inside(seen)
    assert Path(seen["freecure_ops.kernels"]).parent == target / "freecure_ops" / "kernels"
    assert_throwaways_win(seen, site)


def test_the_command_line_runs_from_the_repo_root(tmp_path):
    """``python -m freecure_ops.cli generate`` started at the root, with whatever this environment installed
    (with transformers >= 5.25 diffusers' model loading imports the real ``kernels`` on the way)."""
    import numpy as np
    from PIL import Image

    from tiny_pipes import IMAGE, tiny_sd_pipe

    model = tmp_path / "tiny-sd"
    tiny_sd_pipe().save_pretrained(model)
    mask = np.zeros((IMAGE, IMAGE), np.uint8)
    mask[: IMAGE // 2] = 255
    Image.fromarray(mask, mode="L").save(tmp_path / "hair.png")
    out = tmp_path / "out"
    args = ["generate", "--model", str(model), "--prompt", "a photo of sks man with red hair", "--steps", "2",
            "--seed", "0", "--height", str(IMAGE), "--width", str(IMAGE), "--layers", "all", "--quiet",
            "--mask", str(tmp_path / "hair.png"), "--out", str(out)]
    run_python(["-m", "freecure_ops.cli", *args], ROOT)
    assert Image.open(out / "pd.png").size == (IMAGE, IMAGE)
