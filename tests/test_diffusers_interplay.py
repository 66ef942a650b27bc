"""diffusers' own helpers on a model that carries FASA: IP-Adapter loading, set_default_attn_processor,
set_attn_processor, fuse_qkv_projections, LoRA load and fuse, from_pipe, accelerate's offload hooks.

Each either keeps FASA working (FASA stays on attn1; what diffusers set elsewhere stays) or says so at once.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from diffusers.models.attention_processor import (AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0,
                                                  IPAdapterAttnProcessor2_0)

from freecure_ops.adapters import FasaAttnProcessor, find_self_attention_blocks, install_fasa
from freecure_ops.pipeline import FreeCure
from test_adapters_helpers import flux_inputs, random_mask, run, tiny_flux, tiny_sd15, unet_inputs
from tiny_pipes import BUILDERS, IMAGE, FakeParser

CLIP_DIM = 12


def _kw(unet, batch=4):
    return unet_inputs(unet, batch, 8, 6)


def _fasa_effect(unet, handle, kw):
    """(output with FASA, output with FASA switched off) of one forward."""
    on = run(unet, kw)
    handle.enabled = False
    off = run(unet, kw)
    handle.enabled = True
    return on, off


def _attn1(unet):
    return [b.attn.processor for b in find_self_attention_blocks(unet)]


def ip_adapter_state_dict(unet, seed=0):
    """An IP-Adapter (plain "proj" image projection) state dict that fits ``unet``, random weights."""
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    sd = {"image_proj": {"proj.weight": torch.randn(4 * cross, CLIP_DIM, generator=g) * 0.1,
                         "proj.bias": torch.zeros(4 * cross), "norm.weight": torch.ones(cross),
                         "norm.bias": torch.zeros(cross)}, "ip_adapter": {}}
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        attn = unet.get_submodule(name[: -len(".processor")])
        shape = tuple(attn.to_k.weight.shape)
        sd["ip_adapter"][f"{key}.to_k_ip.weight"] = torch.randn(*shape, generator=g) * 0.1
        sd["ip_adapter"][f"{key}.to_v_ip.weight"] = torch.randn(*shape, generator=g) * 0.1
        key += 2
    return sd


def test_ip_adapter_loads_while_fasa_is_installed():
    unet = tiny_sd15(seed=1)
    stock_attn1 = _attn1(unet)
    handle = install_fasa(unet, random_mask((8, 6)), 1.5, layers="all", layout="cfg")
    ours = _attn1(unet)
    unet._load_ip_adapter_weights([ip_adapter_state_dict(unet)], low_cpu_mem_usage=False)
    assert _attn1(unet) == ours                                      # FASA stays on attn1, the same objects
    cross = [p for n, p in unet.attn_processors.items() if not n.endswith("attn1.processor")]
    assert cross and all(isinstance(p, IPAdapterAttnProcessor2_0) for p in cross)   # IP-Adapter on attn2
    kw = _kw(unet)
    kw["added_cond_kwargs"] = {"image_embeds": [torch.randn(4, 1, CLIP_DIM, generator=torch.Generator().manual_seed(2))]}
    on, off = _fasa_effect(unet, handle, kw)
    assert torch.equal(on[[1, 3]], off[[1, 3]])                      # FD rows: stock (with the IP-Adapter)
    assert not torch.allclose(on[[2]], off[[2]])                     # conditional PD row: FASA acts
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle.remove()
    # what the IP-Adapter load set on attn1 (a new stock processor, as without FASA: it read attn_processors,
    # which reports the stock processor FASA stands in for)
    assert all(type(p) is type(s) is AttnProcessor2_0 and p is not s for p, s in zip(_attn1(unet), stock_attn1))
    assert all(isinstance(p, IPAdapterAttnProcessor2_0) for n, p in unet.attn_processors.items()
               if not n.endswith("attn1.processor"))


def test_ip_adapter_on_flux_fasa_layers_is_refused_before_anything_changes():
    model = tiny_flux()
    handle = install_fasa(model, random_mask((8, 8)), layers="all", layout="plain")
    before = dict(model.attn_processors)
    with pytest.raises(ValueError) as info:
        model._load_ip_adapter_weights([{"image_proj": {}, "ip_adapter": {}}])
    assert "\n" not in str(info.value) and "double-stream" in str(info.value)
    assert dict(model.attn_processors) == before
    handle.remove()


def test_set_default_attn_processor_keeps_fasa():
    unet = tiny_sd15(seed=2)
    kw = _kw(unet)
    handle = install_fasa(unet, random_mask((8, 6)), 1.5, layers="all", layout="cfg")
    ours = _attn1(unet)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unet.set_default_attn_processor()                            # was: a bare ValueError
    # FASA stays, as processors of the new kind; the previous ones keep theirs (diffusers may set them back)
    assert all(isinstance(p, FasaAttnProcessor) and p.kind == "legacy" for p in _attn1(unet))
    assert all(p.kind == "sdpa" for p in ours)
    assert all(type(p) is AttnProcessor for n, p in unet.attn_processors.items() if not n.endswith("attn1.processor"))
    on, off = _fasa_effect(unet, handle, kw)
    assert not torch.allclose(on[[2]], off[[2]])
    handle.remove()
    assert all(type(p) is AttnProcessor for p in unet.attn_processors.values())   # what diffusers set
    torch.testing.assert_close(run(unet, kw), off, rtol=0, atol=0)


def test_set_attn_processor_stock_keeps_fasa_custom_warns_at_once():
    unet = tiny_sd15(seed=3)
    kw = _kw(unet)
    handle = install_fasa(unet, random_mask((8, 6)), 1.5, layers=[0, 1], layout="cfg")
    ours = _attn1(unet)[:2]
    unet.set_attn_processor(AttnProcessor2_0())
    assert _attn1(unet)[:2] == ours
    on, off = _fasa_effect(unet, handle, kw)
    assert not torch.allclose(on[[2]], off[[2]])

    class Custom(AttnProcessor2_0):
        pass

    with pytest.warns(UserWarning, match=r"set_attn_processor put Custom on 2 FASA self-attention layer.*no longer"):
        unet.set_attn_processor(Custom())
    assert handle.layers == ()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                               # said once, not again at remove()
        handle.remove()
    assert all(type(p) is Custom for p in unet.attn_processors.values())


def test_fuse_qkv_projections_after_install_keeps_fasa():
    unet = tiny_sd15(seed=4)
    kw = _kw(unet)
    handle = install_fasa(unet, random_mask((8, 6)), 1.5, layers="all", layout="cfg")
    before_on, before_off = _fasa_effect(unet, handle, kw)
    unet.fuse_qkv_projections()
    assert all(isinstance(p, FasaAttnProcessor) and p.fused for p in _attn1(unet))
    on, off = _fasa_effect(unet, handle, kw)
    torch.testing.assert_close(on, before_on, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(off, before_off, rtol=1e-5, atol=1e-5)
    handle.remove()
    assert all(type(p) is FusedAttnProcessor2_0 for p in unet.attn_processors.values())


def test_unfuse_after_fuse_under_fasa_reads_the_unfused_weights_again():
    """fuse then unfuse with FASA installed: attn1 must read to_q/to_k/to_v again (an edit of to_q after
    unfusing, as a LoRA load does, is seen), and remove() restores the stock unfused processor."""
    unet, ref = tiny_sd15(seed=4), tiny_sd15(seed=4)
    kw = _kw(unet)
    handle = install_fasa(unet, random_mask((8, 6)), 1.5, layers="all", layout="cfg")
    unet.fuse_qkv_projections()
    unet.unfuse_qkv_projections()
    assert all(isinstance(p, FasaAttnProcessor) and not p.fused for p in _attn1(unet))
    with torch.no_grad():
        for m in (unet, ref):
            for blk in find_self_attention_blocks(m):
                blk.attn.to_q.weight.mul_(2)
    handle.enabled = False
    with torch.no_grad():
        torch.testing.assert_close(unet(**kw).sample, ref(**kw).sample, rtol=1e-5, atol=1e-5)
    handle.remove()
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    with torch.no_grad():
        torch.testing.assert_close(unet(**kw).sample, ref(**kw).sample, rtol=1e-5, atol=1e-5)


def test_lora_load_and_fuse_keep_fasa():
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = tiny_sd15(seed=5)
    donor = copy.deepcopy(unet)
    torch.manual_seed(0)
    donor.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora = get_peft_model_state_dict(donor)
    kw = _kw(unet)
    handle = install_fasa(unet, random_mask((8, 6)), 1.5, layers="all", layout="cfg")
    unet.load_lora_adapter(lora, prefix=None, adapter_name="tiny")
    assert all(isinstance(p, FasaAttnProcessor) for p in _attn1(unet))
    on, off = _fasa_effect(unet, handle, kw)
    donor_out = run(donor, kw)
    torch.testing.assert_close(off, donor_out, rtol=1e-5, atol=1e-5)   # the LoRA acts (stock rows = donor's)
    assert not torch.allclose(on[[2]], off[[2]])
    unet.fuse_lora()
    fused_on, fused_off = _fasa_effect(unet, handle, kw)
    torch.testing.assert_close(fused_on, on, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused_off, off, rtol=1e-4, atol=1e-5)
    handle.remove()


def test_freecure_on_a_pipeline_from_from_pipe():
    from diffusers import StableDiffusionPipeline

    pipe = BUILDERS["sd1"]()
    common = dict(fd_prompt="a photo of man with red hair", seed=0, output_type="pt", num_inference_steps=2,
                  height=IMAGE, width=IMAGE)
    ref = FreeCure(pipe, FakeParser(), layers="all", omega=2.0)("a photo of sks man with red hair", **common)
    other = StableDiffusionPipeline.from_pipe(pipe)
    other.set_progress_bar_config(disable=True)
    out = FreeCure(other, FakeParser(), layers="all", omega=2.0)("a photo of sks man with red hair", **common)
    torch.testing.assert_close(out.images, ref.images, rtol=0, atol=0)


def test_accelerate_offload_hooks_keep_fasa():
    """accelerate's offload hooks (what enable_model_cpu_offload puts on each model; the real call needs an
    accelerator, see tests/test_adapters_cuda.py) wrap the model's forward: FASA's pre-hook and processors still
    run, with the same result."""
    from accelerate import cpu_offload_with_hook

    pipe = BUILDERS["sd1"]()
    common = dict(fd_prompt="a photo of man with red hair", seed=0, output_type="pt", num_inference_steps=2,
                  height=IMAGE, width=IMAGE)
    ref = FreeCure(pipe, FakeParser(), layers="all", omega=2.0)("a photo of sks man with red hair", **common)
    _, hook = cpu_offload_with_hook(pipe.unet, execution_device="cpu")
    try:
        out = FreeCure(pipe, FakeParser(), layers="all", omega=2.0)("a photo of sks man with red hair", **common)
    finally:
        hook.remove()
    torch.testing.assert_close(out.images, ref.images, rtol=0, atol=0)


def test_bare_flux_set_attn_processor_with_its_stock_processor_keeps_fasa():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    model = tiny_flux()
    kw = flux_inputs(2, 4, 6)
    with install_fasa(model, random_mask((4, 6)), 1.2, layers="all", layout="plain", grid=(4, 6)) as handle:
        before = run(model, kw)
        model.set_attn_processor(FluxAttnProcessor())
        assert handle.layers == (0, 1, 2, 3)
        torch.testing.assert_close(run(model, kw), before, rtol=0, atol=0)


@pytest.mark.parametrize("proc", [AttnProcessor2_0, AttnProcessor])
def test_a_unet_stock_processor_on_flux_layers_is_custom_there(proc):
    """FASA's FLUX processor reproduces FluxAttnProcessor only: a UNet processor on a FLUX layer is custom
    (warned and left in place after install, refused without force= at install), not silently replaced."""
    model = tiny_flux()
    with install_fasa(model, random_mask((4, 6)), 1.2, layers="all", layout="plain", grid=(4, 6)) as handle:
        with pytest.warns(UserWarning, match=rf"put {proc.__name__} on 4 FASA self-attention layer.*no longer"):
            model.set_attn_processor(proc())
        assert handle.layers == ()
        assert all(type(b.attn.processor) is proc for b in find_self_attention_blocks(model))
    with pytest.raises(ValueError, match=f"custom processor {proc.__name__}.*force=True"):
        install_fasa(model, random_mask((4, 6)), layers="all", layout="plain", grid=(4, 6))
    install_fasa(model, random_mask((4, 6)), layers="all", layout="plain", grid=(4, 6), force=True).remove()
    unet = tiny_sd15()
    unet.set_attn_processor(_flux_processor())                       # and the reverse
    with pytest.raises(ValueError, match="custom processor FluxAttnProcessor"):
        install_fasa(unet, random_mask((8, 6)), layers="all", layout="cfg")


def _flux_processor():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    return FluxAttnProcessor()


def test_attention_slicing_is_followed():
    """enable_attention_slicing puts sliced processors on the FASA layers: said at once, and handle.layers
    follows; disable_attention_slicing (often called as a reset) leaves FASA on."""
    pipe = BUILDERS["sd1"]()
    with install_fasa(pipe, random_mask((IMAGE, IMAGE)), layers="all") as handle:
        n = len(handle.layers)
        pipe.disable_attention_slicing()
        assert len(handle.layers) == n and all(isinstance(p, FasaAttnProcessor) for p in _attn1(pipe.unet))
        with pytest.warns(UserWarning, match="FASA no longer runs there"):
            pipe.enable_attention_slicing(1)
        assert handle.layers == ()


def test_sequential_cpu_offload_keeps_the_mask_off_meta():
    """accelerate's sequential offload leaves the weights on "meta" between forwards: the mask copy must not
    follow them there (it is moved to the forward's device per grid)."""
    from accelerate import cpu_offload

    unet, ref = tiny_sd15(seed=3), tiny_sd15(seed=3)
    kw = unet_inputs(unet, 4, 8, 8)
    with install_fasa(ref, random_mask((8, 8)), 1.5, layers="all", layout="cfg"):
        want = run(ref, kw)
    cpu_offload(unet, execution_device=torch.device("cpu"))
    with install_fasa(unet, random_mask((8, 8)), 1.5, layers="all", layout="cfg"):
        torch.testing.assert_close(run(unet, kw), want, rtol=0, atol=0)


def test_deep_copy_of_a_model_carrying_fasa_is_a_clear_error():
    unet = tiny_sd15(seed=5)
    with install_fasa(unet, random_mask((8, 6)), 1.5, layers="all", layout="cfg"):
        with pytest.raises(TypeError, match="cannot be deep-copied"):
            copy.deepcopy(unet)
    copy.deepcopy(unet)  # after remove(): a plain model


# ---- what attn_processors reports with FASA installed (issue 25, item 10) ---------------------------------------
# diffusers' own tests (v0.40.0 test files on diffusers 0.42.1) read attn_processors back after setting
# processors: the model tests' test_attention_processor_dict (set AttnProcessor(), read AttnProcessor back) and
# SDXL's test_fused_qkv_projections (every processor's class name starts with "Fused" after fusing). With FASA
# installed a FASA layer reports the stock processor it stands in for; FASA keeps acting underneath.

def test_attn_processors_reads_back_what_was_set_and_fasa_keeps_acting():
    unet = tiny_sd15(seed=6)
    kw = _kw(unet)
    handle = install_fasa(unet, random_mask((8, 6)), 1.5, layers="all", layout="cfg")
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    assert all(isinstance(p, FasaAttnProcessor) for p in _attn1(unet))     # the module's own .processor is FASA
    for proc in (AttnProcessor(), AttnProcessor2_0()):
        unet.set_attn_processor(proc)
        assert all(p is proc for p in unet.attn_processors.values())
        on, off = _fasa_effect(unet, handle, kw)
        assert torch.equal(on[[1, 3]], off[[1, 3]]) and not torch.allclose(on[[2]], off[[2]])
    saved = unet.attn_processors                                              # the save/restore idiom
    unet.set_attn_processor(saved)
    assert all(isinstance(p, FasaAttnProcessor) for p in _attn1(unet)) and handle.layers
    handle.remove()
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())


def test_fuse_and_unfuse_read_the_stock_processors_of_a_fasa_pipeline():
    pipe = BUILDERS["sdxl"]()
    call = dict(prompt=["a photo of sks man", "a photo of man"], num_inference_steps=2, height=IMAGE, width=IMAGE,
                output_type="latent")

    def images():
        return pipe(**call, generator=torch.Generator().manual_seed(0)).images

    handle = install_fasa(pipe, random_mask((8, 8)), 1.5, layers="all")
    before = images()
    pipe.fuse_qkv_projections()
    assert all(type(p).__name__.startswith("Fused") for p in pipe.unet.attn_processors.values())
    assert all(isinstance(p, FasaAttnProcessor) and p.fused for p in _attn1(pipe.unet))
    fused = images()
    torch.testing.assert_close(fused, before, rtol=1e-4, atol=1e-4)
    pipe.unfuse_qkv_projections()
    assert all(type(p) is AttnProcessor2_0 for p in pipe.unet.attn_processors.values())
    torch.testing.assert_close(images(), before, rtol=1e-4, atol=1e-4)
    handle.enabled = False
    assert (images() - before).abs().max() > 1e-4                              # FASA acted all along
    handle.remove()


def test_flux_attn_processors_report_the_stock_processor():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    model = tiny_flux()
    with install_fasa(model, random_mask((8, 8)), layers="all", layout="plain") as handle:
        assert all(type(p) is FluxAttnProcessor for p in model.attn_processors.values())
        assert len(handle.layers) == len(find_self_attention_blocks(model))
