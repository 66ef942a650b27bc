"""``freecure_ops.compat.legacy_diffusers_imports``: the old diffusers module names identity pipelines import,
aliased to where diffusers 0.42 keeps those modules.

The stand-ins are module files written here whose ``diffusers`` imports are those of the upstream files (the
import lines only; the rest is our own code):
- instantX-research/InstantID @ 2145b67f9607da6234702063692330185f374486, ``pipeline_stable_diffusion_xl_instantid.py``
  (diffusers' ``examples/community/pipeline_stable_diffusion_xl_instantid.py`` @ 58eb52c0 has the same set);
- bytedance/InfiniteYou @ aaa6ea5f75ba2ff58b9025fa7df45e4a139ed717, ``pipelines/pipeline_flux_infusenet.py``
  (its ``pipeline_infu_flux.py`` imports only names diffusers' top level still has).
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import textwrap
import types

import pytest
import torch

from freecure_ops import compat
from freecure_ops.compat import LEGACY_MODULES, legacy_diffusers_imports

INSTANTID_LIKE = '''
import torch
from diffusers.image_processor import PipelineImageInput
from diffusers.models import ControlNetModel
from diffusers.utils import deprecate, logging, replace_example_docstring
from diffusers.utils.torch_utils import is_compiled_module, is_torch_version
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput
from diffusers import StableDiffusionXLControlNetPipeline
from diffusers.pipelines.controlnet.multicontrolnet import MultiControlNetModel
from diffusers.utils.import_utils import is_xformers_available


class AttnProcessor(torch.nn.Module):
    """attn1: InstantID's own class for plain self-attention."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        from diffusers.models.attention_processor import AttnProcessor2_0

        return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class StableDiffusionXLInstantIDLike(StableDiffusionXLControlNetPipeline):
    def n_controlnets(self):  # InstantID sizes its control_guidance_* lists this way
        return len(self.controlnet.nets) if isinstance(self.controlnet, MultiControlNetModel) else 1

    def __call__(self, prompt=None, image_embeds=None, image=None, ip_adapter_scale=None, **kwargs):
        if image_embeds is None:
            raise ValueError("InstantID needs image_embeds")
        return super().__call__(prompt, image=image, **kwargs)
'''

INFINITEYOU_LIKE = '''
from diffusers import FluxControlNetPipeline
from diffusers.models.controlnet_flux import FluxControlNetModel, FluxMultiControlNetModel
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.utils import replace_example_docstring, is_torch_xla_available, logging


class FluxInfuseNetLike(FluxControlNetPipeline):
    def n_controlnets(self):
        return len(self.controlnet.nets) if isinstance(self.controlnet, FluxMultiControlNetModel) else 1
'''


def load(tmp_path, name, source):
    """Import ``source`` as module ``name`` from a file (not left in ``sys.modules``)."""
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parent(old):
    parent_name, _, leaf = old.rpartition(".")
    return importlib.import_module(parent_name), leaf


@pytest.fixture
def fresh():
    """The process as a fresh one has it, without our aliases (an earlier test, e.g. the docs' Python blocks, may
    have made them, and they last for the process); what was there is put back afterwards."""
    saved = {}
    for old in LEGACY_MODULES:
        parent, leaf = _parent(old)
        saved[old] = (sys.modules.pop(old, None), vars(parent).pop(leaf, None))
    yield
    for old, (module, attr) in saved.items():
        parent, leaf = _parent(old)
        sys.modules.pop(old, None)
        vars(parent).pop(leaf, None)
        if module is not None:
            sys.modules[old] = module
        if attr is not None:
            setattr(parent, leaf, attr)


def test_every_pair_holds_for_this_diffusers(fresh):
    """What the table claims about the installed diffusers: each old name is gone, its new module is there."""
    import diffusers

    for old, new in LEGACY_MODULES.items():
        assert importlib.util.find_spec(old) is None, f"diffusers {diffusers.__version__} has {old} again"
        assert importlib.import_module(new).__name__ == new


@pytest.mark.parametrize("name, source, missing", [
    ("instantid_like", INSTANTID_LIKE, "diffusers.pipelines.controlnet.multicontrolnet"),
    ("infiniteyou_like", INFINITEYOU_LIKE, "diffusers.models.controlnet_flux"),
])
def test_upstream_imports_fail_without_and_work_with_the_helper(fresh, tmp_path, caplog, name, source, missing):
    with pytest.raises(ModuleNotFoundError, match=f"No module named '{missing}'"):
        load(tmp_path, name, source)
    with caplog.at_level(logging.INFO, logger="freecure_ops.compat"):
        aliased = legacy_diffusers_imports()
    assert aliased == LEGACY_MODULES
    assert f"aliased {missing} -> {LEGACY_MODULES[missing]}" in caplog.text
    module = load(tmp_path, name, source)
    new = importlib.import_module(LEGACY_MODULES[missing])
    # one module under both names (the class InstantID checks with isinstance is diffusers' own)
    assert sys.modules[missing] is new and importlib.import_module(missing) is new
    parent, leaf = _parent(missing)
    assert getattr(parent, leaf) is new                 # "from diffusers.models import controlnet_flux" too
    cls = module.MultiControlNetModel if name == "instantid_like" else module.FluxMultiControlNetModel
    assert cls is getattr(new, cls.__name__)


def test_idempotent(fresh):
    first = legacy_diffusers_imports()
    modules = {old: sys.modules[old] for old in first}
    assert first == LEGACY_MODULES
    assert legacy_diffusers_imports() == {}             # nothing left to alias
    assert all(sys.modules[old] is m for old, m in modules.items())


def test_nothing_that_exists_is_replaced(monkeypatch):
    """An old name that imports (a module of diffusers, or one already in ``sys.modules``, e.g. the user's own
    shim) is left alone; a pair whose new module or old parent package is missing is skipped."""
    import diffusers.models.controlnets.controlnet as existing

    own = types.ModuleType("diffusers.models.controlnet_flux")
    monkeypatch.setitem(sys.modules, "diffusers.models.controlnet_flux", own)
    monkeypatch.setattr(compat, "LEGACY_MODULES", {
        "diffusers.models.controlnets.controlnet": "diffusers.models.controlnets.controlnet_flux",
        "diffusers.models.controlnet_flux": "diffusers.models.controlnets.controlnet_flux",
        "diffusers.models.no_such_old_module": "diffusers.models.no_such_new_module",
        "diffusers.no_such_package.controlnet_flux": "diffusers.models.controlnets.controlnet_flux",
    })
    assert legacy_diffusers_imports() == {}
    assert sys.modules["diffusers.models.controlnets.controlnet"] is existing
    assert sys.modules["diffusers.models.controlnet_flux"] is own
    assert "diffusers.models.no_such_old_module" not in sys.modules
    assert "diffusers.no_such_package.controlnet_flux" not in sys.modules


def test_a_parent_attribute_of_that_name_is_left_alone(fresh, monkeypatch):
    import diffusers.models

    own = object()
    with monkeypatch.context() as mp:  # undone here, before `fresh` puts back what was there
        mp.setattr(diffusers.models, "controlnet_flux", own, raising=False)
        assert "diffusers.models.controlnet_flux" in legacy_diffusers_imports()
        assert diffusers.models.controlnet_flux is own


def test_instantid_like_runs_a_foundation_recipe_with_fasa_acting(fresh, tmp_path):
    """The InstantID-like stand-in imports with the helper and runs the recipe shape of docs/pipelines.md:
    foundation with a zero face embedding, then its own run with the face, both with ``force=True``."""
    import numpy as np

    from freecure_ops.pipeline import FreeCure
    from test_foundation import COMMON, EFFECT, FD, PD, control_image, max_diff, sdxl_controlnet_pipe
    from tiny_pipes import FakeParser

    legacy_diffusers_imports()
    mod = load(tmp_path, "instantid_like", INSTANTID_LIKE)
    base = sdxl_controlnet_pipe()
    pipe = mod.StableDiffusionXLInstantIDLike(**base.components)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.set_attn_processor({n: mod.AttnProcessor() if ".attn1." in n else p
                                  for n, p in pipe.unet.attn_processors.items()})
    assert pipe.n_controlnets() == 1
    two = mod.StableDiffusionXLInstantIDLike(**{**base.components, "controlnet": [base.controlnet] * 2})
    assert two.n_controlnets() == 2     # diffusers wraps the list in the class the old name now gives

    face = np.ones(512, dtype=np.float32)
    kps = control_image()
    found = FreeCure(pipe, FakeParser(), layers="all", omega=2.0, force=True).foundation(
        FD, image_embeds=np.zeros_like(face), image=kps, ip_adapter_scale=0.8, seed=0, guidance_scale=5.0,
        **COMMON)
    out = found.run(pipe, PD, image_embeds=face, image=kps, ip_adapter_scale=0.8, guidance_scale=5.0,
                    output_type="pt").images
    plain = pipe(PD, image_embeds=face, image=kps, latents=found.latents, guidance_scale=5.0, output_type="pt",
                 **COMMON).images
    assert max_diff(out, plain) > EFFECT
    assert {type(p) for n, p in pipe.unet.attn_processors.items() if ".attn1." in n} == {mod.AttnProcessor}
    assert torch.isfinite(out).all()
