"""Judge preflight: a judge model the endpoint does not serve, or a missing key, stops a
real `snakemake` run at start-up, before any job, naming the config key and the endpoint;
dry runs never contact the endpoint; a plan without judging jobs is not checked."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import fake_openai_server
from mergeflow.cli import main
from mergeflow.errors import MergeflowError
from mergeflow.judge.preflight import preflight

ROOT = Path(__file__).resolve().parents[1]
HOSTED = "gpt-4.1-2025-04-14"
KEY_ENV = "MF_PREFLIGHT_TEST_KEY"
TARGET = "results/scores/lm/gsm8k_judge.json"
ALPACA_TARGET = "results/scores/lm/alpaca_eval.json"
HOSTED_URL = "https://api.openai.com/v1"  # never contacted: the missing key is found first


@pytest.fixture
def endpoint():
    srv = fake_openai_server.start(["gpt-4o-mini", "text-embedding-3-small"])  # not the judge
    yield srv
    srv.shutdown()
    srv.server_close()


# --------------------------------------------------------------------------- the function
def test_preflight_names_the_key_and_the_endpoint(endpoint, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    # A hosted endpoint without its key fails before anything is sent (no network here).
    with pytest.raises(MergeflowError, match=rf"judge\.endpoint\.api_key_env.*{HOSTED_URL}.*\${KEY_ENV}"):
        preflight({"base_url": HOSTED_URL, "model": HOSTED, "api_key_env": KEY_ENV})
    settings = {"base_url": endpoint.base_url, "model": HOSTED, "api_key_env": KEY_ENV}
    monkeypatch.setenv(KEY_ENV, "sk-preflight")
    with pytest.raises(MergeflowError, match=rf"judge\.endpoint\.model.*{endpoint.base_url}.*{HOSTED}.*gpt-4o-mini"):
        preflight(settings)
    assert [(r["method"], r["path"], r["auth"]) for r in endpoint.requests] == [
        ("GET", "/v1/models", "Bearer sk-preflight")]
    endpoint.models.append(HOSTED)
    assert HOSTED in preflight(settings)
    with pytest.raises(MergeflowError, match=r"judge\.endpoint\.base_url.*unreachable"):
        preflight({**settings, "base_url": "http://127.0.0.1:9/v1"}, timeout=2)


def test_preflight_of_a_launched_server_checks_without_starting(tmp_path, monkeypatch):
    model = tmp_path / "judge"
    settings = {"model": "org/judge", "launch": {"server": "vllm", "model": str(model)}}
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no vllm here
    with pytest.raises(MergeflowError, match=r"judge\.endpoint\.launch\.server.*vllm"):
        preflight(settings, model_dir_built=True)
    # under --sdm conda the judging job's env (envs/vllm.yaml) brings vllm, not the submit host
    assert "job's environment" in preflight(settings, model_dir_built=True, env_provides_server=True)
    (tmp_path / "bin").mkdir()
    exe = tmp_path / "bin" / "vllm"
    exe.write_text("#!/bin/sh\ntouch " + str(tmp_path / "started") + "\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(MergeflowError, match=rf"judge\.endpoint\.launch\.model.*{model}"):
        preflight(settings)
    assert "not started" in preflight(settings, model_dir_built=True)  # e.g. fetched by the workflow
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert "not started" in preflight(settings)
    assert main(["judge", "preflight", "--settings", json.dumps(settings)]) == 0
    assert main(["judge", "preflight", "--settings", json.dumps({**settings, "model": "x",
                                                                  "launch": {"model": str(tmp_path)}})]) == 2
    assert not (tmp_path / "started").exists()


# --------------------------------------------------------------------------- a real run
def _workdir(tmp_path: Path, base_url: str | None, launch: dict | None = None,
             alpaca: bool = False) -> tuple[Path, Path]:
    """A tiny project whose plan for TARGET is one judge_gsm8k job (its inputs exist), and
    with `alpaca` one AlpacaEval judging job for ALPACA_TARGET."""
    work = tmp_path / "work"
    (work / "models" / "lm").mkdir(parents=True)
    (work / "models" / "base").mkdir(parents=True)
    for name in ("lm", "base"):
        (work / "models" / name / "config.json").write_text("{}")
    (work / "workflow").symlink_to(ROOT / "workflow")  # the rules' commands and judge prompts
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["demo"]["enabled"] = False
    cfg["models"] = {"base": {"path": "models/base"}, "lm": {"path": "models/lm"}}
    cfg["merges"] = []
    benches = ["gsm8k", "alpaca_eval"] if alpaca else ["gsm8k"]
    cfg["evaluate"] = {"models": ["lm"], "benchmarks": benches, "gsm8k_judge": True, "reference_likelihood": False}
    cfg["benchmarks"] = {b: {"path": f"data/{b}.jsonl"} for b in benches}
    cfg.pop("robustness", None)
    cfg["judge"] = {"paper": {"gsm8k_judge": "gpt-4-0613"},
                    "endpoint": {"base_url": base_url, "model": HOSTED, "api_key_env": KEY_ENV, "launch": launch,
                                 "max_retries": 0, "timeout": 10},
                    "alpaca_eval": {"annotator": "weighted_alpaca_eval_open_weights"},
                    "gsm8k": {"prompt": "workflow/judges/gsm8k_judge.yaml"}}
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    docs = [{"question": f"Question {i}?", "answer": f"Work.\n#### {i}"} for i in range(2)]
    from mergeflow import benchmarks

    bench = benchmarks.get("gsm8k")
    (work / "data").mkdir()
    (work / "data" / "gsm8k.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (work / "resources" / "data").mkdir(parents=True)
    (work / "resources" / "data" / "gsm8k.jsonl").write_text((work / "data" / "gsm8k.jsonl").read_text())
    gens = work / "results" / "generations" / "lm" / "gsm8k.jsonl"
    gens.parent.mkdir(parents=True)
    gens.write_text("".join(json.dumps({"doc_id": bench.doc_id(d), "prompt": "P", "output": o, "completion": o}) + "\n"
                            for d, o in zip(docs, ["GOOD 0", "BAD 1"])))
    made = [gens]
    if alpaca:
        from test_scoring_alpaca import _files

        data, alpaca_gens = _files(tmp_path)
        (work / "data" / "alpaca_eval.jsonl").write_text(data.read_text())
        (work / "resources" / "data" / "alpaca_eval.jsonl").write_text(data.read_text())
        made.append(work / "results" / "generations" / "lm" / "alpaca_eval.jsonl")
        made[-1].write_text(alpaca_gens.read_text())
    now = time.time()  # inputs older than what was made from them: nothing but judging to do
    for i, path in enumerate([*(work / "data").iterdir(), work / "models" / "lm",
                              *(work / "resources" / "data").iterdir(), *made]):
        os.utime(path, (now - 100 + i, now - 100 + i))
    return work, config


def _snakemake(work: Path, config: Path, *args: str, key: str | None = None,
               **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    env.update(env_extra)
    if key is not None:
        env[KEY_ENV] = key
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(work),
                           "--cores", "1", *args, "--configfile", str(config)],
                          capture_output=True, text=True, timeout=300, env=env)


def _no_job_ran(work: Path) -> None:
    assert not (work / TARGET).exists()
    assert not (work / "results" / "logs").exists(), list((work / "results" / "logs").rglob("*"))


@pytest.mark.slow
def test_run_stops_before_any_job_when_the_endpoint_does_not_serve_the_judge(endpoint, tmp_path):
    work, config = _workdir(tmp_path, endpoint.base_url)
    res = _snakemake(work, config, TARGET, key="sk-preflight")
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "judge.endpoint.model" in out and endpoint.base_url in out and HOSTED in out, out
    _no_job_ran(work)
    assert [r["path"] for r in endpoint.requests] == ["/v1/models"]  # no judging request went out
    assert "sk-preflight" not in out


@pytest.mark.slow
def test_run_stops_before_any_job_without_the_key(tmp_path):
    work, config = _workdir(tmp_path, HOSTED_URL)
    res = _snakemake(work, config, TARGET)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "judge.endpoint.api_key_env" in out and HOSTED_URL in out and KEY_ENV in out, out
    _no_job_ran(work)


@pytest.mark.slow
def test_dry_run_never_contacts_the_endpoint(endpoint, tmp_path):
    work, config = _workdir(tmp_path, endpoint.base_url)
    res = _snakemake(work, config, TARGET, "-n")  # the endpoint would fail the preflight: not called
    assert res.returncode == 0, res.stdout + res.stderr
    assert "judge_gsm8k" in res.stdout + res.stderr
    assert endpoint.requests == []
    work, config = _workdir(tmp_path / "closed", "http://127.0.0.1:9/v1")  # nothing listens there
    res = _snakemake(work, config, TARGET, "-n")
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
def test_a_served_judge_passes_and_the_job_judges(endpoint, tmp_path):
    endpoint.models.append(HOSTED)
    work, config = _workdir(tmp_path, endpoint.base_url)
    res = _snakemake(work, config, TARGET, key="sk-preflight")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out + "".join(p.read_text() for p in (work / "results" / "logs").rglob("*.log"))
    assert f"judge preflight: {endpoint.base_url} serves {HOSTED}" in out
    rows = {r["metric"]: r for r in json.loads((work / TARGET).read_text())["rows"]}
    assert rows["judge_accuracy"]["value"] == pytest.approx(0.5)
    assert endpoint.requests[0]["path"] == "/v1/models"
    assert {r["path"] for r in endpoint.requests[1:]} == {"/v1/chat/completions"}


@pytest.mark.slow
def test_a_plan_without_judging_is_not_checked(endpoint, tmp_path):
    work, config = _workdir(tmp_path, endpoint.base_url)
    os.utime(work / "data" / "gsm8k.jsonl")  # newer than its copy: fetch_data must rerun
    res = _snakemake(work, config, "resources/data/gsm8k.jsonl")  # no key, judge not served
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "fetch_data" in out and "judge preflight" not in out
    assert endpoint.requests == []


@pytest.mark.slow
def test_a_vllm_judge_is_served_for_each_judging_job_of_a_run(tmp_path):
    """The open-weights path through the workflow: preflight (executable and model, nothing
    started), then each judging job starts `vllm serve` (the fake), judges, stops it."""
    from test_judges_current import EXPECTED_WIN_RATE, _calls, _gone, fake_vllm_bin

    bin_dir, record = fake_vllm_bin(tmp_path)
    launch = {"server": "vllm", "model": "models/judge", "tensor_parallel_size": 2, "startup_timeout": 60}
    work, config = _workdir(tmp_path, None, launch=launch, alpaca=True)
    (work / "models" / "judge").mkdir()
    (work / "models" / "judge" / "config.json").write_text("{}")
    res = _snakemake(work, config, TARGET, ALPACA_TARGET, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                     FAKE_VLLM_RECORD=str(record))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out + "".join(p.read_text() for p in (work / "results" / "logs").rglob("*.log"))
    assert "judge preflight: local `vllm serve`" in out and "not started" in out
    assert "judge_alpaca_eval" in out  # AlpacaEval moves to the judging rule (vLLM's env)
    calls = _calls(record)
    assert len(calls) == 2 and all(_gone(c["pid"]) for c in calls)  # one server per judging job, both stopped
    for call in calls:
        assert call["argv"][:2] == ["serve", str((work / "models" / "judge").resolve())]
        assert call["argv"][call["argv"].index("--served-model-name") + 1] == HOSTED
    rows = {r["metric"]: r for r in json.loads((work / ALPACA_TARGET).read_text())["rows"]}
    assert rows["win_rate"]["value"] == pytest.approx(EXPECTED_WIN_RATE["weighted"])
    assert json.loads((work / TARGET).read_text())["details"]["judge"]["endpoint"] == "local vllm serve"
