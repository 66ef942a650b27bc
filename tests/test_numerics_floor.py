"""Numerics at the rounding floor beyond the kernel's case table (tests/test_fasa_kernel.py):

* bf16 inputs whose magnitudes only bf16 can hold (a bf16 computation done in fp16 overflows to inf);
* the launcher hands the compiled kernel the input's own dot dtype (bf16 dots stay bf16 on GPUs; the CPU
  interpreter's upcast of bf16 hides this from every numeric test that runs here);
* fp16 with sharp logits and at the largest head dim, where fp16 accumulation in ``tl.dot`` shows.
"""
from __future__ import annotations

import importlib

import pytest
import torch
import triton.language as tl

from fasa_cases import assert_close_to_ref, make_inputs, make_mask
from freecure_ops import fasa_attention


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bf16_range_beyond_fp16(backend, device):
    # |q|, |v| ~ 1e5 overflow fp16 (max 65504) and |k| ~ 1e-5 is fp16-subnormal, while the logits stay O(1):
    # only a computation that keeps bf16's range gets this right.
    q, k_p, k_f, v_p, v_f = make_inputs(1, 2, 40, 33, 47, 64, torch.float32, device, seed=11)
    inputs = tuple(t.to(torch.bfloat16) for t in (q * 1e5, k_p * 1e-5, k_f * 1e-5, v_p * 1e5, v_f * 1e5))
    mask = make_mask("soft", 1, 47, device, seed=12)
    out = fasa_attention(*inputs, mask, 1.5, backend=backend)
    assert_close_to_ref(out, inputs, mask, 1.5)


@pytest.mark.parametrize("mode", ["bias", "scale"])
@pytest.mark.parametrize("d,sharp", [(256, 1.0), (64, 3.0), (128, 2.0)])
def test_fp16_sharp_logits_and_largest_head_dim_at_the_floor(d, sharp, mode, device):
    # Trained attention is sharp: logits of tens. Rounding q.k to fp16 (fp16 accumulation in tl.dot) costs
    # |s| * 2^-11 per logit there, many times the output's rounding floor.
    inputs = make_inputs(1, 2, 70, 66, 90, d, torch.float16, device, seed=13, scale_qk=sharp)
    mask = make_mask("soft", 1, 90, device, seed=14)
    out = fasa_attention(*inputs, mask, 1.5, mode=mode, backend="triton")
    assert_close_to_ref(out, inputs, mask, 1.5, mode=mode)


class _Launch:
    """Stands in for the Triton kernel object: records the launch's constexpr arguments."""

    def __init__(self):
        self.kwargs = None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.kwargs = kwargs
        return launch


@pytest.mark.parametrize("dtype,dot", [(torch.bfloat16, tl.bfloat16), (torch.float16, tl.float16),
                                       (torch.float32, tl.float32)], ids=str)
def test_compiled_launch_keeps_the_input_dot_dtype(dtype, dot, monkeypatch):
    mod = importlib.import_module("freecure_ops.kernels.fasa_fwd")
    launch = _Launch()
    monkeypatch.setattr(mod, "interpreting", lambda: False)          # as on a GPU: no interpreter upcast
    monkeypatch.setattr(mod, "_fasa_fwd_kernel", launch)
    monkeypatch.setattr(mod, "_sm_count", lambda index: 132, raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    q, k_p, k_f, v_p, v_f = make_inputs(1, 2, 20, 20, 20, 64, dtype, "cpu")
    mod.fasa_fwd(q, k_p, k_f, v_p, v_f, None, scale=0.125, omega=1.5, mode="bias", n_txt=0)
    assert launch.kwargs is not None, "the kernel was not launched"
    assert "DOT_DTYPE" in launch.kwargs, "the launcher's dot-dtype argument moved: update this test"
    assert launch.kwargs["DOT_DTYPE"] == dot
    assert launch.kwargs.get("IEEE") == (dtype == torch.float32)  # fp32: full-precision dots, no TF32
