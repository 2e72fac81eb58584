#!/usr/bin/env bash
# One device-machine call: the GPU tests, then the side-by-side benchmark.
# Usage (device tool, repo root, .whl carried): bash benchmarks/device_check.sh SIZE METHODS REPEATS
# TESTS=0 skips the tests, BENCH=0 the benchmark; PROFILE=m1,m2 first profiles those methods (merge_profile.py).
set -uo pipefail
size=${1:-2.7b}; methods=${2:-task_arithmetic,ties,dare_ties,della}; repeats=${3:-1}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=$PWD/src:/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
if [ "${BYTECODE:-0}" = 1 ]; then  # as pip installs it: the image has no .pyc and sets PYTHONDONTWRITEBYTECODE
  unset PYTHONDONTWRITEBYTECODE; export PYTHONPYCACHEPREFIX=/tmp/pyc
  python3 -m compileall -q -j 0 /tmp/site src "$(python3 -c 'import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))')" \
    >/dev/null 2>&1; echo "byte-compiled into $PYTHONPYCACHEPREFIX"
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 -c "import time;t=time.perf_counter();import torch;print('import torch', round(time.perf_counter()-t,2),'s', torch.__version__)"
[ "${TESTS:-1}" = 0 ] || timeout -k 5 ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -o addopts= tests/test_merge_gpu.py tests/test_merge_bits.py \
  ${EXTRA_TESTS:-} 2>&1 | tee "$OUT/tests.log" | tail -40
[ -z "${PROFILE:-}" ] || timeout -k 5 ${PROFILE_TIMEOUT:-240} python3 benchmarks/merge_profile.py --size "$size" --device cuda \
  --workdir /tmp/mb --threads 16 --methods "$PROFILE" --json "$OUT/profile.jsonl" 2>&1 | tail -3 | cut -c1-300
[ "${BENCH:-1}" = 1 ] || exit 0
timeout -k 5 ${BENCH_TIMEOUT:-380} python3 benchmarks/merge_bench.py --size "$size" --device cuda --workdir /tmp/mb \
  --threads 16 --methods "$methods" --tools "${TOOLS:-mergeflow,mergekit}" --repeats "$repeats" \
  --json "$OUT/bench.jsonl" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | grep -v "^  " | tail -30
grep "^  " "$OUT/bench.log" | cut -c1-400
