"""The Python blocks of the README and of docs/*.md run as written, in one namespace, with "cuda" replaced by
"cpu", in the order ``SEQUENCE`` lists: a docs page continues the README example it names (docs/op.md the op's
tensors, docs/adapters.md the drop-in example's mask and prompts, docs/pipelines.md the FreeCure example's
parser), so the README's blocks and the pages' interleave as the sections did in the one-page README.

What they load comes from an offline Hugging Face cache holding tiny models under the ids the docs name
(an SDXL-shaped UNet with SDXL's 70 transformer blocks, a FLUX transformer with 19 + 38 blocks, so the family
presets apply; a BiSeNet checkpoint whose head marks every pixel "hair"; a tiny SegFormer). The recipes for
other projects' pipelines (PhotoMaker, InstantID, InfiniteYou, PuLID) get stand-ins with those pipelines'
public call signatures, built from diffusers classes; the names the docs say come from those projects
(``pm_pipe``, ``face_emb``, ``infu``, ``pulid``, ...) are given. The image sizes are the tiny models'
defaults (FLUX's class default is lowered to them): the docs leave sizes to the pipeline.

Blocks not run, each with its reason (and each must still be in the docs, so the list cannot go stale):
"""
from __future__ import annotations

import functools
import re
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from hub_cache import HubCache, offline_hub
from test_pulid_recipe import id_embedding as pulid_id_embedding, pulid_like
from tiny_pipes import _clip_text, _clip_tokenizer, _vae

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

# (page, how many of its next blocks run; None: the rest of the page), in execution order. Every block of
# README.md and docs/*.md runs exactly once; a page with Python blocks that is not listed fails the test.
SEQUENCE = (
    ("README.md", 1),            # the op
    ("docs/op.md", None),        # prepared masks: the op's q, k_p, k_f, v_p, v_f, mask
    ("README.md", 1),            # drop-in FASA on SDXL
    ("docs/adapters.md", None),  # FLUX (the drop-in example's mask and prompts); compile (not run)
    ("docs/weights.md", None),   # load_pretrained, load_face_parser
    ("README.md", 2),            # FreeCure; a foundation replayed on a pipeline
    ("docs/pipelines.md", None),  # loops of your own; the recipes (FreeCure, parser)
)

NOT_RUN = {
    "pipe.unet = torch.compile(pipe.unet, fullgraph=True)":
        "compiles with Inductor (minutes on 2 CPU cores); tests/test_compile_models.py checks the same calls",
}
__doc__ += "".join(f"\n- ``{k}``: {v}" for k, v in NOT_RUN.items())


def doc_pages() -> list[Path]:
    """README.md and every docs/*.md."""
    return [README, *sorted(DOCS.glob("*.md"))]


def sequenced_blocks() -> list[tuple[str, int, str]]:
    """(page, index of the block in its page, block) for every Python block, in ``SEQUENCE``'s order."""
    blocks = {p.relative_to(ROOT).as_posix(): python_blocks(p.read_text()) for p in doc_pages()}
    taken = dict.fromkeys(blocks, 0)
    out = []
    for page, n in SEQUENCE:
        assert page in blocks, f"SEQUENCE names a page that does not exist: {page}"
        stop = len(blocks[page]) if n is None else taken[page] + n
        assert stop <= len(blocks[page]), f"SEQUENCE runs {page} past its {len(blocks[page])} Python blocks"
        out += [(page, i, blocks[page][i]) for i in range(taken[page], stop)]
        taken[page] = stop
    left = {page: len(b) - taken[page] for page, b in blocks.items() if len(b) > taken[page]}
    assert not left, f"Python blocks that SEQUENCE does not run (page: count): {left}"
    return out


def python_blocks(text: str) -> list[str]:
    """The ```python blocks of a Markdown text, dedented (blocks inside list items are indented)."""
    blocks = []
    for m in re.finditer(r"^( *)```python\n(.*?)^\1```", text, flags=re.S | re.M):
        indent = len(m.group(1))
        blocks.append("\n".join(line[indent:] for line in m.group(2).splitlines()))
    return blocks


# ----------------------------------------------------------------------------------------------------------
# tiny models under the ids the docs name
# ----------------------------------------------------------------------------------------------------------

def sdxl_shaped_pipe():
    """SDXL's block structure (transformer layers 1/2/10 per stage: 70 blocks, presets 50..69 apply) at tiny
    widths, an 8x8 latent (16 px)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(11)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 16, 32), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 2, 4), cross_attention_dim=32,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
        use_linear_projection=True, norm_num_groups=8).eval()
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=_clip_text(), text_encoder_2=_clip_text(projection=16,
                                     seed=2), tokenizer=_clip_tokenizer(), tokenizer_2=_clip_tokenizer(), unet=unet,
                                     scheduler=sched, force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_shaped_pipe():
    """FLUX.1-dev's 19 double- and 38 single-stream blocks (the preset uses single blocks 38..56), tiny widths."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    from tiny_pipes import WORDS

    torch.manual_seed(12)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=19, num_single_layers=38, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6)).eval()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0 - i) for i, w in enumerate(WORDS)]
    torch.manual_seed(13)
    t5 = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2,
                                 relative_attention_num_buckets=8)).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4, 0, shift_factor=0.1),
                        text_encoder=_clip_text(), tokenizer=_clip_tokenizer(), text_encoder_2=t5,
                        tokenizer_2=T5Tokenizer(vocab=pieces, extra_ids=0), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hair_everywhere_bisenet(path):
    """A BiSeNet checkpoint whose head marks every pixel as class 17 (hair): the mask is never empty."""
    from freecure_ops.pipeline.face_parser import BiSeNet

    torch.manual_seed(14)
    net = BiSeNet(19)
    with torch.no_grad():
        bn = net.conv_out.conv.bn
        bn.weight.zero_()
        bn.bias.fill_(1.0)                       # features after the ReLU: all 1
        net.conv_out.conv_out.weight.zero_()
        net.conv_out.conv_out.weight[17] = 1.0   # class 17 gets the only positive logit
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from test_segformer_parser import _save, _tiny_segformer

    root = tmp_path_factory.mktemp("readme_src")
    sdxl = sdxl_shaped_pipe()
    sdxl.save_pretrained(root / "sdxl")
    sdxl.save_pretrained(root / "sdxl", variant="fp16")
    flux_shaped_pipe().save_pretrained(root / "flux")
    return {"sdxl": root / "sdxl", "flux": root / "flux", "bisenet": hair_everywhere_bisenet(root / "79999_iter.pth"),
            "segformer": _save(_tiny_segformer(0), root / "segformer")}


# ----------------------------------------------------------------------------------------------------------
# stand-ins for other projects' pipelines (their public call signatures)
# ----------------------------------------------------------------------------------------------------------

def photomaker_stand_in(base):
    """PhotoMaker's call: one prompt string with the trigger word ``img``, ``input_id_images``,
    ``start_merge_step``; text-only conditioning (trigger word removed) up to the merge step, then the
    identity's (here the trigger word becomes ``sks``)."""
    from diffusers import StableDiffusionXLPipeline

    class PhotoMakerStandIn(StableDiffusionXLPipeline):
        def __call__(self, prompt, input_id_images=None, start_merge_step=10, id_embeds=None, **kwargs):
            if not isinstance(prompt, str) or input_id_images is None:
                raise ValueError("PhotoMaker takes one prompt string and input_id_images")
            emb = self.encode_prompt(prompt.replace("img", "sks"), device=self._execution_device,
                                     do_classifier_free_guidance=True)
            id_embeds_cfg = torch.cat([emb[1], emb[0]])

            def merge(pipe, step, t, tensors):
                return {"prompt_embeds": id_embeds_cfg} if step + 1 > start_merge_step else {}

            return super().__call__(prompt.replace(" img", ""), callback_on_step_end=merge,
                                    callback_on_step_end_tensor_inputs=["prompt_embeds"], **kwargs)

    pipe = PhotoMakerStandIn(**base.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def instantid_stand_in(base):
    """InstantID's call (``image_embeds``, keypoint ``image``, ``ip_adapter_scale``) on an SDXL ControlNet
    pipeline; like InstantID it puts its own plain self-attention processor on every ``attn1``."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    class AttnProcessor(AttnProcessor2_0):  # InstantID's copy of diffusers' plain processor
        pass

    class InstantIDStandIn(StableDiffusionXLControlNetPipeline):
        def __call__(self, prompt, image_embeds=None, image=None, ip_adapter_scale=None, **kwargs):
            if image_embeds is None:
                raise ValueError("InstantID needs image_embeds")
            return super().__call__(prompt, image=image, **kwargs)

    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 8)).eval()
    pipe = InstantIDStandIn(**base.components, controlnet=controlnet)
    for name, module in pipe.unet.named_modules():
        if name.endswith("attn1"):
            module.set_processor(AttnProcessor())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def infiniteyou_stand_in(flux):
    """InfiniteYou's inner pipeline (``infu.pipe``): a FluxControlNetPipeline taking ``controlnet_prompt_embeds``
    (the identity tokens InfuseNet reads) and ``controlnet_guidance_scale``."""
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    class FluxInfuseNetStandIn(FluxControlNetPipeline):
        def __call__(self, prompt=None, controlnet_prompt_embeds=None, controlnet_guidance_scale=1.0, **kwargs):
            return super().__call__(prompt, **kwargs)

    controlnet = FluxControlNetModel.from_transformer(flux.transformer, num_layers=1, num_single_layers=1,
                                                      attention_head_dim=16, num_attention_heads=2).eval()
    pipe = FluxInfuseNetStandIn(**flux.components, controlnet=controlnet)
    pipe.default_sample_size = 8  # the tiny FLUX's own size (16 px)
    pipe.set_progress_bar_config(disable=True)
    return types.SimpleNamespace(pipe=pipe)


# ----------------------------------------------------------------------------------------------------------

def own_loop_stand_ins() -> dict:
    """The names the "Loops of your own" block takes from its reader: a bare tiny UNet, a sigma schedule and
    its sigma -> timestep map, text embeddings, a mask and an Euler step with CFG over ``[uncond, cond]``."""
    from test_adapters_helpers import tiny_sd15

    g = torch.Generator().manual_seed(2)
    sigmas = torch.tensor([14.6, 3.0, 0.6, 0.0])

    def my_sampler_step(x, out, i):
        u, c = out.chunk(2)
        return x + (u + 3.0 * (c - u)) * (sigmas[i + 1] - sigmas[i])

    return {"unet": tiny_sd15(seed=7), "sigmas": sigmas, "sigma_to_t": lambda s: (s * 60).clamp(max=999),
            "x_t": torch.randn(1, 4, 8, 6, generator=g) * 14.6, "uncond": torch.randn(1, 7, 32, generator=g),
            "fd_cond": torch.randn(1, 7, 32, generator=g), "pd_cond": torch.randn(1, 7, 32, generator=g),
            "mask": torch.rand(16, 12, generator=g) > 0.5, "my_sampler_step": my_sampler_step}


def test_every_doc_page_with_python_is_sequenced():
    """Cheap, no models: SEQUENCE covers every Python block of README.md and docs/*.md exactly once, and every
    NOT_RUN entry is still in them."""
    blocks = sequenced_blocks()
    for first_line in NOT_RUN:
        assert sum(first_line in b for _, _, b in blocks) == 1, f"NOT_RUN entry no longer in the docs: {first_line}"


def test_readme_python_blocks_run_as_written(sources, tmp_path, monkeypatch):
    from diffusers import FluxPipeline
    from PIL import Image

    cache = HubCache(tmp_path / "hub")
    cache.add("stabilityai/stable-diffusion-xl-base-1.0", sources["sdxl"])
    cache.add("black-forest-labs/FLUX.1-dev", sources["flux"])
    cache.add("AI2lab/face-parsing.PyTorch", {"79999_iter.pth": sources["bisenet"]})
    cache.add("jonathandinu/face-parsing", sources["segformer"])
    offline_hub(monkeypatch, cache.root)
    work = tmp_path / "work"
    work.mkdir()
    (work / "79999_iter.pth").write_bytes(sources["bisenet"].read_bytes())
    monkeypatch.chdir(work)
    init = FluxPipeline.__init__

    @functools.wraps(init)  # diffusers reads the components from __init__'s signature
    def tiny_default_size(self, *args, **kwargs):  # FLUX pipelines hard-code 128 latent rows; the tiny one: 8
        init(self, *args, **kwargs)
        self.default_sample_size = 8

    monkeypatch.setattr(FluxPipeline, "__init__", tiny_default_size)

    blocks = sequenced_blocks()
    assert len(blocks) >= 10
    for first_line in NOT_RUN:
        assert sum(first_line in b for _, _, b in blocks) == 1, f"NOT_RUN entry no longer in the docs: {first_line}"

    torch.manual_seed(0)  # the stand-ins' random weights and inputs; the docs' own code seeds what it draws
    g = torch.Generator().manual_seed(1)
    base = sdxl_shaped_pipe()
    ns = {"__name__": "readme",
          "pm_pipe": photomaker_stand_in(base), "id_images": [Image.new("RGB", (16, 16))],
          "instantid_pipe": instantid_stand_in(sdxl_shaped_pipe()), "face_emb": np.ones(512, dtype=np.float32),
          "face_kps": Image.new("RGB", (16, 16), (200, 120, 40)),
          "infu": infiniteyou_stand_in(flux_shaped_pipe()), "id_embed": torch.randn(1, 8, 16, generator=g),
          "control_image": Image.new("RGB", (16, 16))}
    ns.update(pulid=pulid_like(sdxl_shaped_pipe()), id_embedding=pulid_id_embedding(32))   # test_pulid_recipe.py
    ns.update(own_loop_stand_ins())
    ran = 0
    for page, i, block in blocks:
        if any(first_line in block for first_line in NOT_RUN):
            continue
        code = block.replace('"cuda"', '"cpu"')
        t0 = time.perf_counter()
        try:
            exec(compile(code, f"{page} python block {i}", "exec"), ns)
        except Exception as e:  # noqa: BLE001  (name the block in the failure)
            raise AssertionError(f"{page} python block {i} failed: {type(e).__name__}: {e}\n{block}") from e
        ran += 1
        print(f"{page} block {i}: {time.perf_counter() - t0:.1f} s")
    assert ran == len(blocks) - len(NOT_RUN)
    # what the blocks produced is real
    assert Path("freecure.png").is_file()
    assert ns["found"].n_images == 1 and float(ns["found"].mask.min()) == 1.0   # the hair-everywhere parser
    assert ns["image"].size == (16, 16)
    assert ns["own"].num_inference_steps == 3 and torch.isfinite(ns["x"]).all()   # the loop-of-your-own block
