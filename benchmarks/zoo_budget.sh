#!/usr/bin/env bash
# benchmarks/zoo_budget.py on the device machine (16 CPU cores, Python 3.12 with torch and
# transformers, no lm-eval): installs the carried wheels (.venv/gpu-wheels, from
# benchmarks/gpu_path_wheels.sh) into /tmp/site, then runs the search with the arguments given
# (default: benchmarks/zoo_variants.jsonl, 8 variants at a time on 2 cores each, judge included),
# leaving zoo.jsonl, zoo.md and the variants' logs in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .venv/gpu-wheels/*.whl || exit 1
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
export CUDA_VISIBLE_DEVICES=""  # the demo's box has no GPU: training and the gates on CPU, as there
echo "$(nproc) CPUs; $(python3 -c 'import torch, transformers, lm_eval; print("torch", torch.__version__, "transformers", transformers.__version__)')"
[ $# -gt 0 ] || set -- --jobs 8 --cores-per-job 2 --judge --variants benchmarks/zoo_variants.jsonl
python3 benchmarks/zoo_budget.py --out /tmp/zoo_budget --json "$OUT/zoo.jsonl" --markdown "$OUT/zoo.md" "$@"
rc=$?
tar czf "$OUT/logs.tgz" -C /tmp/zoo_budget --exclude='*.safetensors' . 2>/dev/null
exit $rc
