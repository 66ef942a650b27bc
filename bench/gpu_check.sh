#!/usr/bin/env bash
# The GPU session's whole job (issues 8 and 9), in one call of at most 6 minutes on an H100/H200:
#   1. make diffusers importable (a wheel carried in .whl/, see NOTES.md) and check the project imports,
#   2. the kernel and adapter tests on CUDA (fp16, bf16: the compiled paths; interpreter-only tests skip),
#   3. the tile sweep: every candidate config per real shape, the table's choice against the fastest, and
#      the kernel variants (binary-mask FD loop vs float loop, split-KV under one wave, pd-sdpa: the PD keys
#      by torch's cuDNN/flash/efficient SDPA with the FD program alone, merged by LSE, on every shape; pd-gluon:
#      the same with our Gluon PD kernel, QK/PV wgmma overlapped with the softmax, head dims 64/128),
#   4. the benchmark at the real shapes, fp16: B=1 per guidance half and the B=4 cases, hair and band masks
#      at 10/25/50% and the full mask, every provider (fasa, fasa_pdsdpa (each torch SDPA kernel that takes
#      the PD part, the fastest kept), authors, reference, sdpa_bias, sdpa_gather, sdpa_fold, flex,
#      sdpa_dense, sdpa_pd), each case at 25% hair and full first, heaviest shape (FLUX) first,
#   5. the host cost per call (our Python work; and whole calls with Triton's launch),
#   6. the end-to-end denoising step, then whole FreeCure generations three ways, with what time is left.
# Each step has its own time limit; the benchmark and the sweep rewrite their CSVs as they go, so a limit
# keeps what was measured. Everything lands in "$OUT" (the device tool's output folder; default
# bench/results/gpu-run), 8 files in one folder:
#   bench.log pytest.log sweep.csv sweep.txt bench.csv table.txt bench.png e2e.csv
# every one with the GPU name, driver, torch, Triton and CUDA versions (text headers, CSV columns).
# Then copy them into bench/results/<device slug>/ and commit.
#
# Prepare the diffusers wheel here first (pure Python; the device image, Python 3.12, lacks it):
#   pip download diffusers==0.42.1 --no-deps -d .whl
# then, from the device tool:
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=400)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
T0=$(date +%s)
elapsed() { echo "$(( $(date +%s) - T0 )) s"; }
left() { echo $(( 350 - ($(date +%s) - T0) )); }   # seconds left of the 350 s this script allows itself

STACK=$("$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| triton', triton.__version__, '| CUDA', torch.version.cuda, '|', \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" 2>&1 | tail -1)
DRIVER=$(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -1)
HEADER=$(echo "# $STACK | driver: $DRIVER | $(date -u +%FT%TZ)" | tr -d '\n')

{
  echo "$HEADER"
  # 1. diffusers (absent on the device image) from a carried wheel, into a private site folder.
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "!! no .whl/*.whl carried: the diffusers tests and the end-to-end step cannot run"
  fi
  "$PY" -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 || true
  # The project needs no install: started here, the checkout's freecure_ops finds kernels/, adapters/, bench/
  # beside it (freecure_ops/subpackages.py).
  "$PY" -c "import freecure_ops.kernels, freecure_ops.adapters, freecure_ops.bench; print('freecure_ops importable')"
  echo "== setup done at $(elapsed)"
} > "$OUT/bench.log" 2>&1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

# 2. Kernel and adapter tests on CUDA (pytest-xdist is on the device image: compiles run on 8 cores; about
#    150 distinct kernels, ~1.5 s of compiling each). At the limit pytest gets SIGINT, so that it still
#    prints the failures and the counts of what ran.
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
{ echo "$HEADER"; timeout -s INT -k 10 100 "$PY" -m pytest -q -rfE -p no:cacheprovider -p no:warnings $XDIST \
    tests/test_fasa_kernel.py tests/test_fasa_mask.py tests/test_fasa_identities.py tests/test_numerics_floor.py \
    tests/test_torch_backend.py tests/test_adapters_cuda.py tests/test_fasa_validation.py tests/test_gluon_pd.py \
    2>&1; } > "$OUT/pytest.log"
echo "== pytest rc=$? at $(elapsed) (tail of pytest.log:)" >> "$OUT/bench.log"
tail -n 8 "$OUT/pytest.log" >> "$OUT/bench.log"

# 3. Tile sweep: worker processes compile every candidate first (up to 60% of its budget), then the timings,
#    heaviest shapes first; it stops starting new shapes after its budget and writes sweep.csv / sweep.txt
#    as it goes. Besides the tile configs it times the kernel variants (binary vs float FD loop; split-KV on
#    grids under one wave; pd-sdpa's FD-only program at 2-3 configs per head dim: ~15 kernels more), about
#    125 kernels to compile where 65 were.
timeout -k 5 125 "$PY" -m freecure_ops.bench.tile_sweep --out "$OUT" --budget-s 90 >> "$OUT/bench.log" 2>&1
echo "== sweep rc=$? at $(elapsed)" >> "$OUT/bench.log"
[ -f "$OUT/sweep.txt" ] && sed -i "1i $HEADER" "$OUT/sweep.txt"

# 4. The benchmark (bench.csv / table.txt rewritten after every configuration).
t=$(( $(left) - 40 )); t=$(( t > 150 ? 150 : t ))   # 40 s stay for the host cost and the e2e step
if [ "$t" -gt 20 ]; then
  timeout -k 5 "$t" "$PY" -m freecure_ops.bench --no-e2e --dtypes fp16 --masks hair,band,full \
    --coverages 25,10,50 --out "$OUT" >> "$OUT/bench.log" 2>&1
  echo "== bench rc=$? at $(elapsed)" >> "$OUT/bench.log"
  [ -f "$OUT/table.txt" ] && sed -i "1i $HEADER" "$OUT/table.txt"
fi

# 5. Host cost per call.
timeout -k 5 30 "$PY" -m freecure_ops.bench.host_overhead --calls 500 --with-launch >> "$OUT/bench.log" 2>&1
echo "== host overhead rc=$? at $(elapsed)" >> "$OUT/bench.log"

# 6. One denoising step end to end, with what is left (its text goes to bench.log, its CSV to $OUT).
t=$(left)
if [ "$t" -gt 30 ]; then
  timeout -k 5 "$t" "$PY" -m freecure_ops.bench.e2e --quick --out /tmp/e2e >> "$OUT/bench.log" 2>&1
  echo "== e2e rc=$? at $(elapsed)" >> "$OUT/bench.log"
  [ -f /tmp/e2e/e2e.csv ] && cp /tmp/e2e/e2e.csv "$OUT/"
  [ -f /tmp/e2e/e2e.txt ] && cat /tmp/e2e/e2e.txt >> "$OUT/bench.log"
  [ -f /tmp/e2e/e2e_generation.csv ] && cp /tmp/e2e/e2e_generation.csv "$OUT/"   # whole generations, 3 ways
else
  echo "== e2e skipped: only ${t} s left" >> "$OUT/bench.log"
fi
rm -f "$OUT"/*.tmp
ls "$OUT" >> "$OUT/bench.log"
tail -n 70 "$OUT/bench.log"
