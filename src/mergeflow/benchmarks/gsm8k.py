"""GSM8K (openai/gsm8k, config `main`, split `test`): question, answer ending `#### N`."""

from __future__ import annotations

import re

from mergeflow.benchmarks.base import Benchmark, HubSource
from mergeflow.errors import MergeflowError


def reference_answer(doc: dict) -> str:
    """The number after `####`, commas removed (as lm-eval's and MergeLM's GSM8K targets)."""
    answer = doc["answer"]
    if "####" not in answer:
        raise MergeflowError(f"gsm8k answer has no '#### N' final line: {answer[-80:]!r}")
    return answer.split("####")[-1].strip().replace(",", "")


def reference_response(doc: dict) -> str:
    """GSM8K's solution as WizardMath answers after "Let's think step by step.": the
    reasoning without the `<<a+b=c>>` calculator marks, then `The answer is: N`."""
    reasoning, sep, final = doc["answer"].rpartition("\n#### ")
    if not sep:
        raise MergeflowError(f"gsm8k answer has no '#### N' final line: {doc['answer'][-80:]!r}")
    return f"\n{re.sub(r'<<[^>]*>>', '', reasoning)}\nThe answer is: {final.strip()}"


BENCHMARK = Benchmark(
    name="gsm8k",
    scorer="lm_eval",
    headline=("exact_match,strict-match", "exact_match,flexible-extract", "accuracy"),
    schema={"question": str, "answer": str},
    hub=HubSource("openai/gsm8k", ("main",), "test"),
    sizes={"": 1319},  # GSM8K test
    reference_answer=reference_answer,
    reference_response=reference_response,
)
