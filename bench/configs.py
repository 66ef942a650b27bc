"""diffusers configs of the real architectures (random weights; no download), and a helper that lists a
model's self-attention layers with their heads, head dim and token grid, for the end-to-end step and for
checking the case tables against the architectures themselves."""
from __future__ import annotations

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)

FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_TEXT_TOKENS = 512  # T5 sequence length of FLUX.1-dev
FLUX_GRID = (64, 64)    # 1024 px / 8 (VAE) / 2 (2x2 patching)


def unet_self_attention(unet, latent_hw: tuple) -> list:
    """``(heads, head_dim, (h, w))`` of every ``attn1`` in execution order (down, mid, up; one per transformer
    block), the token grid derived from the UNet's down-sampling, never from sqrt(N)."""
    h, w = latent_hw
    out = []

    def blocks(block):
        for attn in getattr(block, "attentions", None) or ():
            for tb in attn.transformer_blocks:
                yield tb.attn1

    n_down = len(unet.down_blocks)
    order = [(block, i) for i, block in enumerate(unet.down_blocks)]  # down block i runs at 1 / 2**i
    order.append((unet.mid_block, n_down - 1))
    order += [(block, n_down - 1 - j) for j, block in enumerate(unet.up_blocks)]
    for block, level in order:
        gh, gw = h >> level, w >> level
        for a in blocks(block):
            out.append((a.heads, a.to_q.out_features // a.heads, (gh, gw)))
    return out


def flux_self_attention(transformer) -> list:
    """``(heads, head_dim, kind)`` of every joint attention in execution order (double then single blocks)."""
    out = []
    for kind, blocks in (("double", transformer.transformer_blocks), ("single", transformer.single_transformer_blocks)):
        for block in blocks:
            a = block.attn
            out.append((a.heads, a.to_q.out_features // a.heads, kind))
    return out
