"""The demo pipeline submitted to a real single-node SLURM through the workflow profile
(`--executor slurm --workflow-profile workflow/profiles/slurm`) gives the same scores and the
same merged weights as a local run of the same config, and every non-local job really went
through sbatch with the profile's resources.

The cluster is installed and started by tests/slurm_cluster.py (root + apt-get) only when
MERGEFLOW_TEST_SLURM=1 asks for it (`.ci/run` does); then a machine that cannot host it
fails the test, saying why. Without the variable the test skips: nothing is installed or
started on a developer's machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

import slurm_cluster

ROOT = Path(__file__).resolve().parents[1]
PROFILE = "workflow/profiles/slurm"
LOCAL_RULES = {"fetch_model", "fetch_data", "aggregate", "all"}
VALUE_COLUMNS = ["model", "benchmark", "metric", "value", "stderr", "n"]
SNAKEMAKE_TIMEOUT = 420  # per run; the plugin can hang forever when sacct is broken

@pytest.fixture(scope="module")
def cluster():
    if os.environ.get("MERGEFLOW_TEST_SLURM") != "1":
        pytest.skip("installs and starts a local SLURM as root: set MERGEFLOW_TEST_SLURM=1 to run it (.ci/run does)")
    try:
        up = slurm_cluster.start()
    except slurm_cluster.SlurmUnavailable as why:
        pytest.fail(f"MERGEFLOW_TEST_SLURM=1 but this machine cannot host the test SLURM: {why}")
    yield up
    slurm_cluster.stop(up)  # only the daemons this fixture started


GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A box holds 6 pens. How many pens are in 2 boxes?", "answer": "6 * 2 = <<6*2=12>>12\n#### 12"},
    {"question": "Sara had 10 dollars and spent 4. How much is left?", "answer": "10 - 4 = <<10-4=6>>6\n#### 6"},
    {"question": "There are 9 birds and 3 fly away. How many stay?", "answer": "9 - 3 = <<9-3=6>>6\n#### 6"},
]
MBPP_ROWS = [
    {"task_id": 11, "text": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
     "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"], "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 12, "text": "Write a function to square a number.", "code": "def square(x):\n    return x * x",
     "test_list": ["assert square(3) == 9"], "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 13, "text": "Write a function to reverse a string.", "code": "def rev(s):\n    return s[::-1]",
     "test_list": ["assert rev('ab') == 'ba'"], "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 14, "text": "Write a function returning the maximum of a list.", "code": "def biggest(xs):\n    return max(xs)",
     "test_list": ["assert biggest([1, 5, 2]) == 5"], "test_setup_code": "", "challenge_test_list": []},
]


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory) -> Path:
    """Base = the shared tiny Llama; experts = base + seeded deltas; 4 GSM8K and 4 MBPP rows.

    Not the demo's trained zoo: building it takes minutes on two CPU cores, and both runs
    would pay for it; the workflow, protocol and SLURM path are the demo's."""
    import torch
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("slurm_inputs")
    shutil.copytree(tiny_model_dir, root / "models" / "base")
    for seed, name in enumerate(("lm", "math"), start=1):
        shutil.copytree(tiny_model_dir, root / "models" / name)
        weights = root / "models" / name / "model.safetensors"
        gen = torch.Generator().manual_seed(seed)
        tensors = {k: v + 0.2 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in load_file(weights).items()}
        save_file(tensors, weights, metadata={"format": "pt"})
    (root / "data").mkdir()
    for name, rows in (("gsm8k", GSM8K_ROWS), ("mbpp", MBPP_ROWS)):
        (root / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def reduced_demo_config(path: Path, inputs: Path) -> str:
    """The demo config (its protocol, judge and merge settings) cut to one randomised merge
    (DELLA: seeded drops, so identical scores also mean identical random draws on the
    compute node) of two experts, evaluated on two cheap benchmarks (lm-eval replay and
    sandboxed code execution), four docs each. Returns the merge id."""
    from mergeflow import config as mfconfig

    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["demo"]["enabled"] = False
    cfg["robustness"] = {"enabled": False}  # its demo inputs come from the demo stage
    cfg["judge"]["agreement"] = {}  # so do the judge's labelled requests
    cfg["models"] = {name: {"path": str(inputs / "models" / name)} for name in ("base", "lm", "math")}
    cfg["base_model"] = "base"
    cfg["merges"] = [
        {"method": "della", "experts": ["lm", "math"], "params": {"drop_rate": 0.3, "window_size": 0.14, "lambda": 1.1, "rescale": True}}
    ]
    cfg["benchmarks"] = {name: {"path": str(inputs / "data" / f"{name}.jsonl")} for name in ("gsm8k", "mbpp")}
    cfg["evaluate"] = {"models": "all", "benchmarks": ["gsm8k", "mbpp"], "gsm8k_judge": False}
    (merge_id,) = mfconfig.merge_specs(mfconfig.prepare(cfg))
    cfg["evaluate"]["models"] = [merge_id]
    cfg["protocol"]["defaults"]["limit"] = 4
    for bench in ("gsm8k", "mbpp"):
        cfg["protocol"]["benchmarks"][bench]["max_new_tokens"] = 24
    # fits any CI node; the tiny models need far less
    cfg["resources"] = {"merge_gpus": 0, "generate_gpus": 0, "merge_mem_mb": 2000, "generate_mem_mb": 3000}
    cfg["keep_merges"] = True  # the merged weights are compared byte for byte after the runs
    mfconfig.prepare(cfg)  # still valid
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return merge_id


def workflow_copy(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for item in ("Snakefile", "workflow", "config", "envs", "src"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, dest / item, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dest / item)
    return dest


class Snakemake:
    """One snakemake run in the background, under `timeout -k`, output to a file (two runs
    go at once: the local reference run overlaps the SLURM run's polling waits)."""

    def __init__(self, workdir: Path, *args: str, timeout: int = SNAKEMAKE_TIMEOUT, out_path: Path | None = None):
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # jobs find the venv's python
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
        }
        self.workdir, self.timeout = workdir, timeout
        self.out_path = out_path or workdir / "snakemake.out"
        cmd = ["timeout", "-k", "10", str(timeout), sys.executable, "-m", "snakemake", *args]
        self.start = time.monotonic()
        with open(self.out_path, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait(self) -> tuple[int, str, float]:
        """Exit code (124: timed out), combined output, seconds."""
        try:
            code = self.proc.wait(timeout=self.timeout + 30)
        except subprocess.TimeoutExpired:  # `timeout` itself stuck: should not happen
            self.proc.kill()
            code = self.proc.wait(timeout=30)
        return code, self.out_path.read_text(errors="replace"), time.monotonic() - self.start


def failure_report(workdir: Path, code: int, output: str, what: str) -> str:
    logs = sorted((workdir / "results" / "logs").rglob("*.log")) + sorted((workdir / ".snakemake" / "slurm_logs").rglob("*.log"))
    tails = "\n".join(f"== {p}\n{p.read_text(errors='replace')[-1500:]}" for p in logs[-6:])
    return f"{what} exited {code}{' (timed out)' if code in (124, 137) else ''}:\n{output[-5000:]}\n{tails}"


def submitted_jobs(output: str) -> dict[str, list[str]]:
    """rule (or group_<group id> for a group job) -> SLURM job ids, from snakemake's 'Job N has
    been submitted' lines."""
    jobs: dict[str, list[str]] = {}
    for m in re.finditer(r"has been submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/(rule_|group_)([^/\s]+)/", output):
        jobs.setdefault(m.group(3) if m.group(2) == "rule_" else f"group_{m.group(3)}", []).append(m.group(1))
    return jobs


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        slurm_cluster.run(["scancel", *job_ids], timeout=30)


def sacct(job_ids: list[str]) -> dict[str, dict]:
    fields = ["JobID", "State", "AllocCPUS", "ReqMem", "Timelimit", "ReqTRES"]
    res = slurm_cluster.run(["sacct", "-n", "-P", "-X", "-j", ",".join(job_ids), "-o", ",".join(fields)], timeout=30, check=True)
    rows = [dict(zip(fields, line.split("|"))) for line in res.stdout.splitlines() if line.strip()]
    return {r["JobID"]: r for r in rows}


def merged_weights(workdir: Path, merge_id: str) -> dict[str, str]:
    files = sorted((workdir / "results" / "merges" / merge_id).glob("*.safetensors"))
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def generations(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(({k: r[k] for k in ("doc_id", "prompt", "output", "completion")} for r in records), key=lambda r: r["doc_id"])


def dry_run(workdir: Path, *args: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:  # never write into the checkout
        code, out, _ = Snakemake(workdir, "-n", *args, timeout=120, out_path=Path(tmp) / "dry_run.out").wait()
    assert code == 0, out[-5000:]
    return out


def job_counts(dry_run_output: str) -> dict[str, int]:
    table = re.search(r"job\s+count\n[-\s]+\n(.*?)\ntotal", dry_run_output, re.S)
    assert table, dry_run_output[-3000:]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\S+)\s+(\d+)$", table.group(1), re.M)}


@pytest.mark.slurm
@pytest.mark.slow
def test_demo_on_slurm_matches_local_run(cluster, inputs, tmp_path):
    local = workflow_copy(tmp_path / "local")
    remote = workflow_copy(tmp_path / "slurm")
    merge_id = reduced_demo_config(local / "config" / "slurm_test.yaml", inputs)
    shutil.copy(local / "config" / "slurm_test.yaml", remote / "config" / "slurm_test.yaml")
    configfile = "config/slurm_test.yaml"
    expected_jobs = job_counts(dry_run(remote, "--quiet", "rules", "--configfile", configfile))
    # one generate job per model: both benchmarks on one model load
    assert expected_jobs == {"fetch_data": 2, "merge": 1, "generate": 1, "score": 2, "aggregate": 1, "all": 1}
    # each job's resources as the profile gives them, read before the run (after it, nothing is left to run)
    per_job = job_resources(dry_run(remote, "--workflow-profile", PROFILE, "--configfile", configfile))

    local_run = Snakemake(local, "--cores", "2", "--configfile", configfile)
    slurm_run = Snakemake(
        remote,
        "--executor", "slurm",
        "--workflow-profile", PROFILE,
        "--configfile", configfile,
        # CI speed: poll sacct 3 s after each submission instead of the profile's 20 s
        "--slurm-init-seconds-before-status-checks", "3",
    )
    code, out, slurm_s = slurm_run.wait()
    jobs = submitted_jobs(out)
    if code != 0:
        cancel([j for ids in jobs.values() for j in ids])  # leave no job of ours queued
    local_code, local_out, local_s = local_run.wait()
    assert local_code == 0, failure_report(local, local_code, local_out, "local run")
    assert code == 0, failure_report(remote, code, out, f"SLURM run after {slurm_s:.0f}s")
    print(f"SLURM run {slurm_s:.0f}s (local run, alongside, done by {local_s:.0f}s), jobs {jobs}")

    # every non-local job went through sbatch, the local rules did not; the merge and the
    # generate job reading its checkpoint went as one group job
    group = f"group_model_{merge_id}_generate_merge"  # a group job's name: group id + its rules
    remote_rules = {rule: n for rule, n in expected_jobs.items() if rule not in LOCAL_RULES | {"merge", "generate"}}
    assert {rule: len(ids) for rule, ids in jobs.items()} == {**remote_rules, group: 1}
    accounting = sacct([j for ids in jobs.values() for j in ids])
    assert {r["State"] for r in accounting.values()} == {"COMPLETED"}, accounting

    # the profile's per-rule resources reached sbatch; gpu=0 in the config requested no GPU
    for rule, ids in jobs.items():
        for job in ids:
            acct = accounting[job]
            assert "gpu" not in acct["ReqTRES"], (rule, acct)
    # cpus: the rule's threads, scoring.code.max_workers (2) for MBPP's sandboxes
    score_cpus = {job: int(accounting[job]["AllocCPUS"]) for job in jobs["score"]}
    assert max(score_cpus.values()) == 2, score_cpus
    (score_job, *_) = jobs["score"]
    assert accounting[score_job]["ReqMem"].startswith("8000M") and accounting[score_job]["Timelimit"] == "02:00:00"
    # the group job: merge, then its generate job (both benchmarks). Snakemake adds up the
    # memory of parallel jobs and takes the max of jobs in sequence, and the other way round
    # for runtime; each job's memory from the config's resources block, runtime from the profile.
    (merge_res,), gens = per_job["merge"], per_job["generate"]
    mem_mb = max(int(merge_res["mem_mb"]), sum(int(g["mem_mb"]) for g in gens))
    minutes = int(merge_res["runtime"]) + max(int(g["runtime"]) for g in gens)
    (group_job,) = jobs[group]
    acct = accounting[group_job]
    assert acct["ReqMem"].startswith(f"{mem_mb}M"), (acct, mem_mb)
    assert acct["Timelimit"] == f"{minutes // 60:02d}:{minutes % 60:02d}:00", (acct, minutes)
    assert int(acct["AllocCPUS"]) >= 2, acct  # at least the merge's threads

    # same results as the local run: merged weights byte for byte, the same generations,
    # scores value for value
    assert merged_weights(remote, merge_id) == merged_weights(local, merge_id) != {}
    for bench in ("gsm8k", "mbpp"):
        ours, ref = (generations(run / "results" / "generations" / merge_id / f"{bench}.jsonl") for run in (remote, local))
        assert len(ref) == 4 and all(r["output"].strip() for r in ref), ref  # not a vacuous comparison
        assert ours == ref, bench
    key = ["model", "benchmark", "metric"]
    ours = pd.read_csv(remote / "results" / "scores.csv")[VALUE_COLUMNS].sort_values(key).reset_index(drop=True)
    ref = pd.read_csv(local / "results" / "scores.csv")[VALUE_COLUMNS].sort_values(key).reset_index(drop=True)
    assert set(ref.model) == {merge_id} and set(ref.benchmark) == {"gsm8k", "mbpp"}
    assert (ref.n == 4).all(), ref
    pd.testing.assert_frame_equal(ours, ref, check_exact=True)


# --- the profile itself (no cluster needed) ----------------------------------------------


def profile_dry_run(snakemake_dry_run, configfile: str) -> str:
    """The session's dry run (-n --forceall) of a config through the profile: its whole output."""
    done = snakemake_dry_run(configfile, PROFILE)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    return out


def job_resources(dry_run_output: str) -> dict[str, list[dict[str, str]]]:
    """rule -> the resources of each of its jobs, from a dry run's job blocks."""
    found: dict[str, list[dict[str, str]]] = {}
    # jobs of a group job (merge and the jobs reading its checkpoint) are indented under it
    for block in re.split(r"\n(?=\s*\[|\s*rule |\s*localrule )", dry_run_output):
        head = re.match(r"\s*(?:rule|localrule) (\w+):", block)
        line = re.search(r"^\s+resources: (.*)$", block, re.M)
        if head and line:
            found.setdefault(head.group(1), []).append(dict(kv.split("=", 1) for kv in line.group(1).split(", ")))
    return found


@pytest.mark.slow
def test_snakemake_reads_profile_yaml_and_config_yaml_is_a_link_to_it():
    from snakemake.cli import get_profile_dir

    profile = ROOT / PROFILE
    assert os.readlink(profile / "config.yaml") == "profile.yaml"  # relative: survives clones
    _, chosen = get_profile_dir(str(profile))
    assert chosen.resolve() == (profile / "profile.yaml").resolve()
    assert yaml.safe_load((profile / "profile.yaml").read_text())["executor"] == "slurm"


@pytest.mark.slow
def test_profile_gives_paper_runs_gpus_and_the_demo_none(snakemake_dry_run):
    della = job_resources(profile_dry_run(snakemake_dry_run, "config/della.yaml"))
    # config/della.yaml asks 1 GPU and 64 GB for merge and generate; the profile adds runtimes
    expected = {
        "merge": {"gpu": "1", "mem_mb": "64000", "runtime": "240"},
        "generate": {"gpu": "1", "mem_mb": "64000", "runtime": "720"},
        "score": {"mem_mb": "8000", "runtime": "120"},  # CPUs: the rule's threads
        "judge_gsm8k": {"mem_mb": "4000", "runtime": "240"},
    }
    for rule, want in expected.items():
        assert della.get(rule), f"no {rule} job in the DELLA dry run"
        for res in della[rule]:
            assert {k: res.get(k) for k in want} == want, (rule, res)
    # (a dry run does not tell local rules apart: the SLURM test checks they were not submitted)

    demo = job_resources(profile_dry_run(snakemake_dry_run, "config/config.yaml"))
    for rule in ("merge", "generate"):
        assert {res.get("gpu") for res in demo[rule]} == {"0"}, (rule, demo[rule][0])
    assert {res.get("runtime") for res in demo["demo_base"] + demo["demo_finetune"]} == {"30"}
    for rule in ("demo_base", "demo_finetune", "merge", "generate", "score", "judge_gsm8k"):  # defaults reach every job
        assert all(res.get("runtime") and res.get("mem_mb") for res in demo[rule]), rule
