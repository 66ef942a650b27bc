"""Step gating across a real 3-step diffusers pipeline assembled offline from tiny components."""
from __future__ import annotations

import pytest
import torch

import freecure_ops.adapters.attend as attend_mod
from freecure_ops.adapters import FasaAttnProcessor, install_fasa
from test_adapters_helpers import random_mask, tiny_sd15  # noqa: F401


@pytest.fixture(scope="module")
def pipe():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for word in ("a", "photo", "of", "person", "with", "red", "hair", "man"):
        vocab[word + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab) + 2, hidden_size=32, intermediate_size=37,
                                                num_hidden_layers=1, num_attention_heads=2,
                                                max_position_embeddings=16, projection_dim=32)).eval()
    vae = AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()
    scheduler = DDIMScheduler(clip_sample=False, steps_offset=1)
    p = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=tiny_sd15(seed=1),
                                scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


def _generate(pipe):
    # one PD/FD pair; with CFG the UNet batch is [PD_uncond, FD_uncond, PD_cond, FD_cond]
    return pipe(["a photo of person", "a photo of man"], num_inference_steps=3,
                guidance_scale=5.0, height=16, width=24, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def test_step_gating_over_a_real_pipeline(pipe, monkeypatch):
    stock = _generate(pipe)
    mask = random_mask((16, 24))                       # image resolution; the latent is 8 x 12

    with install_fasa(pipe, mask, layers="all", steps=range(3, 6)) as handle:
        assert torch.equal(_generate(pipe), stock)     # 3 steps, none in range: stock, bit for bit
        assert handle.step == 2

    seen = []
    real = attend_mod.fasa_attention

    def spy(*args, **kwargs):
        seen.append(handle.step)
        return real(*args, **kwargs)

    monkeypatch.setattr(attend_mod, "fasa_attention", spy)
    with install_fasa(pipe, mask, layers="all", steps={1}) as handle:
        first = _generate(pipe)
        calls_first = list(seen)
        second = _generate(pipe)                       # a new generation restarts the counter
    assert calls_first and set(calls_first) == {1}
    assert set(seen) == {1} and len(seen) == 2 * len(calls_first)
    assert len(calls_first) == 10                      # 10 layers x one (conditional) PD call with sf = 1
    assert torch.equal(first, second) and not torch.equal(first, stock)
    assert torch.equal(first[1], stock[1])             # the FD image is unchanged by FASA
    assert not any(isinstance(p, FasaAttnProcessor) for p in pipe.unet.attn_processors.values())


def test_a_pipeline_sharing_the_model_or_a_direct_call_is_refused(pipe):
    """FASA installed on a pipeline reads that pipeline's CFG pairing and steps: another pipeline built on the
    same UNet (or a direct UNet call) would be paired and gated from stale state, so it is refused."""
    from diffusers import StableDiffusionPipeline

    sibling = StableDiffusionPipeline(**pipe.components)
    sibling.set_progress_bar_config(disable=True)
    with install_fasa(pipe, random_mask((16, 24)), layers="all"):
        _generate(pipe)  # the pipeline FASA was installed on runs
        with pytest.raises(ValueError, match="another pipeline sharing its model"):
            _generate(sibling)
        latent = torch.zeros(4, 4, 8, 12)
        with pytest.raises(ValueError, match="a direct call of the model"):
            pipe.unet(latent, 1, encoder_hidden_states=torch.zeros(4, 16, 32))
    assert torch.equal(_generate(sibling), _generate(pipe))  # after remove(): both are the stock pipeline


def test_num_images_per_prompt_is_refused_not_mispaired(pipe):
    # two copies of one prompt would be paired as PD_1 / FD_1
    with install_fasa(pipe, random_mask((16, 24)), layers="all"):
        with pytest.raises(ValueError, match="num_images_per_prompt=2"):
            pipe(["a photo of person", "a photo of man"], num_images_per_prompt=2, num_inference_steps=2,
                 height=16, width=24, output_type="pt", generator=torch.Generator().manual_seed(0))


def _repeated(pipe, steps=2):
    return pipe(["a photo of person", "a photo of man"], num_images_per_prompt=2, num_inference_steps=steps,
                height=16, width=24, output_type="pt", generator=torch.Generator().manual_seed(0)).images


def test_callers_are_refused_only_where_fasa_would_act(pipe):
    """Disabled, or with no FASA step in the call, FASA leaves the stock model's rows: repeated prompts, a
    sibling pipeline and a direct call then run (and equal the stock model); with a FASA step ahead, repeated
    prompts are refused at the first forward, before any work."""
    from diffusers import StableDiffusionPipeline

    sibling = StableDiffusionPipeline(**pipe.components)
    sibling.set_progress_bar_config(disable=True)
    latent = torch.randn(4, 4, 8, 12, generator=torch.Generator().manual_seed(1))
    text = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(2))
    stock = _repeated(pipe), _generate(pipe), pipe.unet(latent, 1, encoder_hidden_states=text).sample
    with install_fasa(pipe, random_mask((16, 24)), layers="all") as handle:
        handle.enabled = False
        assert torch.equal(_repeated(pipe), stock[0])
        assert torch.equal(_generate(sibling), stock[1])
        assert torch.equal(pipe.unet(latent, 1, encoder_hidden_states=text).sample, stock[2])
    with install_fasa(pipe, random_mask((16, 24)), layers="all", steps={0, 5}) as handle:
        assert torch.equal(_generate(pipe), _generate(pipe))   # leaves the counter past step 0
        assert torch.equal(pipe.unet(latent, 1, encoder_hidden_states=text).sample, stock[2])  # step 3: inactive
        forwards = []
        hook = pipe.unet.register_forward_pre_hook(lambda *_: forwards.append(1))  # runs after FASA's pre-hook
        try:
            with pytest.raises(ValueError, match="num_images_per_prompt=2"):
                _repeated(pipe)                                 # step 0 is a FASA step
            handle.controller.steps = frozenset({5})
            with pytest.raises(ValueError, match="num_images_per_prompt=2"):
                _repeated(pipe, steps=6)                        # step 5 is ahead: refused at the first forward
            assert not forwards
            assert torch.equal(_repeated(pipe), stock[0])       # 2 steps: step 5 never comes
        finally:
            hook.remove()
