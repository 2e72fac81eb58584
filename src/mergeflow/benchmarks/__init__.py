"""Benchmarks: loading docs, ids, instruction fields, programs and reference answers.

`get(name)` returns the benchmark's `Benchmark` (see `base.py`): `.load(path, limit)`,
`.doc_id(doc)`, `.fields(doc)`, and `.program(doc, completion)` for code benchmarks or
`.reference_answer(doc)` for answer benchmarks.
"""

from __future__ import annotations

import importlib

from mergeflow.benchmarks.base import Benchmark
from mergeflow.errors import MergeflowError

NAMES = ("gsm8k", "math", "mbpp", "humaneval", "alpaca_eval", "gsm8k_cot", "mbppplus", "humanevalplus",
         "ifeval")


def get(name: str) -> Benchmark:
    if name not in NAMES:
        raise MergeflowError(f"unknown benchmark {name!r}; known: {', '.join(NAMES)}")
    return importlib.import_module(f"mergeflow.benchmarks.{name}").BENCHMARK


def code_benchmarks() -> tuple[str, ...]:
    """Benchmarks scored by running programs (in the sandbox of scoring.code)."""
    return tuple(n for n in NAMES if get(n).scorer == "execution")


__all__ = ["NAMES", "Benchmark", "code_benchmarks", "get"]
