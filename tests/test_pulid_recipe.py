"""The PuLID-SDXL recipe of docs/pipelines.md, on a stand-in of PuLID v1 written from ToTheBeginning/PuLID @
1aa2fc7df4bf51080df39f355f9abdc1cbfefbaa (``pulid/pipeline.py``: ``PuLIDPipeline``; ``pulid/attention_processor.py``).

What of PuLID matters here, and how the stand-in (our own code, tiny random weights) reproduces it:
- ``PuLIDPipeline.pipe`` is a plain diffusers ``StableDiffusionXLPipeline`` whose scheduler is
  ``DPMSolverMultistepScheduler(timestep_spacing="trailing")`` (SDXL-Lightning: 4 steps, guidance 1.2).
- ``hack_unet_attn_layers`` puts PuLID's processors on every attention layer: on ``attn1`` its own copy of plain
  self-attention (a class of its own: FreeCure refuses the layer unless ``force=True``), on ``attn2`` the ID
  processor: text cross-attention plus ``id_scale`` x the queries' attention over ``id_to_k`` / ``id_to_v`` (no
  bias) of ``id_embedding``, added before the output projection. Both take ``id_embedding`` and ``id_scale``
  from ``cross_attention_kwargs``; without an ``id_embedding`` the ID term is skipped.
- ``inference()`` calls ``self.pipe(prompt=, negative_prompt=, num_images_per_prompt=1, height=, width=,
  num_inference_steps=, guidance_scale=, cross_attention_kwargs={'id_embedding': ..., 'id_scale': ...})``: no
  ``latents`` (its demo seeds the global RNG first), so the recipe calls ``pipe`` itself. ``get_id_embedding``
  returns ``[uncond; cond]``: one row per guidance half of one image.
- "Identity switched off" is PuLID's own run without an ID image (its demo passes ``id_embedding=None``).
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from freecure_ops.pipeline import FreeCure
from test_foundation import EFFECT, TOL, max_diff
from tiny_pipes import IMAGE, FakeParser, tiny_sdxl_pipe

PD = "a photo of sks woman with red hair"
FD = "a photo of woman with red hair"
# what PuLID's inference() passes besides the prompt and the ID (2 steps instead of 4: tiny and fast)
CALL = dict(negative_prompt="", num_inference_steps=2, guidance_scale=1.2, height=IMAGE, width=IMAGE)


class PuLIDSelfAttn(torch.nn.Module):
    """attn1: plain self-attention in a class of PuLID's own; takes and ignores the ID arguments."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 id_embedding=None, id_scale=1.0):
        from diffusers.models.attention_processor import AttnProcessor2_0

        return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class PuLIDIdAttn(torch.nn.Module):
    """attn2: text cross-attention + ``id_scale`` x attention over the ID tokens, before ``to_out`` (SDXL's attn2
    layers have no group/spatial norm, no residual and no output rescale, so those steps are left out)."""

    def __init__(self, hidden_size, cross_attention_dim):
        super().__init__()
        self.id_to_k = torch.nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.id_to_v = torch.nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 id_embedding=None, id_scale=1.0):
        b = hidden_states.shape[0]

        def heads(x):
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q = heads(attn.to_q(hidden_states))
        out = F.scaled_dot_product_attention(q, heads(attn.to_k(encoder_hidden_states)),
                                             heads(attn.to_v(encoder_hidden_states)))
        if id_embedding is not None:
            out = out + id_scale * F.scaled_dot_product_attention(q, heads(self.id_to_k(id_embedding)),
                                                                  heads(self.id_to_v(id_embedding)))
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1])
        return attn.to_out[1](attn.to_out[0](out))


def pulid_like(pipe, seed=5):
    """``PuLIDPipeline`` as far as FreeCure sees it: ``.pipe``, an SDXL pipeline with PuLID's processors and
    scheduler (the ID projections random, so the ID term is not small)."""
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    unet = pipe.unet
    procs = {}
    torch.manual_seed(seed)
    for name, module in unet.named_modules():
        if name.endswith("attn1"):
            procs[f"{name}.processor"] = PuLIDSelfAttn()
        elif name.endswith("attn2"):
            procs[f"{name}.processor"] = PuLIDIdAttn(module.inner_dim, unet.config.cross_attention_dim)
    unet.set_attn_processor(procs)
    for p in procs.values():
        if isinstance(p, PuLIDIdAttn):
            torch.nn.init.normal_(p.id_to_k.weight, std=0.5)
            torch.nn.init.normal_(p.id_to_v.weight, std=0.5)
    return types.SimpleNamespace(pipe=pipe)


def id_embedding(cross_attention_dim, tokens=4, seed=1):
    """``[uncond; cond]`` ID tokens, as ``get_id_embedding`` returns them for one image."""
    return torch.randn(2, tokens, cross_attention_dim, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pulid():
    return pulid_like(tiny_sdxl_pipe())


def _attn1_types(pipe):
    return {type(p) for n, p in pipe.unet.attn_processors.items() if ".attn1." in n}


def test_the_recipe_runs_and_fasa_acts_on_pulids_own_run(pulid):
    pipe = pulid.pipe
    emb = id_embedding(pipe.unet.config.cross_attention_dim)
    ident = {"id_embedding": emb, "id_scale": 0.8}
    found = FreeCure(pipe, FakeParser(), layers="all", omega=2.0, force=True).foundation(
        FD, seed=0, output_type="pt", **CALL)                                  # no id_embedding: ID term off
    assert _attn1_types(pipe) == {PuLIDSelfAttn}                              # PuLID's processors are back

    # the foundation is PuLID's own ID-free run from that noise (FASA computes attn1 as PuLID's copy does)
    ref_fd = pipe(FD, latents=found.latents, output_type="pt", **CALL).images
    assert max_diff(found.images, ref_fd) <= TOL

    out = found.run(pipe, PD, cross_attention_kwargs=ident, output_type="pt", **CALL).images
    plain = pipe(PD, latents=found.latents, cross_attention_kwargs=ident, output_type="pt", **CALL).images
    assert max_diff(out, plain) > EFFECT                                       # FASA acts
    assert _attn1_types(pipe) == {PuLIDSelfAttn}

    # the ID arguments reach PuLID's attn2 processors through FASA: the ID term changes pass 2
    no_id = found.run(pipe, PD, cross_attention_kwargs={**ident, "id_scale": 0.0}, output_type="pt", **CALL).images
    assert max_diff(out, no_id) > EFFECT

    # the recomputing path, PD and FD rows in one batch [PD_u, FD_u, PD_c, FD_c]: a zero ID embedding on the FD
    # rows gives ID keys and values of exactly 0, so those rows are the ID-free run
    zero = torch.zeros_like(emb[:1])
    batched = {"id_embedding": torch.cat([emb[:1], zero, emb[1:], zero]), "id_scale": 0.8}
    ref = FreeCure(pipe, FakeParser(), layers="all", omega=2.0, force=True, fd_reuse="off")(
        PD, fd_prompt=FD, mask=found.mask, seed=0, cross_attention_kwargs=batched, output_type="pt", **CALL)
    assert max_diff(out, ref.images) <= TOL


def test_the_old_recipe_is_refused_in_one_clear_line(pulid):
    """The former recipe (in the README, before docs/pipelines.md): the foundation on a plain SDXL pipeline
    sharing PuLID's UNet, no force."""
    from diffusers import StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline.from_pipe(pulid.pipe)
    with pytest.raises(ValueError, match=r"^self-attention layer \S+attn1 carries a custom processor PuLIDSelfAttn; "
                                         r"FASA would replace it .*pass force=True"):
        FreeCure(base, FakeParser(), layers="all").foundation(FD, seed=0, **CALL)
    assert _attn1_types(pulid.pipe) == {PuLIDSelfAttn}                         # nothing changed


def test_pulids_id_arguments_pass_fasa_without_a_warning_per_layer(pulid, caplog):
    """diffusers warns, per layer and call, about cross_attention_kwargs a processor's __call__ does not name:
    the FASA processor forced over PuLID's attn1 names what PuLID's took (and ignores them, as PuLID's does)."""
    import logging

    pipe = pulid.pipe
    ident = {"id_embedding": id_embedding(pipe.unet.config.cross_attention_dim), "id_scale": 0.8}
    found = FreeCure(pipe, FakeParser(), layers="all", omega=2.0, force=True).foundation(FD, seed=0, **CALL)
    with caplog.at_level(logging.WARNING, logger="diffusers"):
        found.run(pipe, PD, cross_attention_kwargs=ident, output_type="latent", **CALL)
    assert not [r for r in caplog.records if "are not expected by" in r.getMessage()]
