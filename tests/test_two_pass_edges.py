"""The two-pass API under hostile use (issue 25): which rows of a pass-2 batch are PD is asked, never guessed;
omega is checked against the record before any work; a ``steps=`` that selects nothing is refused up front on
every path; a replay into another scheduler is refused; a released foundation says so.

Every test fails on c56a596 for the reason its name gives (a silent wrong result, a NaN image, a misleading
message or none)."""
from __future__ import annotations

import pytest
import torch

from freecure_ops.adapters import install_fasa
from freecure_ops.pipeline import FreeCure
from test_adapters_helpers import random_mask, tiny_sd15, unet_inputs
from tiny_pipes import IMAGE, FakeParser, tiny_flux_pipe, tiny_sd_pipe, tiny_sdxl_pipe

PD = "a photo of sks man with red hair"
FD = "a photo of man with red hair"
COMMON = dict(num_inference_steps=2, height=IMAGE, width=IMAGE)


@pytest.fixture(scope="module")
def sdxl_found():
    pipe = tiny_sdxl_pipe()
    return pipe, FreeCure(pipe, FakeParser(), layers="all", omega=2.0).foundation(FD, seed=0, **COMMON)


# ---- 1: a pass-2 batch is read as the pipeline runs it ----------------------------------------------------------

def test_two_images_without_cfg_are_not_read_as_one_cfg_pair(sdxl_found):
    """A 1-image foundation and a pass 2 of 2 prompts at guidance_scale=1: 2 rows are 2 images, not one
    [uncond, cond] pair (c56a596 gave row 0 no FASA, silently)."""
    pipe, found = sdxl_found
    latents = torch.cat([found.latents, found.latents])
    with found.apply(pipe), pytest.raises(ValueError, match=r"without classifier-free guidance.*2 image"):
        pipe([PD, PD], latents=latents, guidance_scale=1.0, output_type="latent", **COMMON)


def test_cfg_and_plain_pass_2_read_the_rows_the_pipeline_says(sdxl_found):
    """The same record replayed with and without CFG: FASA acts on every PD row either way."""
    pipe, found = sdxl_found
    for gs in (1.0, 5.0):
        on = found.run(pipe, prompt=PD, guidance_scale=gs, output_type="latent").images
        off = pipe(PD, latents=found.latents, generator=found.generators(), guidance_scale=gs, output_type="latent",
                   **COMMON).images
        assert (on - off).abs().max() > 1e-4


def test_a_bare_unet_replay_needs_its_layout(sdxl_found):
    pipe, found = sdxl_found
    with pytest.raises(ValueError, match=r"bare UNet2DConditionModel.*layout='cfg'"):
        found.apply(pipe.unet)
    with pytest.raises(ValueError, match="layout must be one of"):
        found.apply(pipe, layout="both")
    found.apply(pipe.unet, layout="plain").remove()


def test_an_explicit_layout_the_pipeline_contradicts_is_refused():
    """install_fasa(pipe, layout='cfg') on a call without CFG would pair PD_1 with PD_2 as its FD partner."""
    pipe = tiny_sd_pipe()
    with install_fasa(pipe, random_mask((8, 8)), 1.5, layers="all", layout="cfg"), \
            pytest.raises(ValueError, match=r"layout='cfg'.*runs without classifier-free guidance"):
        pipe([PD, PD, FD, FD], guidance_scale=1.0, output_type="latent", **COMMON)
    with install_fasa(pipe, random_mask((8, 8)), 1.5, layers="all", layout="plain"), \
            pytest.raises(ValueError, match=r"layout='plain'.*batches classifier-free guidance"):
        pipe([PD, FD], guidance_scale=5.0, output_type="latent", **COMMON)
    with install_fasa(pipe, random_mask((8, 8)), 1.5, layers="all", layout="cfg"):   # agreeing: runs
        pipe([PD, FD], guidance_scale=5.0, output_type="latent", **COMMON)


# ---- 2: omega * max(mask) is checked at apply/run, in both modes --------------------------------------------------

@pytest.mark.parametrize("mode", ["bias", "scale"])
def test_an_overflowing_omega_is_refused_before_pass_2_runs(mode):
    pipe = tiny_sd_pipe()
    mask = torch.zeros(IMAGE, IMAGE)
    mask[:8] = 1e30
    found = FreeCure(pipe, FakeParser(), layers="all", mode=mode).foundation(FD, mask=mask, seed=0, **COMMON)
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="omega \\* max\\(mask\\) = 1e\\+10 \\* 1e\\+30"):
            found.run(pipe, prompt=PD, omega=1e10, output_type="latent")
        with pytest.raises(ValueError, match="beyond float32 range"):
            found.apply(pipe, omega=-1e10)
    finally:
        hook.remove()
    assert calls == []  # refused before the model ran
    out = found.run(pipe, prompt=PD, omega=1e-30, output_type="latent").images   # in range: runs, finite
    assert torch.isfinite(out).all()


# ---- 4: steps= that selects no loop iteration -----------------------------------------------------------------------

@pytest.mark.parametrize("fd_reuse", ["auto", "off"])
def test_steps_beyond_the_loop_are_refused_before_pass_1(fd_reuse):
    pipe = tiny_sd_pipe()
    fc = FreeCure(pipe, FakeParser(), layers="all", steps=[5], fd_reuse=fd_reuse)
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"steps=\[5\] selects no iteration of the 2-iteration"):
            fc(PD, fd_prompt=FD, seed=0, **COMMON)
        with pytest.raises(ValueError, match=r"steps=\[5\] selects no iteration of the 2-iteration"):
            fc(PD, fd_prompt=FD, seed=0, mask=torch.ones(IMAGE, IMAGE), **COMMON)
        if fd_reuse == "auto":
            with pytest.raises(ValueError, match=r"steps=\[5\] selects no iteration of the 2-iteration"):
                fc.foundation(FD, seed=0, **COMMON)
    finally:
        hook.remove()
    assert calls == []
    # a steps= that selects some iteration runs (only those)
    FreeCure(pipe, FakeParser(), layers="all", steps=[1, 5], fd_reuse=fd_reuse)(PD, fd_prompt=FD, seed=0, **COMMON)


# ---- 7: a foundation replays only into the scheduler it was recorded with --------------------------------------------

@pytest.mark.parametrize("make", [
    lambda cfg: __import__("diffusers").EulerDiscreteScheduler.from_config(cfg, timestep_spacing="leading"),
    lambda cfg: __import__("diffusers").EulerAncestralDiscreteScheduler.from_config(cfg, timestep_spacing="leading"),
])
def test_another_scheduler_class_with_the_same_timesteps_is_refused(make):
    pipe = tiny_sd_pipe()   # DDIM
    found = FreeCure(pipe, FakeParser(), layers="all").foundation(FD, seed=0, **COMMON)
    other = type(pipe)(**{**pipe.components, "scheduler": make(pipe.scheduler.config)})
    other.set_progress_bar_config(disable=True)
    other.scheduler.set_timesteps(2)
    pipe.scheduler.set_timesteps(2)
    assert torch.equal(other.scheduler.timesteps.double(), pipe.scheduler.timesteps.double())  # the old check passed
    with pytest.raises(ValueError, match=r"recorded with DDIMScheduler.*pass 2 runs (EulerDiscrete|EulerAncestral)"):
        found.run(other, prompt=PD, output_type="latent")


def test_a_scheduler_config_that_changes_the_trajectory_is_refused():
    from diffusers import DDIMScheduler

    pipe = tiny_sd_pipe()
    found = FreeCure(pipe, FakeParser(), layers="all").foundation(FD, seed=0, **COMMON)
    other = type(pipe)(**{**pipe.components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config,
                                                                                       prediction_type="v_prediction")})
    other.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match=r"scheduler config differs.*prediction_type: .epsilon. -> .v_prediction."):
        found.run(other, prompt=PD, output_type="latent")
    same = type(pipe)(**{**pipe.components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)})
    same.set_progress_bar_config(disable=True)
    found.run(same, prompt=PD, output_type="latent")   # an equal copy replays


# ---- 8: release() while applied --------------------------------------------------------------------------------------

def test_release_while_applied_says_what_happened():
    pipe = tiny_sd_pipe()
    found = FreeCure(pipe, FakeParser(), layers="all").foundation(FD, seed=0, **COMMON)
    with found.apply(pipe):
        found.release()
        with pytest.raises(ValueError, match=r"released \(Foundation.release\(\)\) while it was applied"):
            pipe(PD, latents=found.latents, output_type="latent", **COMMON)


def test_flux_pass_2_is_plain_always():
    """FLUX pipelines never batch guidance: a 2-prompt pass 2 against a 1-image record is 2 images (refused)."""
    pipe = tiny_flux_pipe()
    found = FreeCure(pipe, FakeParser(), layers="all").foundation(FD, seed=0, **COMMON)
    with found.apply(pipe), pytest.raises(ValueError, match=r"2 image"):
        pipe([PD, PD], latents=torch.cat([found.latents, found.latents]), output_type="latent", **COMMON)


def test_bare_unet_layouts_still_work():
    unet = tiny_sd15()
    kw = unet_inputs(unet, 4, 8, 6)
    with install_fasa(unet, random_mask((8, 8)), layers="all", layout="cfg"):
        with torch.no_grad():
            unet(**kw)
