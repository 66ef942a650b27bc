"""``freecure bench`` / ``python -m freecure_ops.bench``: FASA kernel benchmarks against SDPA and peers
at real model shapes.

On CUDA: every provider at full size, fp16 and bf16, four mask coverages, then the end-to-end step.
On CPU: the torch backend (fasa[torch]) against sdpa_bias, sdpa_gather and the authors' code at reduced sizes
in fp32, hair masks and the full mask, plus an interpreter correctness run of the kernel (about 2 minutes on
a 2-core machine); kernel timings need CUDA.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import __name__ as _pkg  # noqa: F401  (the package module sets TRITON_INTERPRET first)

import torch  # noqa: E402

from .masks import MASK_KINDS  # noqa: E402
from .providers import PROVIDERS, dtype_name  # noqa: E402
from .shapes import MODELS, cases_for, reduced  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_COVERAGES = (0.10, 0.25, 0.50, 1.00)
# do_bench times (ms) on CUDA; chosen so the full run (7 cases x 2 dtypes x 4 coverages x 6 providers) fits
# about 8 minutes on an H100, flex compilation included.
TIMING_CUDA = {"warmup_ms": 20.0, "rep_ms": 60.0}
TIMING_CUDA_QUICK = {"warmup_ms": 5.0, "rep_ms": 15.0}
TIMING_CPU = {"cpu_max_reps": 7, "cpu_budget_s": 0.4}
# The CPU main job: what it times by default (the rest on request), and what a run took on the project's
# 2-core machine (bench/results/cpu/), which the README quotes.
CPU_PROVIDERS = ("fasa", "fasa[torch]", "sdpa_bias", "sdpa_gather", "authors")
CPU_MASKS = ("hair", "full")
DEFAULT_OUT = "bench_out"
TIMING_CPU_QUICK = {"cpu_max_reps": 2, "cpu_budget_s": 0.0}


def _csv_list(text: str, allowed=None, what="value") -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if allowed is not None:
        bad = [t for t in items if t not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad}; choose from {list(allowed)}")
    if not items:
        raise argparse.ArgumentTypeError(f"empty {what} list")
    return items


def _coverages(text: str) -> list:
    out = []
    for t in _csv_list(text, what="coverage"):
        v = float(t.rstrip("%"))
        v = v / 100 if (v > 1 or t.endswith("%")) else v
        if not 0 < v <= 1:
            raise argparse.ArgumentTypeError(f"coverage {t!r} must be in (0, 1] or (0, 100]%")
        out.append(round(v, 6))
    return out


def _prog() -> str:
    """How the user started us: ``freecure bench`` (the CLI entry point) or ``python -m freecure_ops.bench``."""
    return "freecure bench" if Path(sys.argv[0]).name.startswith("freecure") else "python -m freecure_ops.bench"


def _out_dir(text: str) -> Path:
    """--out: a folder that is (or can be created) writable, checked before any benchmark runs."""
    from freecure_ops.outputs import output_dir_problem

    problem = output_dir_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text}: {problem}")
    return Path(text)


class _Parser(argparse.ArgumentParser):
    """One-line usage errors, as the rest of the CLI: ``freecure: error: --models: ...``, exit status 2."""

    def error(self, message):
        who = "freecure" if self.prog.startswith("freecure") else self.prog
        text = " ".join(str(message).split()).replace("argument ", "", 1)
        self.exit(2, f"{who}: error: {text} (see {self.prog} --help)\n")


def parse_args(argv=None, prog=None):
    ap = _Parser(prog=prog or _prog(), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=lambda s: _csv_list(s, MODELS, "model"), default=list(MODELS),
                    help=f"comma list from {','.join(MODELS)} (default: all)")
    ap.add_argument("--dtypes", type=lambda s: _csv_list(s, DTYPES, "dtype"), default=None,
                    help="comma list from fp16,bf16,fp32 (default: fp16,bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--coverages", type=_coverages, default=None,
                    help="mask coverages, fractions or percents (default: 10,25,50,100)")
    ap.add_argument("--masks", type=lambda s: _csv_list(s, MASK_KINDS, "mask kind"), default=None,
                    help="mask kinds from hair (blobs touching most rows), band (eyes/glasses), full (every token) "
                         f"(default: all on CUDA, {','.join(CPU_MASKS)} on CPU; hair and band at each coverage, "
                         "full once)")
    ap.add_argument("--providers", type=lambda s: _csv_list(s, PROVIDERS, "provider"), default=None,
                    help=f"comma list from {','.join(PROVIDERS)} (default: all on CUDA, "
                         f"{','.join(CPU_PROVIDERS)} on CPU; on CPU flex runs only when named; quote fasa[torch] "
                         "in a shell)")
    ap.add_argument("--out", type=_out_dir, default=DEFAULT_OUT,
                    help=f"folder for table.txt, bench.csv, bench.png (default: ./{DEFAULT_OUT}); checked first")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: first dtype only, coverages 25,100 unless given, short timing")
    ap.add_argument("--full-size", action="store_true", help="on CPU, run the real (not reduced) shapes")
    ap.add_argument("--no-kernel-check", action="store_true", help="on CPU, skip the interpreter correctness run")
    ap.add_argument("--no-e2e", action="store_true", help="on CUDA, skip the end-to-end denoising step")
    ap.add_argument("--threads", type=int, default=None,
                    help="on CPU, torch threads (default: torch's own); 1 gives steadier times on a shared machine")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv=None, prog=None) -> int:
    args = parse_args(argv, prog)
    from . import report
    from .runner import run, versions

    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    if args.threads is not None and not cuda:
        torch.set_num_threads(max(1, args.threads))
    device = torch.device("cuda" if cuda else "cpu")
    dtypes = [DTYPES[d] for d in (args.dtypes or (["fp16", "bf16"] if cuda else ["fp32"]))]
    coverages = args.coverages or ([0.25, 1.0] if args.quick else list(DEFAULT_COVERAGES))
    if args.quick:
        dtypes = dtypes[:1]
    providers = args.providers or list(PROVIDERS if cuda else CPU_PROVIDERS)
    masks = args.masks or list(MASK_KINDS if cuda else CPU_MASKS)
    cases = cases_for(args.models)
    if not cuda and not args.full_size:
        cases = [reduced(c) for c in cases]
    timing = (TIMING_CUDA_QUICK if args.quick else TIMING_CUDA) if cuda else \
        (TIMING_CPU_QUICK if args.quick else TIMING_CPU)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 oracle must be fp32
        torch.backends.cudnn.allow_tf32 = False

    env = versions()
    out_dir = args.out
    notes = []  # the run's caveats: printed, and written at the top of table.txt

    def say(line=""):
        print(line, flush=True)
        if line.startswith("# ") and not line.startswith("# wrote"):
            notes.append(line)
    stack = (f"driver {env['driver'] or '-'}, torch {env['torch']}, triton {env['triton']}, "
             f"CUDA {env['cuda'] or '-'}")
    say(f"# FASA benchmark on {env['device']}: {stack}")
    if not cuda:
        say("# No CUDA device: KERNEL TIMINGS NEED CUDA. The fasa rows below are not timed; the Triton kernel")
        say("# is checked for correctness in the Triton interpreter on tiny shapes instead.")
        if not args.full_size:
            say("# Torch providers run at REDUCED sizes (heads <= 2, token grid halved per side, text tokens / 4;")
            say("# head dims and batch as in the real models).")
        if torch.float32 in dtypes:
            say("# dtype fp32: CPU fp16/bf16 SDPA is slow and says nothing about GPU behaviour.")
    say(f"# cases: {', '.join(c.name for c in cases)}; dtypes: {', '.join(dtype_name(d) for d in dtypes)}; "
        f"masks: {', '.join(masks)}; coverages: {', '.join(f'{c:.0%}' for c in coverages)}; "
        f"providers: {', '.join(providers)}")
    if not cuda:
        say(f"# CPU timings: medians of at most {timing['cpu_max_reps']} calls on {torch.get_num_threads()} thread(s); "
            "on a machine shared with other jobs expect +-20% noise.")
        say("# ratios: 'vs bias' = sdpa_bias time / this row's time; 'x fasa' = this row's time / fasa[torch] time.")
        say("# CPU ratios say nothing about GPUs: SDPA's CPU flash kernel takes a bias mask at almost no cost, so")
        say("# on the CPU fasa[torch] gains over sdpa_bias by gathering the live keys, not by dropping the mask.")
    say("# Every provider is checked against a high-precision oracle (float64 on CPU, fp32 on CUDA) before it is"
        " timed; FLOPs count attended keys only: 4*B*H*D*(Nq*Np + (Nq-n_txt)*nnz).")

    rows = []
    if not cuda and "fasa" in providers and not args.no_kernel_check:
        from .kernel_check import run_kernel_check

        t = time.perf_counter()
        krows = run_kernel_check(log=say)
        if krows:
            n_ok = sum(r["status"] == "ok" for r in krows)
            say(f"# kernel interpreter check: {n_ok}/{len(krows)} ok "
                f"(tiny SD-like D=40 6x8 grid and FLUX-like n_txt=8; fp32/fp16/bf16; {time.perf_counter() - t:.1f} s)")
        rows += krows

    out_dir.mkdir(parents=True, exist_ok=True)
    done = list(rows)
    header = "\n".join(notes) + "\n\n"

    def progress(so_far):  # a run stopped by a time limit still leaves its CSV and table
        report.write_csv(so_far, out_dir / "bench.csv")
        (out_dir / "table.txt").write_text(header + report.format_table(so_far) + "\n")

    rows += run(cases, dtypes, coverages, providers, device, timing=timing, log=say, seed=args.seed, masks=masks,
                allow_cpu_flex="flex" in (args.providers or ()),
                on_progress=lambda got: progress(done + got))
    skips = {}
    for r in rows:
        if r["status"] == "skip":
            skips.setdefault(r["provider"], r["note"])
    for prov, why in skips.items():
        say(f"# {prov} skipped: {why}")

    table = report.format_table(rows)
    say()
    say(table)
    say()
    csv_path = report.write_csv(rows, out_dir / "bench.csv")
    (out_dir / "table.txt").write_text(header + table + "\n")
    png = report.plot(rows, out_dir / "bench.png",
                      title=f"FASA providers on {env['device']} (torch {env['torch']}, triton {env['triton']})")
    say(f"# wrote {csv_path}, {out_dir / 'table.txt'}" + (f", {png}" if png else " (no timed rows to plot)"))

    if cuda and not args.no_e2e:
        from .e2e import run_e2e

        run_e2e(out_dir, log=say, quick=args.quick)
    elif not args.no_e2e:
        say("# end-to-end denoising step skipped: it needs CUDA (full-size SDXL UNet / FLUX-width transformer)")
    failed = [r for r in rows if r["status"] in ("FAIL", "error")]
    finished = f"# done in {time.perf_counter() - t0:.1f} s; {len(failed)} provider runs failed or errored"
    say(finished)
    with open(out_dir / "table.txt", "a") as f:  # the run's length, which the README quotes
        f.write(finished + "\n")
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
