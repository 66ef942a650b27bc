"""The kernel compiles for Hopper (sm_90, H100/H200) with the launcher's tile table, without a GPU.

Triton's wheel ships ptxas, so the whole PTX -> cubin path runs on a CPU machine. This catches what the
interpreter cannot: compile errors of the real backend, shared memory over the 227 KB per-block limit of
H100/H200 (a launch would fail with OutOfResources), and register spills in the fp16/bf16 fast path.
The compile runs in a child process: under TRITON_INTERPRET=1 (set for this test process without CUDA)
@triton.jit yields interpreter objects that cannot be compiled.
"""
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import triton
import triton.language as tl

HOPPER_SMEM_LIMIT = 232448  # bytes per block on sm_90 (227 KB)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
TL_DTYPES = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}
ELEM_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
POINTERS = ("Q", "KP", "VP", "KF", "VF", "MASK", "TILES", "OUT", "LSE")
SIZES = ("H", "NQ", "NP", "NF", "N_TXT", "sm_b", "st_b")

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(BIN, "ptxas")),
                                reason="this triton build ships no NVIDIA ptxas")


def compile_for_sm90(dtype: str, head_dim: int, scale_mode: bool, has_txt: bool):
    """Compile as a real launch would specialize it: 16-byte aligned pointers, unit head-dim strides,
    other strides divisible by 16."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from freecure_ops.kernels.fasa_fwd import _config, _fasa_fwd_kernel, head_dim_split

    block_d0, block_d1 = head_dim_split(head_dim)
    bm, bn, warps, stages = _config(block_d0 + block_d1, ELEM_BYTES[dtype], interpret=False)
    const = dict(HEAD_DIM=head_dim, BLOCK_D0=block_d0, BLOCK_D1=max(block_d1, 16), SPLIT_D=block_d1 > 0,
                 BLOCK_M=bm, BLOCK_N=bn, SCALE_MODE=scale_mode,
                 HAS_TXT=has_txt, SKIP_TILES=not scale_mode, WRITE_LSE=True, DOT_DTYPE=TL_DTYPES[dtype], IEEE=dtype == "fp32")
    signature, attrs = {}, {}
    for i, name in enumerate(inspect.signature(_fasa_fwd_kernel.fn).parameters):
        if name in const:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = {"MASK": "*fp32", "LSE": "*fp32", "TILES": "*i32"}.get(name, f"*{dtype}")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "omega"):
            signature[name] = "fp32"
        elif name.endswith("_d"):
            signature[name], const[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if name not in SIZES:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(_fasa_fwd_kernel, signature, const, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


def spill_bytes(cubin: bytes) -> int:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    return int(re.search(r"STACK:(\d+)", usage).group(1))


CASES = [
    ("fp16", 40, False, False),
    ("fp16", 64, True, False),
    ("bf16", 80, False, True),
    ("fp16", 128, False, True),
    ("bf16", 160, True, False),
    ("fp32", 72, False, True),
    ("fp32", 160, True, False),
]


def _child_main(cases):
    for case in cases:
        kernel = compile_for_sm90(*case)
        print(json.dumps({"case": list(case), "shared": kernel.metadata.shared,
                          "wgmma": "wgmma" in kernel.asm["ptx"], "spill": spill_bytes(kernel.asm["cubin"])}))


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); " \
           f"import test_kernel_compile as t; t._child_main({CASES!r})"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return {tuple(r["case"]): r for r in map(json.loads, run.stdout.splitlines())}


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_compiles_for_hopper_within_limits(case, compiled):
    r = compiled[case]
    assert r["shared"] <= HOPPER_SMEM_LIMIT, f"shared memory {r['shared']} B"
    if case[0] != "fp32":  # fp32 IEEE dots are a correctness path: FMA, not tensor cores, and may spill
        assert r["wgmma"], "expected Hopper tensor-core MMAs"
        assert r["spill"] == 0, f"{r['spill']} B of register spills"
