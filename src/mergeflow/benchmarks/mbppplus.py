"""MBPP+ (evalplus/mbppplus, split `test`, 378 tasks in v0.2): MBPP's sanitized prompts with
EvalPlus's `test` field, ready-to-run code that checks many more inputs than `test_list`.
Run as bigcode-evaluation-harness's `mbppplus` runs it: the completion, then `test`
(`test_list`'s asserts are shown in the prompt only, its first one).
"""

from __future__ import annotations

from mergeflow.benchmarks import mbpp
from mergeflow.benchmarks.base import Benchmark, HubSource
from mergeflow.errors import MergeflowError


def derive(doc: dict) -> dict:
    if not doc["test_list"]:
        raise MergeflowError(f"mbppplus task {doc['task_id']}: empty test_list, so no test example for the prompt")
    # bigcode's prompt: '"""\n{prompt}\n{test_list[0]}\n"""\n' (InCoder's docstring format)
    return {"test_example": doc["test_list"][0]}


def program(doc: dict, completion: str) -> str:
    """bigcode's mbppplus reference: the generation, a newline, then the EvalPlus test code."""
    return f"{completion}\n\n{doc['test']}\n"




BENCHMARK = Benchmark(
    name="mbppplus",
    scorer="execution",
    headline=("pass@1",),
    schema={"task_id": int, "prompt": str, "test_list": list, "test": str},
    optional={"code": str, "source_file": str, "test_imports": list},
    id_field="task_id",
    hub=HubSource("evalplus/mbppplus", (), "test"),
    sizes={"": 378},  # v0.2.0; bigcode's harness asserted 399 (v0.1.0)
    derive=derive,
    program=program,
    reference_response=mbpp.reference_response_of("mbppplus"),
)
