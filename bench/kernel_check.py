"""The CPU stand-in for kernel timings: the Triton kernel run through Triton's interpreter on tiny shapes
(an SD-like case with a padded head dim and a non-square grid, a FLUX-like case with text tokens), held
against the float64 oracle. Correctness only: interpreter times say nothing about the GPU."""
from __future__ import annotations

import sys

import torch

from .providers import make_problem, oracle
from .runner import _base_row, _first_line, check, versions
from .shapes import Case

TINY = (
    Case("sd15", "tiny-sd", 2, 2, 40, (6, 8), layers=0, omega=0.5),
    Case("flux", "tiny-flux", 1, 2, 32, (4, 6), n_txt=8, layers=0, omega=1.5),
)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COVERAGES = (0.25, 1.0)


def interpreter_status() -> str | None:
    """None when the kernel can run on CPU tensors here, else the reason it cannot."""
    import os

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        if "triton" in sys.modules:
            return ("triton was imported before TRITON_INTERPRET=1 could be set; "
                    "run `python -m freecure_ops.bench` afresh")
        return "TRITON_INTERPRET=1 is not set"
    return None


def run_kernel_check(log=print) -> list:
    """One row per (tiny case, dtype, coverage): status "ok" or "FAIL", with the max error and tolerance."""
    from freecure_ops import fasa_attention

    reason = interpreter_status()
    env = versions()
    rows = []
    if reason:
        log(f"# kernel interpreter check skipped: {reason}")
        return rows
    note = "Triton interpreter on CPU: correctness only, not timed" + " (bf16 tl.dot upcast to fp32 there)"
    for case in TINY:
        for dtype in DTYPES:
            for cov in COVERAGES:
                p = make_problem(case, dtype, cov, "cpu", seed=7)
                row = _base_row(p, "fasa", env)
                try:
                    out = fasa_attention(p.q, p.k_p, p.k_f, p.v_p, p.v_f, p.mask, p.omega, scale=p.scale,
                                         n_txt=case.n_txt, backend="triton")
                    ok, err, tol = check(out, oracle(p, "fasa"), dtype)
                    row.update(status="ok" if ok else "FAIL", max_err=err, tol=tol, note=note)
                except Exception as e:
                    row.update(status="error", note=_first_line(e))
                if row["status"] != "ok":
                    log(f"# kernel check {case.name} {p.dtype_name} cov {cov:g}: {row['status']} {row['note']}")
                rows.append(row)
    return rows
