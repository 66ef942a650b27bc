"""The PyTorch backend's "bias"-mode keys (freecure_ops/torch_keys.py): live FD keys gathered from the packed list,
then one SDPA call with ``omega*m`` as an additive mask (the gathered path, the CPU's) or folded into a head-dim
column with no mask (the folded path, off the CPU). Every test runs both paths on the CPU (the ``form`` fixture
points the op's table row for CPU "bias" calls at the folded path). Against the
float64 oracle with the rounding floor rule (fasa_cases.assert_close_to_ref), on the cases the gather makes
special: per-row masks with different live counts (padding slots), a row with no live key, NaN in every
excluded key, FLUX text rows, odd head dims."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import freecure_ops.op as op
import freecure_ops.torch_keys as keys
from fasa_cases import assert_close_to_ref, make_inputs, to64
from freecure_ops import fasa_attention, fasa_reference, prepare_fasa_mask

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def uneven_mask(n_img, counts, seed=0, soft=True):
    """Rows ``[len(counts), n_img]`` with ``counts[i]`` live keys at random places (soft values in (0.5, 2))."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.zeros(len(counts), n_img)
    for i, c in enumerate(counts):
        live = torch.randperm(n_img, generator=gen)[:c]
        rows[i, live] = (0.5 + 1.5 * torch.rand(c, generator=gen)) if soft else 1.0
    return rows


def poison_excluded(k_f, v_f, mask, n_txt=0, value=float("nan")):
    """Write ``value`` into every excluded FD image key and every FD text key (in place)."""
    dead = (mask == 0)[:, None, :].expand(k_f.shape[0], k_f.shape[1], -1)
    for t in (k_f, v_f):
        img = t[:, :, n_txt:]
        img[dead] = value
        t[:, :, :n_txt] = value


class SdpaOps(TorchDispatchMode):
    """The aten SDPA ops dispatched (which backend SDPA picked)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in func.overloadpacket.__name__:
            self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture(autouse=True, params=["mask", "fold"])
def form(request, monkeypatch):
    """The bias as an additive mask (what the CPU runs) or folded into the head dim (what other devices run)."""
    if request.param == "fold":
        cpu_bias = op.CallKind("torch", "cpu", "bias", False)
        monkeypatch.setitem(op.ROUTE_OF, cpu_bias, op.ROUTE_OF[cpu_bias._replace(device="other")])
    return request.param


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Every SDPA call of the backend as ``(key count, attn_mask, aten op picked)``."""
    calls, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        with SdpaOps() as ops:
            out = real(q, k, v, attn_mask=attn_mask, **kw)
        calls.append((k.shape[2], attn_mask, ops.names[0]))
        return out

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [40, 72, 111])
@pytest.mark.parametrize("prepared", [True, False])
def test_per_row_live_counts_with_nan_in_excluded_keys(d, dtype, prepared):
    # Row 0 has 5 live keys, row 1 has 40, row 2 none: rows 0 and 2 get padding slots (row 2's point at an
    # excluded key, which holds NaN).
    n_img = 61
    q, k_p, k_f, v_p, v_f = make_inputs(3, 2, 37, 29, n_img, d, dtype, "cpu", seed=d)
    mask = uneven_mask(n_img, [5, 40, 0], seed=d)
    clean = (q, k_p, k_f.clone(), v_p, v_f.clone())
    poison_excluded(k_f, v_f, mask)
    m = prepare_fasa_mask(mask) if prepared else mask
    out = fasa_attention(q, k_p, k_f, v_p, v_f, m, 1.5, backend="torch")
    assert torch.isfinite(out).all()
    assert_close_to_ref(out, clean, mask, 1.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flux_text_rows_and_lse_with_poisoned_keys(dtype):
    n, n_txt, d = 70, 13, 72
    q, k_p, k_f, v_p, v_f = make_inputs(2, 2, n, n, n, d, dtype, "cpu", seed=7)
    mask = uneven_mask(n - n_txt, [9, 30], seed=7)
    clean = (q, k_p, k_f.clone(), v_p, v_f.clone())
    poison_excluded(k_f, v_f, mask, n_txt=n_txt, value=float("inf"))
    out, lse = fasa_attention(q, k_p, k_f, v_p, v_f, prepare_fasa_mask(mask), 1.5, n_txt=n_txt, backend="torch",
                              return_lse=True)
    assert_close_to_ref(out, clean, mask, 1.5, n_txt=n_txt)
    _, lse64 = fasa_reference(*[to64(t) for t in clean], mask.double(), 1.5, n_txt=n_txt, return_lse=True)
    assert lse.dtype == torch.float32 and torch.isfinite(lse).all()
    assert (lse.double() - lse64).abs().max() < (1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("shared", [True, False])
def test_empty_mask_is_attention_over_pd_alone(shared, sdpa_calls):
    q, k_p, k_f, v_p, v_f = make_inputs(2, 2, 33, 27, 45, 40, torch.float32, "cpu", seed=3)
    mask = torch.zeros(45) if shared else torch.zeros(2, 45)
    k_f.fill_(float("nan"))
    v_f.fill_(float("nan"))
    out = fasa_attention(q, k_p, k_f, v_p, v_f, prepare_fasa_mask(mask), 8.0, backend="torch")
    assert [n_k for n_k, _, _ in sdpa_calls] == [27]  # the PD keys alone
    ref = torch.softmax(to64(q) @ to64(k_p).transpose(-1, -2) * 40 ** -0.5, -1) @ to64(v_p)
    assert (out.double() - ref).abs().max() < 1e-5


def test_one_sdpa_call_over_pd_and_live_keys(sdpa_calls, form):
    n_img = 64
    q, k_p, k_f, v_p, v_f = make_inputs(2, 2, 40, 40, n_img, 40, torch.float32, "cpu", seed=4)
    mask = uneven_mask(n_img, [11, 23], seed=4)
    out = fasa_attention(q, k_p, k_f, v_p, v_f, prepare_fasa_mask(mask), 0.5, backend="torch")
    # padded to the largest live count; a per-key mask [rows, 1, 1, keys] or none: SDPA's flash kernel
    [(n_k, attn_mask, op)] = sdpa_calls
    assert (n_k, op) == (40 + 23, "_scaled_dot_product_flash_attention_for_cpu")
    assert attn_mask is None if form == "fold" else attn_mask.shape == (2, 1, 1, 40 + 23)
    assert_close_to_ref(out, (q, k_p, k_f, v_p, v_f), mask, 0.5)
    sdpa_calls.clear()  # a shared mask: exactly its live keys, no padding
    fasa_attention(q, k_p, k_f, v_p, v_f, prepare_fasa_mask(mask[1]), 0.5, backend="torch")
    assert [n_k for n_k, _, _ in sdpa_calls] == [40 + 23]


@pytest.mark.parametrize("pd_logit", [0.0, -5000.0])
def test_padding_slots_get_weight_exactly_zero(pd_logit):
    # The folded logits of padding slots are -1e30: float32 softmax gives them exactly 0, also when every
    # real logit of the row is very negative (-5000; a pad logit of -1e3 would take all the weight there).
    q, k_p, k_f, v_p, v_f = make_inputs(2, 1, 16, 8, 20, 40, torch.float32, "cpu", seed=5)
    if pd_logit:
        u = torch.ones(40) / 40 ** 0.5
        q = (pd_logit * 40 ** 0.5) * u.expand_as(q).clone()
        k_p, k_f = u.expand_as(k_p).clone(), u.expand_as(k_f).clone()
    packed = prepare_fasa_mask(uneven_mask(20, [2, 9], seed=5))
    qf, kf, vf = keys.folded_qkv(q, k_p, v_p, k_f, v_f, packed, 0, 1.5, 40 ** -0.5, torch.float32)
    assert qf.shape[-1] == kf.shape[-1] == vf.shape[-1] == 41 and kf.shape[2] == 8 + 9  # CPU: no round-up
    assert [keys.folded_width(d) for d in (40, 64, 111, 128)] == [48, 72, 112, 136]  # CUDA: multiples of 8
    weights = torch.softmax(qf @ kf.transpose(-1, -2), dim=-1)
    assert (weights[0, :, :, 8 + 2:] == 0).all() and (weights[0, :, :, :8 + 2].sum(-1) > 0.99).all()
    assert (kf[0, :, 8 + 2:, :40] == 0).all() and (vf[0, :, 8 + 2:] == 0).all()
    out = fasa_attention(q, k_p, k_f, v_p, v_f, packed, 1.5, backend="torch")
    assert_close_to_ref(out, (q, k_p, k_f, v_p, v_f), packed.rows, 1.5)


def test_off_cpu_slot_count_gathers_every_key_as_padding(monkeypatch):
    # Off the CPU the live count is not read (it would sync): all Nimg slots, the excluded ones as padding.
    assert keys.live_slots(torch.zeros(2, dtype=torch.int32, device="meta"), 17) == (17, True)
    assert keys.live_slots(torch.tensor([3, 3], dtype=torch.int32), 17) == (3, False)
    assert keys.live_slots(torch.tensor([0, 5], dtype=torch.int32), 17) == (5, True)
    monkeypatch.setattr(keys, "live_slots", lambda count, n_img: (n_img, True))
    q, k_p, k_f, v_p, v_f = make_inputs(2, 2, 31, 23, 50, 72, torch.float16, "cpu", seed=6)
    mask = uneven_mask(50, [0, 17], seed=6)
    clean = (q, k_p, k_f.clone(), v_p, v_f.clone())
    poison_excluded(k_f, v_f, mask)
    out = fasa_attention(q, k_p, k_f, v_p, v_f, prepare_fasa_mask(mask), 1.5, backend="torch")
    assert_close_to_ref(out, clean, mask, 1.5)


def test_gradients_through_the_folded_forward():
    # The backward recomputes densely; with per-row live counts it matches float64 autograd of the oracle.
    n_img = 40
    x = [t.requires_grad_() for t in make_inputs(2, 2, 21, 19, n_img, 40, torch.float32, "cpu", seed=8)]
    mask = uneven_mask(n_img, [4, 25], seed=8)
    out = fasa_attention(*x, prepare_fasa_mask(mask), 1.5, backend="torch")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, x, g)
    x64 = [to64(t.detach()).requires_grad_() for t in x]
    grads64 = torch.autograd.grad(fasa_reference(*x64, mask.double(), 1.5), x64, g.double())
    for a, b in zip(grads, grads64):
        assert (a.double() - b).abs().max() <= 1e-4 * max(1.0, float(b.abs().max()))


def test_compiled_call_with_a_per_row_mask():
    n_img = 36
    x = make_inputs(2, 2, 20, 20, n_img, 72, torch.float32, "cpu", seed=9)
    mask = prepare_fasa_mask(uneven_mask(n_img, [6, 20], seed=9))

    def fn(q, k_p, k_f, v_p, v_f):
        return fasa_attention(q, k_p, k_f, v_p, v_f, mask, 1.5, backend="torch") * 2

    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(*x)
    assert_close_to_ref(out / 2, x, mask.rows, 1.5)
