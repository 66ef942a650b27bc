"""Sweep the kernel's tile configurations at the real per-call shapes and record the fastest per case.

For every distinct self-attention shape (bench.shapes, B=1 per guidance half plus the B=4 cases), fp16, the
25% hair mask (the typical attribute) and the full mask: time ``fasa_fwd`` with each candidate
(BLOCK_M, BLOCK_N, num_warps, num_stages), the tile table's own choice included, after checking each result
against the table's (a config that cannot compile on this GPU, e.g. too much shared memory, is reported,
not fatal). The kernel's variants: ``binary`` (one scalar bias per mask row: these masks are binary, so this
is what a launch with a prepared mask gets) with every config; ``float`` (the FD loop loads each live key's
mask value) at the table's config; where the table's grid is under one wave of programs at 3 per SM,
``split-bin`` with every config and ``split`` at the table's config (PD and FD keys in separate programs,
merged by LSE); on every case ``pd-sdpa`` (the PD keys by torch's fastest fused SDPA kernel with an LSE,
cuDNN first, the FD program alone, merged by LSE) at the table's config and two others; on every case
``bin-fd128`` (the binary FD loop on 128-key tiles, the PD loop's tiles the config's) at the table's config and
three others; on every case ``pd-gluon`` (the PD keys by our Gluon kernel, kernels/fasa_pd_gluon.py, QK and PV
wgmma overlapped with the softmax; sm_90 and head dims 64/128, "n/a" elsewhere) at the table's config. The output says, per case, the default
launch's time (table config, binary loop, no split), the best time with its config and variant, their
ratio, and the best time of each variant: a ratio well above 1 is a change to make in
``kernels/fasa_fwd.py`` (``tile_config``, or where the launcher turns split-KV on).

    python -m freecure_ops.bench.tile_sweep [--out DIR] [--budget-s S] [--compile-workers N]

Compiling dominates a sweep (1-3 s of host CPU per config, one at a time in a process; the timings take
~0.1 s each): every distinct kernel is first compiled by a pool of worker processes that launch it once,
filling Triton's on-disk cache, so the timing loop then only loads cubins. Cases run heaviest first (the
model's layers of that shape times their attention work), so a run cut short by its budget has the shapes
that dominate a generation.

Needs CUDA (the interpreter says nothing about speed); without it, it says so and exits 0.
"""
from __future__ import annotations

import argparse
import csv
import functools
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch

from .shapes import attention_weight, cases_for

CANDIDATES = (  # (BLOCK_M, BLOCK_N, num_warps, num_stages); shared memory and spills read offline (COMPILE.md)
    (64, 32, 4, 3), (64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 8, 3), (64, 128, 4, 3), (64, 128, 8, 3),
    (128, 32, 4, 3), (128, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3),
)
FIELDS = ["device", "torch", "triton", "cuda", "case", "head_dim", "batch", "mask", "live_keys", "config",
          "variant", "table", "ms", "status", "note"]
# fasa_fwd keyword arguments per variant; "binary" with split off is the default launch for a binary mask.
VARIANTS = {"float": dict(binary=False), "binary": dict(binary=True), "split": dict(binary=False, split_kv=True),
            "split-bin": dict(binary=True, split_kv=True), "pd-sdpa": dict(binary=True, pd_sdpa=True),
            "bin-fd128": dict(binary=True, fd_block_n=128), "pd-gluon": dict(binary=True, pd_sdpa="gluon")}
DEFAULT_VARIANT = "binary"
SPLIT_BELOW_PROGRAMS_PER_SM = 3  # split-KV is timed where the table's grid has fewer programs than SMs x this
# pd-sdpa (PD keys by torch's cuDNN/flash/efficient SDPA, the FD program alone, merged by LSE) is timed on every
# case at the table's config and these (the FD-only program's own tiles; few, to keep the compile budget)
PD_SDPA_CONFIGS = ((64, 64, 4, 3), (128, 64, 8, 3))
# bin-fd128 (the binary FD loop on 128-key tiles, the PD loop on the config's BLOCK_N; fewer instructions per
# key, COMPILE.md) is timed on every case at the table's config and these: the FD loop's tile is its own, so
# the configs differ in query rows, warps and the PD loop's keys (head dim 160 does not fit: 266 KB of shared
# memory, reported as an error)
FD128_CONFIGS = ((64, 64, 4, 3), (128, 64, 8, 3), (64, 64, 8, 3))


def variants_for(programs: int, sm_count: int) -> tuple:
    """The variants worth timing for a grid of ``programs``: split-KV only under one wave; pd-sdpa always."""
    if programs < SPLIT_BELOW_PROGRAMS_PER_SM * sm_count:
        return tuple(VARIANTS)
    return ("float", "binary", "pd-sdpa", "bin-fd128", "pd-gluon")


def distinct_cases():
    """Every distinct shape, heaviest first: layers x (query x key pairs x heads x head dim) per generation;
    the batch cases (no layer count of their own) last."""
    seen, out = set(), []
    for c in cases_for(["sd15", "sdxl", "flux"]):
        key = (c.heads, c.head_dim, c.n_txt, c.grid, c.batch)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return sorted(out, key=lambda c: -attention_weight(c))


def timed_pairs(table: tuple, programs: int, sm_count: int) -> list:
    """(config, variant) pairs to time for one case, the default launch first: every config with the binary
    loop (alone and, under one wave, split), the float loops at the table's config only (binary vs float is
    one comparison; the tiles that suit split-KV are not those that suit one program per query block)."""
    variants = variants_for(programs, sm_count)
    configs = tuple(dict.fromkeys((table,) + CANDIDATES))
    pairs = [(cfg, v) for v in (DEFAULT_VARIANT, "split-bin") if v in variants for cfg in configs]
    pairs[1:1] = [(table, v) for v in ("float", "split") if v in variants]
    pairs += [(cfg, "pd-sdpa") for cfg in dict.fromkeys((table,) + PD_SDPA_CONFIGS)]
    pairs += [(cfg, "bin-fd128") for cfg in dict.fromkeys((table,) + FD128_CONFIGS)]
    pairs.append((table, "pd-gluon"))  # the Gluon PD kernel has its own tiles: the FD program's at the table's
    return pairs


def compile_jobs(cases, configs_for) -> list:
    """(case, (config, variant)) pairs, one per distinct compiled kernel: cases of one head dim and
    text/no-text layout specialize alike (every other size they pass is a multiple of 16), so the first such
    case stands for all."""
    seen, jobs = set(), []
    for case in cases:
        for cfg in configs_for(case):
            key = (case.head_dim, case.n_txt > 0, cfg)
            if key not in seen:
                seen.add(key)
                jobs.append((case, cfg))
    return jobs


@functools.lru_cache(maxsize=2)  # per worker process: consecutive jobs mostly share a case
def _problem(case, device: str):
    from freecure_ops import prepare_fasa_mask

    from .providers import make_problem

    p = make_problem(case, torch.float16, 0.25, device, mask_kind="hair")
    return p, prepare_fasa_mask(p.mask)


def compile_one(job, device: str = "cuda") -> str:
    """Compile the kernel of one (case, (config, variant)) by launching it once; "" or the error's first line."""
    from freecure_ops.kernels.fasa_fwd import fasa_fwd

    case, cfg = job
    (bm, bn, warps, stages), variant = cfg if isinstance(cfg[0], tuple) else (cfg, DEFAULT_VARIANT)
    try:
        p, mask = _problem(case, device)
        fasa_fwd(p.q, p.k_p, p.k_f, p.v_p, p.v_f, mask, scale=p.scale, omega=p.omega, mode="bias",
                 n_txt=case.n_txt, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages,
                 **VARIANTS[variant])
        if device == "cuda":
            torch.cuda.synchronize()
        return ""
    except Exception as e:  # e.g. OutOfResources; the timing loop reports it per case
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def precompile(jobs, workers: int, deadline: float, device: str = "cuda", log=print) -> dict:
    """Run ``compile_one`` over ``jobs`` in ``workers`` fresh processes (spawned: CUDA cannot be forked)
    until ``deadline`` (``time.perf_counter()``), then stop them all, so that no compile shares the CPU or the
    GPU with the timings; what is not done by then compiles later, on first launch. Returns {job: error line}
    for the jobs that failed."""
    if not jobs or workers < 1:
        return {}
    t0 = time.perf_counter()
    pool = multiprocessing.get_context("spawn").Pool(workers)
    failed, done = {}, 0
    try:
        results = {job: pool.apply_async(compile_one, (job, device)) for job in jobs}
        while time.perf_counter() < deadline and not all(r.ready() for r in results.values()):
            time.sleep(0.05)
        for job, r in results.items():
            if not r.ready():
                continue
            done += 1
            try:
                err = r.get()
            except Exception as e:  # a worker that died
                err = f"{type(e).__name__}: {e}"
            if err:
                failed[job] = err
    finally:
        pool.terminate()
        pool.join()
    log(f"# precompiled {done}/{len(jobs)} kernels in {workers} processes, {time.perf_counter() - t0:.1f} s"
        + (f"; {len(failed)} failed (timed per case below)" if failed else ""))
    return failed


def run(out_dir: Path, budget_s: float, workers: int = 0, log=print) -> list[dict]:
    import triton
    from triton.testing import do_bench

    from freecure_ops import prepare_fasa_mask
    from freecure_ops.kernels.fasa_fwd import _sm_count, fasa_fwd, head_dim_split, pd_sdpa_op, tile_config

    from .masks import case_mask
    from .providers import make_problem

    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda}
    t_end = time.perf_counter() + budget_s
    sms = _sm_count(torch.cuda.current_device())

    def table_config(case):
        d0, d1 = head_dim_split(case.head_dim)
        return tile_config(d0 + d1, 2, case.n_q, case.heads, case.batch, sms)

    def timed(case):
        table = table_config(case)
        return timed_pairs(table, -(-case.n_q // table[0]) * case.heads * case.batch, sms)

    cases = distinct_cases()
    # Compiling may take at most 60% of the budget: the rest is for the timings (and the cache misses).
    precompile(compile_jobs(cases, timed), workers, time.perf_counter() + 0.6 * budget_s, log=log)
    rows = []
    for case in cases:
        table = table_config(case)
        for kind, cov in (("hair", 0.25), ("full", 1.0)):
            if time.perf_counter() > t_end:
                log(f"# sweep budget spent: {case.name} {kind} and later cases not swept")
                return rows
            p = make_problem(case, torch.float16, cov, "cuda", mask_kind=kind)
            mask = prepare_fasa_mask(p.mask)
            kw = dict(scale=p.scale, omega=p.omega, mode="bias", n_txt=case.n_txt)
            want = fasa_fwd(p.q, p.k_p, p.k_f, p.v_p, p.v_f, mask, **kw)
            assert mask.binary, "the sweep's masks are binary: the default launch takes the binary loop"
            for cfg, variant in timed(case):
                row = {**env, "case": case.name, "head_dim": case.head_dim, "batch": case.batch, "mask": kind,
                       "live_keys": round(float(case_mask(case.grid, cov, 0, kind)[1]), 4),
                       "config": "x".join(map(str, cfg)), "variant": variant,
                       "table": cfg == table and variant == DEFAULT_VARIANT, "ms": None, "status": "", "note": ""}
                bm, bn, warps, stages = cfg
                if variant == "pd-gluon" and pd_sdpa_op(p.q, p.k_p, p.v_p, p.scale, "gluon") is None:
                    row.update(status="n/a", note="the Gluon PD kernel takes sm_90 and head dim 64/128 only")
                    rows.append(row)
                    continue

                def fn():
                    return fasa_fwd(p.q, p.k_p, p.k_f, p.v_p, p.v_f, mask, block_m=bm, block_n=bn,
                                    num_warps=warps, num_stages=stages, **VARIANTS[variant], **kw)
                try:
                    err = (fn().float() - want.float()).abs().max().item()
                    if not err <= 2e-3:  # same math, another tiling: fp16 rounding of the output only
                        row.update(status="FAIL", note=f"max diff {err:.2e} vs the default launch")
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
    """Per case and mask: the default launch, the best (config + variant), their ratio, each variant's best."""
    lines = [f"{'case':16s} {'mask':5s} {'table config':13s} {'table ms':>9s} {'best config':23s} {'best ms':>9s} "
             f"{'table/best':>10s}" + "".join(f" {v:>9s}" for v in VARIANTS)]
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
        per_variant = ""
        for v in VARIANTS:
            ms = [r["ms"] for r in ok if r.get("variant", DEFAULT_VARIANT) == v]
            per_variant += f" {min(ms):9.4f}" if ms else f" {'-':>9s}"
        label = f"{best['config']}:{best.get('variant', DEFAULT_VARIANT)}"
        lines.append(f"{case:16s} {kind:5s} {table['config']:13s} {table['ms']:9.4f} {label:23s} "
                     f"{best['ms']:9.4f} {table['ms'] / best['ms']:10.2f}{per_variant}")
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
    ap.add_argument("--compile-workers", type=int, default=min(12, max(1, (os.cpu_count() or 2) - 2)),
                    help="processes that compile the kernels before the timings (0: compile on first launch)")
    args = ap.parse_args(argv)
    if args.compile_workers < 0:
        ap.error("--compile-workers: must be >= 0")
    if not torch.cuda.is_available():
        print("tile_sweep: no CUDA device; tile timings need a GPU (offline compile facts: bench/COMPILE.md)")
        return 0
    rows = run(args.out, args.budget_s, args.compile_workers)
    write(rows, args.out)
    sys.stdout.write(summary(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
