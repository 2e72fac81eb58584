#!/usr/bin/env bash
# Issue 17, in one device-machine call: mergeflow's SVD steps (TSV-M, Iso-C, Iso-CTS) against
# FusionBench 0.2.33's own functions on Llama-2-13B-shaped task vectors (13824 x 5120,
# 5120 x 13824, 5120 x 5120; 3 experts, float32), side by side, interleaved, on the GPU
# (benchmarks/svd_bench.py --peer fusionbench; the max |diff| of the two results per matrix).
# The device image has no fusion-bench and no registry: the wheel travels in .whl-fb/ (ignored
# by git through .git/info/exclude). fusion-bench alone, installed with --no-deps, is enough:
# svd_bench.py loads the two module files without fusion_bench's package __init__s (which would
# want hydra-core, omegaconf, datasets, bidict...; see its docstring).
#
#   here, once:   bash benchmarks/svd_bench_gpu.sh --wheels        # fusion_bench-0.2.33-py3-none-any.whl, 1.2 MB
#   device tool:  run(command="bash benchmarks/svd_bench_gpu.sh", carry=[".whl-fb"], timeout_s=600)
#
# JSON lines in $OUT/svd_peer.jsonl (one per matrix and method, written as each finishes),
# the log in $OUT/svd_peer.log. REPEATS (default 1: a warm-up run and one timed run per tool;
# about 5 min on an H200 from the earlier TSV-M / Iso-C times), SHAPES (svd_bench --shapes),
# DEVICE (default cuda; cpu to try the script on a small SHAPES=256x512 elsewhere), ARGS (more flags).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --wheels ]; then
  mkdir -p .whl-fb
  grep -qx '/.whl-fb/' .git/info/exclude 2>/dev/null || echo /.whl-fb/ >> .git/info/exclude
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl-fb fusion-bench==0.2.33
fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ls .whl-fb/*.whl > /dev/null || { echo "no .whl-fb/*.whl: run --wheels here and carry .whl-fb"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-fb/*.whl \
  || exit 1
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}
[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader
echo "# $(uptime); git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
args=(--device "$DEVICE" --peer fusionbench --experts 3 --repeats "${REPEATS:-1}" --json "$OUT/svd_peer.jsonl")
[ -z "${SHAPES:-}" ] || args+=(--shapes "$SHAPES")
timeout -k 5 "${BENCH_TIMEOUT:-560}" python3 benchmarks/svd_bench.py "${args[@]}" ${ARGS:-} 2>&1 | tee "$OUT/svd_peer.log"
rc=${PIPESTATUS[0]}
echo "# $(uptime); svd_bench.py exit status $rc"
exit "$rc"
