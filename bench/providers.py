"""The providers: ways of computing one FASA call (plus two bounds that are not FASA).

Every provider turns a :class:`Problem` into a zero-argument callable returning ``[B, H, Nq, D]``; what is
built once per layer in a real run (masks, biases, block masks) is built in ``prepare`` and what a real
run pays on every call (concatenating K/V, the attention itself) is inside the callable.

=============  ========  ======================================================================================
name           computes  how
=============  ========  ======================================================================================
fasa           FASA      ``freecure_ops.fasa_attention(backend="triton")``: the fused kernel through the public API
reference      FASA      ``freecure_ops.fasa_reference`` in the input dtype: the authors' way (materialized scores)
sdpa_bias      FASA      concatenate K/V, SDPA with a broadcast ``[1, 1, 1, Nk]`` additive bias (FLUX: text rows in
                         a second SDPA call over PD keys)
flex           FASA      concatenate K/V, compiled ``flex_attention`` with a score_mod (bias) and a block mask
sdpa_dense     dense     SDPA over pre-concatenated ``[PD; FD image]`` K/V with no mask: the same work unmasked
sdpa_pd        pd        SDPA over the PD keys alone: the cost floor
=============  ========  ======================================================================================
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .masks import case_mask
from .measure import timed_once_ms
from .shapes import Case

PROVIDERS = ("fasa", "reference", "sdpa_bias", "flex", "sdpa_dense", "sdpa_pd")
TARGETS = {"fasa": "fasa", "reference": "fasa", "sdpa_bias": "fasa", "flex": "fasa",
           "sdpa_dense": "dense", "sdpa_pd": "pd"}
# The reference materializes [B, H, Nq, Np + Nf] fp32 scores (and a few copies): above this many bytes of
# fp32 scores it runs in query chunks (same math, bounded memory) and the row says so.
REFERENCE_MAX_SCORE_BYTES = 4 * 2**30


class Skip(Exception):
    """A provider that cannot run here; the message is the reason."""


@dataclass
class Problem:
    """One benchmark configuration's inputs, laid out as the adapters get them: q/k/v of the whole
    ``[PD_1..PD_n, FD_1..FD_n]`` batch as ``[2B, N, H, D]`` memory viewed ``[2B, H, N, D]``, split in halves."""

    case: Case
    dtype: torch.dtype
    device: torch.device
    coverage: float
    q: torch.Tensor
    k_p: torch.Tensor
    k_f: torch.Tensor
    v_p: torch.Tensor
    v_f: torch.Tensor
    mask: torch.Tensor  # float32 [Nimg] of 0/1, shared by the batch
    omega: float
    scale: float
    mask_kind: str = "hair"
    cache: dict = field(default_factory=dict)

    @property
    def nnz(self) -> int:
        return int((self.mask > 0).sum())

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)


def make_problem(case: Case, dtype: torch.dtype, coverage: float, device, seed: int = 0,
                 mask_kind: str = "hair") -> Problem:
    """Fresh random inputs (never zeros) and the case's ``mask_kind`` mask at ``coverage``."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    b, h, n, d = case.batch, case.heads, case.n_q, case.head_dim

    def qkv():
        return torch.randn(2 * b, n, h, d, generator=gen, device=device, dtype=dtype).transpose(1, 2)

    q_all, k_all, v_all = qkv(), qkv(), qkv()
    mask, _ = case_mask(case.grid, coverage, seed, mask_kind)
    return Problem(case, dtype, device, 1.0 if mask_kind == "full" else coverage, q_all[:b], k_all[:b], k_all[b:],
                   v_all[:b], v_all[b:], mask.to(device=device, dtype=torch.float32), case.omega, d ** -0.5,
                   mask_kind)


# ---------------------------------------------------------------------------------------------- oracles
def _rows_chunk(p: Problem, budget_bytes: int, elem: int) -> int:
    per_row = p.case.batch * p.case.heads * (p.case.n_p + p.case.n_f) * elem * 3
    return max(1, min(p.case.n_q, budget_bytes // per_row))


def fasa_rows(p: Problem, q_rows, *, text_rows: bool, dtype=None):
    """FASA for a run of query rows that are all text rows or all image rows, through the project's
    reference. Image rows see PD keys and the masked FD image keys; text rows see PD keys only (an
    all-zero mask gives exactly plain attention over PD, SPEC.md)."""
    from freecure_ops import fasa_reference

    n_txt = p.case.n_txt
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    mask = torch.zeros_like(p.mask) if text_rows else p.mask
    return fasa_reference(cast(q_rows), cast(p.k_p), cast(p.k_f[:, :, n_txt:]), cast(p.v_p),
                          cast(p.v_f[:, :, n_txt:]), mask, p.omega, scale=p.scale)


def fasa_chunked(p: Problem, chunk: int, dtype=None):
    """FASA by query chunks (text and image rows never share a chunk); memory O(chunk * Nk)."""
    outs, n_txt = [], p.case.n_txt
    for lo, hi, text in ((0, n_txt, True), (n_txt, p.case.n_q, False)):
        for s in range(lo, hi, chunk):
            outs.append(fasa_rows(p, p.q[:, :, s:min(s + chunk, hi)], text_rows=text, dtype=dtype))
    return torch.cat(outs, dim=2)


def _plain_chunked(q, k, v, scale, chunk, dtype):
    outs = []
    k, v = k.to(dtype), v.to(dtype)
    for s in range(0, q.shape[2], chunk):
        logits = torch.einsum("bhqd,bhkd->bhqk", q[:, :, s:s + chunk].to(dtype), k) * scale
        outs.append(torch.einsum("bhqk,bhkd->bhqd", torch.softmax(logits, dim=-1), v))
    return torch.cat(outs, dim=2)


def oracle(p: Problem, target: str) -> torch.Tensor:
    """The high-precision answer a provider is held against: float64 on CPU, fp32 (no TF32) on CUDA.
    ``target``: "fasa" (the op), "pd" (attention over PD keys) or "dense" (over [PD; FD image], unmasked)."""
    key = ("oracle", target)
    if key in p.cache:
        return p.cache[key]
    dtype = torch.float32 if p.device.type == "cuda" else torch.float64
    elem = torch.finfo(dtype).bits // 8
    chunk = _rows_chunk(p, 2**30 if p.device.type == "cuda" else 2**28, elem)
    n_txt = p.case.n_txt
    if target == "fasa":
        out = fasa_chunked(p, chunk, dtype)
    elif target == "pd":
        out = _plain_chunked(p.q, p.k_p, p.v_p, p.scale, chunk, dtype)
    elif target == "dense":
        k = torch.cat([p.k_p, p.k_f[:, :, n_txt:]], dim=2)
        v = torch.cat([p.v_p, p.v_f[:, :, n_txt:]], dim=2)
        out = _plain_chunked(p.q, k, v, p.scale, chunk, dtype)
    else:
        raise ValueError(f"unknown target {target!r}")
    p.cache[key] = out
    return out


# -------------------------------------------------------------------------------------------- providers
@dataclass
class Prepared:
    fn: object            # () -> [B, H, Nq, D]
    note: str = ""        # shown in the table and CSV
    build_ms: float | None = None  # one-off build cost reported separately (flex block mask)


def _fd_img(p: Problem):
    n_txt = p.case.n_txt
    return p.k_f[:, :, n_txt:], p.v_f[:, :, n_txt:]


def _bias_row(p: Problem) -> torch.Tensor:
    """The per-key additive bias ``[1, 1, 1, Np + Nimg]`` in the input dtype: 0 on PD keys,
    ``omega * m`` on FD keys inside the mask, -inf outside."""
    fd = torch.where(p.mask > 0, p.omega * p.mask, torch.full_like(p.mask, float("-inf")))
    bias = torch.cat([torch.zeros(p.case.n_p, device=p.device), fd])
    return bias.to(p.dtype)[None, None, None, :]


def prepare_fasa(p: Problem) -> Prepared:
    from freecure_ops import fasa_attention, prepare_fasa_mask

    if p.device.type != "cuda":
        raise Skip("kernel timings need CUDA (the CPU run checks the kernel in the Triton interpreter instead)")
    # The adapters prepare the mask once per token grid and reuse it for every layer and step; so does this.
    prepare_fasa_mask(p.mask)  # warm
    holder = {}
    build_ms = timed_once_ms(lambda: holder.setdefault("mask", prepare_fasa_mask(p.mask)), p.device)
    mask = holder["mask"]
    args = (p.q, p.k_p, p.k_f, p.v_p, p.v_f, mask, p.omega)

    def fn():
        return fasa_attention(*args, scale=p.scale, n_txt=p.case.n_txt, backend="triton")
    return Prepared(fn, "public API, backend=triton, prepared mask", build_ms)


def prepare_reference(p: Problem) -> Prepared:
    c = p.case
    score_bytes = c.batch * c.heads * c.n_q * (c.n_p + c.n_f) * 4
    if score_bytes <= REFERENCE_MAX_SCORE_BYTES:
        args = (p.q, p.k_p, p.k_f, p.v_p, p.v_f, p.mask, p.omega)
        from freecure_ops import fasa_reference

        def fn():
            return fasa_reference(*args, scale=p.scale, n_txt=c.n_txt)
        return Prepared(fn, f"eager, {p.dtype_name} scores {score_bytes / 2**30:.2f} GiB fp32")
    chunk = max(1, c.n_q * REFERENCE_MAX_SCORE_BYTES // score_bytes)
    return Prepared(lambda: fasa_chunked(p, chunk),
                    f"eager, query-chunked by {chunk} rows (full scores {score_bytes / 2**30:.1f} GiB > cap)")


def prepare_sdpa_bias(p: Problem) -> Prepared:
    bias = _bias_row(p)
    k_img, v_img = _fd_img(p)
    n_txt, q = p.case.n_txt, p.q

    if n_txt == 0:
        def fn():
            k = torch.cat([p.k_p, k_img], dim=2)
            v = torch.cat([p.v_p, v_img], dim=2)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=p.scale)
    else:
        q_txt, q_img = q[:, :, :n_txt], q[:, :, n_txt:]

        def fn():
            k = torch.cat([p.k_p, k_img], dim=2)
            v = torch.cat([p.v_p, v_img], dim=2)
            txt = F.scaled_dot_product_attention(q_txt, p.k_p, p.v_p, scale=p.scale)
            img = F.scaled_dot_product_attention(q_img, k, v, attn_mask=bias, scale=p.scale)
            return torch.cat([txt, img], dim=2)
    return Prepared(fn, "concat K/V in the call" + (", 2 SDPA calls (text, image)" if n_txt else ""))


def prepare_sdpa_dense(p: Problem) -> Prepared:
    k_img, v_img = _fd_img(p)
    k = torch.cat([p.k_p, k_img], dim=2)
    v = torch.cat([p.v_p, v_img], dim=2)
    return Prepared(lambda: F.scaled_dot_product_attention(p.q, k, v, scale=p.scale),
                    "bound, not FASA: K/V pre-concatenated, no mask")


def prepare_sdpa_pd(p: Problem) -> Prepared:
    return Prepared(lambda: F.scaled_dot_product_attention(p.q, p.k_p, p.v_p, scale=p.scale),
                    "bound, not FASA: PD keys only")


_FLEX = {}


def _compiled_flex():
    if "fn" not in _FLEX:
        import torch._dynamo

        from torch.nn.attention.flex_attention import flex_attention

        # One compiled graph per (shape, dtype): lift dynamo's recompile limit (default 8) so that the
        # benchmark's 14 variants never fall back to eager flex (which materializes the scores).
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def prepare_flex(p: Problem, *, allow_cpu: bool = False) -> Prepared:

    if p.device.type != "cuda" and not allow_cpu:
        raise Skip("compiled flex_attention on CPU spends ~20 s compiling per shape on a 2-core machine; "
                   "name it in --providers to run it anyway")
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as e:  # torch < 2.5
        raise Skip(f"torch.nn.attention.flex_attention unavailable: {e}") from None
    flex = _compiled_flex()
    n_p, n_txt, nk = p.case.n_p, p.case.n_txt, p.case.n_p + p.case.n_img
    keep = torch.cat([torch.ones(n_p, dtype=torch.bool, device=p.device), p.mask > 0])
    bias = torch.cat([torch.zeros(n_p, device=p.device), p.omega * p.mask])
    k_img, v_img = _fd_img(p)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[kv_idx]

    if n_txt == 0:
        def mask_mod(b, h, q_idx, kv_idx):
            return keep[kv_idx]
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return keep[kv_idx] & ((q_idx >= n_txt) | (kv_idx < n_p))

    def build():
        return create_block_mask(mask_mod, None, None, p.case.n_q, nk, device=p.device)

    build()  # warm (first build traces the mask_mod)
    holder = {}
    build_ms = timed_once_ms(lambda: holder.setdefault("bm", build()), p.device)
    block_mask = holder["bm"]

    def fn():
        k = torch.cat([p.k_p, k_img], dim=2)
        v = torch.cat([p.v_p, v_img], dim=2)
        return flex(p.q, k, v, score_mod=score_mod, block_mask=block_mask, scale=p.scale)
    compile_ms = timed_once_ms(fn, p.device)  # first call compiles (or hits the compiled cache)
    return Prepared(fn, f"concat K/V in the call; first call {compile_ms / 1e3:.1f} s", build_ms)


PREPARE = {"fasa": prepare_fasa, "reference": prepare_reference, "sdpa_bias": prepare_sdpa_bias,
           "flex": prepare_flex, "sdpa_dense": prepare_sdpa_dense, "sdpa_pd": prepare_sdpa_pd}


# ------------------------------------------------------------------------------------- SDPA backend log
_SDPA_OPS = {
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_flash_attention_for_cpu": "flash_cpu",
    "_scaled_dot_product_efficient_attention": "mem_efficient",
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_attention_math": "math",
    "_scaled_dot_product_fused_attention_overrideable": "overrideable",
}


def sdpa_backends(fn) -> str:
    """Which SDPA backend(s) ``fn`` dispatched to: SDPA is a composite op, so the aten op it picks (flash,
    mem-efficient, cuDNN, math) is what a dispatch mode sees. Runs ``fn`` once."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = set()

    class _Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in _SDPA_OPS:
                seen.add(_SDPA_OPS[name])
            return func(*args, **(kwargs or {}))

    with _Record():
        fn()
    return "+".join(sorted(seen)) if seen else "unknown"


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}[dtype]

