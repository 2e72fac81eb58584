"""Bounded disk for a grid: merged checkpoints are temporary outputs grouped with the jobs
that read them (unless keep_merges), the aggregate reads small metadata copies, cached
generations survive a re-merge, and a run leaves no checkpoint behind."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from disk_sampler import DiskSampler, tree_bytes
from mergeflow import config as mfconfig
from mergeflow.selection import sweeps

ROOT = Path(__file__).resolve().parents[1]


def snakemake(workdir: Path, *args: str, timeout: int = 300) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=workdir, env=env, capture_output=True,
                         text=True, timeout=timeout)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    return out


def dry_run(*args: str, workdir: Path = ROOT) -> str:
    return snakemake(workdir, "-n", "--cores", "2", *args)


def job_counts(dry_run_output: str) -> dict[str, int]:
    table = re.search(r"job\s+count\n[-\s]+\n(.*?)\ntotal", dry_run_output, re.S)
    if not table:
        return {}
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\S+)\s+(\d+)$", table.group(1), re.M)}


def group_rules(dry_run_output: str) -> dict[str, list[str]]:
    """Group id -> the rules of its jobs, from the dry run's 'Group job' blocks."""
    groups: dict[str, list[str]] = {}
    for block in re.split(r"^\[", dry_run_output, flags=re.M):  # top-level jobs and group headers
        head = re.match(r"[^\]]*\] Group job (\S+) ", block)
        if head:
            groups.setdefault(head.group(1), []).extend(re.findall(r"^\s+rule (\w+):", block, re.M))
    return groups


def write_config(tmp_path: Path, **changes) -> Path:
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg.update(changes)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def demo_specs():
    cfg = mfconfig.load(ROOT / "config" / "config.yaml")
    return cfg, mfconfig.merge_specs(cfg)


@pytest.mark.slow
def test_merged_checkpoints_are_temporary_and_grouped_with_their_consumers(demo_specs):
    cfg, specs = demo_specs
    out = dry_run()
    # the sweep's grid members are merged for validation into a scratch copy inside their
    # validation generate job (merge_generate_validation), which removes it: no temp() output
    # for a pending checkpoint to keep; the selected one is merged again for test once the
    # selection exists (a checkpoint: not in this dry run)
    members = {m for sw in sweeps(cfg, specs).values() for m in sw.members}
    assert len(members) == 3
    removed = set(re.findall(r"^Would remove temporary output results/merges/(\S+)$", out, re.M))
    assert removed == set(specs) - members, removed
    assert not re.search(r"^\s+output: .*results/validation/merges/", out, re.M)
    jobs = re.findall(r"^\s*(?:local)?rule (merge_generate_validation\S*):\n(?:.*\n)*?\s+output: (.*)$", out, re.M)
    assert {re.search(r"merge_meta/(\S+)\.json", outputs).group(1) for _, outputs in jobs} == members, jobs
    groups = group_rules(out)
    robust_pairs = {frozenset(e.get("experts") or ()) for e in cfg["robustness"]["livebench"]["categories"].values()}
    for merge_id, spec in specs.items():
        if merge_id in members:
            continue
        rules = sorted(groups.get(f"model_{merge_id}", []))
        expected = ["merge", "likelihood", "generate"]  # one generate job for all the merge's benchmarks
        if frozenset(spec.experts) in robust_pairs:  # the demo's robustness evaluations read the checkpoint too
            expected += ["robustness_livebench"] * len(cfg["robustness"]["livebench"]["categories"])
            expected += ["robustness_attack"] * len(cfg["robustness"]["adversarial"]["tasks"])
        assert rules == sorted(expected), (merge_id, rules)
    # the aggregate reads the small metadata copies, so it pins no checkpoint on disk
    aggregate = re.search(r"^\s*(?:local)?rule aggregate:\n\s+input: (.*)$", out, re.M).group(1)
    assert "results/merges/" not in aggregate
    assert {f"results/merge_meta/{m}.json" for m in set(specs) - members} <= set(aggregate.split(", "))


@pytest.mark.slow
def test_keep_merges_keeps_the_checkpoints(tmp_path, demo_specs):
    cfg, specs = demo_specs
    out = dry_run("--configfile", str(write_config(tmp_path, keep_merges=True)))
    assert "Would remove temporary output results/merges/" not in out
    assert "Would remove temporary output results/validation/merges/" not in out
    members = {m for sw in sweeps(cfg, specs).values() for m in sw.members}
    counts = job_counts(out)
    assert counts["merge"] == len(specs) - len(members)
    assert sum(n for rule, n in counts.items() if rule.startswith("merge_generate_validation")) == len(members)
    merge_outputs = re.findall(r"^\s+output: (results/merges/\S+.*)$", out, re.M)
    assert len(merge_outputs) == len(specs) - len(members) and not any("(nodelocal)" in line for line in merge_outputs)


@pytest.mark.slow
def test_keep_merges_must_be_a_boolean(tmp_path):
    res = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile",
                          str(write_config(tmp_path, keep_merges="yes"))], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "config key 'keep_merges': 'yes' is not of type 'boolean'" in out, out[-2000:]


# --- generation cache across a re-merge --------------------------------------------------------


def _merge(base: Path, expert: Path, out: Path, params: dict) -> None:
    subprocess.run([sys.executable, "-m", "mergeflow", "merge", "--method", "task_arithmetic", "--base", str(base),
                    "--expert", f"e={expert}", "--params", json.dumps(params), "--device", "cpu", "--out", str(out),
                    "--metadata-out", str(out.parent / f"{out.name}.json")],
                   check=True, capture_output=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


@pytest.mark.slow
def test_a_merge_merged_again_keeps_its_fingerprint_other_dirs_keep_theirs(tiny_model_dir, tmp_path):
    from conftest import build_tiny_llama
    from mergeflow.generation.cache import model_fingerprint

    expert = build_tiny_llama(tmp_path / "expert", seed=1)
    out = tmp_path / "merges" / "ta"
    _merge(tiny_model_dir, expert, out, {"lambda": 0.5})
    first = model_fingerprint(out)
    meta = json.loads((tmp_path / "merges" / "ta.json").read_text())
    assert meta == json.loads((out / "mergeflow_merge.json").read_text()) and meta["method"] == "task_arithmetic"
    shutil.rmtree(out)  # what temp() does once the evaluations are done
    time.sleep(0.01)
    _merge(tiny_model_dir, expert, out, {"lambda": 0.5})  # new files, new mtimes, same bytes
    assert model_fingerprint(out) == first
    _merge(tiny_model_dir, expert, tmp_path / "merges" / "other", {"lambda": 0.7})
    assert model_fingerprint(tmp_path / "merges" / "other") != first
    # a local source rewritten in place is a different merge source
    os.utime(expert / "model.safetensors", ns=(1, 1))
    assert model_fingerprint(out) != first
    # any other model directory: still its files' names, sizes and mtimes
    plain = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, plain)
    before = model_fingerprint(plain)
    os.utime(plain / "model.safetensors", ns=(2, 2))
    assert model_fingerprint(plain) != before


# --- a real run of a two-merge grid ----------------------------------------------------------

GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A box holds 6 pens. How many pens are in 2 boxes?", "answer": "6 * 2 = 12\n#### 12"},
]


@pytest.mark.slow
def test_a_run_removes_checkpoints_and_reruns_only_an_edited_merge(tiny_model_dir, tmp_path):
    from conftest import build_tiny_llama

    work = tmp_path / "work"
    work.mkdir()
    for item in ("Snakefile", "workflow", "config", "envs", "src"):
        src = ROOT / item
        (shutil.copytree(src, work / item, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copy(src, work / item))
    build_tiny_llama(tmp_path / "expert", seed=1)
    (tmp_path / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS))
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["demo"]["enabled"] = False
    cfg["robustness"] = {"enabled": False}
    cfg["judge"].pop("agreement", None)  # re-judges the demo's labels: nothing to judge here
    cfg["models"] = {"base": {"path": str(tiny_model_dir)}, "e": {"path": str(tmp_path / "expert")}}
    cfg["merges"] = [{"method": "task_arithmetic", "experts": ["e"], "params": {"lambda": 0.5}},
                     {"method": "task_arithmetic", "experts": ["e"], "params": {"lambda": 1.0}}]
    cfg["benchmarks"] = {"gsm8k": {"path": str(tmp_path / "gsm8k.jsonl")}}
    cfg["evaluate"] = {"models": "all", "benchmarks": ["gsm8k"], "gsm8k_judge": False}
    cfg["protocol"]["defaults"]["limit"] = 2
    cfg["protocol"]["benchmarks"] = {"gsm8k": {**cfg["protocol"]["benchmarks"]["gsm8k"], "max_new_tokens": 4}}
    config = work / "config" / "grid.yaml"
    config.write_text(yaml.safe_dump(cfg))
    merge_ids = list(mfconfig.merge_specs(mfconfig.prepare(cfg)))

    with DiskSampler(work / "results" / "merges", interval=0.05) as sampler:
        snakemake(work, "--cores", "1", "--configfile", str(config), timeout=900)
    assert sampler.largest_entry_bytes > 0, "the sampler never saw a checkpoint"
    assert sampler.peak_bytes <= 1 * sampler.largest_entry_bytes  # --cores 1: one checkpoint at a time
    merges = work / "results" / "merges"  # Snakemake removes the emptied directory too
    assert not (merges.exists() and any(merges.iterdir())), "a checkpoint outlived its evaluations"
    assert {p.stem for p in (work / "results" / "merge_meta").glob("*.json")} == set(merge_ids)

    # nothing reruns, although every checkpoint is gone
    assert job_counts(dry_run("--configfile", str(config), workdir=work)) == {}
    # one edited hyperparameter: exactly its merge and evaluations
    edited = copy.deepcopy(cfg)
    edited["merges"][1]["params"]["lambda"] = 0.8
    config.write_text(yaml.safe_dump(edited))
    jobs = job_counts(dry_run("--configfile", str(config), workdir=work))
    assert jobs == {"merge": 1, "generate": 1, "score": 1, "aggregate": 1, "all": 1}, jobs


def test_disk_sampler_sees_the_peak_and_the_largest_entry(tmp_path):
    root = tmp_path / "merges"
    with DiskSampler(root, interval=0.01) as sampler:
        time.sleep(0.05)  # the directory does not exist yet
        (root / "a").mkdir(parents=True)
        (root / "a" / "w.bin").write_bytes(b"x" * 3000)
        time.sleep(0.1)
        (root / "b").mkdir()
        (root / "b" / "w.bin").write_bytes(b"x" * 1000)
        time.sleep(0.1)
        shutil.rmtree(root / "a")
        shutil.rmtree(root / "b")
        time.sleep(0.05)
    assert sampler.samples > 10
    assert sampler.peak_bytes == 4000 and sampler.largest_entry_bytes == 3000
    assert tree_bytes(root) == tree_bytes(root / "missing") == 0
