"""The MergeBench study (config/mergebench.yaml): its benchmarks (gsm8k_cot, MBPP+, HumanEval+)
against the harnesses MergeBench runs (lm-eval's gsm8k-cot task file, bigcode's prompt and
test programs, written out here), its merges, and its published figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from mergeflow import benchmarks
from mergeflow import config as mfconfig
from mergeflow.generation.templates import build_prompt

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "mergebench.yaml"
EXPERTS = ["instruction", "math", "coding", "safety", "multilingual"]

# An MBPP+ row in the dataset's shape: `test` is EvalPlus's ready-to-run checking code.
MBPPPLUS_ROW = {
    "task_id": 2,
    "prompt": "Write a function to find the shared elements from the given two lists.",
    "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
    "source_file": "Benchmark Questions Verification V2.ipynb",
    "test_imports": [],
    "test_list": ["assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))"],
    "test": ("inputs = [[(3, 4, 5, 6), (5, 7, 4, 10)], [(1, 2), (3,)]]\n"
             "results = [(4, 5), ()]\n"
             "for i, (inp, exp) in enumerate(zip(inputs, results)):\n"
             "    assert set(similar_elements(*inp)) == set(exp)\n"),
}
HUMANEVALPLUS_ROW = {
    "task_id": "HumanEval/53",
    "prompt": "\n\ndef add(x: int, y: int):\n    \"\"\"Add two numbers x and y\n    >>> add(2, 3)\n    5\n    \"\"\"\n",
    "canonical_solution": "    return x + y\n",
    "entry_point": "add",
    "test": "\n\ndef check(candidate):\n    for x, y in [(0, 1), (-5, 7), (10**20, 1)]:\n        assert candidate(x, y) == x + y\n",
}


def _run(program: str) -> int:
    # Project-written programs only (reference solutions and deliberately wrong ones).
    return subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=30).returncode


@pytest.fixture(scope="module")
def cfg() -> dict:
    return mfconfig.load(CONFIG)


def test_gsm8k_cot_prompt_is_lm_evals_8_shot_context(cfg):
    # lm-eval's own task file and delimiters, not the config's text
    import lm_eval
    from lm_eval.api.task import TaskConfig

    task = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k-cot.yaml").read_text())
    defaults = TaskConfig(task="x")
    assert task["num_fewshot"] == len(task["fewshot_config"]["samples"]) == 8
    question = "Janet has 3 apples and buys {2} more. How many?"  # braces survive the template
    text = lambda q: task["doc_to_text"].replace("{{question}}", q)  # noqa: E731
    shots = defaults.fewshot_delimiter.join(
        text(s["question"]) + defaults.target_delimiter + s["target"] for s in task["fewshot_config"]["samples"]
    )
    want = shots + defaults.fewshot_delimiter + text(question)
    settings = mfconfig.generation_settings(cfg, "gsm8k_cot")
    bench = benchmarks.get("gsm8k_cot")
    doc = {"question": question, "answer": "5 apples.\n#### 5"}
    assert build_prompt(settings["template"], settings["instruction"], bench.fields(doc)) == want
    assert settings["stop"] == task["generation_kwargs"]["until"]
    assert bench.reference_answer(doc) == "5"


def test_gsm8k_cot_task_file_keeps_lm_evals_filters_and_metric():
    import lm_eval

    theirs = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k-cot.yaml").read_text())
    ours = yaml.safe_load((ROOT / "workflow" / "tasks" / "gsm8k_cot.yaml").read_text())
    assert ours["filter_list"] == theirs["filter_list"]
    assert ours["metric_list"] == theirs["metric_list"]


@pytest.mark.slow
def test_gsm8k_cot_replay_scores_hand_checked_answers(tmp_path):
    from mergeflow.cli import main

    # (output, gold, strict "The answer is N." (first), flexible (last number))
    cases = [
        ("3 + 2 = 5. The answer is 5.", "5", True, True),
        ("The answer is: 5.", "5", False, True),  # MergeLM's colon: not gsm8k-cot's strict format
        ("The answer is 1,234.\n\nQ: next", "1,234", True, True),
        ("The answer is 7. Then 9 more", "7", True, False),
        ("So 12 apples", "12", False, True),
        ("", "3", False, False),
    ]
    bench = benchmarks.get("gsm8k_cot")
    docs = [{"question": f"Q{i}?", "answer": f"work\n#### {gold}"} for i, (_, gold, *_r) in enumerate(cases)]
    data = tmp_path / "gsm8k_cot.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    gens = tmp_path / "gens.jsonl"
    gens.write_text("".join(json.dumps({"doc_id": bench.doc_id(d), "prompt": f"Q: {d['question']}\nA:", "output": o,
                                        "completion": o}) + "\n" for d, (o, *_r) in zip(docs, cases)))
    out = tmp_path / "gsm8k_cot.json"
    assert main(["score", "--benchmark", "gsm8k_cot", "--data", str(data), "--generations", str(gens),
                 "--settings", "{}", "--out", str(out)]) == 0
    score = json.loads(out.read_text())
    assert score["details"]["task"] == "mergeflow_gsm8k_cot"
    rows = {r["metric"]: r["value"] for r in score["rows"]}
    assert rows["exact_match,strict-match"] == pytest.approx(sum(c[2] for c in cases) / len(cases))
    assert rows["exact_match,flexible-extract"] == pytest.approx(sum(c[3] for c in cases) / len(cases))


def test_mbppplus_prompt_and_program_are_bigcodes(cfg):
    bench = benchmarks.get("mbppplus")
    settings = mfconfig.generation_settings(cfg, "mbppplus")
    prompt = build_prompt(settings["template"], settings["instruction"], bench.fields(MBPPPLUS_ROW))
    # bigcode-evaluation-harness MBPPPlus.get_prompt
    assert prompt == f'"""\n{MBPPPLUS_ROW["prompt"]}\n{MBPPPLUS_ROW["test_list"][0]}\n"""\n'
    assert settings["stop"] == ["\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```"]
    # bigcode: generation + "\n" + get_reference (= "\n" + test)
    program = bench.program(MBPPPLUS_ROW, MBPPPLUS_ROW["code"])
    assert program == MBPPPLUS_ROW["code"] + "\n" + "\n" + MBPPPLUS_ROW["test"] + "\n"
    assert _run(program) == 0
    # passes test_list's one assert but not the extra input of the EvalPlus test
    wrong = "def similar_elements(a, b):\n    return (4, 5)"
    assert _run(wrong + "\n" + MBPPPLUS_ROW["test_list"][0]) == 0
    assert _run(bench.program(MBPPPLUS_ROW, wrong)) != 0
    assert bench.doc_id(MBPPPLUS_ROW) == "2" and bench.is_code and bench.scorer == "execution"


def test_mbppplus_without_a_test_example_names_the_task():
    from mergeflow.errors import MergeflowError

    with pytest.raises(MergeflowError, match="mbppplus task 2: empty test_list"):
        benchmarks.get("mbppplus").fields({**MBPPPLUS_ROW, "test_list": []})


def test_humanevalplus_prompt_and_program(cfg):
    bench = benchmarks.get("humanevalplus")
    settings = mfconfig.generation_settings(cfg, "humanevalplus")
    prompt = build_prompt(settings["template"], settings["instruction"], bench.fields(HUMANEVALPLUS_ROW))
    assert prompt == HUMANEVALPLUS_ROW["prompt"].strip()  # bigcode strips the prompt
    doc = HUMANEVALPLUS_ROW
    program = bench.program(doc, doc["canonical_solution"])
    assert program == doc["prompt"] + doc["canonical_solution"] + "\n" + doc["test"] + "\ncheck(add)\n"
    assert _run(program) == 0
    assert _run(bench.program(doc, "    return x + y if x < 10**9 else 0\n")) != 0
    assert bench.doc_id(doc) == "HumanEval/53"


def test_config_merges_are_mergebench_scripts_values(cfg):
    specs = mfconfig.merge_specs(cfg)
    by_tag: dict[str, list] = {}
    for spec in specs.values():
        assert list(spec.experts) == EXPERTS  # merging/main.py's order
        by_tag.setdefault(spec.tag, []).append(spec)
    assert sorted(by_tag) == ["consensus_ta", "dare", "model_soup", "task_arithmetic", "ties"]
    assert [s.params["lambda"] for s in by_tag["model_soup"]] == [0.2]
    assert [s.params["lambda"] for s in by_tag["task_arithmetic"]] == [0.4]
    assert len(by_tag["dare"]) == 3 and len({s.seed for s in by_tag["dare"]}) == 3  # 3 seeds
    assert {s.params["drop_rate"] for s in by_tag["dare"]} == {0.9}
    (ties,) = by_tag["ties"]
    assert ties.method == "consensus_ties" and ties.params["k"] == 0 and ties.params["density"] == 0.3
    (cons,) = by_tag["consensus_ta"]
    assert cons.params["k"] == 2 and cons.params["lambda"] == 0.4


def test_consensus_ties_with_k0_is_mergebench_ties():
    # MergeBench's TIES (ties_merging_utils.py, merge_func "sum"), written out in numpy: per expert
    # keep the top K fraction of |delta| over the whole vector, elect the sign of the sum, sum the
    # agreeing entries, times the scaling coefficient
    import torch

    from mergeflow.merging import methods

    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 10)).astype(np.float32)
    experts = base[None] + rng.normal(size=(3, 4, 10)).astype(np.float32)
    d = (experts - base[None]).reshape(3, -1)
    n = d.shape[1]
    # top int(n K) per expert; MergeBench's kthvalue(n - int(n K)) with >= keeps one entry more
    # (13 of 40 here; 1 of 2.8 G per expert in the study): the one difference, in docs/mergebench.md
    kth = np.sort(np.abs(d), axis=1)[:, n - int(n * 0.3): n - int(n * 0.3) + 1]
    trimmed = d * (np.abs(d) >= kth)
    assert (trimmed != 0).sum(1).tolist() == [12, 12, 12]
    sign = np.sign(trimmed.sum(0))
    sign[sign == 0] = np.sign(sign.sum())
    agree = np.where(sign[None] > 0, trimmed > 0, trimmed < 0)
    want = base + 0.4 * (trimmed * agree).sum(0).reshape(4, 10)

    m = methods.build("consensus_ties", {"density": 0.3, "trim_scope": "tensor", "lambda": 0.4, "k": 0,
                                         "tall_mask_lambda": 0.0}, ["a", "b", "c"], 0)
    got = m.merge(methods.Block("model.layers.0.w", torch.tensor(base), torch.tensor(experts), 0, 0)).numpy()
    # one tensor: its whole-tensor trim is MergeBench's whole-vector trim
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_published_figures_parse_and_name_their_source():
    from mergeflow.aggregate.compare import load_published

    pub = load_published([ROOT / "config" / "published" / "mergebench.csv"])
    assert len(pub) == 16 and pub["source"].str.contains("uiuctml/MergeBench@b245648").all()
    assert set(pub["benchmark"]) <= set(benchmarks.NAMES)
    assert set(pub["experts"].iloc[0].split("+")) == set(EXPERTS)
    # the repository's files, as recorded (fractions -> percent; okapi: the headline metric's)
    values = dict(zip(pub["benchmark"], pub["value"]))
    assert values == {"gsm8k_cot": 35.10, "mbppplus": 43.04, "humanevalplus": 31.04, "ifeval": 6.84,
                      "m_mmlu_fr": 47.98, "m_mmlu_es": 48.88, "m_mmlu_de": 47.13, "m_mmlu_ru": 44.24,
                      "arc_fr": 40.46, "arc_es": 40.09, "arc_de": 35.84, "arc_ru": 36.95,
                      "hellaswag_fr": 59.38, "hellaswag_es": 60.68, "hellaswag_de": 54.71, "hellaswag_ru": 52.83}
    for bench in benchmarks.loglik_benchmarks():  # each figure is the metric our tables show
        metric = benchmarks.get(bench).headline[0].split(",")[0]
        assert f"{bench} {metric} " in pub.loc[pub["benchmark"] == bench, "source"].iloc[0]
