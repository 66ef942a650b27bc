"""FASA on a FLUX-shaped tiny transformer: double- and single-stream joint attention, text-first sequence,
fused projections, stock parity when inactive or removed, PD rows against the float64 oracle layer by layer."""
from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from freecure_ops.adapters import FasaFluxAttnProcessor, find_self_attention_blocks, install_fasa
from test_adapters_helpers import (LayerCapture, assert_close, flux_attn_oracle, flux_inputs, mask_tokens,  # noqa: F401
                                   pair_rows, random_mask, run, soft_mask, tiny_flux)

GRID = (4, 6)  # non-square image token grid (h, w)
N_TXT = 5


@pytest.fixture(scope="module")
def flux():
    return tiny_flux()


def _check_layerwise(model, handle, kw, mask, omega, layout, *, mode="bias", sf=1.0, tol=2e-5):
    blocks = {b.name: b for b in find_self_attention_blocks(model) if b.index in handle.layers}
    with LayerCapture({n: b.attn for n, b in blocks.items()}) as cap:
        out = run(model, kw)
    assert set(cap.records) == set(blocks)
    pairs = pair_rows(kw["hidden_states"].shape[0], layout)
    m_tok = mask_tokens(mask, *GRID)
    for name, (args, kwargs, output) in cap.records.items():
        attn = blocks[name].attn
        if blocks[name].kind == "flux_double":
            img, txt = flux_attn_oracle(attn, kwargs["hidden_states"], kwargs["image_rotary_emb"], pairs, m_tok, omega,
                                        enc=kwargs["encoder_hidden_states"], mode=mode, sf=sf)
            assert_close(output[0], img, tol, what=f"{name} image")
            assert_close(output[1], txt, tol, what=f"{name} text")
        else:
            want = flux_attn_oracle(attn, kwargs["hidden_states"], kwargs["image_rotary_emb"], pairs, m_tok, omega,
                                    n_txt=N_TXT, mode=mode, sf=sf)
            assert_close(output, want, tol, what=name)
    return out


def test_zero_mask_is_stock_within_rounding(flux):
    kw = flux_inputs(2, *GRID, N_TXT)
    stock = run(flux, kw)
    with install_fasa(flux, torch.zeros(8, 12), layers="all", layout="plain"):
        out = run(flux, kw)
    assert torch.allclose(out, stock, atol=1e-5, rtol=1e-5)


def test_inactive_disabled_and_removed_are_bit_identical(flux):
    kw = flux_inputs(2, *GRID, N_TXT)
    stock = run(flux, kw)
    before = dict(flux.attn_processors)
    handle = install_fasa(flux, random_mask(GRID), layers="all", layout="plain", steps=range(1, 3),
                          scheduler=FlowMatchEulerDiscreteScheduler())
    assert torch.equal(run(flux, kw), stock)                     # step 0 is outside the steps
    handle.controller.steps = None
    handle.reset()
    assert not torch.allclose(run(flux, kw), stock)
    handle.enabled = False
    assert torch.equal(run(flux, kw), stock)
    handle.remove()
    after = dict(flux.attn_processors)
    assert all(after[k] is before[k] for k in before)
    assert torch.equal(run(flux, kw), stock)


@pytest.mark.parametrize("layout,batch,mask,mode,sf", [
    ("plain", 2, ("bool", (16, 24)), "bias", 1.0),               # FLUX-dev: no CFG batch, image-res mask
    ("plain", 4, ("soft", (2, 4, 6)), "bias", 1.0),              # per-pair masks, n = 2
    ("cfg", 4, ("soft", (8, 12)), "scale", 0.5),                 # true-CFG batch, "scale" mode, sf blend
])
def test_pd_rows_match_oracle_and_fd_rows_match_stock(flux, layout, batch, mask, mode, sf):
    kind, shape = mask
    mask = random_mask(shape) if kind == "bool" else soft_mask(shape)
    kw = flux_inputs(batch, *GRID, N_TXT)
    stock = run(flux, kw)
    with install_fasa(flux, mask, 1.2, layers="all", layout=layout, mode=mode, style_fidelity=sf) as handle:
        assert handle.layers == (0, 1, 2, 3)
        out = _check_layerwise(flux, handle, kw, mask, 1.2, layout, mode=mode, sf=sf)
    fd = [f for _, f, _ in pair_rows(batch, layout)]
    assert torch.equal(out[fd], stock[fd])


def test_fused_projections_and_default_preset():
    model = tiny_flux(seed=7)
    model.fuse_qkv_projections()
    assert all(b.attn.fused_projections for b in find_self_attention_blocks(model))
    kw = flux_inputs(2, *GRID, N_TXT)
    stock = run(model, kw)
    mask = soft_mask((4, 6))
    handle = install_fasa(model, mask, layout="plain")           # preset: second half of the single blocks
    assert handle.layers == (2, 3) and handle.omega == 1.0                 # 1 double + 3 single blocks
    assert handle.layer_names == ("single_transformer_blocks.1.attn", "single_transformer_blocks.2.attn")
    handle.remove()
    with install_fasa(model, mask, 0.9, layers="all", layout="plain") as handle:
        out = _check_layerwise(model, handle, kw, mask, 0.9, "plain")
    assert torch.equal(out[1:], stock[1:])


def test_img_ids_that_are_not_a_grid_raise_only_when_active(flux):
    kw = flux_inputs(2, *GRID, N_TXT)
    kw["img_ids"] = kw["img_ids"].flip(0)
    with install_fasa(flux, random_mask(GRID), layers="all", layout="plain", steps=[5],
                      scheduler=FlowMatchEulerDiscreteScheduler()) as handle:
        run(flux, kw)                                            # inactive: stock, no grid needed
        handle.controller.steps = None
        with pytest.raises(ValueError, match="img_ids"):
            run(flux, kw)


def test_triton_backend_in_interpreter():
    """The FLUX n_txt variant through the Triton kernel (TRITON_INTERPRET=1 on CPU), head dim 16."""
    from freecure_ops.kernels import interpreting

    if not interpreting():
        pytest.skip("interpreter-only (CPU tensors); on CUDA see tests/test_adapters_cuda.py")
    model = tiny_flux(seed=3)
    kw = flux_inputs(2, *GRID, N_TXT)
    mask = soft_mask(GRID)
    with install_fasa(model, mask, 1.5, layers=[0, 3], layout="plain", backend="triton") as handle:
        assert not any(isinstance(p, FasaFluxAttnProcessor) for p in
                       (b.attn.processor for b in find_self_attention_blocks(model) if b.index in (1, 2)))
        _check_layerwise(model, handle, kw, mask, 1.5, "plain", tol=1e-4)
