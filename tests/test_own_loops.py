"""Loops FASA does not own (issue 26, item 3): a foundation recorded and replayed from k-diffusion-style
samplers that call a bare UNet themselves, with no diffusers scheduler, the caller saying each iteration
(``record_foundation(...).at_step(i)``, ``handle.at_step(i)``).

The samplers and the eps-denoiser wrapper are written here from reading crowsonkb/k-diffusion at
4601bf085320592473f681a62808ed873d17fad5 (``k_diffusion/sampling.py``: ``sample_euler``, ``sample_heun``,
``sample_dpmpp_2m``, ``get_sigmas_karras``; ``k_diffusion/external.py``: ``DiscreteEpsDDPMDenoiser``), not
imported: k-diffusion 0.1.1 on PyPI requires torchvision, wandb, kornia, clip-anytorch and clean-fid, none of
which the project has. Each sampler calls ``on_step(i)`` at the top of iteration i (Heun's second call stays
in it). CFG runs batched (one call, ``[uncond, cond]``) or as separate calls (uncond, then cond).

Reference: the recomputing path, install_fasa on the same loop with PD and FD rows in one batch (FD rows
computed live); reuse must equal it within the kernel's tolerance and differ from the plain loop."""
from __future__ import annotations

import math

import pytest
import torch

from freecure_ops.adapters import install_fasa
from freecure_ops.pipeline import record_foundation
from test_adapters_helpers import random_mask, tiny_sd15

GUIDANCE = 3.0
TOL = 1e-4       # reuse vs recompute on these latents (float32, fp rounding of different batch splits)
EFFECT = 1e-3


class EpsDenoiser:
    """sigma -> denoised x for a diffusers UNet predicting eps (DiscreteEpsDDPMDenoiser's scalings and its
    interpolated sigma -> t), SD's scaled-linear betas."""

    def __init__(self, unet):
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.unet = unet
        self.log_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).log().float()

    def sigma_range(self):
        return self.log_sigmas[0].exp().item(), self.log_sigmas[-1].exp().item()

    def t_of(self, sigma):
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        low = dists.ge(0).cumsum(0).argmax(0).clamp(max=len(self.log_sigmas) - 2)
        w = ((self.log_sigmas[low] - log_sigma) / (self.log_sigmas[low] - self.log_sigmas[low + 1])).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).reshape(())

    def __call__(self, x, sigma, cond):
        eps = self.unet(x / (sigma ** 2 + 1) ** 0.5, self.t_of(sigma), encoder_hidden_states=cond).sample
        return x - eps * sigma


def karras_sigmas(n, sigma_min, sigma_max, rho=7.0):
    ramp = torch.linspace(0, 1, n)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sample_euler(model, x, sigmas, on_step):
    for i in range(len(sigmas) - 1):
        on_step(i)
        d = (x - model(x, sigmas[i])) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def sample_heun(model, x, sigmas, on_step):
    for i in range(len(sigmas) - 1):
        on_step(i)
        d = (x - model(x, sigmas[i])) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - model(x_2, sigmas[i + 1])) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


def sample_dpmpp_2m(model, x, sigmas, on_step):
    t_fn = lambda s: s.log().neg()   # noqa: E731
    sigma_fn = lambda t: t.neg().exp()   # noqa: E731
    old = None
    for i in range(len(sigmas) - 1):
        on_step(i)
        denoised = model(x, sigmas[i])
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            r = (t - t_fn(sigmas[i - 1])) / h
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * ((1 + 1 / (2 * r)) * denoised
                                                                        - (1 / (2 * r)) * old)
        old = denoised
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m}


def cfg_model(den, conds, batched, on_call=lambda uncond: None):
    """A k-diffusion model function with CFG over rows of ``x`` (one image each): ``conds`` = (uncond, cond)
    embeddings per row. Batched: one call on ``[x; x]`` (layout "cfg"); separate: uncond call, then cond."""
    uncond, cond = conds

    def model(x, sigma):
        if batched:
            out = den(torch.cat([x, x]), sigma, torch.cat([uncond, cond]))
            u, c = out.chunk(2)
        else:
            on_call(True)
            u = den(x, sigma, uncond)
            on_call(False)
            c = den(x, sigma, cond)
        return u + GUIDANCE * (c - u)
    return model


def embeddings(seed, n=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 7, 32, generator=g)


@pytest.fixture(scope="module")
def setup():
    unet = tiny_sd15(seed=7)
    den = EpsDenoiser(unet)
    sigma_min, sigma_max = den.sigma_range()
    x_t = torch.randn(1, 4, 8, 6, generator=torch.Generator().manual_seed(1))
    return unet, den, (sigma_min, sigma_max), x_t, dict(uncond=embeddings(0), pd=embeddings(1), fd=embeddings(2))


@pytest.mark.parametrize("sampler, batched, sf, steps", [
    ("euler", True, 1.0, None), ("euler", False, 1.0, None),
    ("heun", True, 1.0, None), ("heun", False, 0.5, {1, 2}),
    ("dpmpp_2m", True, 0.5, None), ("dpmpp_2m", False, 1.0, {0}),
])
def test_reuse_from_a_k_diffusion_loop_equals_recomputing(setup, sampler, batched, sf, steps):
    unet, den, (smin, smax), x_t, emb = setup
    sigmas = karras_sigmas(3, smin, smax)
    sample = SAMPLERS[sampler]
    x0 = x_t * sigmas[0]
    mask = random_mask((16, 12), seed=5)
    layout = "cfg" if batched else "plain"
    settings = dict(omega=2.0, layers="all", steps=steps, style_fidelity=sf)

    def run(model_fn, x, handle=None):
        return sample(model_fn, x, sigmas, (lambda i: handle.at_step(i)) if handle else (lambda i: None))

    def calls_say(handle):
        state = {}

        def on_step(i):
            state["i"] = i

        def on_call(uncond):
            handle.at_step(state["i"], uncond=uncond)
        return on_step, on_call

    # the plain loop, PD only
    plain = run(cfg_model(den, (emb["uncond"], emb["pd"]), batched), x0.clone())

    # recompute: PD and FD rows in one batch ([PD, FD] per guidance half)
    with install_fasa(unet, mask, layout=layout, **settings) as h:
        on_step, on_call = calls_say(h)
        both = sample(cfg_model(den, (emb["uncond"].repeat(2, 1, 1), torch.cat([emb["pd"], emb["fd"]])), batched,
                                on_call), torch.cat([x0, x0]), sigmas, lambda i: (on_step(i), h.at_step(i)))
    # reuse: pass 1 on the FD rows from the same loop, pass 2 on the PD rows
    with record_foundation(unet, layout=layout, **settings) as rec:
        on_step, on_call = calls_say(rec)
        fd = sample(cfg_model(den, (emb["uncond"], emb["fd"]), batched, on_call), x0.clone(), sigmas,
                    lambda i: (on_step(i), rec.at_step(i)))
    found = rec.finish(mask, latents=x0)
    assert found.num_inference_steps == (3 if steps is None else 1 + max(steps))
    with found.apply(unet, layout=layout) as h:
        on_step, on_call = calls_say(h)
        pd = sample(cfg_model(den, (emb["uncond"], emb["pd"]), batched, on_call), x0.clone(), sigmas,
                    lambda i: (on_step(i), h.at_step(i)))
        again = sample(cfg_model(den, (emb["uncond"], emb["pd"]), batched, on_call), x0.clone(), sigmas,
                       lambda i: (on_step(i), h.at_step(i)))     # at_step(0) again: a new loop, same record
    assert (fd - both[1:]).abs().max() <= TOL                          # FASA never changes FD rows
    assert (pd - both[:1]).abs().max() <= TOL, (pd - both[:1]).abs().max()
    assert torch.equal(pd, again)
    assert (pd - plain).abs().max() > EFFECT
    assert math.isfinite(pd.abs().max().item())


def test_own_loop_errors(setup):
    unet, den, _, x_t, emb = setup
    with install_fasa(unet, random_mask((8, 8)), layout="plain", layers="all", steps={0}) as h:
        with pytest.raises(ValueError, match=r"steps=\[0\] needs the denoising loop's step index.*at_step"):
            den(torch.cat([x_t, x_t]), torch.tensor(1.0), torch.cat([emb["pd"], emb["fd"]]))
        with pytest.raises(ValueError, match="step must be an int >= 0"):
            h.at_step(-1)
    with install_fasa(unet, random_mask((8, 8)), layout="cfg", layers="all") as h, \
            pytest.raises(ValueError, match=r"at_step\(uncond=True\) is for layout='plain'"):
        h.at_step(0, uncond=True)
    with record_foundation(unet, layout="plain", layers="all") as rec:
        pass
    with pytest.raises(ValueError, match="the loop recorded nothing"):
        rec.finish(random_mask((8, 8)), latents=x_t)
    with pytest.raises(ValueError, match="layout must be one of"):
        record_foundation(unet, layout=None)
