"""The decoupled two-pass API: ``FreeCure(...).foundation(...)`` records pass 1 on one pipeline, and
``Foundation.run/apply`` applies FASA to another pipeline's own, unchanged run.

Stand-ins for the identity pipelines FreeCure exists for, real diffusers classes with tiny random weights:
- InstantID-like: ``StableDiffusionXLControlNetPipeline`` (identity through the ControlNet);
- IP-Adapter: SDXL with IP-Adapter image embeddings (identity through ``ip_adapter_image_embeds``);
- PhotoMaker-like: a LoRA-fused UNet and a pipeline that switches to identity embeddings at a merge step;
- InfiniteYou-like: ``FluxControlNetPipeline`` (identity through ControlNet residuals of a FLUX transformer).

The reference is the recomputing path, ``FreeCure(..., fd_reuse="off")``: PD and FD rows in one batch, FD
rows computed live. Where the foundation is a different pipeline (the plain base without the ControlNet), the
reference batch runs the ControlNet pipeline with the ControlNet's residuals zeroed on the FD rows, which is
exactly the plain base on those rows.
"""
from __future__ import annotations

import copy

import pytest
import torch

from freecure_ops.pipeline import Foundation, FreeCure
from tiny_pipes import IMAGE, FakeParser, tiny_flux_pipe, tiny_sdxl_pipe

PD = "a photo of sks man with red hair"
FD = "a photo of man with red hair"
COMMON = dict(num_inference_steps=2, height=IMAGE, width=IMAGE)
TOL = 2e-5          # the recomputing path vs reuse, as tests/test_fd_reuse.py
EFFECT = 1e-3       # FASA changes the result by far more than TOL


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)  # zero-initialized convs would give no residual


def sdxl_controlnet_pipe():
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    base = tiny_sdxl_pipe()
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 8)).eval()
    _randomize(controlnet, 3)
    pipe = StableDiffusionXLControlNetPipeline(**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_controlnet_pipe():
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    base = tiny_flux_pipe()
    controlnet = FluxControlNetModel.from_transformer(base.transformer, num_layers=1, num_single_layers=1,
                                                      attention_head_dim=16, num_attention_heads=2).eval()
    _randomize(controlnet, 4)
    pipe = FluxControlNetPipeline(**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def control_image():
    return torch.rand(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(7))


class ZeroOutputRows:
    """A forward hook zeroing a module's outputs on some rows of the batch (``rows_of_batch(batch)``): a
    ControlNet's residuals or an IP-Adapter's image tokens. Those rows then run the plain base model (the FD
    rows of the reference batch)."""

    def __init__(self, module, rows_of_batch):
        self.rows_of_batch = rows_of_batch
        self._h = module.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        def zero(t):
            if isinstance(t, torch.Tensor):
                t[self.rows_of_batch(t.shape[0])] = 0
            elif isinstance(t, (list, tuple)):
                for x in t:
                    zero(x)
        zero(out)
        return out

    def remove(self):
        self._h.remove()


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def fasa_and_plain(found, pipe, **kw):
    """Pass 2 with FASA reading ``found``, and the same call without FASA (same noise)."""
    with_fasa = found.run(pipe, output_type="pt", **kw).images
    plain = pipe(latents=found.latents, generator=found.generators(), output_type="pt", **COMMON, **kw).images
    return with_fasa, plain


# ----------------------------------------------------------------------------------------------------------
# the four stand-ins
# ----------------------------------------------------------------------------------------------------------

def test_instantid_like_sdxl_controlnet_from_the_plain_base():
    """Pass 1 on the plain SDXL base sharing the UNet (no ControlNet), pass 2 on the ControlNet pipeline."""
    from diffusers import StableDiffusionXLPipeline

    cn_pipe = sdxl_controlnet_pipe()
    base = StableDiffusionXLPipeline.from_pipe(cn_pipe)
    image = control_image()
    found = FreeCure(base, FakeParser(), layers="all", omega=2.0).foundation(FD, seed=0, guidance_scale=5.0,
                                                                             **COMMON)
    assert isinstance(found, Foundation) and found.fd_reuse["choice"] == "device"
    out, plain = fasa_and_plain(found, cn_pipe, prompt=PD, image=image, guidance_scale=5.0)

    # reference: [PD_u, FD_u, PD_c, FD_c] on the ControlNet pipeline, ControlNet silent on the FD rows
    hook = ZeroOutputRows(cn_pipe.controlnet, lambda b: [1, 3] if b == 4 else [])
    try:
        ref = FreeCure(cn_pipe, FakeParser(), layers="all", omega=2.0, fd_reuse="off")(
            PD, fd_prompt=FD, seed=0, image=image, guidance_scale=5.0, output_type="pt", **COMMON)
    finally:
        hook.remove()
    assert max_diff(out, ref.images) <= TOL
    assert max_diff(out, plain) > EFFECT


def test_sdxl_ip_adapter_identity_embeddings():
    """Identity embeddings in PD, zeros in FD (a zero embedding gives IP-Adapter image tokens of exactly 0).
    diffusers applies one IP-Adapter input to every prompt of a call, so the reference batch gets the identity
    embedding everywhere and the image projection's output zeroed on the FD rows."""
    from test_diffusers_interplay import CLIP_DIM, ip_adapter_state_dict

    pipe = tiny_sdxl_pipe()
    pipe.unet._load_ip_adapter_weights([ip_adapter_state_dict(pipe.unet)], low_cpu_mem_usage=False)
    g = torch.Generator().manual_seed(1)
    face = torch.randn(2, 1, CLIP_DIM, generator=g)          # [negative; positive] under CFG
    fc = FreeCure(pipe, FakeParser(), layers="all", omega=2.0)
    found = fc.foundation(fd={"prompt": PD, "ip_adapter_image_embeds": [torch.zeros_like(face)]}, seed=0, **COMMON)
    out, plain = fasa_and_plain(found, pipe, prompt=PD, ip_adapter_image_embeds=[face])
    hook = ZeroOutputRows(pipe.unet.encoder_hid_proj, lambda b: [1, 3] if b == 4 else [])
    try:
        ref = FreeCure(pipe, FakeParser(), layers="all", omega=2.0, fd_reuse="off")(
            PD, fd_prompt=PD, ip_adapter_image_embeds=[face], seed=0, output_type="pt", **COMMON)
    finally:
        hook.remove()
    assert max_diff(out, ref.images) <= TOL
    assert max_diff(out, plain) > EFFECT


def test_different_ip_adapter_inputs_cannot_share_a_batch():
    pipe = tiny_sdxl_pipe()
    face = torch.ones(2, 1, 12)
    with pytest.raises(ValueError, match="^ip_adapter_image_embeds: PD and FD differ"):
        FreeCure(pipe, FakeParser(), layers="all", fd_reuse="off")(pd={"prompt": PD, "ip_adapter_image_embeds": [face]},
                                                                   fd={"prompt": FD, "ip_adapter_image_embeds": [0 * face]})


def _fuse_random_lora(unet, seed=0):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = copy.deepcopy(unet)
    torch.manual_seed(seed)
    donor.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    unet.load_lora_adapter(get_peft_model_state_dict(donor), prefix=None, adapter_name="id")
    unet.fuse_lora()


def merge_step_pipeline_class():
    """A PhotoMaker-like pipeline: SDXL whose conditioning switches from the class-word prompt to the identity
    prompt's embeddings at ``start_merge_step`` (PhotoMaker fuses the identity into the prompt embeddings from
    that step on); it drives classifier-free guidance without the ``do_classifier_free_guidance`` property
    FASA would otherwise ask."""
    from diffusers import StableDiffusionXLPipeline

    class MergeStepPipeline(StableDiffusionXLPipeline):
        def __call__(self, prompt, id_prompt, start_merge_step=0, **kwargs):
            emb = self.encode_prompt(id_prompt, device=self._execution_device, do_classifier_free_guidance=True)
            id_embeds = torch.cat([emb[1], emb[0]])

            def swap(pipe, step, t, tensors):
                return {"prompt_embeds": id_embeds} if step + 1 >= start_merge_step else {}

            first = id_prompt if start_merge_step == 0 else prompt
            return super().__call__(first, callback_on_step_end=swap,
                                    callback_on_step_end_tensor_inputs=["prompt_embeds"], **kwargs)

    return MergeStepPipeline


def test_photomaker_like_lora_fused_unet_and_merge_step():
    from diffusers import StableDiffusionXLPipeline

    base = tiny_sdxl_pipe()
    _fuse_random_lora(base.unet)
    pm = merge_step_pipeline_class()(**base.components)
    pm.set_progress_bar_config(disable=True)
    found = FreeCure(base, FakeParser(), layers="all", omega=2.0).foundation(FD, seed=0, **COMMON)
    # start_merge_step=0: the identity prompt from the first step, which the recomputing path can batch
    out, plain = fasa_and_plain(found, pm, prompt=FD, id_prompt=PD, start_merge_step=0)
    ref = FreeCure(StableDiffusionXLPipeline.from_pipe(pm), FakeParser(), layers="all", omega=2.0,
                   fd_reuse="off")(PD, fd_prompt=FD, seed=0, output_type="pt", **COMMON)
    assert max_diff(out, ref.images) <= TOL
    assert max_diff(out, plain) > EFFECT
    # a later merge step runs through the same record (the batch never changes size) and changes the result
    merged, plain_merged = fasa_and_plain(found, pm, prompt=FD, id_prompt=PD, start_merge_step=1)
    assert max_diff(merged, out) > EFFECT and max_diff(merged, plain_merged) > EFFECT


def test_infiniteyou_like_flux_controlnet_from_the_plain_base():
    from diffusers import FluxPipeline

    cn_pipe = flux_controlnet_pipe()
    base = FluxPipeline.from_pipe(cn_pipe)
    image = control_image()
    fc = FreeCure(base, FakeParser(), layers="all", omega=2.0)
    found = fc.foundation(FD, seed=0, guidance_scale=3.5, **COMMON)   # the two pipelines' defaults differ
    out, plain = fasa_and_plain(found, cn_pipe, prompt=PD, control_image=image, guidance_scale=3.5)
    hook = ZeroOutputRows(cn_pipe.controlnet, lambda b: [1] if b == 2 else [])   # [PD, FD]: no CFG batch
    try:
        ref = FreeCure(cn_pipe, FakeParser(), layers="all", omega=2.0, fd_reuse="off")(
            PD, fd_prompt=FD, seed=0, control_image=image, guidance_scale=3.5, output_type="pt", **COMMON)
    finally:
        hook.remove()
    assert max_diff(out, ref.images) <= TOL
    assert max_diff(out, plain) > EFFECT


# ----------------------------------------------------------------------------------------------------------
# one record, many runs; the one-call form
# ----------------------------------------------------------------------------------------------------------

def test_one_record_serves_several_runs_and_omega_sweeps():
    pipe = tiny_sdxl_pipe()
    fc = FreeCure(pipe, FakeParser(), layers="all", omega=2.0)
    found = fc.foundation(FD, seed=0, **COMMON)
    first = found.run(pipe, prompt=PD, output_type="pt").images
    again = found.run(pipe, prompt=PD, output_type="pt").images
    assert torch.equal(first, again)
    swept = found.run(pipe, prompt=PD, output_type="pt", omega=0.5).images
    ref = FreeCure(pipe, FakeParser(), layers="all", omega=0.5, fd_reuse="off")(PD, fd_prompt=FD, seed=0,
                                                                               output_type="pt", **COMMON)
    assert max_diff(swept, ref.images) <= TOL and max_diff(swept, first) > EFFECT
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in pipe.unet.attn_processors.values())  # removed


def test_foundation_fields():
    pipe = tiny_sdxl_pipe()
    found = FreeCure(pipe, FakeParser(), layers="all").foundation([FD, FD], seed=3, output_type="pt", **COMMON)
    assert found.n_images == 2 and found.mask.shape == (2, IMAGE, IMAGE)
    assert found.images.shape == (2, 3, IMAGE, IMAGE) and found.attributes == [["hair"], ["hair"]]
    assert torch.equal(found.timesteps, pipe.scheduler.timesteps.double())
    assert found.nbytes() == found.fd_reuse["bytes"] > 0
    assert "2 image(s)" in repr(found)
    found.release()
    with pytest.raises(ValueError, match="released"):
        found.apply(pipe)


# ----------------------------------------------------------------------------------------------------------
# mismatches: one line each
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdxl_found():
    pipe = tiny_sdxl_pipe()
    return pipe, FreeCure(pipe, FakeParser(), layers="all", omega=2.0).foundation(FD, seed=0, **COMMON)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_inference_steps=3), "3 denoising-loop iterations but the foundation pass ran 2"),
    (dict(height=2 * IMAGE, width=2 * IMAGE), "token grid"),
    (dict(prompt=[PD, PD]), "batch holds 4 rows"),
])
def test_mismatched_pass2_is_refused(sdxl_found, kwargs, match):
    pipe, found = sdxl_found
    kw = {"prompt": PD, "output_type": "latent", **kwargs}
    if "num_inference_steps" not in kwargs:  # run() passes the foundation's size and noise: go through apply()
        with found.apply(pipe), pytest.raises(ValueError, match=match):
            pipe(**kw, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
        return
    with pytest.raises(ValueError, match=match):
        found.run(pipe, **kw)


def test_other_timesteps_are_refused(sdxl_found):
    from diffusers import EulerDiscreteScheduler

    pipe, found = sdxl_found
    other = copy.copy(pipe)
    other = type(pipe)(**{**pipe.components, "scheduler": EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="trailing")})
    other.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="config differs .*timestep_spacing: 'leading' -> 'trailing'"):
        found.run(other, prompt=PD, output_type="latent")
    pipe.scheduler.set_timesteps(2)
    custom = [int(pipe.scheduler.timesteps[0]), int(pipe.scheduler.timesteps[1]) + 1]   # same scheduler, own schedule
    with pytest.raises(ValueError, match=r"timesteps differ from the foundation pass's \(iteration 1"):
        found.run(pipe, prompt=PD, output_type="latent", timesteps=custom)


def test_other_architecture_dtype_or_family_is_refused(sdxl_found):
    from diffusers import UNet2DConditionModel

    pipe, found = sdxl_found
    cfg = dict(pipe.unet.config)
    cfg["attention_head_dim"] = (2, 8)   # same channels, other head split
    torch.manual_seed(0)
    other = type(pipe)(**{**pipe.components, "unet": UNet2DConditionModel.from_config(cfg).eval()})
    with pytest.raises(ValueError, match="heads x .* the architectures differ"):
        found.apply(other)
    with pytest.raises(ValueError, match="flux model"):
        found.apply(tiny_flux_pipe())
    half = type(pipe)(**{**pipe.components, "unet": copy.deepcopy(pipe.unet).to(torch.float64)})
    with pytest.raises(ValueError, match="same torch_dtype"):
        found.apply(half)
    class NoLatents:
        def __call__(self, prompt):
            return prompt

    with pytest.raises(TypeError, match="NoLatents.__call__ takes no latents"):
        found.run(NoLatents(), prompt=PD)
    with pytest.raises(ValueError, match="leave latents= out"):
        found.run(pipe, prompt=PD, latents=found.latents)


def test_foundation_input_errors():
    pipe = tiny_sdxl_pipe()
    fc = FreeCure(pipe, FakeParser(), layers="all")
    with pytest.raises(TypeError, match="takes no fd_prompt"):
        fc.foundation(FD, fd_prompt=FD)
    with pytest.raises(ValueError, match="no FD conditioning"):
        fc.foundation(seed=0)
    with pytest.raises(ValueError, match="names none of the attributes"):
        fc.foundation("a photo of a man", seed=0, **COMMON)
    with pytest.raises(ValueError, match="FD reuse is off"):
        FreeCure(pipe, FakeParser(), layers="all", fd_reuse="off").foundation(FD, seed=0, **COMMON)


def test_num_images_per_prompt_replays_row_by_row():
    """PhotoMaker takes one prompt string and batches images with num_images_per_prompt: in a replay every row
    is PD and row i is image i of the foundation, so it is accepted (equal to the prompt list) where the count
    matches, refused with the batch reason where it does not; the recomputing path still refuses it."""
    pipe = tiny_sdxl_pipe()
    fc = FreeCure(pipe, FakeParser(), layers="all", omega=2.0)
    found = fc.foundation([FD, FD], generator=torch.Generator().manual_seed(4), **COMMON)
    listed = found.run(pipe, prompt=[PD, PD], output_type="pt").images
    repeated = found.run(pipe, prompt=PD, num_images_per_prompt=2, output_type="pt").images
    torch.testing.assert_close(repeated, listed, rtol=0, atol=1e-6)
    plain = pipe(PD, num_images_per_prompt=2, latents=found.latents, generator=found.generators(),
                 output_type="pt", **COMMON).images
    assert max_diff(repeated, plain) > EFFECT
    with found.apply(pipe), pytest.raises(ValueError, match="batch holds 6 rows"):
        pipe(PD, num_images_per_prompt=3, latents=torch.cat([found.latents, found.latents[:1]]),
             output_type="latent", **COMMON)
    from freecure_ops.adapters import install_fasa

    with install_fasa(pipe, torch.ones(8, 8), layers="all"), pytest.raises(ValueError, match="per_prompt=2"):
        pipe([PD, FD], num_images_per_prompt=2, output_type="latent", **COMMON)
