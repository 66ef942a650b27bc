"""The PyTorch backend against the float64 reference with the kernel's accuracy rule, on the kernel's cases
(tests/test_fasa_kernel.py) plus the fp16/bf16 cases where rounding the bias or the scale factor to q's dtype
broke the rule (issue 11, item 3)."""
import pytest
import torch

from fasa_cases import assert_close_to_ref, make_inputs, make_mask, to64
from freecure_ops import fasa_attention, fasa_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run_torch(inputs, mask, omega, **kw):
    return fasa_attention(*inputs, mask, omega, backend="torch", **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [16, 40, 64, 80, 111, 160, 256])
def test_head_dims_odd_lengths(d, dtype, device):
    inputs = make_inputs(2, 2, 67, 45, 83, d, dtype, device, seed=d)
    mask = make_mask("binary", 2, 83, device)
    assert_close_to_ref(run_torch(inputs, mask, 1.5), inputs, mask, 1.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["bias", "scale"])
@pytest.mark.parametrize("kind,shared", [("binary", False), ("bool", False), ("soft", False), ("soft", True),
                                         ("zeros", False), ("ones", True)])
def test_mask_kinds(kind, shared, mode, dtype, device):
    inputs = make_inputs(2, 2, 53, 41, 70, 64, dtype, device, seed=3)
    mask = make_mask(kind, 2, 70, device, shared=shared)
    assert_close_to_ref(run_torch(inputs, mask, 1.5, mode=mode), inputs, mask, 1.5, mode=mode)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["bias", "scale"])
@pytest.mark.parametrize("omega", [-10.0, 0.0, 0.5, 1.5, 8.0, 10.0])
def test_omega(omega, mode, dtype, device):
    inputs = make_inputs(1, 2, 45, 39, 58, 64, dtype, device, seed=4)
    mask = make_mask("soft", 1, 58, device)
    assert_close_to_ref(run_torch(inputs, mask, omega, mode=mode), inputs, mask, omega, mode=mode)


def test_bf16_soft_mask_omega_10_bias(device):
    # The case: the bias omega*m rounded to bf16 gave an error of 0.074 against a bound of 0.030.
    inputs = make_inputs(2, 4, 128, 128, 128, 64, torch.bfloat16, device, seed=11)
    mask = make_mask("soft", 2, 128, device)
    assert_close_to_ref(run_torch(inputs, mask, 10.0), inputs, mask, 10.0)


def test_fp16_bias_beyond_fp16_range(device):
    # omega * m > 65504 is inf in fp16: it must stay a finite (huge) float32 bias.
    inputs = make_inputs(1, 2, 40, 30, 50, 32, torch.float16, device, seed=12)
    mask = make_mask("soft", 1, 50, device)
    out = run_torch(inputs, mask, 40000.0)
    assert torch.isfinite(out).all()
    assert_close_to_ref(out, inputs, mask, 40000.0)


def test_scale_mode_bf16_head_dim_80_negative_omega(device):
    # The case: omega*m folded into bf16 keys rounded the factor (0.72 against a bound of 0.42).
    inputs = make_inputs(2, 2, 96, 64, 96, 80, torch.bfloat16, device, seed=13)
    mask = make_mask("soft", 2, 96, device)
    assert_close_to_ref(run_torch(inputs, mask, -10.0, mode="scale"), inputs, mask, -10.0, mode="scale")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["bias", "scale"])
@pytest.mark.parametrize("n_txt", [1, 13, 40])
def test_flux_variant_text_image_boundary(n_txt, mode, dtype, device):
    n = 97
    inputs = make_inputs(1, 2, n, n, n, 48, dtype, device, seed=n_txt)
    mask = make_mask("soft", 1, n - n_txt, device)
    out = run_torch(inputs, mask, 1.5, mode=mode, n_txt=n_txt)
    assert_close_to_ref(out, inputs, mask, 1.5, mode=mode, n_txt=n_txt)


@pytest.mark.parametrize("layout", ["bnhd", "strided_d"])
def test_strided_inputs(layout, device):
    inputs = make_inputs(2, 3, 50, 37, 61, 40, torch.float16, device, layout=layout)
    mask = make_mask("soft", 2, 61, device)
    assert_close_to_ref(run_torch(inputs, mask, 1.5), inputs, mask, 1.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_large_logits_do_not_overflow(dtype, device):
    inputs = make_inputs(1, 2, 40, 36, 44, 64, dtype, device, scale_qk=12.0)
    mask = make_mask("binary", 1, 44, device)
    out = run_torch(inputs, mask, 1.5)
    assert torch.isfinite(out).all()
    assert_close_to_ref(out, inputs, mask, 1.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_excluded_fd_keys_holding_nan_or_inf_are_ignored(poison, shared, dtype, device):
    q, k_p, k_f, v_p, v_f = make_inputs(2, 2, 40, 33, 69, 32, dtype, device, seed=5)
    mask = make_mask("soft", 2, 69, device, shared=shared)
    clean = (q, k_p, k_f.clone(), v_p, v_f.clone())
    dead = (mask == 0) if shared else (mask == 0)[:, None, :].expand(-1, 2, -1)
    for t in (k_f, v_f):
        if shared:
            t[:, :, dead] = poison
        else:
            t[dead] = poison
    out = run_torch((q, k_p, k_f, v_p, v_f), mask, 1.5)
    assert torch.isfinite(out).all()
    assert_close_to_ref(out, clean, mask, 1.5)


def test_fd_text_keys_holding_nan_are_ignored(device):
    n, n_txt = 60, 21
    q, k_p, k_f, v_p, v_f = make_inputs(1, 2, n, n, n, 32, torch.float16, device)
    mask = make_mask("soft", 1, n - n_txt, device)
    clean = (q, k_p, k_f.clone(), v_p, v_f.clone())
    k_f[:, :, :n_txt] = float("nan")
    v_f[:, :, :n_txt] = float("nan")
    out = run_torch((q, k_p, k_f, v_p, v_f), mask, 1.5, n_txt=n_txt)
    assert_close_to_ref(out, clean, mask, 1.5, n_txt=n_txt)


def test_single_token_and_custom_scale(device):
    inputs = make_inputs(1, 1, 1, 1, 1, 8, torch.float32, device)
    mask = torch.ones(1, device=device)
    assert_close_to_ref(run_torch(inputs, mask, 1.5), inputs, mask, 1.5)
    inputs = make_inputs(1, 2, 31, 30, 29, 64, torch.bfloat16, device)
    mask = make_mask("soft", 1, 29, device)
    assert_close_to_ref(run_torch(inputs, mask, 1.5, scale=0.3), inputs, mask, 1.5, scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lse_matches_reference(dtype, device):
    n_txt = 11
    inputs = make_inputs(2, 2, 50, 50, 50, 40, dtype, device)
    mask = make_mask("soft", 2, 50 - n_txt, device)
    out, lse = run_torch(inputs, mask, 1.5, n_txt=n_txt, return_lse=True)
    assert_close_to_ref(out, inputs, mask, 1.5, n_txt=n_txt)
    _, lse64 = fasa_reference(*[to64(t) for t in inputs], mask.double(), 1.5, n_txt=n_txt, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == inputs[0].shape[:3]
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert (lse.double() - lse64).abs().max() < tol
