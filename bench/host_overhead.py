"""Host cost of one ``fasa_attention`` call: the Python work before the kernel launch.

Measured with a prepared mask (what the adapters pass) at the real per-call shapes, the kernel launch
replaced by a no-op, so the figure is our own work (validation, dispatch, launch arguments, the output
allocation) and runs on any machine. On CUDA ``--with-launch`` also times whole calls, Triton's own launch
included, on a tiny problem whose GPU time is far below the host's (back-to-back calls, no sync in between,
so the wall time per call is the host's).

    python -m freecure_ops.bench.host_overhead [--calls N] [--with-launch]

Prints one line per case: median microseconds per call over 7 repeats of N calls, and the spread.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch

from .shapes import cases_for


@contextlib.contextmanager
def no_launch():
    """Replace the kernel launch with a no-op (everything before it still runs)."""
    import freecure_ops.kernels.fasa_fwd  # noqa: F401 (the package attribute of that name is the launcher)

    module = sys.modules["freecure_ops.kernels.fasa_fwd"]
    real = module._fasa_fwd_kernel

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    module._fasa_fwd_kernel = _NoLaunch()
    try:
        yield
    finally:
        module._fasa_fwd_kernel = real


def _inputs(case, device, dtype):
    b, n, h, d = case.batch, case.n_q, case.heads, case.head_dim
    gen = torch.Generator(device=device).manual_seed(0)

    def branch():  # diffusers' layout, PD rows then FD rows of one guidance half
        return torch.randn(2 * b, n, h * d, generator=gen, device=device, dtype=dtype).view(2 * b, n, h, d) \
            .transpose(1, 2)

    q, k, v = branch(), branch(), branch()
    return q[:b], k[:b], k[b:], v[:b], v[b:]


def per_call_us(fn, calls: int, repeats: int = 7, sync=None) -> tuple[float, float]:
    """(median, max - min) microseconds per call over ``repeats`` runs of ``calls`` calls."""
    for _ in range(max(10, calls // 10)):
        fn()
    runs = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if sync:
            sync()
        runs.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(runs), max(runs) - min(runs)


def measure(calls: int = 2000, with_launch: bool = False, log=print) -> list[dict]:
    from freecure_ops import fasa_attention, prepare_fasa_mask

    from .masks import case_mask

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16
    rows = []
    seen = set()
    for case in cases_for(["sd15", "sdxl", "flux"]):
        if (case.heads, case.head_dim, case.n_q, case.batch) in seen:
            continue
        seen.add((case.heads, case.head_dim, case.n_q, case.batch))
        q, k_p, k_f, v_p, v_f = _inputs(case, device, dtype)
        mask = prepare_fasa_mask(case_mask(case.grid, 0.25)[0].to(device))

        def call():
            return fasa_attention(q, k_p, k_f, v_p, v_f, mask, case.omega, n_txt=case.n_txt, backend="triton")

        with no_launch():
            med, spread = per_call_us(call, calls)
        rows.append({"case": case.name, "what": "before launch", "us": med, "spread": spread})
        log(f"{case.name:16s} before launch  {med:6.1f} us/call  (spread {spread:.1f})")
    if with_launch and cuda:
        case = cases_for(["sdxl"])[1]
        q, k_p, k_f, v_p, v_f = (t[:, :1, :64] for t in _inputs(case, device, dtype))  # tiny GPU work
        mask = prepare_fasa_mask(torch.rand(64, device=device) > 0.75)
        med, spread = per_call_us(lambda: fasa_attention(q, k_p, k_f, v_p, v_f, mask, 1.5, backend="triton"),
                                  calls, sync=torch.cuda.synchronize)
        rows.append({"case": "tiny", "what": "whole call", "us": med, "spread": spread})
        log(f"{'tiny (1x64x64)':16s} whole call     {med:6.1f} us/call  (spread {spread:.1f}; Triton launch included)")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m freecure_ops.bench.host_overhead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--with-launch", action="store_true", help="on CUDA, also time whole calls")
    args = ap.parse_args(argv)
    if args.calls < 1:
        ap.error("--calls must be >= 1")
    import triton

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (kernel launch stubbed)"
    print(f"# FASA host cost per call on {where}: torch {torch.__version__}, triton {triton.__version__}, "
          f"fp16, prepared mask")
    measure(args.calls, args.with_launch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
