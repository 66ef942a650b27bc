"""The kernel as a real launch compiles it for Hopper (sm_90, H100/H200), checked without a GPU.

``freecure_ops.bench.compile_report`` builds each case through the launcher's own plan (diffusers' layout, the
adapters' row slices, a prepared mask, the tile table's config) and Triton's own argument specialization, so
what is checked here is what a launch gets, not a hand-declared signature. It catches what the interpreter
cannot: compile errors of the real backend, shared memory over the 227 KB limit (a launch would fail),
register spills, scalar loads and stores (head dims whose strides Triton cannot prove aligned), missing HGMMA,
and key loops that are not software-pipelined. What the machine code does is read from the SASS (opcodes at
instruction positions), not from strings in the PTX: the first tests feed the checker hand-written listings
that must fail it (a PTX whose only "wgmma" is a fence, scalar 2-byte stores). The compile runs in a child
process: under TRITON_INTERPRET=1 (set for this test process without CUDA) @triton.jit yields interpreter
objects that cannot be compiled.
"""
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import triton

from freecure_ops.bench import compile_report as cr
from freecure_ops.bench.compile_report import CASES, CompileCase, fast_path, violations

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

needs_ptxas = pytest.mark.skipif(not os.path.exists(os.path.join(BIN, "ptxas")),
                                 reason="this triton build ships no NVIDIA ptxas")


# ---- the checker on hand-written listings (no compiler needed) ---------------------------------------------------
def _sass(*lines, start=0x100):
    """A cuobjdump -sass style listing of ``lines`` (one instruction each, 16 bytes apart)."""
    body = "\n".join(f"        /*{start + 16 * k:04x}*/                   {line} ;   /* 0x000000000000079af */"
                     for k, line in enumerate(lines))
    return "\tcode for sm_90\n\t\tFunction : _fasa_fwd_kernel\n" + body + "\n"


PTX_FENCE_ONLY = """
// wgmma: a comment that names it
.visible .entry _fasa_fwd_kernel() {
\twgmma.fence.sync.aligned;
\tld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];
\tst.global.b16 [%rd2], %rs1;
\tret;
}
"""

GOOD_SASS = _sass(
    "LDG.E.128 R4, desc[UR6][R2.64]",
    "LDGSTS.E.BYPASS.LTC128B.128 [R98], desc[UR24][R2.64], P3",
    "LDGDEPBAR",
    "DEPBAR.LE SB0, 0x1",  # loop head: wait with one copy group still in flight
    "WARPGROUP.ARRIVE",
    "HGMMA.64x64x16.F32 R24, gdesc[UR8], RZ, !UPT",
    "WARPGROUP.DEPBAR.LE gsb0, 0x0",
    "LDGSTS.E.BYPASS.LTC128B.128 [R98+0x800], desc[UR24][R24.64], P3",
    "LDGDEPBAR",
    "@!P1 BRA 0x130",
    "STG.E.128 desc[UR4][R2.64], R8",
    "STG.E.128 desc[UR4][R2.64+0x10], R12",
    "STG.E.128 desc[UR4][R2.64+0x20], R16",
    "STG.E desc[UR4][R6.64], R20",
    "EXIT",
    "BRA 0x1f0",
)


def _good_report(case):
    """A Report dict for ``case`` with everything the report claims, as the fields the checker reads."""
    return dict(case=case.name, shared=43008, align=8, regs=128, spill=0, ldg={"16": 1, "4": 2},
                cp_async={"16": 36}, ld16=0, stg={"16": 3, "4": 1}, out_bytes=40, pipelined=1 if case.pd_sdpa else 2,
                buffers=3, hgmma=44, merge_regs=64 if (case.split or case.pd_sdpa) else 0, merge_spill=0,
                merge_ldg={"16": 20, "4": 4}, merge_stg={"16": 5}, merge_in_bytes=320, merge_out_bytes=80)


def test_sass_parser_reads_opcodes_and_widths():
    assert cr.memory_widths(GOOD_SASS, "LDG") == {"16": 1}
    assert cr.memory_widths(GOOD_SASS, "LDGSTS") == {"16": 2}  # LTC128B is a cache hint, not a width
    assert cr.memory_widths(GOOD_SASS, "STG") == {"16": 3, "4": 1}
    assert cr.hgmma_count(GOOD_SASS) == 1 and cr.pipelined_loops(GOOD_SASS) == 1
    assert cr._loop_instructions(GOOD_SASS) == (7, 7)  # 0x130 .. the branch at 0x190
    narrow = _sass("LDG.E.U16 R2, desc[UR4][R2.64]", "LDG.E.S8 R3, desc[UR4][R4.64]", "LDG.E.64 R4, desc[UR4][R6.64]",
                   "@P0 LDG.E.128.CONSTANT R8, desc[UR4][R6.64]", "STG.E.U16 desc[UR4][R2.64], R5")
    assert cr.memory_widths(narrow, "LDG") == {"16": 1, "8": 1, "2": 1, "1": 1}
    assert cr.narrow_loads(cr.memory_widths(narrow, "LDG")) == 2


def test_wgmma_check_needs_hgmma_in_the_sass():
    # The old check was `"wgmma" in ptx`: a fence (or a comment) passed it. No HGMMA opcode, no MMA.
    assert cr.hgmma_count(PTX_FENCE_ONLY) == 0
    # PTX is not SASS: its vector load and scalar store are no instructions to the checker, which then fails
    assert cr.memory_widths(PTX_FENCE_ONLY, "LDG") == {} and cr.vector_store_problem({}, 40)
    fence_sass = _sass("WARPGROUP.ARRIVE", "WARPGROUP.DEPBAR.LE gsb0, 0x0", "NOP")
    assert cr.hgmma_count(fence_sass + "\t/* HGMMA.64x64x16.F32 in a comment */\n.L_x_HGMMA:\n") == 0
    case = CompileCase("fp16", 40)
    assert violations(case, _good_report(case)) == []
    assert any("HGMMA" in v for v in violations(case, dict(_good_report(case), hgmma=cr.hgmma_count(PTX_FENCE_ONLY))))


def test_scalar_stores_fail_the_vector_store_check():
    # 64 rows x head dim 40 of fp16 over 128 threads: 40 bytes a thread, stored as 2-byte scalars.
    scalar = _sass(*["STG.E.U16 desc[UR4][R2.64+0x%x], R5" % (2 * k) for k in range(20)])
    stg = cr.memory_widths(scalar, "STG")
    assert stg == {"2": 20}
    assert "1-2 bytes" in cr.vector_store_problem(stg, 40)
    # 8-byte vectors (or 16-byte ones that leave part of the row to narrower stores) are not 16-byte rows.
    assert "cover 0" in cr.vector_store_problem({"8": 5}, 40)
    assert "cover 32" in cr.vector_store_problem({"16": 2, "4": 2}, 40)
    assert cr.vector_store_problem({"16": 3}, 40) is None
    case = CompileCase("fp16", 40)
    assert any("kernel:" in v for v in violations(case, dict(_good_report(case), stg=stg)))
    split = CompileCase("fp16", 40, binary=True, split=True)
    bad = violations(split, dict(_good_report(split), stg={"16": 5, "4": 1}, out_bytes=80, merge_stg=stg))
    assert bad and all(v.startswith("merge:") for v in bad)
    bad = violations(split, dict(_good_report(split), stg={"16": 5, "4": 1}, out_bytes=80, merge_ldg={"4": 80}))
    assert bad and all(v.startswith("merge:") and "loads" in v for v in bad)


def test_pipelining_needs_async_copies_waited_with_copies_in_flight():
    loop = lambda wait, copy="LDGSTS.E.BYPASS.128 [R98], desc[UR24][R2.64]": _sass(  # noqa: E731
        wait, copy, "LDGDEPBAR", "@!P1 BRA 0x100")
    assert cr.pipelined_loops(loop("DEPBAR.LE SB0, 0x2")) == 1
    assert cr.pipelined_loops(loop("DEPBAR.LE SB0, 0x0")) == 0          # waits for every copy: no overlap
    assert cr.pipelined_loops(loop("WARPGROUP.DEPBAR.LE gsb0, 0x1")) == 0  # an MMA wait, not a copy wait
    assert cr.pipelined_loops(loop("DEPBAR.LE SB0, 0x2", "LDG.E.128 R4, desc[UR6][R2.64]")) == 0  # no async copy
    case = CompileCase("fp16", 64, heads=10)
    assert any("multi-buffered" in v for v in violations(case, dict(_good_report(case), pipelined=1)))
    assert any("multi-buffered" in v for v in violations(case, dict(_good_report(case), buffers=2)))


def test_violations_name_each_missing_claim():
    case = CompileCase("bf16", 72)
    base = _good_report(case)
    for field, value, words in (("spill", 24, "spills"), ("ld16", 3, "1-2 bytes"), ("align", 1, "align"),
                                ("cp_async", {"16": 30, "4": 3}, "async copies"), ("cp_async", {}, "async copies"),
                                ("shared", 300000, "shared memory")):
        assert any(words in v for v in violations(case, dict(base, **{field: value}))), field
    assert violations(CompileCase("bf16", 72, "scale"), dict(base, cp_async={"16": 60, "4": 3})) == []
    assert violations(CompileCase("bf16", 72, "scale"), dict(base, cp_async={"16": 60, "8": 24})) == []
    assert violations(CompileCase("bf16", 72, "scale"), dict(base, cp_async={"16": 60, "2": 24}))
    fallback = CompileCase("fp16", 111, heads=2, grid=(16, 16))
    assert violations(fallback, dict(base, align=1, ld16=288)) == []
    assert violations(fallback, dict(base, align=1, ld16=0))


# ---- the real compile ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    jobs = f"--jobs={min(4, os.cpu_count() or 1)}"  # each compile is CPU-bound: one process per core
    run = subprocess.run([sys.executable, "-m", "freecure_ops.bench.compile_report", "--json", jobs], env=env,
                         capture_output=True, text=True, timeout=1800)
    # exit 1: some case misses a claim (each case's test below says which); anything else is a crash
    assert run.returncode in (0, 1), run.stderr[-3000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return {r["case"]: r for r in rows}


@needs_ptxas
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_compiles_for_hopper_within_limits(case, reports):
    # Fast path: 16-byte aligned rows, HGMMA, no spills, K/V as 16-byte async copies in 2 (pd_sdpa: 1)
    # multi-buffered key loops, output rows stored as 16-byte vectors, and the merge's rows loaded and stored
    # as 16-byte vectors. The unaligned fallback (odd head dim, non-unit head-dim stride): scalar loads.
    assert violations(case, reports[case.name]) == []


def test_every_model_head_dim_and_mode_is_covered():
    fast = {(c.head_dim, c.mode) for c in CASES if fast_path(c)}
    for d in (40, 64, 72, 80, 128, 160):
        assert {(d, "bias"), (d, "scale")} <= fast, f"head dim {d} lacks a compile case"
    assert {c.dtype for c in CASES if fast_path(c)} == {"fp16", "bf16"}
    assert any(c.n_txt and c.mode == "bias" for c in CASES) and any(c.lse for c in CASES)


def _float_twin(case):
    """The same launch with the float FD loop and no split."""
    return replace(case, binary=False, split=False, pd_sdpa=False)


@needs_ptxas
@pytest.mark.parametrize("case", [c for c in CASES if c.binary and not c.split and not c.pd_sdpa and not c.fd_block_n],
                         ids=lambda c: c.name)
def test_binary_fd_loop_is_cheaper_than_the_float_loop(case, reports):
    # The binary loop drops the per-key mask-value loads and the per-key bias: fewer instructions per FD key
    # tile and no more registers than the float loop of the same launch (which must be among the cases).
    r, f = reports[case.name], reports[_float_twin(case).name]
    assert r["fd_instr"] < f["fd_instr"], (r["fd_instr"], f["fd_instr"])
    assert r["regs"] <= f["regs"] and r["ctas"] >= f["ctas"]


@needs_ptxas
@pytest.mark.parametrize("case", [c for c in CASES if c.split or c.pd_sdpa], ids=lambda c: c.name)
def test_split_kv_compiles_both_steps(case, reports):
    r = reports[case.name]
    assert r["merge_regs"] > 0 and r["merge_spill"] == 0


@needs_ptxas
@pytest.mark.parametrize("case", [c for c in CASES if (c.split or c.pd_sdpa) and fast_path(c)], ids=lambda c: c.name)
def test_merge_moves_whole_rows_as_16_byte_vectors(case, reports):
    # The merge's head dim in power-of-two pieces (40 = 32 + 8, 72 = 64 + 8, ...): its row loads and stores are
    # 16-byte vectors that cover the rows exactly (no padded columns), besides one 4-byte LSE access per row
    # block. Before, head dim 40's merge stored 2-byte scalars (split-KV: 32 STG.E.U16 a thread) and loaded
    # the fp32 parts as 4-byte scalars, on Triton 3.6 and 3.9.
    r = reports[case.name]
    assert r["merge_stg"].get("16", 0) * 16 == r["merge_out_bytes"], r["merge_stg"]
    assert set(r["merge_stg"]) <= ({"16", "4"} if case.lse else {"16"}), r["merge_stg"]
    assert r["merge_ldg"].get("16", 0) * 16 == r["merge_in_bytes"] and set(r["merge_ldg"]) <= {"16", "4"}, \
        r["merge_ldg"]


def test_merge_is_compiled_at_every_model_head_dim():
    for flavour in ("split", "pd_sdpa"):
        dims = {c.head_dim for c in CASES if getattr(c, flavour) and fast_path(c)}
        assert dims >= {40, 64, 72, 80, 128, 160}, (flavour, dims)


@needs_ptxas
@pytest.mark.parametrize("case", [c for c in CASES if c.pd_sdpa], ids=lambda c: c.name)
def test_pd_sdpa_compiles_the_fd_program_alone(case, reports):
    # No PD loop left in the FD-only program, and no more registers than the launch that holds both loops.
    r = reports[case.name]
    assert r["pd_instr"] == 0 and r["fd_instr"] > 0
    twin = reports.get(replace(case, pd_sdpa=False).name)
    if twin is not None:
        assert r["regs"] <= twin["regs"] + 8, (r["regs"], twin["regs"])


def test_variants_are_covered():
    binary = {c.head_dim for c in CASES if c.binary and not c.split and not c.pd_sdpa and fast_path(c)}
    assert binary >= {40, 64, 72, 80, 128, 160}
    assert all(_float_twin(c) in CASES for c in CASES if c.binary and not c.split and not c.pd_sdpa
               and not c.fd_block_n)
    fd128 = {c.head_dim for c in CASES if c.fd_block_n == 128 and c.binary and fast_path(c)}
    assert fd128 >= {40, 64, 72, 80, 128} and any(c.n_txt for c in CASES if c.fd_block_n)
    pd = [c for c in CASES if c.pd_sdpa]
    assert {c.head_dim for c in pd} >= {40, 64, 72, 80, 128, 160} and any(c.n_txt for c in pd)
    assert any(c.lse for c in pd) and any(c.mode == "scale" for c in pd) and any(not c.binary for c in pd)
    split = [c for c in CASES if c.split]
    assert any(c.n_txt for c in split) and any(c.lse for c in split) and any(c.mode == "scale" for c in split)


@needs_ptxas
@pytest.mark.parametrize("case", [c for c in CASES if c.fd_block_n and c.binary], ids=lambda c: c.name)
def test_binary_fd_loop_on_128_key_tiles_is_cheaper_per_key(case, reports):
    # 128-key tiles of the binary FD loop (issue 27 item 3): fewer SASS instructions per 64 FD keys than the
    # same launch on the table's 64-key tiles, the PD loop untouched, no spills, and at least 1 program per SM.
    r, base = reports[case.name], reports[replace(case, fd_block_n=0).name]
    assert r["fd_keys"] == 128 and base["fd_keys"] == 64
    assert r["fd_instr"] * 64 / r["fd_keys"] < 0.9 * base["fd_instr"], (r["fd_instr"], base["fd_instr"])
    assert abs(r["pd_instr"] - base["pd_instr"]) <= 8
    assert r["spill"] == 0 and r["ctas"] >= 1
