"""Asymmetric Prompt Guidance: with a model that predicts zero noise (zero velocity for FLUX), inversion then
denoising gives back the input latent; inversion sees the template prompt, denoising the full prompt; the
template prompt drops exactly the attribute words."""
from __future__ import annotations

import pytest
import torch

from freecure_ops.pipeline.apg import (apg_steps, apply_apg, ddim_invert_then_denoise, flow_invert_then_denoise,
                                       flow_sigmas)
from freecure_ops.pipeline.freecure import FreeCure
from tiny_pipes import BUILDERS, IMAGE, FakeParser  # noqa: F401

PD = "a photo of sks man with red hair and glasses"
FD = "a photo of man with red hair and glasses"
TEMPLATE = "a photo of sks man"

SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


def zero(x, t, cond):
    return torch.zeros_like(x)


@pytest.mark.parametrize("overrides", [{}, {"set_alpha_to_one": True}, {"timestep_spacing": "trailing"},
                                       {"timestep_spacing": "linspace", "steps_offset": 0}])
@pytest.mark.parametrize("n,gamma", [(10, 0.5), (7, 0.5), (4, 1.0), (50, 0.3)])
def test_ddim_zero_noise_round_trip(overrides, n, gamma):
    x = torch.randn(2, 4, 5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seen = []

    def spy(x_, t, cond):
        seen.append((int(t), cond))
        return torch.zeros_like(x_)

    out = ddim_invert_then_denoise(spy, x, {**SD_CONFIG, **overrides}, n, gamma, template="T", full="F")
    k = int(gamma * n)
    assert torch.allclose(out, x, rtol=1e-6, atol=1e-6)
    assert [c for _, c in seen] == ["T"] * k + ["F"] * k
    ts = [t for t, _ in seen]
    assert ts[:k] == sorted(ts[:k]) and ts[k:] == ts[:k][::-1]  # up the grid, then down the same grid


def test_flow_zero_velocity_round_trip():
    x = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(0))
    sigmas = torch.cat([torch.linspace(1.0, 0.25, 4), torch.zeros(1)])
    seen = []

    def spy(x_, s, cond):
        seen.append((s, cond))
        return torch.zeros_like(x_)

    out = flow_invert_then_denoise(spy, x, sigmas, 0.5, template="T", full="F")
    assert torch.equal(out, x)
    assert [c for _, c in seen] == ["T", "T", "F", "F"]          # k = 2 Euler steps each way
    assert [s for s, _ in seen] == pytest.approx([0.0, 0.25, 0.5, 0.25])  # from 0 up to s_{N-k}, then down
    # a constant velocity is integrated up and back down: back to the start, exactly
    out = flow_invert_then_denoise(lambda x_, s, c: torch.ones_like(x_), x, sigmas, 1.0)
    assert torch.allclose(out, x, atol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan"), "0.5", True])
def test_gamma_is_validated(bad):
    with pytest.raises(ValueError, match="gamma"):
        apg_steps(10, bad)


@pytest.fixture(scope="module")
def pipes():
    return {f: BUILDERS[f]() for f in ("sd1", "sdxl", "flux")}


def _stub_model(monkeypatch, pipe, family, record):
    """Replace the denoiser's forward by a stub that predicts zero noise / velocity and records its text input."""
    model = pipe.transformer if family == "flux" else pipe.unet

    def forward(*args, **kwargs):
        sample = kwargs.get("hidden_states", args[0] if args else kwargs.get("sample"))
        record.append(kwargs["encoder_hidden_states"].detach().clone())
        return (torch.zeros_like(sample),)

    monkeypatch.setattr(model, "forward", forward)


def _encoded(pipe, family, prompt):
    if family == "flux":
        return pipe.encode_prompt(prompt, None, device="cpu")[0]
    if family == "sd1":
        return pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    return pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)[0]


@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux"])
def test_apply_apg_with_zero_model_returns_the_input(pipes, family, monkeypatch):
    pipe = pipes[family]
    n_steps, gamma = 6, 0.5
    if family == "flux":
        x = torch.randn(1, (IMAGE // 4) ** 2, 16, generator=torch.Generator().manual_seed(0))
    else:
        x = torch.randn(1, 4, IMAGE // 2, IMAGE // 2, generator=torch.Generator().manual_seed(0))
    record = []
    _stub_model(monkeypatch, pipe, family, record)
    out = apply_apg(pipe, x, full={"prompt": PD}, template={"prompt": TEMPLATE}, num_inference_steps=n_steps,
                    gamma=gamma, height=IMAGE, width=IMAGE)
    assert torch.allclose(out, x, rtol=1e-5, atol=1e-5)
    k = int(gamma * n_steps)
    assert len(record) == 2 * k
    tmpl, full = _encoded(pipe, family, TEMPLATE), _encoded(pipe, family, PD)
    cond = [r[-1:] for r in record]  # the conditional row (CFG puts [uncond, cond])
    assert all(torch.allclose(c, tmpl, atol=1e-4) for c in cond[:k])
    assert all(torch.allclose(c, full, atol=1e-4) for c in cond[k:])
    assert not torch.allclose(tmpl, full, atol=1e-2)


@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux"])
def test_freecure_apg_uses_the_template_prompt(pipes, family, monkeypatch):
    pipe = pipes[family]
    fc = FreeCure(pipe, FakeParser(), layers="all")
    common = dict(num_inference_steps=4, height=IMAGE, width=IMAGE, output_type="pt", seed=0)
    base = fc(PD, fd_prompt=FD, **common)
    prompts = []
    real = pipe.encode_prompt

    def spy(*args, **kwargs):
        prompts.append(kwargs.get("prompt", args[0] if args else None))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipe, "encode_prompt", spy)
    out = fc(PD, fd_prompt=FD, apg=True, **common)
    assert out.template_prompts == [TEMPLATE]
    assert TEMPLATE in prompts and PD in prompts   # APG encodes the template and the full prompt
    assert set(out.timings) >= {"pass1", "mask", "pass2", "apg"}
    assert torch.equal(out.fd_images, base.fd_images)
    assert out.images.shape == base.images.shape and not torch.allclose(out.images, base.images)


def test_apg_with_embeddings_needs_a_template(pipes):
    pipe = pipes["sd1"]
    fc = FreeCure(pipe, FakeParser(), layers="all")
    pd_e, neg = pipe.encode_prompt(PD, "cpu", 1, True)
    fd_e, _ = pipe.encode_prompt(FD, "cpu", 1, True)
    kw = dict(pd={"prompt_embeds": pd_e, "negative_prompt_embeds": neg},
              fd={"prompt_embeds": fd_e, "negative_prompt_embeds": neg}, attribute_prompt=PD, seed=0,
              num_inference_steps=2, height=IMAGE, width=IMAGE, output_type="pt")
    with pytest.raises(ValueError, match="apg_template"):
        fc(apg=True, **kw)
    t_e, _ = pipe.encode_prompt(TEMPLATE, "cpu", 1, True)
    out = fc(apg=True, apg_template={"prompt_embeds": t_e}, **kw)
    assert out.images.shape == (1, 3, IMAGE, IMAGE) and out.template_prompts is None


def test_flow_sigmas_match_the_pipeline(pipes):
    pipe = pipes["flux"]
    s = flow_sigmas(pipe, 4, 16)
    assert s.shape == (5,) and s[-1] == 0 and bool((s[:-1] > s[1:]).all()) and s[0] == pytest.approx(1.0)
