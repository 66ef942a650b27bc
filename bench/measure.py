"""Timing, FLOP counting and peak memory.

Times are medians: ``triton.testing.do_bench`` on CUDA (it warms up, flushes L2 between calls and syncs),
a plain ``perf_counter`` loop on CPU. On CUDA the time is device time between events: a provider's host work
per call (Python, dispatch, launch; ~20 us for fasa, see host_overhead) overlaps the L2 flush and is not in
it, for every provider alike. FLOPs count only the (query, key) pairs a provider actually attends.
"""
from __future__ import annotations

import statistics
import time

import torch


def attended_pairs(n_q: int, n_p: int, nnz: int, n_txt: int = 0) -> int:
    """(query, key) pairs FASA attends per (batch, head): every query sees the ``n_p`` PD keys; image
    queries (all but the ``n_txt`` text rows) also see the ``nnz`` FD image keys inside the mask."""
    return n_q * n_p + (n_q - n_txt) * nnz


def attention_flops(batch: int, heads: int, head_dim: int, pairs: int) -> int:
    """``4 * B * H * pairs * D``: two matmuls (QK^T and PV) of 2 FLOPs per multiply-add. With
    ``pairs = Nq * (Np + nnz)`` (no text rows) this is the issue's ``4*B*H*Nq*(Np+nnz)*D``; FLUX's text rows see
    no FD key, so ``attended_pairs`` counts fewer pairs there (5% fewer at the full mask): conservative."""
    return 4 * batch * heads * pairs * head_dim


def fasa_flops(batch, heads, head_dim, n_q, n_p, nnz, n_txt=0) -> int:
    return attention_flops(batch, heads, head_dim, attended_pairs(n_q, n_p, nnz, n_txt))


def tflops(flops: int, ms: float | None) -> float | None:
    if ms is None or ms <= 0:
        return None
    return flops / (ms * 1e-3) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, *, warmup_ms: float = 10.0, rep_ms: float = 40.0,
            cpu_max_reps: int = 5, cpu_budget_s: float = 0.25) -> float:
    """Median milliseconds of ``fn()``. CUDA: ``do_bench`` with the given warm-up and repetition times.
    CPU: one warm-up call, then up to ``cpu_max_reps`` timed calls within ``cpu_budget_s`` (at least 2)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < cpu_max_reps and (len(times) < 2 or time.perf_counter() - start < cpu_budget_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_mib(fn, device: torch.device) -> float | None:
    """Peak memory ``fn()`` allocates beyond what was allocated before it (its output included), in MiB.
    CUDA only (``torch.cuda.max_memory_allocated``); None elsewhere."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**20


def timed_once_ms(fn, device: torch.device) -> float:
    """Wall milliseconds of one synchronized call (for one-off costs such as building a block mask)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3
