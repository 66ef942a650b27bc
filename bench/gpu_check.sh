#!/usr/bin/env bash
# The GPU session's whole job for issue 4, in one go (about 9 minutes on an H100/H200):
#   1. make diffusers importable (a wheel carried in .whl/, see NOTES.md) and the project importable,
#   2. pytest tests -q on CUDA,
#   3. the full benchmark (python -m bench: all providers, all shapes, fp16 + bf16, 4 coverages),
#   4. the end-to-end denoising step (python -m bench.e2e).
# Everything lands in "$OUT" (the device tool's output folder; defaults to bench/results/gpu-run):
#   pytest.log, bench.log, bench.csv, table.txt, bench.png, e2e.csv, e2e.txt   (7 files, 1 folder level)
# Then copy bench.csv, table.txt, bench.png, e2e.csv, e2e.txt into bench/results/<device slug>/ and commit.
#
# Prepare the diffusers wheel here first (pure Python; the device image, Python 3.12, lacks it):
#   pip download diffusers==0.42.1 --no-deps -d .whl
# then, from the device tool:
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
T0=$(date +%s)
elapsed() { echo "$(( $(date +%s) - T0 )) s"; }

{
  echo "== gpu_check.sh $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

  # 1. diffusers (absent on the device image) from a carried wheel, into a private site folder.
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "!! no .whl/*.whl carried: the diffusers tests and the end-to-end step cannot run"
  fi
  "$PY" -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 || true

  # The project: editable install (maps kernels/, adapters/, bench/ under freecure_ops); links as a fallback.
  "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || true
  if ! "$PY" -c "import freecure_ops.kernels, freecure_ops.bench" 2>/dev/null; then
    echo "editable install unavailable: linking kernels/ adapters/ bench/ into freecure_ops/ (this copy only)"
    for d in kernels adapters bench; do [ -e "freecure_ops/$d" ] || ln -s "../$d" "freecure_ops/$d"; done
  fi
  "$PY" -c "import freecure_ops.kernels; print('freecure_ops importable')"
  echo "== setup done at $(elapsed)"
} > "$OUT/bench.log" 2>&1

# 2. The test suite on CUDA (kernel natively, not interpreted).
# pytest-xdist is on the device image: kernel compiles (one per variant) then run on several cores.
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
timeout -k 10 200 "$PY" -m pytest tests -q -p no:cacheprovider $XDIST > "$OUT/pytest.log" 2>&1
echo "== pytest rc=$? at $(elapsed) (tail of pytest.log:)" >> "$OUT/bench.log"
tail -n 5 "$OUT/pytest.log" >> "$OUT/bench.log"

# 3. The full benchmark (bench.csv is rewritten after every configuration, so a timeout keeps what was done).
timeout -k 10 330 "$PY" -m bench --no-e2e --out "$OUT" >> "$OUT/bench.log" 2>&1
echo "== bench rc=$? at $(elapsed)" >> "$OUT/bench.log"

# 4. One denoising step end to end (needs diffusers and freecure_ops.adapters.install_fasa).
left=$(( 530 - ($(date +%s) - T0) ))
if [ "$left" -gt 40 ]; then
  timeout -k 10 "$left" "$PY" -m bench.e2e --out "$OUT" >> "$OUT/bench.log" 2>&1
  echo "== e2e rc=$? at $(elapsed)" >> "$OUT/bench.log"
else
  echo "== e2e skipped: only ${left} s left" >> "$OUT/bench.log"
fi
tail -n 60 "$OUT/bench.log"
