"""`mergeflow plan`: counts checked by hand on a small config, equal to what a Snakemake
dry run schedules, and the demo and both paper configs plan without error."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dry_run_jobs import job_counts
from mergeflow import config as mfconfig
from mergeflow.plan import build_plan, load_rates
from mergeflow.selection import sweeps

ROOT = Path(__file__).resolve().parents[1]


def small_config(tmp_path: Path) -> dict:
    """Two 13B experts from the Hub, a 2-value TIES grid + one pruning merge on gsm8k only."""
    cfg = yaml.safe_load((ROOT / "config" / "della.yaml").read_text())
    cfg["models"] = {k: cfg["models"][k] for k in ("base", "lm", "math")}
    cfg["merges"] = [
        {"method": "ties", "experts": ["lm", "math"], "params": {"lambda": 1.0}, "grid": {"density": [0.5, 0.7]}},
        {"method": "dare", "experts": ["math"], "params": {"drop_rate": 0.5}, "benchmarks": ["gsm8k"]},
    ]
    cfg["evaluate"] = {"models": "all", "benchmarks": ["gsm8k", "mbpp"], "gsm8k_judge": True}
    cfg["protocol"]["defaults"]["limit"] = None
    cfg["protocol"]["benchmarks"]["mbpp"]["limit"] = 100
    cfg["resources"] = {"merge_gpus": 1, "generate_gpus": 1, "merge_mem_mb": 64000, "generate_mem_mb": 64000}
    cfg["judge"]["endpoint"]["prices"] = {"input_per_1k": 0.002, "output_per_1k": 0.008}
    cfg["judge"]["endpoint"].pop("launch", None)
    return cfg


def test_small_config_counts_match_a_hand_count(tmp_path):
    cfg = mfconfig.prepare(small_config(tmp_path))
    rates = load_rates()
    plan = build_plan(cfg, root=tmp_path, rates=rates, concurrent=2)
    # 3 merges; models: base, lm, math + 3 merges = 6; the dare merge runs gsm8k only
    assert plan["merges"] == 3 and plan["models_evaluated"] == 6
    assert plan["generate_jobs"] == 6  # one per model, all its benchmarks on one load
    assert plan["benchmarks"]["gsm8k"] == {"models": 6, "prompts": 6 * 1319, "docs_per_job": 1319,
                                           "max_new_tokens": plan["benchmarks"]["gsm8k"]["max_new_tokens"],
                                           "batch_size": plan["benchmarks"]["gsm8k"]["batch_size"]}
    assert plan["benchmarks"]["mbpp"]["prompts"] == 5 * 100  # MBPP full test is 500 docs, limit 100
    assert plan["prompts"] == 6 * 1319 + 5 * 100
    # judge: GSM8K judge once per doc of every model that runs gsm8k, no alpaca_eval
    judge = plan["judge"]
    assert set(judge) == {"gsm8k_judge"} and judge["gsm8k_judge"]["requests"] == 6 * 1319
    tokens = judge["gsm8k_judge"]
    assert tokens["cost_usd"] == pytest.approx((tokens["input_tokens"] * 0.002 + tokens["output_tokens"] * 0.008) / 1000)
    # disk: 3 x 13.02 G params x 2 bytes of sources; merges in float16 (della.yaml merge.dtype)
    ckpt = int(13.02e9 * 2)
    assert plan["disk"]["sources_bytes"] == 3 * ckpt and plan["disk"]["checkpoint_bytes"] == ckpt
    assert plan["disk"]["peak_bytes"] == 3 * ckpt + 2 * ckpt  # 2 concurrent jobs: 2 merges alive
    assert plan["disk"]["peak_bytes_keep_merges"] == 3 * ckpt + 3 * ckpt
    # GPU-hours from the rates: merges read base + experts and write one checkpoint
    merge_s = sum(13.02e9 * (k + 2) for k in (2, 2, 1)) / rates["merge"]["params_per_s"]
    assert plan["gpu_hours"]["merge"] == pytest.approx(merge_s / 3600)
    assert plan["gpu_hours"]["generate"] > 0 and plan["gpu_hours"]["likelihood"] == 0


def test_a_local_checkpoint_is_sized_from_its_weights(tmp_path, tiny_model_dir):
    cfg = small_config(tmp_path)
    cfg["models"]["lm"] = {"path": str(tiny_model_dir)}
    plan = build_plan(mfconfig.prepare(cfg), root=tmp_path, rates=load_rates(), concurrent=1)
    weights = sum(p.stat().st_size for p in tiny_model_dir.glob("*.safetensors"))
    assert plan["disk"]["sources"]["lm"] == {"bytes": weights, "from": f"weights in {tiny_model_dir}"}


def test_unknown_checkpoint_size_names_the_model(tmp_path):
    cfg = small_config(tmp_path)
    cfg["models"]["lm"] = {"hub": "someone/unknown-7b", "revision": "main"}
    from mergeflow.errors import MergeflowError

    with pytest.raises(MergeflowError, match=r"models\.lm"):
        build_plan(mfconfig.prepare(cfg), root=tmp_path, rates=load_rates(), concurrent=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["config", "della", "m3", "mergebench"])
def test_configs_plan_and_match_the_dry_run(name, snakemake_dry_run):
    res = subprocess.run([sys.executable, "-m", "mergeflow", "plan", f"config/{name}.yaml", "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    # the session's dry run; the demo's is the one without --configfile (profiles/default names it)
    done = snakemake_dry_run(None if name == "config" else f"config/{name}.yaml")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert re.search(rf"^\s*Config file\(s\): \[PosixPath\('{re.escape(str(ROOT))}/config/{name}\.yaml'\)\]$", out, re.M), \
        out[:3000]
    jobs = job_counts(out)
    # a selecting sweep (the demo's task arithmetic): its grid members are merge_generate_validation*
    # jobs; the chosen value's test jobs join the DAG after the selection
    # (a checkpoint), which the plan counts as the first value's seeds
    cfg = mfconfig.load(ROOT / "config" / f"{name}.yaml")
    specs = mfconfig.merge_specs(cfg)
    chosen = sum(len({specs[m].seed for m in sw.members if specs[m].params == specs[sw.members[0]].params})
                 for sw in sweeps(cfg, specs).values())
    assert chosen == (1 if name == "config" else 0)
    members = sum(n for rule, n in jobs.items() if rule.startswith("merge_generate_validation"))
    assert plan["merges"] == jobs["merge"] + members + chosen
    assert plan["validation"]["merge_jobs"] == members
    assert plan["validation"]["generate_jobs"] == sum(n for rule, n in jobs.items() if "generate_validation" in rule)
    # one generate rule per benchmark set (generate, generate_<set>), one job per model
    assert plan["generate_jobs"] == chosen + sum(n for rule, n in jobs.items()
                                                 if rule.startswith("generate") and "validation" not in rule)
    assert plan["likelihood_jobs"] == jobs.get("likelihood", 0) + (chosen if cfg["evaluate"]["reference_likelihood"]
                                                                   else 0)
    # one loglik_mc rule per benchmark set (loglik_mc, loglik_mc_<set>), one job per model
    assert plan["loglik_mc_jobs"] == sum(n for rule, n in jobs.items() if rule.startswith("loglik_mc"))
    assert plan["loglik_mc_jobs"] == (13 if name == "mergebench" else 0)
    assert plan["judge"].get("gsm8k_judge", {}).get("models", 0) == jobs.get("judge_gsm8k", 0) + (
        chosen if cfg["evaluate"]["gsm8k_judge"] else 0)
    if name == "config":  # its CPU judge is started by every judging job: GSM8K and AlpacaEval (test and
        # validation rows) of every model, and the agreement (the demo's log: 36 judging jobs)
        judged = jobs["judge_gsm8k"] + chosen
        assert plan["judge_servers"]["starts"] == 2 * judged + members + jobs["judge_agreement"] == 36
    text = subprocess.run([sys.executable, "-m", "mergeflow", "plan", f"config/{name}.yaml"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120).stdout
    assert "peak, keep_merges: true" in text and "GPU-hours" in text


@pytest.mark.slow
def test_paper_plans_name_the_substitute_judge_and_the_papers():
    plan = build_plan(mfconfig.load(ROOT / "config" / "della.yaml"), root=ROOT)
    gsm8k, alpaca = plan["judge"]["gsm8k_judge"], plan["judge"]["alpaca_eval"]
    assert gsm8k["judge"] == "gpt-4.1-2025-04-14" and gsm8k["paper_judge"] == "gpt-4-0613"
    assert alpaca["judge"].startswith("alpaca_eval_gpt4.1 ") and alpaca["paper_judge"].startswith("alpaca_eval_gpt4 ")


def test_hf_generation_hours_follow_the_decoding_set_up(tmp_path):
    """hf on a GPU: `auto` is the compiled static cache (its measured step, one compilation per
    model job), `plain` plain generate's step; both hand-counted from the rates."""
    rates = load_rates()
    gen = rates["generation"]
    hours = {}
    for decoding in ("auto", "plain"):
        cfg = small_config(tmp_path)
        cfg["protocol"]["defaults"]["hf_decoding"] = decoding
        hours[decoding] = build_plan(mfconfig.prepare(cfg), root=tmp_path, rates=rates, concurrent=2)["gpu_hours"]["generate"]
    cfg = mfconfig.prepare(small_config(tmp_path))
    new = {b: mfconfig.generation_settings(cfg, b)["max_new_tokens"] for b in ("gsm8k", "mbpp")}
    assert all(mfconfig.generation_settings(cfg, b)["batch_size"] == 1 for b in new)  # della: batch 1
    scale = 13.02 / gen["transformers"]["reference_params_b"]
    steps = 6 * 1319 * new["gsm8k"] + 5 * 100 * new["mbpp"]
    start = 6 * gen["engine_start_s"]["transformers"]
    compiled = steps * gen["transformers_compiled"]["step_s"][1] * scale + 6 * gen["transformers_compiled"]["compile_s"]
    plain = steps * gen["transformers"]["step_s"][1] * scale
    assert hours["auto"] == pytest.approx((compiled + start) / 3600)
    assert hours["plain"] == pytest.approx((plain + start) / 3600)


def test_overlays_merge_as_snakemake_merges_configfiles():
    """`mergeflow plan della.yaml judges/open_weights.yaml` plans the config Snakemake runs for
    `--configfile della.yaml judges/open_weights.yaml` (snakemake.utils.update_config, left to right)."""
    from snakemake.common.configfile import load_configfile
    from snakemake.utils import update_config

    files = [ROOT / "config" / "della.yaml", ROOT / "config" / "judges" / "open_weights.yaml"]
    merged: dict = {}
    for f in files:
        update_config(merged, load_configfile(str(f)))
    assert mfconfig.load(*files) == mfconfig.prepare(merged)
    assert mfconfig.load(*files)["judge"]["endpoint"]["launch"]["server"] == "vllm"
    assert mfconfig.overlay_config({"a": {"b": 1, "c": 2}, "d": 1}, {"a": {"b": 3}, "d": {"e": 4}}) == \
        {"a": {"b": 3, "c": 2}, "d": {"e": 4}}


def test_a_launched_judge_is_charged_its_server_starts(tmp_path):
    """Every judging job starts the launched judge: hand-counted on the small config with a
    vLLM judge on 4 GPUs (6 models judged on GSM8K, no AlpacaEval), and on the paper config
    with the open-weights overlay; a hosted judge starts none."""
    rates = load_rates()
    cfg = small_config(tmp_path)
    cfg["judge"]["endpoint"]["launch"] = {"server": "vllm", "model": str(tmp_path / "judge"), "tensor_parallel_size": 4}
    cfg["judge"]["endpoint"]["prices"] = {"input_per_1k": 0, "output_per_1k": 0}
    cfg["resources"]["judge_gpus"] = 4
    plan = build_plan(mfconfig.prepare(cfg), root=tmp_path, rates=rates, concurrent=2)
    start = rates["judge_server"]["start_s"]["vllm"]
    assert plan["judge_servers"] == {"server": "vllm", "starts": 6, "start_s": start, "gpus": 4, "gpu_s": 6 * start * 4}
    g = plan["gpu_hours"]
    assert g["judge_server_starts"] == pytest.approx(6 * start * 4 / 3600)
    assert g["total"] == pytest.approx(g["merge"] + g["generate"] + g["likelihood"] + g["loglik_mc"] + 6 * start * 4 / 3600)
    assert plan["judge"]["gsm8k_judge"]["cost_usd"] == 0.0

    res = subprocess.run([sys.executable, "-m", "mergeflow", "plan", "config/della.yaml",
                          "config/judges/open_weights.yaml", "--json"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    paper = json.loads(res.stdout)
    judged = paper["judge"]["gsm8k_judge"]["models"] + paper["judge"]["alpaca_eval"]["models"]
    assert paper["judge_servers"]["starts"] == judged and paper["judge_servers"]["gpus"] == 4
    assert build_plan(mfconfig.load(ROOT / "config" / "della.yaml"), root=ROOT)["judge_servers"] is None


def test_a_missing_or_malformed_overlay_is_named(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n")
    for path, says in ((tmp_path / "nope.yaml", "config file not found"), (bad, "must be a mapping")):
        res = subprocess.run([sys.executable, "-m", "mergeflow", "plan", "config/della.yaml", str(path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and says in res.stderr and str(path) in res.stderr, res.stderr
