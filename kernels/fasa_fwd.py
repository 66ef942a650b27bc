"""Fused FASA forward: flash attention over [PD keys, masked FD keys] with no concatenation.

One program per (query block, head, batch). Online softmax in fp32 in the log2 domain. Two key loops:
  1. PD keys: plain attention; full tiles carry no masking, a final partial tile masks its tail.
  2. FD image keys (from ``n_txt`` on). "bias" mode with a mask: the loop walks the prepared list of live
     keys (m > 0), ``ceil(nnz / BLOCK_N)`` tiles, gathering their K/V rows; excluded keys are never loaded,
     so the work follows the mask's coverage, not the number of key tiles it touches. Its full tiles carry
     no bound checks (the masked gathers cost a fifth to a third of the loop's instructions, COMPILE.md);
     the partial one comes last. "scale" mode (and "bias" with no mask): every FD image key in order, the
     mask applied in registers.
Every loop is branch-free, with its addresses known one iteration ahead, so Triton software-pipelines the
K/V loads of both loops. The running max is kept on raw scores (row-wise, then scaled) and the softmax scale,
a binary mask's bias and the max meet in one per-row shift: p = exp2(s * scale * log2(e) + (bias - m)), one
multiply-add per element (_accumulate; a scale <= 0 scales every score first). FLUX's per-element text-row
select is compiled in only when a query tile holds both text and image rows (``n_txt % BLOCK_M != 0``;
FLUX's 512 text rows never do).

Two variants, compile-time switches the launcher sets (the GPU tile sweep, bench/tile_sweep.py, times them
against the default; results are the same function):
  * BINARY: every live key of a mask row has the same value (a bool mask, recorded by the prepared mask):
    the packed FD loop adds one scalar bias and loads no per-key values (fewer instructions and registers
    per FD tile, bench/COMPILE.md). Chosen from the prepared mask's ``binary``.
  * SPLIT_KV: two programs per query block, one over the PD keys and one over the FD keys, each writing an
    fp32 partial output and LSE, merged by ``_merge_kernel``: twice the programs for grids under one wave.
    Off unless asked for (``split_kv=True``) until GPU timings say where it pays.
  * FD_ONLY (``pd_sdpa=True``): the PD keys by torch's fused SDPA kernel that returns the LSE (cuDNN, flash,
    efficient; ``pd_sdpa_op``), or by our Gluon kernel (``pd_sdpa="gluon"``, kernels/fasa_pd_gluon.py: Hopper,
    head dim 64/128, the QK and PV products overlapped with the softmax), this kernel runs split-KV's FD
    program alone and ``_merge_kernel`` combines the two by LSE. Off unless asked for, like split-KV.
Nothing of size Nq x Nk is ever written to memory. The launcher expects validated
inputs and a prepared mask (``freecure_ops.prepare_fasa_mask``); it imports nothing from the rest of the
package and checks only what the launch itself needs.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:  # fp32 inputs: full fp32 products like torch's fp32 matmul (no TF32)
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _load_rows(base, rows, row_ok, cols, stride_n, stride_d, HEAD_DIM: tl.constexpr, CHECK_N: tl.constexpr,
               CHECK_D: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Load rows ``rows`` (any order: a contiguous range or gathered indices), columns ``cols`` of an
    [N, HEAD_DIM] matrix; rows where ``row_ok`` is false and cols >= HEAD_DIM read as zero and are never
    touched. A bound is checked only where the tile can cross it (CHECK_N, CHECK_D are compile-time)."""
    ptrs = base + rows[:, None] * stride_n + cols[None, :] * stride_d
    if CHECK_N and CHECK_D:
        t = tl.load(ptrs, mask=row_ok[:, None] & (cols < HEAD_DIM)[None, :], other=0.0)
    elif CHECK_N:
        t = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    elif CHECK_D:
        t = tl.load(ptrs, mask=(cols < HEAD_DIM)[None, :], other=0.0)
    else:
        t = tl.load(ptrs)
    return t.to(DOT_DTYPE)


@triton.jit
def _scores(q0, q1, k_base, rows, row_ok, offs_d0, offs_d1, stride_n, stride_d, qk_scale,
            HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, SPLIT_D: tl.constexpr,
            CHECK_N: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, RAW_MAX: tl.constexpr):
    """Scores q k^T of one key tile, the head dim split in two pow2 parts: raw when RAW_MAX (the softmax
    scale is folded into the exp's multiply-add later, _accumulate), else times ``qk_scale`` (log2 domain)."""
    k0 = _load_rows(k_base, rows, row_ok, offs_d0, stride_n, stride_d, HEAD_DIM, CHECK_N,
                    BLOCK_D0 > HEAD_DIM, DOT_DTYPE)
    qk = _dot(q0, tl.trans(k0), IEEE)
    if SPLIT_D:
        k1 = _load_rows(k_base, rows, row_ok, offs_d1, stride_n, stride_d, HEAD_DIM, CHECK_N,
                        BLOCK_D0 + BLOCK_D1 > HEAD_DIM, DOT_DTYPE)
        qk += _dot(q1, tl.trans(k1), IEEE)
    if RAW_MAX:
        return qk
    return qk * qk_scale


@triton.jit
def _accumulate(acc0, acc1, l_i, m_i, qk, sc, shift, v_base, rows, row_ok, offs_d0, offs_d1, stride_n, stride_d,
                HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, SPLIT_D: tl.constexpr,
                CHECK_N: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, EMPTY_ROWS: tl.constexpr):
    """Fold one key tile and its values into the online-softmax state. The tile's log2-domain logits are
    ``qk * sc + shift``: ``sc`` > 0 (the softmax scale times log2(e) on raw scores; 1.0 where the caller
    formed per-key logits itself) and ``shift`` one value for every element (a binary mask's bias), or None
    for none (an add of 0.0 is not an identity the compiler may drop: -0.0 + 0.0 is +0.0).
    The running max ``m_i`` is over logits, but the tile's is taken on ``qk`` (row-wise, then scaled and
    shifted: ``sc`` > 0 keeps the order), so each element costs one multiply-add before its exp2:
    p = exp2(qk * sc + (shift - m)), the per-row shift holding the scale's, the bias's and the max's parts.
    EMPTY_ROWS: a row may have seen only -inf logits so far (a split program's FD part: FLUX text rows), so
    its running max stays -inf; it is shifted by 0 instead, keeping p and alpha at 0 rather than NaN."""
    if shift is None:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * sc)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * sc + shift)
    if EMPTY_ROWS:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    alpha = tl.math.exp2(m_i - m_ref)
    if shift is None:
        p = tl.math.exp2(tl.fma(qk, sc, -m_ref[:, None]))
    else:
        p = tl.math.exp2(tl.fma(qk, sc, (shift - m_ref)[:, None]))
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(DOT_DTYPE)
    v0 = _load_rows(v_base, rows, row_ok, offs_d0, stride_n, stride_d, HEAD_DIM, CHECK_N,
                    BLOCK_D0 > HEAD_DIM, DOT_DTYPE)
    acc0 = acc0 * alpha[:, None] + _dot(p, v0, IEEE)
    if SPLIT_D:
        v1 = _load_rows(v_base, rows, row_ok, offs_d1, stride_n, stride_d, HEAD_DIM, CHECK_N,
                        BLOCK_D0 + BLOCK_D1 > HEAD_DIM, DOT_DTYPE)
        acc1 = acc1 * alpha[:, None] + _dot(p, v1, IEEE)
    return acc0, acc1, l_i, m_new


@triton.jit
def _fd_packed_tile(acc0, acc1, l_i, m_i, q0, q1, kf_base, vf_base, rows, live, vals, offs_m, offs_d0, offs_d1,
                    skf_n, skf_d, svf_n, svf_d, qk_scale, sc, omega, N_TXT, HEAD_DIM: tl.constexpr,
                    BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, SPLIT_D: tl.constexpr, BINARY: tl.constexpr,
                    MIXED_TXT: tl.constexpr, CHECK_N: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
                    EMPTY_ROWS: tl.constexpr, RAW_MAX: tl.constexpr):
    """One tile of gathered live FD keys (k_f/v_f rows ``rows``): logit = s + omega * m (omega arrives times
    log2(e); ``vals`` is the scalar bias when BINARY, else the keys' mask values). CHECK_N: the tile may
    hold padding past the live keys (``live`` false), which is never loaded and is excluded.
    BINARY: the bias is one value for the tile, folded into the exp's per-row shift (_accumulate); per-key
    values are added in the multiply-add that applies the scale."""
    qk = _scores(q0, q1, kf_base, rows, live, offs_d0, offs_d1, skf_n, skf_d, qk_scale,
                 HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, CHECK_N, DOT_DTYPE, IEEE, RAW_MAX)
    if BINARY:
        shift = vals
    else:
        qk = tl.fma(qk, sc, (omega * vals)[None, :])
        sc = 1.0
        shift = None
    if CHECK_N:
        qk = tl.where(live[None, :], qk, float("-inf"))
    if MIXED_TXT:  # text query rows see PD keys only
        qk = tl.where((offs_m >= N_TXT)[:, None], qk, float("-inf"))
    return _accumulate(acc0, acc1, l_i, m_i, qk, sc, shift, vf_base, rows, live, offs_d0, offs_d1, svf_n, svf_d,
                       HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, CHECK_N, DOT_DTYPE, IEEE, EMPTY_ROWS)


@triton.jit
def _store_rows(base, rows, cols, stride_n, stride_d, n_end, x, HEAD_DIM: tl.constexpr):
    ptrs = base + rows[:, None] * stride_n + cols[None, :] * stride_d
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=(rows < n_end)[:, None] & (cols < HEAD_DIM)[None, :])


@triton.jit
def _aligned(stride, ALIGN: tl.constexpr):
    """``stride``, known to be a multiple of ALIGN (launcher-checked), in a form the compiler can see is."""
    return (stride // ALIGN) * ALIGN


@triton.jit
def _fasa_fwd_kernel(
    Q, KP, VP, KF, VF, MASK, FD_INDEX, FD_VALUE, FD_COUNT, OUT, LSE, VISITED,
    sq_b, sq_h, sq_n, sq_d,
    skp_b, skp_h, skp_n, skp_d,
    svp_b, svp_h, svp_n, svp_d,
    skf_b, skf_h, skf_n, skf_d,
    svf_b, svf_h, svf_n, svf_d,
    so_b, so_h, so_n, so_d, so_p, sl_p,
    sm_b, sc_b,
    H, NQ, NP, NF, N_TXT,
    qk_scale, omega,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, SPLIT_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N_FD: tl.constexpr, ALIGN: tl.constexpr,
    SCALE_MODE: tl.constexpr, FD_PACKED: tl.constexpr, HAS_MASK: tl.constexpr, MIXED_TXT: tl.constexpr,
    BINARY: tl.constexpr, SPLIT_KV: tl.constexpr, FD_ONLY: tl.constexpr, RAW_MAX: tl.constexpr,
    WRITE_LSE: tl.constexpr, COUNT_TILES: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
):
    # Head dim D = BLOCK_D0 (+ BLOCK_D1 when SPLIT_D), powers of two, the last part zero-padded: 80 = 64 + 16
    # and 160 = 128 + 32 waste nothing, where one padded block (128, 256) would waste 37%. Without a split,
    # BLOCK_D1 only sizes unused placeholders.
    if ALIGN > 1:
        # The launcher checked that every base pointer is 16-byte aligned and every batch/head/token stride a
        # multiple of ALIGN elements (head strides of 40 or 72 elements are multiples of 8, not of 16, which
        # is all Triton's specialization can see). Rewriting s as (s // ALIGN) * ALIGN states it where the
        # compiler's alignment analysis sees it (tl.multiple_of does not attach to a kernel argument): row
        # loads then become 16-byte vectors and async copies.
        sq_b, sq_h, sq_n = _aligned(sq_b, ALIGN), _aligned(sq_h, ALIGN), _aligned(sq_n, ALIGN)
        skp_b, skp_h, skp_n = _aligned(skp_b, ALIGN), _aligned(skp_h, ALIGN), _aligned(skp_n, ALIGN)
        svp_b, svp_h, svp_n = _aligned(svp_b, ALIGN), _aligned(svp_h, ALIGN), _aligned(svp_n, ALIGN)
        skf_b, skf_h, skf_n = _aligned(skf_b, ALIGN), _aligned(skf_h, ALIGN), _aligned(skf_n, ALIGN)
        svf_b, svf_h, svf_n = _aligned(svf_b, ALIGN), _aligned(svf_h, ALIGN), _aligned(svf_n, ALIGN)
        so_b, so_h, so_n = _aligned(so_b, ALIGN), _aligned(so_h, ALIGN), _aligned(so_n, ALIGN)
        so_p = _aligned(so_p, ALIGN)
    if FD_ONLY:
        # The FD part alone (PD keys by torch's SDPA, launch_plan's pd_sdpa): one program per query block,
        # the split-KV FD program; its partial output and LSE are the only part in OUT/LSE (so_p = sl_p = 0).
        pid_m = tl.program_id(0)
        part = 1
    elif SPLIT_KV:
        # Split-KV: two programs per query block, part 0 over the PD keys, part 1 over the FD keys. Each
        # writes its normalized partial output and LSE (fp32); _merge_kernel combines them by LSE.
        pid_m = tl.program_id(0) // 2
        part = tl.program_id(0) % 2
    else:
        pid_m = tl.program_id(0)
        part = 0
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)

    q_base = Q + off_b * sq_b + off_h * sq_h
    q_ok = offs_m < NQ
    q0 = _load_rows(q_base, offs_m, q_ok, offs_d0, sq_n, sq_d, HEAD_DIM, True, BLOCK_D0 > HEAD_DIM, DOT_DTYPE)
    if SPLIT_D:
        q1 = _load_rows(q_base, offs_m, q_ok, offs_d1, sq_n, sq_d, HEAD_DIM, True, True, DOT_DTYPE)
    else:
        q1 = q0
    # RAW_MAX (softmax scale > 0): the key loops keep raw scores and fold the scale into the exp's multiply-add
    # (_accumulate); otherwise (a scale <= 0 reverses or flattens the order of raw scores) they scale each
    # score first and fold nothing (sc = 1). m_i is the running max of log2-domain logits either way.
    if RAW_MAX:
        sc = qk_scale
    else:
        sc = 1.0
    # Split-KV's FD part starts with m_i = -inf; a row can keep it through a tile only when text and image
    # rows share a query tile (an image-only tile's first FD tile has a live key for every row).
    EMPTY_ROWS: tl.constexpr = SPLIT_KV and MIXED_TXT
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)

    if not FD_ONLY:  # FD_ONLY: the PD keys are another kernel's (torch's SDPA)
        # 1. PD keys. Key 0 always exists, so every row's running max is finite after this loop and fully
        #    excluded FD keys/rows below fold in as exact zeros. Full tiles carry no bound checks.
        kp_base = KP + off_b * skp_b + off_h * skp_h
        vp_base = VP + off_b * svp_b + off_h * svp_h
        np_full = (NP // BLOCK_N) * BLOCK_N
        pd_tail = np_full < NP
        if SPLIT_KV:  # the FD part skips the PD keys
            np_full = tl.where(part == 0, np_full, 0)
            pd_tail = pd_tail & (part == 0)
        for start_n in range(0, np_full, BLOCK_N):
            cols = start_n + offs_n
            qk = _scores(q0, q1, kp_base, cols, cols < NP, offs_d0, offs_d1, skp_n, skp_d, qk_scale,
                         HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, False, DOT_DTYPE, IEEE, RAW_MAX)
            acc0, acc1, l_i, m_i = _accumulate(acc0, acc1, l_i, m_i, qk, sc, None, vp_base, cols, cols < NP, offs_d0,
                                               offs_d1, svp_n, svp_d, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, False,
                                               DOT_DTYPE, IEEE, False)
        if pd_tail:
            cols = np_full + offs_n
            ok = cols < NP
            qk = _scores(q0, q1, kp_base, cols, ok, offs_d0, offs_d1, skp_n, skp_d, qk_scale,
                         HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, True, DOT_DTYPE, IEEE, RAW_MAX)
            qk = tl.where(ok[None, :], qk, float("-inf"))
            acc0, acc1, l_i, m_i = _accumulate(acc0, acc1, l_i, m_i, qk, sc, None, vp_base, cols, ok, offs_d0, offs_d1,
                                               svp_n, svp_d, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, True,
                                               DOT_DTYPE, IEEE, False)

    # 2. FD image keys (rows N_TXT + j of k_f/v_f for mask entry j). Query blocks made only of text rows have
    #    nothing to do here: their FD loop runs zero times.
    kf_base = KF + off_b * skf_b + off_h * skf_h
    vf_base = VF + off_b * svf_b + off_h * svf_h
    n_img = NF - N_TXT
    has_img_rows = pid_m * BLOCK_M + BLOCK_M > N_TXT
    if SPLIT_KV and not FD_ONLY:  # the PD part skips the FD keys
        has_img_rows = has_img_rows & (part == 1)
    if FD_PACKED:
        # "bias" mode: only live keys (m > 0) can contribute. FD_INDEX lists them per mask row, FD_VALUE holds
        # their mask values, FD_COUNT their number: the loop runs ceil(nnz / BLOCK_N_FD) tiles, gathering K/V
        # rows; excluded keys are never loaded. The next tile's indices are read one iteration ahead, so the
        # gathers of an iteration depend on no load of that iteration and Triton software-pipelines them.
        # BLOCK_N_FD: this loop's own key-tile size (the PD loop's BLOCK_N unless the launcher is told otherwise,
        # fasa_fwd's ``fd_block_n``): 128-key tiles cost fewer instructions per key in the binary loop and fit
        # without spills where the float loop's do not (bench/COMPILE.md).
        offs_f = tl.arange(0, BLOCK_N_FD)
        idx_base = FD_INDEX + off_b * sm_b
        val_base = FD_VALUE + off_b * sm_b
        n_live = tl.load(FD_COUNT + off_b * sc_b)
        # Full tiles (every key live) carry no bound checks; the one partial tile, if any, comes last.
        n_full = tl.where(has_img_rows, n_live // BLOCK_N_FD, 0)
        has_tail = has_img_rows & (n_full * BLOCK_N_FD < n_live)
        n_tiles = n_full + has_tail.to(tl.int32)
        live = offs_f < n_live
        keys = tl.load(idx_base + offs_f, mask=live, other=0)
        if BINARY:
            # Every live key of this mask row has the same value (a bool mask): one scalar bias, read once
            # (entry 0 is the first live key's value; unused when the row has none), and no per-key value
            # loads in the loop.
            bias = omega * tl.load(val_base)
            vals = bias
        else:
            vals = tl.load(val_base + offs_f, mask=live, other=0.0)
        for t in range(0, n_full):
            nxt = (t + 1) * BLOCK_N_FD + offs_f
            live_nxt = nxt < n_live
            keys_nxt = tl.load(idx_base + nxt, mask=live_nxt, other=0)
            if BINARY:
                vals_nxt = vals
            else:
                vals_nxt = tl.load(val_base + nxt, mask=live_nxt, other=0.0)
            acc0, acc1, l_i, m_i = _fd_packed_tile(
                acc0, acc1, l_i, m_i, q0, q1, kf_base, vf_base, N_TXT + keys, live, vals, offs_m, offs_d0, offs_d1,
                skf_n, skf_d, svf_n, svf_d, qk_scale, sc, omega, N_TXT, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D,
                BINARY, MIXED_TXT, False, DOT_DTYPE, IEEE, EMPTY_ROWS, RAW_MAX)
            keys, vals = keys_nxt, vals_nxt
        if has_tail:  # its indices were read ahead by the last full tile (or before the loop)
            live = n_full * BLOCK_N_FD + offs_f < n_live
            acc0, acc1, l_i, m_i = _fd_packed_tile(
                acc0, acc1, l_i, m_i, q0, q1, kf_base, vf_base, N_TXT + keys, live, vals, offs_m, offs_d0, offs_d1,
                skf_n, skf_d, svf_n, svf_d, qk_scale, sc, omega, N_TXT, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D,
                BINARY, MIXED_TXT, True, DOT_DTYPE, IEEE, EMPTY_ROWS, RAW_MAX)
    else:
        # "scale" mode (every FD image key counts, logit = omega * m * s), or "bias" mode with no mask
        # (m = 1 everywhere: logit = s + omega): all FD image keys in order.
        m_base = MASK + off_b * sm_b
        n_tiles = tl.where(has_img_rows, tl.cdiv(n_img, BLOCK_N), 0)
        for t in range(0, n_tiles):
            keys = t * BLOCK_N + offs_n
            ok = keys < n_img
            rows = N_TXT + keys
            qk = _scores(q0, q1, kf_base, rows, ok, offs_d0, offs_d1, skf_n, skf_d, qk_scale,
                         HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, True, DOT_DTYPE, IEEE, RAW_MAX)
            # The logits are formed here per element (sc 1, no shift in _accumulate). "scale" mode: logit =
            # omega * m * s per key, the scale joining each key's factor (one multiply per element). "bias" mode
            # with no mask: logit = s + omega, the same operations as the float packed loop with m = 1 (so that
            # no mask and an all-ones float mask give identical results), the scale applied in its add.
            if SCALE_MODE:
                if HAS_MASK:
                    w = (omega * sc) * tl.load(m_base + keys, mask=ok, other=0.0)
                else:
                    w = tl.full([BLOCK_N], omega * sc, dtype=tl.float32)
                qk = tl.where(ok[None, :], qk * w[None, :], float("-inf"))
            else:
                qk = tl.where(ok[None, :], tl.fma(qk, sc, omega), float("-inf"))
            if MIXED_TXT:
                qk = tl.where((offs_m >= N_TXT)[:, None], qk, float("-inf"))
            acc0, acc1, l_i, m_i = _accumulate(acc0, acc1, l_i, m_i, qk, 1.0, None, vf_base, rows, ok,
                                               offs_d0, offs_d1, svf_n, svf_d, HEAD_DIM, BLOCK_D0, BLOCK_D1,
                                               SPLIT_D, True, DOT_DTYPE, IEEE, EMPTY_ROWS)
    if COUNT_TILES:  # introspection: FD key tiles this program visited (the FD part's, under split-KV)
        at = VISITED + (off_b * H + off_h) * tl.cdiv(NQ, BLOCK_M) + pid_m
        if SPLIT_KV and not FD_ONLY:
            tl.store(at, n_tiles, mask=part == 1)
        else:
            tl.store(at, n_tiles)

    o_base = OUT + off_b * so_b + off_h * so_h + part * so_p
    if SPLIT_KV:
        # A part that saw no key (the FD part of text rows, an empty mask) writes 0 and LSE -inf: weight 0 in
        # the merge, where acc / 0 would be a NaN that 0 * NaN keeps.
        l_div = tl.where(l_i > 0, l_i, 1.0)
    else:
        l_div = l_i
    _store_rows(o_base, offs_m, offs_d0, so_n, so_d, NQ, acc0 / l_div[:, None], HEAD_DIM)
    if SPLIT_D:
        _store_rows(o_base, offs_m, offs_d1, so_n, so_d, NQ, acc1 / l_div[:, None], HEAD_DIM)
    if WRITE_LSE:
        lse = (m_i + tl.math.log2(l_div)) * 0.6931471805599453  # back to natural log
        if SPLIT_KV:
            lse = tl.where(l_i > 0, lse, float("-inf"))
        tl.store(LSE + part * sl_p + ((off_b * H + off_h) * NQ + offs_m), lse, mask=offs_m < NQ)


@triton.jit
def _merge_rows(P0, P1, L0, L1, OUT, LSE, off_b, off_h, offs_m, s0_b, s0_h, s0_n, s0_d, s1_b, s1_h, s1_n,
                l0_b, l0_h, l0_n, l1_b, l1_h, so_b, so_h, so_n, H, NQ,
                HEAD_DIM: tl.constexpr, COL: tl.constexpr, WIDTH: tl.constexpr, WRITE_LSE: tl.constexpr):
    """Rows ``offs_m``, columns [COL, COL + WIDTH) of the merge (``_merge_kernel``). Columns past HEAD_DIM (a
    padded piece) are masked; a piece within the head dim carries the row mask alone, so its loads and stores
    are whole 16-byte vectors where the rows are aligned."""
    row_ok = offs_m < NQ
    offs_d = COL + tl.arange(0, WIDTH)
    if COL + WIDTH > HEAD_DIM:
        ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    else:
        ok = row_ok[:, None]
    lse0 = tl.load(L0 + off_b * l0_b + off_h * l0_h + offs_m * l0_n, mask=row_ok, other=0.0)
    lse1 = tl.load(L1 + off_b * l1_b + off_h * l1_h + offs_m, mask=row_ok, other=float("-inf"))
    top = tl.maximum(lse0, lse1)
    w0 = tl.exp(lse0 - top)
    w1 = tl.exp(lse1 - top)
    total = w0 + w1
    o0 = tl.load(P0 + off_b * s0_b + off_h * s0_h + offs_m[:, None] * s0_n + offs_d[None, :] * s0_d, mask=ok,
                 other=0.0).to(tl.float32)
    o1 = tl.load(P1 + off_b * s1_b + off_h * s1_h + offs_m[:, None] * s1_n + offs_d[None, :], mask=ok, other=0.0)
    o = (o0 * (w0 / total)[:, None] + o1 * (w1 / total)[:, None])
    o_at = OUT + off_b * so_b + off_h * so_h + offs_m[:, None] * so_n + offs_d[None, :]
    tl.store(o_at, o.to(OUT.dtype.element_ty), mask=ok)
    if WRITE_LSE:
        tl.store(LSE + (off_b * H + off_h) * NQ + offs_m, top + tl.log(total), mask=row_ok)


@triton.jit
def _merge_kernel(P0, P1, L0, L1, OUT, LSE,
                  s0_b, s0_h, s0_n, s0_d, s1_b, s1_h, s1_n, l0_b, l0_h, l0_n, l1_b, l1_h,
                  so_b, so_h, so_n, H, NQ,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, WRITE_LSE: tl.constexpr,
                  D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                  ROWS0: tl.constexpr, ROWS1: tl.constexpr, ROWS2: tl.constexpr,
                  ALIGN: tl.constexpr, ALIGN_P1: tl.constexpr, ALIGN_OUT: tl.constexpr):
    """The merge of a PD part and an FD part of attention: out = sum over the parts of exp(lse_part - lse) *
    out_part, lse the log-sum-exp of the parts' LSEs (natural log). Part 0 (PD keys) always has a finite LSE;
    part 1 (FD keys, fp32, token stride s1_n, unit head-dim and token LSE strides) may be -inf (weight 0:
    FLUX text rows, an empty mask row), which gives part 0 exactly. Part 0 is split-KV's fp32 partial or the
    output of torch's SDPA (q's dtype, any strides) with its fp32 LSE (any strides: flash and cuDNN
    ``[B, H, Nq]`` / ``[B, H, Nq, 1]``, efficient padded past Nq, the CPU kernel ``[B, Nq, H]`` memory).
    The head dim is covered by up to three power-of-two pieces D0 > D1 > D2 (0: none) that add up to it
    (40 = 32 + 8, 72 = 64 + 8, 80 = 64 + 16, 160 = 128 + 32), so no piece needs a column mask and each row
    segment is whole 16-byte vectors; a head dim that does not split so is one padded, masked piece. Each
    piece runs over the program's BLOCK_M rows in blocks of ROWSi rows: enough rows for a 16-byte vector per
    thread in the narrowest piece, at most about 32 elements a thread and tensor in the widest.
    ALIGN / ALIGN_P1 / ALIGN_OUT: the launcher checked that part 0's / part 1's / out's batch/head/token strides
    are multiples of that many elements and their bases 16-byte aligned (16-byte rows; diffusers' head stride
    of 40 is not a multiple of 16, all Triton's specialization can see); 1 where it needs no hint."""
    if ALIGN > 1:
        s0_b, s0_h, s0_n = _aligned(s0_b, ALIGN), _aligned(s0_h, ALIGN), _aligned(s0_n, ALIGN)
    if ALIGN_P1 > 1:
        s1_b, s1_h, s1_n = _aligned(s1_b, ALIGN_P1), _aligned(s1_h, ALIGN_P1), _aligned(s1_n, ALIGN_P1)
    if ALIGN_OUT > 1:
        so_b, so_h, so_n = _aligned(so_b, ALIGN_OUT), _aligned(so_h, ALIGN_OUT), _aligned(so_n, ALIGN_OUT)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    m0 = tl.program_id(0) * BLOCK_M
    for r in tl.static_range(0, BLOCK_M, ROWS0):
        _merge_rows(P0, P1, L0, L1, OUT, LSE, off_b, off_h, m0 + r + tl.arange(0, ROWS0), s0_b, s0_h, s0_n, s0_d,
                    s1_b, s1_h, s1_n, l0_b, l0_h, l0_n, l1_b, l1_h, so_b, so_h, so_n, H, NQ,
                    HEAD_DIM, 0, D0, WRITE_LSE)
    if D1 > 0:
        for r in tl.static_range(0, BLOCK_M, ROWS1):
            _merge_rows(P0, P1, L0, L1, OUT, LSE, off_b, off_h, m0 + r + tl.arange(0, ROWS1), s0_b, s0_h, s0_n,
                        s0_d, s1_b, s1_h, s1_n, l0_b, l0_h, l0_n, l1_b, l1_h, so_b, so_h, so_n, H, NQ,
                        HEAD_DIM, D0, D1, False)
    if D2 > 0:
        for r in tl.static_range(0, BLOCK_M, ROWS2):
            _merge_rows(P0, P1, L0, L1, OUT, LSE, off_b, off_h, m0 + r + tl.arange(0, ROWS2), s0_b, s0_h, s0_n,
                        s0_d, s1_b, s1_h, s1_n, l0_b, l0_h, l0_n, l1_b, l1_h, so_b, so_h, so_n, H, NQ,
                        HEAD_DIM, D0 + D1, D2, False)


# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when this module is imported: fixed from then on.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if _INTERPRETING:
    from . import interpreter_compat

    interpreter_compat.apply()  # Triton < 3.7's interpreter with numpy >= 2.4


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1 when triton was imported)."""
    return _INTERPRETING


@functools.lru_cache(maxsize=None)
def head_dim_split(head_dim: int) -> tuple[int, int]:
    """Cover the head dim with one or two power-of-two blocks (each >= 16, as tl.dot needs):
    (block_d0, block_d1), block_d1 == 0 for one block. Two blocks only when they pad less than one."""
    single = max(16, triton.next_power_of_2(head_dim))
    d0 = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - d0
    if rest <= 0:
        return single, 0
    d1 = max(16, triton.next_power_of_2(rest))
    return (d0, d1) if d0 + d1 < single else (single, 0)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a jit function: ~2 us a call from the host


HOPPER_SMS = 132  # H100 SXM / H200; the grid-size rule uses the real count on CUDA


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def tile_config(d_padded: int, elem_bytes: int, n_q: int, heads: int, batch: int,
                sm_count: int = HOPPER_SMS) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the compiled kernel.

    Chosen from sm_90 offline compiles (``python -m freecure_ops.bench.compile_report``, checked in CI by
    tests/test_kernel_compile.py): fp16/bf16 never spill, shared memory stays under the 227 KB per-block limit,
    both key loops keep a 3-deep K/V ring. 128-row query tiles need 8 warps (4 spill in "bias" mode); 128-key
    tiles spill at 128 rows in the float (per-key value) FD loop only: the binary FD loop and the PD loop fit
    128 keys without spills (the binary loop alone at 128 keys, ``fasa_fwd(fd_block_n=128)``, is 21-25% fewer
    instructions per 64 FD keys up to head dim 128, off by default until the GPU sweep's "bin-fd128" says
    where it pays; head dim 160 exceeds shared memory at 128 FD keys); 64-row tiles of head dim 128 need 8 warps. Query tiles of 64 rows when 128
    would leave fewer than two waves of programs on the device (one image per guidance half: SD1.5's
    1024-token layers are 64 programs of 128 rows for 132 SMs). fp32 (IEEE dots, a correctness path, not a
    fast one) takes small tiles to fit. Speed on a real card is for the GPU sweep (bench/tile_sweep.py) to
    confirm.
    """
    if elem_bytes == 4:
        return 64, 32, 8, 2
    if d_padded > 192:
        return 64, 32, 8, 3
    if d_padded > 128:
        return 64, 64, 8, 3
    if _cdiv(n_q, 128) * heads * batch < 2 * sm_count:
        return 64, 64, 4 if d_padded <= 96 else 8, 3
    return 128, 64, 8, 3


INTERPRETER_CONFIG = (32, 32, 1, 1)  # the interpreter prefers big tiles: fewer, vectorized programs


def vector_elems(tensors, strides, head_dim: int, out: torch.Tensor, elem_bytes: int) -> int:
    """The element count (8 for 2-byte, 4 for 4-byte types) by which every batch/head/token stride and every
    base address of ``tensors`` (whose ``strides`` are given) and of ``out`` are divisible, so that a 16-byte
    row segment starts 16-byte aligned; 1 when any is not, or when a head dim is not unit-stride."""
    vec = 16 // elem_bytes
    if head_dim % vec or out.data_ptr() % 16:  # out is [B, Nq, H, D] memory: its strides are multiples of D
        return 1
    for t, (sb, sh, sn, sd) in zip(tensors, strides):
        if sd != 1 or (sb | sh | sn) % vec or t.data_ptr() % 16:
            return 1
    return vec


MAX_GRID_YZ = 65535  # CUDA grid limit on the head and batch axes
INT32_MAX = 2**31 - 1


def check_launch_limits(heads: int, batch: int, extents) -> None:
    """Refuse, before launch, what the kernel's indexing cannot address: more than 65535 heads or batch
    entries (grid axes), or a [N, D] slice of one (batch, head) whose last element lies beyond int32
    offsets (per-token offsets are int32; batch/head offsets are int64). ``extents``: (name, N, D, token
    stride, head-dim stride) per tensor."""
    if heads > MAX_GRID_YZ or batch > MAX_GRID_YZ:
        raise ValueError(f"q: the Triton kernel takes at most {MAX_GRID_YZ} heads and {MAX_GRID_YZ} batch entries, "
                         f"got H={heads}, B={batch}; split the batch or use backend='torch'")
    for name, n, d, stride_n, stride_d in extents:
        if (n - 1) * abs(stride_n) + (d - 1) * abs(stride_d) > INT32_MAX:
            raise ValueError(f"{name}: {n} tokens at token stride {stride_n} exceed the kernel's int32 offsets "
                             "within one (batch, head); use backend='torch' or a layout with a smaller token stride")


_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


_ARG_NAMES = ("q", "k_p", "v_p", "k_f", "v_f")


def merge_pieces(head_dim: int, vec: int) -> tuple[int, ...]:
    """The merge's column pieces: the head dim as at most three powers of two, widest first, when it is a
    multiple of ``vec`` (elements per 16 bytes of the output), e.g. 40 -> (32, 8); else one padded piece."""
    pieces = tuple(1 << b for b in reversed(range(head_dim.bit_length())) if head_dim >> b & 1)
    if head_dim % vec or len(pieces) > 3:
        return (max(16, triton.next_power_of_2(head_dim)),)
    return pieces


MERGE_WARPS = 4


def _merge_plan(out0, lse0, out1, lse1, out, lse, interpret: bool):
    """(grid, args, keyword args) of ``_merge_kernel`` combining part 0 (``out0`` ``[B, H, Nq, D]``, any float
    dtype and strides; ``lse0`` ``[B, H, Nq]`` fp32, any strides) with part 1 (``out1`` fp32 with a unit
    head-dim stride, ``lse1`` fp32 with a unit token stride) into ``out`` (``[B, Nq, H, D]`` memory) and
    ``lse`` (contiguous, or None)."""
    batch, heads, n_q, head_dim = out.shape
    pieces = merge_pieces(head_dim, 16 // out.element_size())
    threads = 32 * MERGE_WARPS
    if interpret:
        merge_bm, rows = 32, (32,) * len(pieces)
    else:
        # Rows for a 16-byte vector of the output per thread in every piece (threads * 16 bytes per piece: a
        # thread holds at most a program's elements over the threads, so fewer rows give narrower stores),
        # and at least the 32 elements a thread of one padded [rows, next_pow2(D)] tile used to hold; each
        # piece then walks those rows in blocks of about 32 elements a thread and tensor.
        need = [threads * 16 // (w * out.element_size()) for w in pieces]
        merge_bm = max(16, *need, threads * 32 // max(16, triton.next_power_of_2(head_dim)))
        rows = tuple(min(merge_bm, max(n, threads * 32 // w)) for n, w in zip(need, pieces))
    pieces, rows = pieces + (0,) * (3 - len(pieces)), rows + (merge_bm,) * (3 - len(rows))

    def align(t, strides, elems: int) -> int:
        """16-byte rows: unit head-dim stride, aligned base, batch/head/token strides multiples of ``elems``. 1
        where Triton's own specialization sees it (every stride a multiple of 16): the hint would cost a few
        integer instructions for nothing."""
        ok = (head_dim % elems == 0 and strides[3] == 1 and not (strides[0] | strides[1] | strides[2]) % elems
              and t.data_ptr() % 16 == 0)
        return elems if ok and (strides[0] | strides[1] | strides[2]) % 16 else 1

    return ((_cdiv(n_q, merge_bm), heads, batch),
            (out0, out1, lse0, lse1, out, out if lse is None else lse, *out0.stride(), *out1.stride()[:3],
             *lse0.stride(), *lse1.stride()[:2], n_q * heads * head_dim, head_dim, heads * head_dim, heads, n_q),
            dict(HEAD_DIM=head_dim, BLOCK_M=merge_bm, WRITE_LSE=lse is not None, D0=pieces[0], D1=pieces[1],
                 D2=pieces[2], ROWS0=rows[0], ROWS1=rows[1], ROWS2=rows[2],
                 ALIGN=align(out0, out0.stride(), 16 // out0.element_size()),
                 ALIGN_P1=align(out1, out1.stride(), 16 // out1.element_size()),
                 ALIGN_OUT=align(out, (n_q * heads * head_dim, head_dim, heads * head_dim, 1),
                                 16 // out.element_size()),
                 num_warps=MERGE_WARPS))


# ------------------------------------------------------------------ the PD part by torch's own SDPA kernels
# PD keys are plain attention, so torch's fastest fused SDPA kernel that returns the log-sum-exp can do them
# (fasa_fwd's ``pd_sdpa``), leaving the gathered FD keys to this kernel and the two parts to _merge_kernel.
# Preference on CUDA: cuDNN (the fastest forward on Hopper: FlashAttention-3 paper's H100 anchors, NOTES.md),
# then flash (FA2), then the memory-efficient kernel (the one that takes fp32). Whether each takes a call is
# torch's own decision (``torch._fused_sdp_choice`` with that backend alone enabled: dtype, head dim, strides,
# device capability, cuDNN version), with head dims a multiple of 8 and at most 256 on top (the raw ops do not
# pad the head dim as SDPA does). The CPU has one: ``_scaled_dot_product_flash_attention_for_cpu``.
# Every LSE is natural-log, the domain the kernel's LSE and the merge use.
PD_SDPA_CUDA = ("cudnn", "flash", "efficient")
PD_SDPA_OPS = PD_SDPA_CUDA + ("flash_cpu",)
# Our own PD kernel in Gluon (kernels/fasa_pd_gluon.py): asked for by name only ("auto" never picks it) until a
# GPU run shows where it beats cuDNN.
PD_GLUON = "gluon"


def _gluon_takes(q, k, v, scale: float) -> bool:
    """The Gluon PD kernel takes the call: CUDA on sm_90, a Triton with Gluon's Hopper API (3.6+), and what
    ``fasa_pd_gluon.supports`` accepts (fp16/bf16, head dim 64/128, TMA's 16-byte strides)."""
    if q.device.type != "cuda" or not scale > 0 or torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    try:
        from . import fasa_pd_gluon
    except ImportError:  # a Triton without Gluon (before 3.6)
        return False
    return fasa_pd_gluon.supports(q, k, v)


def _sdp_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "flash_cpu": SDPBackend.FLASH_ATTENTION}[name]


_SDP_FLAGS = {"cudnn": "cudnn_sdp_enabled", "flash": "flash_sdp_enabled", "efficient": "mem_efficient_sdp_enabled",
              "flash_cpu": "flash_sdp_enabled"}


def _torch_takes(name: str, q, k, v, scale: float) -> bool:
    """Would torch's SDPA dispatch (q, k, v) to backend ``name`` with it alone enabled? (No host sync: shape,
    dtype, stride and device checks only; the reasons it logs when it refuses are silenced.)"""
    import warnings

    from torch.nn.attention import sdpa_kernel

    backend = _sdp_backend(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if name == "flash_cpu":  # the CPU has flash and math only: SDPA's own pick
                return torch._fused_sdp_choice(q, k, v, scale=scale) == int(backend.value)
            with sdpa_kernel([backend]):
                return torch._fused_sdp_choice(q, k, v, scale=scale) == int(backend.value)
        except Exception:  # a torch without the backend, or one that raises instead of refusing
            return False


_PD_SDPA_PICKS: dict = {}


def pd_sdpa_op(q, k_p, v_p, scale: float, want="auto") -> str | None:
    """The torch SDPA kernel that computes the PD part of this call for ``fasa_fwd(..., pd_sdpa=...)``
    (``"cudnn"``, ``"flash"``, ``"efficient"`` on CUDA; ``"flash_cpu"`` on the CPU), or None where none takes
    it (``fasa_fwd`` then runs its own launch). ``want``: "auto" (the first of cuDNN, flash, efficient that is
    enabled in ``torch.backends.cuda`` and takes the call), one of those names, or ``"gluon"`` (our Gluon
    kernel, :func:`_gluon_takes`); a name gives None unless that kernel takes the call. A softmax scale <= 0 is
    left to the kernel. Decided once per (device, dtype, shapes, strides, 16-byte alignment, enabled backends)
    and remembered: no host sync, a dict lookup per call."""
    if not scale > 0:
        return None
    dev = q.device
    if want == PD_GLUON:
        names = flags = ()  # our own kernel: no torch backend switch applies
    else:
        names = ("flash_cpu",) if dev.type == "cpu" else PD_SDPA_CUDA if want == "auto" else (want,)
        if dev.type not in ("cpu", "cuda") or (dev.type == "cuda" and not set(names) <= set(PD_SDPA_CUDA)):
            return None
        flags = tuple(getattr(torch.backends.cuda, _SDP_FLAGS[n])() for n in names)
    key = (want, dev, q.dtype, q.shape, k_p.shape, q.stride(), k_p.stride(), v_p.stride(), flags,
           q.data_ptr() % 16, k_p.data_ptr() % 16, v_p.data_ptr() % 16)
    pick = _PD_SDPA_PICKS.get(key, False)
    if pick is False:
        head_dim = q.shape[-1]
        if want == PD_GLUON:
            pick = PD_GLUON if _gluon_takes(q, k_p, v_p, scale) else None
        else:
            pick = next((n for n, on in zip(names, flags) if on and (n == "flash_cpu" or (head_dim % 8 == 0 and
                         head_dim <= 256)) and _torch_takes(n, q, k_p, v_p, scale)), None)
        if len(_PD_SDPA_PICKS) > 1024:  # bounded like an autotune cache: a long-running server sees many shapes
            _PD_SDPA_PICKS.clear()
        _PD_SDPA_PICKS[key] = pick
    return pick


def pd_attention(q, k_p, v_p, scale: float, op: str):
    """Attention of q over the PD keys by torch's SDPA kernel ``op`` (from :func:`pd_sdpa_op`): ``(out, lse)``,
    out ``[B, H, Nq, D]`` in q's dtype (the kernel's own layout), lse the fp32 natural-log log-sum-exp as a
    ``[B, H, Nq]`` view (cuDNN's ``[B, H, Nq, 1]`` and the efficient kernel's padded ``[B, H, 32 * ceil(Nq / 32)]``
    viewed down, never copied)."""
    aten = torch.ops.aten
    if op == "cudnn":
        out, lse = aten._scaled_dot_product_cudnn_attention(q, k_p, v_p, None, True, 0.0, False, False,
                                                             scale=scale)[:2]
    elif op == "flash":
        out, lse = aten._scaled_dot_product_flash_attention(q, k_p, v_p, 0.0, False, False, scale=scale)[:2]
    elif op == "efficient":
        out, lse = aten._scaled_dot_product_efficient_attention(q, k_p, v_p, None, True, 0.0, False,
                                                                 scale=scale)[:2]
    elif op == "flash_cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k_p, v_p, 0.0, False, scale=scale)
    elif op == PD_GLUON:
        from .fasa_pd_gluon import pd_attention_gluon

        return pd_attention_gluon(q, k_p, v_p, scale)
    else:
        raise ValueError(f"unknown PD SDPA op {op!r}; one of {PD_SDPA_OPS + (PD_GLUON,)}")
    if lse.dim() == 4:
        lse = lse[..., 0]
    return out, lse[..., :q.shape[2]]


def launch_plan(q, k_p, k_f, v_p, v_f, mask, *, scale: float, omega: float, mode: str, n_txt: int,
                return_lse: bool, config: tuple, interpret: bool, visited: torch.Tensor | None = None,
                binary: bool = False, split_kv: bool = False, pd_part: tuple | None = None,
                fd_block_n: int | None = None):
    """(grid, positional args, keyword args, out, lse, merge) of the kernel launch for validated inputs and a
    tile config ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``; allocates the outputs (``lse`` is None unless
    asked for). ``binary``: the FD loop adds one scalar bias per mask row (valid only when every live value
    of each mask row is equal; "bias" mode with a mask, else ignored). ``split_kv``: PD and FD keys in
    separate programs writing fp32 partials; ``merge`` is then the (grid, args, keyword args) of
    ``_merge_kernel``, which writes ``out``/``lse``, else None. ``pd_part``: ``(out_pd, lse_pd)``, attention over
    the PD keys computed elsewhere (torch's SDPA: ``[B, H, Nq, D]`` in any float dtype and strides, its fp32
    natural-log LSE ``[B, H, Nq]``, any strides): the kernel runs the FD part alone (split-KV's FD program, one
    per query block) and ``merge`` combines it with ``pd_part``; ``split_kv`` is then ignored. Also what the
    ``fd_block_n``: the packed FD loop's key-tile size (BLOCK_N_FD; None: the config's BLOCK_N), e.g. 128-key
    tiles for the binary loop with the PD loop at 64 (bench/COMPILE.md). Also what the
    offline compile check feeds to
    Triton's own specialization, so that it compiles exactly what a launch gets. Kept lean: it runs on every
    call (host cost, see the README)."""
    batch, heads, n_q, head_dim = q.shape
    tensors = (q, k_p, v_p, k_f, v_f)
    strides = [t.stride() for t in tensors]
    check_launch_limits(heads, batch, [(name, t.shape[2], head_dim, st[2], st[3])
                                       for name, t, st in zip(_ARG_NAMES, tensors, strides)])
    block_d0, block_d1 = head_dim_split(head_dim)
    bm, bn, warps, stages = config
    out = torch.empty(batch, n_q, heads, head_dim, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(batch, heads, n_q, device=q.device, dtype=torch.float32) if return_lse else None
    m_blocks = _cdiv(n_q, bm)
    fd_only = pd_part is not None
    split_kv = split_kv and not fd_only
    grid = (2 * m_blocks if split_kv else m_blocks, heads, batch)
    if visited is not None and (visited.dtype != torch.int32 or tuple(visited.shape) != (batch, heads, m_blocks)
                                or not visited.is_contiguous()):
        raise ValueError(f"visited must be a contiguous int32 tensor of shape {(batch, heads, m_blocks)}")
    packed = mode == "bias" and mask is not None  # "scale" mode excludes no key: nothing to pack
    mask = getattr(mask, "_parts", mask)  # a FasaMask's own tensors: its public ones are copies, made per read
    rows = q if mask is None else mask.rows  # an unread placeholder pointer when there is no mask
    row_stride = 0 if mask is None or mask.rows.shape[0] == 1 else mask.rows.stride(0)
    # bf16 tl.dot is wrong in the CPU interpreter (fp32/fp16 are right): upcast there only.
    dot_dtype = tl.float32 if (interpret and q.dtype == torch.bfloat16) else _DOT_DTYPES[q.dtype]
    merge = None
    if pd_part is not None:
        # The FD part alone, into an fp32 partial [B, H, Nq, D] and its LSE [B, H, Nq]; the merge takes the PD
        # part from torch's SDPA (pd_part: its output and LSE; see pd_sdpa). Strides are multiples of D, so
        # the alignment proved for out holds for them.
        part = torch.empty(batch, heads, n_q, head_dim, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(batch, heads, n_q, device=q.device, dtype=torch.float32)
        o_ptr, l_ptr = part, part_lse
        o_strides = (*part.stride(), 0, 0)
        merge = _merge_plan(pd_part[0], pd_part[1], part, part_lse, out, lse, interpret)
    elif split_kv:
        # fp32 partials [part, B, H, Nq, D] and their LSEs [part, B, H, Nq]; strides are multiples of D, so
        # the alignment proved for out holds for them.
        part = torch.empty(2, batch, heads, n_q, head_dim, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(2, batch, heads, n_q, device=q.device, dtype=torch.float32)
        o_ptr, l_ptr = part, part_lse
        o_strides = (*part.stride()[1:], part.stride(0), part_lse.stride(0))
        merge = _merge_plan(part[0], part_lse[0], part[1], part_lse[1], out, lse, interpret)
    else:
        o_ptr, l_ptr = out, out if lse is None else lse
        o_strides = (n_q * heads * head_dim, head_dim, heads * head_dim, 1, 0, 0)  # out's [B, Nq, H, D] memory
    args = (
        *tensors, rows,
        mask.fd_index if packed else rows, mask.fd_value if packed else rows, mask.fd_count if packed else rows,
        o_ptr, l_ptr, out if visited is None else visited,
        *strides[0], *strides[1], *strides[2], *strides[3], *strides[4], *o_strides,
        row_stride, 0 if row_stride == 0 else 1,
        heads, n_q, k_p.shape[2], k_f.shape[2], n_txt,
        scale * LOG2E, omega if mode == "scale" else omega * LOG2E,
    )
    meta = dict(
        HEAD_DIM=head_dim, BLOCK_D0=block_d0, BLOCK_D1=max(block_d1, 16), SPLIT_D=block_d1 > 0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_N_FD=bn if not (packed and fd_block_n) else fd_block_n, ALIGN=vector_elems(tensors, strides, head_dim, out, q.element_size()),
        SCALE_MODE=mode == "scale", FD_PACKED=packed, HAS_MASK=mask is not None, MIXED_TXT=n_txt % bm != 0,
        BINARY=packed and binary, SPLIT_KV=split_kv or fd_only, FD_ONLY=fd_only, RAW_MAX=scale > 0,
        WRITE_LSE=return_lse or split_kv or fd_only, COUNT_TILES=visited is not None, DOT_DTYPE=dot_dtype,
        IEEE=q.dtype == torch.float32, num_warps=warps, num_stages=stages,
    )
    return grid, args, meta, out, lse, merge


def fasa_fwd(q, k_p, k_f, v_p, v_f, mask=None, *, scale: float, omega: float, mode: str, n_txt: int,
             return_lse: bool = False, block_m: int | None = None, block_n: int | None = None,
             num_warps: int | None = None, num_stages: int | None = None, visited: torch.Tensor | None = None,
             binary: bool | None = None, split_kv: bool = False, pd_sdpa: bool | str = False,
             fd_block_n: int | None = None):
    """Launch the kernel on validated inputs.

    ``mask``: None (every FD image key has m = 1), or a prepared mask: any object with ``rows`` (float32
    ``[R, Nimg]``, R = 1 shared or B), ``fd_index`` (int32 ``[R, Nimg]``, live keys first), ``fd_value``
    (float32 ``[R, Nimg]``) and ``fd_count`` (int32 ``[R]``), all contiguous on q's device
    (``freecure_ops.prepare_fasa_mask`` builds one), and optionally ``binary`` (True: every live value of a
    mask row is equal, as in a bool mask).
    Returns ``out`` laid out as ``[B, Nq, H, D]`` memory viewed as ``[B, H, Nq, D]`` (so that
    ``out.transpose(1, 2).reshape(B, Nq, H * D)`` is free) and, if asked, the fp32 LSE ``[B, H, Nq]``.
    ``block_m``/``block_n``/``num_warps``/``num_stages`` override the tile table (tests, sweeps).
    ``binary``: None takes the mask's ``binary`` (absent: False); False forces the per-key value loop; True
    asserts a binary mask (a caller that knows; wrong results if it is not).
    ``split_kv``: PD and FD keys in separate programs, merged by LSE in a second launch (more programs for
    grids under one wave; the GPU tile sweep says where it pays).
    ``pd_sdpa``: the PD keys by torch's fastest fused SDPA kernel that returns the LSE (True or "auto": cuDNN,
    else flash, else efficient on CUDA; the CPU kernel under the interpreter; or one of those names,
    :func:`pd_sdpa_op`; or "gluon": our Gluon kernel, Hopper only, never picked by "auto"), the FD keys by this
    kernel's FD program alone (fp32 partial + LSE), merged by LSE.
    Where no such kernel takes the call (an odd head dim, a non-unit head-dim stride, a scale <= 0) the
    launch is the one without ``pd_sdpa``. Off by default until GPU timings say where it pays.
    ``fd_block_n``: the key-tile size of the packed FD loop ("bias" mode with a mask) alone, a power of two
    >= 16 (None: ``block_n``/the table's). 128 with the binary loop is a variant the GPU tile sweep times
    ("bin-fd128"); off by default until GPU timings say where it pays.
    ``visited``: an int32 tensor ``[B, H, cdiv(Nq, BLOCK_M)]`` that receives the FD key tiles each program
    visited (introspection; tiles of the FD loop's size).
    """
    interpret = interpreting()
    if interpret:
        config = INTERPRETER_CONFIG
    else:
        batch, heads, n_q, head_dim = q.shape
        d0, d1 = head_dim_split(head_dim)
        sms = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device())
        config = tile_config(d0 + d1, q.element_size(), n_q, heads, batch, sms)
    if block_m or block_n or num_warps or num_stages:
        config = tuple(o or c for o, c in zip((block_m, block_n, num_warps, num_stages), config))
    if binary is None:
        binary = bool(getattr(mask, "binary", False))
    pd_part = None
    if pd_sdpa:
        op = pd_sdpa_op(q, k_p, v_p, scale, "auto" if pd_sdpa is True else pd_sdpa)
        if op is not None:
            pd_part = pd_attention(q, k_p, v_p, scale, op)
    grid, args, meta, out, lse, merge = launch_plan(
        q, k_p, k_f, v_p, v_f, mask, scale=scale, omega=omega, mode=mode, n_txt=n_txt, return_lse=return_lse,
        config=config, interpret=interpret, visited=visited, binary=binary, split_kv=split_kv, pd_part=pd_part,
        fd_block_n=fd_block_n)
    _fasa_fwd_kernel[grid](*args, **meta)
    if merge is not None:
        _merge_kernel[merge[0]](*merge[1], **merge[2])
    return (out, lse) if return_lse else out
