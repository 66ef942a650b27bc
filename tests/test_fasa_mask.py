"""The prepared mask (FasaMask) and the kernel's packed FD loop: work proportional to the live keys, excluded
keys never read, no state kept between calls."""
import copy
import gc

import numpy as np
import pytest
import torch

from fasa_cases import assert_close_to_ref, make_inputs
from freecure_ops import FasaMask, fasa_attention, fasa_reference, prepare_fasa_mask
from freecure_ops.kernels import fasa_fwd


def seeded_mask(shape, density, seed, *, soft=False):
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(*shape, generator=gen)
    live = u < density
    return torch.where(live, 0.5 + u, torch.zeros_like(u)) if soft else live.float()


# ---- the prepared object -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(37,), (3, 37)])
def test_prepared_mask_lists_live_keys_in_order(shape):
    raw = seeded_mask(shape, 0.3, 1, soft=True)
    m = prepare_fasa_mask(raw)
    rows = raw.reshape(-1, shape[-1]).numpy()
    assert m.n_rows == rows.shape[0] and m.n_img == 37 and m.shared == (len(shape) == 1)
    assert m.rows.dtype == torch.float32 and m.fd_index.dtype == torch.int32 and m.fd_count.dtype == torch.int32
    for r in range(rows.shape[0]):
        live = np.flatnonzero(rows[r] > 0)  # independent of the packing code: numpy's own nonzero
        n = int(m.fd_count[r])
        assert n == len(live)
        assert m.fd_index[r, :n].tolist() == live.tolist()
        np.testing.assert_array_equal(m.fd_value[r, :n].numpy(), rows[r, live])
        assert (m.fd_value[r, n:] == 0).all()
    assert torch.equal(m.fd_tiles(16), (m.fd_count + 15) // 16)
    torch.testing.assert_close(m.live_keys(), m.fd_count.float() / 37)


def test_prepared_mask_owns_a_copy_and_is_immutable():
    raw = torch.ones(20)
    m = prepare_fasa_mask(raw)
    raw.zero_()
    assert int(m.fd_count[0]) == 20 and m.rows.sum() == 20
    with pytest.raises(AttributeError, match="immutable"):
        m.rows = torch.zeros(1, 20)
    assert prepare_fasa_mask(m) is m


@pytest.mark.parametrize("bad,err,words", [
    ([1.0, 2.0], TypeError, "torch.Tensor"),
    (torch.tensor([1, 0, 1]), TypeError, "bool or float"),
    (torch.ones(2, 3, 4), ValueError, "[Nimg] or [B, Nimg]"),
    (torch.ones(0), ValueError, "Nimg >= 1"),
    (torch.tensor([1.0, -0.5]), ValueError, "negative"),
    (torch.tensor([1.0, float("nan")]), ValueError, "NaN"),
    (torch.tensor([1.0, float("inf")]), ValueError, "inf"),
    (torch.tensor([1.0, 1e300], dtype=torch.float64), ValueError, "float32"),
    (torch.tensor([1.0, 1e-300], dtype=torch.float64), ValueError, "float32"),
    (torch.ones(3, requires_grad=True), ValueError, "require grad"),
])
def test_prepare_refuses_bad_masks(bad, err, words):
    with pytest.raises(err, match=words.replace("[", r"\[").replace("]", r"\]")):
        prepare_fasa_mask(bad)


def test_prepared_mask_must_fit_the_call(device):
    inputs = make_inputs(2, 1, 9, 9, 12, 16, torch.float32, device)
    with pytest.raises(ValueError, match="prepared mask of 1 row"):
        fasa_attention(*inputs, prepare_fasa_mask(torch.ones(11, device=device)), 1.0)
    with pytest.raises(ValueError, match="prepared mask of 3 row"):
        fasa_attention(*inputs, prepare_fasa_mask(torch.ones(3, 12, device=device)), 1.0)
    if device == "cpu":
        meta = FasaMask._from_parts(*(t.to("meta") for t in (torch.ones(1, 12), torch.zeros(1, 12, dtype=torch.int32),
                                                  torch.ones(1, 12), torch.ones(1, dtype=torch.int32))))
        with pytest.raises(ValueError, match="same device as q"):
            fasa_attention(*inputs, meta, 1.0)
    else:
        with pytest.raises(ValueError, match="same device as q"):
            fasa_attention(*inputs, prepare_fasa_mask(torch.ones(12)), 1.0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mode", ["bias", "scale"])
def test_prepared_and_raw_masks_give_identical_results(mode, backend, device):
    inputs = make_inputs(2, 2, 41, 33, 70, 40, torch.float16, device, seed=5)
    raw = seeded_mask((2, 70), 0.25, 5, soft=True).to(device)
    a = fasa_attention(*inputs, raw, 1.5, mode=mode, backend=backend)
    b = fasa_attention(*inputs, prepare_fasa_mask(raw), 1.5, mode=mode, backend=backend)
    assert torch.equal(a, b)
    assert_close_to_ref(b, inputs, raw, 1.5, mode=mode)


# ---- the packed FD loop --------------------------------------------------------------------------------
@pytest.mark.parametrize("block_n", [16, 32, 64])
@pytest.mark.parametrize("n_txt", [0, 13])
def test_poisoned_excluded_fd_keys_never_reach_the_output(block_n, n_txt, device):
    # NaN in every FD key/value the mask excludes, and (FLUX) in every FD text key/value: a kernel that loads
    # them, even to multiply by zero, returns NaN.
    b, h, n, d = 2, 2, 75, 40
    q, k_p, k_f, v_p, v_f = make_inputs(b, h, n, n, n, d, torch.float16, device, seed=block_n + n_txt,
                                        layout="bnhd")
    mask = seeded_mask((b, n - n_txt), 0.3, block_n, soft=True).to(device)
    clean = (q, k_p, k_f.clone(), v_p, v_f.clone())
    dead = torch.cat([torch.ones(b, n_txt, dtype=torch.bool, device=device), mask == 0], dim=1)
    for t in (k_f, v_f):
        t.masked_fill_(dead[:, None, :, None], float("nan"))
    out = fasa_fwd(q, k_p, k_f, v_p, v_f, prepare_fasa_mask(mask), scale=d ** -0.5, omega=1.5, mode="bias",
                   n_txt=n_txt, block_m=16, block_n=block_n)
    assert torch.isfinite(out).all()
    assert_close_to_ref(out, clean, mask, 1.5, n_txt=n_txt)


@pytest.mark.parametrize("n_txt", [0, 13])
def test_padding_lanes_of_the_last_packed_tile_load_nothing(n_txt, device):
    # The lanes of the last packed tile past the live count gather index 0 (FD image key 0). With key 0
    # excluded and poisoned in every row, a gather without its row mask feeds 0 * NaN into P @ V. The live
    # counts (21 and 14) leave a partial last tile at both tile widths.
    b, h, n_img, d = 2, 2, 64, 32
    n = n_txt + n_img
    q, k_p, k_f, v_p, v_f = make_inputs(b, h, n, n, n, d, torch.float16, device, seed=20 + n_txt)
    mask = seeded_mask((b, n_img), 0.3, 23, soft=True)
    mask[0] = 0.0
    mask[0, 1:22] = torch.linspace(0.5, 2.0, 21)
    mask[:, 0] = 0.0
    mask = mask.to(device)
    assert (mask > 0).sum(dim=1).remainder(16).ne(0).all()
    clean = (q, k_p, k_f.clone(), v_p, v_f.clone())
    dead = torch.cat([torch.ones(b, n_txt, dtype=torch.bool, device=device), mask == 0], dim=1)
    for t in (k_f, v_f):
        t.masked_fill_(dead[:, None, :, None], float("nan"))
    for block_n in (16, 32):
        out = fasa_fwd(q, k_p, k_f, v_p, v_f, prepare_fasa_mask(mask), scale=d ** -0.5, omega=1.5, mode="bias",
                       n_txt=n_txt, block_m=16, block_n=block_n)
        assert torch.isfinite(out).all(), f"BLOCK_N={block_n}: an excluded key reached the output"
        assert_close_to_ref(out, clean, mask, 1.5, n_txt=n_txt)


@pytest.mark.parametrize("block_n", [16, 32])
def test_fd_loop_visits_ceil_nnz_over_block_n_tiles(block_n, device):
    # A hair-like mask: a blob touching every 16-key row of an 8x16 grid, 25% of the keys. Tile skipping would
    # visit every tile; the packed loop visits ceil(nnz / BLOCK_N) per batch row.
    b, h, n_txt, block_m = 2, 2, 16, 16
    grid = torch.zeros(8, 16)
    grid[:, :4] = 1.0                                                  # 25% of keys, on all 8 rows
    mask = torch.stack([grid.flatten(), seeded_mask((128,), 0.1, 7)]).to(device)
    n = n_txt + 128
    inputs = make_inputs(b, h, n, n, n, 32, torch.float32, device, seed=3)
    m = prepare_fasa_mask(mask)
    visited = torch.full((b, h, -(-n // block_m)), -1, dtype=torch.int32, device=device)
    out = fasa_fwd(*inputs, m, scale=32 ** -0.5, omega=1.5, mode="bias", n_txt=n_txt, block_m=block_m,
                   block_n=block_n, visited=visited)
    assert_close_to_ref(out, inputs, mask, 1.5, n_txt=n_txt)
    nnz = (mask > 0).sum(dim=1).cpu()
    expected = -(-nnz // block_n)                                      # ceil(nnz / BLOCK_N) per batch row
    assert torch.equal(m.fd_tiles(block_n).cpu(), expected.to(torch.int32))
    for row in range(b):
        assert (visited[row, :, :n_txt // block_m] == 0).all(), "text-only query blocks visit no FD tile"
        assert (visited[row, :, n_txt // block_m:] == expected[row]).all()
    assert expected[0] < -(-128 // block_n)  # fewer than the tiles the blob touches (all of them)

    # "scale" mode excludes nothing: every FD image tile.
    fasa_fwd(*inputs, m, scale=32 ** -0.5, omega=1.5, mode="scale", n_txt=n_txt, block_m=block_m,
             block_n=block_n, visited=visited)
    assert (visited[:, :, n_txt // block_m:] == -(-128 // block_n)).all()


def test_all_excluded_and_all_live_rows_in_one_batch(device):
    inputs = make_inputs(3, 2, 30, 25, 50, 24, torch.float16, device, seed=11)
    mask = torch.stack([torch.zeros(50), torch.ones(50), seeded_mask((50,), 0.05, 2)]).to(device)
    for block_n in (16, 64):
        out = fasa_fwd(*inputs, prepare_fasa_mask(mask), scale=24 ** -0.5, omega=2.0, mode="bias", n_txt=0,
                       block_m=16, block_n=block_n)
        assert_close_to_ref(out, inputs, mask, 2.0)


# ---- no state between calls ----------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["data", "numpy", "dlpack"])
def test_raw_mask_edits_by_any_means_are_seen(how):
    # Writes through .data, a numpy view or a DLPack alias do not bump the tensor's version counter: a cache
    # keyed on the tensor would serve stale values. Each call prepares the raw mask afresh.
    inputs = make_inputs(1, 2, 30, 20, 40, 16, torch.float32, "cpu", seed=12)
    mask = torch.zeros(40)
    mask[:5] = 1.0
    first = fasa_attention(*inputs, mask, 1.5, backend="triton")
    if how == "data":
        mask.data[20:] = 2.0
    elif how == "numpy":
        mask.numpy()[20:] = 2.0
    else:
        torch.utils.dlpack.from_dlpack(mask.__dlpack__())[20:] = 2.0
    second = fasa_attention(*inputs, mask, 1.5, backend="triton")
    assert_close_to_ref(second, inputs, mask.clone(), 1.5)
    assert (second - first).abs().max() > 1e-3


# A write through each route, in range (key 0, a count of 0) and changing the answer of every mode that reads
# the part ("scale" mode reads rows, "bias" mode the packed list). Only the in-place op bumps _version.
_PART_EDITS = {"rows": 3.0, "fd_value": 3.0, "fd_index": 0, "fd_count": 0}
_WRITE_ROUTES = {
    "inplace": lambda t, v: t.fill_(v),
    "data": lambda t, v: t.data.fill_(v),
    "numpy": lambda t, v: t.numpy().fill(v),
    "torch_dlpack": lambda t, v: torch.from_dlpack(t).fill_(v),
    "numpy_dlpack": lambda t, v: np.from_dlpack(t).fill(v),
}
_EDIT_CALLS = [(mode, backend) for mode in ("bias", "scale") for backend in ("torch", "triton")]


@pytest.fixture(scope="module")
def edit_case():
    """Inputs, a soft [B, Nimg] mask, and every call's answer with a freshly prepared mask (checked against
    the float64 oracle once here)."""
    inputs = make_inputs(2, 2, 30, 20, 40, 16, torch.float32, "cpu", seed=14)
    raw = seeded_mask((2, 40), 0.4, 14, soft=True)
    want = {}
    for mode, backend in _EDIT_CALLS:
        want[mode, backend] = fasa_attention(*inputs, prepare_fasa_mask(raw), 1.5, mode=mode, backend=backend)
        assert_close_to_ref(want[mode, backend], inputs, raw, 1.5, mode=mode)
    return inputs, raw, want


@pytest.mark.parametrize("route", list(_WRITE_ROUTES))
@pytest.mark.parametrize("part", list(_PART_EDITS))
def test_prepared_mask_part_edits_by_any_means_change_nothing(part, route, edit_case):
    # A prepared mask is immutable whatever is done to the tensors it hands out: were they its own, the torch
    # backend would keep the bias and gather index it cached on the first call while the Triton kernel and
    # copy.copy(m) read the edit, so the answer would depend on call history (issue 25). Every call, before
    # and after the write, on the mask and on a copy, equals the same call with a freshly prepared mask.
    inputs, raw, want = edit_case
    m = prepare_fasa_mask(raw)
    for mode, backend in _EDIT_CALLS:  # the torch backend caches what it derives from the mask
        assert torch.equal(fasa_attention(*inputs, m, 1.5, mode=mode, backend=backend), want[mode, backend])
    _WRITE_ROUTES[route](getattr(m, part), _PART_EDITS[part])
    for twin in (m, copy.copy(m)):
        for mode, backend in _EDIT_CALLS:
            out = fasa_attention(*inputs, twin, 1.5, mode=mode, backend=backend)
            assert torch.equal(out, want[mode, backend]), f"{mode}/{backend} saw a write to {part} via {route}"
    assert torch.equal(getattr(m, part), getattr(prepare_fasa_mask(raw), part))  # and it reads as prepared


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_prepared_mask_reused_for_1000_calls_holds_no_growing_memory(device):
    inputs = make_inputs(1, 1, 8, 8, 24, 16, torch.float16, device, seed=13)
    m = prepare_fasa_mask(seeded_mask((24,), 0.5, 13).to(device))
    for backend in ("torch", "triton"):
        fasa_attention(*inputs, m, 1.5, backend=backend)  # warm: first-call allocations
        before = _live_tensors()
        for _ in range(1000 if backend == "torch" else 50):
            out = fasa_attention(*inputs, m, 1.5, backend=backend)
        del out
        assert _live_tensors() <= before


def test_prepared_masks_copy_and_pickle():
    import copy
    import pickle

    m = prepare_fasa_mask(torch.tensor([0.0, 2.0, 0.5]))
    for twin in (copy.copy(m), copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert isinstance(twin, FasaMask) and twin.max_value == 2.0
        assert all(torch.equal(getattr(twin, k), getattr(m, k)) for k in ("rows", "fd_index", "fd_value", "fd_count"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["bias", "scale"])
@pytest.mark.parametrize("omega", [1.7, 0.0, -0.8])
def test_fold_omega_computes_what_omega_would(backend, mode, omega):
    """fold_omega(mask, omega) with omega=1 (how a compiled adapter passes omega as data) against the float64
    oracle at that omega: per-row soft masks with excluded keys, odd sizes, omega 0 and negative included
    (which keys are live stays the mask's own)."""
    from freecure_ops.fasa_mask import fold_omega
    from freecure_ops.kernels import interpreting

    if backend == "triton" and not interpreting():
        pytest.skip("the Triton backend on CPU tensors needs TRITON_INTERPRET=1 (set by conftest for the suite)")
    inputs = make_inputs(2, 3, 19, 23, 29, 16, torch.float32, "cpu", seed=5)
    g = torch.Generator().manual_seed(6)
    raw = torch.rand(2, 29, generator=g) * (torch.rand(2, 29, generator=g) < 0.6)
    folded = fold_omega(prepare_fasa_mask(raw), torch.tensor(omega))
    out = fasa_attention(*inputs, folded, 1.0, mode=mode, backend=backend)
    assert_close_to_ref(out, inputs, raw, omega, mode=mode)
