"""SD/SDXL users never import the FLUX processor, the one module of ours that needs diffusers' FLUX attention
pieces (``diffusers.models.attention_dispatch``, new in diffusers 0.35; with 0.34 a module-level import made
``import freecure_ops.adapters`` fail for everyone). diffusers 0.42 (the floor in setup.py) imports that module
itself, so it cannot be hidden here: the test checks that our import graph never reaches it for a UNet."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ADAPTERS = TESTS.parent / "adapters"

SCRIPT = textwrap.dedent("""
    import sys, torch
    import freecure_ops.adapters as adapters
    from freecure_ops.adapters import install_fasa
    from freecure_ops.pipeline import FreeCure
    from test_adapters_helpers import random_mask, run, tiny_sd15, unet_inputs
    unet = tiny_sd15()
    with install_fasa(unet, random_mask((8, 6)), layers="all", layout="cfg"):
        out = run(unet, unet_inputs(unet, 4, 8, 6))
    assert torch.isfinite(out).all()
    assert "freecure_ops.adapters.flux_processor" not in sys.modules, "a UNet imported the FLUX processor"
    assert adapters.FasaFluxAttnProcessor.__name__ == "FasaFluxAttnProcessor"   # on first use
    assert "freecure_ops.adapters.flux_processor" in sys.modules
    print("ok")
""")


def test_a_unet_never_imports_the_flux_processor():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ok" in res.stdout


def test_only_the_flux_processor_imports_flux_attention_pieces():
    pattern = re.compile(r"^(from|import)\s+diffusers\.models\.(attention_dispatch|transformers\.transformer_flux)",
                         re.M)
    at_module_level = sorted(p.name for p in ADAPTERS.glob("*.py") if pattern.search(p.read_text()))
    assert at_module_level == ["flux_processor.py"]
