"""MATH (EleutherAI/hendrycks_math, all seven subjects, split `test`): problem, level, type,
solution with the answer in the last `\\boxed{...}`. HuggingFaceH4/MATH-500 rows also load
(its `level` is an int and it has no `type`)."""

from __future__ import annotations

from mergeflow.benchmarks.base import Benchmark, HubSource
from mergeflow.errors import MergeflowError

SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`, `\\boxed x`) with balanced braces."""
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    head = text[start:]
    if head.startswith("\\boxed "):  # `\boxed 5`: the argument runs to the next `$`
        return head[len("\\boxed ") :].split("$")[0].strip()
    open_at = head.find("{")
    if open_at < 0:
        return None
    depth = 0
    for i in range(open_at, len(head)):
        if head[i] == "{":
            depth += 1
        elif head[i] == "}":
            depth -= 1
            if depth == 0:
                return head[open_at + 1 : i]
    return None  # unbalanced


def reference_answer(doc: dict) -> str:
    answer = last_boxed(doc["solution"])
    if answer is None:
        raise MergeflowError(f"math solution has no \\boxed{{...}} answer: {doc['solution'][-80:]!r}")
    return answer


def reference_response(doc: dict) -> str:
    """The MATH solution followed by the papers' `The answer is: <boxed answer>` line."""
    return f"\n{doc['solution']}\nThe answer is: {reference_answer(doc)}"


BENCHMARK = Benchmark(
    name="math",
    scorer="lm_eval",
    headline=("exact_match,mergelm", "exact_match,boxed"),
    schema={"problem": str, "solution": str},
    optional={"level": (str, int), "type": str},
    hub=HubSource("EleutherAI/hendrycks_math", SUBJECTS, "test"),
    sizes={"": 5000, "HuggingFaceH4/MATH-500": 500},  # MATH test / MATH-500
    reference_answer=reference_answer,
    reference_response=reference_response,
)
