"""FreeCure end to end on tiny SD1.5-, SDXL- and FLUX-style pipelines (random weights, 2 steps, 16x16 images)
with a fake parser: the two passes, the batch layout, the mask, processor restoration and the error paths."""
from __future__ import annotations

import warnings

import pytest
import torch

from freecure_ops.pipeline.freecure import (EmptyMaskError, FreeCure, FreeCureWarning, collate_branches)
from freecure_ops.adapters.discovery import resolve_model
from tiny_pipes import BUILDERS, IMAGE, FakeParser  # noqa: F401

PD = "a photo of sks man with red hair"
FD = "a photo of man with red hair"
STEPS = 2
FAMILIES = ("sd1", "sdxl", "flux")
COMMON = dict(num_inference_steps=STEPS, height=IMAGE, width=IMAGE)


@pytest.fixture(scope="module")
def pipes():
    return {}


def get(pipes, family):
    if family not in pipes:
        pipes[family] = BUILDERS[family]()
    return pipes[family]


def plain_dual_batch(fc, latents):
    """The pipeline itself on the [PD, FD] batch with the same initial noise and no FASA."""
    return fc.pipe([PD, FD], latents=torch.cat([latents, latents]), output_type="pt", **COMMON).images


def close(a, b, tol=2e-5):
    return (a - b).abs().max().item() <= tol


@pytest.mark.parametrize("family", FAMILIES)
def test_two_passes_fd_rows_and_fasa_effect(pipes, family):
    pipe = get(pipes, family)
    parser = FakeParser()
    fc = FreeCure(pipe, parser, layers="all", omega=2.0)
    out = fc(PD, fd_prompt=FD, seed=0, output_type="pt", **COMMON)
    assert out.images.shape == out.fd_images.shape == (1, 3, IMAGE, IMAGE)
    assert len(parser.calls) == 1 and parser.calls[0].shape == (3, IMAGE, IMAGE)
    assert out.mask.shape == (IMAGE, IMAGE) and out.mask[: IMAGE // 2].all() and not out.mask[IMAGE // 2:].any()
    assert out.attributes == [["hair"]] and out.fasa_applied
    assert set(out.timings) == {"pass1", "mask", "pass2", "total"}

    # pass 1 is the FD branch from the seed's noise, exactly as the pipeline draws it
    own = pipe(FD, generator=torch.Generator().manual_seed(0), output_type="pt", **COMMON).images
    assert torch.equal(out.fd_images, own)

    # pass 2 with the same mask (pass 1 skipped): its FD row is the pass-1 FD image (fp32 rounding level)
    again = fc(PD, fd_prompt=FD, seed=0, mask=out.mask, output_type="pt", **COMMON)
    assert len(parser.calls) == 1 and "pass1" not in again.timings
    assert close(again.fd_images, out.fd_images)
    assert torch.allclose(again.images, out.images, atol=1e-6)

    # FASA changes the PD image; the FD row of the plain dual batch is the same FD image
    latents = fc.initial_latents(1, IMAGE, IMAGE, torch.Generator().manual_seed(0))
    plain = plain_dual_batch(fc, latents)
    assert (out.images[0] - plain[0]).abs().max().item() > 1e-3
    assert close(plain[1:], out.fd_images)


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_mask_is_the_plain_dual_batch_run(pipes, family):
    with pytest.raises(EmptyMaskError, match=r"empty as given \(mask=\)"):  # before anything runs
        FreeCure(get(pipes, family), layers="all")(PD, fd_prompt=FD, seed=1, mask=torch.zeros(IMAGE, IMAGE),
                                                   **COMMON)
    fc = FreeCure(get(pipes, family), layers="all", omega=2.0, empty_mask="warn")
    with pytest.warns(FreeCureWarning, match="as given"):
        out = fc(PD, fd_prompt=FD, seed=1, mask=torch.zeros(IMAGE, IMAGE), output_type="pt", **COMMON)
    plain = plain_dual_batch(fc, fc.initial_latents(1, IMAGE, IMAGE, torch.Generator().manual_seed(1)))
    assert close(out.images, plain[:1]) and close(out.fd_images, plain[1:])


@pytest.mark.parametrize("family", FAMILIES)
def test_processors_restored_after_call_and_after_exception(pipes, family):
    pipe = get(pipes, family)
    model, _ = resolve_model(pipe)
    before = dict(model.attn_processors)
    fc = FreeCure(pipe, FakeParser(), layers="all")
    fc(PD, fd_prompt=FD, seed=0, output_type="pt", **COMMON)
    after = model.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)

    def boom(p, i, t, kw):
        if "pass 2" in p._progress_bar_config["desc"]:  # pass 2 (PD + FD, or PD alone with FD reuse)
            raise RuntimeError("boom")
        return kw

    with pytest.raises(RuntimeError, match="boom"):
        fc(PD, fd_prompt=FD, seed=0, output_type="pt", callback_on_step_end=boom, **COMMON)
    after = model.attn_processors
    assert all(after[k] is before[k] for k in before)
    assert getattr(model, "_freecure_fasa_handle", None) is None
    fc(PD, fd_prompt=FD, seed=0, output_type="pt", **COMMON)  # installs again cleanly


def test_embeddings_and_fd_function_match_the_prompt_path(pipes):
    """PD/FD given as prompt embeddings (as a personalization model supplies them), FD derived by a function."""
    pipe = get(pipes, "sd1")
    fc = FreeCure(pipe, FakeParser(), layers="all", omega=2.0)
    by_prompt = fc(PD, fd_prompt=FD, negative_prompt="glasses", seed=3, output_type="pt", **COMMON)

    def enc(text):
        return pipe.encode_prompt(text, "cpu", 1, True, negative_prompt="glasses")

    pd_e, neg_e = enc(PD)
    fd_e, _ = enc(FD)
    out = fc(pd={"prompt_embeds": pd_e, "negative_prompt_embeds": neg_e},
             fd=lambda pd: {**pd, "prompt_embeds": fd_e}, attribute_prompt=PD, seed=3, output_type="pt", **COMMON)
    assert torch.allclose(out.images, by_prompt.images, atol=1e-6)
    assert torch.allclose(out.fd_images, by_prompt.fd_images, atol=1e-6)
    with pytest.raises(ValueError, match="attribute_prompt"):
        fc(pd={"prompt_embeds": pd_e, "negative_prompt_embeds": neg_e},
           fd={"prompt_embeds": fd_e, "negative_prompt_embeds": neg_e}, seed=3, **COMMON)


def test_two_pairs_per_call_get_one_mask_each(pipes):
    pipe = get(pipes, "sd1")
    parser = FakeParser()
    fc = FreeCure(pipe, parser, layers="all")
    pds, fds = [PD, "a photo of sks woman with blue eyes"], [FD, "a photo of woman with blue eyes"]
    with pytest.warns(FreeCureWarning, match=r"images \[1\] are empty"):
        out = fc(pds, fd_prompt=fds, seed=0, output_type="pt", **COMMON)
    assert out.images.shape[0] == 2 and out.mask.shape == (2, IMAGE, IMAGE) and len(parser.calls) == 2
    assert out.attributes == [["hair"], ["eye"]]
    assert out.mask[0].any() and not out.mask[1].any()  # the fake parser paints hair only
    with pytest.warns(FreeCureWarning, match=r"images \[1\] are empty as given \(mask=\)"):  # the same mask, given
        again = fc(pds, fd_prompt=fds, seed=0, mask=out.mask, output_type="pt", **COMMON)
    assert close(again.fd_images, out.fd_images)


def test_no_attribute_words_runs_the_plain_pipeline(pipes):
    pipe = get(pipes, "sd1")
    parser = FakeParser()
    fc = FreeCure(pipe, parser, layers="all")
    with pytest.warns(FreeCureWarning, match="FASA has nothing to do"):
        out = fc("a photo of sks man", fd_prompt="a photo of man", seed=0, output_type="pt", **COMMON)
    own = pipe("a photo of sks man", generator=torch.Generator().manual_seed(0), output_type="pt", **COMMON).images
    assert torch.equal(out.images, own) and not out.fasa_applied and not parser.calls


def test_mask_empty_after_parsing(pipes):
    fc = FreeCure(get(pipes, "sd1"), FakeParser(hair_rows=0), layers="all")
    with pytest.raises(EmptyMaskError, match="empty after parsing"):
        fc(PD, fd_prompt=FD, seed=0, **COMMON)
    fc = FreeCure(get(pipes, "sd1"), FakeParser(hair_rows=0), layers="all", empty_mask="warn")
    with pytest.warns(FreeCureWarning, match="empty after parsing"):
        out = fc(PD, fd_prompt=FD, seed=0, output_type="pt", **COMMON)
    assert not out.mask.any()


def test_parser_labels_select_the_label_table(pipes):
    """A parser with its own class order brings its labels; FreeCure builds the table from them."""
    labels = {"background": 0, "skin": 1, "hair": 5}
    parser = FakeParser(labels=labels)
    fc = FreeCure(get(pipes, "sd1"), parser, layers="all", empty_mask="warn")
    assert fc.label_table["hair"] == (5,)
    with pytest.warns(FreeCureWarning):
        out = fc(PD, fd_prompt=FD, seed=0, output_type="pt", **COMMON)  # the fake paints 17: not hair here
    assert not out.mask.any()


def test_unknown_family_and_bad_arguments(pipes):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)  # the DDPM UNet's random init
    ddpm = DDPMPipeline(unet=UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=8,
                                         down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2),
                        scheduler=DDPMScheduler())
    with pytest.raises(TypeError, match="unknown pipeline family"):
        FreeCure(ddpm)
    pipe = get(pipes, "sd1")
    with pytest.raises(TypeError, match="pipe must be a diffusers pipeline"):
        FreeCure(pipe.unet)
    with pytest.raises(ValueError, match="layers=None takes the sd1 preset"):
        FreeCure(pipe)  # the tiny UNet has 4 blocks: the SD1.5 preset (10..15) does not fit
    for kwargs, err, what in [(dict(omega="x"), TypeError, "omega"), (dict(mode="fast"), ValueError, "mode"),
                              (dict(style_fidelity=2.0), ValueError, "style_fidelity"),
                              (dict(layers=[99]), ValueError, "layers"),
                              (dict(empty_mask="x"), ValueError, "empty_mask"),
                              (dict(mask_dilate=-1), ValueError, "mask_dilate")]:
        with pytest.raises(err, match=what):
            FreeCure(pipe, layers=kwargs.pop("layers", "all"), **kwargs)
    with pytest.raises(TypeError, match="parser"):
        FreeCure(pipe, parser="bisenet", layers="all")

    fc = FreeCure(pipe, FakeParser(), layers="all")
    calls = [(dict(), ValueError, "no PD conditioning"),
             (dict(prompt=PD), ValueError, "no FD conditioning"),
             (dict(prompt=PD, fd_prompt=FD, seed=1, generator=torch.Generator()), ValueError, "not both"),
             (dict(prompt=PD, fd_prompt=FD, seed=1.5), TypeError, "seed"),
             (dict(prompt=PD, fd_prompt=FD, apg=True, gamma=0.0), ValueError, "gamma"),
             (dict(prompt=PD, fd_prompt=FD, apg="yes"), TypeError, "apg"),
             (dict(prompt=PD, fd_prompt=FD, output_type="jpeg"), ValueError, "output_type"),
             (dict(prompt=PD, fd_prompt=FD, num_images_per_prompt=2), ValueError, "num_images_per_prompt"),
             (dict(prompt=PD, fd_prompt=[FD, FD]), ValueError, "FD holds 2"),
             (dict(prompt=PD, fd_prompt=FD, mask=torch.ones(3)), ValueError, "mask"),
             (dict(prompt=PD, fd_prompt=FD, mask=[[1]]), TypeError, "mask"),
             (dict(prompt=PD, fd={"prompt": FD, "guidance_rescale": 0.3}), ValueError, "same keyword arguments"),
             (dict(prompt=PD, fd=42), TypeError, "fd must be")]
    for kwargs, err, what in calls:
        with pytest.raises(err, match=what):
            fc(**kwargs, **COMMON)
    no_parser = FreeCure(pipe, layers="all")
    with pytest.raises(ValueError, match="needs a parser"):
        no_parser(PD, fd_prompt=FD, seed=0, **COMMON)


def test_collate_branches():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 3, 4, generator=g), torch.randn(1, 3, 4, generator=g)
    out = collate_branches({"prompt": "x", "prompt_embeds": a, "ip": [a, a], "guidance_rescale": 0.0, "p2": None},
                           {"prompt": "y", "prompt_embeds": b, "ip": [b, a], "guidance_rescale": 0.0, "p2": None})
    assert out["prompt"] == ["x", "y"] and torch.equal(out["prompt_embeds"], torch.cat([a, b]))
    assert torch.equal(out["ip"][0], torch.cat([a, b])) and out["guidance_rescale"] == 0.0 and out["p2"] is None
    # IP-Adapter inputs apply to every prompt of a diffusers call: passed once when equal, refused when not
    pn, pp, fn = (torch.full((1, 2), float(i)) for i in range(3))
    ip = collate_branches({"ip_adapter_image_embeds": [torch.cat([pn, pp])]},
                          {"ip_adapter_image_embeds": [torch.cat([pn, pp])]})["ip_adapter_image_embeds"][0]
    assert ip[:, 0].tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="one IP-Adapter input to every prompt"):
        collate_branches({"ip_adapter_image_embeds": [torch.cat([pn, pp])]},
                         {"ip_adapter_image_embeds": [torch.cat([fn, pp])]})
    with pytest.raises(ValueError, match="differ beyond the batch"):
        collate_branches({"prompt_embeds": a}, {"prompt_embeds": torch.randn(1, 5, 4, generator=g)})
    with pytest.raises(ValueError, match="guidance_rescale"):
        collate_branches({"guidance_rescale": 0.0}, {"guidance_rescale": 0.7})
    with pytest.raises(ValueError, match="2 prompts"):
        collate_branches({"prompt": ["x", "y"]}, {"prompt": "z"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert collate_branches({}, {}) == {}


# ---- checked before anything runs ---------------------------------------------------------------------------
class _NoRun:
    """Fails the test if the denoiser runs."""

    def __init__(self, pipe):
        model, _ = resolve_model(pipe)
        self._h = model.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        raise AssertionError("the model ran before the bad input was refused")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._h.remove()


@pytest.mark.parametrize("kw,err,words", [
    (dict(apg=True, pd={"prompt_embeds": torch.zeros(1, 77, 32)}, prompt=None, attribute_prompt="red hair"),
     ValueError, "apg_template"),
    (dict(apg=True, apg_template=5), TypeError, "apg_template"),
    (dict(apg=True, apg_template=["a", "b"]), ValueError, "apg_template holds 2"),
    (dict(apg=True, gamma=0.3), ValueError, "0 APG steps"),
    (dict(apg=True, ip_adapter_image_embeds=[torch.zeros(2, 1, 8)]), ValueError, "IP-Adapter"),
    (dict(height=0), ValueError, "height"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
    (dict(guidance_scale="7"), TypeError, "guidance_scale"),
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale"),
    (dict(mask=torch.ones(3, IMAGE, IMAGE)), ValueError, "3 masks"),
    # float32 would round it to 0 (excluded): fasa_attention refuses it, and so does FreeCure
    (dict(mask=torch.full((IMAGE, IMAGE), 1e-50, dtype=torch.float64)), ValueError, "^mask must hold"),
    (dict(mask=torch.ones(IMAGE, IMAGE, requires_grad=True)), ValueError, "^mask must not require grad"),
])
def test_bad_call_arguments_are_refused_before_pass_1(pipes, kw, err, words):
    pipe = get(pipes, "sd1")
    call = dict(prompt=PD, fd_prompt=FD, seed=0, output_type="pt", **COMMON)
    call.update(kw)
    if call.get("prompt") is None:
        call.pop("prompt")
        call.pop("fd_prompt")
        call["fd"] = {"prompt_embeds": torch.zeros(1, 77, 32)}
    with _NoRun(pipe), pytest.raises(err, match=words):
        FreeCure(pipe, FakeParser(), layers="all")(**call)


@pytest.mark.parametrize("omega,value", [(1e30, 1e10), (None, 2e38)])  # None: the preset, 0.5
def test_omega_times_mask_beyond_float32_is_refused_before_pass_1(pipes, omega, value):
    pipe = get(pipes, "sd1")
    fc = FreeCure(pipe, FakeParser(), layers="all", omega=omega)
    with _NoRun(pipe), pytest.raises(ValueError, match="^omega \\* max\\(mask\\)"):
        fc(PD, fd_prompt=FD, seed=0, mask=torch.full((IMAGE, IMAGE), value), **COMMON)


def test_apg_follows_a_custom_schedule(pipes, monkeypatch):
    import freecure_ops.pipeline.freecure as fcm

    seen = {}

    def fake_apg(pipe, latents, **kw):
        seen.update(kw)
        return latents

    monkeypatch.setattr(fcm, "apply_apg", fake_apg)
    FreeCure(get(pipes, "sdxl"), FakeParser(), layers="all")(
        PD, fd_prompt=FD, seed=0, output_type="pt", apg=True, timesteps=[999, 700, 300], height=IMAGE, width=IMAGE)
    assert seen["num_inference_steps"] == 3


def test_a_mask_painted_in_alpha_reads_as_on_the_command_line():
    import numpy as np
    from PIL import Image

    from freecure_ops.cli.args import read_mask_png
    from freecure_ops.pipeline.freecure import _mask_to_tensor

    alpha = np.zeros((8, 8), dtype=np.uint8)
    alpha[:2] = 255
    rgba = np.dstack([np.full((8, 8, 3), 255, np.uint8), alpha])
    im = Image.fromarray(rgba, "RGBA")
    got, _ = _mask_to_tensor(im)
    assert torch.equal(got, torch.from_numpy(alpha.astype(np.float32) / 255))
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        im.save(Path(d) / "m.png")
        assert torch.equal(got, torch.from_numpy(read_mask_png(Path(d) / "m.png")))


def test_pag_pipelines_are_refused_up_front(pipes):
    from diffusers import StableDiffusionXLPAGPipeline

    pag = StableDiffusionXLPAGPipeline.from_pipe(BUILDERS["sdxl"](), pag_applied_layers=["mid"])  # own copy
    model, _ = resolve_model(pag)
    before = dict(model.attn_processors)
    with pytest.raises(ValueError, match="perturbed-attention guidance"):
        FreeCure(pag, FakeParser(), layers="all")
    assert all(model.attn_processors[k] is v for k, v in before.items())


def test_a_plain_baseline_can_share_freecures_noise():
    """``FreeCure.noise`` + ``step_generators``: a plain pipeline run gets the noise FreeCure's PD branch gets
    (here FreeCure's own plain path: a prompt naming no attribute), with a stochastic sampler."""
    import diffusers

    from freecure_ops.pipeline.freecure import step_generators

    pipe = BUILDERS["sd1"]()
    pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    fc = FreeCure(pipe, FakeParser(), layers="all")
    with pytest.warns(FreeCureWarning, match="nothing to do"):
        out = fc("a photo of sks man", fd_prompt="a photo of man", seed=4, output_type="pt", **COMMON)
    latents, seeds = fc.noise(1, IMAGE, IMAGE, seed=4)
    plain = pipe("a photo of sks man", latents=latents, generator=step_generators(seeds), output_type="pt",
                 **COMMON).images
    assert torch.equal(out.images, plain)


def test_an_empty_mask_in_scale_mode_is_not_called_a_no_op(pipes):
    """"scale" mode excludes no FD key: with an empty mask every FD logit is omega * 0 * s = 0, still attended,
    so the PD image changes; the empty-mask message says so instead of "nothing to do"."""
    pipe = get(pipes, "sd1")
    empty = torch.zeros(IMAGE, IMAGE)
    with pytest.raises(EmptyMaskError, match="mode 'scale' FASA still acts") as info:
        FreeCure(pipe, layers="all", mode="scale")(PD, fd_prompt=FD, seed=1, mask=empty, **COMMON)
    assert "nothing to do" not in str(info.value)
    fc = FreeCure(pipe, layers="all", omega=2.0, mode="scale", empty_mask="warn")
    with pytest.warns(FreeCureWarning, match="still acts") as seen:
        out = fc(PD, fd_prompt=FD, seed=1, mask=empty, output_type="pt", **COMMON)
    assert not any("nothing to do" in str(w.message) for w in seen)
    plain = plain_dual_batch(fc, fc.initial_latents(1, IMAGE, IMAGE, torch.Generator().manual_seed(1)))
    assert (out.images - plain[:1]).abs().max().item() > 1e-3 and close(out.fd_images, plain[1:])
