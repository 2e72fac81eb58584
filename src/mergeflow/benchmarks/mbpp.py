"""MBPP (google-research-datasets/mbpp, config `full`, split `test` = task_ids 11-510).

Config `sanitized` loads too: its description is `prompt` (full: `text`; both are `{text}`
in instructions) and its `test_imports` run before the asserts.
"""

from __future__ import annotations

from mergeflow.benchmarks.base import Benchmark, HubSource
from mergeflow.errors import MergeflowError

# Both reference repos (DELLA generate.py, MergeLM) show this task's signature instead of
# its very long asserts in the prompt.
_LONG_TESTS = {493: "calculate_polygons(startx, starty, endx, endy, radius)"}


def description(doc: dict) -> str:
    """The task's text: `text` in config `full`, `prompt` in config `sanitized`."""
    return doc["text"] if doc.get("text") is not None else doc["prompt"]


def derive(doc: dict) -> dict:
    tests = "\n".join(doc["test_list"])
    shown = _LONG_TESTS.get(doc["task_id"], tests)
    return {
        "text": description(doc),
        "tests": tests,
        # The reference repos replace 4 spaces by a tab in the code prompt's input.
        "text_tabs": description(doc).replace("    ", "\t"),
        "tests_tabs": shown.replace("    ", "\t"),
    }


def in_test_split(doc: dict) -> bool:
    return 11 <= doc["task_id"] <= 510


def program(doc: dict, completion: str) -> str:
    """What runs in the sandbox: the completion, the setup code, the test imports (sanitized),
    then the asserts."""
    tests = "\n".join(doc["test_list"])
    imports = "".join(f"{line}\n" for line in doc.get("test_imports") or [])
    return f"{completion}\n{doc.get('test_setup_code') or ''}\n{imports}{tests}\n"


def reference_response_of(name: str):
    """The reference-response function of an MBPP-shaped benchmark `name` (mbpp, mbppplus)."""

    def reference_response(doc: dict) -> str:
        """The dataset's reference solution, on its own lines."""
        if not doc.get("code"):
            raise MergeflowError(f"{name} task {doc.get('task_id')}: no 'code' field, so no reference response")
        return f"\n{doc['code']}\n"

    return reference_response


reference_response = reference_response_of("mbpp")


BENCHMARK = Benchmark(
    name="mbpp",
    scorer="execution",
    headline=("pass@1",),
    schema={"task_id": int, "test_list": list},
    optional={"text": str, "prompt": str, "code": str, "test_setup_code": str, "challenge_test_list": list,
              "test_imports": list, "source_file": str},
    one_of=(("text", "prompt"),),
    id_field="task_id",
    hub=HubSource("google-research-datasets/mbpp", ("full",), "test"),
    derive=derive,
    keep=in_test_split,
    sizes={"full": 500, "sanitized": 257},  # test split: task_ids 11-510 / the sanitized subset
    program=program,
    reference_response=reference_response,
)
