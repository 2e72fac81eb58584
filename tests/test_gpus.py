"""GPU jobs: per-job GPU claims on local runs, and the start-up check that a job can use the
GPUs it was granted (`--gpus N` of merge, generate, likelihood; passed by the rules)."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_VARS = ("SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES", "MERGEFLOW_GPU_DEVICES", "MERGEFLOW_GPU_CLAIMS")


def job_env(claims: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in GPU_VARS}
    env["PYTHONPATH"] = str(ROOT / "src")
    env["MERGEFLOW_GPU_CLAIMS"] = str(claims)
    env.update(extra)
    return env


def mergeflow(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergeflow", *args], env=env, capture_output=True, text=True,
                          timeout=300)


# --- the start-up check --------------------------------------------------------------------

def gsm8k_job(tmp_path: Path) -> tuple[Path, str, Path]:
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) + "\n"
                            for i in range(2)))
    settings = json.dumps({"template": "Q: {instruction}\nA:", "instruction": "{question}", "max_new_tokens": 4,
                           "batch_size": 2, "backend": "hf", "seed": 1})
    return data, settings, tmp_path / "out.jsonl"


@pytest.mark.slow
def test_gpu_jobs_with_a_cpu_torch_stop_at_once_naming_request_and_what_torch_sees(tmp_path, tiny_model_dir):
    data, settings, out = gsm8k_job(tmp_path)
    env = job_env(tmp_path / "claims")
    for args in (["generate", "--model", str(tiny_model_dir), "--benchmark", "gsm8k", "--data", str(data),
                  "--settings", settings, "--out", str(out), "--gpus", "1"],
                 ["likelihood", "--model", str(tiny_model_dir), "--task", "gsm8k", str(data), settings,
                  "--out", str(tmp_path / "nll.json"), "--gpus", "1"],
                 # judging jobs: for a judge server launched on the job's GPU
                 ["judge", "gsm8k", "--data", str(data), "--generations", str(out), "--settings", "{}",
                  "--out", str(tmp_path / "judge.json"), "--gpus", "1"],
                 ["score", "--benchmark", "alpaca_eval", "--data", str(data), "--generations", str(out),
                  "--out", str(tmp_path / "alpaca.json"), "--gpus", "1"]):
        done = mergeflow(args, env)
        assert done.returncode == 2, (args[0], done.stderr)
        line = done.stderr.strip()
        assert "\n" not in line and line.startswith(f"mergeflow {args[0]}: error: "), line
        assert "granted 1 GPU(s) (--gpus 1)" in line and "torch.version.cuda=None" in line, line
        assert "torch.cuda.device_count()=0" in line and "CUDA_VISIBLE_DEVICES=unset" in line, line
    assert not out.exists()


def test_a_merge_granted_a_gpu_with_a_cpu_torch_stops_before_writing(tmp_path, tiny_model_dir):
    done = mergeflow(["merge", "--method", "average", "--expert", f"a={tiny_model_dir}", "--expert",
                      f"b={tiny_model_dir}", "--out", str(tmp_path / "merged"), "--gpus", "1"],
                     job_env(tmp_path / "claims"))
    assert done.returncode == 2, done.stderr
    assert "granted 1 GPU(s) (--gpus 1) but torch" in done.stderr and "a CPU build of torch" in done.stderr, done.stderr
    assert "CUDA_VISIBLE_DEVICES=unset" in done.stderr and not (tmp_path / "merged").exists()


@pytest.mark.slow
def test_gpus_0_runs_with_every_gpu_hidden(tmp_path, tiny_model_dir):
    data, settings, out = gsm8k_job(tmp_path)
    done = mergeflow(["generate", "--model", str(tiny_model_dir), "--benchmark", "gsm8k", "--data", str(data),
                      "--settings", settings, "--out", str(out), "--no-progress", "--gpus", "0"],
                     job_env(tmp_path / "claims", CUDA_VISIBLE_DEVICES="0,1"))
    assert done.returncode == 0, done.stderr
    assert len(out.read_text().splitlines()) == 2


# --- claims on a local machine (a fake list of 4 GPUs) ---------------------------------------

HOLDER = """
import os, sys, time
from mergeflow import gpus
held = gpus.claim(int(sys.argv[1]), timeout=float(sys.argv[2]))
print(repr(os.environ.get("CUDA_VISIBLE_DEVICES")), flush=True)
time.sleep(float(sys.argv[3]))
"""


class Job:
    """A process that claims GPUs and holds them for `hold` seconds."""

    def __init__(self, n: int, env: dict[str, str], timeout: float = 30, hold: float = 120):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(n), str(timeout), str(hold)], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def devices(self) -> list[str] | None:
        """CUDA_VISIBLE_DEVICES as the job saw it (None: unset), once its claim is done."""
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read()
        seen = ast.literal_eval(line)  # repr of a str or None, written by HOLDER
        return None if seen is None else [d for d in seen.split(",") if d]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture
def four_gpus(tmp_path):
    jobs: list[Job] = []
    env = job_env(tmp_path / "claims", MERGEFLOW_GPU_DEVICES="0,1,2,3")
    yield env, jobs
    for job in jobs:
        if job.proc.poll() is None:
            job.kill()


def test_concurrent_jobs_get_disjoint_gpus_and_a_dead_jobs_claim_is_released(four_gpus):
    env, jobs = four_gpus
    one, two = Job(1, env), Job(2, env)
    jobs += [one, two]
    got_one, got_two = one.devices(), two.devices()
    assert len(got_one) == 1 and len(got_two) == 2, (got_one, got_two)
    assert not set(got_one) & set(got_two) and set(got_one) | set(got_two) <= {"0", "1", "2", "3"}

    # only one GPU is left: a job asking 2 waits (here: gives up after 1 s) instead of sharing
    late = Job(2, env, timeout=1, hold=0)
    jobs.append(late)
    assert late.proc.wait(timeout=60) != 0
    assert "no 2 free GPU(s) among 0,1,2,3 after 1 s" in late.proc.stderr.read()

    two.kill()  # killed without any clean-up: the kernel drops its locks
    three = Job(3, env)
    jobs.append(three)
    got_three = three.devices()
    assert len(got_three) == 3 and not set(got_three) & set(got_one), (got_three, got_one)


def test_a_job_asking_no_gpu_sees_none(four_gpus):
    env, jobs = four_gpus
    job = Job(0, {**env, "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    jobs.append(job)
    assert job.devices() == []  # CUDA_VISIBLE_DEVICES="" (not unset: that would mean every GPU)


def test_under_slurm_jobs_claim_among_the_schedulers_gpus_only(four_gpus):
    env, jobs = four_gpus  # (MERGEFLOW_GPU_DEVICES=0,1,2,3 is not the allocation: ignored)
    slurm = {**env, "SLURM_JOB_ID": "123", "CUDA_VISIBLE_DEVICES": "2,3"}
    first, second = Job(1, slurm), Job(1, slurm)  # e.g. two jobs of one group job
    jobs += [first, second]
    got = first.devices() + second.devices()
    assert sorted(got) == ["2", "3"], got
    other = Job(2, {**slurm, "SLURM_JOB_ID": "124", "CUDA_VISIBLE_DEVICES": "2,3"})  # another allocation
    jobs.append(other)
    assert other.devices() == ["2", "3"]


def test_asking_more_gpus_than_the_machine_has_is_an_error(four_gpus):
    env, jobs = four_gpus
    job = Job(5, env)
    jobs.append(job)
    assert job.proc.wait(timeout=60) != 0
    assert "--gpus 5: this machine has 4 GPU(s) (MERGEFLOW_GPU_DEVICES: 0,1,2,3)" in job.proc.stderr.read()


def test_machine_gpus_are_read_from_nvidia_smi(tmp_path, monkeypatch):
    from mergeflow import gpus

    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-a)'\necho '  MIG 1g.18gb Device 0: (UUID: MIG-x)'\n"
                    "echo 'GPU 1: NVIDIA H200 (UUID: GPU-b)'\n")
    fake.chmod(0o755)
    for var in GPU_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    assert gpus.machine_gpus() == (["0", "1"], "nvidia-smi -L")


# --- the rules pass each job's GPU count -----------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("config", [None, "config/della.yaml"], ids=["demo", "della"])
def test_every_gpu_rule_passes_its_gpu_resource_as_gpus(config, snakemake_dry_run):
    done = snakemake_dry_run(config)  # -n -p --forceall, shared by the session's tests
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    checked = set()
    for block in re.split(r"\n(?=\s*\[|\s*rule |\s*localrule )", done.stdout):  # (indented in group jobs)
        rule = re.match(r"\s*(?:rule|localrule) (\w+):", block)
        gpu = re.search(r"^\s+resources: .*\bgpu=(\d+)", block, re.M)
        shell = re.search(r"^Shell command: (.*mergeflow .*)$", block, re.M)
        if rule and gpu and shell:
            assert f" --gpus {gpu.group(1)} " in shell.group(1), (rule.group(1), shell.group(1)[-300:])
            checked.add(rule.group(1))
    assert {"merge", "generate", "score", "judge_gsm8k"} <= checked, checked
    if not config:  # the demo also runs likelihood and the robustness jobs
        assert {"likelihood", "robustness_livebench", "robustness_attack"} <= checked, checked
