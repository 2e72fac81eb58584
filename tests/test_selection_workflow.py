"""Validation-selected hyperparameters in the workflow (issue 18): a sweep whose test-set
numbers are never read during selection (asserted from the DAG and from the selection
job's own run), and the rerun scope after editing one swept value."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from disk_sampler import DiskSampler
from dry_run_jobs import dry_run_env, job_counts
from mergeflow import benchmarks
from mergeflow import config as mfconfig
from mergeflow.selection import sweeps

ROOT = Path(__file__).resolve().parents[1]
GSM8K = [{"question": f"Ann has {i} pens and buys {i + 1}. How many?", "answer": f"#### {2 * i + 1}"} for i in range(10)]
MATH = [{"problem": f"What is ${i} \\cdot 3$?", "solution": f"$\\boxed{{{3 * i}}}$"} for i in range(10)]
HEADLINE = {"gsm8k": "exact_match,strict-match", "math": "exact_match,mergelm"}
JOB = re.compile(r"^\s*(?:local)?(?:rule|checkpoint) (\w+):$")


def sweep_config(tmp: Path, grid: list[float]) -> dict:
    """Paths only (no demo): two experts, a task-arithmetic sweep with select, a TIES merge."""
    for name in ("base", "e1", "e2"):
        (tmp / "models" / name).mkdir(parents=True, exist_ok=True)
    for name, rows in (("gsm8k", GSM8K), ("math", MATH)):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["demo"]["enabled"] = False
    cfg["robustness"] = {"enabled": False}
    cfg["judge"].pop("agreement", None)
    cfg["models"] = {n: {"path": str(tmp / "models" / n)} for n in ("base", "e1", "e2")}
    cfg["benchmarks"] = {"gsm8k": {"path": str(tmp / "gsm8k.jsonl")}, "math": {"path": str(tmp / "math.jsonl")}}
    cfg["evaluate"] = {"models": "all", "benchmarks": ["gsm8k", "math"], "gsm8k_judge": False,
                       "reference_likelihood": False}
    cfg["validation"] = {"fraction": 0.3, "seed": 5}
    cfg["merges"] = [
        {"method": "task_arithmetic", "experts": ["e1", "e2"], "grid": {"lambda": grid},
         "select": {"on": "validation", "rule": "mean_normalised", "normalise_by": "base"}},
        {"method": "ties", "experts": ["e1", "e2"], "params": {"density": 0.5, "lambda": 1.0}},
    ]
    return cfg


def snakemake(work: Path, config: dict, *args: str) -> str:
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    res = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(work),
                          "--cores", "1", *args, "--configfile", str(path)], cwd=work, env=dry_run_env(),
                         capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    return out


def planned(work: Path, config: dict) -> list[dict]:
    """The jobs of a dry run: rule, inputs, outputs."""
    jobs, current = [], None
    for line in snakemake(work, config, "-n").splitlines():
        head = JOB.match(line)
        if head:
            current = {"rule": head.group(1), "input": [], "output": []}
            jobs.append(current)
        elif current is not None and re.match(r"^\s+(input|output): ", line):
            key, _, value = line.strip().partition(": ")
            current[key] = [re.sub(r" \(.*\)$", "", f) for f in value.split(", ")]  # (nodelocal), (temp)
    return jobs


def members(config: dict) -> tuple[str, list[str]]:
    cfg = mfconfig.prepare(config)
    (sweep,) = sweeps(cfg, mfconfig.merge_specs(cfg)).values()
    return sweep.name, list(sweep.members)


def test_the_dag_reads_no_test_number_for_selection(tmp_path):
    config = sweep_config(tmp_path, [0.5, 1.0])
    name, ids = members(config)
    jobs = planned(tmp_path, config)
    rules = [j["rule"] for j in jobs]
    # each member merged into a scratch copy inside its validation generate job: no temp()
    # checkpoint for Snakemake to keep while the selection is pending
    assert sorted(o for j in jobs if j["rule"] == "merge_generate_validation" for o in j["output"]
                  if "/merge_meta/" in o) == sorted(f"results/validation/merge_meta/{m}.json" for m in ids)
    assert not [o for j in jobs for o in j["output"] if "/merges/" in o and "validation" in o]
    # no test-split job of any member before the selection: merges, generations, scores
    test_jobs = [j for j in jobs if j["rule"] in ("merge", "score") or j["rule"].startswith("generate")
                 and not j["rule"].startswith("generate_validation")]
    assert not [j for j in test_jobs if any(m in o for m in ids for o in j["output"])]
    assert rules.count("merge") == 1  # TIES only
    # the selection's inputs: validation scores of members and base, split records; nothing else
    (select,) = [j for j in jobs if j["rule"] == "select"]
    assert select["output"] == [f"results/selection/{name}.json"]
    assert select["input"] and all(f.startswith(("results/validation/scores/", "results/splits/"))
                                   for f in select["input"]), select["input"]
    assert {f.split("/")[3] for f in select["input"] if f.startswith("results/validation/")} == {*ids, "base"}
    # every model is evaluated on the test rows; validation generations read the validation rows
    for job in jobs:
        if job["rule"] == "generate":
            assert {f for f in job["input"] if "resources/data" in f} == {
                "resources/data/splits/gsm8k/test.jsonl", "resources/data/splits/math/test.jsonl"}
        if job["rule"] in ("generate_validation", "merge_generate_validation"):
            assert {f for f in job["input"] if "resources/data" in f} == {
                "resources/data/splits/gsm8k/validation.jsonl", "resources/data/splits/math/validation.jsonl"}


def write_validation(work: Path, model: str, values: dict[str, float]) -> None:
    """What a member's (or the base's) validation jobs leave: generations, scores with the
    split's validation doc ids (the selection checks them)."""
    for bench, value in values.items():
        val_ids = json.loads((work / "results" / "splits" / f"{bench}.json").read_text())["validation"]
        gen = work / "results" / "validation" / "generations" / model / f"{bench}.jsonl"
        gen.parent.mkdir(parents=True, exist_ok=True)
        gen.write_text("")
        score = work / "results" / "validation" / "scores" / model / f"{bench}.json"
        score.parent.mkdir(parents=True, exist_ok=True)
        score.write_text(json.dumps({"benchmark": bench, "scorer": "t", "details": {},
                                     "rows": [{"metric": HEADLINE[bench], "value": value, "stderr": 0, "n": 3}]}))
        score.with_name(f"{bench}.samples.jsonl").write_text("".join(json.dumps({"doc_id": d}) + "\n"
                                                                     for d in val_ids))


def write_test(work: Path, jobs: list[dict]) -> None:
    """Every output of the planned test-side jobs, as if they had run."""
    for job in jobs:
        for out in job["output"]:
            path = work / out
            if out.startswith("results/merges/"):
                continue  # temporary: gone after its evaluations
            if out.startswith(("results/tables", "results/plots")):
                path.mkdir(parents=True, exist_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}")


@pytest.mark.slow
def test_selection_run_and_rerun_scope_after_editing_one_swept_value(tmp_path):
    work = tmp_path
    for item in ("workflow", "src", "envs"):  # the jobs' wrapper (workflow/scripts/mergeflow)
        (work / item).symlink_to(ROOT / item)
    config = sweep_config(work, [0.5, 1.0])
    name, (low, high) = members(config)
    # the real split jobs (fetch_data copies the rows; split_data writes the record)
    snakemake(work, config, "results/splits/gsm8k.json", "results/splits/math.json")
    write_validation(work, "base", {"gsm8k": 0.5, "math": 0.25})
    write_validation(work, low, {"gsm8k": 0.5, "math": 0.25})
    write_validation(work, high, {"gsm8k": 0.6, "math": 0.5})  # the better one: (1.2 + 2) / 2 against 1
    # test-split score files of the low member, holding numbers that would select it: never read
    for bench in ("gsm8k", "math"):
        leak = work / "results" / "scores" / low / f"{bench}.json"
        leak.parent.mkdir(parents=True, exist_ok=True)
        leak.write_text(json.dumps({"rows": [{"metric": HEADLINE[bench], "value": 1.0}]}))
        os.chmod(leak, 0)
    out = snakemake(work, config, f"results/selection/{name}.json")  # the real select job, alone
    assert job_counts(out) == {"select": 1}, out[-3000:]
    selection = json.loads((work / "results" / "selection" / f"{name}.json").read_text())
    assert selection["selected"] == high and selection["selected_params"] == {"lambda": 1.0}
    assert all("/validation/" in p or "/splits/" in p for p in selection["opened"]), selection["opened"]
    for bench in ("gsm8k", "math"):
        os.chmod(work / "results" / "scores" / low / f"{bench}.json", 0o644)
        (work / "results" / "scores" / low / f"{bench}.json").unlink()

    # the selection known: the selected member's test jobs, none of the other member's
    jobs = planned(work, config)
    outputs = [o for j in jobs for o in j["output"]]
    assert any(o == f"results/scores/{high}/gsm8k.json" for o in outputs)
    assert not [o for o in outputs if low in o]
    assert {j["rule"] for j in jobs if any(high in o for o in j["output"])} == {"merge", "generate", "score"}
    write_test(work, jobs)
    assert "Nothing to be done" in snakemake(work, config, "-n")

    # one swept value edited (0.5 -> 0.3): its validation jobs, the selection, the aggregate
    edited = sweep_config(work, [0.3, 1.0])
    _, (new, same) = members(edited)
    assert same == high and new not in (low, high)
    jobs = planned(work, edited)
    counts = {}
    for job in jobs:
        counts[job["rule"]] = counts.get(job["rule"], 0) + 1
    assert counts == {"merge_generate_validation": 1, "score_validation": 2, "select": 1,
                      "aggregate": 1, "all": 1}, counts
    assert all(new in o for j in jobs if j["rule"].endswith("_validation") for o in j["output"])

    # the new value wins on validation: the selection changes, and only its test jobs join
    write_validation(work, new, {"gsm8k": 0.9, "math": 0.5})
    out = snakemake(work, edited, f"results/selection/{name}.json")
    assert job_counts(out) == {"select": 1}, out[-3000:]
    assert json.loads((work / "results" / "selection" / f"{name}.json").read_text())["selected"] == new
    counts = {}
    for job in planned(work, edited):
        counts[job["rule"]] = counts.get(job["rule"], 0) + 1
    assert counts == {"merge": 1, "generate": 1, "score": 2, "aggregate": 1, "all": 1}, counts

    # the selected value itself edited away (0.3 -> 0.35) before its test jobs ran: the stale
    # selection names no member, so nothing is asked of it; the new value's validation and the selection
    again = sweep_config(work, [0.35, 1.0])
    counts = {}
    for job in planned(work, again):
        counts[job["rule"]] = counts.get(job["rule"], 0) + 1
    assert counts == {"merge_generate_validation": 1, "score_validation": 2, "select": 1,
                      "aggregate": 1, "all": 1}, counts


@pytest.mark.slow
def test_a_real_sweep_selects_on_validation_and_tabulates(tiny_model_dir, tmp_path):
    """The whole chain on tiny checkpoints: split, validation merges / generations / scores,
    the selection, the selected member on test, the aggregate's tables."""
    from conftest import build_tiny_llama

    work = tmp_path / "work"
    work.mkdir()
    for item in ("workflow", "src", "envs"):
        (work / item).symlink_to(ROOT / item)
    build_tiny_llama(tmp_path / "expert", seed=1)
    (tmp_path / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K))
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["demo"]["enabled"] = False
    cfg["robustness"] = {"enabled": False}
    cfg["judge"].pop("agreement", None)
    cfg["models"] = {"base": {"path": str(tiny_model_dir)}, "e": {"path": str(tmp_path / "expert")}}
    cfg["benchmarks"] = {"gsm8k": {"path": str(tmp_path / "gsm8k.jsonl")}}
    cfg["evaluate"] = {"models": "all", "benchmarks": ["gsm8k"], "gsm8k_judge": False}
    cfg["validation"] = {"fraction": 0.4, "seed": 1}
    cfg["merges"] = [{"method": "task_arithmetic", "experts": ["e"], "grid": {"lambda": [0.5, 1.0]},
                      "select": {"rule": "mean"}}]
    cfg["protocol"]["defaults"]["limit"] = 3
    cfg["protocol"]["benchmarks"] = {"gsm8k": {**cfg["protocol"]["benchmarks"]["gsm8k"], "max_new_tokens": 4}}
    name, (low, high) = members(cfg)
    with DiskSampler(work / "results" / "merges", work / "results" / "validation" / "merges", interval=0.05) as disk:
        snakemake(work, cfg)
    # one job at a time (--cores 1): one merged checkpoint on disk at a time, none left
    assert 0 < disk.largest_entry_bytes and disk.peak_bytes <= disk.largest_entry_bytes, disk.__dict__
    for merges in (work / "results" / "merges", work / "results" / "validation" / "merges"):
        assert not (merges.exists() and any(merges.iterdir())), merges
    assert all((work / "results" / "validation" / "merge_meta" / f"{m}.json").is_file() for m in (low, high))
    split = json.loads((work / "results" / "splits" / "gsm8k.json").read_text())
    assert len(split["validation"]) == 4 and len(split["test"]) == 6 and split["source"]["seed"] == 1
    selection = json.loads((work / "results" / "selection" / f"{name}.json").read_text())
    assert selection["selected"] in (low, high)
    unselected = high if selection["selected"] == low else low
    for member in (low, high):  # both scored on validation docs only
        docs = [json.loads(line)["doc_id"] for line in (work / "results" / "validation" / "scores" / member
                                                        / "gsm8k.samples.jsonl").read_text().splitlines()]
        assert docs and set(docs) <= set(split["validation"])
    test_docs = [json.loads(line)["doc_id"] for line in (work / "results" / "scores" / selection["selected"]
                                                         / "gsm8k.samples.jsonl").read_text().splitlines()]
    assert test_docs and set(test_docs) <= set(split["test"])
    assert not (work / "results" / "scores" / unselected).exists()
    assert not (work / "results" / "generations" / unselected).exists()
    import pandas as pd

    models = set(pd.read_csv(work / "results" / "scores.csv")["model"])
    assert selection["selected"] in models and unselected not in models
    assert "✓" in (work / "results" / "tables" / "selection.md").read_text()
    assert "Validation-selected: " + selection["selected"] in (work / "results" / "tables" / "merges_e.md").read_text()
    assert "Nothing to be done" in snakemake(work, cfg, "-n")


@pytest.mark.slow
def test_a_sweep_with_seeds_selects_a_value_by_its_seeds_mean_and_tests_every_seed(tmp_path):
    """merges[].seeds with select: every grid value merged once per seed on validation; the
    value with the better mean over its seeds wins (not the best single seed), and each of
    its seeds, none of the other value's, is evaluated on test."""
    work = tmp_path
    for item in ("workflow", "src", "envs"):
        (work / item).symlink_to(ROOT / item)
    config = sweep_config(work, [0.5, 1.0])
    config["merges"][0] = {"method": "dare", "experts": ["e1", "e2"], "seeds": [1, 2],
                           "params": {"combine": "task_arithmetic", "lambda": 1.0}, "grid": {"drop_rate": [0.3, 0.6]},
                           "select": {"on": "validation", "rule": "mean_normalised", "normalise_by": "base"}}
    name, ids = members(config)
    assert len(ids) == 4  # 2 values x 2 seeds
    low, high = ids[:2], ids[2:]  # drop_rate 0.3 (seeds 1, 2), 0.6 (seeds 1, 2)
    snakemake(work, config, "results/splits/gsm8k.json", "results/splits/math.json")
    write_validation(work, "base", {"gsm8k": 0.5, "math": 0.25})
    # 0.3: one seed best of all (2.0) and one poor (0.5): mean 1.25; 0.6: 1.4 and 1.4
    write_validation(work, low[0], {"gsm8k": 1.0, "math": 0.5})
    write_validation(work, low[1], {"gsm8k": 0.25, "math": 0.125})
    for m in high:
        write_validation(work, m, {"gsm8k": 0.7, "math": 0.35})
    out = snakemake(work, config, f"results/selection/{name}.json")
    assert job_counts(out) == {"select": 1}, out[-3000:]
    selection = json.loads((work / "results" / "selection" / f"{name}.json").read_text())
    assert selection["selected_ids"] == high and selection["selected_params"]["drop_rate"] == 0.6
    assert [v["objective"] for v in selection["values"]] == pytest.approx([1.25, 1.4])
    jobs = planned(work, config)
    outputs = [o for j in jobs for o in j["output"]]
    for m in high:
        assert f"results/scores/{m}/gsm8k.json" in outputs
    assert not [o for o in outputs if any(m in o for m in low)]
    assert sum(j["rule"] == "merge" for j in jobs) == 3  # the two seeds of 0.6, and TIES


def test_plan_counts_a_sweeps_validation_jobs_as_the_dry_run_does(tiny_model_dir, tmp_path):
    """`mergeflow plan` of a config with a seeded sweep: the validation merges and generate jobs
    are the dry run's; on test, the dry run's jobs plus the chosen value's seeds (known only
    after the selection), and the split benchmarks' test / validation doc counts."""
    from mergeflow.plan import build_plan

    config = sweep_config(tmp_path, [0.5, 1.0])
    config["models"] = {n: {"path": str(tiny_model_dir)} for n in ("base", "e1", "e2")}
    config["merges"][0].update(method="dare", seeds=[1, 2], params={"combine": "task_arithmetic", "lambda": 1.0})
    config["merges"][0]["grid"] = {"drop_rate": [0.3, 0.6]}
    jobs = planned(tmp_path, config)
    counts = {}
    for job in jobs:
        counts[job["rule"]] = counts.get(job["rule"], 0) + 1
    plan = build_plan(mfconfig.prepare(config), root=tmp_path, concurrent=1)
    v = plan["validation"]
    assert v["sweeps"] == 1 and v["members"] == v["merge_jobs"] == counts["merge_generate_validation"] == 4
    assert v["generate_jobs"] == sum(n for r, n in counts.items() if "generate_validation" in r) == 5
    assert plan["generate_jobs"] == counts["generate"] + 2  # base, e1, e2, TIES + the chosen value's 2 seeds
    assert plan["merges"] == 4 + 1 + 2  # validation members, TIES, the chosen value again for test
    # 10 rows each, fraction 0.3: 3 validation, 7 test
    assert v["split_benchmarks"] == {"gsm8k": {"test": 7, "validation": 3}, "math": {"test": 7, "validation": 3}}
    assert v["prompts"] == 5 * 6 and plan["prompts"] == 6 * 14
