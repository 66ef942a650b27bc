"""What a prepared mask keeps for the PyTorch backend (freecure_ops/torch_keys.py, ``gathered_kv``): the gather
index and the additive bias, built on the first call and reused. Never stale: one mask serves calls of every
dtype, omega, PD length and text length, each against the float64 oracle (fasa_cases.assert_close_to_ref) and
bit-identical to a freshly prepared mask; bounded; and the copy-free path for adjacent PD/FD rows (diffusers'
``k[pd]``, ``k[fd]`` of one batch) reads exactly the two tensors, never their neighbours."""
import copy

import numpy as np
import pytest
import torch

import freecure_ops.fasa_mask as fasa_mask
from fasa_cases import assert_close_to_ref, make_inputs, to64
from freecure_ops import fasa_attention, fasa_reference, prepare_fasa_mask
from freecure_ops.torch_keys import joint_view

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def soft_mask(shape, live, seed):
    """A soft mask (values in (0.5, 2)) with about ``live`` of its entries > 0."""
    gen = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(shape, generator=gen) < live, 0.5 + 1.5 * torch.rand(shape, generator=gen), 0.0)


def batch_rows(n_rows, h, n, d, dtype, seed):
    """``[n_rows, H, N, D]`` in diffusers' memory (``[B, N, H, D]`` transposed): its rows are adjacent."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_rows, n, h, d, generator=gen).to(dtype).transpose(1, 2)


def poison(t, mask, n_txt=0):
    """NaN in every FD key/value the mask excludes, and in every FD text key/value (a copy)."""
    t = t.clone()
    dead = torch.cat([torch.ones(mask.shape[:-1] + (n_txt,), dtype=torch.bool), mask == 0], dim=-1)
    return t.masked_fill(dead.reshape(-1, 1, dead.shape[-1], 1), float("nan"))


@pytest.mark.parametrize("shared", [True, False])
def test_one_mask_serves_every_dtype_omega_and_pd_length(shared):
    # The cache keys the bias by (Np, omega, dtype) and the index by n_txt: a key that missed one would hand
    # a later call the earlier call's bias (wrong omega, wrong length or dtype).
    n_img = 48
    mask = soft_mask((48,) if shared else (2, n_img), 0.3, seed=1)
    m = prepare_fasa_mask(mask)
    for i, (dtype, omega, n_p) in enumerate([(torch.float32, 0.5, 20), (torch.float16, 0.5, 20),
                                             (torch.float32, 1.5, 20), (torch.bfloat16, -2.0, 33),
                                             (torch.float64, 1.5, 33), (torch.float32, 1.5, 33)]):
        inputs = make_inputs(2, 2, 25, n_p, n_img, 40, dtype, "cpu", layout="bnhd", seed=i)
        out = fasa_attention(*inputs, m, omega, backend="torch")
        assert torch.equal(out, fasa_attention(*inputs, prepare_fasa_mask(mask), omega, backend="torch"))
        if dtype == torch.float64:
            assert (out - fasa_reference(*inputs, to64(mask), omega)).abs().max() < 1e-12
        else:
            assert_close_to_ref(out, inputs, mask, omega)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_mask_serves_calls_with_and_without_text_tokens(dtype):
    # The gather index is offset by n_txt: an index cached for n_txt = 0 would read the FD text keys (NaN here).
    n_img, d = 40, 72
    mask = soft_mask((n_img,), 0.4, seed=2)
    m = prepare_fasa_mask(mask)
    for n_txt in (0, 7, 0, 3):
        n = n_txt + n_img
        q, k_p, k_f, v_p, v_f = make_inputs(1, 2, n, n, n, d, dtype, "cpu", layout="bnhd", seed=n_txt)
        out = fasa_attention(q, k_p, poison(k_f, mask, n_txt), v_p, poison(v_f, mask, n_txt), m, 1.5,
                             n_txt=n_txt, backend="torch")
        assert_close_to_ref(out, (q, k_p, k_f, v_p, v_f), mask, 1.5, n_txt=n_txt)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("live", [0.0, 0.3, 1.0], ids=["empty", "hair", "full"])
def test_adjacent_pd_and_fd_rows_of_one_batch(live, dtype):
    # What the adapters pass: q[pd], k[pd], k[fd], v[pd], v[fd] of one [PD, FD] batch (B = 1). A full mask
    # attends over the two rows as one view, with no copy; the other masks gather whole token rows.
    n, h, d = 36, 2, 40
    q_all, k_all, v_all = (batch_rows(2, h, n, d, dtype, seed) for seed in (3, 4, 5))
    mask = soft_mask((n,), live, seed=6)
    if live == 1.0:
        assert (mask > 0).all()
    inputs = (q_all[:1], k_all[:1], k_all[1:], v_all[:1], v_all[1:])
    out = fasa_attention(*inputs, prepare_fasa_mask(mask), 1.5, backend="torch")
    assert_close_to_ref(out, inputs, mask, 1.5)
    # the same call with the excluded FD keys poisoned in place: never read
    k_all[1:].masked_fill_((mask == 0)[None, None, :, None], float("nan"))
    v_all[1:].masked_fill_((mask == 0)[None, None, :, None], float("nan"))
    assert torch.equal(fasa_attention(*inputs, prepare_fasa_mask(mask), 1.5, backend="torch"), out)


@pytest.mark.parametrize("layout", ["bhnd", "bnhd", "strided_d"])
def test_every_layout_and_per_row_masks_with_a_reused_mask(layout):
    # Per-row live counts (padding slots) and every memory layout, the mask reused across the three calls.
    n_img = 50
    mask = soft_mask((3, n_img), 0.25, seed=7)
    mask[2] = 0.0  # a row with no live key: its padding slots point at an excluded (poisoned) key
    m = prepare_fasa_mask(mask)
    for seed in range(3):
        q, k_p, k_f, v_p, v_f = make_inputs(3, 2, 21, 17, n_img, 40, torch.float16, "cpu", layout=layout,
                                            seed=seed)
        out = fasa_attention(q, k_p, poison(k_f, mask), v_p, poison(v_f, mask), m, 1.5, backend="torch")
        assert_close_to_ref(out, (q, k_p, k_f, v_p, v_f), mask, 1.5)


def test_joint_view_only_where_the_fd_row_follows_the_pd_row():
    k_all = batch_rows(3, 2, 10, 8, torch.float32, seed=8)
    joint = joint_view(k_all[:1], k_all[1:2])
    assert torch.equal(joint, torch.cat([k_all[:1], k_all[1:2]], dim=2))
    assert joint.data_ptr() == k_all.data_ptr()  # a view: no copy
    assert joint_view(k_all[1:2], k_all[:1]) is None           # FD before PD
    assert joint_view(k_all[:2], k_all[1:3]) is None           # B = 2: the rows pair up across the batch
    assert joint_view(k_all[:1], k_all[2:3]) is None           # a row between them
    assert joint_view(k_all[:1], k_all[1:2].clone()) is None   # another allocation
    contiguous = torch.zeros(2, 2, 10, 8)                      # [B, H, N, D] memory: the tokens interleave
    assert joint_view(contiguous[:1], contiguous[1:]) is None
    # two storages over adjacent memory are never joined (the view would leave the PD row's storage)
    buf = np.zeros(2 * 10 * 2 * 8, dtype=np.float32)
    pd, fd = (torch.from_numpy(part).view(1, 10, 2, 8).transpose(1, 2) for part in np.split(buf, 2))
    assert fd.data_ptr() == pd.data_ptr() + pd.stride(2) * 10 * 4
    assert joint_view(pd, fd) is None


def test_the_cache_is_bounded_and_copies_work():
    # An omega schedule (a new omega every call) must not grow the mask without bound.
    q, k_p, k_f, v_p, v_f = make_inputs(1, 2, 16, 16, 24, 40, torch.float32, "cpu", layout="bnhd", seed=9)
    mask = soft_mask((24,), 0.5, seed=9)
    m = prepare_fasa_mask(mask)
    for i in range(3 * fasa_mask._CACHE_MAX):
        omega = 0.1 * (i + 1)
        out = fasa_attention(q, k_p, k_f, v_p, v_f, m, omega, backend="torch")
        assert len(m._cache) <= fasa_mask._CACHE_MAX
    assert_close_to_ref(out, (q, k_p, k_f, v_p, v_f), mask, omega)
    for twin in (copy.copy(m), copy.deepcopy(m)):
        assert torch.equal(fasa_attention(q, k_p, k_f, v_p, v_f, twin, omega, backend="torch"), out)


def test_eager_and_registered_op_paths_agree():
    # The eager call reads the mask's cache; a call autograd tracks goes through torch.ops.freecure_ops.fasa,
    # which takes the mask's tensors only. Both against the oracle, and the same to float32 rounding.
    x = make_inputs(1, 2, 30, 30, 30, 40, torch.float32, "cpu", layout="bnhd", seed=10)
    mask = soft_mask((30,), 0.3, seed=10)
    m = prepare_fasa_mask(mask)
    eager = fasa_attention(*x, m, 1.5, backend="torch")
    tracked = fasa_attention(*[t.clone().requires_grad_() for t in x], m, 1.5, backend="torch")
    assert tracked.requires_grad
    assert_close_to_ref(eager, x, mask, 1.5)
    assert_close_to_ref(tracked.detach(), x, mask, 1.5)
    assert (eager - tracked.detach()).abs().max() < 1e-6
