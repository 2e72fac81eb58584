"""CPU kernels for the demo zoo's training that give the same bits on every x86-64 CPU (at the
zoo's fixed thread count), so that the same seed gives the same zoo on every machine.

Two libraries choose their code by the CPU they run on: ATen's vectorised kernels (AVX2 or
AVX-512 or none) and MKL's matrix products. Both read their choice from the environment
once, when first used, so the zoo is built in a process started with `PINNED_ENV`
(`mergeflow demo` starts one when its own is not). benchmarks/README.md has the cost and
the machines compared.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "default",  # ATen's portable kernels, not AVX2 / AVX-512 ones
    "MKL_CBWR": "COMPATIBLE,STRICT",  # MKL's conditional numerical reproducibility, thread-count independent
}


def pinned() -> bool:
    """Whether this process computes with the pinned kernels."""
    if any(os.environ.get(k) != v for k, v in PINNED_ENV.items()):
        return False
    if "torch" in sys.modules:  # set before torch chose its kernels?
        import torch

        return torch.backends.cpu.get_cpu_capability() == "DEFAULT"
    return True


def rerun_pinned(argv: list[str]) -> int:
    """Run `python -m mergeflow ARGV` in a child process with the pinned kernels; its exit status."""
    src = str(Path(__file__).resolve().parents[2])  # the directory holding this mergeflow package
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, **PINNED_ENV, "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-m", "mergeflow", *argv], env=env).returncode
