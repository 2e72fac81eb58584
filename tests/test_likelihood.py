"""Reference likelihood (`mergeflow likelihood`) and the skill-retention aggregate."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from mergeflow import benchmarks
from mergeflow.aggregate.retention import retention_rows
from mergeflow.cli import main
from mergeflow.errors import MergeflowError

SETTINGS = {"template": "Q: {instruction}\nA:", "instruction": "{question}", "max_new_tokens": 8, "batch_size": 2}
ROWS = [
    {"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
    {"question": "Tom has 4 apples and buys 5 more. How many apples does he have now?",
     "answer": "Tom has 4 + 5 = <<4+5=9>>9 apples.\nSo he has 9 apples.\n#### 9"},
    {"question": "What is 6 * 7?", "answer": "6 * 7 = <<6*7=42>>42\n#### 42"},
]


def manual_nll(model_dir, prompt: str, reference: str) -> tuple[float, int]:
    """The definition, one sequence at a time and without padding: -sum log p(ref token | all
    tokens before it), the prompt tokenized with <s> and the reference without."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    p = tok(prompt).input_ids
    r = tok(reference, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + r])).logits[0]
    total = 0.0
    for i, token in enumerate(r):
        pos = len(p) + i - 1  # the logits at pos predict the token at pos + 1
        total -= float(torch.log_softmax(logits[pos].double(), dim=-1)[token])
    return total, len(r)


def test_gsm8k_reference_response_is_the_wizardmath_answer():
    ref = benchmarks.get("gsm8k").reference_response(ROWS[1])
    assert ref == "\nTom has 4 + 5 = 9 apples.\nSo he has 9 apples.\nThe answer is: 9"
    with pytest.raises(MergeflowError, match="#### N"):
        benchmarks.get("gsm8k").reference_response({"question": "q", "answer": "no final line"})


def test_mbpp_reference_needs_the_code_field():
    with pytest.raises(MergeflowError, match="mbpp task 7: no 'code' field"):
        benchmarks.get("mbpp").reference_response({"task_id": 7, "text": "t", "test_list": []})
    assert benchmarks.get("mbpp").reference_response({"code": "def f():\n    return 1"}) == "\ndef f():\n    return 1\n"


def test_likelihood_matches_the_definition_for_every_doc_of_a_padded_batch(tiny_model_dir, tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "reference_likelihood.json"
    assert main(["likelihood", "--model", str(tiny_model_dir), "--task", "gsm8k", str(data), json.dumps(SETTINGS),
                 "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    (row,) = payload["rows"]
    per_doc = payload["details"]["per_doc"]["gsm8k"]
    bench = benchmarks.get("gsm8k")
    expected = [manual_nll(tiny_model_dir, f"Q: {r['question']}\nA:", bench.reference_response(r)) for r in ROWS]
    assert len({t for _, t in expected}) == 3, "the docs must differ in length, so batches carry padding"
    for doc, (nll, tokens) in zip(per_doc, expected):
        assert doc["tokens"] == tokens
        assert doc["nll"] == pytest.approx(nll, rel=1e-4)
    total = sum(n for n, _ in expected) / sum(t for _, t in expected)
    assert (row["benchmark"], row["metric"], row["n"]) == ("gsm8k", "ref_nll", 3)
    assert row["value"] == pytest.approx(total, rel=1e-4)
    # a random model is far from the reference: about log(vocab) nats per token
    assert 0.5 * math.log(512) < row["value"] < 2 * math.log(512)


def test_likelihood_refuses_a_benchmark_without_reference(tiny_model_dir, tmp_path, capsys):
    rc = main(["likelihood", "--model", str(tiny_model_dir), "--task", "humaneval", str(tmp_path / "x.jsonl"),
               json.dumps(SETTINGS), "--out", str(tmp_path / "out.json")])
    assert rc != 0 and "benchmark 'humaneval' declares no reference response" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def _frame(rows):
    cols = ["model", "role", "experts", "method", "benchmark", "metric", "value"]
    return pd.DataFrame([dict(zip(cols, r)) for r in rows])


def test_retention_is_the_share_of_the_best_experts_gain():
    frame = _frame([
        ("base", "base", None, None, "gsm8k", "ref_nll", 4.0),
        ("math", "expert", None, None, "gsm8k", "ref_nll", 1.0),
        ("code", "expert", None, None, "gsm8k", "ref_nll", 3.5),
        ("ties", "merge", "math+code", "ties", "gsm8k", "ref_nll", 1.6),
        ("null", "merge", "math+code", "task_arithmetic", "gsm8k", "ref_nll", 4.0),
        ("worse", "merge", "code", "ties", "gsm8k", "ref_nll", 4.5),
        ("ties", "merge", "math+code", "ties", "gsm8k", "exact_match", 0.3),
    ])
    kept = retention_rows(frame).set_index("model")["value"]
    assert kept["ties"] == pytest.approx((4.0 - 1.6) / (4.0 - 1.0))  # the best expert (math) sets the gain
    assert kept["null"] == 0.0  # the base's own likelihood keeps nothing
    assert kept["worse"] == pytest.approx((4.0 - 4.5) / (4.0 - 3.5))
    assert set(retention_rows(frame)["metric"]) == {"skill_retention"}
    # no expert better than the base: undefined, so no row (not a number that looks like a result)
    flat = _frame([("base", "base", None, None, "mbpp", "ref_nll", 1.0),
                   ("code", "expert", None, None, "mbpp", "ref_nll", 1.2),
                   ("m", "merge", "code", "ties", "mbpp", "ref_nll", 1.1)])
    assert retention_rows(flat).empty
