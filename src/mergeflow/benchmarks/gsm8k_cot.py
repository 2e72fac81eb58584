"""GSM8K as lm-eval's `gsm8k_cot` scores it (MergeBench's math task): the GSM8K test rows,
replayed through workflow/tasks/gsm8k_cot.yaml, whose filters are lm-eval's gsm8k-cot v3.0
("The answer is N." strict, last number flexible). The 8-shot prompt is a protocol template
(config/mergebench.yaml), not part of the benchmark.
"""

from __future__ import annotations

from mergeflow.benchmarks import gsm8k
from mergeflow.benchmarks.base import Benchmark, HubSource

BENCHMARK = Benchmark(
    name="gsm8k_cot",
    scorer="lm_eval",
    headline=("exact_match,strict-match", "exact_match,flexible-extract"),
    schema={"question": str, "answer": str},
    hub=HubSource("openai/gsm8k", ("main",), "test"),
    sizes={"": 1319},  # GSM8K test
    reference_answer=gsm8k.reference_answer,
)
