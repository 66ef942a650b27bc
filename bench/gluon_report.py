"""Offline sm_90 report of the Gluon PD kernel (kernels/fasa_pd_gluon.py): no GPU needed.

    python -m freecure_ops.bench.gluon_report        # one table for the installed Triton (3.6 and 3.9 both work)

Compiles each case exactly as a launch on tensors of that shape would specialize it (diffusers'
``view(B, N, H, D).transpose(1, 2)`` layout) and reads the SASS with compile_report's readers: the key loop (the
loop holding a wgmma wait with one group pending, ``WARPGROUP.DEPBAR.LE gsb0, 0x1``), its instructions per 64
keys, its HGMMAs, what runs between the one-pending wait and the full wait (the softmax work under the PV
product), its EX2s and barriers (and how many threads each barrier waits for: 128 is one warpgroup), registers,
spills, shared memory. Run it without TRITON_INTERPRET (the interpreter cannot compile for a GPU).
"""
from __future__ import annotations

import os
import re
import sys

import torch

from .compile_report import HOPPER_SMEM_LIMIT, _cuobjdump, _resource_usage, sass_instructions, sass_loops

# (name, head dim, dtype, tokens, heads, config overrides): SDXL's 4096-token d64 layers and FLUX's 4608-token
# d128 joint sequence, the default config and the variants the GPU sweep would time.
CASES = (
    ("d64-fp16-sdxl4096", 64, torch.float16, 4096, 10, {}),
    ("d64-fp16-sdxl4096-bn64", 64, torch.float16, 4096, 10, dict(BLOCK_N=64)),
    ("d64-fp16-sdxl4096-ws8", 64, torch.float16, 4096, 10, dict(SPLIT_WG=False, num_warps=8)),
    ("d64-fp16-sdxl4096-nows", 64, torch.float16, 4096, 10, dict(SPLIT_WG=False, WARP_SPEC=False, num_warps=8)),
    ("d128-bf16-flux4608", 128, torch.bfloat16, 4608, 24, {}),
    ("d128-bf16-flux4608-bn128", 128, torch.bfloat16, 4608, 24, dict(BLOCK_N=128)),
    ("d128-bf16-flux4608-ws8", 128, torch.bfloat16, 4608, 24, dict(SPLIT_WG=False, num_warps=8)),
    ("d128-bf16-flux4608-nows", 128, torch.bfloat16, 4608, 24, dict(SPLIT_WG=False, WARP_SPEC=False, num_warps=8)),
)


def compile_sm90(head_dim: int = 64, dtype=torch.float16, n_q: int = 4096, n_k: int = 4096, heads: int = 10,
                 batch: int = 1, layout: str = "diffusers", cfg: dict | None = None):
    """The kernel compiled for sm_90a with the specialization a launch on (q, k, v) of this shape gets
    (diffusers' layout, or "bhnd" contiguous): Triton's CompiledKernel (``.asm["ttgir"|"ptx"|"cubin"]``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.experimental.gluon._runtime import GluonASTSource  # 3.6 exports it only from here
    from triton.runtime.jit import create_function_from_signature

    from freecure_ops.kernels import fasa_pd_gluon as g

    def make(n):
        if layout == "diffusers":
            return torch.empty(batch, n, heads * head_dim, dtype=dtype).view(batch, n, heads, head_dim).transpose(1, 2)
        return torch.empty(batch, heads, n, head_dim, dtype=dtype)

    _, args, meta, _, _ = g.launch_args(make(n_q), make(n_k), make(n_k), head_dim ** -0.5, cfg)
    kernel = g._pd_attn_fwd
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, specialization, options)
    return triton.compile(GluonASTSource(kernel, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def _wgmma_wait(instr, pending: int) -> bool:
    """``WARPGROUP.DEPBAR.LE gsb0, 0x<pending>``: wait until at most ``pending`` wgmma groups are in flight."""
    m = re.match(r"gsb0\s*,\s*(0x[0-9a-f]+|\d+)", instr.operands.strip())
    return instr.opcode == "WARPGROUP" and instr.mods[:2] == ("DEPBAR", "LE") and m is not None \
        and int(m.group(1), 0) == pending


def _barrier_threads(instr) -> int:
    """Threads a ``BAR.SYNC id[, n]`` waits for (0: the whole CTA)."""
    parts = [p.strip() for p in instr.operands.split(",")]
    return int(parts[1], 0) if len(parts) > 1 and parts[1] else 0


def sass_report(compiled) -> dict:
    """What the SASS of one compile shows about the key loop (see the module docstring)."""
    cubin = compiled.asm["cubin"]
    regs, spill = _resource_usage(cubin)
    sass = _cuobjdump(cubin, "-sass")
    key_loops = [body for body in sass_loops(sass) if any(_wgmma_wait(i, 1) for i in body)]
    body = key_loops[0] if key_loops else []
    under = []  # between the one-pending wait and the full wait: issued while the PV wgmma runs
    for i in body[next((k for k, i in enumerate(body) if _wgmma_wait(i, 1)), len(body)) + 1:]:
        if _wgmma_wait(i, 0):
            break
        under.append(i)
    bars = [i for i in body if i.opcode == "BAR" and i.mods[:1] == ("SYNC",)]
    return dict(
        regs=regs, spill=spill, shared=compiled.metadata.shared,
        loop_instr=len(body),
        loop_hgmma=sum(i.opcode == "HGMMA" for i in body),
        loop_depbar_1=sum(_wgmma_wait(i, 1) for i in body),
        loop_depbar_0=sum(_wgmma_wait(i, 0) for i in body),
        under_pv_instr=len(under),
        under_pv_ex2=sum(i.opcode == "MUFU" and "EX2" in i.mods for i in under),
        loop_ex2=sum(i.opcode == "MUFU" and "EX2" in i.mods for i in body),
        loop_bar_sync=len(bars),
        loop_bar_threads=sorted({_barrier_threads(i) for i in bars}),
        depbar_1_total=sum(_wgmma_wait(i, 1) for i in sass_instructions(sass)),
    )


def violations(r: dict) -> list[str]:
    """The claims of kernels/fasa_pd_gluon.py that this compile does not keep."""
    out = []
    if not r["loop_depbar_1"]:
        out.append("no wgmma wait with one group pending in a loop: nothing overlaps")
    if r["loop_hgmma"] < 8:
        out.append(f"the key loop has {r['loop_hgmma']} HGMMA instructions")
    if not r["under_pv_instr"]:
        out.append("no instruction between the one-pending wait and the full wait")
    if r["spill"]:
        out.append(f"{r['spill']} bytes of register spills")
    if r["shared"] > HOPPER_SMEM_LIMIT:
        out.append(f"shared memory {r['shared']} B over sm_90's {HOPPER_SMEM_LIMIT}")
    return out


def report_rows(cases=CASES):
    from freecure_ops.kernels import fasa_pd_gluon as g

    rows = []
    for name, head_dim, dtype, n, heads, over in cases:
        cfg = {**g.config(head_dim), **over}
        r = sass_report(compile_sm90(head_dim, dtype, n, n, heads, cfg=cfg))
        consumer_warps = 8 if cfg["SPLIT_WG"] else cfg["num_warps"]
        rows.append(dict(case=name, config=f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{consumer_warps}w"
                         f"{'+1' if cfg['WARP_SPEC'] else ''}x{cfg['STAGES']}", **r,
                         instr_per_64_keys=round(r["loop_instr"] * 64 / cfg["BLOCK_N"])))
    return rows


COLUMNS = ("case", "config", "regs", "spill", "shared", "loop_instr", "instr_per_64_keys", "loop_hgmma",
           "loop_depbar_1", "loop_depbar_0", "under_pv_instr", "under_pv_ex2", "loop_ex2", "loop_bar_sync",
           "loop_bar_threads")


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("run without TRITON_INTERPRET=1: the interpreter cannot compile for a GPU", file=sys.stderr)
        return 2
    import triton

    rows = report_rows()
    table = [COLUMNS] + [tuple(str(r[c]).replace(" ", "") for c in COLUMNS) for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(COLUMNS))]
    print(f"Gluon PD loop, sm_90a offline compile, Triton {triton.__version__}, torch {torch.__version__}")
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)))
    failed = [(r["case"], v) for r in rows for v in violations(r)]
    for case, v in failed:
        print(f"!! {case}: {v}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
