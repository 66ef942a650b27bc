"""Sweep the kernel's tile configurations at the real per-call shapes and record the fastest per case.

For every distinct self-attention shape (bench.shapes, B=1 per guidance half plus the B=4 cases), fp16, the
25% hair mask (the typical attribute) and the full mask: time ``fasa_fwd`` with each candidate
(BLOCK_M, BLOCK_N, num_warps, num_stages), the tile table's own choice included, after checking each result
against the table's (a config that cannot compile on this GPU, e.g. too much shared memory, is reported,
not fatal). The output says, per case, the table's time, the best time and config, and their ratio: a ratio
well above 1 is a change to make in ``kernels/fasa_fwd.py::tile_config``.

    python -m freecure_ops.bench.tile_sweep [--out DIR] [--budget-s S]

Needs CUDA (the interpreter says nothing about speed); without it, it says so and exits 0.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

from .shapes import cases_for

CANDIDATES = (  # (BLOCK_M, BLOCK_N, num_warps, num_stages); shared memory and spills read offline (COMPILE.md)
    (64, 32, 4, 3), (64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 8, 3), (64, 128, 4, 3), (64, 128, 8, 3),
    (128, 32, 4, 3), (128, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3),
)
FIELDS = ["device", "torch", "triton", "cuda", "case", "head_dim", "batch", "mask", "live_keys", "config",
          "table", "ms", "status", "note"]


def distinct_cases():
    seen, out = set(), []
    for c in cases_for(["sd15", "sdxl", "flux"]):
        key = (c.heads, c.head_dim, c.n_txt, c.grid, c.batch)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def run(out_dir: Path, budget_s: float, log=print) -> list[dict]:
    import triton
    from triton.testing import do_bench

    from freecure_ops import prepare_fasa_mask
    from freecure_ops.kernels.fasa_fwd import _sm_count, fasa_fwd, head_dim_split, tile_config

    from .masks import case_mask
    from .providers import make_problem

    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda}
    t_end = time.perf_counter() + budget_s
    rows = []
    for case in distinct_cases():
        d0, d1 = head_dim_split(case.head_dim)
        table = tile_config(d0 + d1, 2, case.n_q, case.heads, case.batch, _sm_count(torch.cuda.current_device()))
        for kind, cov in (("hair", 0.25), ("full", 1.0)):
            if time.perf_counter() > t_end:
                log(f"# sweep budget spent: {case.name} {kind} and later cases not swept")
                return rows
            p = make_problem(case, torch.float16, cov, "cuda", mask_kind=kind)
            mask = prepare_fasa_mask(p.mask)
            kw = dict(scale=p.scale, omega=p.omega, mode="bias", n_txt=case.n_txt)
            want = fasa_fwd(p.q, p.k_p, p.k_f, p.v_p, p.v_f, mask, **kw)
            for cfg in dict.fromkeys((table,) + CANDIDATES):
                row = {**env, "case": case.name, "head_dim": case.head_dim, "batch": case.batch, "mask": kind,
                       "live_keys": round(float(case_mask(case.grid, cov, 0, kind)[1]), 4),
                       "config": "x".join(map(str, cfg)), "table": cfg == table, "ms": None, "status": "",
                       "note": ""}
                bm, bn, warps, stages = cfg

                def fn():
                    return fasa_fwd(p.q, p.k_p, p.k_f, p.v_p, p.v_f, mask, block_m=bm, block_n=bn,
                                    num_warps=warps, num_stages=stages, **kw)
                try:
                    err = (fn().float() - want.float()).abs().max().item()
                    if not err <= 2e-3:  # same math, another tiling: fp16 rounding of the output only
                        row.update(status="FAIL", note=f"max diff {err:.2e} vs the table's config")
                    else:
                        row.update(ms=do_bench(fn, warmup=10, rep=30, return_mode="median"), status="ok")
                except Exception as e:  # e.g. OutOfResources: shared memory over the limit
                    row.update(status="error", note=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
                rows.append(row)
            del p, mask, want
            torch.cuda.empty_cache()
            write(rows, out_dir)
    return rows


def summary(rows: list[dict]) -> str:
    lines = [f"{'case':16s} {'mask':5s} {'table config':13s} {'table ms':>9s} {'best config':13s} {'best ms':>9s} "
             f"{'table/best':>10s}"]
    groups = {}
    for r in rows:
        groups.setdefault((r["case"], r["mask"]), []).append(r)
    for (case, kind), group in groups.items():
        ok = [r for r in group if r["status"] == "ok"]
        table = next((r for r in ok if r["table"]), None)
        best = min(ok, key=lambda r: r["ms"], default=None)
        if table is None or best is None:
            lines.append(f"{case:16s} {kind:5s} (no timing: {', '.join(sorted({r['status'] for r in group}))})")
            continue
        lines.append(f"{case:16s} {kind:5s} {table['config']:13s} {table['ms']:9.4f} {best['config']:13s} "
                     f"{best['ms']:9.4f} {table['ms'] / best['ms']:10.2f}")
    return "\n".join(lines) + "\n"


def write(rows: list[dict], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    if rows:
        r = rows[0]
        head = f"# tile sweep on {r['device']}: torch {r['torch']}, triton {r['triton']}, CUDA {r['cuda']}; fp16\n"
        (out_dir / "sweep.txt").write_text(head + summary(rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m freecure_ops.bench.tile_sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("."), help="folder for sweep.csv and sweep.txt")
    ap.add_argument("--budget-s", type=float, default=120.0, help="stop starting new cases after this long")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tile_sweep: no CUDA device; tile timings need a GPU (offline compile facts: bench/COMPILE.md)")
        return 0
    rows = run(args.out, args.budget_s)
    write(rows, args.out)
    sys.stdout.write(summary(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
