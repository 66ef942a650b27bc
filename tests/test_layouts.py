"""How install_fasa pairs PD and FD rows (issue 11 item 1), keeps its own copy of the mask (item 4), and keeps FD
rows bit-identical on the legacy AttnProcessor (item 5)."""
from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

import freecure_ops.adapters.attend as attend_mod
from freecure_ops.adapters import install_fasa
from test_adapters_helpers import random_mask, run, tiny_sd15, unet_inputs
from tiny_pipes import tiny_sd_pipe

PROMPTS = ["a photo of sks man with red hair", "a photo of sks woman with blue eyes",   # PD_1, PD_2
           "a photo of man with red hair", "a photo of woman with blue eyes"]           # FD_1, FD_2


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipe()


def _latents(pipe, n):
    lat = torch.randn(1, pipe.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    return lat.expand(n, -1, -1, -1).clone()       # every row starts from the same noise


def _generate(pipe, prompts, gs):
    return pipe(prompts, num_inference_steps=2, guidance_scale=gs, height=16, width=16, output_type="latent",
                latents=_latents(pipe, len(prompts))).images


@pytest.fixture
def spy(monkeypatch):
    """Records (number of PD rows, PD/FD row slices are told apart by the k_f batch) of each FASA call."""
    calls = []
    real = attend_mod.fasa_attention

    def fake(q, k_p, k_f, v_p, v_f, *args, **kwargs):
        calls.append(q.shape[0])
        return real(q, k_p, k_f, v_p, v_f, *args, **kwargs)

    monkeypatch.setattr(attend_mod, "fasa_attention", fake)
    return calls


@pytest.mark.parametrize("gs", [1.0, 0.0, 5.0])
def test_pipeline_layout_follows_the_call(pipe, spy, gs):
    """[PD_1, PD_2, FD_1, FD_2] with and without CFG: both PD rows get FASA, both FD rows stay stock."""
    stock = _generate(pipe, PROMPTS, gs)
    mask = random_mask((16, 16), p=0.7)
    with install_fasa(pipe, mask, 2.0, layers="all", style_fidelity=0.0) as handle:
        out = _generate(pipe, PROMPTS, gs)
        assert handle.controller.layout == "auto"
        assert handle.controller.call_layout == ("cfg" if gs > 1 else "plain")
    assert torch.equal(out[2:], stock[2:])                     # FD_1, FD_2 untouched
    assert not torch.equal(out[0], stock[0]) and not torch.equal(out[1], stock[1])
    # every FASA call holds both PD rows: one call per layer without CFG, two (uncond, cond) with it
    assert spy and set(spy) == {2}
    assert len(spy) == 2 * 4 * (2 if gs > 1 else 1)           # 2 steps x 4 layers x guidance halves


@pytest.mark.parametrize("gs", [1.0, 5.0])
def test_one_prompt_is_a_clear_error(pipe, gs):
    with install_fasa(pipe, random_mask((16, 16)), layers="all"):
        with pytest.raises(ValueError, match=r"\[PD_1..PD_n, FD_1..FD_n\]"):
            _generate(pipe, PROMPTS[:1], gs)


def test_bare_unet_must_be_told_the_layout():
    unet = tiny_sd15()
    with pytest.raises(ValueError, match="^layout=None .*layout='cfg'.*layout='plain'"):
        install_fasa(unet, random_mask((8, 8)), layers="all")
    from types import SimpleNamespace
    with pytest.raises(ValueError, match="^layout=None"):
        install_fasa(SimpleNamespace(unet=unet), random_mask((8, 8)), layers="all")
    # told: a batch of 4 without CFG pairs [PD_1, PD_2, FD_1, FD_2]
    kw = unet_inputs(unet, 4, 8, 8)
    stock = run(unet, kw)
    with install_fasa(unet, random_mask((8, 8), p=0.7), 2.0, layers="all", layout="plain"):
        out = run(unet, kw)
    assert torch.equal(out[2:], stock[2:]) and not torch.equal(out[:2], stock[:2])


@pytest.mark.parametrize("edit", ["install", "set_mask"])
def test_mask_is_copied(edit):
    """In-place edits of the caller's mask after install_fasa / set_mask change nothing (before or after the
    first forward); set_mask takes a new mask."""
    unet = tiny_sd15()
    kw = unet_inputs(unet, 4, 8, 8)
    mask = random_mask((8, 8), p=0.6).float()
    with install_fasa(unet, mask.clone(), 2.0, layers="all", layout="cfg"):
        want = run(unet, kw)
    zeros = torch.zeros(8, 8)
    with install_fasa(unet, zeros.clone(), 2.0, layers="all", layout="cfg"):
        want_zero = run(unet, kw)
    mine = mask.clone()
    with install_fasa(unet, mine if edit == "install" else zeros.clone(), 2.0, layers="all", layout="cfg") as h:
        if edit == "set_mask":
            h.set_mask(mine)
        mine.zero_()                                             # before the first generation
        assert torch.equal(run(unet, kw), want)
        mine.fill_(1.0)                                          # after it
        assert torch.equal(run(unet, kw), want)
        h.set_mask(mine.zero_())
        assert torch.equal(run(unet, kw), want_zero)


def test_legacy_attn_processor_fd_rows_are_bit_identical():
    unet = tiny_sd15()
    unet.set_attn_processor(AttnProcessor())
    kw = unet_inputs(unet, 4, 8, 8)
    stock = run(unet, kw)
    mask = random_mask((8, 8), p=0.7)
    with install_fasa(unet, mask, 2.0, layers="all", layout="cfg", style_fidelity=0.0) as handle:
        assert all(p.kind == "legacy" for p in (b[2] for b in handle._installed))
        out = run(unet, kw)
        handle.enabled = False
        assert torch.equal(run(unet, kw), stock)
    assert torch.equal(out[1], stock[1]) and torch.equal(out[3], stock[3])      # FD rows, bit for bit
    assert not torch.equal(out[0], stock[0]) and not torch.equal(out[2], stock[2])
    assert all(type(p) is AttnProcessor for p in unet.attn_processors.values())


def test_legacy_pd_rows_match_the_sdpa_processor():
    """The legacy path computes the same FASA as the AttnProcessor2_0 path (up to rounding)."""
    a, b = tiny_sd15(), tiny_sd15()
    b.set_attn_processor(AttnProcessor())
    kw = unet_inputs(a, 4, 8, 8)
    mask = random_mask((8, 8), p=0.7)
    with install_fasa(a, mask, 2.0, layers="all", layout="cfg"), install_fasa(b, mask, 2.0, layers="all",
                                                                                 layout="cfg"):
        torch.testing.assert_close(run(b, kw), run(a, kw), atol=1e-4, rtol=1e-4)
