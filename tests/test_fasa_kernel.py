"""The Triton kernel against the float64 eager reference (flash-attention tolerance rule).

Without CUDA these run in Triton's CPU interpreter (tests/conftest.py). bf16 there: the interpreter's bf16
tl.dot is wrong, so the launcher upcasts bf16 tiles to fp32 before tl.dot when interpreting; bf16 loads,
stores and the fp32 accumulation are still exercised. On CUDA the same tests run the real compiled bf16 path.
"""
import pytest
import torch

from fasa_cases import assert_close_to_ref, make_inputs, make_mask, rand, to64
from freecure_ops import FasaMask, fasa_attention, fasa_reference, prepare_fasa_mask
from freecure_ops.kernels import fasa_fwd
from freecure_ops.kernels.fasa_fwd import check_launch_limits

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Kernel variants the GPU tile sweep times against the default launch (fasa_fwd's binary / split_kv / pd_sdpa).
VARIANTS = {"binary": dict(binary=True), "split": dict(split_kv=True), "split-binary": dict(binary=True, split_kv=True),
            "pd-sdpa": dict(pd_sdpa=True), "bin-fd128": dict(binary=True, fd_block_n=128)}


def run_triton(inputs, mask, omega, **kw):
    return fasa_attention(*inputs, mask, omega, backend="triton", **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [16, 40, 64, 72, 80, 96, 111, 128, 160, 256])
def test_head_dims_odd_lengths(d, dtype, device):
    # Nq != Np != Nf, none a multiple of any tile size.
    inputs = make_inputs(2, 2, 67, 45, 83, d, dtype, device, seed=d)
    mask = make_mask("binary", 2, 83, device)
    assert_close_to_ref(run_triton(inputs, mask, 1.5), inputs, mask, 1.5)


def test_long_key_sequences(device):
    # Tens of thousands of keys against a handful of queries; a sparse mask (FD tiles mostly skipped).
    inputs = make_inputs(1, 1, 7, 3001, 12007, 16, torch.float16, device)
    mask = (torch.rand(12007, generator=torch.Generator().manual_seed(0)) > 0.97).float().to(device)
    assert_close_to_ref(run_triton(inputs, mask, 1.5), inputs, mask, 1.5)


@pytest.mark.parametrize("layout", ["bnhd", "strided_d"])
def test_strided_inputs_read_in_place(layout, device):
    inputs = make_inputs(2, 3, 50, 37, 61, 40, torch.float16, device, layout=layout)
    assert not inputs[0].is_contiguous()
    mask = make_mask("soft", 2, 61, device)
    assert_close_to_ref(run_triton(inputs, mask, 1.5), inputs, mask, 1.5)


def test_output_layout_allows_free_head_merge(device):
    b, h, n, d = 2, 3, 29, 40
    inputs = make_inputs(b, h, n, n, n, d, torch.float16, device)
    out = run_triton(inputs, None, 1.0)
    merged = out.transpose(1, 2).reshape(b, n, h * d)
    assert merged.data_ptr() == out.data_ptr() and out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("mode", ["bias", "scale"])
@pytest.mark.parametrize("kind,shared", [("binary", False), ("bool", False), ("soft", False), ("soft", True),
                                         ("zeros", False), ("ones", True), ("bool", True)])
def test_mask_kinds(kind, shared, mode, device):
    inputs = make_inputs(2, 2, 53, 41, 70, 64, torch.float16, device, seed=3)
    mask = make_mask(kind, 2, 70, device, shared=shared)
    assert_close_to_ref(run_triton(inputs, mask, 1.5, mode=mode), inputs, mask, 1.5, mode=mode)


@pytest.mark.parametrize("mode", ["bias", "scale"])
@pytest.mark.parametrize("omega", [0.0, 0.5, 1.5, 8.0])
def test_omega(omega, mode, device):
    inputs = make_inputs(1, 2, 45, 39, 58, 64, torch.float32, device, seed=4)
    mask = make_mask("soft", 1, 58, device)
    assert_close_to_ref(run_triton(inputs, mask, omega, mode=mode), inputs, mask, omega, mode=mode)


def test_mask_none_means_all_ones(device):
    inputs = make_inputs(1, 2, 33, 30, 40, 32, torch.float32, device)
    ones = torch.ones(40, device=device)
    torch.testing.assert_close(run_triton(inputs, None, 1.5), run_triton(inputs, ones, 1.5), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["bias", "scale"])
@pytest.mark.parametrize("n_txt", [1, 13, 40, 64])
def test_flux_variant_text_image_boundary(n_txt, mode, dtype, device):
    # Joint sequences [text, image]; with 32-row query tiles the boundary falls inside a block for 13 and
    # 40, and the first block is pure text for 40. 64 (FLUX's 512 likewise) is a multiple of the query
    # tile: no tile mixes text and image rows, and the kernel compiles without the per-element text select.
    n = 97
    inputs = make_inputs(1, 2, n, n, n, 48, dtype, device, seed=n_txt)
    mask = make_mask("soft", 1, n - n_txt, device)
    out = run_triton(inputs, mask, 1.5, mode=mode, n_txt=n_txt)
    assert_close_to_ref(out, inputs, mask, 1.5, mode=mode, n_txt=n_txt)


def test_flux_text_rows_ignore_fd_entirely(device):
    n, n_txt = 60, 21
    q, k_p, k_f, v_p, v_f = make_inputs(1, 2, n, n, n, 32, torch.float32, device)
    mask = torch.ones(n - n_txt, device=device)
    out = run_triton((q, k_p, k_f, v_p, v_f), mask, 8.0, n_txt=n_txt)
    plain = torch.nn.functional.scaled_dot_product_attention(q[:, :, :n_txt], k_p, v_p)
    torch.testing.assert_close(out[:, :, :n_txt], plain, atol=1e-5, rtol=1e-5)
    # FD text keys are never attended: scrambling them changes nothing anywhere.
    k_f2, v_f2 = k_f.clone(), v_f.clone()
    k_f2[:, :, :n_txt] = 1e3
    v_f2[:, :, :n_txt] = -1e3
    out2 = run_triton((q, k_p, k_f2, v_p, v_f2), mask, 8.0, n_txt=n_txt)
    torch.testing.assert_close(out2, out, atol=0, rtol=0)


def test_large_logits_fp16_do_not_overflow(device):
    # Logits of several hundred: exp() of them overflows fp16 (and fp32) unless the softmax is online.
    inputs = make_inputs(1, 2, 40, 36, 44, 64, torch.float16, device, scale_qk=12.0)
    mask = make_mask("binary", 1, 44, device)
    ref64 = fasa_reference(*[to64(t) for t in inputs], to64(mask), 1.5)
    s = torch.einsum("bhqd,bhkd->bhqk", to64(inputs[0]), to64(inputs[1])) * 64 ** -0.5
    assert s.abs().max() > 200
    out = run_triton(inputs, mask, 1.5)
    assert torch.isfinite(out).all()
    # The same-dtype eager reference is the error scale.
    assert_close_to_ref(out, inputs, mask, 1.5)
    assert (out.double() - ref64).abs().max() < 0.05


def test_excluded_fd_tiles_are_never_loaded(device):
    # With 16-key tiles, FD tiles 1 and 3 have an all-zero mask. Poison their keys and values with NaN: the
    # kernel must skip those tiles outright (a masked-but-loaded tile would turn 0 * NaN into NaN).
    b, h, n, d, bn = 1, 2, 40, 32, 16
    q, k_p, k_f, v_p, v_f = make_inputs(b, h, n, n, 4 * bn + 5, d, torch.float32, device)
    mask = rand(4 * bn + 5, seed=7, device=device) + 0.1
    for tile in (1, 3):
        mask[tile * bn:(tile + 1) * bn] = 0
    clean = (q, k_p, k_f.clone(), v_p, v_f.clone())
    for t in (k_f, v_f):
        t[:, :, mask == 0] = float("nan")
    out = fasa_fwd(q, k_p, k_f, v_p, v_f, prepare_fasa_mask(mask), scale=d ** -0.5,
                   omega=1.5, mode="bias", n_txt=0, block_m=16, block_n=bn)
    assert torch.isfinite(out).all()
    assert_close_to_ref(out, clean, mask, 1.5)


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (16, 64), (64, 16)])
def test_tile_sizes(block_m, block_n, device):
    # Many tile boundaries on small shapes, FLUX variant included.
    b, d, n_txt = 2, 40, 19
    inputs = make_inputs(b, 2, 75, 58, 91, d, torch.float16, device, layout="bnhd")
    mask = make_mask("soft", b, 91 - n_txt, device)
    out = fasa_fwd(*inputs, prepare_fasa_mask(mask), scale=d ** -0.5, omega=1.5,
                   mode="bias", n_txt=n_txt, block_m=block_m, block_n=block_n)
    assert_close_to_ref(out, inputs, mask, 1.5, n_txt=n_txt)


def test_single_token_everywhere(device):
    inputs = make_inputs(1, 1, 1, 1, 1, 8, torch.float32, device)
    mask = torch.ones(1, device=device)
    assert_close_to_ref(run_triton(inputs, mask, 1.5), inputs, mask, 1.5)


def test_custom_scale(device):
    inputs = make_inputs(1, 2, 31, 30, 29, 64, torch.float32, device)
    mask = make_mask("soft", 1, 29, device)
    out = run_triton(inputs, mask, 1.5, scale=0.3)
    assert_close_to_ref(out, inputs, mask, 1.5, scale=0.3)
    assert (out - run_triton(inputs, mask, 1.5)).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["bias", "scale"])
@pytest.mark.parametrize("kind", ["binary", "soft", None])
@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_non_positive_scale(scale, kind, mode, device):
    # The kernel takes its running max on raw scores and folds the scale into the exp's multiply-add, which
    # holds for a scale > 0 only (a negative one reverses the order of the scores); a scale <= 0 takes the
    # path that scales every score first. Large scores make a wrong max overflow.
    n_txt = 5
    inputs = make_inputs(2, 2, 37, 30, n_txt + 29, 64, torch.float32, device, scale_qk=4.0)
    mask = None if kind is None else make_mask(kind, 2, 29, device)
    out = run_triton(inputs, mask, 1.5, scale=scale, mode=mode, n_txt=n_txt)
    assert torch.isfinite(out).all()
    assert_close_to_ref(out, inputs, mask, 1.5, scale=scale, mode=mode, n_txt=n_txt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_lse_matches_reference(dtype, device):
    n_txt = 11
    inputs = make_inputs(2, 2, 50, 50, 50, 40, dtype, device)
    mask = make_mask("soft", 2, 50 - n_txt, device)
    out, lse = run_triton(inputs, mask, 1.5, n_txt=n_txt, return_lse=True)
    _, lse64 = fasa_reference(*[to64(t) for t in inputs], mask.double(), 1.5, n_txt=n_txt, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == inputs[0].shape[:3]
    assert (lse.double() - lse64).abs().max() < (1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mode", ["bias", "scale"])
def test_lse_merges_partial_results(mode, backend, device):
    # Attention over a union of key sets = the LSE-weighted merge of attention over each part.
    b, h, d = 2, 2, 32
    q, k_p, k_f, v_p, v_f = make_inputs(b, h, 45, 50, 62, d, torch.float32, device)
    mask = make_mask("soft", b, 62, device)
    full = fasa_attention(q, k_p, k_f, v_p, v_f, mask, 1.5, mode=mode, backend=backend)
    a = fasa_attention(q, k_p[:, :, :20], k_f[:, :, :27], v_p[:, :, :20], v_f[:, :, :27], mask[:, :27], 1.5,
                       mode=mode, backend=backend, return_lse=True)
    c = fasa_attention(q, k_p[:, :, 20:], k_f[:, :, 27:], v_p[:, :, 20:], v_f[:, :, 27:], mask[:, 27:], 1.5,
                       mode=mode, backend=backend, return_lse=True)
    lse = torch.logaddexp(a[1], c[1])
    merged = torch.exp(a[1] - lse)[..., None] * a[0] + torch.exp(c[1] - lse)[..., None] * c[0]
    torch.testing.assert_close(merged, full, atol=2e-5, rtol=2e-5)
    assert_close_to_ref(merged, (q, k_p, k_f, v_p, v_f), mask, 1.5, mode=mode)


def test_mask_edited_in_place_between_calls(device):
    # A raw mask is prepared inside every call (no cache keyed on the tensor): an in-place edit is seen.
    inputs = make_inputs(2, 2, 40, 33, 90, 32, torch.float32, device)
    mask = torch.zeros(2, 90, device=device)
    mask[:, :10] = 1.0
    first = run_triton(inputs, mask, 1.5)
    assert_close_to_ref(first, inputs, mask, 1.5)
    mask[1, 60:] = 2.0  # tiles that were skipped become live
    second = run_triton(inputs, mask, 1.5)
    assert_close_to_ref(second, inputs, mask, 1.5)
    assert (second[1] - first[1]).abs().max() > 1e-3


def test_launch_limits_are_clear_errors():
    ok = [("q", 4096, 64, 64 * 24, 1)]
    check_launch_limits(24, 2, ok)
    with pytest.raises(ValueError, match="q: the Triton kernel takes at most 65535 heads"):
        check_launch_limits(24, 70000, ok)
    with pytest.raises(ValueError, match="k_f: .*int32 offsets"):
        check_launch_limits(24, 2, [("k_f", 2_000_000, 128, 24 * 128, 1)])


def test_token_stride_not_a_multiple_of_8_takes_the_unaligned_path(device):
    # Head dim 64 (so the head-dim test alone would allow 16-byte rows) but rows 67 elements apart: the
    # alignment the kernel states must come from the real strides, else it computes wrong row addresses.
    from freecure_ops.kernels.fasa_fwd import vector_elems

    gen = torch.Generator().manual_seed(21)
    q, k_p, k_f, v_p, v_f = (torch.randn(1, 2, n, 67, generator=gen).to(device=device, dtype=torch.float16)[..., :64]
                             for n in (40, 33, 50, 33, 50))
    tensors = (q, k_p, v_p, k_f, v_f)
    out_like = torch.empty(1, 40, 2, 64, device=device, dtype=torch.float16).transpose(1, 2)
    assert vector_elems(tensors, [t.stride() for t in tensors], 64, out_like, 2) == 1
    mask = make_mask("soft", 1, 50, device)
    assert_close_to_ref(run_triton((q, k_p, k_f, v_p, v_f), mask, 1.5), (q, k_p, k_f, v_p, v_f), mask, 1.5)


# ---- every read and write stays inside its tensor --------------------------------------------------------
def _in_sea(t: torch.Tensor, guard) -> torch.Tensor:
    """A copy of ``t`` with the same strides, placed in the middle of a buffer filled with ``guard`` (a band
    as long as the tensor's whole extent on each side; the gaps of a strided layout hold ``guard`` too)."""
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    buf = torch.full((3 * extent,), guard, dtype=t.dtype, device=t.device)
    view = buf.as_strided(t.shape, t.stride(), storage_offset=extent)
    view.copy_(t)
    return view


@pytest.mark.parametrize("mode,mask_kind,shared,n_txt,d,layout,variant", [
    ("bias", "soft", False, 0, 40, "bnhd", {}),
    ("bias", "binary", True, 13, 72, "bnhd", {}),
    ("bias", "soft", False, 7, 80, "strided_d", {}),
    ("bias", None, False, 0, 160, "bhnd", {}),
    ("scale", "soft", True, 0, 40, "bnhd", {}),
    ("scale", "binary", False, 13, 64, "strided_d", {}),
    ("bias", "bool", False, 13, 40, "bnhd", VARIANTS["split-binary"]),
    ("scale", "soft", True, 7, 72, "bnhd", VARIANTS["split"]),
    ("bias", "soft", False, 13, 40, "bnhd", VARIANTS["pd-sdpa"]),
    ("scale", "binary", True, 7, 80, "bnhd", VARIANTS["pd-sdpa"]),
])
@pytest.mark.parametrize("block_n", [16, 32])
def test_no_read_outside_any_input(mode, mask_kind, shared, n_txt, d, layout, variant, block_n, device):
    # Every input and every array of the prepared mask sits in a sea of values that poison the output when
    # read: NaN for q/k/v and the mask values, index -1 (a gather one row before k_f/v_f, into the NaN sea
    # or a poisoned FLUX text row), count -5 (no FD tiles: a wrong result). Sizes are multiples of no tile.
    b, h, n_img = 2, 3, 51
    n = n_txt + n_img
    inputs = make_inputs(b, h, 45, 39, n, d, torch.float16, device, layout=layout, seed=d + block_n)
    mask = None if mask_kind is None else make_mask(mask_kind, b, n_img, device, shared=shared)
    q, k_p, k_f, v_p, v_f = (_in_sea(t, float("nan")) for t in inputs)
    if n_txt:  # FD text keys are never attended
        for t in (k_f, v_f):
            t[:, :, :n_txt] = float("nan")
    prepared = None
    if mask is not None:
        pm = prepare_fasa_mask(mask)
        prepared = FasaMask._from_parts(_in_sea(pm.rows, float("nan")), _in_sea(pm.fd_index, -1),
                            _in_sea(pm.fd_value, float("nan")), _in_sea(pm.fd_count, -5), binary=pm.binary)
    out = fasa_fwd(q, k_p, k_f, v_p, v_f, prepared, scale=d ** -0.5, omega=1.5, mode=mode, n_txt=n_txt,
                   block_m=16, block_n=block_n, **variant)
    assert torch.isfinite(out).all(), "a read left its tensor"
    assert_close_to_ref(out, inputs, mask, 1.5, mode=mode, n_txt=n_txt)


def test_interpreter_converts_one_element_scalars_under_any_numpy():
    # Triton 3.6's interpreter calls int() on one-element arrays (loop bounds), which numpy >= 2.4 refuses.
    import types

    import numpy as np

    from freecure_ops.kernels import interpreter_compat

    class Scope:
        def __init__(self):
            self.attrs = {}

        def set_attr(self, obj, name, value):
            self.attrs[name] = value

    class Handle:
        def __init__(self, data):
            self.data = data

    class Scalar:
        def __init__(self, data):
            self.handle = Handle(data)

    def old_patch(tensor, scope):  # what Triton 3.6 installs
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))
        scope.set_attr(tensor, "__bool__", lambda self: True)

    interp = types.SimpleNamespace(_patch_lang_tensor=old_patch)
    installed = interpreter_compat.apply(interp)
    assert interpreter_compat.apply(interp) == installed  # once only
    needs = interpreter_compat._int_of_one_element_arrays_fails()
    assert installed == needs
    scope = Scope()
    interp._patch_lang_tensor(object, scope)
    assert set(scope.attrs) == {"__index__", "__bool__"}
    assert scope.attrs["__index__"](Scalar(np.array([7], dtype=np.int32))) == 7
    if needs:  # arrays of more than one element still refuse, as before
        with pytest.raises(TypeError):
            scope.attrs["__index__"](Scalar(np.array([1, 2])))


# ---- kernel variants the GPU tile sweep times: the binary-mask FD loop and the split-KV launch ----------


def _mask_with_live_counts(counts, n_img, binary, device, seed):
    """A mask with ``counts[r]`` live keys at random places in row r (value 1, or ``0.5 + r / 4`` when not
    binary) and its prepared form, checked to hold exactly those counts."""
    mask = torch.zeros(len(counts), n_img, device=device)
    gen = torch.Generator().manual_seed(seed)
    for row, n in enumerate(counts):
        mask[row, torch.randperm(n_img, generator=gen)[:n].to(device)] = 1.0 if binary else 0.5 + row / 4
    pm = prepare_fasa_mask(mask)
    assert pm.binary == binary and pm.fd_count.tolist() == list(counts)
    return mask, pm


def _poison_excluded(inputs, mask, n_txt, mode):
    """Copies of the inputs whose FD keys outside the computation (FD text keys; in "bias" mode m == 0)
    hold NaN: a read of any of them poisons the output."""
    q, k_p, k_f, v_p, v_f = inputs
    k_f, v_f = k_f.clone(), v_f.clone()
    b, n_f = k_f.shape[0], k_f.shape[2]
    out_of_play = torch.zeros(b, n_f, dtype=torch.bool, device=k_f.device)
    out_of_play[:, :n_txt] = True
    if mode == "bias" and mask is not None:
        out_of_play[:, n_txt:] = (mask == 0).expand(b, n_f - n_txt)
    for t in (k_f, v_f):
        t.masked_fill_(out_of_play[:, None, :, None], float("nan"))
    return q, k_p, k_f, v_p, v_f


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("d,n_txt,kind,shared,mode,dtype", [
    (40, 0, "bool", False, "bias", torch.float16),     # per-row masks
    (72, 13, "binary", True, "bias", torch.bfloat16),  # FLUX text rows; 13 splits a query tile
    (40, 32, "binary", False, "bias", torch.float16),  # 32 text rows: two whole query tiles, no text select
    (40, 16, "bool", True, "bias", torch.float32),     # a shared mask, fp32, text rows a whole tile
    (72, 16, "soft", False, "scale", torch.float16),   # "scale" mode, text rows a whole tile
    (111, 7, "bool", False, "bias", torch.float32),    # unaligned head dim
    (40, 5, "soft", False, "scale", torch.float16),    # "scale" mode: split only (nothing is packed)
    (72, 0, None, False, "bias", torch.float16),       # no mask: every FD image key at m = 1
])
def test_variants_match_reference_and_skip_excluded_keys(variant, d, n_txt, kind, shared, mode, dtype, device):
    # Odd token counts (Nq 45, Np 39, Nimg 51), excluded and FD text keys NaN; the LSE is checked too, as
    # split-KV merges it from the two parts.
    b, h, n_img = 2, 2, 51
    clean = make_inputs(b, h, 45, 39, n_txt + n_img, d, dtype, device, layout="bnhd", seed=d + n_txt)
    mask = None if kind is None else make_mask(kind, b, n_img, device, shared=shared)
    pm = None if mask is None else prepare_fasa_mask(mask)
    if kind in ("bool", "binary"):
        assert pm.binary
    out, lse = fasa_fwd(*_poison_excluded(clean, mask, n_txt, mode), pm, scale=d ** -0.5, omega=1.5, mode=mode,
                        n_txt=n_txt, return_lse=True, block_m=16, block_n=16, **VARIANTS[variant])
    assert_close_to_ref(out, clean, mask, 1.5, mode=mode, n_txt=n_txt)
    _, lse64 = fasa_reference(*[to64(t) for t in clean], to64(mask), 1.5, mode=mode, n_txt=n_txt, return_lse=True)
    assert (lse.double() - lse64).abs().max() < (1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_with_empty_mask_rows(variant, device):
    # Row 0 of the mask is empty (plain attention over PD; split-KV's FD part sees no key and must weigh 0,
    # not NaN), row 1 has one live key; every other FD key is NaN.
    b, h, d, n_img, n_txt = 2, 2, 40, 37, 9
    clean = make_inputs(b, h, 30, 23, n_txt + n_img, d, torch.float16, device, seed=5)
    mask = torch.zeros(b, n_img, dtype=torch.bool, device=device)
    mask[1, 20] = True
    out = fasa_fwd(*_poison_excluded(clean, mask, n_txt, "bias"), prepare_fasa_mask(mask), scale=d ** -0.5,
                   omega=1.5, mode="bias", n_txt=n_txt, block_m=16, block_n=16, **VARIANTS[variant])
    assert_close_to_ref(out, clean, mask, 1.5, n_txt=n_txt)


def test_binary_loop_reads_each_rows_first_live_value(device):
    # Forced on a mask that is not binary, the binary loop must give the mask whose live values are each
    # row's first live value: it is really taken, and reads the value of its own row (rows differ).
    b, h, d, n_img = 2, 2, 32, 41
    inputs = make_inputs(b, h, 33, 29, n_img, d, torch.float32, device, seed=8)
    mask = make_mask("soft", b, n_img, device)
    pm = prepare_fasa_mask(mask)
    assert not pm.binary
    first = pm.fd_value[:, :1]
    assert (first[0] != first[1]).all()
    as_binary = torch.where(mask > 0, first, torch.zeros_like(mask))
    out = fasa_fwd(*inputs, pm, scale=d ** -0.5, omega=1.5, mode="bias", n_txt=0, block_m=16, block_n=16,
                   binary=True)
    assert_close_to_ref(out, inputs, as_binary, 1.5)
    assert (out - fasa_fwd(*inputs, pm, scale=d ** -0.5, omega=1.5, mode="bias", n_txt=0)).abs().max() > 1e-3


def test_prepared_mask_records_binary(device):
    from freecure_ops.fasa_mask import pack_checked_mask

    assert prepare_fasa_mask(torch.tensor([True, False, True], device=device)).binary
    assert prepare_fasa_mask(torch.tensor([[0.0, 2.5, 2.5], [2.5, 0.0, 0.0]], device=device)).binary
    assert prepare_fasa_mask(torch.zeros(4, device=device)).binary
    assert not prepare_fasa_mask(torch.tensor([0.0, 1.0, 0.5], device=device)).binary
    assert not pack_checked_mask(torch.ones(3, device=device)).binary  # unread values: not assumed
    assert pack_checked_mask(torch.ones(3, device=device), 1.0, True).binary  # a caller that knows
    import copy

    assert copy.deepcopy(prepare_fasa_mask(torch.ones(3, dtype=torch.bool, device=device))).binary


def test_launcher_picks_variants(device):
    from freecure_ops.kernels.fasa_fwd import launch_plan

    inputs = make_inputs(1, 2, 45, 39, 51, 40, torch.float16, device)
    kw = dict(scale=0.1, omega=1.5, n_txt=0, return_lse=False, config=(16, 16, 4, 2), interpret=True)
    bool_mask = prepare_fasa_mask(make_mask("bool", 1, 51, device))
    grid, _, meta, _, _, merge = launch_plan(*inputs, bool_mask, mode="bias", **kw)
    assert grid[0] == 3 and merge is None and not meta["BINARY"] and not meta["SPLIT_KV"]
    grid, _, meta, _, _, merge = launch_plan(*inputs, bool_mask, mode="bias", binary=True, split_kv=True, **kw)
    assert grid[0] == 6 and merge is not None and meta["BINARY"] and meta["SPLIT_KV"] and meta["WRITE_LSE"]
    assert not meta["FD_ONLY"]
    # pd_part (the PD keys done by torch's SDPA): the FD programs alone, one per query block, then the merge.
    pd_part = (torch.empty_like(inputs[0]), torch.empty(1, 2, 45))
    grid, _, meta, _, _, merge = launch_plan(*inputs, bool_mask, mode="bias", binary=True, split_kv=True,
                                             pd_part=pd_part, **kw)
    assert grid[0] == 3 and merge is not None and meta["FD_ONLY"] and meta["SPLIT_KV"] and meta["WRITE_LSE"]
    _, _, meta, _, _, _ = launch_plan(*inputs, bool_mask, mode="scale", binary=True, **kw)
    assert not meta["BINARY"]  # "scale" mode reads every key's value
    # The scale folds into the exp's multiply-add only when it is > 0; the per-element text select only when
    # a query tile holds both text and image rows.
    assert meta["RAW_MAX"] and not meta["MIXED_TXT"]
    inputs = make_inputs(1, 2, 45 + 32, 39, 51 + 32, 40, torch.float16, device)
    for n_txt, mixed in ((32, False), (16, False), (13, True), (40, True)):
        _, _, meta, _, _, _ = launch_plan(*inputs, bool_mask, mode="bias", **dict(kw, n_txt=n_txt))
        assert meta["MIXED_TXT"] == mixed, n_txt
    assert not launch_plan(*inputs, bool_mask, mode="bias", **dict(kw, scale=-0.1))[2]["RAW_MAX"]
    assert not launch_plan(*inputs, bool_mask, mode="bias", **dict(kw, scale=0.0))[2]["RAW_MAX"]


def test_tile_sweep_launches_every_variant(device):
    # The GPU sweep times these variants; each must launch through the sweep's own compile step (here in
    # the interpreter on a tiny case), and split-KV is offered exactly for grids under one wave.
    from bench.shapes import Case
    from bench.tile_sweep import CANDIDATES, VARIANTS, compile_one, timed_pairs, variants_for

    assert set(VARIANTS) == {"float", "binary", "split", "split-bin", "pd-sdpa", "bin-fd128", "pd-gluon"}
    assert variants_for(128, 132) == tuple(VARIANTS)
    assert variants_for(396, 132) == ("float", "binary", "pd-sdpa", "bin-fd128", "pd-gluon")
    table = (64, 64, 4, 3)
    small, big = timed_pairs(table, 128, 132), timed_pairs(table, 1024, 132)
    assert small[0] == big[0] == (table, "binary")  # the default launch first
    assert {v for _, v in small} == set(VARIANTS)
    assert {v for _, v in big} == {"binary", "float", "pd-sdpa", "bin-fd128", "pd-gluon"}
    assert (table, "bin-fd128") in big and (table, "pd-gluon") in big
    assert {c for c, v in small if v == "split-bin"} == set(CANDIDATES) | {table}
    assert len(set(small)) == len(small) and len(set(big)) == len(big)
    tiny = Case("sd15", "tiny", 1, 2, 40, (3, 5))
    for variant in VARIANTS:
        assert compile_one((tiny, ((16, 16, 1, 1), variant)), device=device) == "", variant


@pytest.mark.parametrize("binary", [False, True])
def test_packed_fd_loop_full_and_partial_tiles(binary, device):
    # The packed FD loop runs its full tiles without bound checks and the partial one last: live-key counts
    # of 0, 1, one tile exactly, two tiles exactly and two tiles plus one (16-key tiles), one per mask row,
    # with every excluded key NaN.
    counts = (0, 1, 16, 32, 33)
    b, h, d, n_img, n_txt = len(counts), 2, 40, 45, 3
    clean = make_inputs(b, h, 21, 17, n_txt + n_img, d, torch.float16, device, layout="bnhd", seed=11)
    mask, pm = _mask_with_live_counts(counts, n_img, binary, device, seed=12)
    out = fasa_fwd(*_poison_excluded(clean, mask, n_txt, "bias"), pm, scale=d ** -0.5, omega=1.5, mode="bias",
                   n_txt=n_txt, block_m=16, block_n=16)
    assert_close_to_ref(out, clean, mask, 1.5, n_txt=n_txt)


@pytest.mark.parametrize("extra", [{}, dict(split_kv=True), dict(pd_sdpa=True)], ids=["one", "split", "pdsdpa"])
@pytest.mark.parametrize("binary,n_txt,dtype", [
    (True, 0, torch.float16),
    (True, 13, torch.bfloat16),   # FLUX text rows, 13 splits a query tile
    (True, 32, torch.float16),    # FLUX text rows, whole 16-row query tiles
    (False, 5, torch.float32),    # the float loop takes fd_block_n too
])
def test_fd_loop_on_128_key_tiles(binary, n_txt, dtype, extra, device):
    # fd_block_n=128: the packed FD loop on its own 128-key tiles, the PD loop on 16-key ones. Per-row live
    # counts of 0, 1, 127, 128 (one full tile), 129, 256 (two) and 300 (two and a partial), odd token counts
    # (Nq 45, Np 39, Nimg 301), every excluded key NaN, against the float64 reference, LSE included.
    counts = (0, 1, 127, 128, 129, 256, 300)
    b, h, d, n_img = len(counts), 1, 40, 301
    clean = make_inputs(b, h, 45, 39, n_txt + n_img, d, dtype, device, layout="bnhd", seed=21 + n_txt)
    mask, pm = _mask_with_live_counts(counts, n_img, binary, device, seed=22)
    visited = None if extra else torch.zeros(b, h, 3, dtype=torch.int32, device=device)
    out, lse = fasa_fwd(*_poison_excluded(clean, mask, n_txt, "bias"), pm, scale=d ** -0.5, omega=1.5,
                        mode="bias", n_txt=n_txt, return_lse=True, block_m=16, block_n=16, fd_block_n=128,
                        visited=visited, **extra)
    assert_close_to_ref(out, clean, mask, 1.5, n_txt=n_txt)
    _, lse64 = fasa_reference(*[to64(t) for t in clean], to64(mask), 1.5, n_txt=n_txt, return_lse=True)
    assert (lse.double() - lse64).abs().max() < (1e-5 if dtype == torch.float32 else 2e-3)
    if visited is not None:  # tiles of 128 FD keys; query tiles of text rows alone visit none
        tiles = torch.tensor([-(-n // 128) for n in counts], dtype=torch.int32)
        has_img = torch.tensor([16 * m + 16 > n_txt for m in range(3)])
        want = torch.where(has_img[None, :], tiles[:, None], 0)
        assert torch.equal(visited[:, 0].cpu(), want)


def test_launcher_fd_block_n(device):
    # fd_block_n sets the packed FD loop's tile alone; without a packed loop ("scale" mode, no mask) or
    # without it, BLOCK_N_FD is the config's BLOCK_N. The tile table never picks it (off by default).
    from freecure_ops.kernels.fasa_fwd import launch_plan

    inputs = make_inputs(1, 2, 45, 39, 51, 40, torch.float16, device)
    kw = dict(scale=0.1, omega=1.5, n_txt=0, return_lse=False, config=(16, 32, 4, 2), interpret=True)
    pm = prepare_fasa_mask(make_mask("bool", 1, 51, device))
    assert launch_plan(*inputs, pm, mode="bias", **kw)[2]["BLOCK_N_FD"] == 32
    meta = launch_plan(*inputs, pm, mode="bias", binary=True, fd_block_n=128, **kw)[2]
    assert meta["BLOCK_N_FD"] == 128 and meta["BLOCK_N"] == 32
    assert launch_plan(*inputs, pm, mode="scale", fd_block_n=128, **kw)[2]["BLOCK_N_FD"] == 32
    assert launch_plan(*inputs, None, mode="bias", fd_block_n=128, **kw)[2]["BLOCK_N_FD"] == 32


# ---- pd_sdpa: the PD keys by torch's fused SDPA (its CPU flash kernel here), the FD program alone, LSE merge --


def _pd_reference(inputs, scale):
    from freecure_ops.kernels.fasa_fwd import pd_attention, pd_sdpa_op

    q, k_p, _, v_p, _ = inputs
    op = pd_sdpa_op(q, k_p, v_p, scale)
    assert op == ("flash_cpu" if q.device.type == "cpu" else op) and op is not None
    return pd_attention(q, k_p, v_p, scale, op)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["bias", "scale"])
@pytest.mark.parametrize("kind,shared", [("binary", False), ("bool", True), ("soft", False), ("soft", True),
                                         ("ones", True), (None, False)])
def test_pd_sdpa_matches_reference(kind, shared, mode, dtype, device):
    # Odd token counts (Nq 45, Np 39, Nimg 58), per-row and shared, binary and float masks, and the LSE.
    b, d, n_img = 2, 72, 58
    inputs = make_inputs(b, 2, 45, 39, n_img, d, dtype, device, layout="bnhd", seed=31)
    mask = None if kind is None else make_mask(kind, b, n_img, device, shared=shared)
    pm = None if mask is None else prepare_fasa_mask(mask)
    out, lse = fasa_fwd(*inputs, pm, scale=d ** -0.5, omega=1.5, mode=mode, n_txt=0, return_lse=True,
                        block_m=16, block_n=16, pd_sdpa=True)
    assert_close_to_ref(out, inputs, mask, 1.5, mode=mode)
    _, lse64 = fasa_reference(*[to64(t) for t in inputs], to64(mask), 1.5, mode=mode, return_lse=True)
    assert (lse.double() - lse64).abs().max() < (1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("n_txt", [13, 32])  # 32: whole 16-row query tiles of text; 13 splits one
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_pd_sdpa_rows_without_fd_keys_are_the_pd_result_exactly(n_txt, dtype, device):
    # FLUX text rows and every row of an empty mask row have no FD key: FD LSE -inf, weight exactly 0, so the
    # merge must hand back torch's PD output and LSE bit for bit. Excluded and FD text keys are NaN.
    b, d, n_img = 2, 40, 37
    clean = make_inputs(b, 2, n_txt + 29, n_txt + 23, n_txt + n_img, d, dtype, device, seed=n_txt)
    mask = torch.zeros(b, n_img, dtype=torch.bool, device=device)
    mask[1, ::3] = True  # row 0 empty
    scale = d ** -0.5
    out, lse = fasa_fwd(*_poison_excluded(clean, mask, n_txt, "bias"), prepare_fasa_mask(mask), scale=scale,
                        omega=1.5, mode="bias", n_txt=n_txt, return_lse=True, block_m=16, block_n=16, pd_sdpa=True)
    pd_out, pd_lse = _pd_reference(clean, scale)
    assert torch.equal(out[0], pd_out[0]) and torch.equal(lse[0], pd_lse[0])  # the empty mask row
    assert torch.equal(out[1, :, :n_txt], pd_out[1, :, :n_txt]) and torch.equal(lse[1, :, :n_txt], pd_lse[1, :, :n_txt])
    assert_close_to_ref(out, clean, mask, 1.5, n_txt=n_txt)
    assert (out[1, :, n_txt:] - pd_out[1, :, n_txt:]).abs().max() > 1e-2  # image rows did take FD keys


def test_pd_sdpa_picks_and_falls_back(device):
    # Which torch kernel takes the PD part; where none does (a non-unit head-dim stride on the CPU, a scale
    # <= 0) the launch is the plain one, still right.
    from freecure_ops.kernels.fasa_fwd import pd_sdpa_op

    inputs = make_inputs(1, 2, 30, 27, 33, 40, torch.float16, device, layout="bnhd")
    q, k_p, _, v_p, _ = inputs
    if device == "cpu":
        assert pd_sdpa_op(q, k_p, v_p, 0.1) == "flash_cpu"
        assert pd_sdpa_op(q.float(), k_p.float(), v_p.float(), 0.1) == "flash_cpu"
    else:
        assert pd_sdpa_op(q, k_p, v_p, 0.1) in ("cudnn", "flash", "efficient")
        assert pd_sdpa_op(q.float(), k_p.float(), v_p.float(), 0.1) == "efficient"  # flash/cuDNN: 16-bit only
    assert pd_sdpa_op(q, k_p, v_p, 0.0) is None and pd_sdpa_op(q, k_p, v_p, -0.2) is None
    assert pd_sdpa_op(q, k_p, v_p, 0.1, "gluon") is None  # our Gluon kernel: Hopper and head dim 64/128 only
    strided = make_inputs(1, 2, 30, 27, 33, 40, torch.float16, device, layout="strided_d")
    if device == "cpu":
        assert pd_sdpa_op(strided[0], strided[1], strided[3], 0.1) is None
    mask = make_mask("bool", 1, 33, device)
    for args, scale, want in ((strided, 0.1, True), (inputs, -0.2, True), (inputs, 0.1, "gluon")):
        out = fasa_fwd(*args, prepare_fasa_mask(mask), scale=scale, omega=1.5, mode="bias", n_txt=0, pd_sdpa=want)
        assert_close_to_ref(out, args, mask, 1.5, scale=scale)


def test_pd_sdpa_never_syncs_with_the_host(device):
    # No .item(), no data-dependent shape: the op choice is decided from shapes/strides/dtypes (cached), the
    # PD call, the FD kernel and the merge take device tensors only (CUDA-graph safe). The spy counts the ops
    # that hand device data to the host (tests/test_no_host_sync.py).
    from test_no_host_sync import SYNC_OPS
    from torch.utils._python_dispatch import TorchDispatchMode

    class Spy(TorchDispatchMode):
        hits = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in SYNC_OPS:
                self.hits.append(str(func))
            return func(*args, **(kwargs or {}))

    n_txt = 13
    inputs = make_inputs(1, 2, n_txt + 30, 27, n_txt + 33, 40, torch.float16, device, layout="bnhd")
    pm = prepare_fasa_mask(make_mask("bool", 1, 33, device))
    from freecure_ops.kernels.fasa_fwd import _PD_SDPA_PICKS

    _PD_SDPA_PICKS.clear()  # the first call's pick too
    with Spy() as spy:
        fasa_fwd(*inputs, pm, scale=0.1, omega=1.5, mode="bias", n_txt=n_txt, return_lse=True, pd_sdpa=True)
    assert spy.hits == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("want", ["auto", "cudnn", "flash", "efficient", "gluon"])
def test_pd_sdpa_captures_in_a_cuda_graph(want):
    from freecure_ops.kernels.fasa_fwd import pd_sdpa_op

    d, n_txt = 64, 16
    inputs = make_inputs(1, 2, n_txt + 200, 200, n_txt + 200, d, torch.float16, "cuda", layout="bnhd")
    if pd_sdpa_op(inputs[0], inputs[1], inputs[3], d ** -0.5, want) is None:
        pytest.skip(f"torch's {want} SDPA does not take this call here")
    mask = make_mask("bool", 1, 200, "cuda")
    pm = prepare_fasa_mask(mask)

    def call():
        return fasa_fwd(*inputs, pm, scale=d ** -0.5, omega=1.5, mode="bias", n_txt=n_txt, pd_sdpa=want)
    eager = call()
    assert_close_to_ref(eager, inputs, mask, 1.5, n_txt=n_txt)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # warm up off the default stream, as graph capture wants
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager, atol=0, rtol=0)
