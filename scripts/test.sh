#!/usr/bin/env bash
# README command 2: set up (if needed) and run the test suite, every tier (plain `pytest`
# runs the fast tier alone; `-m ""` lifts pyproject's marker filter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# One worker per core, modules whole (pyproject's --dist loadscope), longest modules first
# (tests/conftest.py): the demo end to end runs on one core while the rest fills the others.
exec python -m pytest -m "" --no-loadscope-reorder "$@"
