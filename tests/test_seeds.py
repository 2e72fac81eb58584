"""Seed replicates (merges[].seeds / n_seeds, issue 18): a random method is merged once per
seed, a deterministic one once; ids of configs without seeds do not move; the tables pool
the replicates as mean ± std (n=k) while scores.csv keeps every seed's row."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dry_run_jobs import job_counts, parse
from mergeflow import config as mfconfig
from mergeflow.aggregate.tables import method_table, replicate_cell, scores_table, write_tables
from mergeflow.aggregate.tidy import tidy_table
from mergeflow.errors import MergeflowError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "config" / "config.yaml"

# The demo's merge ids before seeds existed: a config without seeds must keep them byte for byte
# (their merges, generations and scores in results/ stay valid).
DEMO_IDS = [
    "task_arithmetic-lm+math+code-10de8e1c",
    "ties-lm+math+code-437c6936",
    "dare-lm+math+code-867cc5d8",
    "della-lm+math+code-4a486654",
    "m3-lm+math-09fd545d",
    "task_arithmetic-lm+math-e6c01ec6",
]
# sha256 of the paper configs' merge ids joined by newlines, computed before seeds existed
PAPER_IDS = {
    "della.yaml": (580, "7c1182945d264ca726051127f3d8c3b2f10d20ff22385536f50c636354141c98"),
    "m3.yaml": (38, "1365bdaf2d440ca7e6f4be683ea9f24885e289ceb701cdbf34bcf3195d95d3c1"),
}


def plain(cfg: dict) -> dict:
    """`cfg` without seed replicates and selection: each selecting entry at its first grid
    value (the demo's: task arithmetic at lambda 1.0, the entry it was before selection)."""
    cfg = copy.deepcopy(cfg)
    for merge in cfg["merges"]:
        merge.pop("seeds", None), merge.pop("n_seeds", None)
        if merge.pop("select", None) is not None:
            grid = merge.pop("grid")
            merge["params"] = {**merge.get("params", {}), **{k: v[0] for k, v in grid.items()}}
            merge.pop("benchmarks", None)
    return cfg


@pytest.fixture()
def demo() -> dict:
    """The demo config without its seed replicates and its selection (the tests below add their own)."""
    return plain(yaml.safe_load(DEMO.read_text()))


def specs_of(cfg: dict) -> dict:
    return mfconfig.merge_specs(mfconfig.prepare(cfg))


def test_demo_merge_ids_are_unchanged(demo):
    assert list(specs_of(demo)) == DEMO_IDS


def test_demo_replicates_and_sweep_keep_the_old_ids():
    """The shipped demo: DARE, DELLA and M3 with seeds 42, 43, 44 (seed 42 keeps each one's id,
    so its results are reused), task arithmetic's lambda swept over [1.0, 0.7, 0.5] (1.0 keeps
    the id of the fixed entry it replaced)."""
    shipped = yaml.safe_load(DEMO.read_text())
    specs = specs_of(shipped)
    assert set(DEMO_IDS) <= set(specs)
    for method in ("dare", "della", "m3"):
        reps = [s for s in specs.values() if s.method == method]
        assert [s.seed for s in reps] == [42, 43, 44] and all(s.random for s in reps), method
        assert len({s.config_id for s in reps}) == 1
    sweep = [s for s in specs.values() if s.method == "task_arithmetic" and s.experts == ("lm", "math", "code")]
    assert [s.params["lambda"] for s in sweep] == [1.0, 0.7, 0.5]
    assert sweep[0].merge_id == DEMO_IDS[0] and not any(s.random for s in sweep)
    assert len(specs) == len(DEMO_IDS) + 3 * 2 + 2


@pytest.mark.parametrize("name", sorted(PAPER_IDS))
def test_paper_merge_ids_are_unchanged(name):
    ids = list(mfconfig.merge_specs(mfconfig.load(ROOT / "config" / name)))
    assert (len(ids), hashlib.sha256("\n".join(ids).encode()).hexdigest()) == PAPER_IDS[name]


def test_random_method_runs_once_per_seed(demo):
    demo["merges"][2]["seeds"] = [3, 42, 7]  # dare
    specs = specs_of(demo)
    dare = [s for s in specs.values() if s.method == "dare"]
    assert [s.seed for s in dare] == [3, 42, 7]
    ids = [s.merge_id for s in dare]
    assert len(set(ids)) == 3 and all(i.startswith("dare-lm+math+code-") for i in ids)
    assert "dare-lm+math+code-867cc5d8" in ids  # seed 42, the global seed: the id it had without seeds
    assert len({s.config_id for s in dare}) == 1 and dare[0].config_id not in specs
    assert all(s.random for s in dare)
    # every other merge as before
    assert [i for i in specs if not i.startswith("dare-")] == [i for i in DEMO_IDS if not i.startswith("dare-")]


def test_n_seeds_counts_up_from_the_entry_seed(demo):
    demo["merges"][3]["n_seeds"] = 3  # della, global seed 42
    demo["merges"][4].update(seed=5, n_seeds=2)  # m3 (its ratio draw is random)
    specs = specs_of(demo)
    assert [s.seed for s in specs.values() if s.method == "della"] == [42, 43, 44]
    assert [s.seed for s in specs.values() if s.method == "m3"] == [5, 6]
    assert len(specs) == len(DEMO_IDS) + 2 + 1


def test_deterministic_method_runs_once_with_its_id(demo):
    demo["merges"][1]["seeds"] = [1, 2, 3]  # ties
    demo["merges"][0]["n_seeds"] = 4  # task arithmetic
    # M3 with given ratios draws nothing; with DARE before mixing it does again
    demo["merges"][4]["params"]["lambda_m"] = 0.3
    demo["merges"][4]["n_seeds"] = 2
    cfg = mfconfig.prepare(copy.deepcopy(demo))
    specs = mfconfig.merge_specs(cfg)
    plain = copy.deepcopy(demo)
    for merge in plain["merges"]:
        merge.pop("seeds", None), merge.pop("n_seeds", None)
    assert list(specs) == list(specs_of(plain))  # one each, the ids they have without seeds
    assert not any(specs[i].random for i in list(specs)[:2]) and not specs[list(specs)[4]].random
    notes = mfconfig.seed_notes(cfg)
    assert [re.match(r"note: merges\[(\d)\]", n).group(1) for n in notes] == ["0", "1", "4"]
    assert "seeds [1, 2, 3] ignored" in notes[1]
    demo["merges"][4]["params"]["dare"] = {"drop_rate": 0.2}
    assert sum(s.method == "m3" for s in specs_of(demo).values()) == 2


def test_grid_and_seeds_compose(demo):
    demo["merges"] = [{"method": "della", "experts": ["math"], "params": {"lambda": 1.0},
                       "grid": {"drop_rate": [0.1, 0.5]}, "seeds": [0, 1, 2], "benchmarks": ["gsm8k"]},
                      {"method": "ties", "experts": ["math"], "grid": {"density": [0.2, 0.4]}, "seeds": [0, 1, 2]}]
    specs = specs_of(demo)
    della = [(s.params["drop_rate"], s.seed) for s in specs.values() if s.method == "della"]
    assert della == [(d, k) for d in (0.1, 0.5) for k in (0, 1, 2)]
    assert [(s.params["density"], s.seed) for s in specs.values() if s.method == "ties"] == [(0.2, 42), (0.4, 42)]
    assert len({s.config_id for s in specs.values() if s.method == "della"}) == 2  # one per grid point


def test_one_seed_keeps_the_id(demo):
    demo["merges"][2]["seeds"] = [42]
    demo["merges"][3]["n_seeds"] = 1
    assert list(specs_of(demo)) == DEMO_IDS


@pytest.mark.parametrize(
    "entry, key, message",
    [
        ({"seeds": [1, 2], "n_seeds": 2}, "merges[2].seeds", "not both"),
        ({"seeds": [1, 2], "seed": 3}, "merges[2].seeds", "not both"),
        ({"seeds": []}, "merges[2].seeds", "should be non-empty"),
        ({"seeds": [1, 1]}, "merges[2].seeds", "non-unique"),
        ({"seeds": [1, -1]}, "merges[2].seeds[1]", "minimum"),
        ({"seeds": 3}, "merges[2].seeds", "not of type 'array'"),
        ({"n_seeds": 0}, "merges[2].n_seeds", "minimum"),
        ({"n_seeds": 2.5}, "merges[2].n_seeds", "not of type 'integer'"),
    ],
)
def test_bad_seeds_name_the_key(demo, entry, key, message):
    demo["merges"][2].update(entry)
    with pytest.raises(MergeflowError) as err:
        mfconfig.prepare(demo)
    text = str(err.value)
    assert f"config key '{key}'" in text and message in text
    assert len([line for line in text.splitlines() if "config key" in line]) == 1


def test_seed_replicates_clashing_with_another_entry_are_an_error(demo):
    demo["merges"].append({**copy.deepcopy(demo["merges"][2]), "seeds": [7, 42]})  # seed 42: merges[2]
    with pytest.raises(MergeflowError, match=r"config key 'merges\[6\]': same configuration"):
        specs_of(demo)


@pytest.mark.slow
def test_dry_run_lists_one_merge_job_per_seed(demo, tmp_path, snakemake_dry_run):
    demo["merges"].append({"method": "dare", "experts": ["lm", "math"],
                           "params": {"drop_rate": 0.3, "lambda": 1.0}, "seeds": [1, 2, 3]})
    demo["merges"].append({"method": "ties", "experts": ["lm", "math"],
                           "params": {"density": 0.5, "lambda": 1.0}, "seeds": [1, 2, 3]})
    path = tmp_path / "seeds.yaml"
    path.write_text(yaml.safe_dump(demo))
    done = snakemake_dry_run(str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    merged = [j for j in parse(done.stdout) if j.startswith("merge ")]
    ids = list(specs_of(demo))
    assert job_counts(done.stdout)["merge"] == len(ids) == len(DEMO_IDS) + 3 + 1
    for seed in (1, 2, 3):
        dare = next(i for i, s in specs_of(demo).items() if s.method == "dare" and s.seed == seed)
        assert sum(dare in j for j in merged) == 1
    assert "note: merges[7] (ties) draws no random numbers" in done.stderr


# --- the aggregate -------------------------------------------------------------------------


def write_score(root: Path, model: str, benchmark: str, value: float, n: int = 20) -> Path:
    path = root / model / f"{benchmark}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": benchmark, "scorer": "x", "details": {},
                                "rows": [{"metric": "exact_match,strict-match", "value": value, "n": n}]}))
    return path


@pytest.fixture()
def replicated(demo, tmp_path):
    demo["merges"][2]["seeds"] = [1, 2, 3]  # dare: three replicates
    demo["merges"][1]["seeds"] = [1, 2, 3]  # ties: deterministic, one merge
    cfg = mfconfig.prepare(demo)
    specs = mfconfig.merge_specs(cfg)
    dare = [i for i, s in specs.items() if s.method == "dare"]
    ties = next(i for i, s in specs.items() if s.method == "ties")
    files = [write_score(tmp_path, "base", "gsm8k", 0.1), write_score(tmp_path, ties, "gsm8k", 0.45)]
    files += [write_score(tmp_path, m, "gsm8k", v) for m, v in zip(dare, (0.2, 0.3, 0.7))]
    return cfg, specs, dare, ties, tidy_table(files, [], mfconfig.aggregate_settings(cfg))


def test_scores_csv_keeps_every_seed(replicated):
    cfg, specs, dare, ties, frame = replicated
    rows = frame[frame.method == "dare"]
    assert sorted(rows.model) == sorted(dare) and sorted(rows.seed) == [1, 2, 3]
    assert set(rows.config_id) == {specs[dare[0]].config_id} and set(rows.random) == {True}
    assert frame[frame.model == ties].random.tolist() == [False]
    assert frame[frame.model == "base"].config_id.isna().all()
    assert rows.ci_method.notna().all() or rows.ci_note.notna().all()  # the per-row interval columns stay


def test_tables_pool_replicates_as_mean_and_sample_std(replicated, tmp_path):
    cfg, specs, dare, ties, frame = replicated
    config_id = specs[dare[0]].config_id
    # 20, 30, 70: mean 40.0, sample std sqrt((400 + 100 + 900) / 2) = 26.46 (population std: 21.6)
    assert replicate_cell([20.0, 30.0, 70.0]) == "40.0 ± 26.5 (n=3)"
    cells = {idx[1]: row for idx, row in scores_table(frame, cells=True).iterrows()}
    assert cells[config_id]["gsm8k"] == "40.0 ± 26.5 (n=3)"
    assert not set(dare) & set(cells)  # pooled: no per-seed rows in the table
    assert cells[ties]["gsm8k"] == "45.0" and cells["base"]["gsm8k"] == "10.0"  # single ones unchanged
    numbers = {idx[1]: row for idx, row in scores_table(frame).iterrows()}
    assert numbers[config_id]["gsm8k"] == pytest.approx(40.0)
    by_method = {idx[1]: row for idx, row in method_table(frame, "lm+math+code", cells=True).iterrows()}
    assert by_method[config_id]["gsm8k"] == "40.0 ± 26.5 (n=3)"
    write_tables(frame, tmp_path / "tables")
    text = (tmp_path / "tables" / "merges_lm_math_code.md").read_text()
    assert "40.0 ± 26.5 (n=3)" in text and "sample standard deviation" in text


def test_tables_without_replicates_are_unchanged(demo, tmp_path):
    cfg = mfconfig.prepare(demo)
    ties = DEMO_IDS[1]
    files = [write_score(tmp_path, "base", "gsm8k", 0.1), write_score(tmp_path, ties, "gsm8k", 0.45)]
    frame = tidy_table(files, [], mfconfig.aggregate_settings(cfg))
    write_tables(frame, tmp_path / "t")
    text = (tmp_path / "t" / "scores.md").read_text()
    assert "±" not in text and "standard deviation" not in text
    cells = {idx[1]: row for idx, row in scores_table(frame, cells=True).iterrows()}
    assert cells[ties]["gsm8k"] == "45.0"


def test_robustness_and_retention_tables_pool_replicates(tmp_path):
    """The demo's M3 runs three seeds: its robustness and retention rows are pooled like the
    scores (one row per configuration, mean ± std (n=3)); a single merge keeps its number."""
    from mergeflow.aggregate.retention import METRIC
    from mergeflow.aggregate.tables import robustness_table, write_robustness

    rows = []
    for model, cid, m3, lb, kept in (("m3-a", "m3-c", True, 0.2, 0.5), ("m3-b", "m3-c", True, 0.3, 0.6),
                                     ("m3-d", "m3-c", True, 0.7, 1.0), ("ta-x", "ta-c", False, 0.25, 0.9)):
        base = {"model": model, "config_id": cid, "role": "merge", "method": "m3" if m3 else "task_arithmetic",
                "family": "task_arithmetic", "dare": False, "m3": m3, "experts": "lm+math", "n": 4}
        rows.append({**base, "benchmark": "livebench_typos", "metric": "score", "value": lb})
        rows.append({**base, "benchmark": "gsm8k", "metric": METRIC, "value": kept})
    frame = pd.DataFrame(rows)
    numbers = {idx[1]: r for idx, r in robustness_table(frame).iterrows()}
    assert set(numbers) == {"m3-c", "ta-x"} and numbers["m3-c"]["livebench_typos"] == pytest.approx(40.0)
    cells = {idx[1]: r for idx, r in robustness_table(frame, cells=True).iterrows()}
    assert cells["m3-c"]["livebench_typos"] == "40.0 ± 26.5 (n=3)" and cells["ta-x"]["livebench_typos"] == "25.0"
    write_robustness(frame, tmp_path)
    text = (tmp_path / "robustness.md").read_text()
    assert "40.0 ± 26.5 (n=3)" in text and "sample standard deviation" in text and "+M3" in text
    write_tables(frame, tmp_path / "t")
    kept = (tmp_path / "t" / "retention.md").read_text()
    assert "70.0 ± 26.5 (n=3)" in kept and "| 90.0 " in kept and "m3-a" not in kept
