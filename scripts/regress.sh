#!/usr/bin/env bash
# The --quick suite end to end, compared with the stored golden results (CI runs this after the tests).
# Usage: bash scripts/regress.sh [regress args...]   e.g. --tolerance 0.01
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
start=$SECONDS
"${PYTHON:-python3}" -m neuronbench.harness.cli run --quick --out "$out/quick"
echo "quick suite: $((SECONDS - start)) s"
# Per-task tolerances: how far a zoo rebuilt on another machine moves the quick suite (README, Regression testing).
"${PYTHON:-python3}" -m neuronbench.harness.cli regress "$out/quick" --against tests/golden/quick-suite --scope all --tolerance 1e-4 \
    --tolerances tests/golden/tolerances.json "$@"
