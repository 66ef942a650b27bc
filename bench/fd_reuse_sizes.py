"""Size of FreeCure's FD key/value record (``fd_reuse``) at full model size, from the architectures alone
(models built on the meta device: no weights, no memory). One image, style_fidelity 1 (the conditional half
only), the family presets, 2-byte dtypes (fp16 SD/SDXL, bf16 FLUX).

    python bench/fd_reuse_sizes.py [--steps 30] [--coverage 0.25]
"""
from __future__ import annotations

import argparse

import torch

from freecure_ops.adapters.discovery import find_self_attention_blocks
from freecure_ops.adapters.fd_reuse import estimate_record_bytes
from freecure_ops.adapters.presets import preset_blocks


def models():
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    with torch.device("meta"):
        sd15 = UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
                                    cross_attention_dim=768)
        sdxl = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, use_linear_projection=True)
        flux = FluxTransformer2DModel(num_layers=19, num_single_layers=38, attention_head_dim=128,
                                      num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                                      guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    # (name, family, model, latent grid of the attention tokens, UNet stages)
    return [("SD1.5 512px", "sd1", sd15, (64, 64), 4), ("SDXL 1024px", "sdxl", sdxl, (128, 128), 3),
            ("FLUX.1-dev 1024px", "flux", flux, (64, 64), 1)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--coverage", type=float, default=0.25, help="fraction of live (masked) keys")
    args = ap.parse_args(argv)
    print(f"| model | FASA layers | per step | recorded ({args.steps} steps) | after masking ({args.coverage:.0%}) |")
    print("|---|---|---|---|---|")
    for name, family, model, grid, stages in models():
        blocks = find_self_attention_blocks(model)
        fasa = [blocks[i] for i in preset_blocks(family, blocks)]
        per_step = estimate_record_bytes(fasa, family, grid, stages, 1, 1, 1, 2)
        total = per_step * args.steps
        print(f"| {name} | {len(fasa)} | {per_step / 2**20:.1f} MiB | {total / 2**30:.2f} GiB | "
              f"{total * args.coverage / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
