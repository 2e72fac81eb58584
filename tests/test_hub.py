"""The Hub for real: olah serves, on 127.0.0.1, git mirrors of tiny Llama models and of the
benchmark datasets in their Hub layouts (tests/hub_server.py); `mergeflow fetch` and the whole
workflow (fetch -> merge -> generate -> score -> aggregate) run against it with every model
and dataset pinned to a commit SHA, and the SHAs reach scores.csv."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import build_tiny_llama
from hub_server import OLAH, HubRepo, OlahHub, dataset_card, model_files, parquet_bytes

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a server start and Hub round trips: seconds each
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")
ORG = "mergeflow-test"


def gsm8k_rows(n: int, start: int = 0) -> list[dict]:
    return [{"question": f"Tom has {i} apples and buys {i + 2} more. How many apples does he have?",
             "answer": f"Tom has {i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} apples.\n#### {2 * i + 2}"}
            for i in range(start, start + n)]


def mbpp_rows(task_ids) -> list[dict]:
    return [{"task_id": t, "text": f"Write a function to return {t}.", "code": f"def f():\n    return {t}",
             "test_list": [f"assert f() == {t}"], "test_setup_code": "", "challenge_test_list": []}
            for t in task_ids]


def math_rows(subject: str, n: int) -> list[dict]:
    return [{"problem": f"What is ${i} + {len(subject)}$?", "level": f"Level {1 + i % 5}",
             "type": subject.replace("_", " ").title(), "solution": f"It is $\\boxed{{{i + len(subject)}}}$."}
            for i in range(n)]


def alpaca_rows(generator: str) -> list[dict]:
    return [{"instruction": f"Name a colour number {i}.", "output": f"Colour {i} is blue.",
             "generator": generator, "dataset": "helpful_base"} for i in range(4)]


def build_mirrors(root: Path, tmp_factory) -> dict:
    """Every repository of the fixture; returns {repo_id: [commit SHAs, oldest first]} plus the
    rows each pinned commit holds."""
    mirrors = root / "M"
    shas, expected = {}, {}
    for name, seeds in (("tiny-llama-base", (0, 5)), ("tiny-llama-lm", (1,)), ("tiny-llama-math", (2,))):
        repo = HubRepo(mirrors, "model", f"{ORG}/{name}")
        for i, seed in enumerate(seeds):  # the base's main moves on after the commit the config pins
            model = build_tiny_llama(tmp_factory.mktemp(f"{name}-{seed}") / "model", seed=seed)
            files = {"README.md": f"# {name}\n", **model_files(model)}
            repo.commit(files, f"seed {seed}")
            expected[f"{ORG}/{name}@{i}"] = files["model.safetensors"]
        shas[repo.repo_id] = repo.commits

    gsm = HubRepo(mirrors, "dataset", "openai/gsm8k")
    card = dataset_card({"main": ["train", "test"], "socratic": ["train", "test"]})
    for n in (4, 6):  # the pinned commit has 4 test rows, main 6
        files = {"README.md": card}
        for config in ("main", "socratic"):
            files[f"{config}/train-00000-of-00001.parquet"] = parquet_bytes(gsm8k_rows(3, start=100))
            files[f"{config}/test-00000-of-00001.parquet"] = parquet_bytes(gsm8k_rows(n))
        gsm.commit(files, f"{n} test rows")
    shas[gsm.repo_id] = gsm.commits
    expected["openai/gsm8k@0"], expected["openai/gsm8k@1"] = gsm8k_rows(4), gsm8k_rows(6)

    mbpp = HubRepo(mirrors, "dataset", "google-research-datasets/mbpp")
    splits = {"train": range(601, 604), "test": (11, 12, 13, 510), "validation": range(511, 513),
              "prompt": range(1, 4)}
    files = {"README.md": dataset_card({"full": list(splits), "sanitized": list(splits)})}
    for config in ("full", "sanitized"):
        for split, ids in splits.items():
            files[f"{config}/{split}-00000-of-00001.parquet"] = parquet_bytes(mbpp_rows(ids))
    mbpp.commit(files, "mbpp")
    shas[mbpp.repo_id] = mbpp.commits

    math = HubRepo(mirrors, "dataset", "EleutherAI/hendrycks_math")
    files = {"README.md": dataset_card({s: ["train", "test"] for s in MATH_SUBJECTS})}
    for subject in MATH_SUBJECTS:
        files[f"{subject}/train-00000-of-00001.parquet"] = parquet_bytes(math_rows(subject, 2))
        files[f"{subject}/test-00000-of-00001.parquet"] = parquet_bytes(math_rows(subject, 1))
    math.commit(files, "math")
    shas[math.repo_id] = math.commits

    alpaca = HubRepo(mirrors, "dataset", "tatsu-lab/alpaca_eval")
    alpaca.commit({"README.md": "# alpaca_eval\n",
                   "alpaca_eval.json": json.dumps(alpaca_rows("text_davinci_003"), indent=1),
                   "alpaca_eval_gpt4_baseline.json": json.dumps(alpaca_rows("gpt4_1106_preview"), indent=1)},
                  "alpaca_eval")
    shas[alpaca.repo_id] = alpaca.commits

    from mergeflow.robustness.demo import livebench_rows

    coding = livebench_rows("coding")  # LiveBench's coding schema (what the demo writes)
    live = HubRepo(mirrors, "dataset", "livebench/coding")
    live.commit({"README.md": "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: test\n"
                              "    path: data/test-*\n---\n",
                 "data/test-00000-of-00001.parquet": parquet_bytes(coding)}, "coding")
    shas[live.repo_id] = live.commits
    expected["livebench/coding"] = coding
    return {"mirrors": mirrors, "shas": shas, "expected": expected}


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    if not OLAH.exists():
        res = subprocess.run(["bash", str(ROOT / "scripts" / "setup_test_assets.sh")], cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
        if not OLAH.exists():
            pytest.skip(f"olah could not be installed into .venv/olah: {(res.stdout + res.stderr)[-300:]}")
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the Hub mirrors are git repositories")
    root = tmp_path_factory.mktemp("hub")
    built = build_mirrors(root, tmp_path_factory)
    with OlahHub(built["mirrors"], root / "olah") as server:
        server.shas, server.expected = built["shas"], built["expected"]
        server.hf_home = root / "hf_home"
        yield server


def run_cli(hub, *args, cwd=ROOT) -> subprocess.CompletedProcess:
    env = hub.env()
    env["HF_HOME"] = str(hub.hf_home)  # the datasets / hub caches of the test, not ~/.cache
    return subprocess.run([sys.executable, "-m", "mergeflow", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_fetch_model_at_a_commit_and_at_main(hub, tmp_path):
    repo = f"{ORG}/tiny-llama-base"
    old, new = hub.shas[repo]
    for rev, sha, i in ((old, old, 0), ("main", new, 1)):
        out = tmp_path / f"m-{i}"
        res = run_cli(hub, "fetch", "model", "--source", repo, "--revision", rev, "--out", str(out))
        assert res.returncode == 0, res.stderr[-2000:]
        assert (out / "model.safetensors").read_bytes() == hub.expected[f"{repo}@{i}"]
        assert not (out / "README.md").exists()  # only what a causal LM needs
        record = json.loads((out / "mergeflow_fetch.json").read_text())
        assert record == {"source": repo, "requested_revision": rev, "revision": sha}


def test_fetch_each_benchmark_in_its_hub_layout(hub, tmp_path):
    gsm_old, gsm_new = hub.shas["openai/gsm8k"]
    cases = [
        (["--benchmark", "gsm8k", "--revision", gsm_old], hub.expected["openai/gsm8k@0"]),
        (["--benchmark", "gsm8k", "--revision", "main"], hub.expected["openai/gsm8k@1"]),
        (["--benchmark", "mbpp", "--revision", hub.shas["google-research-datasets/mbpp"][0]],
         mbpp_rows((11, 12, 13, 510))),
        (["--benchmark", "math", "--revision", hub.shas["EleutherAI/hendrycks_math"][0]],
         [r for s in MATH_SUBJECTS for r in math_rows(s, 1)]),
        (["--benchmark", "alpaca_eval", "--revision", hub.shas["tatsu-lab/alpaca_eval"][0]],
         alpaca_rows("text_davinci_003")),
        (["--benchmark", "alpaca_eval", "--subset", "alpaca_eval_gpt4_baseline"], alpaca_rows("gpt4_1106_preview")),
    ]
    for i, (args, rows) in enumerate(cases):
        out = tmp_path / f"d{i}.jsonl"
        res = run_cli(hub, "fetch", "data", *args, "--out", str(out))
        assert res.returncode == 0, (args, res.stderr[-2000:])
        got = read_jsonl(out)
        assert [{k: r[k] for k in rows[0]} for r in got] == rows, args

    out = tmp_path / "coding.jsonl"
    res = run_cli(hub, "robustness", "fetch", "--dataset", "livebench_coding", "--release-date", "2024-06-24",
                  "--revision", hub.shas["livebench/coding"][0], "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert [r["question_id"] for r in read_jsonl(out)] == [r["question_id"] for r in hub.expected["livebench/coding"]]


@pytest.mark.parametrize("args, expected", [
    (["model", "--source", f"{ORG}/tiny-llama-lm", "--revision", "0" * 40],
     f"model {ORG}/tiny-llama-lm: the Hub could not serve revision {'0' * 40} (HTTP 500); the repository exists"),
    (["model", "--source", f"{ORG}/tiny-llama-lm", "--revision", "no-such-branch"],
     f"model {ORG}/tiny-llama-lm: revision no-such-branch not found"),
    (["model", "--source", f"{ORG}/no-such-model", "--revision", "main"],
     f"model {ORG}/no-such-model not found on the Hugging Face Hub"),
    (["data", "--benchmark", "gsm8k", "--revision", "1" * 40],
     f"dataset openai/gsm8k: the Hub could not serve revision {'1' * 40} (HTTP 500); the repository exists"),
    (["data", "--benchmark", "gsm8k", "--source", f"{ORG}/no-such-data", "--revision", "main"],
     f"dataset {ORG}/no-such-data not found on the Hugging Face Hub"),
])
def test_fetch_errors_are_one_line_exit_2(hub, tmp_path, args, expected):
    res = run_cli(hub, "fetch", *args, "--out", str(tmp_path / ("out.jsonl" if args[0] == "data" else "out")))
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if "mergeflow fetch: error" in line]
    assert len(errors) == 1 and errors[0].startswith("mergeflow fetch: error: "), res.stderr[-2000:]
    assert res.stderr.rstrip().splitlines()[-1] == errors[0]  # the last word, one line
    assert expected in errors[0], errors[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.jsonl").exists()


def hub_config(hub) -> dict:
    """A small paper-shaped config whose models and data are Hub ids pinned to commit SHAs."""
    pin = {name: hub.shas[f"{ORG}/tiny-llama-{name}"][0] for name in ("base", "lm", "math")}
    stop = ["</s>", "### Instruction"]
    return {
        "seed": 42,
        "models": {name: {"hub": f"{ORG}/tiny-llama-{name}", "revision": sha} for name, sha in pin.items()},
        "base_model": "base",
        "merge": {"device": "cpu"},
        "merges": [{"method": "task_arithmetic", "experts": ["lm", "math"], "params": {"lambda": 0.5}}],
        "evaluate": {"models": "all", "benchmarks": ["gsm8k", "mbpp"], "gsm8k_judge": False},
        "benchmarks": {
            "gsm8k": {"hub": "openai/gsm8k", "revision": hub.shas["openai/gsm8k"][0], "subset": "main",
                      "split": "test"},
            "mbpp": {"hub": "google-research-datasets/mbpp", "revision": hub.shas["google-research-datasets/mbpp"][0],
                     "subset": "full", "split": "test"},
        },
        "protocol": {
            "name": "hub-test",
            "defaults": {"batch_size": 4, "backend": "hf", "dtype": "float32", "limit": 3},
            "benchmarks": {
                "gsm8k": {"template": "alpaca_cot_mergelm", "instruction": "{question}", "max_new_tokens": 8,
                          "stop": stop},
                "mbpp": {"template": "alpaca", "instruction": "mbpp", "max_new_tokens": 8, "stop": stop,
                         "postprocess": "code"},
            },
        },
        "scoring": {"code": {"timeout": 10, "isolation": "auto", "max_workers": 1}},
    }


def test_workflow_runs_from_the_hub_and_records_the_shas(hub, tmp_path):
    from mergeflow import config as mfconfig

    work = tmp_path / "work"
    work.mkdir()
    for item in ("Snakefile", "workflow", "config", "envs", "src"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / item)
    cfg = hub_config(hub)
    [merge_id] = mfconfig.merge_specs(cfg)
    cfg["evaluate"]["models"] = ["base", merge_id]  # the experts are fetched for the merge: half the jobs of `all`
    (work / "hub.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = hub.env()
    env.update(HF_HOME=str(tmp_path / "hf_home"), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    res = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "hub.yaml"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=1200)
    if res.returncode != 0:
        logs = "\n".join(f"== {p}\n{p.read_text()[-2000:]}" for p in sorted((work / "results" / "logs").rglob("*.log")))
        pytest.fail(f"workflow failed:\n{res.stderr[-4000:]}\n{logs[-8000:]}")

    # the pinned snapshots, not main: the base's main has other weights, GSM8K's main more rows
    base = work / "resources" / "models" / "base"
    assert (base / "model.safetensors").read_bytes() == hub.expected[f"{ORG}/tiny-llama-base@0"]
    assert read_jsonl(work / "resources" / "data" / "gsm8k.jsonl") == hub.expected["openai/gsm8k@0"]
    [meta_file] = (work / "results" / "merge_meta").glob("*.json")
    inputs = json.loads(meta_file.read_text())["inputs"]
    assert inputs["base"]["revision"] == cfg["models"]["base"]["revision"]
    assert {k: v["revision"] for k, v in inputs["experts"].items()} == {
        k: cfg["models"][k]["revision"] for k in ("lm", "math")}

    scores = pd.read_csv(work / "results" / "scores.csv")
    assert meta_file.stem == merge_id and set(scores["model"]) == {"base", merge_id}
    assert set(scores["benchmark"]) >= {"gsm8k", "mbpp"}
    for _, row in scores[scores["benchmark"].isin(["gsm8k", "mbpp"])].iterrows():
        assert row["data_revision"] == cfg["benchmarks"][row["benchmark"]]["revision"]
        if row["role"] == "merge":
            assert row["model_revision"] == ";".join(
                f"{k}={cfg['models'][k]['revision']}" for k in ("base", "lm", "math"))
        else:
            assert row["model_revision"] == cfg["models"][row["model"]]["revision"]
        assert row["n"] == 3
