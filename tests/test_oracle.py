"""The float64 oracle (``fasa_reference``) on its own: independent of the code it judges, and right where an
independent implementation (SDPA in float64) can say so. Its default scale and its reading of ``mask=None``
are checked here against SDPA, never against the library's validation or backends."""
from __future__ import annotations

import ast
import math
import pathlib

import pytest
import torch
import torch.nn.functional as F

from fasa_cases import make_mask
from freecure_ops import fasa_reference, reference


def _inputs(b=2, h=2, n_q=9, n_p=7, n_f=11, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for n in (n_q, n_p, n_f, n_p, n_f))


def sdpa(q, k, v, bias=None, scale=None):
    """SDPA in float64 with an optional per-key additive bias [B, Nk] (or [Nk])."""
    mask = None
    if bias is not None:
        bias = bias if bias.dim() == 2 else bias[None]
        mask = bias[:, None, None, :].to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def close(a, b):
    assert (a - b).abs().max().item() < 1e-12


def test_oracle_shares_no_code_with_what_it_checks():
    tree = ast.parse(pathlib.Path(reference.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    relative = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0]
    assert imported <= {"__future__", "math", "torch"} and not relative, imported


def test_default_scale_is_head_dim_to_the_minus_half():
    q, k_p, k_f, v_p, v_f = _inputs(d=12)
    # an all-zero mask: plain attention over PD, SDPA's own default scale (1/sqrt(D))
    close(fasa_reference(q, k_p, k_f, v_p, v_f, torch.zeros(11, dtype=torch.float64), 8.0), sdpa(q, k_p, v_p))
    close(fasa_reference(q, k_p, k_f, v_p, v_f, torch.zeros(11), 8.0, scale=0.3), sdpa(q, k_p, v_p, scale=0.3))
    assert not torch.allclose(fasa_reference(q, k_p, k_f, v_p, v_f, None, 1.0),
                              fasa_reference(q, k_p, k_f, v_p, v_f, None, 1.0, scale=1 / math.sqrt(13)))


@pytest.mark.parametrize("mode,omega", [("bias", 0.0), ("bias", 1.5), ("scale", 1.0), ("scale", 2.0)])
def test_mask_none_is_all_ones(mode, omega):
    q, k_p, k_f, v_p, v_f = _inputs()
    k, v = torch.cat([k_p, k_f], 2), torch.cat([v_p, v_f], 2)
    out = fasa_reference(q, k_p, k_f, v_p, v_f, None, omega, mode=mode)
    if mode == "bias":   # every FD key biased by omega * 1
        want = sdpa(q, k, v, torch.cat([torch.zeros(7), torch.full((11,), omega)]).double())
    else:                # every FD logit scaled by omega * 1: fold it into the keys
        want = sdpa(q, torch.cat([k_p, omega * k_f], 2), v)
    close(out, want)
    close(out, fasa_reference(q, k_p, k_f, v_p, v_f, torch.ones(2, 11, dtype=torch.float64), omega, mode=mode))


@pytest.mark.parametrize("kind", ["soft", "binary", "bool"])
def test_bias_mode_is_sdpa_with_a_key_bias(kind):
    q, k_p, k_f, v_p, v_f = _inputs(seed=1)
    mask = make_mask(kind, 2, 11, "cpu", seed=5)
    m = mask.double()
    bias = torch.cat([torch.zeros(2, 7, dtype=torch.float64),
                      torch.where(m > 0, 1.5 * m, torch.full_like(m, -math.inf))], 1)
    out = fasa_reference(q, k_p, k_f, v_p, v_f, mask, 1.5)
    close(out, sdpa(q, torch.cat([k_p, k_f], 2), torch.cat([v_p, v_f], 2), bias))
    # excluded keys are not part of the computation: their K/V can hold anything
    poisoned_k, poisoned_v = k_f.clone(), v_f.clone()
    for b in range(2):
        poisoned_k[b, :, m[b] == 0] = math.nan
        poisoned_v[b, :, m[b] == 0] = math.inf
    assert torch.isfinite(fasa_reference(q, k_p, poisoned_k, v_p, poisoned_v, mask, 1.5)).all()


def test_scale_mode_is_sdpa_with_scaled_keys_and_shared_masks_broadcast():
    q, k_p, k_f, v_p, v_f = _inputs(seed=2)
    mask = make_mask("soft", 1, 11, "cpu", shared=True, seed=6)   # [Nimg], shared by the batch
    k = torch.cat([k_p, 0.8 * mask.double()[None, None, :, None] * k_f], 2)
    out = fasa_reference(q, k_p, k_f, v_p, v_f, mask, 0.8, mode="scale")
    close(out, sdpa(q, k, torch.cat([v_p, v_f], 2)))
    close(out, fasa_reference(q, k_p, k_f, v_p, v_f, mask.expand(2, 11), 0.8, mode="scale"))


def test_flux_variant_against_sdpa():
    n_txt = 4
    q, k_p, k_f, v_p, v_f = _inputs(n_q=11, n_p=11, n_f=11, seed=3)
    mask = make_mask("soft", 2, 11 - n_txt, "cpu", seed=7).double()
    out, lse = fasa_reference(q, k_p, k_f, v_p, v_f, mask, 1.5, n_txt=n_txt, return_lse=True)
    close(out[:, :, :n_txt], sdpa(q[:, :, :n_txt], k_p, v_p))  # text rows: PD keys only
    bias = torch.cat([torch.zeros(2, 11, dtype=torch.float64),
                      torch.where(mask > 0, 1.5 * mask, torch.full_like(mask, -math.inf))], 1)
    k, v = torch.cat([k_p, k_f[:, :, n_txt:]], 2), torch.cat([v_p, v_f[:, :, n_txt:]], 2)
    close(out[:, :, n_txt:], sdpa(q[:, :, n_txt:], k, v, bias))  # image rows: PD + FD image keys
    s = torch.einsum("bhqd,bhkd->bhqk", q[:, :, n_txt:], k) / math.sqrt(12) + bias[:, None, None, :]
    close(lse[:, :, n_txt:], torch.logsumexp(s, -1))
