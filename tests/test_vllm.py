"""vLLM for real: its CPU build in its own virtualenv (scripts/setup_vllm.sh, .venv-vllm).

`mergeflow generate` with backend vllm gives the greedy completions of backend hf, resumes
after a SIGKILL with only the prompts the cache lacks, and the workflow's generate rule runs
in vLLM's virtualenv (the split envs/vllm.yaml gives a cluster). The slow tests start vLLM's
engine (about a minute or more on two cores: two spawned processes import vLLM); they skip
only where vLLM's CPU build is not installed here, saying why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dry_run_jobs import dry_run_env
from mergeflow import benchmarks
from mergeflow.generation import templates

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-vllm"
N_DOCS = 24
KEEP = 2  # answers the killed run's cache keeps (see cut_to_a_kill_mid_write)
HF_SETTINGS = {"template": templates.ALPACA, "instruction": "{question}", "max_new_tokens": 24, "stop": ["###"],
               "backend": "hf", "dtype": "float32", "batch_size": 4}
# one prompt per vLLM call: each answer is cached before the next, so a kill lands between two
VLLM_SETTINGS = {**HF_SETTINGS, "backend": "vllm", "vllm_chunk_size": 1}
ENGINE_TIMEOUT = 900  # one engine start and a few seconds of generation, on a loaded 2-core machine


def vllm_python() -> Path:
    """vLLM's Python (MERGEFLOW_VLLM_PYTHON, else .venv-vllm's); skips, with the set-up's reason,
    where the set-up could not install vLLM or was told not to."""
    named = os.environ.get("MERGEFLOW_VLLM_PYTHON")
    python = Path(named) if named else VENV / "bin" / "python"
    if not named and not (VENV / ".mergeflow-installed").exists():
        log = VENV / "install.log"
        why = "it failed: " + _last_error(log) if (VENV / ".mergeflow-failed").exists() else \
            "not installed (MERGEFLOW_VLLM=0, or scripts/setup.sh not run)"
        pytest.skip(f"vLLM's CPU build is not in {VENV.name}: {why}")
    assert python.exists(), f"MERGEFLOW_VLLM_PYTHON={python} does not exist"
    return python


def _last_error(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if "error" in line.lower()] \
        if log.exists() else []
    return lines[-1][:200] if lines else f"see {log}"


def vllm_env() -> dict:
    # the package of this checkout (as workflow/scripts/mergeflow gives it), offline
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def vllm_model_from(tiny: Path, dest: Path) -> Path:
    """The shared tiny Llama with 2 heads of 32 instead of 4 of 16: the same weights (the
    projections are 64 wide either way), a head size vLLM's CPU attention has kernels for
    (it refuses head_dim=16: 'Unsupported CPU attention configuration')."""
    shutil.copytree(tiny, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(num_attention_heads=2, num_key_value_heads=2, head_dim=32)
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    return dest


@pytest.fixture(scope="module")
def vllm_model(tiny_model_dir, tmp_path_factory) -> Path:
    return vllm_model_from(tiny_model_dir, tmp_path_factory.mktemp("vllm") / "model")


def gsm8k_file(path: Path, n: int) -> Path:
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"question": f"Tom has {i} apples and buys {i + 3} more. How many apples?",
                                 "answer": f"{i}+{i + 3}={2 * i + 3}\n#### {2 * i + 3}"}) + "\n")
    return path


def generate_cmd(python: Path | str, model: Path, data: Path, settings: dict, out: Path, cache: Path) -> list[str]:
    return [str(python), "-m", "mergeflow", "generate", "--model", str(model), "--benchmark", "gsm8k",
            "--data", str(data), "--settings", json.dumps(settings), "--out", str(out), "--cache", str(cache),
            "--no-progress"]


def cache_rows(cache: Path) -> list[dict]:
    """The cache's whole lines (a kill mid-write may leave a partial last line)."""
    rows = []
    for line in cache.read_text().splitlines() if cache.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def cut_to_a_kill_mid_write(cache: Path, keep: int) -> None:
    """The killed run's cache as a kill after `keep` answers leaves it: those whole lines and half
    of the next. The engine answers a prompt every ~40 ms, so where the kill lands depends on the
    machine's load (a busy CI box once let all 24 through first); the cut makes the resume exact."""
    lines = cache.read_bytes().splitlines(keepends=True)
    whole = [line for line in lines if line.endswith(b"\n")]
    assert len(whole) >= keep, f"the killed run cached {len(whole)} answers, fewer than {keep}"
    partial = whole[keep][: len(whole[keep]) // 2] if len(whole) > keep else b""
    cache.write_bytes(b"".join(whole[:keep]) + partial)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the command and the engine processes it spawned (one process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def runs(vllm_model, tmp_path_factory):
    """hf's generations, then vLLM's: one run SIGKILLed once a few answers are cached, one
    resumed run. Both vLLM runs start the real engine."""
    python = vllm_python()
    tmp = tmp_path_factory.mktemp("vllm_runs")
    data = gsm8k_file(tmp / "gsm8k.jsonl", N_DOCS)
    hf_out = tmp / "hf.jsonl"
    subprocess.run(generate_cmd(sys.executable, vllm_model, data, HF_SETTINGS, hf_out, tmp / "hf_cache.jsonl"),
                   check=True, env=vllm_env(), timeout=600, capture_output=True)
    cache, out, log = tmp / "vllm_cache.jsonl", tmp / "vllm.jsonl", tmp / "killed.log"
    with open(log, "w") as fh:
        # niced: on a loaded machine the run, not this poller, waits for a core, so the kill
        # still lands while prompts are missing
        proc = subprocess.Popen(generate_cmd(python, vllm_model, data, VLLM_SETTINGS, out, cache), env=vllm_env(),
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: os.nice(10))
    start = time.monotonic()
    try:
        while len(cache_rows(cache)) < KEEP + 1:
            if proc.poll() is not None:
                pytest.fail(f"the vLLM run ended (exit {proc.returncode}) before it was killed:\n"
                            + log.read_text(errors="replace")[-3000:])
            if time.monotonic() - start > ENGINE_TIMEOUT:
                pytest.fail("no vLLM answer cached in time:\n" + log.read_text(errors="replace")[-3000:])
            time.sleep(0.02)
    finally:
        kill_group(proc)
    killed_rows = cache_rows(cache)
    cut_to_a_kill_mid_write(cache, KEEP)
    t0 = time.monotonic()
    resumed = subprocess.run(generate_cmd(python, vllm_model, data, VLLM_SETTINGS, out, cache), env=vllm_env(),
                             capture_output=True, text=True, timeout=ENGINE_TIMEOUT)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return {"hf": [json.loads(x) for x in hf_out.read_text().splitlines()],
            "vllm": [json.loads(x) for x in out.read_text().splitlines()],
            "killed_rows": killed_rows, "cache_rows": cache_rows(cache), "killed": proc.returncode,
            "resume_s": time.monotonic() - t0, "resume_log": resumed.stderr}


@pytest.mark.slow
def test_vllm_greedy_completions_equal_hf(runs):
    hf, vllm = runs["hf"], runs["vllm"]
    assert [r["doc_id"] for r in vllm] == [r["doc_id"] for r in hf] and len(hf) == N_DOCS
    assert [r["prompt"] for r in vllm] == [r["prompt"] for r in hf]
    # The same tokens; one decoding difference: where the last token ends inside a UTF-8
    # character (the tiny model's byte-level BPE does that often), hf's batch_decode writes
    # U+FFFD and vLLM's incremental detokenizer holds the partial character back.
    differ = [r["doc_id"] for r, h in zip(vllm, hf) if r["output"] != h["output"].removesuffix("\ufffd")]
    assert not differ, f"vLLM and hf disagree on docs {differ}"
    exact = sum(r["output"] == h["output"] for r, h in zip(vllm, hf))
    assert exact > 0 and all(len(h["output"]) > 8 for h in hf)  # real text, not a vacuous match
    setup = runs["cache_rows"][0]["setup"]
    assert (setup["backend"], setup["dtype"], setup["batch_size"]) == ("vllm", "float32", 1)
    assert setup["backend_version"].startswith("0.32.0"), setup  # vLLM's CPU build answered, not a stand-in


@pytest.mark.slow
def test_vllm_resumes_after_a_kill_with_only_the_missing_prompts(runs):
    assert runs["killed"] == -signal.SIGKILL
    # the SIGKILLed run left whole, readable answers (a partial last line is dropped)
    killed = [r["key"] for r in runs["killed_rows"]]
    assert len(killed) >= KEEP and len(set(killed)) == len(killed)
    rows = runs["cache_rows"]
    keys = [r["key"] for r in rows]
    # every prompt answered exactly once across both runs: the resumed run skipped the kept ones
    # and redid the one whose line the kill cut
    assert len(keys) == len(set(keys)) == N_DOCS
    assert keys[:KEEP] == killed[:KEEP]


@pytest.mark.slow
def test_vllm_venv_has_what_the_generate_path_imports():
    """.venv-vllm holds vLLM's dependencies and mergeflow without its own: every third-party
    module that `mergeflow generate` can reach (test_workflow's import walk) must be there."""
    python = vllm_python()
    sys.path.insert(0, str(Path(__file__).parent))
    from test_workflow import third_party_imports

    modules = sorted(third_party_imports("mergeflow.generation") | {"vllm"})
    res = subprocess.run([str(python), "-c", "import importlib.util, sys\n"
                          "missing = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]\n"
                          "print(missing)", *modules], capture_output=True, text=True, env=vllm_env(), timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "[]", (modules, res.stdout, res.stderr[-2000:])


# --- the set-up: optional, one line when vLLM cannot install --------------------------------------------


def setup_copy(dest: Path) -> Path:
    (dest / "scripts").mkdir(parents=True)
    (dest / "envs").mkdir()
    shutil.copy(ROOT / "scripts" / "setup_vllm.sh", dest / "scripts")
    for name in ("envs/vllm-cpu.txt", "envs/constraints.txt", "pyproject.toml"):
        shutil.copy(ROOT / name, dest / name)
    return dest


def test_setup_says_in_one_line_when_vllm_cannot_install(tmp_path):
    repo = setup_copy(tmp_path / "repo")

    def setup(**env) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "scripts/setup_vllm.sh"], cwd=repo, capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=60)

    skipped = setup(MERGEFLOW_VLLM="0")
    assert (skipped.returncode, skipped.stdout, skipped.stderr) == (0, "", "") and not (repo / ".venv-vllm").exists()
    failed = setup(PYTHON="false")  # no interpreter to make the virtualenv with
    lines = failed.stdout.splitlines()
    assert failed.returncode == 0 and failed.stderr == "", failed.stderr
    assert lines[-1].startswith("mergeflow setup: vLLM (CPU build) did not install (.venv-vllm/install.log")
    assert lines[-1].endswith("the vllm backend is unavailable, hf works") and len(lines) == 2
    assert (repo / ".venv-vllm" / ".mergeflow-failed").exists()
    assert not (repo / ".venv-vllm" / ".mergeflow-installed").exists()
    again = setup(PYTHON="false")  # remembered: not retried, said again
    assert again.returncode == 0 and again.stdout.splitlines() == [
        "mergeflow setup: vLLM (CPU build) did not install earlier (.venv-vllm/install.log); "
        "the vllm backend is unavailable, hf works"]


# --- the workflow: the generate rule in vLLM's virtualenv ---------------------------------------------


def workflow_copy(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for item in ("Snakefile", "workflow", "config", "envs", "src", "profiles"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, dest / item, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, dest / item)
    return dest


def vllm_config(path: Path, model: Path, data: Path) -> None:
    """The demo config cut to one model x one benchmark (the base model on 4 GSM8K docs),
    generated with vLLM; a merge of the model with itself keeps the config valid."""
    from mergeflow import config as mfconfig

    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["demo"]["enabled"] = False
    cfg["robustness"] = {"enabled": False}
    cfg["judge"]["agreement"] = {}
    cfg["models"] = {name: {"path": str(model)} for name in ("base", "expert")}
    cfg["base_model"] = "base"
    cfg["merges"] = [{"method": "task_arithmetic", "experts": ["expert"], "params": {"lambda": 1.0}}]
    cfg["benchmarks"] = {"gsm8k": {"path": str(data)}}
    cfg["evaluate"] = {"models": ["base"], "benchmarks": ["gsm8k"], "gsm8k_judge": False}
    cfg["protocol"]["defaults"]["limit"] = 4
    cfg["protocol"]["benchmarks"]["gsm8k"].update(max_new_tokens=16, backend="vllm", dtype="float32")
    cfg["resources"] = {"merge_gpus": 0, "generate_gpus": 0, "merge_mem_mb": 2000, "generate_mem_mb": 3000}
    mfconfig.prepare(cfg)  # still valid
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


@pytest.mark.slow  # three dry runs
def test_generate_rule_names_vllms_python_only_for_vllm(tiny_model_dir, tmp_path):
    """The choice is visible in the job's command: MERGEFLOW_PYTHON=<vLLM's Python> for a
    vLLM config, empty (the job's own python) for an hf one."""
    work = workflow_copy(tmp_path / "wf")
    data = gsm8k_file(tmp_path / "gsm8k.jsonl", 4)
    vllm_config(work / "config" / "vllm.yaml", tiny_model_dir, data)
    fake = tmp_path / "venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.symlink_to(sys.executable)

    def generate_python(configfile: str, **env) -> str:
        res = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--forceall", "--cores", "1",
                              "--configfile", configfile],
                             cwd=work, capture_output=True, text=True, timeout=300, env={**dry_run_env(), **env})
        assert res.returncode == 0, res.stdout + res.stderr
        (python,) = re.findall(r"MERGEFLOW_PYTHON=(\S*) workflow/scripts/mergeflow generate", res.stdout + res.stderr)
        return python

    assert generate_python("config/vllm.yaml", MERGEFLOW_VLLM_PYTHON=str(fake)) == str(fake)
    cfg = yaml.safe_load((work / "config" / "vllm.yaml").read_text())
    cfg["protocol"]["benchmarks"]["gsm8k"]["backend"] = "hf"
    (work / "config" / "hf.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert generate_python("config/hf.yaml", MERGEFLOW_VLLM_PYTHON=str(fake)) == ""
    res = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", "config/vllm.yaml"],
                         cwd=work, capture_output=True, text=True, timeout=300,
                         env={**dry_run_env(), "MERGEFLOW_VLLM_PYTHON": str(tmp_path / "nowhere")})
    assert res.returncode != 0 and f"MERGEFLOW_VLLM_PYTHON={tmp_path / 'nowhere'}" in res.stdout + res.stderr


@pytest.mark.slow
def test_workflow_generates_with_vllm(vllm_model, tmp_path):
    """One model x one benchmark through the whole workflow, generate in vLLM's virtualenv."""
    python = vllm_python()
    work = workflow_copy(tmp_path / "wf")
    data = gsm8k_file(tmp_path / "gsm8k.jsonl", 6)
    vllm_config(work / "config" / "vllm.yaml", vllm_model, data)
    # (SLURM_CONF: the slurm plugin's ~10 s wait for a controller, where SLURM is installed)
    env = {**dry_run_env(), "MERGEFLOW_VLLM_PYTHON": str(python), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    res = subprocess.run(["timeout", "-k", "10", str(ENGINE_TIMEOUT), sys.executable, "-m", "snakemake", "--cores", "2",
                          "--configfile", "config/vllm.yaml"], cwd=work, capture_output=True, text=True, env=env,
                         timeout=ENGINE_TIMEOUT + 60)
    logs = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-2000:]}" for p in (work / "results" / "logs").rglob("*.log")) \
        if (work / "results" / "logs").exists() else ""
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:] + logs
    cache = [json.loads(x) for x in (work / "results" / "cache" / "generations" / "base" / "gsm8k.jsonl")
             .read_text().splitlines()]
    assert len(cache) == 4 and {c["setup"]["backend"] for c in cache} == {"vllm"}
    assert {c["setup"]["backend_version"] for c in cache} == {"0.32.0"}
    gens = [json.loads(x) for x in (work / "results" / "generations" / "base" / "gsm8k.jsonl").read_text().splitlines()]
    assert [g["doc_id"] for g in gens] == [benchmarks.get("gsm8k").doc_id(d) for d in
                                           benchmarks.get("gsm8k").load(data, limit=4)]
    scores = (work / "results" / "scores.csv").read_text()
    assert "base" in scores and "gsm8k" in scores
