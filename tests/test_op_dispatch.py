"""The op's dispatch table (freecure_ops/op.py, ``ROUTES``): which path runs for each backend, device, mode and
transform, that the rows are disjoint and cover every call, that every path is reached by real calls, and that
neither the mask's kind (none, raw bool, raw float, prepared) nor n_txt, return_lse or autocast changes the path
(every one of those calls against the float64 oracle)."""
import pytest
import torch

import freecure_ops.op as op
from fasa_cases import assert_close_to_ref, make_inputs, to64
from freecure_ops import fasa_attention, fasa_reference, prepare_fasa_mask

# The table as the docs state it (docs/op.md), written out kind by kind.
EXPECTED = {
    # backend  device   mode     vmap
    ("triton", "cpu",   "bias",  False): "triton_kernel",
    ("triton", "cpu",   "scale", False): "triton_kernel",
    ("triton", "other", "bias",  False): "triton_kernel",
    ("triton", "other", "scale", False): "triton_kernel",
    ("torch",  "cpu",   "bias",  False): "torch_gathered",
    ("torch",  "other", "bias",  False): "torch_folded",
    ("torch",  "cpu",   "bias",  True):  "torch_dense",
    ("torch",  "other", "bias",  True):  "torch_dense",
    ("torch",  "cpu",   "scale", False): "torch_dense",
    ("torch",  "other", "scale", False): "torch_dense",
    ("torch",  "cpu",   "scale", True):  "torch_dense",
    ("torch",  "other", "scale", True):  "torch_dense",
}


@pytest.mark.parametrize("kind", sorted(EXPECTED), ids=lambda k: "-".join(map(str, k)))
def test_the_table_picks_the_expected_path(kind):
    assert op.ROUTE_OF[kind].path.__name__ == EXPECTED[kind]


def test_every_kind_has_exactly_one_row_and_every_row_is_reached():
    assert set(op.ROUTE_OF) == set(op.KINDS) >= set(EXPECTED)
    assert {id(r) for r in op.ROUTE_OF.values()} == {id(r) for r in op.ROUTES}  # no row is dead
    assert all(r.why for r in op.ROUTES)


def test_a_table_with_a_gap_or_an_overlap_is_refused():
    with pytest.raises(AssertionError, match="0 rows"):
        op._table(op.ROUTES[:-1])
    with pytest.raises(AssertionError, match="2 rows"):
        op._table(op.ROUTES + op.ROUTES[-1:])


@pytest.fixture
def taken(monkeypatch):
    """The names of the paths the calls ran, in order."""
    seen = []
    for kind, row in list(op.ROUTE_OF.items()):
        def spy(*args, _path=row.path):
            seen.append(_path.__name__)
            return _path(*args)
        monkeypatch.setitem(op.ROUTE_OF, kind, row._replace(path=spy))
    return seen


def _masks(n_img, seed):
    gen = torch.Generator().manual_seed(seed)
    soft = torch.rand(2, n_img, generator=gen) * (torch.rand(2, n_img, generator=gen) > 0.5)
    return {"none": None, "bool": torch.rand(n_img, generator=gen) > 0.4, "float": soft,
            "prepared": prepare_fasa_mask(soft)}


def _raw(mask):
    return mask.rows if hasattr(mask, "rows") else mask


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["bias", "scale"])
def test_mask_kinds_and_flags_pick_no_path(backend, mode, taken):
    want = EXPECTED[backend, "cpu", mode, False]
    for n_txt in (0, 3):
        inputs = make_inputs(2, 2, 14, 12, 19, 16, torch.float32, "cpu", seed=n_txt)
        for name, mask in _masks(19 - n_txt, seed=n_txt).items():
            for lse in (False, True):
                taken.clear()
                res = fasa_attention(*inputs, mask, 1.5, mode=mode, n_txt=n_txt, backend=backend, return_lse=lse)
                assert taken == [want], (name, n_txt, lse)
                out = res[0] if lse else res
                assert_close_to_ref(out, inputs, _raw(mask), 1.5, mode=mode, n_txt=n_txt)
                if lse:
                    m64 = None if mask is None else to64(_raw(mask))
                    _, lse64 = fasa_reference(*[to64(t) for t in inputs], m64, 1.5, mode=mode, n_txt=n_txt,
                                              return_lse=True)
                    assert (res[1].double() - lse64).abs().max() < 1e-5


def test_autocast_and_the_registered_op_pick_no_path(taken):
    inputs = make_inputs(2, 2, 14, 12, 19, 16, torch.float32, "cpu", seed=1)
    mask = _masks(19, seed=1)["prepared"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fasa_attention(*inputs, mask, 1.5, backend="torch")
    assert taken == ["torch_gathered"] and out.dtype == torch.float32  # autocast is off inside the path
    assert_close_to_ref(out, inputs, mask.rows, 1.5)
    tracked = fasa_attention(inputs[0].clone().requires_grad_(), *inputs[1:], mask, 1.5, backend="torch")
    assert taken == ["torch_gathered"] * 2 and torch.equal(tracked.detach(), out)


def test_vmap_runs_the_dense_path(taken):
    x = make_inputs(2, 2, 14, 12, 19, 16, torch.float32, "cpu", seed=2)
    mask = _masks(19, seed=2)["float"]
    qs = torch.stack([x[0], 2 * x[0]])
    out = torch.func.vmap(lambda q: fasa_attention(q, *x[1:], mask, 1.5, backend="torch"))(qs)
    assert taken == ["torch_dense"]
    for i in range(2):
        assert_close_to_ref(out[i], (qs[i], *x[1:]), mask, 1.5)


def test_other_devices_run_the_folded_path(taken):
    meta = [torch.empty(2, 2, n, 16, device="meta") for n in (14, 12, 19, 12, 19)]
    mask = prepare_fasa_mask(torch.ones(19, device="meta"))
    assert fasa_attention(*meta, mask, 1.5, backend="torch").shape == (2, 2, 14, 16)
    assert fasa_attention(*meta, mask, 1.5, backend="torch", mode="scale").shape == (2, 2, 14, 16)
    assert taken == ["torch_folded", "torch_dense"]
