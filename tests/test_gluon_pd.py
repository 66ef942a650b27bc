"""The Gluon PD kernel (kernels/fasa_pd_gluon.py): attention of PD queries over PD keys with the QK and PV
wgmma products overlapped, an alternative PD provider for ``fasa_fwd``'s ``pd_sdpa`` path.

Gluon kernels do not run in Triton's CPU interpreter (a ``gluon.jit`` launch needs a GPU driver even with
TRITON_INTERPRET=1), so this file has two halves:

* on the CPU: the kernel compiles offline for sm_90a under the installed Triton and its SASS shows the overlap
  (a wgmma wait with one group pending, ``WARPGROUP.DEPBAR.LE gsb0, 0x1``, in the key loop), no spills,
  shared memory within the limit, and no barrier across both consumer warpgroups in the loop;
* on a Hopper GPU (skipped elsewhere, with the reason): out against a float64 reference by the flash-attention
  rule (``check_against_sdpa``: max|out - ref64| <= 2 * max|SDPA same dtype - ref64| + floor), the LSE, every
  config variant, diffusers' layout and ragged token counts, and the merge with the FD program by LSE.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from test_kernel_compile import needs_ptxas

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has_gluon_hopper() -> bool:
    try:
        from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma_wait  # noqa: F401
        return True
    except Exception:
        return False


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


# ---------------------------------------------------------------------------------------------------- CPU: SASS
_COMPILE = """
import json, torch
from freecure_ops.bench import gluon_report as g
for name, d, dtype, n, heads in (("d64", 64, torch.float16, 4096, 10), ("d128", 128, torch.bfloat16, 4608, 24)):
    r = g.sass_report(g.compile_sm90(d, dtype, n, n, heads))
    r["violations"] = g.violations(r)
    print(json.dumps(dict(case=name, **r)))
"""


@pytest.fixture(scope="module")
def sass_reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter cannot compile
    run = subprocess.run([sys.executable, "-c", _COMPILE], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return {r["case"]: r for r in map(json.loads, (x for x in run.stdout.splitlines() if x.startswith("{")))}


@needs_ptxas
@pytest.mark.skipif(not _has_gluon_hopper(), reason="this triton has no Gluon Hopper API (Triton 3.6+ has)")
@pytest.mark.parametrize("case", ["d64", "d128"])
def test_key_loop_overlaps_pv_with_the_softmax_in_sass(case, sass_reports):
    r = sass_reports[case]
    assert r["loop_depbar_1"] >= 1, "no wgmma wait with one group pending in the key loop: nothing overlaps"
    assert r["loop_hgmma"] >= 8, "the key loop lost its wgmma (HGMMA) instructions"
    assert r["under_pv_instr"] > 0, "no softmax work between the one-pending wait and the full wait"
    assert r["spill"] == 0, f"register spills: {r['spill']} bytes"
    assert r["shared"] <= 232448, f"shared memory {r['shared']} B over sm_90's 227 KB"
    # SPLIT_WG: the two consumer warpgroups never sync with one another inside the loop (128-thread barriers)
    assert r["loop_bar_threads"] and max(r["loop_bar_threads"]) <= 128 and 0 not in r["loop_bar_threads"], \
        r["loop_bar_threads"]
    assert r["violations"] == [], r["violations"]


# ------------------------------------------------------------------------------------------- GPU: correctness
gpu = pytest.mark.skipif(not _hopper(), reason="Gluon kernels run only on a GPU (not in the CPU interpreter); "
                                               "this one needs Hopper (sm_90): wgmma, TMA, setmaxnreg")

VARIANTS = {
    "default": {},
    "bn64": dict(BLOCK_N=64),
    "bn128": dict(BLOCK_N=128),
    "stages3": dict(STAGES=3),
    "ws8": dict(SPLIT_WG=False, num_warps=8),
    "nows": dict(SPLIT_WG=False, WARP_SPEC=False, num_warps=8),
}


def _inputs(b, h, n_q, n_k, d, dtype, layout, seed):
    gen = torch.Generator().manual_seed(seed)

    def make(n):
        x = torch.randn(b, n, h, d, generator=gen).to(dtype).cuda()
        return x.transpose(1, 2) if layout == "bnhd" else x.transpose(1, 2).contiguous()

    return make(n_q), make(n_k), make(n_k)


def _lse64(q, k, scale):
    return torch.logsumexp(scale * q.double() @ k.double().transpose(-1, -2), dim=-1)


def _check(n_q, n_k, dtype, d, layout, cfg):
    from fasa_cases import check_against_sdpa
    from freecure_ops.kernels import fasa_pd_gluon as g

    q, k, v = _inputs(2, 3, n_q, n_k, d, dtype, layout, seed=n_q + n_k + d)
    scale = d ** -0.5
    out, lse = g.pd_attention_gluon(q, k, v, scale, cfg)
    torch.cuda.synchronize()
    check_against_sdpa(out, q, k, v, scale=scale)
    assert (lse.double() - _lse64(q, k, scale)).abs().max() < 2e-3


@gpu
@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_q,n_k", [(300, 333), (77, 40), (1024, 4096)])
def test_matches_float64_reference(n_q, n_k, dtype, d, layout):
    _check(n_q, n_k, dtype, d, layout, None)


@gpu
@pytest.mark.parametrize("variant", sorted(set(VARIANTS) - {"default"}))
@pytest.mark.parametrize("d", [64, 128])
def test_every_variant_matches_float64_reference(d, variant):
    from freecure_ops.kernels import fasa_pd_gluon as g

    cfg = {**g.config(d), **VARIANTS[variant]}
    if d == 128 and cfg["BLOCK_N"] == 128 and cfg.get("STAGES") == 3:
        pytest.skip("over the shared-memory limit")
    _check(333, 1000, torch.bfloat16, d, "bnhd", cfg)


@gpu
def test_every_output_is_written():
    from freecure_ops.kernels import fasa_pd_gluon as g

    q, k, v = _inputs(1, 2, 200, 130, 64, torch.float16, "bnhd", seed=5)
    grid, args, meta, out, lse = g.launch_args(q, k, v, 0.125)
    out.fill_(float("nan"))
    lse.fill_(float("nan"))
    g._pd_attn_fwd[grid](*args, **meta)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_as_the_pd_part_of_fasa(dtype):
    # What pd_sdpa does with torch's kernel, with this one: its (out, lse) as launch_plan's pd_part, the FD
    # program alone, the merge by LSE; against the float64 FASA oracle.
    from fasa_cases import assert_close_to_ref, make_inputs, make_mask
    from freecure_ops import prepare_fasa_mask
    from freecure_ops.kernels import fasa_pd_gluon as g
    from freecure_ops.kernels.fasa_fwd import (_fasa_fwd_kernel, _merge_kernel, fasa_fwd, launch_plan, pd_sdpa_op,
                                               tile_config)

    b, d, n_img = 2, 64, 320
    inputs = make_inputs(b, 2, 256, 256, n_img, d, dtype, "cuda", layout="bnhd", seed=41)
    mask = make_mask("binary", b, n_img, "cuda")
    q, k_p, _, v_p, _ = inputs
    scale = d ** -0.5
    pd_part = g.pd_attention_gluon(q, k_p, v_p, scale)
    config = tile_config(d, q.element_size(), q.shape[2], q.shape[1], b)
    grid, args, meta, out, _, merge = launch_plan(*inputs, prepare_fasa_mask(mask), scale=scale, omega=1.5,
                                                  mode="bias", n_txt=0, return_lse=False, config=config,
                                                  interpret=False, pd_part=pd_part)
    _fasa_fwd_kernel[grid](*args, **meta)
    _merge_kernel[merge[0]](*merge[1], **merge[2])
    torch.cuda.synchronize()
    assert_close_to_ref(out, inputs, mask, 1.5)
    # the same through the launcher's option
    assert pd_sdpa_op(q, k_p, v_p, scale, "gluon") == "gluon"
    via = fasa_fwd(*inputs, prepare_fasa_mask(mask), scale=scale, omega=1.5, mode="bias", n_txt=0, pd_sdpa="gluon")
    assert torch.equal(via, out)


@gpu
def test_refuses_what_it_does_not_take():
    from freecure_ops.kernels import fasa_pd_gluon as g

    q, k, v = _inputs(1, 2, 64, 64, 64, torch.float16, "bhnd", seed=1)
    assert g.supports(q, k, v)
    assert not g.supports(q.float(), k.float(), v.float())                     # fp32
    assert not g.supports(*(t[..., :40] for t in (q, k, v)))                    # head dim 40
    assert not g.supports(*(t.transpose(2, 3).contiguous().transpose(2, 3) for t in (q, k, v)))  # strided D
    with pytest.raises(ValueError):
        g.pd_attention_gluon(q, k, v, -0.1)
