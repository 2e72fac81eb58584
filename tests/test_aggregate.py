"""Aggregation: score files + merge metadata -> tidy table and paper-style tables."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mergeflow import config as mfconfig
from mergeflow.aggregate.tables import scores_table, write_tables
from mergeflow.aggregate.tidy import tidy_table
from mergeflow.errors import MergeflowError

ROOT = Path(__file__).resolve().parents[1]


def write_score(root: Path, model: str, benchmark: str, rows, scorer="x", details=None) -> Path:
    path = root / model / f"{benchmark}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": benchmark, "scorer": scorer, "rows": rows, "details": details or {}}))
    return path


@pytest.fixture()
def setup(tmp_path):
    cfg = mfconfig.prepare(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))
    ties_id = [m for m in mfconfig.merge_specs(cfg) if m.startswith("ties-")][0]
    files = [
        write_score(tmp_path, "base", "gsm8k", [
            {"metric": "exact_match,strict-match", "value": 0.25, "stderr": 0.1, "n": 20},
            {"metric": "exact_match,flexible-extract", "value": 0.5, "stderr": 0.1, "n": 20},
        ], scorer="lm_eval"),
        write_score(tmp_path, "math", "gsm8k", [{"metric": "exact_match,strict-match", "value": 0.75, "n": 20}]),
        write_score(tmp_path, ties_id, "gsm8k", [{"metric": "exact_match,strict-match", "value": 0.5, "n": 20}]),
        write_score(tmp_path, ties_id, "alpaca_eval", [{"metric": "win_rate", "value": 37.5, "stderr": 4.0, "n": 8}],
                    scorer="alpaca_eval", details={"judge": {"annotator": "demo_annotator"}}),
    ]
    merge_dir = tmp_path / "merges" / ties_id
    merge_dir.mkdir(parents=True)
    (merge_dir / "mergeflow_merge.json").write_text(json.dumps({"method": "ties"}))
    return cfg, ties_id, files, [merge_dir]


def test_tidy_rows_carry_roles_and_parameters(setup):
    cfg, ties_id, files, merges = setup
    frame = tidy_table(files, merges, cfg)
    assert len(frame) == 5
    merged = frame[frame.model == ties_id]
    assert set(merged.role) == {"merge"} and set(merged.method) == {"ties"}
    assert set(merged.experts) == {"lm+math+code"}
    assert merged.param_density.iloc[0] == 0.5
    assert frame[frame.model == "base"].role.iloc[0] == "base"
    assert frame[frame.model == "math"].role.iloc[0] == "expert"
    assert merged[merged.benchmark == "alpaca_eval"].judge.iloc[0] == "demo_annotator"


def test_tables_use_headline_metrics_in_percent(setup, tmp_path):
    cfg, ties_id, files, merges = setup
    frame = tidy_table(files, merges, cfg)
    table = scores_table(frame)
    by_model = {idx[1]: row for idx, row in table.iterrows()}
    assert by_model["base"]["gsm8k"] == pytest.approx(25.0)  # strict, not flexible
    assert by_model[ties_id]["alpaca_eval"] == pytest.approx(37.5)  # win rate already in percent
    assert by_model["math"]["gsm8k"] == pytest.approx(75.0)
    written = write_tables(frame, tmp_path / "tables")
    names = sorted(p.name for p in written)
    assert names == ["merges_lm_math_code.md", "scores.md"]
    text = (tmp_path / "tables" / "scores.md").read_text()
    assert "75.0" in text and "37.5" in text


def test_malformed_score_file_is_named(tmp_path, setup):
    cfg, *_ = setup
    bad = tmp_path / "x" / "gsm8k.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    with pytest.raises(MergeflowError, match=str(bad)):
        tidy_table([bad], [], cfg)


def test_config_chooses_the_headline_metric(setup):
    cfg, ties_id, files, merges = setup
    cfg = {**cfg, "aggregate": {**cfg["aggregate"], "headline": {"gsm8k": "exact_match,flexible-extract"}}}
    frame = tidy_table(files, merges, cfg)
    marked = frame[(frame.model == "base") & frame.headline]
    assert list(marked.metric) == ["exact_match,flexible-extract"]
    by_model = {idx[1]: row for idx, row in scores_table(frame).iterrows()}
    assert by_model["base"]["gsm8k"] == pytest.approx(50.0)


def test_robustness_table_in_m3_layout(tmp_path):
    from mergeflow.aggregate.tables import robustness_table, write_robustness

    rows = []
    for model, m3, lb, pdr in (("ties-x", False, 0.25, 0.5), ("m3-x", True, 0.5, 0.25)):
        base = {"model": model, "role": "merge", "method": "m3" if m3 else "ties", "family": "ties", "dare": False,
                "m3": m3, "experts": "lm+code", "n": 4}
        rows.append({**base, "benchmark": "livebench_typos", "metric": "score", "value": lb})
        rows.append({**base, "benchmark": "adv_sst2", "metric": "accuracy,clean", "value": 0.8})
        rows.append({**base, "benchmark": "adv_sst2", "metric": "pdr,deepwordbug", "value": pdr})
    frame = pd.DataFrame(rows)
    table = robustness_table(frame)
    by_model = {idx[1]: r for idx, r in table.iterrows()}
    assert by_model["m3-x"]["livebench_typos"] == pytest.approx(50.0)
    assert by_model["ties-x"]["adv_sst2 pdr,deepwordbug"] == pytest.approx(50.0)
    assert "adv_sst2 accuracy,clean" not in table.columns
    assert list(table.columns) == ["livebench_typos", "adv_sst2 pdr,deepwordbug"]  # OOD first, then PDRs
    labels = {idx[1]: idx[0] for idx in table.index}
    assert labels == {"ties-x": "ties (lm+code)", "m3-x": "ties (lm+code) +M3"}  # with and without M3
    assert [p.name for p in write_robustness(frame, tmp_path)] == ["robustness.md"]
