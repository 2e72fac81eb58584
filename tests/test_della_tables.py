"""DELLA's Tables 1-7 next to ours through `mergeflow aggregate` on synthetic score files
(config/della.yaml's blocks, config/published/della.csv's cells): best of the grid per
cell, the paper's rows under the paper's names, Δ, and the judge note."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from mergeflow import config as mfconfig
from mergeflow.aggregate import della
from mergeflow.cli import main
from test_aggregate import write_score

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "della.yaml"
JUDGE = {"model": "gpt-4.1-2025-04-14", "endpoint": "https://api.openai.com/v1"}


@pytest.fixture(scope="module")
def specs():
    return mfconfig.merge_specs(mfconfig.load(CONFIG))


def merge_id(specs, tag, method, experts, **params):
    found = [m for m, s in specs.items() if s.tag == tag and s.method == method and s.experts == tuple(experts)
             and all(s.params.get(k) == v for k, v in params.items())]
    assert len(found) == 1, (tag, method, experts, params, found)
    return found[0]


def rows_of(md: str) -> dict[tuple, list[str]]:
    """Table rows of a Markdown table keyed by their index cells."""
    out = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| experts") and not line.startswith("| p "):
            cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
            out[tuple(cells[:2])] = cells
    return out


@pytest.mark.slow
def test_della_tables_through_mergeflow_aggregate(specs, tmp_path):
    d = tmp_path / "scores"
    t1 = {(p, lam): merge_id(specs, "table1", "della", ["lm", "math"], drop_rate=p, **{"lambda": lam})
          for p, lam in ((0.5, 1.1), (0.3, 1.0), (0.5, 1.0))}

    def alpaca(model, wr):
        return write_score(d, model, "alpaca_eval", [{"metric": "win_rate", "value": wr, "n": 805},
                                                     {"metric": "length_controlled_winrate", "value": 1.0, "n": 805}],
                           details={"judge": {**JUDGE, "annotator": "alpaca_eval_gpt4.1"}})

    def judged(model, acc):
        return write_score(d, model, "gsm8k_judge", [{"metric": "judge_accuracy", "value": acc, "n": 1319}],
                           details={"judge": JUDGE})

    files = [
        alpaca("lm", 79.0),
        alpaca(t1[(0.5, 1.1)], 82.0), judged(t1[(0.5, 1.1)], 0.60),
        alpaca(t1[(0.3, 1.0)], 80.0), judged(t1[(0.3, 1.0)], 0.66),
        alpaca(t1[(0.5, 1.0)], 90.0), judged(t1[(0.5, 1.0)], 0.40),
        # lm-eval's strict match is not the paper's GSM8K (GPT-4 judged): never shown here
        write_score(d, t1[(0.5, 1.1)], "gsm8k", [{"metric": "exact_match,strict-match", "value": 0.99}]),
        judged(merge_id(specs, "table6", "della_randrank", ["math"], drop_rate=0.94), 0.5),
        alpaca(merge_id(specs, "table3", "dare_della", ["lm"], drop_rate=0.3), 40.0),
        judged(merge_id(specs, "table3", "dare_della", ["math"], drop_rate=0.3), 0.5),
        write_score(d, merge_id(specs, "table3", "dare_della", ["code"], drop_rate=0.3), "mbpp",
                    [{"metric": "pass@1", "value": 0.2}]),
    ]
    tables = tmp_path / "tables"
    assert main(["aggregate", "--scores", *map(str, files), "--config", str(CONFIG),
                 "--out", str(tmp_path / "scores.csv"), "--tables", str(tables)]) == 0
    for n in range(1, 8):
        assert (tables / f"paper_della_table{n}.md").is_file() and (tables / f"paper_della_table{n}.tex").is_file()
    note = ("Judges: alpaca_eval judged by alpaca_eval_gpt4.1 (gpt-4.1-2025-04-14); the paper used "
            "alpaca_eval_gpt4 (gpt-4). gsm8k_judge judged by gpt-4.1-2025-04-14; the paper used gpt-4-0613.")

    t1md = (tables / "paper_della_table1.md").read_text()
    assert t1md.rstrip().endswith(note) and "judged by GPT-4; ours by the config's substitute judge" in t1md
    assert "selected on the test set" in t1md and "selected on the test set" not in (tables / "paper_della_table6.md").read_text()
    rows = rows_of(t1md)
    # header: experts, method, merges tried, then (ours, paper, Δ) per AlpacaEval, GSM8K, Avg
    assert rows[("LM+Math", "DELLA")][2:] == ["15", "90.0", "81.8", "+8.2", "66.0", "64.1", "+1.9", "/", "/", "/",
                                             "78.0", "72.9", "+5.1"]
    assert rows[("LM+Math", "TA")][2:6] == ["3", "–", "79.1", "–"]  # the paper's TA: our nodrop grid, unscored
    assert rows[("LM", "– (the expert)")][3:6] == ["79.0", "80.8", "-1.8"]
    assert rows[("LM", "– (the expert)")][7] == "45.9†"  # flagged cell
    assert ("LM+Math", "task arithmetic (plain sum; not the paper's TA)") in rows
    assert "**90.0**" in t1md

    # Table 7: per p the lambda with the best average (not the per-cell best of Table 1)
    t7 = rows_of((tables / "paper_della_table7.md").read_text())
    assert t7[("LM+Math", "0.5")][2:] == ["1.1", "82.0", "80.4", "+1.6", "60.0", "64.5", "-4.5", "/", "/", "/",
                                          "71.0", "72.4", "-1.4"]
    assert t7[("LM+Math", "0.3")][2] == "1.0"
    # Table 6: random ranking per row at p = 0.94; every paper cell unverified
    t6md = (tables / "paper_della_table6.md").read_text()
    row = next(line for line in t6md.splitlines() if line.startswith("| 0.94 "))
    cells = [c.strip().strip("*") for c in row.strip().strip("|").split("|")]
    assert cells[-3:] == ["–", "60.0†", "–"] and cells[-6:-3] == ["50.0", "55.5†", "-5.5"]
    # Table 3: the mean of LM AlpacaEval, Math GSM8K and Code MBPP (the paper names no expert)
    t3md = (tables / "paper_della_table3.md").read_text()
    row = next(line for line in t3md.splitlines() if line.startswith("| 0.3 "))
    assert [c.strip() for c in row.strip().strip("|").split("|")][1:4] == ["**36.7**", "39.7", "-3.0"]
    # Table 5: WANDA is not run; Table 4's erratum is shown
    assert "WANDA needs calibration activations" in (tables / "paper_della_table5.md").read_text()
    assert "39.3" in (tables / "paper_della_table4.md").read_text()
    assert "| DELLA average gain over TIES " in (tables / "claims.md").read_text()
    tex = (tables / "paper_della_table1.tex").read_text()
    assert r"\textbf{90.0}" in tex and "81.8" in tex and tex.rstrip().endswith(f"% {note}")


def test_every_published_row_has_merges_behind_it_in_della_yaml(specs):
    config = mfconfig.load(CONFIG)
    merges = della._merges(config)
    published = della.load([ROOT / "config" / "published" / "della.csv"])
    missing = []
    for _, r in published.drop_duplicates(["table", "experts", "row", "p"]).iterrows():
        if r["row"] == "expert" or r["row"].startswith("WANDA"):
            continue
        tags, method, params = della.ROWS[(r["table"], r["row"])]
        experts = [r["experts"]] if r["experts"] else list(della.OWN_TASK)
        for e in experts:
            if della._select(merges, tags, method, params, e, float(r["p"]) if r["p"] else None).empty:
                missing.append((r["table"], r["row"], e, r["p"]))
    assert not missing
    # the grid the paper searched: p in {0.1, ..., 0.9} (TIES: density = 1 - p) for every Table 1 and 4 row
    for (table, row), (tags, method, params) in della.ROWS.items():
        if table in (1, 4) and method not in ("nodrop", "nodrop_noelect"):
            drops = set(della._select(merges, tags, method, params, "lm+math+code")["drop"].round(6))
            assert drops == {0.1, 0.3, 0.5, 0.7, 0.9}, (table, row)


def test_abstract_claims_come_from_table1_as_the_paper_computed_them(specs):
    # DELLA's gain over TIES: per merge, DELLA's Avg minus TIES's, averaged over the four merges
    config = mfconfig.load(CONFIG)
    columns = {"lm+math": ["alpaca_eval", "gsm8k"], "lm+code": ["alpaca_eval", "mbpp"],
               "math+code": ["gsm8k", "mbpp"], "lm+math+code": ["alpaca_eval", "gsm8k", "mbpp"]}
    score_of = {"alpaca_eval": ("alpaca_eval", "win_rate", 1.0), "gsm8k": ("gsm8k_judge", "judge_accuracy", 100.0),
                "mbpp": ("mbpp", "pass@1", 100.0)}
    rows, gains = [], []
    for i, (experts, cols) in enumerate(columns.items()):
        ids = {m: merge_id(specs, "table1", m, experts.split("+"), **{"lambda": 1.1},
                           **({"density": 0.5} if m == "ties" else {"drop_rate": 0.5}))
               for m in ("della", "ties")}
        for method, base in (("della", 60.0 + i), ("ties", 50.0)):
            for col in cols:
                bench, metric, unit = score_of[col]
                rows.append({"model": ids[method], "benchmark": bench, "metric": metric, "value": base / unit})
        gains.append(10.0 + i)
    path = ROOT / "config" / "published" / "della_claims.csv"
    claims = pd.read_csv(path)[["claim", "value"]]
    got = della.table1_claims(claims, path, pd.DataFrame(rows), config, [ROOT / "config" / "published" / "della.csv"])
    got = dict(zip(pd.read_csv(path)["versus"], got["ours"]))
    assert got["ties"] == pytest.approx(sum(gains) / 4)
    assert pd.isna(got["dare_della"]) and pd.isna(got["pruning_baselines"])  # DARE not scored: no claim
