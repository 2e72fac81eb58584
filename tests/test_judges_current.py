"""Judges that exist: our alpaca_eval annotator configs for current models, scored through
alpaca_eval against a loopback judge; an open-weights judge launched with `vllm serve` (a
fake `vllm` on PATH that parses vLLM's options): start -> /health -> judge -> stop."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import yaml

import fake_openai_server
from mergeflow.cli import main
from mergeflow.errors import MergeflowError
from test_judge import _gsm8k_files
from test_scoring_alpaca import _files

ROOT = Path(__file__).resolve().parents[1]
NEW_ANNOTATORS = ["alpaca_eval_gpt4.1", "weighted_alpaca_eval_gpt4.1", "weighted_alpaca_eval_open_weights",
                  "alpaca_eval_open_weights"]
HOSTED = "gpt-4.1-2025-04-14"
# Outputs GOOD, GOOD, BAD, GOOD (+ one unparseable): AlpacaEval 1 counts wins (3 of 4);
# AlpacaEval 2 weighs each by the judge's probability, P_BETTER for a win, 1 - P_BETTER else.
P = fake_openai_server.P_BETTER
EXPECTED_WIN_RATE = {"ranking": 75.0, "weighted": 100 * (3 * P + (1 - P)) / 4}


def _protocol(annotator: str) -> str:
    return "weighted" if annotator.startswith("weighted") else "ranking"


@pytest.mark.parametrize("annotator", NEW_ANNOTATORS)
def test_annotator_config_resolves_with_its_prompt(annotator, tmp_path):
    from mergeflow.scoring.alpaca import prepare_annotator_config, resolve_annotator

    path = resolve_annotator(annotator)
    assert path == ROOT / "workflow" / "judges" / annotator / "configs.yaml"
    prepared = prepare_annotator_config(path, tmp_path, "judge-x", tmp_path / "client.yaml", 3, 2e-6)
    (cfg,) = yaml.safe_load(prepared.read_text()).values()
    assert Path(cfg["prompt_template"]).is_file(), cfg["prompt_template"]
    assert "{output_1}" in Path(cfg["prompt_template"]).read_text()
    assert cfg["completions_kwargs"]["model_name"] == "judge-x"
    if "open_weights" in annotator:  # the chat endpoint, whatever the served model's name
        assert cfg["completions_kwargs"]["requires_chatml"] is True


def test_missing_prompt_template_is_a_clear_error(tmp_path):
    from mergeflow.scoring.alpaca import prepare_annotator_config

    config = tmp_path / "judges" / "mine" / "configs.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(yaml.safe_dump({"mine": {"prompt_template": "mine/nowhere.txt"}}))
    with pytest.raises(MergeflowError, match="nowhere.txt"):
        prepare_annotator_config(config, tmp_path, None, tmp_path / "c.yaml", 1, None)


def _score(argv_head, data, gens, out, settings) -> dict:
    assert main([*argv_head, "--data", str(data), "--generations", str(gens), "--settings", json.dumps(settings),
                 "--out", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("annotator", ["alpaca_eval_gpt4.1", "weighted_alpaca_eval_gpt4.1"])
def test_hosted_annotator_scores_pairs_exactly(annotator, tmp_path, monkeypatch):
    srv = fake_openai_server.start([HOSTED])
    try:
        monkeypatch.setenv("MF_TEST_JUDGE_KEY", "sk-test")
        monkeypatch.delenv("OPENAI_CLIENT_CONFIG_PATH", raising=False)
        data, gens = _files(tmp_path)
        settings = {"base_url": srv.base_url, "model": HOSTED, "api_key_env": "MF_TEST_JUDGE_KEY",
                    "annotator": annotator, "max_concurrency": 2, "max_retries": 1, "timeout": 10}
        score = _score(["score", "--benchmark", "alpaca_eval"], data, gens,
                       tmp_path / "results/scores/m/alpaca_eval.json", settings)
    finally:
        srv.shutdown()
        srv.server_close()
    rows = {r["metric"]: r for r in score["rows"]}
    assert rows["win_rate"]["value"] == pytest.approx(EXPECTED_WIN_RATE[_protocol(annotator)])
    assert rows["win_rate"]["n"] == 4 and rows["win_rate"]["n_unparsed"] == 1
    posts = [r["body"] for r in srv.requests if r["method"] == "POST"]
    assert posts and all(b["model"] == HOSTED for b in posts)
    if _protocol(annotator) == "weighted":
        assert all(b["logprobs"] is True and b["top_logprobs"] == 5 and b["max_tokens"] == 1 for b in posts)


# --------------------------------------------------------------------------- vllm serve
def fake_vllm_bin(tmp_path: Path) -> tuple[Path, Path]:
    """A directory holding a `vllm` executable (the fake server), and the file it records to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "vllm"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {Path(fake_openai_server.__file__).resolve()} \"$@\"\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return bin_dir, tmp_path / "vllm_calls.jsonl"


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    """A `vllm` executable on PATH (the fake server) and a model directory to serve."""
    bin_dir, record = fake_vllm_bin(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(record))
    monkeypatch.delenv("OPENAI_CLIENT_CONFIG_PATH", raising=False)
    model = tmp_path / "judges" / "open-judge"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    return model, record


def _calls(record: Path) -> list[dict]:
    return [json.loads(line) for line in record.read_text().splitlines()]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _vllm_settings(model: Path, **extra) -> dict:
    return {"base_url": None, "model": "org/Open-Judge-72B-Instruct", "api_key_env": "MF_UNSET_KEY",
            "launch": {"server": "vllm", "model": str(model), "tensor_parallel_size": 2,
                       "extra_args": ["--max-model-len", "4096"], "startup_timeout": 60},
            "max_concurrency": 2, "max_retries": 1, "timeout": 10, **extra}


@pytest.mark.parametrize("annotator", ["weighted_alpaca_eval_open_weights", "alpaca_eval_open_weights"])
def test_vllm_judge_is_started_healthy_judges_and_is_stopped(fake_vllm, tmp_path, annotator):
    model, record = fake_vllm
    data, gens = _files(tmp_path)
    score = _score(["judge", "alpaca_eval"], data, gens, tmp_path / "results/scores/m/alpaca_eval.json",
                   _vllm_settings(model, annotator=annotator))
    rows = {r["metric"]: r for r in score["rows"]}
    assert rows["win_rate"]["value"] == pytest.approx(EXPECTED_WIN_RATE[_protocol(annotator)])
    assert score["details"]["judge"]["endpoint"] == "local vllm serve"
    assert score["details"]["judge"]["model"] == "org/Open-Judge-72B-Instruct"
    (call,) = _calls(record)
    argv = call["argv"]
    port = argv[argv.index("--port") + 1]
    assert argv == ["serve", str(model.resolve()), "--host", "127.0.0.1", "--port", port,
                    "--served-model-name", "org/Open-Judge-72B-Instruct", "--tensor-parallel-size", "2",
                    "--max-model-len", "4096"]
    assert _gone(call["pid"]), "the vllm server outlived its judging job"


def test_vllm_gsm8k_judge(fake_vllm, tmp_path):
    model, record = fake_vllm
    data, gens = _gsm8k_files(tmp_path, ["GOOD 0", "BAD 1", "GOOD 2"])
    score = _score(["judge", "gsm8k"], data, gens, tmp_path / "results/scores/m/gsm8k_judge.json",
                   _vllm_settings(model))
    (row,) = [r for r in score["rows"] if r["metric"] == "judge_accuracy"]
    assert row["value"] == pytest.approx(2 / 3)
    (call,) = _calls(record)
    assert _gone(call["pid"])


def test_vllm_rejecting_the_command_line_is_a_clear_error(fake_vllm, tmp_path):
    model, record = fake_vllm
    data, gens = _gsm8k_files(tmp_path, ["GOOD 0"])
    settings = _vllm_settings(model)
    settings["launch"]["extra_args"] = ["--no-such-vllm-option"]
    assert main(["judge", "gsm8k", "--data", str(data), "--generations", str(gens), "--settings",
                 json.dumps(settings), "--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()


def test_launch_settings_are_validated():
    from mergeflow.judge.client import Endpoint

    base = {"model": "m", "launch": {"model": "/d", "server": "sglang"}}
    with pytest.raises(MergeflowError, match="launch.server"):
        Endpoint.from_settings(base)
    with pytest.raises(MergeflowError, match="tensor_parallel_size"):
        Endpoint.from_settings({"model": "m", "launch": {"model": "/d", "server": "vllm", "tensor_parallel_size": 0}})
    with pytest.raises(MergeflowError, match="hub"):
        Endpoint.from_settings({"model": "m", "launch": {"model": "/d", "hub": "org/x"}})
