"""Fused FASA forward: flash attention over [PD keys, masked FD keys] with no concatenation.

One program per (query block, head, batch). Online softmax in fp32 in the log2 domain. Two key loops:
  1. PD keys: plain attention; full tiles carry no masking, a final partial tile masks its tail.
  2. FD keys from ``n_txt`` on: the mask tile is loaded and the bias/exclusion ("bias" mode) or the
     per-key logit scale ("scale" mode) is applied in registers. In "bias" mode a tile whose mask is all
     zero cannot contribute and is skipped before any K/V load.
Nothing of size Nq x Nk is ever written to memory. The launcher expects validated inputs
(``freecure_ops.validation``) and does no checking of its own beyond what the launch needs.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _online_softmax_step(acc, l_i, m_i, qk, v):
    """Fold one tile of log2-domain logits ``qk`` [M, N] and values ``v`` [N, D] into the running state."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def _load_tile(base, offs_n, offs_d, stride_n, stride_d, n_end, d_ok, EVEN_N: tl.constexpr,
               EVEN_D: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Load a [BLOCK_N, BLOCK_D] tile of keys or values; rows >= n_end and cols >= D read as zero."""
    ptrs = base + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d
    if EVEN_N and EVEN_D:
        t = tl.load(ptrs)
    elif EVEN_N:
        t = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    elif EVEN_D:
        t = tl.load(ptrs, mask=(offs_n < n_end)[:, None], other=0.0)
    else:
        t = tl.load(ptrs, mask=(offs_n < n_end)[:, None] & d_ok[None, :], other=0.0)
    return t.to(DOT_DTYPE)


@triton.jit
def _pd_tile(acc, l_i, m_i, q, k_base, v_base, start_n, n_end, offs_n, offs_d, d_ok,
             stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
             EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr):
    cols = start_n + offs_n
    k = _load_tile(k_base, cols, offs_d, stride_kn, stride_kd, n_end, d_ok, EVEN_N, EVEN_D, DOT_DTYPE)
    if IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    else:
        qk = tl.dot(q, tl.trans(k)) * qk_scale
    if not EVEN_N:
        qk = tl.where((cols < n_end)[None, :], qk, float("-inf"))
    v = _load_tile(v_base, cols, offs_d, stride_vn, stride_vd, n_end, d_ok, EVEN_N, EVEN_D, DOT_DTYPE)
    return _online_softmax_step(acc, l_i, m_i, qk, v)


@triton.jit
def _fd_tile(acc, l_i, m_i, q, k_base, v_base, start_n, n_end, offs_m, offs_n, offs_d, d_ok, mvals,
             stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, omega, n_txt,
             SCALE_MODE: tl.constexpr, HAS_TXT: tl.constexpr, EVEN_D: tl.constexpr,
             DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr):
    cols = start_n + offs_n
    k = _load_tile(k_base, cols, offs_d, stride_kn, stride_kd, n_end, d_ok, False, EVEN_D, DOT_DTYPE)
    if IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    else:
        qk = tl.dot(q, tl.trans(k)) * qk_scale
    if SCALE_MODE:
        # logit = omega * m * s (log2 domain scales the same way); keys past the end are excluded.
        qk = tl.where((cols < n_end)[None, :], qk * (omega * mvals)[None, :], float("-inf"))
    else:
        # logit = s + omega * m where m > 0 (omega arrives pre-multiplied by log2(e)); m == 0 excluded.
        # Out-of-range keys load m = 0 and so are excluded too.
        qk = tl.where((mvals > 0)[None, :], qk + (omega * mvals)[None, :], float("-inf"))
    if HAS_TXT:
        qk = tl.where((offs_m >= n_txt)[:, None], qk, float("-inf"))
    v = _load_tile(v_base, cols, offs_d, stride_vn, stride_vd, n_end, d_ok, False, EVEN_D, DOT_DTYPE)
    return _online_softmax_step(acc, l_i, m_i, qk, v)


@triton.jit
def _fasa_fwd_kernel(
    Q, KP, VP, KF, VF, MASK, OUT, LSE,
    sq_b, sq_h, sq_n, sq_d,
    skp_b, skp_h, skp_n, skp_d,
    svp_b, svp_h, svp_n, svp_d,
    skf_b, skf_h, skf_n, skf_d,
    svf_b, svf_h, svf_n, svf_d,
    so_b, so_h, so_n, so_d,
    sm_b,
    H, NQ, NP, NF, N_TXT,
    qk_scale, omega,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SCALE_MODE: tl.constexpr, HAS_TXT: tl.constexpr, WRITE_LSE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < NQ

    q_ptrs = Q + off_b * sq_b + off_h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :] * sq_d
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # 1. PD keys. Key 0 always exists, so every row's running max is finite after this loop and the
    #    fully excluded FD tiles/rows below fold in as exact zeros.
    kp_base = KP + off_b * skp_b + off_h * skp_h
    vp_base = VP + off_b * svp_b + off_h * svp_h
    np_full = (NP // BLOCK_N) * BLOCK_N
    for start_n in range(0, np_full, BLOCK_N):
        acc, l_i, m_i = _pd_tile(acc, l_i, m_i, q, kp_base + start_n * skp_n, vp_base + start_n * svp_n,
                                 0, NP, offs_n, offs_d, d_ok, skp_n, skp_d, svp_n, svp_d, qk_scale,
                                 True, EVEN_D, DOT_DTYPE, IEEE)
    if np_full < NP:
        acc, l_i, m_i = _pd_tile(acc, l_i, m_i, q, kp_base, vp_base, np_full, NP, offs_n, offs_d, d_ok,
                                 skp_n, skp_d, svp_n, svp_d, qk_scale, False, EVEN_D, DOT_DTYPE, IEEE)

    # 2. FD image keys [N_TXT, NF). Query blocks made only of text rows have nothing to do here.
    kf_base = KF + off_b * skf_b + off_h * skf_h
    vf_base = VF + off_b * svf_b + off_h * svf_h
    m_base = MASK + off_b * sm_b - N_TXT  # mask index of FD key j is j - N_TXT
    if pid_m * BLOCK_M + BLOCK_M > N_TXT:
        for start_n in range(N_TXT, NF, BLOCK_N):
            cols = start_n + offs_n
            mvals = tl.load(m_base + cols, mask=cols < NF, other=0.0)
            if SCALE_MODE:
                acc, l_i, m_i = _fd_tile(acc, l_i, m_i, q, kf_base, vf_base, start_n, NF, offs_m, offs_n,
                                         offs_d, d_ok, mvals, skf_n, skf_d, svf_n, svf_d, qk_scale, omega,
                                         N_TXT, SCALE_MODE, HAS_TXT, EVEN_D, DOT_DTYPE, IEEE)
            elif tl.max(mvals, 0) > 0:  # an all-zero mask tile is fully excluded: skip its K/V entirely
                acc, l_i, m_i = _fd_tile(acc, l_i, m_i, q, kf_base, vf_base, start_n, NF, offs_m, offs_n,
                                         offs_d, d_ok, mvals, skf_n, skf_d, svf_n, svf_d, qk_scale, omega,
                                         N_TXT, SCALE_MODE, HAS_TXT, EVEN_D, DOT_DTYPE, IEEE)

    out = acc / l_i[:, None]
    o_ptrs = OUT + off_b * so_b + off_h * so_h + offs_m[:, None] * so_n + offs_d[None, :] * so_d
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if WRITE_LSE:
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # back to natural log
        tl.store(LSE + ((off_b * H + off_h) * NQ + offs_m), lse, mask=row_ok)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _config(block_d: int, elem_bytes: int, interpret: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a padded head dim and element size.

    Checked by compiling for sm_90 (tests/test_kernel_compile.py): shared memory stays well under the
    H100/H200 227 KB limit and fp16/bf16 variants do not spill. fp32 (IEEE dots, a correctness path, not
    a fast one) needs small tiles to fit. The interpreter prefers big tiles: fewer, vectorized programs.
    """
    if interpret:
        return 32, 32, 1, 1
    if elem_bytes == 4:
        return 64, 32, 8, 2
    if block_d <= 64:
        return 128, 64, 4, 3
    if block_d <= 128:
        return 128, 64, 8, 3
    return 64, 64, 8, 2


def fasa_fwd(q, k_p, k_f, v_p, v_f, mask_rows, *, scale: float, omega: float, mode: str, n_txt: int,
             return_lse: bool = False, block_m: int | None = None, block_n: int | None = None):
    """Launch the kernel on validated inputs.

    mask_rows: float32 ``[1 or B, Nimg]`` with unit stride along Nimg (row 0 shared when it has one row).
    Returns ``out`` laid out as ``[B, Nq, H, D]`` memory viewed as ``[B, H, Nq, D]`` (so that
    ``out.transpose(1, 2).reshape(B, Nq, H * D)`` is free) and, if asked, the fp32 LSE ``[B, H, Nq]``.
    ``block_m``/``block_n`` override the tile sizes (tests use small tiles to cross many boundaries).
    """
    batch, heads, n_q, head_dim = q.shape
    n_p, n_f = k_p.shape[2], k_f.shape[2]
    interpret = interpreting()
    block_d = max(16, triton.next_power_of_2(head_dim))
    bm, bn, warps, stages = _config(block_d, q.element_size(), interpret)
    bm, bn = block_m or bm, block_n or bn

    out = torch.empty(batch, n_q, heads, head_dim, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(batch, heads, n_q, device=q.device, dtype=torch.float32) if return_lse else out
    assert mask_rows.dtype == torch.float32 and mask_rows.stride(1) == 1
    mask_stride_b = mask_rows.stride(0) if mask_rows.shape[0] > 1 else 0

    # bf16 tl.dot is wrong in the CPU interpreter (fp32/fp16 are right): upcast there only.
    dot_dtype = tl.float32 if (interpret and q.dtype == torch.bfloat16) else {
        torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[q.dtype]
    omega_arg = omega if mode == "scale" else omega * LOG2E

    grid = (triton.cdiv(n_q, bm), heads, batch)
    _fasa_fwd_kernel[grid](
        q, k_p, v_p, k_f, v_f, mask_rows, out, lse,
        *q.stride(), *k_p.stride(), *v_p.stride(), *k_f.stride(), *v_f.stride(), *out.stride(),
        mask_stride_b,
        heads, n_q, n_p, n_f, n_txt,
        scale * LOG2E, omega_arg,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn,
        SCALE_MODE=(mode == "scale"), HAS_TXT=(n_txt > 0), WRITE_LSE=return_lse,
        DOT_DTYPE=dot_dtype, IEEE=(q.dtype == torch.float32),
        num_warps=warps, num_stages=stages,
    )
    return (out, lse) if return_lse else out
