#!/usr/bin/env bash
# Rebuild src/mergeflow/merging/kernels.ptx from kernels.cu (needs nvcc >= 12; no GPU).
# The PTX targets compute_75 with ISA 7.0, so any driver from CUDA 11.0 on JIT-compiles it
# for its GPU (Turing and newer) and caches the result. Its first line records the
# sources' SHA-256 (kernels.cu + merge_ops.h): tests/test_merge_direct.py fails when the two drift apart.
set -euo pipefail
cd "$(dirname "$0")/../src/mergeflow/merging"
tmp=$(mktemp)
nvcc -ptx -arch=compute_75 -o "$tmp" kernels.cu
{
  echo "// mergeflow kernels.cu sha256 $(cat kernels.cu merge_ops.h | sha256sum | cut -c1-64)"
  sed 's/^\.version [0-9.]*$/.version 7.0/' "$tmp"
} > kernels.ptx
rm -f "$tmp"
ptxas -arch=sm_75 kernels.ptx -o /dev/null 2>/dev/null || { echo "ptxas rejected kernels.ptx" >&2; exit 1; }
echo "wrote $(pwd)/kernels.ptx"
