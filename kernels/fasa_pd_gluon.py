"""The PD part of FASA (plain attention of PD queries over PD keys) as a Gluon kernel for Hopper (sm_90a).

An alternative PD provider for ``fasa_fwd(..., pd_sdpa=...)``: ``pd_attention_gluon`` returns ``(out, lse)`` in the
form ``pd_attention`` gives torch's SDPA kernels (out ``[B, H, Nq, D]`` in q's dtype, lse the fp32 natural-log
log-sum-exp ``[B, H, Nq]``), so that ``launch_plan(..., pd_part=(out, lse))`` merges it with the FD program's part
by LSE. It exists to overlap the tensor cores with the softmax, which the Triton kernel's PD loop does not do
(there every QK wgmma is followed by a wait with nothing in flight; bench/COMPILE.md):

  * per key tile j each consumer warpgroup issues the QK wgmma of tile j and the PV wgmma of tile j-1
    asynchronously, then waits with ONE group outstanding (``warpgroup_mma_wait(1)``, SASS
    ``WARPGROUP.DEPBAR.LE gsb0, 0x1``): the scores of tile j are ready while the PV product of tile j-1 still
    runs, and the softmax of tile j is issued under it (FlashAttention-3's intra-warpgroup pipelining);
  * ``SPLIT_WG`` (default): 128 query rows as two consumer partitions of one warpgroup (64 rows) each, which never
    wait for one another (each releases a ring stage on its own mbarrier arrival), so one's softmax can run
    under the other's wgmma (FA3's inter-warpgroup overlap, left to the warp scheduler, no ping-pong barrier);
  * K and V tiles come by TMA (``cp.async.bulk.tensor``) from a one-warp producer partition into a ``STAGES``-deep
    shared-memory ring, each stage with its own K and V mbarrier (a tile's QK does not wait for its V) and an
    "empty" mbarrier the consumers arrive on.

What the offline compile shows (``python -m freecure_ops.bench.gluon_report``; numbers in bench/COMPILE.md): the PTX issues
the whole softmax of a tile between ``wgmma.wait_group 1`` and ``wgmma.wait_group 0``, but ptxas (12.8 under
Triton 3.6, 13.4 under 3.9) hoists the full wait up to just after the row max, so only the max, the exponent
arguments and a few of the exp2s run under the PV group in SASS; the rest waits for it. Packing the next P before
the wait (done, as a dependency of it), a 2x-unrolled loop with two P register sets, and dropping the stage
release did not move it. The inter-warpgroup overlap does not depend on that order.

Gluon kernels cannot run in Triton's CPU interpreter (a launch needs a GPU driver even with TRITON_INTERPRET=1),
so this file is checked offline (bench/gluon_report.py) and on a Hopper GPU (tests/test_gluon_pd.py).
It compiles under Triton 3.6 (the GPU image) and 3.9 (CI); the API differences it meets are resolved once below.

Head dims 64 and 128 (a power of two, a unit head-dim stride, 16-byte aligned base and strides: TMA's rules) in
fp16 or bf16; any [B, H, N, D] strides otherwise (diffusers' ``view(B, N, H, D).transpose(1, 2)`` included): the
tensor descriptors are 4-D over the tensor as it is, so a tile never reads past its own (batch, head) rows (TMA
fills rows past N with zeros, and the last partial key tile is masked). ``supports`` says whether a call fits.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

LOG2E = 1.4426950408889634

# The two Gluon API differences this kernel meets, resolved here once (Triton's dependency scan visits every
# attribute in a kernel's source, even under a constexpr branch not taken, so the kernel must not name the other
# version's function): the TMA load is tma.async_copy_global_to_shared in 3.6 and tma.async_load in 3.9 (where
# the old name raises), the CTA barrier gl.thread_barrier() in 3.6 and gl.barrier() in 3.9.
_tma_async_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier


@gluon.jit
def _tma_load(desc, b, h, row, bar, dst, pred):
    _tma_async_load(desc, [b, h, row, 0], bar, dst, pred)


@gluon.jit
def _issue_kv(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, b, h, tile, n_tiles,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """TMA loads of K and V tile ``tile`` into its ring stage (skipped past the last tile)."""
    stage = tile % STAGES
    pred = tile < n_tiles
    nbytes: gl.constexpr = k_desc.block_type.nbytes
    mbarrier.expect(k_bars.index(stage), nbytes, pred)
    _tma_load(k_desc, b, h, tile * BLOCK_N, k_bars.index(stage), k_bufs.index(stage), pred)
    mbarrier.expect(v_bars.index(stage), nbytes, pred)
    _tma_load(v_desc, b, h, tile * BLOCK_N, v_bars.index(stage), v_bufs.index(stage), pred)


@gluon.jit
def _producer(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, empty_bars, b, h, n_tiles,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """The load partition (one warp): refill each ring stage once the consumer has released it."""
    for tile in range(STAGES, n_tiles):
        stage = tile % STAGES
        # the consumer arrives on empty[stage] once per use; use u of the stage (u >= 1) waits for arrival u
        mbarrier.wait(empty_bars.index(stage), ((tile // STAGES) - 1) & 1)
        _issue_kv(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, b, h, tile, n_tiles, BLOCK_N, STAGES)


@gluon.jit
def _softmax_tile(s, m_i, l_i, kv_start, NK, qk_scale, MASK_TAIL: gl.constexpr, s_layout: gl.constexpr,
                  BLOCK_N: gl.constexpr):
    """Online softmax of one score tile (raw scores; the scale is folded into the exp2's multiply-add).
    Returns (p, new max, new sum, alpha) with p = exp2(s * c - m * c), alpha the old accumulator's factor."""
    if MASK_TAIL:
        cols = kv_start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(gl.expand_dims(cols < NK, 0), s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1))
    shift = m_new * qk_scale
    p = gl.exp2(gl.fma(s, qk_scale, -gl.expand_dims(shift, 1)))
    alpha = gl.exp2(m_i * qk_scale - shift)
    l_new = l_i * alpha + gl.sum(p, 1)
    return p, m_new, l_new, alpha


@gluon.jit
def _pd_step(j, q, s_zero, acc, p_op, m_i, l_i, k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, empty_bars, b, h,
             NK, n_tiles, qk_scale, dtype: gl.constexpr, s_layout: gl.constexpr, row_o: gl.constexpr,
             p_layout: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
             MASK_TAIL: gl.constexpr, WARP_SPEC: gl.constexpr):
    """One key tile j >= 1: QK of tile j and PV of tile j-1 in flight, the softmax of tile j under the PV."""
    st = j % STAGES
    prev = (j - 1) % STAGES
    mbarrier.wait(k_bars.index(st), (j // STAGES) & 1)
    kj = k_bufs.index(st).reshape([BLOCK_N, HEAD_DIM])
    s = warpgroup_mma(q, kj.permute((1, 0)), s_zero, use_acc=False, is_async=True)
    mbarrier.wait(v_bars.index(prev), ((j - 1) // STAGES) & 1)
    vp = v_bufs.index(prev).reshape([BLOCK_N, HEAD_DIM])
    acc = warpgroup_mma(p_op, vp, acc, is_async=True)
    # wait for the QK group only: the PV group stays outstanding while the softmax of tile j runs
    s = warpgroup_mma_wait(1, deps=[s])
    p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, j * BLOCK_N, NK, qk_scale, MASK_TAIL, s_layout, BLOCK_N)
    # the next P, packed to 16 bits before the full wait (a dependency of it: LLVM would otherwise sink the
    # conversion below the wait)
    p_next = gl.convert_layout(p.to(dtype), p_layout)
    acc, p_op, p_next = warpgroup_mma_wait(0, deps=[acc, p_op, p_next])
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
    # stage `prev` (K and V of tile j-1) is free now
    if WARP_SPEC:
        mbarrier.arrive(empty_bars.index(prev), count=1)
    else:
        _cta_barrier()  # every warpgroup is done with the stage before the TMA overwrites it
        _issue_kv(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, b, h, j - 1 + STAGES, n_tiles, BLOCK_N, STAGES)
    return acc, p_next, m_i, l_i


@gluon.jit
def _consumer(q_desc, k_desc, v_desc, q_buf, k_bufs, v_bufs, q_bar, k_bars, v_bars, empty_bars, OUT, LSE,
              so_b, so_h, so_n, b, h, off_m, NQ, NK, n_tiles, qk_scale,
              HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              MASK_TAIL: gl.constexpr, WARP_SPEC: gl.constexpr, WG: gl.constexpr, ROWS: gl.constexpr,
              NUM_WARPS: gl.constexpr):
    """The consumer warps: query rows [off_m + WG * ROWS, off_m + (WG + 1) * ROWS) of the block (all of them, or
    one warpgroup's 64 under SPLIT_WG), over every key tile."""
    dtype: gl.constexpr = q_desc.dtype
    # wgmma accumulators: each warpgroup (4 warps) owns 64 query rows; S is [ROWS, BLOCK_N], O [ROWS, D]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    mbarrier.wait(q_bar, 0)
    q = q_buf.reshape([BLOCK_M, HEAD_DIM])
    if ROWS < BLOCK_M:
        q = q.slice(WG * ROWS, ROWS)
    off_m = off_m + WG * ROWS
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)

    # tile 0: its scores alone (nothing to overlap with yet)
    mbarrier.wait(k_bars.index(0), 0)
    k0 = k_bufs.index(0).reshape([BLOCK_N, HEAD_DIM])
    s = warpgroup_mma(q, k0.permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=[s])
    m_i = gl.full([ROWS], float("-inf"), gl.float32, row_s)
    l_i = gl.zeros([ROWS], gl.float32, row_s)
    p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, 0, NK, qk_scale, MASK_TAIL, s_layout, BLOCK_N)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)

    for j in range(1, n_tiles):
        acc, p_op, m_i, l_i = _pd_step(j, q, s_zero, acc, p_op, m_i, l_i, k_desc, v_desc, k_bufs, v_bufs,
                                       k_bars, v_bars, empty_bars, b, h, NK, n_tiles, qk_scale, dtype,
                                       s_layout, row_o, p_layout, HEAD_DIM, BLOCK_N, STAGES, MASK_TAIL,
                                       WARP_SPEC)

    last = (n_tiles - 1) % STAGES
    mbarrier.wait(v_bars.index(last), ((n_tiles - 1) // STAGES) & 1)
    vl = v_bufs.index(last).reshape([BLOCK_N, HEAD_DIM])
    acc = warpgroup_mma(p_op, vl, acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=[acc])

    # epilogue: out = acc / l (q's dtype), lse = (m * c + log2 l) * ln 2
    out = acc / gl.expand_dims(gl.convert_layout(l_i, row_o), 1)
    rows = off_m + gl.arange(0, ROWS, layout=row_o)
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    ptrs = OUT + b * so_b + h * so_h + gl.expand_dims(rows, 1) * so_n + gl.expand_dims(cols, 0)
    gl.store(ptrs, out.to(dtype), mask=gl.expand_dims(rows < NQ, 1))
    lse = (m_i * qk_scale + gl.log2(l_i)) * 0.6931471805599453
    rows_s = off_m + gl.arange(0, ROWS, layout=row_s)
    gl.store(LSE + (b * gl.num_programs(1) + h) * NQ + rows_s, lse, mask=rows_s < NQ)


@gluon.jit
def _pd_attn_fwd(q_desc, k_desc, v_desc, OUT, LSE, so_b, so_h, so_n, NQ, NK, qk_scale,
                 HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                 MASK_TAIL: gl.constexpr, WARP_SPEC: gl.constexpr, SPLIT_WG: gl.constexpr,
                 CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
    pid_m = gl.program_id(0)
    h = gl.program_id(1)
    b = gl.program_id(2)
    off_m = pid_m * BLOCK_M
    n_tiles = gl.cdiv(NK, BLOCK_N)
    dtype: gl.constexpr = q_desc.dtype

    q_buf = gl.allocate_shared_memory(dtype, q_desc.block_type.shape, q_desc.layout)
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
        mbarrier.init(empty_bars.index(i), count=2 if SPLIT_WG else 1)  # one arrival per consumer partition
    fence_async_shared()

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    _tma_load(q_desc, b, h, off_m, q_bar, q_buf, True)
    for i in gl.static_range(STAGES):
        _issue_kv(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, b, h, i, n_tiles, BLOCK_N, STAGES)

    if SPLIT_WG:
        # two consumer partitions, one warpgroup (64 query rows) each, that never wait for one another: while one
        # runs its softmax the other's wgmma can run (FA3's inter-warpgroup overlap, left to the warp scheduler)
        gl.static_assert(num_warps == 4 and BLOCK_M == 128)
        gl.warp_specialize([
            (_consumer, (q_desc, k_desc, v_desc, q_buf, k_bufs, v_bufs, q_bar, k_bars, v_bars, empty_bars, OUT, LSE,
                         so_b, so_h, so_n, b, h, off_m, NQ, NK, n_tiles, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N,
                         STAGES, MASK_TAIL, True, 0, 64, 4)),
            (_consumer, (q_desc, k_desc, v_desc, q_buf, k_bufs, v_bufs, q_bar, k_bars, v_bars, empty_bars, OUT, LSE,
                         so_b, so_h, so_n, b, h, off_m, NQ, NK, n_tiles, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N,
                         STAGES, MASK_TAIL, True, 1, 64, 4)),
            (_producer, (k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, empty_bars, b, h, n_tiles, BLOCK_N,
                         STAGES)),
        ], [4, 1], [CONSUMER_REGS, 24])
    elif WARP_SPEC:
        gl.warp_specialize([
            (_consumer, (q_desc, k_desc, v_desc, q_buf, k_bufs, v_bufs, q_bar, k_bars, v_bars, empty_bars, OUT, LSE,
                         so_b, so_h, so_n, b, h, off_m, NQ, NK, n_tiles, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N,
                         STAGES, MASK_TAIL, True, 0, BLOCK_M, num_warps)),
            (_producer, (k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, empty_bars, b, h, n_tiles, BLOCK_N,
                         STAGES)),
        ], [1], [24])
    else:
        _consumer(q_desc, k_desc, v_desc, q_buf, k_bufs, v_bufs, q_bar, k_bars, v_bars, empty_bars, OUT, LSE,
                  so_b, so_h, so_n, b, h, off_m, NQ, NK, n_tiles, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES,
                  MASK_TAIL, False, 0, BLOCK_M, num_warps)


# ------------------------------------------------------------------------------------------------- the launcher
_GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}
HEAD_DIMS = (64, 128)


def config(head_dim: int) -> dict:
    """Tile config: 128 query rows in two consumer warpgroups of 64 (``SPLIT_WG``, each its own partition, FA3's
    layout) plus a one-warp TMA producer; 128-key tiles at head dim 64, 64-key tiles at 128; a 2-deep K/V ring.
    Variants (the GPU sweep's): ``SPLIT_WG=False`` with ``num_warps=8`` (one 8-warp consumer partition: both
    warpgroups sync on every tile), ``WARP_SPEC=False`` (no producer: the consumers refill the ring after a
    CTA barrier), other ``BLOCK_N`` / ``STAGES``. Not yet timed on a GPU: none of these is known to be fastest."""
    return dict(BLOCK_M=128, BLOCK_N=128 if head_dim <= 64 else 64, STAGES=2, num_warps=4, WARP_SPEC=True,
                SPLIT_WG=True, CONSUMER_REGS=232)


def supports(q, k, v) -> bool:
    """Whether (q, k, v) ``[B, H, N, D]`` fit this kernel: fp16/bf16, head dim 64 or 128, a unit head-dim
    stride, 16-byte aligned base pointers and strides (TMA), the same dtype everywhere."""
    if q.dtype not in _GL_DTYPES or not (q.dtype == k.dtype == v.dtype) or q.shape[-1] not in HEAD_DIMS:
        return False
    es = q.element_size()
    for t in (q, k, v):
        if t.dim() != 4 or t.stride(-1) != 1 or t.data_ptr() % 16 or any((s * es) % 16 for s in t.stride()[:-1]):
            return False
    return True


def _descriptor(t, block_rows: int):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    block = [1, 1, block_rows, t.shape[-1]]
    layout = gl.NVMMASharedLayout.get_default_for(block, _GL_DTYPES[t.dtype])
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)


def launch_args(q, k, v, scale: float, cfg: dict | None = None):
    """(grid, positional args, keyword args, out, lse) of the launch; ``out`` laid out as ``[B, Nq, H, D]`` memory
    viewed as ``[B, H, Nq, D]`` (fasa_fwd's own output layout), ``lse`` fp32 ``[B, H, Nq]`` contiguous."""
    cfg = dict(cfg or config(q.shape[-1]))
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    out = torch.empty(batch, n_q, heads, head_dim, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(batch, heads, n_q, device=q.device, dtype=torch.float32)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    args = (_descriptor(q, bm), _descriptor(k, bn), _descriptor(v, bn), out, lse, *out.stride()[:3], n_q, n_k,
            scale * LOG2E)
    meta = dict(HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, STAGES=cfg["STAGES"], MASK_TAIL=n_k % bn != 0,
                WARP_SPEC=cfg["WARP_SPEC"], SPLIT_WG=cfg.get("SPLIT_WG", False),
                CONSUMER_REGS=cfg.get("CONSUMER_REGS", 232), num_warps=cfg["num_warps"])
    grid = (triton.cdiv(n_q, bm), heads, batch)
    return grid, args, meta, out, lse


def pd_attention_gluon(q, k_p, v_p, scale: float, cfg: dict | None = None):
    """Attention of q over the PD keys: ``(out, lse)`` as ``fasa_fwd``'s ``pd_attention`` returns them (out
    ``[B, H, Nq, D]`` in q's dtype, lse fp32 natural log ``[B, H, Nq]``). CUDA, sm_90, ``supports`` only; the
    softmax scale must be > 0 (the running max is taken on raw scores)."""
    if not scale > 0:
        raise ValueError("the Gluon PD kernel takes a softmax scale > 0")
    if not supports(q, k_p, v_p):
        raise ValueError("the Gluon PD kernel takes fp16/bf16, head dim 64 or 128, 16-byte aligned strides")
    grid, args, meta, out, lse = launch_args(q, k_p, v_p, scale, cfg)
    _pd_attn_fwd[grid](*args, **meta)
    return out, lse
