"""IFEval scored by lm-eval replay of stored generations (lm-eval's own instruction checks),
against hand-checked verdicts; nltk's punkt_tab sentence model provided offline; per-doc
values and intervals for the prompt- and instruction-level accuracies."""

from __future__ import annotations

import json

import pytest

from mergeflow import benchmarks
from mergeflow.aggregate import uncertainty
from mergeflow.cli import main

END = "Is there anything else I can help with?"
HUB_KWARGS = ("num_bullets", "relation", "num_sentences", "end_phrase")  # the Hub rows list every key, unset ones null
# (key, prompt, instruction ids, kwargs, response, strict verdict per instruction, loose verdict per instruction)
CASES = [
    (1001, "Write a short note about rivers without using any commas.", ["punctuation:no_comma"], [{}],
     "Rivers flow to the sea. They carry water and silt.", [True], [True]),
    (1002, "Describe the moon using only lowercase letters.", ["change_case:english_lowercase"], [{}],
     "The Moon is bright tonight.", [False], [False]),
    # punkt's English abbreviations: "Mr." ends no sentence, so 2 sentences (< 3); split naively it would be 3
    (1003, "Describe a cat in fewer than 3 sentences.", ["length_constraints:number_sentences"],
     [{"relation": "less than", "num_sentences": 3}], "Cats purr. Mr. Whiskers sleeps all day.", [True], [True]),
    # two bullets (followed); a comma (strict: not followed; loose drops the first line: no comma left)
    (1004, "List two fruits as markdown bullets and use no commas.",
     ["detectable_format:number_bullet_lists", "punctuation:no_comma"],
     [{k: (2 if k == "num_bullets" else None) for k in HUB_KWARGS}, {k: None for k in HUB_KWARGS}],
     "* apples, pears\n* plums", [True, False], [True, True]),
    (1005, f"Explain rain. End your response with '{END}'", ["startend:end_checker"], [{"end_phrase": END}],
     f"Rain falls from clouds.\n{END}", [True], [True]),
    (1006, "Write anything without commas.", ["punctuation:no_comma"], [{}], "", [False], [False]),  # empty: nothing followed
]


@pytest.fixture
def scored(tmp_path):
    bench = benchmarks.get("ifeval")
    docs = [{"key": k, "prompt": p, "instruction_id_list": ids, "kwargs": kw} for k, p, ids, kw, *_ in CASES]
    data = tmp_path / "ifeval.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    gens = tmp_path / "ifeval.generations.jsonl"
    gens.write_text("".join(json.dumps({"doc_id": bench.doc_id(d), "prompt": d["prompt"], "output": c[4],
                                        "completion": c[4]}) + "\n" for d, c in zip(docs, CASES)))
    out = tmp_path / "ifeval.json"
    assert main(["score", "--benchmark", "ifeval", "--data", str(data), "--generations", str(gens), "--out", str(out)]) == 0
    return out


def test_ifeval_accuracies_match_hand_checked_verdicts(scored):
    score = json.loads(scored.read_text())
    assert score["scorer"] == "lm_eval" and score["details"]["task"] == "mergeflow_ifeval"
    rows = {r["metric"]: r for r in score["rows"]}
    strict, loose = [c[5] for c in CASES], [c[6] for c in CASES]
    n = len(CASES)
    assert rows["prompt_level_strict_acc,none"]["value"] == pytest.approx(sum(all(v) for v in strict) / n)  # 3/6
    assert rows["prompt_level_loose_acc,none"]["value"] == pytest.approx(sum(all(v) for v in loose) / n)  # 4/6
    flat = lambda vs: [x for v in vs for x in v]  # noqa: E731
    assert rows["inst_level_strict_acc,none"]["value"] == pytest.approx(sum(flat(strict)) / len(flat(strict)))  # 4/7
    assert rows["inst_level_loose_acc,none"]["value"] == pytest.approx(sum(flat(loose)) / len(flat(loose)))  # 5/7
    samples = [json.loads(line) for line in scored.with_name("ifeval.samples.jsonl").read_text().splitlines()]
    assert [s["filters"]["none"]["inst_level_strict_acc"] for s in samples] == strict
    assert [s["filters"]["none"]["inst_level_loose_acc"] for s in samples] == loose


def test_ifeval_per_doc_values_give_the_rows_and_their_intervals(scored):
    payload = json.loads(scored.read_text())
    samples = uncertainty.read_samples(scored)
    rows = {r["metric"]: r for r in payload["rows"]}
    prompt, _ = uncertainty.per_doc(payload, rows["prompt_level_strict_acc,none"], samples)
    inst, _ = uncertainty.per_doc(payload, rows["inst_level_strict_acc,none"], samples)
    assert prompt.kind == "binary" and prompt.estimate() == pytest.approx(3 / 6)
    # instruction level: every instruction counts once, so a ratio of sums over docs (4 of 7), not a mean of doc shares
    assert inst.kind == "ratio" and inst.estimate() == pytest.approx(4 / 7)
    ci = uncertainty.interval(rows["inst_level_strict_acc,none"], inst, None, {})
    assert ci["ci_method"] == "bootstrap_percentile" and ci["ci_low"] <= 4 / 7 <= ci["ci_high"]
    ci = uncertainty.interval(rows["prompt_level_strict_acc,none"], prompt, None, {})
    assert ci["ci_method"] == "clopper_pearson" and ci["ci_note"] == "k=3 of n=6"


def test_punkt_tab_is_provided_without_a_download(monkeypatch):
    import nltk

    from mergeflow.scoring import nltk_data

    where = nltk_data.ensure_punkt_tab()
    assert "punkt_tab" in where
    # the English model's abbreviations: "Mr." and "p.m." end no sentence
    assert nltk.sent_tokenize("Mr. Smith left at 5 p.m. on Monday. He came back.") == [
        "Mr. Smith left at 5 p.m. on Monday.", "He came back."]
