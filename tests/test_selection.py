"""Validation-selected hyperparameters (issue 18): the split, the selection rule, and that a
selection reads validation scores only (mergeflow.selection)."""

from __future__ import annotations

import json
import pathlib
from pathlib import Path

import pytest

from mergeflow import benchmarks
from mergeflow.cli import main
from mergeflow.errors import MergeflowError
from mergeflow.selection import seeded_split, select, split_benchmark, sweep_name

GSM8K = benchmarks.get("gsm8k")
ROWS = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(20)]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ids(rows):
    return [GSM8K.doc_id(r) for r in rows]


def test_seeded_split_is_deterministic_order_free_and_seeded():
    doc_ids = ids(ROWS)
    val, test = seeded_split(doc_ids, 0.25, seed=3)
    assert len(val) == 5 and len(test) == 15 and not val & test and val | test == set(doc_ids)
    assert seeded_split(list(reversed(doc_ids)), 0.25, seed=3) == (val, test)  # row order does not matter
    assert seeded_split(doc_ids, 0.25, seed=4)[0] != val  # another seed, another split (5 of 20: 1 in 15504 alike)
    # a doc's side survives added rows: the old validation docs stay validation or the extra doc displaces one
    bigger, _ = seeded_split(doc_ids + ["extra"], 0.25, seed=3)
    assert len(bigger - val - {"extra"}) <= 1
    with pytest.raises(MergeflowError, match="fraction"):
        seeded_split(doc_ids, 1.0, seed=0)


def test_split_files_and_record(tmp_path):
    data = write_rows(tmp_path / "gsm8k.jsonl", ROWS)
    rc = main(["split", "--benchmark", "gsm8k", "--data", str(data), "--fraction", "0.3", "--seed", "7",
               "--validation-out", str(tmp_path / "v.jsonl"), "--test-out", str(tmp_path / "t.jsonl"),
               "--record-out", str(tmp_path / "split.json")])
    assert rc == 0
    record = json.loads((tmp_path / "split.json").read_text())
    val_rows = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    test_rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert record["source"] == {"kind": "seeded", "fraction": 0.3, "seed": 7}
    assert record["validation"] == ids(val_rows) and record["test"] == ids(test_rows)
    assert len(val_rows) == 6 and len(test_rows) == 14
    assert set(record["validation"]) == seeded_split(ids(ROWS), 0.3, 7)[0]
    # file order kept on each side
    assert ids(val_rows) == [d for d in ids(ROWS) if d in set(record["validation"])]


def test_split_with_the_datasets_own_validation_rows(tmp_path):
    data = write_rows(tmp_path / "gsm8k.jsonl", ROWS[:12])
    own = write_rows(tmp_path / "own.jsonl", ROWS[12:])
    rec = split_benchmark("gsm8k", data, tmp_path / "v.jsonl", tmp_path / "t.jsonl", tmp_path / "r.json", 0.2, 0,
                          own_validation=own)
    assert rec["source"]["kind"] == "dataset" and rec["validation"] == ids(ROWS[12:]) and rec["test"] == ids(ROWS[:12])
    overlap = write_rows(tmp_path / "bad.jsonl", ROWS[10:])
    with pytest.raises(MergeflowError, match="also in the benchmark"):
        split_benchmark("gsm8k", data, tmp_path / "v.jsonl", tmp_path / "t.jsonl", tmp_path / "r.json", 0.2, 0,
                        own_validation=overlap)


def score_file(path: Path, benchmark: str, metric: str, value: float, doc_ids: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": benchmark, "scorer": "x", "details": {},
                                "rows": [{"metric": metric, "value": value, "stderr": 0.0, "n": len(doc_ids)}]}))
    path.with_name(path.name[:-5] + ".samples.jsonl").write_text("".join(json.dumps({"doc_id": d}) + "\n"
                                                                           for d in doc_ids))
    return path


GSM, MBPP = "exact_match,strict-match", "pass@1"


def selection_fixture(tmp_path: Path) -> tuple[dict, dict, list]:
    """Validation scores: base gsm8k 0.5, mbpp 0.2; member a: 0.6, 0.1; member b: 0.4, 0.3.
    mean: a = 0.35, b = 0.35 (tie: a, the first). mean_normalised by base: a = (1.2 + 0.5) / 2
    = 0.85, b = (0.8 + 1.5) / 2 = 1.15: b."""
    val = {"gsm8k": ids(ROWS[:4]), "mbpp": ["1", "2"]}
    table = {"base": (0.5, 0.2), "a": (0.6, 0.1), "b": (0.4, 0.3), "e1": (0.8, 0.1), "e2": (0.2, 0.25)}
    scores = {}
    for model, (g, m) in table.items():
        scores[(model, "gsm8k")] = score_file(tmp_path / "validation" / model / "gsm8k.json", "gsm8k", GSM, g, val["gsm8k"])
        scores[(model, "mbpp")] = score_file(tmp_path / "validation" / model / "mbpp.json", "mbpp", MBPP, m, val["mbpp"])
    splits = {}
    for bench, v in val.items():
        splits[bench] = tmp_path / f"{bench}.split.json"
        splits[bench].write_text(json.dumps({"validation": v, "test": ["t1", "t2"]}))
    return scores, splits, [("a", {"lambda": 0.5}), ("b", {"lambda": 1.0})]


def test_selection_rules_by_hand(tmp_path):
    scores, splits, cands = selection_fixture(tmp_path)
    mean = select(cands, scores, [], ["gsm8k", "mbpp"], "mean", splits)
    assert [c["objective"] for c in mean["candidates"]] == pytest.approx([0.35, 0.35])
    assert mean["selected"] == "a"  # a tie goes to the first grid member
    by_base = select(cands, scores, ["base"], ["gsm8k", "mbpp"], "mean_normalised", splits)
    assert [c["objective"] for c in by_base["candidates"]] == pytest.approx([0.85, 1.15])
    assert by_base["selected"] == "b" and by_base["selected_params"] == {"lambda": 1.0}
    # by the experts: the best expert per benchmark, gsm8k 0.8 (e1), mbpp 0.25 (e2):
    # a = (0.75 + 0.4) / 2 = 0.575, b = (0.5 + 1.2) / 2 = 0.85
    by_experts = select(cands, scores, ["e1", "e2"], ["gsm8k", "mbpp"], "mean_normalised", splits)
    assert [c["objective"] for c in by_experts["candidates"]] == pytest.approx([0.575, 0.85])
    assert by_experts["normaliser"] == pytest.approx({"gsm8k": 0.8, "mbpp": 0.25})


def test_a_zero_reference_leaves_its_benchmark_out(tmp_path):
    scores, splits, cands = selection_fixture(tmp_path)
    scores[("base", "mbpp")] = score_file(tmp_path / "zero" / "mbpp.json", "mbpp", MBPP, 0.0, ["1", "2"])
    out = select(cands, scores, ["base"], ["gsm8k", "mbpp"], "mean_normalised", splits)
    assert out["skipped_benchmarks"] == ["mbpp"] and out["selected"] == "a"  # gsm8k alone: 1.2 against 0.8


def test_a_score_with_a_test_doc_is_refused(tmp_path):
    scores, splits, cands = selection_fixture(tmp_path)
    scores[("b", "mbpp")] = score_file(tmp_path / "leak" / "mbpp.json", "mbpp", MBPP, 0.9, ["1", "t1"])
    with pytest.raises(MergeflowError, match="not in mbpp's validation split"):
        select(cands, scores, ["base"], ["gsm8k", "mbpp"], "mean_normalised", splits)


def test_the_selection_cli_opens_validation_files_only(tmp_path, monkeypatch):
    scores, splits, cands = selection_fixture(tmp_path)
    # test-split score files exist beside them, with scores that would change the choice
    for model, value in (("a", 1.0), ("b", 0.0)):
        score_file(tmp_path / "test" / model / "gsm8k.json", "gsm8k", GSM, value, ["t1", "t2"])
    opened = []
    real_read, real_open = pathlib.Path.read_text, open

    def read_text(self, *a, **k):
        opened.append(str(self))
        return real_read(self, *a, **k)

    def recording_open(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(pathlib.Path, "read_text", read_text)
    monkeypatch.setattr("builtins.open", recording_open)
    args = ["select", "--sweep", "s", "--grid", '{"lambda": [0.5, 1.0]}', "--rule", "mean_normalised",
            "--reference", "base", "--benchmarks", "gsm8k", "mbpp", "--out", str(tmp_path / "sel.json")]
    for m, p in cands:
        args += ["--candidate", m, json.dumps(p)]
    for (m, b), f in scores.items():
        args += ["--score", m, b, str(f)]
    for b, f in splits.items():
        args += ["--split", b, str(f)]
    assert main(args) == 0
    monkeypatch.undo()
    data_reads = [p for p in opened if str(tmp_path) in p and not p.endswith("sel.json") and ".sel.json." not in p]
    assert data_reads and not [p for p in data_reads if "/test/" in p], data_reads
    assert all("/validation/" in p or p.endswith(".split.json") for p in data_reads), data_reads
    out = json.loads((tmp_path / "sel.json").read_text())
    assert out["selected"] == "b" and out["grid"] == {"lambda": [0.5, 1.0]} and out["normalise_by"] == "base"
    assert set(out["opened"]) == {p for p in data_reads if not p.endswith(".samples.jsonl")}


def test_sweep_name_ignores_swept_values_only():
    entry = {"method": "task_arithmetic", "experts": ["a", "b"], "grid": {"lambda": [0.5, 1.0]},
             "select": {"rule": "mean"}}
    assert sweep_name(entry) == sweep_name({**entry, "grid": {"lambda": [0.3, 1.0]}})
    assert sweep_name(entry) != sweep_name({**entry, "grid": {"alpha": [0.5, 1.0]}})
    assert sweep_name(entry) != sweep_name({**entry, "select": {"rule": "mean_normalised"}})


def test_tables_say_which_value_was_selected_from_which_grid(tmp_path):
    from mergeflow.selection import write_selection_tables

    scores, splits, _ = selection_fixture(tmp_path)
    ids = {"a": "task_arithmetic-e1+e2-0000aaaa", "b": "task_arithmetic-e1+e2-0000bbbb"}
    renamed = {(ids.get(m, m), b): f for (m, b), f in scores.items()}
    sel = select([(ids["a"], {"lambda": 0.5}), (ids["b"], {"lambda": 1.0})], renamed, ["base"], ["gsm8k", "mbpp"],
                 "mean_normalised", splits)
    sel.update(sweep="sweep-task_arithmetic-e1+e2-12345678", grid={"lambda": [0.5, 1.0]}, normalise_by="base")
    (tmp_path / "sel.json").write_text(json.dumps(sel))
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "merges_e1_e2.md").write_text("# Merge methods on e1 + e2\n\n| method | gsm8k |\n")
    assert write_selection_tables([tmp_path / "sel.json"], tables) == [tables / "selection.md"]
    text = (tables / "selection.md").read_text()
    assert "Grid: lambda ∈ [0.5, 1.0]. Rule: mean_normalised (normalised by base), over gsm8k, mbpp." in text
    rows = [line for line in text.splitlines() if line.startswith("| lambda")]
    assert rows == [f"| lambda = 0.5 | {ids['a']} | 60.0 | 10.0 | 0.8500 | 0.8500 |  |",
                    f"| lambda = 1.0 | {ids['b']} | 40.0 | 30.0 | 1.1500 | 1.1500 | ✓ |"]
    note = (tables / "merges_e1_e2.md").read_text().splitlines()[-1]
    assert note.startswith(f"Validation-selected: {ids['b']} (lambda = 1.0) from grid lambda ∈ [0.5, 1.0]")
    assert write_selection_tables([], tables) == []


def test_seed_replicates_are_selected_together_by_their_mean_objective(tmp_path):
    """Two seeds per value (merges[].seeds): a value's objective is the mean of its seeds';
    the one seed of lambda 0.5 that beats both of lambda 1.0 (a2: 1.3) does not win alone.
    mean_normalised by base (gsm8k 0.5, mbpp 0.2): a = 0.85, a2 = (1.6 + 1.0) / 2 = 1.3,
    b = 1.15, b2 = (1.0 + 1.5) / 2 = 1.25; values: 0.5 -> 1.075, 1.0 -> 1.2."""
    scores, splits, _ = selection_fixture(tmp_path)
    val = {"gsm8k": ids(ROWS[:4]), "mbpp": ["1", "2"]}
    for model, (g, m) in {"a2": (0.8, 0.2), "b2": (0.5, 0.3)}.items():
        scores[(model, "gsm8k")] = score_file(tmp_path / "validation" / model / "gsm8k.json", "gsm8k", GSM, g, val["gsm8k"])
        scores[(model, "mbpp")] = score_file(tmp_path / "validation" / model / "mbpp.json", "mbpp", MBPP, m, val["mbpp"])
    cands = [("a", {"lambda": 0.5}), ("a2", {"lambda": 0.5}), ("b", {"lambda": 1.0}), ("b2", {"lambda": 1.0})]
    out = select(cands, scores, ["base"], ["gsm8k", "mbpp"], "mean_normalised", splits)
    assert [c["objective"] for c in out["candidates"]] == pytest.approx([0.85, 1.3, 1.15, 1.25])
    assert [(v["merge_ids"], v["params"]) for v in out["values"]] == [(["a", "a2"], {"lambda": 0.5}),
                                                                      (["b", "b2"], {"lambda": 1.0})]
    assert [v["objective"] for v in out["values"]] == pytest.approx([1.075, 1.2])
    assert out["selected_ids"] == ["b", "b2"] and out["selected"] == "b" and out["selected_params"] == {"lambda": 1.0}
    # without the second seeds, lambda 1.0 still wins (1.15 against 0.85); with a2 alone 0.5 would
    alone = select([("a2", {"lambda": 0.5}), ("b", {"lambda": 1.0})], scores, ["base"], ["gsm8k", "mbpp"],
                   "mean_normalised", splits)
    assert alone["selected_ids"] == ["a2"]
