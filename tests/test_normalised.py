"""Expert-normalised scores and forgetting (issue 18) against hand-computed cases."""

from __future__ import annotations

import copy
import re
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mergeflow import config as mfconfig
from mergeflow.aggregate import normalised
from mergeflow.aggregate.tables import method_table, write_tables
from mergeflow.aggregate.tidy import tidy_table
from mergeflow.errors import MergeflowError

ROOT = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def write_score(root: Path, model: str, benchmark: str, value: float) -> Path:
    path = root / model / f"{benchmark}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": benchmark, "scorer": "x", "details": {},
                                "rows": [{"metric": "exact_match,strict-match", "value": value, "n": 20}]}))
    return path


def test_formulas_by_hand():
    assert normalised.normalised(30.0, [40.0]) == pytest.approx(75.0)
    assert normalised.normalised(30.0, [20.0, 40.0, None]) == pytest.approx(75.0)  # the best expert that owns it
    assert normalised.normalised(30.0, [0.0]) is None  # no division by zero
    assert normalised.normalised(30.0, [None]) is None and normalised.normalised(None, [40.0]) is None
    assert normalised.normalised(0.0, [40.0]) == 0.0
    assert normalised.forgetting(5.0, 10.0) == pytest.approx(5.0)  # base 10, merge 5: forgot 5 points
    assert normalised.forgetting(15.0, 10.0) == pytest.approx(-5.0)
    assert normalised.forgetting(float("nan"), 10.0) is None and normalised.forgetting(5.0, None) is None
    own = {"lm": ["alpaca_eval"], "math": ["gsm8k"]}
    assert normalised.owners("gsm8k_judge", ["lm", "math"], own) == ["math"]  # the judge scores gsm8k
    assert normalised.owners("mbpp", ["lm", "math"], own) == []


@pytest.fixture()
def scored(tmp_path):
    demo = copy.deepcopy(DEMO)
    assert demo["merges"][2]["n_seeds"] == 3  # dare: the demo's three replicates (seeds 42, 43, 44)
    cfg = mfconfig.prepare(demo)
    specs = mfconfig.merge_specs(cfg)
    ta3 = next(i for i, s in specs.items() if s.method == "task_arithmetic" and len(s.experts) == 3)
    ta2 = next(i for i, s in specs.items() if s.method == "task_arithmetic" and len(s.experts) == 2)
    dare = [i for i, s in specs.items() if s.method == "dare"]
    values = [("base", "gsm8k", 0.10), ("base", "mbpp", 0.0), ("math", "gsm8k", 0.40), ("code", "mbpp", 0.0),
              ("base", "alpaca_eval", 0.5),  # lm has no alpaca_eval score: its merges' ratio is undefined
              (ta2, "gsm8k", 0.30), (ta2, "mbpp", 0.05), (ta2, "alpaca_eval", 0.6),
              (ta3, "gsm8k", 0.20), (ta3, "mbpp", 0.10)]
    values += [(m, "gsm8k", v) for m, v in zip(dare, (0.2, 0.3, 0.7))]
    files = [write_score(tmp_path / "scores", *v) for v in values]
    return cfg, specs, ta2, ta3, dare, tidy_table(files, [], mfconfig.aggregate_settings(cfg))


def test_columns_by_hand(scored):
    cfg, specs, ta2, ta3, dare, frame = scored
    own = mfconfig.own_tasks(cfg["aggregate"])
    pair = {idx[1]: row for idx, row in method_table(frame, "lm+math", cells=True, own_tasks=own).iterrows()}
    # gsm8k: 30 / math's 40 = 75 %; alpaca_eval: lm has no score -> undefined, and so the average
    assert pair[ta2]["gsm8k norm."] == "75.0" and pair[ta2]["alpaca_eval norm."] == normalised.DASH
    assert pair[ta2]["norm. avg"] == normalised.DASH
    # mbpp is no expert's of lm+math: forgetting = base 0 - merge 5 = -5 points
    assert pair[ta2]["mbpp forg."] == "-5.0" and pair[ta2]["forg. avg"] == "-5.0"
    three = {idx[1]: row for idx, row in method_table(frame, "lm+math+code", cells=True, own_tasks=own).iterrows()}
    # gsm8k 20 / 40 = 50 %; mbpp: the code expert scores 0 -> no ratio
    assert three[ta3]["gsm8k norm."] == "50.0" and three[ta3]["mbpp norm."] == normalised.DASH
    assert three[ta3]["norm. avg"] == normalised.DASH
    assert not any(str(c).endswith("forg.") for c in three[ta3].index)  # every benchmark is an expert's
    # seeds 20, 30, 70 -> 50, 75, 175 %: mean 100, sample std sqrt((50² + 25² + 75²) / 2) = 66.14
    config_id = specs[dare[0]].config_id
    assert three[config_id]["gsm8k norm."] == "100.0 ± 66.1 (n=3)"
    numbers = {idx[1]: row for idx, row in method_table(frame, "lm+math", own_tasks=own).iterrows()}
    assert numbers[ta2]["gsm8k norm."] == pytest.approx(75.0) and numbers[ta2]["mbpp forg."] == pytest.approx(-5.0)


def test_own_tasks_from_the_config(scored):
    cfg, specs, ta2, ta3, dare, frame = scored
    own = mfconfig.own_tasks({"own_tasks": {"math": ["mbpp"]}})  # a given map replaces the default whole
    assert own == {"math": ["mbpp"]}
    pair = {idx[1]: row for idx, row in method_table(frame, "lm+math", cells=True, own_tasks=own).iterrows()}
    # now gsm8k is the base's task: 10 - 30 = -20; mbpp is math's, which has no mbpp score
    assert pair[ta2]["gsm8k forg."] == "-20.0" and pair[ta2]["mbpp norm."] == normalised.DASH
    assert pair[ta2]["alpaca_eval forg."] == "-10.0"  # base 50, merge 60 (fractions in percent)


def test_written_tables_carry_the_columns_and_the_footnote(scored, tmp_path):
    cfg, specs, ta2, ta3, dare, frame = scored
    write_tables(frame, tmp_path / "t", settings=cfg["aggregate"])
    text = (tmp_path / "t" / "merges_lm_math.md").read_text()
    assert "gsm8k norm." in text and "mbpp forg." in text and re.search(r"\|\s+75\.0 \|", text)
    assert normalised.FOOTNOTE in text and normalised.DASH in text
    assert "norm." not in (tmp_path / "t" / "scores.md").read_text()  # the scores table is unchanged


def test_the_average_per_expert_weighs_each_expert_once():
    # two experts: math owns three benchmarks (norm. 50, 60, 100), code one (norm. 20)
    norms = {"a": 50.0, "b": 60.0, "c": 100.0, "d": 20.0}
    owner = {"a": "math", "b": "math", "c": "math", "d": "code"}
    assert normalised.expert_average(norms, owner) == pytest.approx((70.0 + 20.0) / 2)  # not 57.5
    assert normalised.expert_average({**norms, "d": None}, owner) is None  # one undefined part: undefined
    top = pd.DataFrame([
        {"model": m, "benchmark": b, "score": s, "role": r, "experts": e}
        for m, b, s, r, e in [("math", "a", 40.0, "expert", ""), ("math", "b", 50.0, "expert", ""),
                              ("code", "d", 10.0, "expert", ""), ("base", "a", 1.0, "base", ""),
                              ("m", "a", 20.0, "merge", "math+code"), ("m", "b", 30.0, "merge", "math+code"),
                              ("m", "d", 2.0, "merge", "math+code")]])
    own = {"math": ["a", "b"], "code": ["d"]}
    avg = lambda how: float(normalised.derived_rows(top, own, average=how).set_index("benchmark")  # noqa: E731
                            .loc[f"{normalised.NORM} {normalised.AVG}", "score"])
    assert avg("benchmark") == pytest.approx((50.0 + 60.0 + 20.0) / 3)
    assert avg("expert") == pytest.approx(((50.0 + 60.0) / 2 + 20.0) / 2)


def test_unknown_model_in_own_tasks_names_it():
    demo = copy.deepcopy(DEMO)
    demo.setdefault("aggregate", {})["own_tasks"] = {"maths": ["gsm8k"]}
    with pytest.raises(MergeflowError, match=r"aggregate\.own_tasks\.maths"):
        mfconfig.prepare(demo)
