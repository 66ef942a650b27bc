"""What the FASA kernel compiles to on Hopper (sm_90, H100/H200), read offline without a GPU.

Each case builds the launch exactly as a real call makes it (the launcher's own ``launch_plan``: diffusers'
``view(B, N, H, D).transpose(1, 2)`` layout, the adapters' PD/FD row slices of one batch, a prepared mask, the
tile table's config for the real shape) and lets Triton's own argument specialization decide what it may
assume (16-divisible strides, 16-byte aligned pointers, unit strides), then compiles to a cubin with the
wheel's ptxas and reads the results:

  shared     shared memory per block (limit 227 KB)
  regs       registers per thread; spill  stack bytes (register spills, want 0)
  ld16       scalar 2-byte global loads in the PTX (want 0: rows load as 16-byte vectors / async copies)
  pipelined  key loops whose loads are multi-buffered (an ``async_wait`` with copies left in flight inside
             the loop); want 2: the PD loop and the FD loop (1 for ``-pdsdpa``: the FD loop)
  buffers    depth of the K/V shared-memory ring of those loops
  wgmma      Hopper tensor-core MMAs present
  pd_instr   SASS instructions in the PD key loop's body (its cost per PD key tile)
  fd_instr   SASS instructions in the FD key loop's body (its cost per FD key tile)
  fd_keys    keys per FD key tile (BLOCK_N_FD); fd_instr * 64 / fd_keys is the cost per 64 FD keys
  ctas       programs per SM by registers, warps and shared memory (occupancy)
  merge_regs / merge_spill   split-KV's merge kernel (0: no split)

Cases named ``-bin`` take the binary-mask FD loop, ``-split`` the split-KV launch, ``-pdsdpa`` the FD program
alone (the PD keys by torch's SDPA; pd_instr 0, one pipelined loop) and the merge; compare each with the case of
the same name without the suffix. ``-fd128``: the packed FD loop's key tiles at 128 keys (the PD loop's stay at the
table's BLOCK_N); ``-bn128``: BLOCK_N 128 for both loops.

Run it (``python -m freecure_ops.bench.compile_report``) under the Triton at hand; under another Triton, put
that one first on the path: ``pip install --target /tmp/t36 triton==3.6.0`` then
``PYTHONPATH=/tmp/t36 python -m freecure_ops.bench.compile_report``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

if "triton" not in sys.modules:  # the package's CPU fallback switches the interpreter on; this needs the compiler
    os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402

HOPPER_SMEM_LIMIT = 232448  # bytes per block on sm_90 (227 KB)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class CompileCase:
    dtype: str
    head_dim: int
    mode: str = "bias"
    n_txt: int = 0            # > 0: FLUX joint sequence, one PD/FD pair in a plain batch
    heads: int = 8
    grid: tuple = (64, 64)    # image tokens
    pairs: int = 1            # PD rows per call (one image per guidance half)
    lse: bool = False         # the adapters never ask for the LSE
    layout: str = "diffusers"  # or "strided_d": a non-unit head-dim stride (the unaligned fallback)
    binary: bool = False      # the binary-mask FD loop (one scalar bias, no per-key value loads)
    split: bool = False       # the split-KV launch (PD and FD keys in separate programs, then a merge)
    pd_sdpa: bool = False     # the PD keys by torch's SDPA: the FD program alone, then the merge
    fd_block_n: int = 0       # > 0: the packed FD loop's own key-tile size (fasa_fwd's fd_block_n)
    block_n: int = 0          # > 0: BLOCK_N (both key loops unless fd_block_n) instead of the tile table's

    @property
    def name(self) -> str:
        txt = f"-txt{self.n_txt}" if self.n_txt else ""
        extra = ("-lse" if self.lse else "") + ("" if self.layout == "diffusers" else f"-{self.layout}")
        extra += ("-bin" if self.binary else "") + ("-split" if self.split else "")
        extra += "-pdsdpa" if self.pd_sdpa else ""
        extra += (f"-bn{self.block_n}" if self.block_n else "") + (f"-fd{self.fd_block_n}" if self.fd_block_n else "")
        return f"{self.dtype}-d{self.head_dim}-{self.mode}{txt}-{self.heads}h-{self.grid[0]}x{self.grid[1]}{extra}"


# Every head dim the models use (SD1.5 40/80/160, SDXL 64, FLUX 128) plus 72 (not a multiple of 16) in both
# modes and both 16-bit dtypes across the set; the FLUX joint sequence; the LSE variant; fp32; the fallbacks.
CASES = (
    CompileCase("fp16", 40), CompileCase("bf16", 40, "scale"),
    CompileCase("fp16", 64, heads=10), CompileCase("bf16", 64, "scale", heads=20, grid=(32, 32)),
    CompileCase("bf16", 72), CompileCase("fp16", 72, "scale"),
    CompileCase("fp16", 80, grid=(32, 32)), CompileCase("bf16", 80, "scale", grid=(32, 32)),
    CompileCase("bf16", 128, n_txt=512, heads=24), CompileCase("fp16", 128, "scale", n_txt=512, heads=24),
    CompileCase("fp16", 128, n_txt=64, heads=4, grid=(16, 16)),
    CompileCase("fp16", 160, grid=(16, 16)), CompileCase("bf16", 160, "scale", grid=(16, 16)),
    CompileCase("bf16", 256, heads=2, grid=(16, 16)),
    CompileCase("fp16", 64, heads=10, lse=True),
    CompileCase("fp32", 72), CompileCase("fp32", 160, "scale", grid=(16, 16)),
    CompileCase("fp16", 111, heads=2, grid=(16, 16)),
    CompileCase("fp16", 64, heads=2, grid=(16, 16), layout="strided_d"),
)
# The kernel variants the GPU tile sweep times: the binary FD loop on every model's "bias" case (against the
# float loop above), split-KV on the grids under one wave of programs (SD1.5 1024/256, SDXL 1024 at B=1) and
# on a FLUX joint sequence (text rows), with and without the binary loop.
VARIANT_CASES = (
    CompileCase("fp16", 40, binary=True), CompileCase("fp16", 64, heads=10, binary=True),
    CompileCase("bf16", 72, binary=True), CompileCase("fp16", 80, grid=(32, 32), binary=True),
    CompileCase("bf16", 128, n_txt=512, heads=24, binary=True), CompileCase("fp16", 160, grid=(16, 16), binary=True),
    CompileCase("fp16", 80, grid=(32, 32), split=True), CompileCase("fp16", 80, grid=(32, 32), binary=True, split=True),
    CompileCase("fp16", 160, grid=(16, 16), binary=True, split=True),
    CompileCase("bf16", 64, heads=20, grid=(32, 32), binary=True, split=True),
    CompileCase("fp16", 128, "scale", n_txt=64, heads=4, grid=(16, 16), split=True),
    CompileCase("fp16", 128, n_txt=64, heads=4, grid=(16, 16), binary=True, split=True, lse=True),
)
# pd_sdpa: the FD-only program (the PD keys go to torch's cuDNN/flash/efficient SDPA, not compiled here) and
# the merge, at every model head dim's "bias" case with the binary loop (what a bool mask gets), one float
# loop, one "scale" case and the FLUX joint sequence with and without text rows sharing a query tile.
PD_SDPA_CASES = (
    CompileCase("fp16", 40, binary=True, pd_sdpa=True), CompileCase("fp16", 64, heads=10, binary=True, pd_sdpa=True),
    CompileCase("fp16", 64, heads=10, pd_sdpa=True),
    CompileCase("bf16", 72, binary=True, pd_sdpa=True),
    CompileCase("fp16", 80, grid=(32, 32), binary=True, pd_sdpa=True),
    CompileCase("bf16", 128, n_txt=512, heads=24, binary=True, pd_sdpa=True),
    CompileCase("fp16", 128, "scale", n_txt=512, heads=24, pd_sdpa=True),
    CompileCase("fp16", 160, grid=(16, 16), binary=True, pd_sdpa=True),
    CompileCase("fp16", 128, n_txt=64, heads=4, grid=(16, 16), binary=True, pd_sdpa=True, lse=True),
)
# 128-key tiles (issue 27 item 3): the binary FD loop alone at 128 keys (fd_block_n, the PD loop at the table's
# 64) on every model head dim's "bias" case up to 128 (head dim 160 needs 266 KB of shared memory: no fit), one
# float FD loop at 128 (the spill the tile table's docstring speaks of), and both loops at 128 keys (block_n),
# binary and float, at 64 and 128 query rows.
FD128_CASES = (
    CompileCase("fp16", 40, binary=True, fd_block_n=128), CompileCase("fp16", 64, heads=10, binary=True, fd_block_n=128),
    CompileCase("bf16", 72, binary=True, fd_block_n=128), CompileCase("fp16", 80, grid=(32, 32), binary=True, fd_block_n=128),
    CompileCase("bf16", 128, n_txt=512, heads=24, binary=True, fd_block_n=128),
    CompileCase("fp16", 64, heads=10, fd_block_n=128),
    CompileCase("fp16", 40, binary=True, block_n=128), CompileCase("fp16", 40, block_n=128),
    CompileCase("fp16", 64, heads=10, binary=True, block_n=128), CompileCase("fp16", 64, heads=10, block_n=128),
)
CASES = CASES + VARIANT_CASES + PD_SDPA_CASES + FD128_CASES


def _qkv(case: CompileCase, dtype):
    """q, k_p, k_f, v_p, v_f as the adapters pass them: slices of one [PD rows; FD rows] batch in diffusers'
    layout (or with a stride-2 head dim)."""
    n = case.n_txt + case.grid[0] * case.grid[1]
    b, h, d = 2 * case.pairs, case.heads, case.head_dim

    def branch():
        if case.layout == "strided_d":
            return torch.empty(b, h, n, 2 * d, dtype=dtype)[..., ::2]
        return torch.empty(b, n, h * d, dtype=dtype).view(b, n, h, d).transpose(1, 2)

    q, k, v = branch(), branch(), branch()
    pd, fd = slice(0, case.pairs), slice(case.pairs, 2 * case.pairs)
    return q[pd], k[pd], k[fd], v[pd], v[fd]


def compile_case(case: CompileCase, config: tuple | None = None):
    """(Triton's CompiledKernel, tile config, ALIGN, the merge kernel's CompiledKernel or None) for ``case``,
    built through the launcher's own plan with the tile table's config (or ``config``: BLOCK_M, BLOCK_N,
    num_warps, num_stages)."""
    from freecure_ops import prepare_fasa_mask
    from freecure_ops.kernels.fasa_fwd import (_fasa_fwd_kernel, _merge_kernel, head_dim_split, launch_plan,
                                               tile_config)

    dtype = DTYPES[case.dtype]
    q, k_p, k_f, v_p, v_f = _qkv(case, dtype)
    n_img = case.grid[0] * case.grid[1]
    mask = prepare_fasa_mask(torch.arange(n_img) % 4 == 0)
    d0, d1 = head_dim_split(case.head_dim)
    config = config or tile_config(d0 + d1, q.element_size(), q.shape[2], case.heads, case.pairs)
    if case.block_n:
        config = (config[0], case.block_n, *config[2:])
    # torch's flash and cuDNN kernels return their output in q's layout and a contiguous fp32 LSE
    pd_part = (torch.empty_like(q), torch.empty(q.shape[:3])) if case.pd_sdpa else None
    _, args, meta, _, _, merge = launch_plan(q, k_p, k_f, v_p, v_f, mask, scale=case.head_dim ** -0.5, omega=1.5,
                                             mode=case.mode, n_txt=case.n_txt, return_lse=case.lse, config=config,
                                             interpret=False, binary=case.binary, split_kv=case.split,
                                             pd_part=pd_part, fd_block_n=case.fd_block_n or None)
    merged = None if merge is None else _compile(_merge_kernel, merge[1], merge[2])
    return _compile(_fasa_fwd_kernel, args, meta), config, meta["ALIGN"], merged


def _compile(kernel, args, meta):
    """Compile ``kernel`` for sm_90 with the specialization Triton's launcher would give ``args``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def _cuobjdump(cubin: bytes, *flags) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, *flags, f.name], capture_output=True, text=True, check=True).stdout


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    usage = _cuobjdump(cubin, "--dump-resource-usage")
    return int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"STACK:(\d+)", usage).group(1))


def _loop_instructions(sass: str) -> tuple[int, int]:
    """SASS instructions in the bodies of the kernel's first and last loops (each from a backward branch's
    target to the branch; the trailing ``BRA`` to itself is not a loop): the PD key loop and the FD key loop,
    whose costs are per key tile. (0, 0) when there is no loop."""
    loops = []
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?BRA\s+(0x[0-9a-f]+)", sass):
        at, target = int(m.group(1), 16), int(m.group(2), 16)
        if target < at:
            loops.append((target, at))
    if not loops:
        return 0, 0
    size = lambda loop: (loop[1] - loop[0]) // 16 + 1  # noqa: E731  sm_90 instructions are 16 bytes
    return size(loops[0]), size(loops[-1])


# sm_90 per-SM limits: 64K registers allocated per warp in units of 256, 64 warps, 32 blocks, 228 KB shared
# memory of which 1 KB is reserved per block.
SM_REGS, SM_WARPS, SM_BLOCKS, SM_SMEM, SMEM_RESERVED = 65536, 64, 32, 233472, 1024


def ctas_per_sm(regs: int, warps: int, shared: int) -> int:
    """Programs that fit on one SM at once (occupancy by registers, warps and shared memory)."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = (SM_REGS // per_warp) // warps
    by_smem = SM_SMEM // (shared + SMEM_RESERVED)
    return min(by_regs, SM_WARPS // warps, SM_BLOCKS, by_smem)


def _pipelined_loops(ttgir: str) -> tuple[int, int]:
    """(loops whose body waits with async copies still in flight, deepest shared-memory ring)."""
    loops, depth, stack = 0, 0, []
    for line in ttgir.splitlines():
        if "scf.for" in line and "=" in line:
            stack.append(False)
        elif re.match(r"\s*}", line) and stack and "scf.yield" not in line:
            loops += stack.pop()
        m = re.search(r"ttg\.async_wait.*\{num = (\d+)", line)
        if m and stack and int(m.group(1)) > 0:
            stack[-1] = True
        ring = re.search(r"local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x\d+x\d+x", line)
        if ring:
            depth = max(depth, int(ring.group(1)))
    return loops, depth


@dataclass
class Report:
    case: str
    config: str
    align: int
    shared: int
    regs: int
    spill: int
    ld16: int
    pipelined: int
    buffers: int
    wgmma: bool
    pd_instr: int     # SASS instructions per PD key tile (the first loop's body)
    fd_instr: int     # SASS instructions per FD key tile (the last loop's body)
    fd_keys: int      # keys per FD key tile (BLOCK_N_FD): fd_instr * 64 / fd_keys per 64 keys
    ctas: int         # programs per SM (registers, warps, shared memory)
    merge_regs: int   # split-KV's merge kernel: registers (0: no merge)
    merge_spill: int


def report(case: CompileCase, config: tuple | None = None) -> Report:
    kernel, config, align, merge = compile_case(case, config)
    fd_keys = case.fd_block_n if case.fd_block_n and case.mode == "bias" else config[1]
    regs, spill = _resource_usage(kernel.asm["cubin"])
    loops, depth = _pipelined_loops(kernel.asm["ttgir"])
    ld16 = len(re.findall(r"ld\.global(?:\.\w+)*\.[bu]16\b", kernel.asm["ptx"]))
    pd_instr, fd_instr = _loop_instructions(_cuobjdump(kernel.asm["cubin"], "-sass"))
    if case.pd_sdpa:  # no PD loop: the one loop is the FD loop's
        pd_instr = 0
    merge_regs, merge_spill = (0, 0) if merge is None else _resource_usage(merge.asm["cubin"])
    return Report(case.name, "x".join(map(str, config)), align, kernel.metadata.shared, regs, spill, ld16,
                  loops, depth, "wgmma" in kernel.asm["ptx"], pd_instr, fd_instr, fd_keys,
                  ctas_per_sm(regs, config[2], kernel.metadata.shared), merge_regs, merge_spill)


def table(reports) -> str:
    import triton

    head = f"FASA kernel, sm_90 offline compile, Triton {triton.__version__}, torch {torch.__version__}\n"
    cols = ("case", "config", "align", "shared", "regs", "spill", "ld16", "pipelined", "buffers", "wgmma",
            "pd_instr", "fd_instr", "fd_keys", "ctas", "merge_regs", "merge_spill")
    rows = [cols] + [tuple(str(getattr(r, c)) for c in cols) for r in reports]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    return head + "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows) + "\n"


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_report: triton was imported with TRITON_INTERPRET=1 (the interpreter cannot compile for a "
              "GPU); run it in a fresh process", file=sys.stderr)
        return 2
    as_json = "--json" in (argv if argv is not None else sys.argv[1:])
    reports = [report(c) for c in CASES]
    if as_json:
        for r in reports:
            print(json.dumps(asdict(r)))
    else:
        print(table(reports), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
