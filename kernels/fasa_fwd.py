"""Fused FASA forward: flash attention over [PD keys, masked FD keys] with no concatenation.

One program per (query block, head, batch). Online softmax in fp32 in the log2 domain. Two key loops:
  1. PD keys: plain attention; full tiles carry no masking, a final partial tile masks its tail.
  2. FD keys from ``n_txt`` on: the mask tile is loaded and the bias/exclusion ("bias" mode) or the
     per-key logit scale ("scale" mode) is applied in registers. In "bias" mode a tile whose mask is all
     zero cannot contribute: the loop runs over a precomputed list of live tiles only, so excluded
     tiles are never loaded and the loop body stays branch-free (pipelined).
Nothing of size Nq x Nk is ever written to memory. The launcher expects validated inputs
(``freecure_ops.validation``) and does no checking of its own beyond what the launch needs.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from freecure_ops.tensor_memo import TensorMemo
from freecure_ops.validation import mask_as_rows

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:  # fp32 inputs: full fp32 products like torch's fp32 matmul (no TF32)
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _load_rows(base, rows, cols, stride_n, stride_d, n_end, HEAD_DIM: tl.constexpr, CHECK_N: tl.constexpr,
               CHECK_D: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Load the [rows, cols] tile of an [N, HEAD_DIM] matrix; rows >= n_end and cols >= HEAD_DIM read as
    zero. A bound is checked only where the tile can cross it (CHECK_N, CHECK_D are compile-time)."""
    ptrs = base + rows[:, None] * stride_n + cols[None, :] * stride_d
    if CHECK_N and CHECK_D:
        t = tl.load(ptrs, mask=(rows < n_end)[:, None] & (cols < HEAD_DIM)[None, :], other=0.0)
    elif CHECK_N:
        t = tl.load(ptrs, mask=(rows < n_end)[:, None], other=0.0)
    elif CHECK_D:
        t = tl.load(ptrs, mask=(cols < HEAD_DIM)[None, :], other=0.0)
    else:
        t = tl.load(ptrs)
    return t.to(DOT_DTYPE)


@triton.jit
def _scores(q0, q1, k_base, cols, offs_d0, offs_d1, stride_n, stride_d, n_end, qk_scale,
            HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, SPLIT_D: tl.constexpr,
            CHECK_N: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr):
    """log2-domain scores q k^T * scale of one key tile, the head dim split in two pow2 parts."""
    k0 = _load_rows(k_base, cols, offs_d0, stride_n, stride_d, n_end, HEAD_DIM, CHECK_N,
                    BLOCK_D0 > HEAD_DIM, DOT_DTYPE)
    qk = _dot(q0, tl.trans(k0), IEEE)
    if SPLIT_D:
        k1 = _load_rows(k_base, cols, offs_d1, stride_n, stride_d, n_end, HEAD_DIM, CHECK_N,
                        BLOCK_D0 + BLOCK_D1 > HEAD_DIM, DOT_DTYPE)
        qk += _dot(q1, tl.trans(k1), IEEE)
    return qk * qk_scale


@triton.jit
def _accumulate(acc0, acc1, l_i, m_i, qk, v_base, cols, offs_d0, offs_d1, stride_n, stride_d, n_end,
                HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, SPLIT_D: tl.constexpr,
                CHECK_N: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr):
    """Fold one tile of log2-domain logits [M, N] and its values into the online-softmax state."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(DOT_DTYPE)
    v0 = _load_rows(v_base, cols, offs_d0, stride_n, stride_d, n_end, HEAD_DIM, CHECK_N,
                    BLOCK_D0 > HEAD_DIM, DOT_DTYPE)
    acc0 = acc0 * alpha[:, None] + _dot(p, v0, IEEE)
    if SPLIT_D:
        v1 = _load_rows(v_base, cols, offs_d1, stride_n, stride_d, n_end, HEAD_DIM, CHECK_N,
                        BLOCK_D0 + BLOCK_D1 > HEAD_DIM, DOT_DTYPE)
        acc1 = acc1 * alpha[:, None] + _dot(p, v1, IEEE)
    return acc0, acc1, l_i, m_new


@triton.jit
def _fd_tile(acc0, acc1, l_i, m_i, q0, q1, kf_base, vf_base, m_base, start_n, offs_m, offs_n, offs_d0, offs_d1,
             skf_n, skf_d, svf_n, svf_d, NF, N_TXT, qk_scale, omega,
             HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, SPLIT_D: tl.constexpr,
             SCALE_MODE: tl.constexpr, HAS_TXT: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr):
    """Fold the FD key tile starting at ``start_n`` in, its mask applied in registers."""
    cols = start_n + offs_n
    mvals = tl.load(m_base + cols, mask=cols < NF, other=0.0)
    qk = _scores(q0, q1, kf_base, cols, offs_d0, offs_d1, skf_n, skf_d, NF, qk_scale,
                 HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, True, DOT_DTYPE, IEEE)
    if SCALE_MODE:
        # logit = omega * m * s (the log2 domain scales alike); keys past the end are excluded.
        qk = tl.where((cols < NF)[None, :], qk * (omega * mvals)[None, :], float("-inf"))
    else:
        # logit = s + omega * m where m > 0 (omega arrives times log2(e)), excluded where m == 0;
        # keys past the end read m = 0.
        qk = tl.where((mvals > 0)[None, :], qk + (omega * mvals)[None, :], float("-inf"))
    if HAS_TXT:  # text query rows see PD keys only
        qk = tl.where((offs_m >= N_TXT)[:, None], qk, float("-inf"))
    return _accumulate(acc0, acc1, l_i, m_i, qk, vf_base, cols, offs_d0, offs_d1, svf_n, svf_d, NF,
                       HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, True, DOT_DTYPE, IEEE)


@triton.jit
def _store_rows(base, rows, cols, stride_n, stride_d, n_end, x, HEAD_DIM: tl.constexpr):
    ptrs = base + rows[:, None] * stride_n + cols[None, :] * stride_d
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=(rows < n_end)[:, None] & (cols < HEAD_DIM)[None, :])


@triton.jit
def _fasa_fwd_kernel(
    Q, KP, VP, KF, VF, MASK, TILES, OUT, LSE,
    sq_b, sq_h, sq_n, sq_d,
    skp_b, skp_h, skp_n, skp_d,
    svp_b, svp_h, svp_n, svp_d,
    skf_b, skf_h, skf_n, skf_d,
    svf_b, svf_h, svf_n, svf_d,
    so_b, so_h, so_n, so_d,
    sm_b, st_b,
    H, NQ, NP, NF, N_TXT,
    qk_scale, omega,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, SPLIT_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SCALE_MODE: tl.constexpr, HAS_TXT: tl.constexpr, SKIP_TILES: tl.constexpr, WRITE_LSE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
):
    # Head dim D = BLOCK_D0 (+ BLOCK_D1 when SPLIT_D), powers of two, the last part zero-padded: 80 = 64 + 16
    # and 160 = 128 + 32 waste nothing, where one padded block (128, 256) would waste 37%. Without a split,
    # BLOCK_D1 only sizes unused placeholders.
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)

    q_base = Q + off_b * sq_b + off_h * sq_h
    q0 = _load_rows(q_base, offs_m, offs_d0, sq_n, sq_d, NQ, HEAD_DIM, True, BLOCK_D0 > HEAD_DIM, DOT_DTYPE)
    if SPLIT_D:
        q1 = _load_rows(q_base, offs_m, offs_d1, sq_n, sq_d, NQ, HEAD_DIM, True, True, DOT_DTYPE)
    else:
        q1 = q0
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)

    # 1. PD keys. Key 0 always exists, so every row's running max is finite after this loop and fully
    #    excluded FD tiles/rows below fold in as exact zeros. Full tiles carry no bound checks.
    kp_base = KP + off_b * skp_b + off_h * skp_h
    vp_base = VP + off_b * svp_b + off_h * svp_h
    np_full = (NP // BLOCK_N) * BLOCK_N
    for start_n in range(0, np_full, BLOCK_N):
        cols = start_n + offs_n
        qk = _scores(q0, q1, kp_base, cols, offs_d0, offs_d1, skp_n, skp_d, NP, qk_scale,
                     HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, False, DOT_DTYPE, IEEE)
        acc0, acc1, l_i, m_i = _accumulate(acc0, acc1, l_i, m_i, qk, vp_base, cols, offs_d0, offs_d1, svp_n,
                                           svp_d, NP, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, False, DOT_DTYPE, IEEE)
    if np_full < NP:
        cols = np_full + offs_n
        qk = _scores(q0, q1, kp_base, cols, offs_d0, offs_d1, skp_n, skp_d, NP, qk_scale,
                     HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, True, DOT_DTYPE, IEEE)
        qk = tl.where((cols < NP)[None, :], qk, float("-inf"))
        acc0, acc1, l_i, m_i = _accumulate(acc0, acc1, l_i, m_i, qk, vp_base, cols, offs_d0, offs_d1, svp_n,
                                           svp_d, NP, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, True, DOT_DTYPE, IEEE)

    # 2. FD image keys [N_TXT, NF). Query blocks made only of text rows have nothing to do here.
    kf_base = KF + off_b * skf_b + off_h * skf_h
    vf_base = VF + off_b * svf_b + off_h * svf_h
    m_base = MASK + off_b * sm_b - N_TXT  # the mask entry of FD key j is j - N_TXT
    if pid_m * BLOCK_M + BLOCK_M > N_TXT:
        if SKIP_TILES:
            # "bias" mode: an FD tile whose mask is all zero is fully excluded. TILES lists, per batch row,
            # the count of live tiles and then their indices, so the loop runs over live tiles only with no
            # branch in its body (a branch would stop Triton from software-pipelining the K/V loads).
            tiles = TILES + off_b * st_b
            for i in range(0, tl.load(tiles)):
                start_n = N_TXT + tl.load(tiles + 1 + i) * BLOCK_N
                acc0, acc1, l_i, m_i = _fd_tile(acc0, acc1, l_i, m_i, q0, q1, kf_base, vf_base, m_base, start_n,
                                                offs_m, offs_n, offs_d0, offs_d1, skf_n, skf_d, svf_n, svf_d, NF,
                                                N_TXT, qk_scale, omega, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D,
                                                SCALE_MODE, HAS_TXT, DOT_DTYPE, IEEE)
        else:
            for start_n in range(N_TXT, NF, BLOCK_N):
                acc0, acc1, l_i, m_i = _fd_tile(acc0, acc1, l_i, m_i, q0, q1, kf_base, vf_base, m_base, start_n,
                                                offs_m, offs_n, offs_d0, offs_d1, skf_n, skf_d, svf_n, svf_d, NF,
                                                N_TXT, qk_scale, omega, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D,
                                                SCALE_MODE, HAS_TXT, DOT_DTYPE, IEEE)

    o_base = OUT + off_b * so_b + off_h * so_h
    _store_rows(o_base, offs_m, offs_d0, so_n, so_d, NQ, acc0 / l_i[:, None], HEAD_DIM)
    if SPLIT_D:
        _store_rows(o_base, offs_m, offs_d1, so_n, so_d, NQ, acc1 / l_i[:, None], HEAD_DIM)
    if WRITE_LSE:
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # back to natural log
        tl.store(LSE + ((off_b * H + off_h) * NQ + offs_m), lse, mask=offs_m < NQ)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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


def _config(d_padded: int, elem_bytes: int, interpret: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a padded head dim and element size.

    Checked by compiling for sm_90 (tests/test_kernel_compile.py): shared memory stays well under the
    H100/H200 227 KB limit and fp16/bf16 variants do not spill. fp32 (IEEE dots, a correctness path, not
    a fast one) needs small tiles to fit. The interpreter prefers big tiles: fewer, vectorized programs.
    """
    if interpret:
        return 32, 32, 1, 1
    if elem_bytes == 4:
        return 64, 32, 8, 2
    if d_padded <= 64:
        return 128, 64, 4, 3
    if d_padded <= 128:
        return 128, 64, 8, 3
    return 64, 64, 8, 2


_launch_memo = TensorMemo()  # per user mask: its float32 rows and live-tile list, per tile width


def fd_tile_list(rows: torch.Tensor, block_n: int) -> torch.Tensor:
    """For mask rows ``[R, Nimg]``: int32 ``[R, 1 + n_tiles]``, per row the number of FD tiles of width
    ``block_n`` holding a nonzero mask entry, then those tiles' indices in ascending order (the rest of the
    row is padding). Computed on the mask's device without a host sync."""
    n_rows, n_img = rows.shape
    n_tiles = triton.cdiv(n_img, block_n)
    padded = torch.nn.functional.pad(rows, (0, n_tiles * block_n - n_img))
    live = padded.view(n_rows, n_tiles, block_n).amax(dim=2) > 0
    order = torch.argsort((~live).to(torch.int8), dim=1, stable=True)  # live tiles first, in order
    return torch.cat([live.sum(dim=1, keepdim=True), order], dim=1).to(torch.int32).contiguous()


def _mask_launch_data(mask, batch: int, n_img: int, device, block_n: int, skip_tiles: bool):
    """(float32 mask rows ``[1|B, Nimg]``, live-tile list or None), memoized per mask tensor."""
    if mask is None:
        return mask_as_rows(None, batch, n_img, device), None
    key = (block_n, skip_tiles)
    data = _launch_memo.get(mask, key)
    if data is None:
        # A copy, never a view: a memo value that referenced the mask would keep it alive forever.
        rows = mask_as_rows(mask, batch, n_img, device).clone(memory_format=torch.contiguous_format)
        data = _launch_memo.put(mask, key, (rows, fd_tile_list(rows, block_n) if skip_tiles else None))
    return data


MAX_GRID_YZ = 65535  # CUDA grid limit on the head and batch axes
INT32_MAX = 2**31 - 1


def check_launch_limits(heads: int, batch: int, tensors: dict) -> None:
    """Refuse, before launch, what the kernel's indexing cannot address: more than 65535 heads or batch
    entries (grid axes), or a [N, D] slice of one (batch, head) whose last element lies beyond int32
    offsets (per-token offsets are int32; batch/head offsets are int64)."""
    if heads > MAX_GRID_YZ or batch > MAX_GRID_YZ:
        raise ValueError(f"q: the Triton kernel takes at most {MAX_GRID_YZ} heads and {MAX_GRID_YZ} batch entries, "
                         f"got H={heads}, B={batch}; split the batch or use backend='torch'")
    for name, (n, d, stride_n, stride_d) in tensors.items():
        if (n - 1) * abs(stride_n) + (d - 1) * abs(stride_d) > INT32_MAX:
            raise ValueError(f"{name}: {n} tokens at token stride {stride_n} exceed the kernel's int32 offsets "
                             "within one (batch, head); use backend='torch' or a layout with a smaller token stride")


def fasa_fwd(q, k_p, k_f, v_p, v_f, mask, *, scale: float, omega: float, mode: str, n_txt: int,
             return_lse: bool = False, block_m: int | None = None, block_n: int | None = None):
    """Launch the kernel on validated inputs (``mask``: None, or ``[Nimg]`` / ``[B, Nimg]`` bool or float).

    Returns ``out`` laid out as ``[B, Nq, H, D]`` memory viewed as ``[B, H, Nq, D]`` (so that
    ``out.transpose(1, 2).reshape(B, Nq, H * D)`` is free) and, if asked, the fp32 LSE ``[B, H, Nq]``.
    ``block_m``/``block_n`` override the tile sizes (tests use small tiles to cross many boundaries).
    """
    batch, heads, n_q, head_dim = q.shape
    n_p, n_f = k_p.shape[2], k_f.shape[2]
    check_launch_limits(heads, batch, {name: (t.shape[2], head_dim, t.stride(2), t.stride(3)) for name, t in
                                       (("q", q), ("k_p", k_p), ("k_f", k_f), ("v_p", v_p), ("v_f", v_f))})
    interpret = interpreting()
    block_d0, block_d1 = head_dim_split(head_dim)
    bm, bn, warps, stages = _config(block_d0 + block_d1, q.element_size(), interpret)
    bm, bn = block_m or bm, block_n or bn

    # "bias" mode skips all-zero mask tiles; with no mask every tile is live, and "scale" mode excludes none.
    skip_tiles = mode == "bias" and mask is not None
    rows, tiles = _mask_launch_data(mask, batch, n_f - n_txt, q.device, bn, skip_tiles)
    out = torch.empty(batch, n_q, heads, head_dim, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(batch, heads, n_q, device=q.device, dtype=torch.float32) if return_lse else out

    # bf16 tl.dot is wrong in the CPU interpreter (fp32/fp16 are right): upcast there only.
    dot_dtype = tl.float32 if (interpret and q.dtype == torch.bfloat16) else {
        torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[q.dtype]
    omega_arg = omega if mode == "scale" else omega * LOG2E

    def row_stride(t):  # one shared row is read by every batch entry
        return 0 if t is None or t.shape[0] == 1 else t.stride(0)

    grid = (triton.cdiv(n_q, bm), heads, batch)
    _fasa_fwd_kernel[grid](
        q, k_p, v_p, k_f, v_f, rows, rows if tiles is None else tiles, out, lse,
        *q.stride(), *k_p.stride(), *v_p.stride(), *k_f.stride(), *v_f.stride(), *out.stride(),
        row_stride(rows), row_stride(tiles),
        heads, n_q, n_p, n_f, n_txt,
        scale * LOG2E, omega_arg,
        HEAD_DIM=head_dim, BLOCK_D0=block_d0, BLOCK_D1=max(block_d1, 16), SPLIT_D=block_d1 > 0,
        BLOCK_M=bm, BLOCK_N=bn,
        SCALE_MODE=(mode == "scale"), HAS_TXT=(n_txt > 0), SKIP_TILES=skip_tiles, WRITE_LSE=return_lse,
        DOT_DTYPE=dot_dtype, IEEE=(q.dtype == torch.float32),
        num_warps=warps, num_stages=stages,
    )
    return (out, lse) if return_lse else out
