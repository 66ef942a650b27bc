"""Shared pieces of the adapter tests: tiny random diffusers models (built offline), their inputs, a layer
capture, and an independent float64 eager FASA (materialized scores) that the processors are held against.
Also the tests of the mask resize helper and of the oracle itself.

The oracle shares no code with freecure_ops or the adapters: projections, RMSNorm, RoPE, the mask resize and
the FASA softmax are written out here from SPEC.md.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from freecure_ops.masks import resize_mask_to_grid

# ---------------------------------------------------------------------------------------------------------------
# tiny models


def tiny_sd15(seed=0):
    """SD1.5-shaped: 4 stages, head dims 40/80/160 (one head each), 10 transformer blocks."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(40, 80, 160, 160), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=1, norm_num_groups=8).eval()


def tiny_sdxl(seed=0):
    """SDXL-shaped: text_time conditioning, linear projections, 2 transformer layers per block, 2/4 heads."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=32,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
        use_linear_projection=True, norm_num_groups=8).eval()


def tiny_flux(seed=0):
    """FLUX-shaped: 1 double- and 3 single-stream blocks, 2 heads of 16 (RoPE axes 4+6+6)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=3, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()


def unet_inputs(unet, batch, h, w, seed=1, t=500):
    g = torch.Generator().manual_seed(seed)
    kw = dict(sample=torch.randn(batch, 4, h, w, generator=g), timestep=torch.tensor(t),
              encoder_hidden_states=torch.randn(batch, 7, 32, generator=g))
    if unet.config.addition_embed_type == "text_time":
        kw["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, 32, generator=g),
                                       time_ids=torch.rand(batch, 6, generator=g) * 100)
    return kw


def flux_inputs(batch, h, w, n_txt=5, seed=1, t=0.5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return dict(hidden_states=torch.randn(batch, h * w, 4, generator=g),
                encoder_hidden_states=torch.randn(batch, n_txt, 32, generator=g),
                pooled_projections=torch.randn(batch, 32, generator=g), timestep=torch.full((batch,), t),
                img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(n_txt, 3))


@torch.no_grad()
def run(model, kw):
    return model(**kw).sample


def random_mask(shape, seed=3, p=0.5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) < p


def soft_mask(shape, seed=4):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(*shape, generator=g) * 1.5
    return torch.where(m < 0.5, torch.zeros_like(m), m)  # zeros (excluded) and soft values


def pair_rows(batch, layout):
    """[(pd_row, fd_row, is_uncond)] from SPEC.md's batch layouts."""
    if layout == "cfg":
        n = batch // 4
        return [(half * 2 * n + i, half * 2 * n + n + i, half == 0) for half in (0, 1) for i in range(n)]
    n = batch // 2
    return [(i, n + i, False) for i in range(n)]


def mask_tokens(mask, h, w):
    """Nearest resize to h x w, row-major, float64, in plain Python index arithmetic: [n or 1, h*w]."""
    m = mask.double()
    m = m[None] if m.dim() == 2 else m
    H, W = m.shape[-2:]
    rows = [y * H // h for y in range(h)]
    cols = [x * W // w for x in range(w)]
    return torch.stack([torch.stack([m[:, r, c] for c in cols], -1) for r in rows], -2).reshape(m.shape[0], h * w)


# ---------------------------------------------------------------------------------------------------------------
# capture of one attention layer's inputs and outputs during a real forward


class LayerCapture:
    """Records args/kwargs/output of the given attention modules (detached clones) during a forward."""

    def __init__(self, modules: dict):
        self.modules = modules
        self.records = {}
        self._handles = []

    def __enter__(self):
        for name, mod in self.modules.items():
            def hook(module, args, kwargs, output, name=name):
                clone = (lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else
                         tuple(t.detach().clone() for t in x) if isinstance(x, tuple) else x)
                self.records[name] = ([clone(a) for a in args], {k: clone(v) for k, v in kwargs.items()}, clone(output))
            self._handles.append(mod.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        return False


def capture_grids(unet, names):
    """Pre-hooks on the Transformer2DModel around each attn1: its 4-D input gives the layer's (h, w)."""
    grids, handles = {}, []
    for name in names:
        parent = unet.get_submodule(name.split(".transformer_blocks.")[0])
        handles.append(parent.register_forward_pre_hook(
            lambda mod, args, name=name: grids.__setitem__(name, tuple(args[0].shape[-2:]))))
    return grids, handles


# ---------------------------------------------------------------------------------------------------------------
# the float64 eager oracle


def _lin(x, layer):
    y = x @ layer.weight.double().T
    return y if layer.bias is None else y + layer.bias.double()


def eager_attention_rows(q, k, v, pairs, mask_tok, omega, *, mode="bias", sf=1.0, n_txt=0):
    """q, k, v float64 [B, H, N, D]. PD rows: one softmax over [PD keys, FD keys] with the FD part biased
    (bias mode) or scaled (scale mode) by the mask; FD rows: plain softmax attention. Returns [B, H, N, D]."""
    scale = q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    n_q = q.shape[2]
    for i, (p, f, uncond) in enumerate(pairs):
        m = mask_tok[i % mask_tok.shape[0]] if mask_tok.shape[0] > 1 else mask_tok[0]
        m = torch.cat([m.new_zeros(n_txt), m])                                    # [Nf]
        s_pp = (q[p] @ k[p].transpose(-1, -2)) * scale                           # [H, Nq, Np]
        s_pf = (q[p] @ k[f].transpose(-1, -2)) * scale                           # [H, Nq, Nf]
        if mode == "bias":
            s_pf = torch.where(m > 0, s_pf + omega * m, torch.full_like(s_pf, float("-inf")))
        else:
            s_pf = omega * m * s_pf
        if n_txt:
            s_pf[:, :, :n_txt] = float("-inf")
            s_pf[:, :n_txt, :] = float("-inf")
        w = torch.softmax(torch.cat([s_pp, s_pf], -1), -1)
        fasa = w @ torch.cat([v[p], v[f]], 1)
        plain_p = torch.softmax(s_pp, -1) @ v[p]
        out[p] = (1 - sf) * fasa + sf * plain_p if uncond else fasa
        out[f] = torch.softmax((q[f] @ k[f].transpose(-1, -2)) * scale, -1) @ v[f]
        assert n_q == q.shape[2]
    return out


def unet_attn1_oracle(attn, x, pairs, mask_tok, omega, *, mode="bias", sf=1.0):
    """attn1 of a BasicTransformerBlock in float64: x [B, N, C] -> [B, N, C]."""
    assert attn.spatial_norm is None and attn.group_norm is None and attn.norm_q is None
    assert not attn.residual_connection and attn.rescale_output_factor == 1.0
    x = x.double()
    B, N, _ = x.shape
    H = attn.heads
    q, k, v = (_lin(x, lyr).view(B, N, H, -1).transpose(1, 2) for lyr in (attn.to_q, attn.to_k, attn.to_v))
    o = eager_attention_rows(q, k, v, pairs, mask_tok, omega, mode=mode, sf=sf)
    return _lin(o.transpose(1, 2).reshape(B, N, -1), attn.to_out[0])


def _rms(x, norm):
    var = x.pow(2).mean(-1, keepdim=True)
    return x * torch.rsqrt(var + norm.eps) * norm.weight.double()


def _rope(x, cos, sin):
    """FLUX RoPE (interleaved real pairs) on x [B, S, H, D]; cos/sin [S, D]."""
    x_re, x_im = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rot = torch.stack([-x_im, x_re], -1).flatten(3)
    return x * cos.double()[None, :, None] + rot * sin.double()[None, :, None]


def flux_attn_oracle(attn, hidden, rope, pairs, mask_tok, omega, *, enc=None, n_txt=0, mode="bias", sf=1.0):
    """FLUX joint attention in float64. Double block (enc given): returns (img_out, txt_out); single block
    (hidden already [txt, img]): returns the joint output before the block's proj_out."""
    hd = attn.head_dim
    x = hidden.double()
    q, k, v = (_lin(x, lyr).unflatten(-1, (-1, hd)) for lyr in (attn.to_q, attn.to_k, attn.to_v))
    q, k = _rms(q, attn.norm_q), _rms(k, attn.norm_k)
    if enc is not None:
        e = enc.double()
        eq, ek, ev = (_lin(e, lyr).unflatten(-1, (-1, hd)) for lyr in (attn.add_q_proj, attn.add_k_proj,
                                                                       attn.add_v_proj))
        eq, ek = _rms(eq, attn.norm_added_q), _rms(ek, attn.norm_added_k)
        q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        n_txt = enc.shape[1]
    q, k = _rope(q, *rope), _rope(k, *rope)
    o = eager_attention_rows(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), pairs, mask_tok, omega,
                             mode=mode, sf=sf, n_txt=n_txt)
    o = o.transpose(1, 2).flatten(2, 3)
    if enc is None:
        return o
    return _lin(o[:, n_txt:], attn.to_out[0]), _lin(o[:, :n_txt], attn.to_add_out)


def assert_close(actual, expected, tol=2e-5, what=""):
    """|actual - expected| <= tol * max(1, max|expected|), reported with the worst error."""
    err = (actual.double() - expected.double()).abs().max().item()
    bound = tol * max(1.0, expected.abs().max().item())
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


# ---------------------------------------------------------------------------------------------------------------
# tests of the mask resize helper and of the oracle


@pytest.mark.parametrize("src,dst", [((8, 8), (4, 4)), ((7, 5), (3, 4)), ((3, 5), (6, 10)), ((64, 48), (13, 7)),
                                     ((1, 1), (2, 3))])
def test_resize_mask_to_grid_matches_nearest_interpolate(src, dst):
    m = torch.rand(2, *src, generator=torch.Generator().manual_seed(0))
    got = resize_mask_to_grid(m, *dst)
    want = F.interpolate(m[None], size=dst, mode="nearest")[0].reshape(2, -1)
    assert got.shape == (2, dst[0] * dst[1]) and torch.equal(got, want)
    assert torch.equal(resize_mask_to_grid(m[0], *dst), want[0])
    assert torch.equal(got.double(), mask_tokens(m, *dst))


def test_resize_mask_to_grid_keeps_bool_and_row_major():
    m = torch.zeros(4, 6, dtype=torch.bool)
    m[1, 4] = True                               # row 1, col 4 of a 4x6 grid
    out = resize_mask_to_grid(m, 4, 6)
    assert out.dtype == torch.bool and out.nonzero().flatten().tolist() == [1 * 6 + 4]


@pytest.mark.parametrize("args,err", [(([1, 2], 2, 2), TypeError), ((torch.ones(4), 2, 2), ValueError),
                                      ((torch.ones(1, 1, 2, 2), 2, 2), ValueError),
                                      ((torch.ones(2, 2), 0, 2), ValueError), ((torch.ones(2, 2), 2, 2.0), TypeError)])
def test_resize_mask_to_grid_rejects_bad_input(args, err):
    with pytest.raises(err):
        resize_mask_to_grid(*args)


@pytest.mark.parametrize("n_txt,mode", [(0, "bias"), (3, "bias"), (3, "scale")])
def test_oracle_agrees_with_fasa_reference(n_txt, mode):
    """The test oracle and the library's own float64 reference agree (two independent readings of SPEC.md)."""
    from freecure_ops import fasa_reference

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 11, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = soft_mask((1, 11 - n_txt))
    got = eager_attention_rows(q, k, v, [(0, 1, False)], mask.double(), 1.5, mode=mode, n_txt=n_txt)
    want = fasa_reference(q[:1], k[:1], k[1:], v[:1], v[1:], mask[0].double(), 1.5, mode=mode, n_txt=n_txt)
    assert torch.allclose(got[0], want[0], atol=1e-12)
