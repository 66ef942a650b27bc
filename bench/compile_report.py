"""What the FASA kernel compiles to on Hopper (sm_90, H100/H200), read offline without a GPU.

Each case builds the launch exactly as a real call makes it (the launcher's own ``launch_plan``: diffusers'
``view(B, N, H, D).transpose(1, 2)`` layout, the adapters' PD/FD row slices of one batch, a prepared mask, the
tile table's config for the real shape) and lets Triton's own argument specialization decide what it may
assume (16-divisible strides, 16-byte aligned pointers, unit strides), then compiles to a cubin with the
wheel's ptxas and reads the results:

  shared     shared memory per block (limit 227 KB)
  regs       registers per thread; spill  stack bytes (register spills, want 0)
  ldg        global loads in the SASS by bytes per access (``16:6 4:2``: six LDG.E.128, two 4-byte LDG.E)
  cp_async   async global-to-shared copies in the SASS (LDGSTS) by bytes per access
  ld16       global loads of 1 or 2 bytes in the SASS (LDG.E.U16 and the like; want 0: rows load as 16-byte
             vectors or async copies)
  stg        global stores in the SASS by bytes per access (want the output rows as 16-byte STG.E.128)
  pipelined  key loops (SASS loops: a backward branch to its target) that issue async copies (LDGSTS) and wait
             with copies still in flight (``DEPBAR.LE SB0, n`` with n > 0) inside the loop; want 2: the PD loop
             and the FD loop (1 for ``-pdsdpa``: the FD loop)
  buffers    depth of the K/V shared-memory ring of those loops (the TTGIR's 3-D shared-memory allocations)
  hgmma      Hopper tensor-core MMA instructions (HGMMA) in the SASS: what wgmma compiles to
  pd_instr   SASS instructions in the PD key loop's body (its cost per PD key tile)
  fd_instr   SASS instructions in the FD key loop's body (its cost per FD key tile)
  fd_keys    keys per FD key tile (BLOCK_N_FD); fd_instr * 64 / fd_keys is the cost per 64 FD keys
  ctas       programs per SM by registers, warps and shared memory (occupancy)
  merge_*    split-KV's (and pd_sdpa's) merge kernel (0 / -: no merge): registers, spill, global loads and
             stores by bytes per access, query rows per program, SASS instructions (straight-line code: each
             thread runs each once; merge_instr * 64 / merge_rows per 64 rows)

Every column that says what the machine code does is read from the SASS (cuobjdump of the cubin), by opcode at
an instruction's position: the string "wgmma" in the PTX (a ``wgmma.fence`` has it, so does a comment) or a
vector type in the PTX is not evidence. The TTGIR is read for the ring depth only (the shared-memory
allocation's shape). ``violations`` states what each case claims (no spills, 16-byte row loads and stores,
HGMMA, pipelined loops on the fast path) and says what is missing; the report exits 1 when a case misses one.

Cases named ``-bin`` take the binary-mask FD loop, ``-split`` the split-KV launch, ``-pdsdpa`` the FD program
alone (the PD keys by torch's SDPA; pd_instr 0, one pipelined loop) and the merge; compare each with the case of
the same name without the suffix. ``-fd128``: the packed FD loop's key tiles at 128 keys (the PD loop's stay at the
table's BLOCK_N); ``-bn128``: BLOCK_N 128 for both loops.

Run it (``python -m freecure_ops.bench.compile_report``; ``--json`` for one JSON object per case,
``--only=SUBSTRING`` (repeatable) for the cases whose names hold one, ``--jobs=N`` to compile in N processes)
under the Triton at hand; under another
Triton, put that one first on the path: ``pip install --target /tmp/t36 triton==3.6.0`` then
``PYTHONPATH=/tmp/t36 python -m freecure_ops.bench.compile_report`` (or a venv with it, as ``/work/venv211``).
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
# on a FLUX joint sequence (text rows), with and without the binary loop; split-KV's merge at every model head dim
# but 64 and 128 twice (head strides of 40 and 72 elements are not multiples of 16: the merge's vector stores).
VARIANT_CASES = (
    CompileCase("fp16", 40, binary=True), CompileCase("fp16", 64, heads=10, binary=True),
    CompileCase("bf16", 72, binary=True), CompileCase("fp16", 80, grid=(32, 32), binary=True),
    CompileCase("bf16", 128, n_txt=512, heads=24, binary=True), CompileCase("fp16", 160, grid=(16, 16), binary=True),
    CompileCase("fp16", 80, grid=(32, 32), split=True), CompileCase("fp16", 80, grid=(32, 32), binary=True, split=True),
    CompileCase("fp16", 40, binary=True, split=True), CompileCase("bf16", 72, binary=True, split=True),
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
    """(Triton's CompiledKernel, tile config, ALIGN, the merge or None) for ``case``, built through the
    launcher's own plan with the tile table's config (or ``config``: BLOCK_M, BLOCK_N, num_warps, num_stages).
    The merge: (its CompiledKernel, its keyword args: tile and piece sizes, warps)."""
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
    merged = None if merge is None else (_compile(_merge_kernel, merge[1], merge[2]), merge[2])
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


# One SASS instruction as cuobjdump prints it: ``/*0c20*/  @!P1 LDG.E.128 R4, desc[UR6][R2.64] ;``. Only an
# opcode at an instruction's position counts: a comment, a label or a symbol name holding "HGMMA" does not.
_SASS_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:(@!?U?P[0-9T]+)\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Za-z0-9_]+)*)"
                         r"(?:\s+([^;]*))?;", re.MULTILINE)
# Bytes per access from an LDG/STG/LDGSTS modifier; none of them: 4 bytes (``LDG.E``, ``STG.E``).
_ACCESS_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


@dataclass(frozen=True)
class Instr:
    at: int          # byte offset
    opcode: str      # "LDG"
    mods: tuple      # ("E", "128")
    operands: str


def sass_instructions(sass: str) -> list[Instr]:
    """The instructions of a cuobjdump ``-sass`` listing (any other text is ignored)."""
    return [Instr(int(m.group(1), 16), m.group(3), tuple(filter(None, m.group(4).split("."))), m.group(5) or "")
            for m in _SASS_INSTR.finditer(sass)]


def access_bytes(instr: Instr) -> int:
    return next((_ACCESS_BYTES[m] for m in instr.mods if m in _ACCESS_BYTES), 4)


def memory_widths(sass: str, opcode: str) -> dict[str, int]:
    """{bytes per access: count} of ``opcode`` (``LDG`` global loads, ``STG`` global stores, ``LDGSTS`` async
    copies) in a SASS listing, widest first; the keys are strings (JSON's)."""
    counts: dict[int, int] = {}
    for i in sass_instructions(sass):
        if i.opcode == opcode:
            counts[access_bytes(i)] = counts.get(access_bytes(i), 0) + 1
    return {str(k): counts[k] for k in sorted(counts, reverse=True)}


def widths_str(widths: dict) -> str:
    return " ".join(f"{b}:{n}" for b, n in widths.items()) or "-"


def hgmma_count(sass: str) -> int:
    """Hopper tensor-core MMAs (wgmma compiles to HGMMA; a ``wgmma.fence`` alone compiles to WARPGROUP.ARRIVE)."""
    return sum(i.opcode == "HGMMA" for i in sass_instructions(sass))


def sass_loops(sass: str) -> list[list[Instr]]:
    """The bodies of the listing's loops, in order: from a backward branch's target to the branch (the trailing
    ``BRA`` to itself is not a loop)."""
    instrs = sass_instructions(sass)
    loops = []
    for k, i in enumerate(instrs):
        target = re.match(r"(0x[0-9a-f]+)", i.operands.strip())
        if i.opcode == "BRA" and target and int(target.group(1), 16) < i.at:
            loops.append([j for j in instrs[:k + 1] if j.at >= int(target.group(1), 16)])
    return loops


def _loop_instructions(sass: str) -> tuple[int, int]:
    """SASS instructions in the bodies of the kernel's first and last loops: the PD key loop and the FD key loop,
    whose costs are per key tile. (0, 0) when there is no loop."""
    loops = sass_loops(sass)
    return (len(loops[0]), len(loops[-1])) if loops else (0, 0)


def _in_flight_wait(i: Instr) -> bool:
    """``DEPBAR.LE SB0, n`` with n > 0: wait until at most n async-copy groups are outstanding (cp.async.wait_group
    n), i.e. copies stay in flight across the wait. n = 0 waits for all (no overlap)."""
    m = re.match(r"SB0\s*,\s*(0x[0-9a-f]+|\d+)", i.operands.strip())
    return i.opcode == "DEPBAR" and "LE" in i.mods and m is not None and int(m.group(1), 0) > 0


def pipelined_loops(sass: str) -> int:
    """Loops that issue async copies (LDGSTS) and wait with copies still in flight: multi-buffered K/V loads."""
    return sum(any(i.opcode == "LDGSTS" for i in body) and any(_in_flight_wait(i) for i in body)
               for body in sass_loops(sass))


def ring_depth(ttgir: str) -> int:
    """Depth of the deepest shared-memory ring: the leading dim of the TTGIR's 3-D ``local_alloc``s (the SASS
    does not show an allocation's shape)."""
    depths = re.findall(r"=\s*ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)
    return max(map(int, depths), default=0)


def narrow_loads(widths: dict) -> int:
    """Global loads of under 4 bytes (scalar 1- or 2-byte elements)."""
    return sum(n for b, n in widths.items() if int(b) < 4)


def vector_store_problem(stg: dict, out_bytes_per_thread: int) -> str | None:
    """None when the stores hold what the report claims for output rows: no global store under 4 bytes, and
    16-byte stores covering a thread's share of the output tile (``out_bytes_per_thread``); else what is
    missing."""
    narrow = sum(n for b, n in stg.items() if int(b) < 4)
    wide = stg.get("16", 0)
    if narrow:
        return f"{narrow} global stores of 1-2 bytes ({widths_str(stg)}): output rows are not stored as vectors"
    if wide * 16 < out_bytes_per_thread:
        return (f"16-byte stores cover {wide * 16} of a thread's {out_bytes_per_thread} output bytes "
                f"({widths_str(stg)})")
    return None


def vector_load_problem(ldg: dict, in_bytes_per_thread: int) -> str | None:
    """None when 16-byte global loads cover a thread's share of the input rows and none is under 4 bytes."""
    narrow = narrow_loads(ldg)
    if narrow:
        return f"{narrow} global loads of 1-2 bytes ({widths_str(ldg)}): rows are not loaded as vectors"
    if ldg.get("16", 0) * 16 < in_bytes_per_thread:
        return f"16-byte loads cover {ldg.get('16', 0) * 16} of a thread's {in_bytes_per_thread} input bytes " \
               f"({widths_str(ldg)})"
    return None


# sm_90 per-SM limits: 64K registers allocated per warp in units of 256, 64 warps, 32 blocks, 228 KB shared
# memory of which 1 KB is reserved per block.
SM_REGS, SM_WARPS, SM_BLOCKS, SM_SMEM, SMEM_RESERVED = 65536, 64, 32, 233472, 1024


def ctas_per_sm(regs: int, warps: int, shared: int) -> int:
    """Programs that fit on one SM at once (occupancy by registers, warps and shared memory)."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = (SM_REGS // per_warp) // warps
    by_smem = SM_SMEM // (shared + SMEM_RESERVED)
    return min(by_regs, SM_WARPS // warps, SM_BLOCKS, by_smem)


@dataclass
class Report:
    case: str
    config: str
    align: int
    shared: int
    regs: int
    spill: int
    ldg: dict         # global loads by bytes per access (SASS LDG)
    cp_async: dict    # async copies by bytes per access (SASS LDGSTS)
    ld16: int         # global loads of 1-2 bytes
    stg: dict         # global stores by bytes per access (SASS STG)
    out_bytes: int    # bytes of output rows per thread (BLOCK_M x D of the output's dtype over the threads)
    pipelined: int
    buffers: int
    hgmma: int        # HGMMA instructions (SASS)
    pd_instr: int     # SASS instructions per PD key tile (the first loop's body)
    fd_instr: int     # SASS instructions per FD key tile (the last loop's body)
    fd_keys: int      # keys per FD key tile (BLOCK_N_FD): fd_instr * 64 / fd_keys per 64 keys
    ctas: int         # programs per SM (registers, warps, shared memory)
    merge_regs: int   # split-KV's merge kernel: registers (0: no merge)
    merge_spill: int
    merge_ldg: dict   # the merge's global loads / stores by bytes per access
    merge_stg: dict
    merge_in_bytes: int   # the merge's part 0 + part 1 row bytes per thread
    merge_out_bytes: int  # the merge's output row bytes per thread
    merge_rows: int       # query rows per merge program (BLOCK_M)
    merge_instr: int      # SASS instructions of the merge (straight-line: each thread runs them all once)


def report(case: CompileCase, config: tuple | None = None) -> Report:
    kernel, config, align, merge = compile_case(case, config)
    fd_keys = case.fd_block_n if case.fd_block_n and case.mode == "bias" else config[1]
    regs, spill = _resource_usage(kernel.asm["cubin"])
    sass = _cuobjdump(kernel.asm["cubin"], "-sass")
    ldg = memory_widths(sass, "LDG")
    pd_instr, fd_instr = _loop_instructions(sass)
    if case.pd_sdpa:  # no PD loop: the one loop is the FD loop's
        pd_instr = 0
    elem = DTYPES[case.dtype].itemsize
    partial = case.split or case.pd_sdpa  # the kernel writes fp32 partials, the merge the output
    out_bytes = config[0] * case.head_dim * (4 if partial else elem) // (32 * config[2])
    merge_regs = merge_spill = merge_in = merge_out = merge_rows = merge_instr = 0
    merge_ldg = merge_stg = {}
    if merge is not None:
        compiled, meta = merge
        merge_regs, merge_spill = _resource_usage(compiled.asm["cubin"])
        merge_sass = _cuobjdump(compiled.asm["cubin"], "-sass")
        merge_ldg, merge_stg = memory_widths(merge_sass, "LDG"), memory_widths(merge_sass, "STG")
        rows = meta["BLOCK_M"] * case.head_dim / (32 * meta["num_warps"])
        merge_in = int(rows * ((elem if case.pd_sdpa else 4) + 4))  # part 0 (torch's output or fp32) + fp32 part 1
        merge_out = int(rows * elem)
        merge_rows, merge_instr = meta["BLOCK_M"], len(sass_instructions(merge_sass))
    return Report(case.name, "x".join(map(str, config)), align, kernel.metadata.shared, regs, spill, ldg,
                  memory_widths(sass, "LDGSTS"), narrow_loads(ldg), memory_widths(sass, "STG"), out_bytes,
                  pipelined_loops(sass), ring_depth(kernel.asm["ttgir"]), hgmma_count(sass), pd_instr, fd_instr,
                  fd_keys, ctas_per_sm(regs, config[2], kernel.metadata.shared), merge_regs, merge_spill,
                  merge_ldg, merge_stg, merge_in, merge_out, merge_rows, merge_instr)


def fast_path(case: CompileCase) -> bool:
    """fp16/bf16 with unit head-dim strides and 16-byte aligned rows: the path every model takes."""
    return case.dtype != "fp32" and case.layout == "diffusers" and case.head_dim % 8 == 0


def float_fd_loop_on_128_keys(case: CompileCase) -> bool:
    """The float (per-key value) FD loop on 128-key tiles: a documented spill (tile_config's docstring),
    compiled to show it, never what the launcher picks."""
    return case.mode == "bias" and not case.binary and 128 in (case.fd_block_n, case.block_n)


def violations(case: CompileCase, r) -> list[str]:
    """What ``case``'s compile (a Report or its JSON dict) lacks of what this report claims for it; [] when
    nothing. Fast path (every model's launch): 16-byte aligned rows, HGMMA, no spills, no 1-2-byte loads, K/V
    as 16-byte async copies in every key loop, multi-buffered (a 3-deep ring), output rows stored as 16-byte
    vectors; the merge (split-KV, pd_sdpa): no spills, its rows loaded and stored as 16-byte vectors. The
    unaligned fallback (odd head dim, non-unit head-dim stride): scalar loads, as expected."""
    r = r if isinstance(r, dict) else asdict(r)
    bad = []
    if r["shared"] > HOPPER_SMEM_LIMIT:
        bad.append(f"shared memory {r['shared']} B over the {HOPPER_SMEM_LIMIT} B limit")
    if fast_path(case):
        if r["align"] != 8:
            bad.append(f"align {r['align']}: the launcher should prove 16-byte aligned rows for this layout")
        if r["hgmma"] == 0:
            bad.append("no HGMMA in the SASS: no Hopper tensor-core MMAs")
        if r["spill"] and not float_fd_loop_on_128_keys(case):
            bad.append(f"{r['spill']} B of register spills")
        if r["ld16"]:
            bad.append(f"{r['ld16']} global loads of 1-2 bytes: rows are not loaded as vectors")
        # K/V rows as 16-byte async copies; narrower ones only where the FD loop also copies the fp32 mask value
        # of each key ("scale" mode's per-key factors: 4-byte copies under Triton 3.9, 8-byte pairs under 3.6)
        if "16" not in r["cp_async"] or set(r["cp_async"]) - ({"16", "8", "4"} if case.mode == "scale" else {"16"}):
            bad.append(f"K/V async copies {widths_str(r['cp_async'])}: want 16-byte LDGSTS")
        loops = 1 if case.pd_sdpa else 2  # pd_sdpa: the FD loop alone (the PD keys are torch's SDPA's)
        if r["pipelined"] != loops or r["buffers"] < 3:
            bad.append(f"{r['pipelined']} of {loops} key loops multi-buffered ({r['buffers']} buffers)")
        problem = vector_store_problem(r["stg"], r["out_bytes"])
        if problem:
            bad.append("kernel: " + problem)
        if r["merge_regs"]:
            if r["merge_spill"]:
                bad.append(f"merge: {r['merge_spill']} B of register spills")
            for problem in (vector_load_problem(r["merge_ldg"], r["merge_in_bytes"]),
                            vector_store_problem(r["merge_stg"], r["merge_out_bytes"])):
                if problem:
                    bad.append("merge: " + problem)
    elif case.dtype != "fp32":
        if r["align"] != 1 or r["ld16"] == 0:
            bad.append(f"the unaligned fallback should load scalars (align {r['align']}, ld16 {r['ld16']})")
    if (case.split or case.pd_sdpa) and not r["merge_regs"]:
        bad.append("no merge kernel compiled")
    return bad


COLUMNS = ("case", "config", "align", "shared", "regs", "spill", "ldg", "cp_async", "ld16", "stg", "pipelined",
           "buffers", "hgmma", "pd_instr", "fd_instr", "fd_keys", "ctas", "merge_regs", "merge_spill", "merge_ldg",
           "merge_stg", "merge_rows", "merge_instr")


def table(reports) -> str:
    import triton

    head = f"FASA kernel, sm_90 offline compile, Triton {triton.__version__}, torch {torch.__version__}\n"
    cell = lambda v: widths_str(v) if isinstance(v, dict) else str(v)  # noqa: E731
    rows = [COLUMNS] + [tuple(cell(getattr(r, c)) for c in COLUMNS) for r in reports]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return head + "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows) + "\n"


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_report: triton was imported with TRITON_INTERPRET=1 (the interpreter cannot compile for a "
              "GPU); run it in a fresh process", file=sys.stderr)
        return 2
    argv = argv if argv is not None else sys.argv[1:]
    only = [a.split("=", 1)[1] for a in argv if a.startswith("--only=")]  # substrings of case names
    jobs = [a.split("=", 1)[1] for a in argv if a.startswith("--jobs=")]
    if jobs and not (jobs[-1].isdigit() and int(jobs[-1]) >= 1):
        print(f"compile_report: --jobs must be an int >= 1, got {jobs[-1]!r}", file=sys.stderr)
        return 2
    cases = [c for c in CASES if not only or any(o in c.name for o in only)]
    workers = min(int(jobs[-1]), len(cases)) if jobs else 1
    if workers > 1:  # each compile is one CPU-bound process; spawned, so no worker inherits a CUDA/Triton state
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            reports = pool.map(report, cases, chunksize=1)
    else:
        reports = [report(c) for c in cases]
    if "--json" in argv:
        for r in reports:
            print(json.dumps(asdict(r)))
    else:
        print(table(reports), end="")
    failed = [(c.name, v) for c, r in zip(cases, reports) for v in violations(c, r)]
    for name, v in failed:
        print(f"compile_report: {name}: {v}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
