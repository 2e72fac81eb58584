"""Confidence intervals and paired tests (aggregate/uncertainty.py, significance.py, `mergeflow compare`)
against hand-computed cases, and their place in scores.csv and the tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mergeflow import config as mfconfig
from mergeflow.aggregate import uncertainty as U
from mergeflow.aggregate.tables import write_tables
from mergeflow.aggregate.tidy import tidy_table
from mergeflow.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _binom_tail_ge(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


def test_clopper_pearson_3_of_12():
    low, high = U.clopper_pearson(3, 12, 0.95)
    # textbook value of the exact 95 % interval for 3/12: (0.0549, 0.5719)
    assert (round(low, 4), round(high, 4)) == (0.0549, 0.5719)
    # its definition, with binomial tails summed by hand: P(X >= 3 | low) = P(X <= 3 | high) = 0.025
    assert _binom_tail_ge(3, 12, low) == pytest.approx(0.025, abs=1e-9)
    assert 1 - _binom_tail_ge(4, 12, high) == pytest.approx(0.025, abs=1e-9)


def test_clopper_pearson_edges_have_closed_forms():
    assert U.clopper_pearson(0, 10) == pytest.approx((0.0, 1 - 0.025 ** (1 / 10)))
    assert U.clopper_pearson(10, 10) == pytest.approx((0.025 ** (1 / 10), 1.0))
    with pytest.raises(Exception, match="k=5, n=4"):
        U.clopper_pearson(5, 4)


def test_mcnemar_exact_small_tables():
    assert U.mcnemar_exact(1, 8) == pytest.approx(2 * (1 + 9) / 2**9)  # 0.0390625
    assert U.mcnemar_exact(5, 2) == pytest.approx(2 * (1 + 7 + 21) / 2**7)  # 0.453125
    assert U.mcnemar_exact(3, 3) == 1.0 and U.mcnemar_exact(0, 0) == 1.0


def test_bootstrap_is_reproducible_with_its_seed():
    values = [0.0, 0.5, 1.0, 1.0, 0.5, 0.0, 1.0, 0.5, 0.25, 0.75]
    first = repr(U.bootstrap_ci(values, resamples=500, seed=7)).encode()
    assert repr(U.bootstrap_ci(values, resamples=500, seed=7)).encode() == first
    assert repr(U.bootstrap_ci(values, resamples=500, seed=8)).encode() != first
    low, high = U.bootstrap_ci(values, resamples=500, seed=7)
    assert low < sum(values) / len(values) < high


def test_ratio_bootstrap_and_paired_bootstrap():
    pairs = [(2.0, 4), (1.0, 1), (3.0, 2), (0.5, 1)]
    low, high = U.bootstrap_ci(pairs, resamples=300, seed=0)
    assert low <= 6.5 / 8 <= high
    same = U.paired_bootstrap([0.1, 0.4, 0.7, 0.2], [0.1, 0.4, 0.7, 0.2], resamples=200)
    assert same["diff"] == 0 and same["p"] == 1.0
    apart = U.paired_bootstrap([0.9, 0.8, 0.95, 0.85] * 5, [0.1, 0.2, 0.15, 0.05] * 5, resamples=200)
    assert apart["diff"] == pytest.approx(0.75) and apart["p"] < 0.01 and apart["low"] > 0


# --------------------------------------------------------------------------- scores.csv and tables
def _write(root: Path, model: str, name: str, payload: dict, samples: list[dict] | None) -> Path:
    path = root / model / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    if samples is not None:
        (root / model / f"{name}.samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def _gsm8k(root, model, correct: list[int], with_samples=True) -> Path:
    rows = [{"metric": "exact_match,strict-match", "value": sum(correct) / len(correct), "n": len(correct)}]
    samples = [{"doc_id": f"d{i}", "filters": {"strict-match": {"answer": "1", "exact_match": c}}}
               for i, c in enumerate(correct)]
    return _write(root, model, "gsm8k", {"benchmark": "gsm8k", "scorer": "lm_eval", "rows": rows},
                  samples if with_samples else None)


def _alpaca(root, model, prefs: list[float]) -> Path:
    win = 100 * sum(p - 1 for p in prefs) / len(prefs)
    rows = [{"metric": "win_rate", "value": win, "n": len(prefs)}]
    samples = [{"doc_id": f"a{i}", "preference": p, "parsed": True} for i, p in enumerate(prefs)]
    return _write(root, model, "alpaca_eval", {"benchmark": "alpaca_eval", "scorer": "alpaca_eval", "rows": rows},
                  samples)


@pytest.fixture()
def demo_like(tmp_path):
    cfg = mfconfig.prepare(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))
    ties_id = [m for m in mfconfig.merge_specs(cfg) if m.startswith("ties-")][0]
    ta_id = [m for m in mfconfig.merge_specs(cfg) if m.startswith("task_arithmetic-")][0]
    n = 12
    files = [
        _gsm8k(tmp_path, "base", [1, 1, 1] + [0] * 9),   # 3/12
        _gsm8k(tmp_path, "math", [1] * 12),
        _gsm8k(tmp_path, ties_id, [1] * 12),              # 12/12: far from the base, same as the expert
        _gsm8k(tmp_path, ta_id, [1, 1, 1, 1] + [0] * 8),  # 4/12: close to the base, far from the expert
        _gsm8k(tmp_path, "lm", [0] * n, with_samples=False),
        _alpaca(tmp_path, ties_id, [2.0, 1.0, 1.5, 2.0, 1.75, 1.0, 2.0, 2.0]),
    ]
    return cfg, ties_id, ta_id, files


def test_scores_csv_has_intervals(demo_like, tmp_path):
    cfg, ties_id, ta_id, files = demo_like
    frame = tidy_table(files, [], cfg)
    for col in U.CI_COLUMNS:
        assert col in frame.columns
    base = frame[(frame.model == "base") & (frame.benchmark == "gsm8k")].iloc[0]
    assert (base.ci_low, base.ci_high) == pytest.approx(U.clopper_pearson(3, 12))
    assert base.ci_method == "clopper_pearson" and base.ci_level == 0.95 and base.ci_note == "k=3 of n=12"
    alpaca = frame[(frame.model == ties_id) & (frame.benchmark == "alpaca_eval")].iloc[0]
    assert alpaca.ci_method == "bootstrap_percentile" and alpaca.ci_seed == 0 and alpaca.ci_resamples == 2000
    assert alpaca.ci_low < alpaca.value < alpaca.ci_high and alpaca.ci_high <= 100  # percent, as the win rate
    lm = frame[frame.model == "lm"].iloc[0]
    assert pd.isna(lm.ci_low) and "samples.jsonl" in lm.ci_note  # no per-doc results: no interval, a reason
    # the same inputs give the same bytes
    frame.to_csv(tmp_path / "a.csv", index=False)
    tidy_table(files, [], cfg).to_csv(tmp_path / "b.csv", index=False)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()


def test_per_doc_values_that_disagree_with_the_row_are_not_used(tmp_path):
    path = _gsm8k(tmp_path, "base", [1, 0, 0, 0])
    payload = json.loads(path.read_text())
    payload["rows"][0]["value"] = 0.5  # the file says 0.5, its documents say 0.25
    path.write_text(json.dumps(payload))
    cfg = mfconfig.prepare(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))
    row = tidy_table([path], [], cfg).iloc[0]
    assert pd.isna(row.ci_low) and "not used" in row.ci_note


def test_merge_tables_mark_differences_that_are_not_significant(demo_like, tmp_path):
    cfg, ties_id, ta_id, files = demo_like
    frame = tidy_table(files, [], cfg)
    per_doc = {}
    for f in files:
        per_doc.update(U.score_file_per_doc(f))
    out = tmp_path / "tables"
    written = write_tables(frame, out, per_doc, cfg["aggregate"])
    assert {"comparisons.md", "comparisons.csv"} <= {p.name for p in written}
    tests = pd.read_csv(out / "comparisons.csv")
    vs_base = tests[(tests.versus_role == "base") & (tests.benchmark == "gsm8k")].set_index("model")
    assert vs_base.loc[ties_id, "p"] == pytest.approx(U.mcnemar_exact(9, 0))  # 12/12 vs 3/12: 9 discordant
    assert vs_base.loc[ta_id, "p"] == pytest.approx(1.0)                      # 4/12 vs 3/12: 1 discordant
    text = (out / "merges_lm_math_code.md").read_text()
    ties_line = next(line for line in text.splitlines() if ties_id in line)
    ta_line = next(line for line in text.splitlines() if ta_id in line)
    # ties = the expert (12/12): not different from it (‡), but different from the base (no †)
    assert "100.0 [73.5, 100.0]‡" in ties_line and "†" not in ties_line
    # task arithmetic (4/12): not different from the base (†), different from the expert (no ‡)
    assert "33.3 [9.9, 65.1]†" in ta_line and "‡" not in ta_line
    assert "not significantly different from the base" in text
    scores = (out / "scores.md").read_text()
    assert "25.0 [5.5, 57.2]" in scores  # base 3/12 with its exact interval


def test_compare_command(demo_like, tmp_path, capsys):
    cfg, ties_id, ta_id, files = demo_like
    a, b = files[2], files[0]
    assert main(["compare", str(a), str(b), "--json", str(tmp_path / "c.json")]) == 0
    printed = capsys.readouterr().out
    assert "mcnemar_exact" in printed and "n = 12" in printed
    res = json.loads((tmp_path / "c.json").read_text())[0]
    assert res["p"] == pytest.approx(2 / 2**9) and res["diff"] == pytest.approx(0.75)
    assert main(["compare", str(a), str(files[5])]) == 2  # gsm8k vs alpaca_eval: nothing in common
    assert "share no per-doc results" in capsys.readouterr().err
