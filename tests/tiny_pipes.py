"""Tiny SD1.5-, SDXL- and FLUX-style diffusers pipelines built offline from configs (random weights, no
downloads), for the FreeCure pipeline, APG and CLI tests. Each builds in well under a second and runs a
denoising step in milliseconds at the sizes used here (16x16 images)."""
from __future__ import annotations

import torch

from freecure_ops.bench.e2e import TEXT_WORDS as WORDS, word_tokenizer

IMAGE = 16  # image side in pixels; the VAEs downsample by 2 -> 8x8 latents


def _clip_tokenizer():
    return word_tokenizer(max_length=12)


def _clip_text(hidden=16, projection=None, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(_clip_tokenizer()), hidden_size=hidden, intermediate_size=24,
                         num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=12, projection_dim=projection or hidden,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(cfg).eval()


def _vae(latent_channels=4, seed=0, **extra):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, latent_channels=latent_channels,
                         norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, **extra).eval()


def _finish(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd_pipe(seed=0):
    """StableDiffusionPipeline: 2-stage UNet (4 self-attention blocks), DDIM scheduler, 16x16 images."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8).eval()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return _finish(StableDiffusionPipeline(vae=_vae(seed=seed), text_encoder=_clip_text(seed=seed),
                                           tokenizer=_clip_tokenizer(), unet=unet, scheduler=sched,
                                           safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False))


def tiny_sdxl_pipe(seed=0):
    """StableDiffusionXLPipeline: two CLIP encoders (16 + 16 -> 32), text_time conditioning, Euler scheduler
    (as SDXL ships)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1), attention_head_dim=(2, 4), cross_attention_dim=32,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
        use_linear_projection=True, norm_num_groups=8).eval()
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   steps_offset=1, timestep_spacing="leading")
    return _finish(StableDiffusionXLPipeline(
        vae=_vae(seed=seed), text_encoder=_clip_text(seed=seed),
        text_encoder_2=_clip_text(projection=16, seed=seed + 2),
        tokenizer=_clip_tokenizer(), tokenizer_2=_clip_tokenizer(), unet=unet, scheduler=sched,
        force_zeros_for_empty_prompt=True, add_watermarker=False))


def tiny_flux_pipe(seed=0):
    """FluxPipeline (guidance-distilled, like FLUX.1-dev): 1 double + 2 single blocks, CLIP + T5 encoders."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(seed + 1)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0 - i) for i, w in enumerate(WORDS)]
    t5_tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    torch.manual_seed(seed + 3)
    t5 = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2,
                                 relative_attention_num_buckets=8)).eval()
    return _finish(FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4, seed, shift_factor=0.1),
                                text_encoder=_clip_text(seed=seed), tokenizer=_clip_tokenizer(), text_encoder_2=t5,
                                tokenizer_2=t5_tok, transformer=transformer))


def tiny_clip(folder):
    """A tiny CLIPModel and its processor (text side on this file's tokenizer) saved to ``folder``: the CLIP
    the eval and Hub tests load by folder or Hub id."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = _clip_tokenizer()
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=12, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1),
                     vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=IMAGE, patch_size=8),
                     projection_dim=8)
    CLIPModel(cfg).eval().save_pretrained(folder)
    ip = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(folder)
    return folder


BUILDERS = {"sd1": tiny_sd_pipe, "sdxl": tiny_sdxl_pipe, "flux": tiny_flux_pipe}


class FakeParser:
    """A face parser stand-in: returns a fixed label map at the image's size (hair = 17 on the top rows,
    skin = 1 elsewhere) and records what it was called with."""

    def __init__(self, hair_rows=0.5, labels=None):
        self.hair_rows = hair_rows
        self.calls = []
        if labels is not None:
            self.labels = labels

    def __call__(self, image):
        self.calls.append(image)
        h, w = image.shape[-2:]
        lm = torch.ones(h, w, dtype=torch.int64)
        lm[: int(round(h * self.hair_rows))] = 17
        return lm


def write_cli_inputs(root):
    """What the CLI tests run on, in folder ``root``: ``tiny-sd`` (the tiny SD pipeline saved), ``broken-model``
    (a model_index.json whose loading fails, naming --model: an error naming another flag came first) and
    ``mask.png`` (the top half white)."""
    import json

    import numpy as np
    from PIL import Image

    tiny_sd_pipe().save_pretrained(root / "tiny-sd")
    broken = root / "broken-model"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                         "unet": ["diffusers", "UNet2DConditionModel"]}))
    m = np.zeros((IMAGE, IMAGE), np.uint8)
    m[: IMAGE // 2] = 255
    Image.fromarray(m, mode="L").save(root / "mask.png")


class StubBiSeNet:
    """The face parser the CLI's --parser-weights loads, stubbed (tests patch ``BiSeNetParser.from_checkpoint``
    with :func:`install_stub_parser`): hair on the top half; ``empty_from``: the call from which it finds
    nothing (None: never)."""

    def __init__(self):
        import freecure_ops.pipeline.face_parser as fp

        self.labels = dict(fp.BISENET_CELEBAMASK_LABELS)
        self.calls = 0
        self.empty_from = None

    def __call__(self, image):
        self.calls += 1
        lm = torch.zeros(image.shape[-2:], dtype=torch.int64)
        if self.empty_from is None or self.calls < self.empty_from:
            lm[: IMAGE // 2] = 17
        return lm


def install_stub_parser(mp) -> StubBiSeNet:
    """Make every ``BiSeNetParser.from_checkpoint`` (``mp``: pytest's monkeypatch) return one StubBiSeNet."""
    import freecure_ops.pipeline.face_parser as fp

    parser = StubBiSeNet()
    mp.setattr(fp.BiSeNetParser, "from_checkpoint", classmethod(lambda cls, path, **kw: parser))
    return parser


def count_sd_calls(mp) -> list:
    """The prompt of every StableDiffusionPipeline call from now on (pass 1: the FD prompt; pass 2: the PD one)."""
    import functools

    from diffusers import StableDiffusionPipeline

    prompts = []
    orig = StableDiffusionPipeline.__call__

    @functools.wraps(orig)  # Foundation.run reads the signature (latents=) through __wrapped__
    def counting(self, *args, **kwargs):
        prompts.append(kwargs.get("prompt"))
        return orig(self, *args, **kwargs)

    mp.setattr(StableDiffusionPipeline, "__call__", counting)
    return prompts
