"""Benchmarks: loading docs, ids, instruction fields, programs and reference answers.

`get(name)` returns the benchmark's `Benchmark` (see `base.py`): `.load(path, limit)`,
`.doc_id(doc)`, `.fields(doc)`, and `.program(doc, completion)` for code benchmarks or
`.reference_answer(doc)` for answer benchmarks.
"""

from __future__ import annotations

import importlib

from mergeflow.benchmarks import okapi  # light: declarations only
from mergeflow.benchmarks.base import Benchmark
from mergeflow.errors import MergeflowError

NAMES = ("gsm8k", "math", "mbpp", "humaneval", "alpaca_eval", "gsm8k_cot", "mbppplus", "humanevalplus",
         "ifeval", *okapi.BENCHMARKS)


def get(name: str) -> Benchmark:
    if name not in NAMES:
        family = next((task for task in okapi.SIZES if name.startswith(f"{task}_")), None)
        if family is not None:  # an okapi task in a language not declared
            raise MergeflowError(f"unknown benchmark {name!r}: language {name[len(family) + 1:]!r} of okapi's {family} "
                                 f"is not declared (mergeflow.benchmarks.okapi.LANGUAGES: {', '.join(okapi.LANGUAGES)})")
        raise MergeflowError(f"unknown benchmark {name!r}; known: {', '.join(NAMES)}")
    if name in okapi.BENCHMARKS:  # one module declares every okapi task and language
        return okapi.BENCHMARKS[name]
    return importlib.import_module(f"mergeflow.benchmarks.{name}").BENCHMARK


def loglik_benchmarks() -> tuple[str, ...]:
    """Benchmarks scored by log-likelihood multiple choice on the model (rule loglik_mc), not on generations."""
    return tuple(n for n in NAMES if not get(n).generates)


def code_benchmarks() -> tuple[str, ...]:
    """Benchmarks scored by running programs (in the sandbox of scoring.code)."""
    return tuple(n for n in NAMES if get(n).scorer == "execution")


__all__ = ["NAMES", "Benchmark", "code_benchmarks", "get", "loglik_benchmarks"]
