#!/usr/bin/env bash
# README command 2: set up (if needed) and run the test suite, every tier (plain `pytest`
# runs the fast tier alone; `-m ""` lifts pyproject's marker filter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# One process (-n 0): the slow tier's end-to-end runs (demo, SLURM, sandboxed hostile programs)
# each load the machine themselves; plain `pytest` spreads the fast tier over the cores.
exec python -m pytest -m "" -n 0 "$@"
