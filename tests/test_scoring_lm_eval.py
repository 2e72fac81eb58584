"""GSM8K and MATH scored by lm-eval replay of stored generations, against hand-checked answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergeflow import benchmarks
from mergeflow.cli import main
from mergeflow.scoring.answers import mergelm_gsm8k_answer, mergelm_math_answer

# (model output, gold answer, strict "The answer is: N", flexible last number, MergeLM) per doc
GSM8K_CASES = [
    ("9 + 9 = 18. The answer is: 18", "18", True, True, True),
    ("The answer is: 1,234.", "1,234", True, True, True),
    ("We get 5 apples, so 5.", "5", False, True, False),  # no answer line: only flexible finds it
    ("The answer is: 7 dollars, then 8 more", "7", True, False, True),  # flexible takes the last number
    ("The answer is: 3/4", "1", False, False, True),  # MergeLM evaluates the fraction and rounds
    ("The answer is: $-12.0", "-12", False, False, True),
    ("", "3", False, False, False),
    ("Total: 42", "42", False, True, False),
]
MATH_CASES = [
    # (output, solution, MergeLM "The answer is:", last \boxed{})
    ("The answer is: 1/2.\nMore text", r"So it is $\boxed{\frac{1}{2}}$.", True, False),
    (r"So $\boxed{5}$.", r"x = \boxed{5}", False, True),
    (r"The answer is: \sqrt3", r"\boxed{\sqrt{3}}", True, False),
    (r"The answer is: \dfrac{1}{2}.", r"\boxed{0.5}", True, False),
    (r"\boxed{12} The answer is: 12", r"\boxed{10}", False, False),
]


def _write(tmp_path: Path, name: str, docs: list[dict], outputs: list[str]) -> tuple[Path, Path]:
    bench = benchmarks.get(name)
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    gens = tmp_path / f"{name}.generations.jsonl"
    gens.write_text("".join(
        json.dumps({"doc_id": bench.doc_id(d), "prompt": f"Below is an instruction.\n\n### Instruction:\n{i}\n\n"
                    "### Response: Let's think step by step.", "output": o, "completion": o}) + "\n"
        for i, (d, o) in enumerate(zip(docs, outputs))
    ))
    return data, gens


def _score(tmp_path, name, data, gens, settings="{}"):
    out = tmp_path / f"{name}.json"
    code = main(["score", "--benchmark", name, "--data", str(data), "--generations", str(gens),
                 "--settings", settings, "--out", str(out)])
    return code, out


@pytest.mark.slow
def test_gsm8k_filters_and_mergelm_extraction_match_hand_checked_answers(tmp_path):
    docs = [{"question": f"Question {i}?", "answer": f"Some work.\n#### {gold}"} for i, (_, gold, *_r) in
            enumerate(GSM8K_CASES)]
    data, gens = _write(tmp_path, "gsm8k", docs, [c[0] for c in GSM8K_CASES])
    code, out = _score(tmp_path, "gsm8k", data, gens)
    assert code == 0
    score = json.loads(out.read_text())
    assert score["scorer"] == "lm_eval" and score["details"]["task"] == "mergeflow_gsm8k"
    rows = {r["metric"]: r for r in score["rows"]}
    n = len(GSM8K_CASES)
    expected = {
        "exact_match,strict-match": [c[2] for c in GSM8K_CASES],
        "exact_match,flexible-extract": [c[3] for c in GSM8K_CASES],
        "exact_match,mergelm": [c[4] for c in GSM8K_CASES],
    }
    for metric, hits in expected.items():
        assert rows[metric]["value"] == pytest.approx(sum(hits) / n), metric
        assert rows[metric]["n"] == n
    # strict and flexible disagree on purpose (3/8 vs 4/8), MergeLM differs from both (5/8)
    assert rows["exact_match,strict-match"]["value"] != rows["exact_match,flexible-extract"]["value"]
    # lm-eval's stderr of a mean of 0/1 values: sqrt(p (1 - p) / (n - 1))
    p = 3 / 8
    assert rows["exact_match,strict-match"]["stderr"] == pytest.approx((p * (1 - p) / (n - 1)) ** 0.5)
    samples = [json.loads(line) for line in out.with_name("gsm8k.samples.jsonl").read_text().splitlines()]
    assert [s["filters"]["strict-match"]["exact_match"] for s in samples] == [float(c[2]) for c in GSM8K_CASES]
    assert [s["filters"]["flexible-extract"]["exact_match"] for s in samples] == [float(c[3]) for c in GSM8K_CASES]
    assert [s["filters"]["mergelm"]["exact_match"] for s in samples] == [float(c[4]) for c in GSM8K_CASES]
    assert samples[3]["filters"]["flexible-extract"]["answer"] == "8"


@pytest.mark.slow
def test_math_mergelm_and_boxed_answers_with_normalised_equivalence(tmp_path):
    docs = [{"problem": f"Problem {i}", "solution": sol, "level": "Level 1", "type": "Algebra"}
            for i, (_, sol, *_r) in enumerate(MATH_CASES)]
    docs[1]["level"] = 2  # MATH-500 style int level in the same file
    data, gens = _write(tmp_path, "math", docs, [c[0] for c in MATH_CASES])
    code, out = _score(tmp_path, "math", data, gens)
    assert code == 0
    rows = {r["metric"]: r for r in json.loads(out.read_text())["rows"]}
    n = len(MATH_CASES)
    assert rows["exact_match,mergelm"]["value"] == pytest.approx(sum(c[2] for c in MATH_CASES) / n)
    assert rows["exact_match,boxed"]["value"] == pytest.approx(sum(c[3] for c in MATH_CASES) / n)


def test_mergelm_extraction_functions():
    assert mergelm_gsm8k_answer("The answer is: 10. The answer is: 12") == 12  # the last mark
    assert mergelm_gsm8k_answer("The answer is: 2.5") == 2  # round half to even, as Python's round
    assert mergelm_gsm8k_answer("The answer is: 5/0") == 5
    assert mergelm_gsm8k_answer("The answer is: none") is None
    assert mergelm_gsm8k_answer("answer 4") is None
    assert mergelm_math_answer("The answer is: x+1.\nBecause") == "x+1"
    assert mergelm_math_answer("no mark") is None


def test_replay_errors_name_the_culprit(tmp_path, capsys):
    docs = [{"question": "Q?", "answer": "#### 1"}]
    data, gens = _write(tmp_path, "gsm8k", docs, ["The answer is: 1"])
    # A task whose prompt is not the generation's prompt: the replay refuses, naming the doc.
    task = tmp_path / "other_prompt.yaml"
    source = (Path(__file__).resolve().parents[1] / "workflow/tasks/gsm8k.yaml").read_text()
    task.write_text(source.replace('doc_to_text: "{{mergeflow_prompt}}"', 'doc_to_text: "Q: {{question}}"'))
    code, _ = _score(tmp_path, "gsm8k", data, gens, json.dumps({"task_file": str(task)}))
    assert code == 2
    doc_id = benchmarks.get("gsm8k").doc_id(docs[0])
    assert doc_id in capsys.readouterr().err
    # A generation for a doc the data file does not hold.
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"question": "Another?", "answer": "#### 2"}) + "\n")
    code, _ = _score(tmp_path, "gsm8k", other, gens)
    assert code == 2
    assert doc_id in capsys.readouterr().err
