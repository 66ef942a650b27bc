"""Every knob that reaches the math, checked by value (not only "the output changed"):

* ``omega`` and ``mode`` through :class:`FreeCure` and through the ``freecure`` CLI: the values that arrive at
  the attention op are the ones asked for (and the family preset when none is asked for);
* an asymmetric style fidelity (0.3, so that swapping the two blend weights shows) against the float64 oracle,
  for UNet and FLUX layers;
* ``only_cross_attention`` blocks (an ``attn1`` that is cross-attention) are left stock.
"""
from __future__ import annotations

import pytest
import torch

import freecure_ops.adapters.attend as attend
from freecure_ops.adapters import find_self_attention_blocks, install_fasa
from test_adapters_helpers import (LayerCapture, assert_close, capture_grids, flux_attn_oracle, flux_inputs,
                                   mask_tokens, pair_rows, run, soft_mask, tiny_flux, tiny_sdxl, unet_attn1_oracle,
                                   unet_inputs)
from tiny_pipes import IMAGE, tiny_sd_pipe

PD = "a photo of sks man with red hair"
FD = "a photo of man with red hair"


@pytest.fixture
def op_calls(monkeypatch):
    """Records (omega, mode, backend, n_txt) of every FASA op call the adapters make, then runs the op."""
    calls = []
    real = attend.fasa_attention

    def spy(*args, **kwargs):
        omega = args[6] if len(args) > 6 else kwargs["omega"]
        calls.append(dict(omega=omega, mode=kwargs.get("mode", "bias"), backend=kwargs.get("backend", "auto"),
                          n_txt=kwargs.get("n_txt", 0)))
        return real(*args, **kwargs)

    monkeypatch.setattr(attend, "fasa_attention", spy)
    return calls


# ---------------------------------------------------------------------------------------------------------------
# omega and mode through FreeCure and the CLI


@pytest.fixture(scope="module")
def sd_pipe():
    return tiny_sd_pipe()


def _hair_mask():
    m = torch.zeros(IMAGE, IMAGE)
    m[: IMAGE // 2] = 1.0
    return m


@pytest.mark.parametrize("omega,mode", [(2.5, "scale"), (0.7, "bias"), (None, "bias")])
def test_freecure_hands_its_omega_and_mode_to_the_op(sd_pipe, op_calls, omega, mode):
    from freecure_ops.pipeline.freecure import FreeCure

    fc = FreeCure(sd_pipe, layers="all", omega=omega, mode=mode, backend="torch")
    fc(PD, fd_prompt=FD, mask=_hair_mask(), seed=0, num_inference_steps=2, height=IMAGE, width=IMAGE,
       output_type="pt")
    want = 0.5 if omega is None else omega  # None: the SD1.x preset (SPEC.md: omega 0.5)
    assert op_calls, "FASA never ran"
    assert {c["omega"] for c in op_calls} == {want}
    assert {c["mode"] for c in op_calls} == {mode}
    assert {c["backend"] for c in op_calls} == {"torch"}


@pytest.mark.parametrize("omega,mode,sf", [(3.0, "scale", 0.3), (0.8, "bias", 0.0)])
def test_freecure_equals_install_fasa_by_hand(sd_pipe, omega, mode, sf):
    """By value end to end: FreeCure(omega, mode, style_fidelity) is the pipeline run by hand on the
    [PD, FD] batch with install_fasa(omega, mode, style_fidelity), from the same initial noise."""
    from freecure_ops.pipeline.freecure import FreeCure

    mask = _hair_mask()
    common = dict(num_inference_steps=2, height=IMAGE, width=IMAGE, output_type="pt")
    fc = FreeCure(sd_pipe, layers="all", omega=omega, mode=mode, style_fidelity=sf)
    out = fc(PD, fd_prompt=FD, mask=mask, seed=0, **common)
    latents = fc.initial_latents(1, IMAGE, IMAGE, torch.Generator().manual_seed(0))
    with install_fasa(sd_pipe, mask, omega, layers="all", layout="cfg", mode=mode, style_fidelity=sf):
        by_hand = sd_pipe([PD, FD], latents=torch.cat([latents, latents]), **common).images
    assert torch.equal(out.images, by_hand[:1]) and torch.equal(out.fd_images, by_hand[1:])
    # and the knobs matter here: the default settings give another image
    with install_fasa(sd_pipe, mask, layers="all", layout="cfg"):
        default = sd_pipe([PD, FD], latents=torch.cat([latents, latents]), **common).images
    assert (default[:1] - out.images).abs().max() > 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, sd_pipe):
    path = tmp_path_factory.mktemp("tiny-sd-knobs")
    sd_pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mask_png(tmp_path_factory):
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("mask") / "hair.png"
    Image.fromarray((_hair_mask().numpy() * 255).astype(np.uint8), mode="L").save(path)
    return path


def _cli(model_dir, mask_png, out, *extra):
    from freecure_ops.cli import main

    return main(["generate", "--model", str(model_dir), "--prompt", PD, "--fd-prompt", FD, "--steps", "2",
                 "--seed", "0", "--height", str(IMAGE), "--width", str(IMAGE), "--layers", "all", "--quiet",
                 "--out", str(out), "--mask", str(mask_png), *extra])


@pytest.mark.parametrize("extra,omega,mode,backend", [
    (["--omega", "2.5", "--mode", "scale", "--backend", "torch"], 2.5, "scale", "torch"),
    (["--omega", "0.25", "--backend", "triton"], 0.25, "bias", "triton"),   # the interpreter on CPU
    (["--backend", "torch"], 0.5, "bias", "torch"),                         # no --omega: the SD1.x preset
])
def test_cli_hands_omega_mode_backend_to_the_op(model_dir, mask_png, tmp_path, op_calls, extra, omega, mode,
                                                backend):
    assert _cli(model_dir, mask_png, tmp_path / "out", *extra) == 0
    assert op_calls, "FASA never ran"
    assert {c["omega"] for c in op_calls} == {omega}
    assert {c["mode"] for c in op_calls} == {mode}
    assert {c["backend"] for c in op_calls} == {backend}


def test_cli_hands_style_fidelity_and_layers_to_install_fasa(model_dir, mask_png, tmp_path, monkeypatch):
    import freecure_ops.pipeline.freecure as fc_mod

    seen = []
    real = fc_mod.install_fasa

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fc_mod, "install_fasa", spy)
    assert _cli(model_dir, mask_png, tmp_path / "out", "--style-fidelity", "0.3", "--layers", "1,2") == 0
    assert len(seen) == 1
    assert seen[0]["style_fidelity"] == 0.3 and sorted(seen[0]["layers"]) == [1, 2]


# ---------------------------------------------------------------------------------------------------------------
# style fidelity 0.3 against the oracle


def test_asymmetric_style_fidelity_unet_against_oracle():
    """sf = 0.3: the unconditional PD rows are 0.7 * FASA + 0.3 * plain (a swap of the weights gives
    0.3 * FASA + 0.7 * plain, far outside the tolerance); conditional PD rows are pure FASA."""
    unet = tiny_sdxl(seed=2)
    kw = unet_inputs(unet, 4, 10, 6)
    mask = soft_mask((10, 6))
    blocks = {b.name: b for b in find_self_attention_blocks(unet)}
    grids, hooks = capture_grids(unet, blocks)
    try:
        with install_fasa(unet, mask, 1.3, layers="all", layout="cfg", style_fidelity=0.3):
            with LayerCapture({n: b.attn for n, b in blocks.items()}) as cap:
                run(unet, kw)
    finally:
        for h in hooks:
            h.remove()
    assert set(cap.records) == set(blocks)
    pairs = pair_rows(4, "cfg")
    for name, (args, _, output) in cap.records.items():
        tok = mask_tokens(mask, *grids[name])
        want = unet_attn1_oracle(blocks[name].attn, args[0], pairs, tok, 1.3, sf=0.3)
        assert_close(output, want, 2e-5, what=name)
        swapped = unet_attn1_oracle(blocks[name].attn, args[0], pairs, tok, 1.3, sf=0.7)
        assert (swapped[0] - want[0]).abs().max() > 100 * 2e-5 * max(1.0, want.abs().max().item()), \
            "the case cannot tell sf from 1 - sf"


def test_asymmetric_style_fidelity_flux_against_oracle():
    flux = tiny_flux(seed=3)
    grid, n_txt = (4, 6), 5
    kw = flux_inputs(4, *grid, n_txt)
    mask = soft_mask((4, 6))
    blocks = {b.name: b for b in find_self_attention_blocks(flux)}
    rope = {}
    handle = flux.pos_embed.register_forward_hook(lambda m, a, o: rope.__setitem__("rope", o))
    try:
        with install_fasa(flux, mask, 1.2, layers="all", layout="cfg", style_fidelity=0.3):
            with LayerCapture({n: b.attn for n, b in blocks.items()}) as cap:
                run(flux, kw)
    finally:
        handle.remove()
    pairs = pair_rows(4, "cfg")
    tok = mask_tokens(mask, *grid)
    for name, (args, kwargs, output) in cap.records.items():
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        rot = kwargs.get("image_rotary_emb", rope["rope"])
        if blocks[name].kind == "flux_double":
            want = flux_attn_oracle(blocks[name].attn, hidden, rot, pairs, tok, 1.2, sf=0.3,
                                    enc=kwargs["encoder_hidden_states"])
            for got, exp in zip(output, want):
                assert_close(got, exp, 2e-5, what=name)
        else:
            want = flux_attn_oracle(blocks[name].attn, hidden, rot, pairs, tok, 1.2, sf=0.3, n_txt=n_txt)
            assert_close(output, want, 2e-5, what=name)


# ---------------------------------------------------------------------------------------------------------------
# only_cross_attention: an attn1 that is cross-attention stays stock


def test_only_cross_attention_blocks_are_left_stock():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=2,
        only_cross_attention=True, norm_num_groups=8).eval()
    # attn1 attends to the text in every down/up block (the mid block has no such option: it stays self-attention)
    cross = [b.index for b in find_self_attention_blocks(unet) if b.attn.is_cross_attention]
    assert len(cross) == 6
    kw = unet_inputs(unet, 4, 6, 10)
    stock = run(unet, kw)
    with install_fasa(unet, soft_mask((6, 10)), 2.0, layers=cross, layout="cfg") as handle:
        assert handle.layers == tuple(cross)
        out = run(unet, kw)
        assert handle.controller.active  # FASA was on, and chose to leave these layers alone
    assert torch.equal(out, stock)
