"""Opt-in aliases for diffusers modules that identity pipelines import by paths diffusers has since removed.

diffusers 0.32 moved its ControlNet models into ``diffusers.models.controlnets`` and kept deprecation shims at
the old paths; 0.42 (our floor) has dropped the shims, so code written against the older releases stops at its
first import. The table holds only pairs a pipeline FreeCure has a recipe for really imports (checked against
their current code, commits below) and whose new module diffusers 0.42.1 has. Nothing happens on import of this
module: call :func:`legacy_diffusers_imports` before importing such a pipeline file.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import sys

logger = logging.getLogger(__name__)

# old module name -> its module in diffusers >= 0.32
LEGACY_MODULES = {
    # MultiControlNetModel: instantX-research/InstantID @ 2145b67 (pipeline_stable_diffusion_xl_instantid*.py),
    # diffusers' examples/community/pipeline_stable_diffusion_xl_instantid.py, and TencentARC/PhotoMaker @ 060b4fc
    # (photomaker/pipeline_controlnet.py, which `from photomaker import ...` always imports)
    "diffusers.pipelines.controlnet.multicontrolnet": "diffusers.models.controlnets.multicontrolnet",
    # bytedance/InfiniteYou @ aaa6ea5 (pipelines/pipeline_flux_infusenet.py): FluxControlNetModel,
    # FluxMultiControlNetModel
    "diffusers.models.controlnet_flux": "diffusers.models.controlnets.controlnet_flux",
}


def _importable(name: str) -> bool:
    if name in sys.modules:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # its parent package is missing too
        return False


def legacy_diffusers_imports() -> dict[str, str]:
    """Make the old module names of :data:`LEGACY_MODULES` importable again, as the modules they moved to.

    For each old name that does not import and whose new module does, the new module object goes into
    ``sys.modules`` under the old name and onto its parent package (so ``import a.b.old``, ``from a.b.old
    import X`` and ``from a.b import old`` all give the new module, the same object: ``isinstance`` checks
    against its classes hold). A module that exists is never replaced, nothing else changes, and the aliases
    stay for the process (modules imported through them hold the classes anyway).

    Returns ``{old: new}`` for the names this call aliased (also logged at INFO on ``freecure_ops.compat``):
    empty on a diffusers that still has the old paths, and on a second call.
    """
    aliased = {}
    for old, new in LEGACY_MODULES.items():
        if _importable(old):
            continue
        parent_name, _, leaf = old.rpartition(".")
        try:
            module = importlib.import_module(new)
            parent = importlib.import_module(parent_name)
        except ImportError:  # this diffusers has neither path: nothing to point the old name at
            continue
        sys.modules[old] = module
        if leaf not in vars(parent):  # vars(): a lazy package's getattr would try to import the name
            setattr(parent, leaf, module)
        aliased[old] = new
        logger.info("aliased %s -> %s", old, new)
    return aliased
