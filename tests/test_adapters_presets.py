"""Layer presets on the full-size SD1.5, SD2.1, SDXL and FLUX.1 architectures, built on the meta device."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from freecure_ops.adapters import PRESETS, find_self_attention_blocks, install_fasa
from test_adapters_helpers import tiny_sdxl  # noqa: F401

CROSS = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
CROSS_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
CONFIGS = {
    "sd15": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=CROSS, up_block_types=CROSS_UP, cross_attention_dim=768, attention_head_dim=8),
    "sd21": dict(sample_size=96, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=CROSS, up_block_types=CROSS_UP, cross_attention_dim=1024,
                 attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
    "sdxl": dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, use_linear_projection=True),
}


def _meta_unet(name):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**CONFIGS[name])


def _sd1_expected():
    return [f"up_blocks.{s}.attentions.{a}.transformer_blocks.0.attn1" for s in (2, 3) for a in range(3)]


def _sdxl_expected():
    names = [f"up_blocks.0.attentions.1.transformer_blocks.{t}.attn1" for t in range(6, 10)]
    names += [f"up_blocks.0.attentions.2.transformer_blocks.{t}.attn1" for t in range(10)]
    names += [f"up_blocks.1.attentions.{a}.transformer_blocks.{t}.attn1" for a in range(3) for t in range(2)]
    return names


@pytest.mark.parametrize("name,family,n_blocks,expected", [
    ("sd15", "sd1", 16, _sd1_expected()),
    ("sd21", "sd1", 16, _sd1_expected()),
    ("sdxl", "sdxl", 70, _sdxl_expected()),
])
def test_unet_presets_select_the_documented_blocks(name, family, n_blocks, expected):
    unet = _meta_unet(name)
    blocks = find_self_attention_blocks(unet)
    assert len(blocks) == n_blocks
    before = dict(unet.attn_processors)
    # a pipeline-like object is accepted too
    handle = install_fasa(SimpleNamespace(unet=unet), torch.ones(64, 64, dtype=torch.bool), layout="cfg")
    assert handle.family == family and handle.omega == PRESETS[family].omega
    assert list(handle.layer_names) == expected
    assert handle.layers == tuple(range(10, 16) if family == "sd1" else range(50, 70))
    assert handle.controller.layout == "cfg"  # a bare UNet (no pipeline to ask) is told the layout
    # the modules' own processors (attn_processors reports the stock one a FASA layer stands in for)
    touched = {b.name for b in blocks if b.attn.processor is not before[b.name + ".processor"]}
    assert touched == set(expected)
    assert all(v is before[k] for k, v in unet.attn_processors.items())
    handle.remove()
    assert all(v is before[k] for k, v in unet.attn_processors.items())


def test_sdxl_execution_order_puts_mid_block_before_decoder():
    blocks = find_self_attention_blocks(_meta_unet("sdxl"))
    stages = [b.name.split(".attentions")[0] for b in blocks]
    assert stages[:4] == ["down_blocks.1"] * 4 and stages[24:34] == ["mid_block"] * 10
    assert stages[34:64] == ["up_blocks.0"] * 30 and stages[64:] == ["up_blocks.1"] * 6


def test_flux_preset_is_the_second_half_of_the_single_stream_blocks():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        flux = FluxTransformer2DModel(guidance_embeds=True)
    assert len(find_self_attention_blocks(flux)) == 57
    with install_fasa(SimpleNamespace(transformer=flux), torch.ones(128, 128)) as handle:
        assert handle.family == "flux" and handle.omega == 1.0
        assert handle.controller.layout == "plain"  # FLUX-dev batches no CFG: the family default
        assert handle.layers == tuple(range(38, 57))
        assert list(handle.layer_names) == [f"single_transformer_blocks.{i}.attn" for i in range(19, 38)]


def test_preset_out_of_range_on_a_small_model_is_a_clear_error():

    with pytest.raises(ValueError, match="layers=None takes the sdxl preset"):
        install_fasa(tiny_sdxl(), torch.ones(8, 8), layout="cfg")
