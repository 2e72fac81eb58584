"""LiveBench scorers on hand-made answers with known scores (rules of LiveBench/LiveBench)."""

from __future__ import annotations

import base64
import json
import pickle
import zlib

import pytest

from mergeflow.errors import MergeflowError
from mergeflow.robustness import demo, livebench


def _doc(category, qid):
    return next(r for r in demo.livebench_rows(category) if r["question_id"] == qid)


# ----------------------------------------------------------------------------- instruction following
@pytest.mark.parametrize(
    "qid, answer, expected",
    [
        ("if-demo-1", "a merge averages the weights of two models.", 1.0),
        ("if-demo-1", "A merge averages the weights of two models.", 0.0),
        ("if-demo-1", "   ", 0.0),  # empty answers follow nothing
        # two instructions: both followed -> (1 + 1) / 2; comma only -> (0 + 1/2) / 2
        ("if-demo-2", "A cat is a small furry animal. Is there anything else I can help with?", 1.0),
        ("if-demo-2", "A cat is small, furry and soft. Is there anything else I can help with?", 0.25),
        ("if-demo-2", "A cat is small, furry and soft.", 0.0),
        ("if-demo-3", ("The robot walked to the river with a lamp and watched the water flow past the old "
                       "stones until the night was over and the stars came out."), 1.0),
        ("if-demo-3", "The robot took a lamp to the river.", 0.25),  # keywords there, < 20 words
        ("if-demo-3", "The robot walked to the river.", 0.0),  # lamp missing and < 20 words
        ("if-demo-4", "First part.\n***\nSecond part.", 1.0),
        ("if-demo-4", "Only one paragraph.", 0.0),
    ],
)
@pytest.mark.slow
def test_instruction_following_scores(qid, answer, expected):
    result = livebench.score_instruction_following(_doc("instruction_following", qid), answer)
    assert result["score"] == pytest.approx(expected)


def test_instruction_following_unknown_id_is_named():
    doc = {**_doc("instruction_following", "if-demo-1"), "instruction_id_list": ["format:made_up"]}
    with pytest.raises(MergeflowError, match="format:made_up"):
        livebench.score_instruction_following(doc, "x")


# ----------------------------------------------------------------------------- typos
@pytest.mark.parametrize(
    "answer, expected",
    [
        ("The model merges two experts into one.", 1.0),
        ("Here is the fixed text:\nThe model merges two experts into one.", 1.0),
        ("The model merges\n\ntwo experts into one.", 1.0),  # line breaks joined by one space
        ("The model merges two expers into one.", 0.0),
        ("the model merges two experts into one.", 0.0),  # case matters
        ("The model  merges two experts into one.", 0.0),  # so does spacing within a line
    ],
)
def test_typos_scores(answer, expected):
    assert livebench.score_typos(_doc("typos", "typo-demo-1"), answer)["score"] == expected


# ----------------------------------------------------------------------------- coding
def test_extract_code_takes_the_last_fenced_block():
    out = "Plan:\n```python\nx = 1\n```\nFinal:\n```python\nprint(2)\nprint(3)\n```\nDone"
    assert livebench.extract_code(out) == "print(2)\nprint(3)"
    assert livebench.extract_code("print(1)") == ""


def test_private_tests_are_decoded_like_livebench_stores_them():
    tests = [{"input": "1\n", "output": "2\n", "testtype": "stdin"}]
    doc = {"question_id": "q", "public_test_cases": "[]", "private_test_cases": demo.encode_private_tests(tests)}
    assert livebench.decode_tests(doc) == tests


def test_pickled_objects_in_private_tests_are_refused():
    class Evil:
        pass

    import sys

    sys.modules[__name__].Evil = Evil  # picklable by reference
    Evil.__qualname__ = "Evil"
    raw = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
    doc = {"question_id": "q", "public_test_cases": "[]", "private_test_cases": raw}
    with pytest.raises(MergeflowError, match="refusing"):
        livebench.decode_tests(doc)


@pytest.mark.slow
def test_coding_scores_by_execution_in_the_sandbox():
    docs = {r["question_id"]: r for r in demo.livebench_rows("coding")}
    fence = "```python\n{}\n```"
    cases = [
        ("code-demo-1", fence.format("a, b = map(int, input().split())\nprint(a + b)"), 1.0),
        ("code-demo-1", fence.format("a, b = map(int, input().split())\nprint(a - b)"), 0.0),  # public passes only
        ("code-demo-1", "a, b = map(int, input().split())\nprint(a + b)", 0.0),  # no fenced block
        ("code-demo-2", fence.format("class Solution:\n    def maxValue(self, nums: List[int]) -> int:\n"
                                     "        return max(nums)"), 1.0),
        ("code-demo-2", fence.format("class Solution:\n    def maxValue(self, nums):\n        return nums[0]"), 0.0),
        ("code-demo-3", fence.format("print(2 * n)"), 1.0),  # completion: partial_solution is prepended
        ("code-demo-3", fence.format("while True:\n    pass"), 0.0),  # timeout
    ]
    pairs = [(docs[q], {"doc_id": q, "prompt": "", "output": out, "completion": out}) for q, out, _ in cases]
    rows, details, samples = livebench.score("coding", pairs, {"timeout": 3, "max_workers": 2})
    assert [s["score"] for s in samples] == [c[2] for c in cases]
    assert rows[0]["metric"] == "score" and rows[0]["n"] == len(cases)
    assert rows[0]["value"] == pytest.approx(3 / 7)
    assert details["isolation"] in ("bwrap", "unshare", "none")


# ----------------------------------------------------------------------------- data
def test_release_date_selects_questions_like_livebench():
    rows = [
        {"question_id": "old", "livebench_release_date": "2024-06-24", "livebench_removal_date": ""},
        {"question_id": "new", "livebench_release_date": "2024-08-31", "livebench_removal_date": None},
        {"question_id": "gone", "livebench_release_date": "2024-06-24", "livebench_removal_date": "2024-07-26"},
    ]
    assert [r["question_id"] for r in livebench.select_release(rows, "2024-07-01")] == ["old", "gone"]
    assert [r["question_id"] for r in livebench.select_release(rows, "2024-09-01")] == ["old", "new"]


def test_offline_fetch_names_the_dataset(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(MergeflowError, match="livebench/language"):
        livebench.fetch("typos", "2024-06-24")


def test_demo_files_match_the_category_schemas(tmp_path):
    for category in livebench.CATEGORIES:
        path = tmp_path / f"{category}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in demo.livebench_rows(category)))
        docs = livebench.load(category, path)
        assert docs and all(livebench.benchmark(category).doc_id(d) == d["question_id"] for d in docs)
    with pytest.raises(MergeflowError, match="ground_truth"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"question_id": "x", "turns": ["t"]}) + "\n")
        livebench.load("typos", bad)
