"""HumanEval+ (evalplus/humanevalplus, split `test`, 164 tasks): HumanEval's prompts with
EvalPlus's larger `test` (a `check(candidate)` over many more inputs), run as
bigcode-evaluation-harness's `humanevalplus` runs it: prompt, completion, test, check().
"""

from __future__ import annotations

from mergeflow.benchmarks import humaneval
from mergeflow.benchmarks.base import Benchmark, HubSource


def derive(doc: dict) -> dict:
    # bigcode-evaluation-harness strips the prompt before generation (its strip_prompt default)
    return {"prompt_stripped": doc["prompt"].strip(), **humaneval.derive(doc)}


BENCHMARK = Benchmark(
    name="humanevalplus",
    scorer="execution",
    headline=("pass@1",),
    schema={"task_id": str, "prompt": str, "entry_point": str, "test": str},
    optional={"canonical_solution": str},
    id_field="task_id",
    hub=HubSource("evalplus/humanevalplus", (), "test"),
    sizes={"": 164},
    derive=derive,
    program=humaneval.program,  # the same program shape; only the test differs
)
