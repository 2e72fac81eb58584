"""IFEval (google/IFEval, split `train`: its 541 prompts), as lm-eval's `ifeval` (v4.0) scores
it (MergeBench's instruction-following task): each response checked against the prompt's
verifiable instructions by lm-eval's own checks, replayed through workflow/tasks/ifeval.yaml.
Prompt-level accuracy: every instruction of a prompt followed; instruction-level: the share of
all instructions followed. "strict" checks the response as is, "loose" also with its first or
last line or its `*` removed.
"""

from __future__ import annotations

from mergeflow.benchmarks.base import Benchmark, HubSource

BENCHMARK = Benchmark(
    name="ifeval",
    scorer="lm_eval",
    headline=("prompt_level_strict_acc,none", "inst_level_strict_acc,none"),
    schema={"key": int, "prompt": str, "instruction_id_list": list, "kwargs": list},
    id_field="key",
    hub=HubSource("google/IFEval", (), "train"),
    sizes={"": 541},
    reference_answer=lambda doc: "",  # no gold answer: each instruction is checked by code
)
