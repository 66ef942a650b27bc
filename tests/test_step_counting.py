"""Step gating counts the pipeline's denoising-loop iterations (issue 11 item 2): for every scheduler diffusers
ships that the SD/SDXL (UNet) and FLUX pipelines accept, each forward's step index is the index the pipeline's
step callback gets, and FASA runs exactly in the chosen iterations. Second-order schedulers (Heun, K-DPM2,
whose timesteps repeat or rise: 666.0001, 666.0, 332.99997, 333.0, ...) run 2N-1 iterations for N steps."""
from __future__ import annotations

import importlib.util

import diffusers
import pytest
import torch
from diffusers.utils import logging as diffusers_logging

from freecure_ops.adapters import install_fasa
from tiny_pipes import tiny_flux_pipe, tiny_sd_pipe, tiny_sdxl_pipe

# Every scheduler class of diffusers 0.42 that runs in StableDiffusionPipeline / StableDiffusionXLPipeline
# (found by trying all 46 exported classes), with the optional dependency some of them need.
UNET_SCHEDULERS = {
    "CMStochasticIterativeScheduler": None, "CogVideoXDDIMScheduler": None, "DDIMInverseScheduler": None,
    "DDIMParallelScheduler": None, "DDIMScheduler": None, "DDPMParallelScheduler": None, "DDPMScheduler": None,
    "DEISMultistepScheduler": None, "DPMSolverMultistepInverseScheduler": None,
    "DPMSolverMultistepScheduler": None, "DPMSolverSinglestepScheduler": None,
    "EDMDPMSolverMultistepScheduler": None, "EDMEulerScheduler": None, "EulerAncestralDiscreteScheduler": None,
    "EulerDiscreteScheduler": None, "HeunDiscreteScheduler": None, "IPNDMScheduler": None,
    "KDPM2AncestralDiscreteScheduler": None, "KDPM2DiscreteScheduler": None, "LCMScheduler": None,
    "SASolverScheduler": None, "TCDScheduler": None, "UniPCMultistepScheduler": None, "PNDMScheduler": None,
    "LMSDiscreteScheduler": "scipy", "DPMSolverSDEScheduler": "torchsde",
}
# ... and in FluxPipeline (its set_timesteps must take sigmas= and mu=).
FLUX_SCHEDULERS = {"FlowMatchEulerDiscreteScheduler": {}, "FlowMatchLCMScheduler": {},
                   "UniPCMultistepScheduler": dict(use_flow_sigmas=True, prediction_type="flow_prediction")}
SECOND_ORDER = ("HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler")
N_STEPS = 4


@pytest.fixture(scope="module", autouse=True)
def quiet_diffusers():
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()   # config-mismatch notes of from_config
    yield
    diffusers_logging.set_verbosity(level)


@pytest.fixture(scope="module")
def pipes():
    return {"sd": tiny_sd_pipe(), "sdxl": tiny_sdxl_pipe(), "flux": tiny_flux_pipe()}


def _record(pipe, denoiser, handle, **call):
    """Run the pipeline; returns (per forward: (step index, active, callback index it belongs to), iterations)."""
    forwards, done = [], []

    def pre(module, args, kwargs):
        forwards.append((handle.step, handle.controller.active, len(done)))

    def callback(p, i, t, kw):
        done.append(i)
        return kw

    h = denoiser.register_forward_pre_hook(pre, with_kwargs=True)   # runs after install_fasa's hook
    try:
        pipe(["a photo of sks man with red hair", "a photo of man with red hair"], num_inference_steps=N_STEPS,
             height=16, width=16, output_type="latent", callback_on_step_end=callback,
             generator=torch.Generator().manual_seed(0), **call)
    finally:
        h.remove()
    assert done == list(range(len(done)))
    return forwards, len(done)


def _check(pipe, denoiser, name, **call):
    n_iter = len(pipe.scheduler.timesteps) if name == "PNDMScheduler" else \
        2 * N_STEPS - 1 if name in SECOND_ORDER else N_STEPS
    gate = {1, n_iter - 1}
    torch.manual_seed(0)  # stochastic schedulers (LCM, ancestral) draw step noise from the global RNG
    with install_fasa(pipe, torch.ones(16, 16), layers=[0], steps=gate) as handle:
        for _ in range(2):                                   # a second generation restarts at step 0
            forwards, iters = _record(pipe, denoiser, handle, **call)
            assert iters == n_iter
            assert forwards and all(step == i for step, _, i in forwards)       # step index == callback index
            assert {i for _, active, i in forwards if active} == gate
            assert all(active == (step in gate) for step, active, _ in forwards)
        assert handle.step == n_iter - 1


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("name", sorted(UNET_SCHEDULERS))
def test_unet_pipelines_count_loop_iterations(pipes, family, name):
    needs = UNET_SCHEDULERS[name]
    if needs and importlib.util.find_spec(needs) is None:
        pytest.skip(f"{name} needs {needs}, not installed")
    pipe = pipes[family]
    original = pipe.scheduler
    pipe.scheduler = getattr(diffusers, name).from_config(original.config)
    if name == "PNDMScheduler":   # its Runge-Kutta warm-up adds loop iterations: take its own count
        pipe.scheduler.set_timesteps(N_STEPS)
        assert len(pipe.scheduler.timesteps) > N_STEPS
    try:
        _check(pipe, pipe.unet, name, guidance_scale=5.0)
    finally:
        pipe.scheduler = original
    assert "step" not in vars(pipe.scheduler) and "set_timesteps" not in vars(pipe.scheduler)


@pytest.mark.parametrize("name", sorted(FLUX_SCHEDULERS))
def test_flux_pipeline_counts_loop_iterations(pipes, name):
    pipe = pipes["flux"]
    original = pipe.scheduler
    pipe.scheduler = getattr(diffusers, name).from_config(original.config, **FLUX_SCHEDULERS[name])
    try:
        _check(pipe, pipe.transformer, name)
    finally:
        pipe.scheduler = original


def test_flux_true_cfg_two_forwards_per_step(pipes):
    """FluxPipeline's true CFG calls the transformer twice per iteration: both calls are one step."""
    pipe = pipes["flux"]
    _check(pipe, pipe.transformer, "FlowMatchEulerDiscreteScheduler", true_cfg_scale=2.0,
           negative_prompt=["blurry", "blurry"])


class _RisingKDPM2(diffusers.KDPM2AncestralDiscreteScheduler):
    """K-DPM2 ancestral whose run has a rising timestep pair, built on purpose: some releases of the stock
    scheduler produce one from float noise (e.g. ``332.99997, 333.0``), others do not. The interpolated
    timestep of the first step is set just below the next one; K-DPM2 finds its step index once, from the
    first timestep, and steps by sigmas, so the run is otherwise the stock one."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        ts = self.timesteps.clone()
        ts[1] = ts[2] - 0.5
        self.timesteps = ts


def test_kdpm2_ancestral_rising_timesteps(pipes):
    """The issue's case: the timesteps rise inside one run; the old counter restarted at step 0 there."""
    pipe = pipes["sd"]
    original = pipe.scheduler
    pipe.scheduler = _RisingKDPM2.from_config(original.config)
    try:
        pipe.scheduler.set_timesteps(30)
        assert len(pipe.scheduler.timesteps) == 59
        pipe.scheduler.set_timesteps(N_STEPS)
        ts = pipe.scheduler.timesteps.tolist()
        assert ts[2] > ts[1]
        with install_fasa(pipe, torch.ones(16, 16), layers=[0], steps={N_STEPS * 2 - 2}) as handle:
            forwards, iters = _record(pipe, pipe.unet, handle, guidance_scale=5.0)
        assert [s for s, _, _ in forwards] == sorted(s for s, _, _ in forwards)
        assert max(s for s, _, _ in forwards) == 2 * N_STEPS - 2 == iters - 1
    finally:
        pipe.scheduler = original


def test_scheduler_swapped_after_install_is_followed(pipes):
    pipe = pipes["sd"]
    original = pipe.scheduler
    with install_fasa(pipe, torch.ones(16, 16), layers=[0], steps={2}) as handle:
        pipe.scheduler = diffusers.HeunDiscreteScheduler.from_config(original.config)
        try:
            forwards, iters = _record(pipe, pipe.unet, handle, guidance_scale=5.0)
            assert iters == 2 * N_STEPS - 1 and all(step == i for step, _, i in forwards)
            assert {i for _, a, i in forwards if a} == {2}
        finally:
            pipe.scheduler = original
    assert "step" not in vars(original)


def test_bare_model_steps_need_a_scheduler_or_at_step():
    """A bare model has no loop to count: steps= then needs scheduler= or the loop's own handle.at_step(i)
    (tests/test_own_loops.py); a forward told neither is refused, not run with FASA silently off."""
    from test_adapters_helpers import tiny_sd15, unet_inputs

    unet = tiny_sd15()
    with install_fasa(unet, torch.ones(8, 8), layers=[0], layout="cfg", steps=[1]) as handle:
        with torch.no_grad(), pytest.raises(ValueError, match=r"^steps=\[1\] needs .*handle.at_step\(i\)"):
            unet(**unet_inputs(unet, 4, 8, 6))
        handle.at_step(1)
        with torch.no_grad():
            unet(**unet_inputs(unet, 4, 8, 6))
        assert handle.step == 1 and handle.controller.active
    with pytest.raises(TypeError, match="^scheduler"):
        install_fasa(unet, torch.ones(8, 8), layers=[0], layout="cfg", steps=[1], scheduler=object())


def test_bare_model_with_its_scheduler(pipes):
    """A hand-written loop over a bare UNet: install_fasa(unet, ..., scheduler=sched) counts sched.step()."""
    from test_adapters_helpers import tiny_sd15, unet_inputs

    unet = tiny_sd15()
    sched = diffusers.KDPM2DiscreteScheduler()
    kw = unet_inputs(unet, 4, 8, 8)
    seen = []
    with install_fasa(unet, torch.ones(8, 8), layers=[0], layout="cfg", steps={3}, scheduler=sched) as handle:
        sched.set_timesteps(3)
        x = kw.pop("sample")
        for t in sched.timesteps:
            with torch.no_grad():
                eps = unet(sched.scale_model_input(x, t), t, **{k: v for k, v in kw.items() if k != "timestep"}).sample
            seen.append((handle.step, handle.controller.active))
            x = sched.step(eps, t, x).prev_sample
    assert seen == [(i, i == 3) for i in range(5)]
    assert "step" not in vars(sched)


def test_a_deep_copy_of_a_counted_scheduler_is_its_own():
    """copy.deepcopy of the scheduler while FASA counts its steps: the copy's methods act on the copy (not on
    the original, not on the counter), and its signature is the original's."""
    import copy
    import inspect

    from freecure_ops.adapters import install_fasa
    from test_adapters_helpers import random_mask
    from tiny_pipes import tiny_sd_pipe

    pipe = tiny_sd_pipe()
    with install_fasa(pipe, random_mask((16, 16)), layers="all") as handle:
        twin = copy.deepcopy(pipe.scheduler)
        pipe.scheduler.set_timesteps(3)
        twin.set_timesteps(10)
        assert (pipe.scheduler.num_inference_steps, twin.num_inference_steps) == (3, 10)
        before = handle.controller.counter.count
        twin.step(torch.zeros(1, 4, 2, 2), twin.timesteps[0], torch.zeros(1, 4, 2, 2))
        assert handle.controller.counter.count == before
        assert "eta" in inspect.signature(pipe.scheduler.step).parameters
