"""Model families and their FASA presets (omega and the self-attention blocks that get FASA).

Blocks are counted in execution order, one per transformer block (see :mod:`.discovery`):

* ``"sd1"`` (SD1.x, and SD2.x, which has the same 16-block layout): omega 0.5, blocks 10..15 — the
  reference code's Face2Diffusion setting. On SD1.5 these are the six decoder blocks of ``up_blocks.2`` and
  ``up_blocks.3`` (the 32x32 and 64x64 latent grids at 512 px).
* ``"sdxl"``: omega 1.5, blocks 50..69 — the reference code's PhotoMaker / InstantID setting. On SDXL these
  are ``up_blocks.0.attentions.1.transformer_blocks.6..9``, all of ``up_blocks.0.attentions.2`` and all of
  ``up_blocks.1`` (the last 20 of 70 blocks).
* ``"flux"`` (our choice; the authors publish no FLUX setting): omega 1.0, the second half of the
  single-stream blocks, i.e. blocks ``D + S//2 .. D + S - 1`` for D double- and S single-stream blocks —
  38..56 (``single_transformer_blocks.19..37``) on FLUX.1 [dev]/[schnell] (19 + 38 blocks). Rationale: the
  UNet presets put FASA on the last 29-38 % of the blocks in execution order, where appearance detail is
  formed; the last third of FLUX's 57 blocks is exactly this range. omega 1.0 sits between the SD1.x (0.5)
  and SDXL (1.5) values. Defined relative to the block counts so it also holds for FLUX variants with
  other depths. Not tuned on real weights: treat it as a starting point and tune ``omega`` per model.
"""
from __future__ import annotations

from dataclasses import dataclass

FAMILIES = ("sd1", "sdxl", "flux")


@dataclass(frozen=True)
class FasaPreset:
    family: str
    omega: float
    layout: str  # the batch layout of the family's stock pipeline: UNets batch CFG, FLUX-dev has none
    description: str


PRESETS = {
    "sd1": FasaPreset("sd1", 0.5, "cfg", "blocks 10..15 in execution order (reference code, Face2Diffusion)"),
    "sdxl": FasaPreset("sdxl", 1.5, "cfg", "blocks 50..69 in execution order (reference code, PhotoMaker/InstantID)"),
    "flux": FasaPreset("flux", 1.0, "plain", "second half of the single-stream blocks (38..56 on FLUX.1)"),
}


def preset_blocks(family: str, blocks) -> range:
    """Block indices the preset selects among ``blocks`` (from :func:`.discovery.find_self_attention_blocks`,
    in execution order). Raises ValueError when the model is too small for the preset."""
    total = len(blocks)
    if family == "flux":
        n_double = sum(b.kind != "flux_single" for b in blocks)
        return range(n_double + (total - n_double) // 2, total)
    if family == "sd1":
        wanted = range(10, 16)
    elif family == "sdxl":
        wanted = range(50, 70)
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if wanted.stop > total:
        raise ValueError(f"layers=None takes the {family} preset ({PRESETS[family].description}), but this model has "
                         f"only {total} transformer blocks: pass layers='all' or explicit block indices")
    return wanted
