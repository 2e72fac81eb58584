#!/usr/bin/env bash
# GPU decoding (issue 21) in one device-machine call: benchmarks/decode_bench.py (the
# HFBackend identity check --small, then plain generate vs the compiled static-cache set-up
# on a Llama-2-13B-shaped bf16 model); TESTS=1 also runs the GPU tests first.
# Usage (device tool, repo root, .whl carried: transformers 5.23.0 and its deps for Python 3.12):
#   bash benchmarks/decode_bench.sh                 # JSON lines in $OUT/decode.jsonl, log in $OUT/decode.log
#   TESTS=1 BENCH=0 bash benchmarks/decode_bench.sh # only tests/test_generation_gpu.py + the CPU-side ones
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=$PWD/src:/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  || exit 1
rc=0
if [ "${TESTS:-0}" = 1 ]; then
  timeout -k 5 ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -o addopts= tests/test_generation_gpu.py \
    tests/test_generation.py -k "gpu or static or compiled or hf_decoding" -m "" 2>&1 | tee "$OUT/tests.log" | tail -30
  rc=${PIPESTATUS[0]}
fi
[ "${BENCH:-1}" = 1 ] || exit $rc
timeout -k 5 ${BENCH_TIMEOUT:-540} python3 benchmarks/decode_bench.py --small --json "$OUT/decode.jsonl" \
  ${BENCH_ARGS:-} > "$OUT/decode.log" 2>&1
brc=$?
grep '^{' "$OUT/decode.log" | cut -c1-600
[ $brc = 0 ] || { echo "decode_bench.py exit status $brc; last lines of the log:"; grep -v '^{' "$OUT/decode.log" | tail -20; }
exit $(( rc | brc ))
