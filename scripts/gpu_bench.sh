#!/usr/bin/env bash
# Issue 18's GPU figures in one call on a GPU machine: preflight, the CUDA correctness tests, then
# scripts/gpu_bench.py (bench collect, kernel bandwidth, bench prune), each step's JSON written as it ends.
#   here (CPU), once:  .venv/bin/python scripts/gpu_bench.py prepare out/gpu_bench     (~47 MB, git-ignored)
#   device:            bash scripts/gpu_bench.sh          (with out/gpu_bench carried; results in $OUT)
# GPU_BENCH_TIMEOUT (default 420 s) bounds the benchmark; the tests get 150 s more at most.
set -uo pipefail
cd "$(dirname "$0")/.."
RES=${1:-${OUT:-out}/gpu_results}
mkdir -p "$RES"
export HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE
PY=${PYTHON:-python3}
if [ ! -f out/gpu_bench/polarity.csv ]; then
  echo "out/gpu_bench is missing: run 'python scripts/gpu_bench.py prepare out/gpu_bench' and carry it" | tee "$RES/error.txt"
  exit 2
fi
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), 'transformers', transformers.__version__)"
  "$PY" -c "import triton; print('triton', triton.__version__)" || echo "NO TRITON: the collector falls back to torch reductions"
} > "$RES/preflight.txt" 2>&1
# The checkout, installed without dependencies or network into a throwaway venv over the system packages.
if ! "$PY" -c "import neuronbench.harness" 2>/dev/null; then
  "$PY" -m venv --system-site-packages /tmp/nb-gpu-venv >> "$RES/preflight.txt" 2>&1 \
    && /tmp/nb-gpu-venv/bin/pip install -q --no-deps --no-build-isolation -e . >> "$RES/preflight.txt" 2>&1 \
    && PY=/tmp/nb-gpu-venv/bin/python
fi
"$PY" -c "import neuronbench.harness" >> "$RES/preflight.txt" 2>&1 || { echo "neuronbench not importable" >> "$RES/preflight.txt"; exit 3; }
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/harness/engine/test_collect_cuda.py > "$RES/gpu_tests.txt" 2>&1
echo "exit $?" >> "$RES/gpu_tests.txt"
timeout "${GPU_BENCH_TIMEOUT:-420}" "$PY" scripts/gpu_bench.py run out/gpu_bench "$RES" > "$RES/run.log" 2>&1
echo "exit $?" >> "$RES/run.log"
tail -n 30 "$RES/run.log"
