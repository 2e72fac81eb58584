"""Every config key reaches the job that needs it: the schema walk.

Each leaf key of workflow/schemas/config.schema.yaml gets a variant of the demo config with
that key changed; a Snakemake dry run (Snakemake's Python API, tests/dry_run_jobs.py) of
the variant must list other jobs, or a job with another command or other resources. Keys
that only change the DAG (models, merges, evaluate...) count by changing the job list.
A key the schema accepts but no job reads fails here. No key acts at start-up only: the
judge preflight reads judge.endpoint, which also reaches every judging job's settings.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dry_run_jobs import dry_run_env
from mergeflow import config as mfconfig

ROOT = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
# The variants' base: the demo with merges[0] as the plain task arithmetic it sweeps (lambda
# 1.0, no grid, no select); GRID and SWEEP below make it a sweep again, key by key. Its seed
# replicates (merges[2-4].n_seeds) and the benchmarks' validation sources stay.
assert DEMO["merges"][0]["grid"] == {"lambda": [1.0, 0.7, 0.5]} and "select" in DEMO["merges"][0]
DEMO["merges"][0] = {"method": "task_arithmetic", "experts": DEMO["merges"][0]["experts"], "params": {"lambda": 1.0}}


def schema_leaves() -> list[str]:
    """Dotted paths of the schema's leaf keys: `*` stands for any name of a mapping, `[]`
    for the items of a list."""
    schema = mfconfig.load_schema()

    def resolve(node):
        while "$ref" in node:
            node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        return node

    def walk(node, path):
        node = resolve(node)
        entries = node.get("additionalProperties")
        entries = resolve(entries) if isinstance(entries, dict) else None
        if node.get("properties"):
            for key, sub in node["properties"].items():
                yield from walk(sub, f"{path}.{key}" if path else key)
            if entries is not None:
                yield from walk(entries, f"{path}.*")
        elif entries is not None and (entries.get("properties") or entries.get("additionalProperties")):
            yield from walk(entries, f"{path}.*")
        elif node.get("type") == "array" and resolve(node.get("items") or {}).get("properties"):
            yield from walk(node["items"], f"{path}[]")
        else:
            yield path

    return list(walk(schema, ""))


def put(*path_and_value):
    """A change setting config[path...] = value (value None with `...` deleting the key)."""
    *path, value = path_and_value

    def change(cfg):
        node = cfg
        for key in path[:-1]:
            node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]
        if value is ...:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = copy.deepcopy(value)
    return change


def both(*changes):
    def change(cfg):
        for c in changes:
            c(cfg)
    return change


def gen_default(key, value):
    """protocol.defaults.<key> where no benchmark overrides it."""
    def change(cfg):
        for settings in cfg["protocol"]["benchmarks"].values():
            settings.pop(key, None)
        cfg["protocol"].setdefault("defaults", {})[key] = value
    return change


def no_demo_paths(cfg):
    """Every demo path under another directory: demo.out moves the demo's files."""
    return yaml.safe_load(yaml.safe_dump(cfg).replace("resources/demo", "resources/demo2"))


D = "resources/demo"
HUB = {"hub": "org/name", "revision": "0" * 40}
BASE2 = put("models", "base2", {"path": f"{D}/models/judge"})
GEN = {"template": "alpaca", "instruction": "Q: {question}", "max_new_tokens": 40, "stop": ["\n\n"],
       "postprocess": "code", "limit": 5, "batch_size": 4, "backend": "hf", "dtype": "float32", "seed": 7,
       "vllm_chunk_size": 16, "gpu_memory_utilization": 0.5, "hf_decoding": "static"}
LOGLIK = {"backend": "hf", "dtype": "float32", "batch_size": 4, "limit": 5, "gpu_memory_utilization": 0.5}


def with_loglik_benchmark(cfg):
    """arc_fr evaluated too, so that there are loglik_mc jobs (a dry run reads no rows: any file)."""
    cfg["benchmarks"]["arc_fr"] = {"path": f"{D}/data/gsm8k.jsonl"}
    cfg["evaluate"]["benchmarks"].append("arc_fr")


# merges[0] as a sweep, without and with validation selection (merges[].select)
GRID = both(put("merges", 0, "params", "lambda", ...), put("merges", 0, "grid", {"lambda": [0.5, 1.5]}))
SWEEP = both(GRID, put("merges", 0, "select", {}))
SOURCES = {  # the sources of each kind in the demo: (path to one, another existing path)
    "models.*": (("models", "code"), f"{D}/models/lm"),
    "benchmarks.*": (("benchmarks", "gsm8k"), f"{D}/data/math.jsonl"),
    "robustness.livebench.categories.*.source": (("robustness", "livebench", "categories", "coding", "source"),
                                                 f"{D}/robustness/livebench_typos.jsonl"),
    "robustness.adversarial.tasks.*": (("robustness", "adversarial", "tasks", "sst2"), f"{D}/robustness/cola.jsonl"),
    "robustness.adversarial.mlm": (("robustness", "adversarial", "mlm"), f"{D}/models/lm"),
    "robustness.adversarial.sentence_encoder": (("robustness", "adversarial", "sentence_encoder"), f"{D}/models/lm"),
}

# key -> change, or (setup applied to both sides, change)
VARIANTS = {
    "seed": put("seed", 7),
    "demo.enabled": put("demo", "enabled", False),  # the demo's files then have no rule: refused
    "demo.seed": put("demo", "seed", 1),
    "demo.out": no_demo_paths,
    "base_model": (BASE2, put("base_model", "base2")),
    "merge.device": put("merge", "device", "cpu"),
    "merge.vocab_policy": put("merge", "vocab_policy", "pad_mean"),
    "merge.dtype": put("merge", "dtype", "bfloat16"),
    "merge.donor": put("merge", "donor", "lm"),
    "keep_merges": put("keep_merges", True),
    "merges[].method": both(put("merges", 0, "method", "average"), put("merges", 0, "params", {})),
    "merges[].experts": put("merges", 0, "experts", ["lm", "code"]),
    "merges[].params.lambda": put("merges", 0, "params", "lambda", 0.5),
    "merges[].params.weights": put("merges", 0, "params", "weights", [1.0, 0.5, 0.5]),
    "merges[].params.density": put("merges", 1, "params", "density", 0.6),
    "merges[].params.drop_rate": put("merges", 2, "params", "drop_rate", 0.4),
    "merges[].params.window_size": put("merges", 3, "params", "window_size", 0.1),
    "merges[].params.rescale": put("merges", 2, "params", "rescale", "l1"),
    "merges[].params.combine": both(put("merges", 2, "params", "combine", "task_arithmetic"),
                                    put("merges", 2, "params", "density", ...)),
    "merges[].params.trim_scope": put("merges", 1, "params", "trim_scope", "row"),
    "merges[].params.mask_rate": both(put("merges", 1, "params", "density", ...),
                                      put("merges", 1, "params", "mask_rate", 0.4)),
    "merges[].params.t": both(put("merges", 0, "method", "slerp"), put("merges", 0, "params", {"t": 0.3}),
                              put("merges", 0, "experts", ["lm", "code"])),
    "merges[].params.alpha": put("merges", 4, "params", "alpha", 0.7),
    "merges[].params.lambda_m": put("merges", 4, "params", "lambda_m", 0.3),
    "merges[].params.gamma": both(put("merges", 1, "method", "breadcrumbs"), put("merges", 1, "params", "gamma", 0.02)),
    "merges[].params.tall_mask_lambda": both(put("merges", 1, "method", "consensus_ties"),
                                             put("merges", 1, "params", "tall_mask_lambda", 0.4)),
    "merges[].params.k": (both(put("merges", 1, "method", "consensus_ties"),
                               put("merges", 1, "params", "tall_mask_lambda", 0.4)),
                          put("merges", 1, "params", "k", 1)),
    "merges[].params.select_topk": (both(put("merges", 1, "method", "sce"), put("merges", 1, "params", {})),
                                    put("merges", 1, "params", "select_topk", 0.5)),
    "merges[].params.pcb_ratio": (both(put("merges", 1, "method", "pcb"), put("merges", 1, "params", {})),
                                  put("merges", 1, "params", "pcb_ratio", 0.2)),
    "merges[].params.clamp_ratio": (both(put("merges", 1, "method", "pcb"), put("merges", 1, "params", {})),
                                    put("merges", 1, "params", "clamp_ratio", 0.01)),
    "merges[].params.common_space_fraction": (both(put("merges", 1, "method", "iso_cts"), put("merges", 1, "params", {})),
                                              put("merges", 1, "params", "common_space_fraction", 0.6)),
    "merges[].params.interpolate": (both(put("merges", 1, "method", "multislerp"), put("merges", 1, "params", {})),
                                    put("merges", 1, "params", "interpolate", "task_vectors")),
    "merges[].params.dare.drop_rate": put("merges", 4, "params", "dare", {"drop_rate": 0.5}),
    "merges[].params.dare.rescale": (put("merges", 4, "params", "dare", {"drop_rate": 0.5}),
                                     put("merges", 4, "params", "dare", "rescale", "l1")),
    "merges[].grid": both(put("merges", 0, "params", "lambda", ...), put("merges", 0, "grid", {"lambda": [0.5, 1.5]})),
    "merges[].base": (BASE2, put("merges", 0, "base", "base2")),
    "merges[].benchmarks": put("merges", 0, "benchmarks", ["gsm8k"]),
    "merges[].seed": put("merges", 0, "seed", 7),
    "merges[].seeds": both(put("merges", 2, "n_seeds", ...), put("merges", 2, "seeds", [42, 7])),  # dare: 42, 7
    "merges[].n_seeds": put("merges", 3, "n_seeds", 2),  # della: seeds 42 and 43 (not 44)
    "merges[].tag": put("merges", 0, "tag", "sweep"),
    "merges[].select.on": (GRID, put("merges", 0, "select", {"on": "validation"})),
    "merges[].select.rule": (SWEEP, put("merges", 0, "select", "rule", "mean")),
    "merges[].select.normalise_by": (SWEEP, put("merges", 0, "select", "normalise_by", "experts")),
    "validation.fraction": (SWEEP, put("validation", "fraction", 0.5)),
    "validation.seed": (SWEEP, put("validation", "seed", 3)),
    "benchmarks.*.validation.path": (SWEEP, put("benchmarks", "gsm8k", "validation", {"path": f"{D}/data/math.jsonl"})),
    "benchmarks.*.validation.hub": (SWEEP, put("benchmarks", "gsm8k", "validation", {"hub": "openai/gsm8k"})),
    "benchmarks.*.validation.revision": (both(SWEEP, put("benchmarks", "gsm8k", "validation", {"hub": "openai/gsm8k"})),
                                         put("benchmarks", "gsm8k", "validation", "revision", "0" * 40)),
    "benchmarks.*.validation.subset": (both(SWEEP, put("benchmarks", "gsm8k", "validation", {"hub": "openai/gsm8k"})),
                                       put("benchmarks", "gsm8k", "validation", "subset", "main")),
    "benchmarks.*.validation.split": (both(SWEEP, put("benchmarks", "gsm8k", "validation", {"hub": "openai/gsm8k"})),
                                      put("benchmarks", "gsm8k", "validation", "split", "train")),
    "evaluate.models": put("evaluate", "models", ["base", "lm"]),
    "evaluate.benchmarks": put("evaluate", "benchmarks", ["gsm8k"]),
    "evaluate.gsm8k_judge": put("evaluate", "gsm8k_judge", False),
    "evaluate.reference_likelihood": put("evaluate", "reference_likelihood", False),
    "benchmarks.*.package": both(put("benchmarks", "humaneval", "package", ...),
                                 put("benchmarks", "humaneval", "path", f"{D}/data/mbpp.jsonl")),
    "benchmarks.*.subset": put("benchmarks", "mbpp", "subset", "sanitized"),
    "benchmarks.*.split": put("benchmarks", "mbpp", "split", "test"),
    "protocol.name": put("protocol", "name", "other"),
    "protocol.templates": put("protocol", "templates", "vicuna", "USER: {instruction} ASSISTANT:"),
    "robustness.enabled": put("robustness", "enabled", False),
    "robustness.livebench.release_date": put("robustness", "livebench", "release_date", "2024-01-01"),
    "robustness.livebench.categories.*.experts": put("robustness", "livebench", "categories", "coding", "experts", None),
    "robustness.livebench.categories.*.source.subset": put(
        "robustness", "livebench", "categories", "coding", "source", "subset", "x"),
    "robustness.livebench.categories.*.source.split": put(
        "robustness", "livebench", "categories", "coding", "source", "split", "x"),
    "robustness.livebench.generation": put("robustness", "livebench", "generation", "max_new_tokens", 16),
    "robustness.adversarial.experts": put("robustness", "adversarial", "experts", None),
    "robustness.adversarial.tasks.*.subset": put("robustness", "adversarial", "tasks", "sst2", "subset", "x"),
    "robustness.adversarial.tasks.*.split": put("robustness", "adversarial", "tasks", "sst2", "split", "x"),
    "robustness.adversarial.settings.min_sentence_cos_sim": put(
        "robustness", "adversarial", "settings", "min_sentence_cos_sim", 0.5),
    "robustness.adversarial.settings.sentence_window": put("robustness", "adversarial", "settings", "sentence_window", 5),
    "robustness.adversarial.task_settings": put("robustness", "adversarial", "task_settings", {"sst2": {"limit": 4}}),
    "judge.endpoint.base_url": put("judge", "endpoint", "base_url", "http://127.0.0.1:9/v1"),
    "judge.endpoint.model": put("judge", "endpoint", "model", "judge2"),
    "judge.endpoint.api_key_env": put("judge", "endpoint", "api_key_env", "OTHER_KEY"),
    "judge.endpoint.launch.server": put("judge", "endpoint", "launch", "server", "vllm"),
    "judge.endpoint.launch.model": put("judge", "endpoint", "launch", "model", f"{D}/models/lm"),
    "judge.endpoint.launch.hub": put("judge", "endpoint", "launch", {"hub": "org/judge"}),
    "judge.endpoint.launch.revision": (put("judge", "endpoint", "launch", {"hub": "org/judge"}),
                                       put("judge", "endpoint", "launch", "revision", "0" * 40)),
    "judge.endpoint.launch.served_model_name": put("judge", "endpoint", "launch", "served_model_name", "j"),
    "judge.endpoint.launch.tensor_parallel_size": put("judge", "endpoint", "launch", "tensor_parallel_size", 2),
    "judge.endpoint.launch.extra_args": put("judge", "endpoint", "launch", "extra_args", ["--x"]),
    "judge.endpoint.launch.startup_timeout": put("judge", "endpoint", "launch", "startup_timeout", 30),
    "judge.endpoint.max_concurrency": put("judge", "endpoint", "max_concurrency", 3),
    "judge.endpoint.max_retries": put("judge", "endpoint", "max_retries", 3),
    "judge.endpoint.timeout": put("judge", "endpoint", "timeout", 30),
    "judge.endpoint.prices.input_per_1k": put("judge", "endpoint", "prices", {"input_per_1k": 0.001}),
    "judge.endpoint.prices.output_per_1k": put("judge", "endpoint", "prices", {"output_per_1k": 0.001}),
    "judge.paper.alpaca_eval": put("judge", "paper", {"alpaca_eval": "gpt-4"}),
    "judge.paper.gsm8k_judge": put("judge", "paper", {"gsm8k_judge": "gpt-4"}),
    "judge.alpaca_eval.annotator": put("judge", "alpaca_eval", "annotator", "alpaca_eval_gpt4.1"),
    "judge.alpaca_eval.length_controlled": put("judge", "alpaca_eval", "length_controlled", True),
    "judge.gsm8k.prompt": put("judge", "gsm8k", "prompt", "workflow/judges/gsm8k_judge.yaml"),
    "judge.agreement.alpaca_eval.recorded": put("judge", "agreement", "alpaca_eval",
                                                {"recorded": f"{D}/data/alpaca_eval.jsonl"}),
    "judge.agreement.alpaca_eval.limit": (put("judge", "agreement", "alpaca_eval",
                                              {"recorded": f"{D}/data/alpaca_eval.jsonl"}),
                                          put("judge", "agreement", "alpaca_eval", "limit", 3)),
    "judge.agreement.gsm8k.recorded": put("judge", "agreement", "gsm8k", "recorded", f"{D}/data/gsm8k.jsonl"),
    "judge.agreement.gsm8k.limit": put("judge", "agreement", "gsm8k", "limit", 3),
    "scoring.code.timeout": put("scoring", "code", "timeout", 5),
    "scoring.code.memory_mb": put("scoring", "code", "memory_mb", 512),
    "scoring.code.nproc": put("scoring", "code", "nproc", 8),
    "scoring.code.fsize_mb": put("scoring", "code", "fsize_mb", 8),
    "scoring.code.nofile": put("scoring", "code", "nofile", 64),
    "scoring.code.disk_mb": put("scoring", "code", "disk_mb", 32),
    "scoring.code.isolation": put("scoring", "code", "isolation", "none"),
    "scoring.code.max_workers": put("scoring", "code", "max_workers", 3),
    "aggregate.published": put("aggregate", "published", ["config/published/della.csv"]),
    "aggregate.claims": put("aggregate", "claims", "config/published/della_claims.csv"),
    "aggregate.headline": put("aggregate", "headline", {"gsm8k": "exact_match"}),
    "aggregate.ci_level": put("aggregate", "ci_level", 0.9),
    "aggregate.alpha": put("aggregate", "alpha", 0.01),
    "aggregate.bootstrap.resamples": put("aggregate", "bootstrap", "resamples", 500),
    "aggregate.bootstrap.seed": put("aggregate", "bootstrap", "seed", 1),
    "aggregate.own_tasks": put("aggregate", "own_tasks", {"lm": ["gsm8k"]}),
    "aggregate.normalised_average": put("aggregate", "normalised_average", "expert"),
    "resources.merge_gpus": put("resources", "merge_gpus", 1),
    "resources.generate_gpus": put("resources", "generate_gpus", 1),
    "resources.merge_mem_mb": put("resources", "merge_mem_mb", 1000),
    "resources.generate_mem_mb": put("resources", "generate_mem_mb", 1000),
    "resources.judge_gpus": put("resources", "judge_gpus", 1),
}
for _key, _value in GEN.items():
    VARIANTS[f"protocol.defaults.{_key}"] = gen_default(_key, _value)
    VARIANTS[f"protocol.benchmarks.*.{_key}"] = put("protocol", "benchmarks", "gsm8k", _key, _value)
for _key, _value in LOGLIK.items():
    VARIANTS[f"protocol.loglik_mc.{_key}"] = (with_loglik_benchmark, put("protocol", "loglik_mc", _key, _value))
for _kind, (_where, _other) in SOURCES.items():
    VARIANTS[f"{_kind}.path"] = put(*_where, {"path": _other})
    VARIANTS[f"{_kind}.hub"] = put(*_where, dict(HUB))
    VARIANTS[f"{_kind}.revision"] = (put(*_where, dict(HUB)), put(*_where, "revision", "1" * 40))

# refused with a missing input: without the demo rule nothing makes the demo's files
REFUSED = {"demo.enabled": "MissingInputException"}


def _apply(change, cfg):
    out = copy.deepcopy(cfg)
    result = change(out)
    return out if result is None else result


def variants() -> dict[str, tuple[dict, dict]]:
    """key -> (config before, config after)."""
    pairs = {}
    for key, spec in VARIANTS.items():
        setup, change = spec if isinstance(spec, tuple) else (None, spec)
        before = _apply(setup, DEMO) if setup else DEMO
        pairs[key] = (before, _apply(change, before))
    return pairs


def test_every_schema_leaf_has_a_variant():
    leaves = set(schema_leaves())
    assert leaves - set(VARIANTS) == set(), "schema keys without a variant here"
    assert set(VARIANTS) - leaves == set(), "variants of keys the schema no longer has"
    assert all(before != after for before, after in variants().values())


def dry_runs(configs: list[dict], tmp_path: Path, overrides: list[dict] | None = None) -> list[dict]:
    """Jobs of a dry run of each config (each with its --config overrides)."""
    files, runs = {}, []
    for i, cfg in enumerate(configs):
        text = yaml.safe_dump(cfg, sort_keys=True)
        if text not in files:
            files[text] = tmp_path / f"variant{len(files)}.yaml"
            files[text].write_text(text)
        runs.append({"configfiles": [str(files[text])], "config": (overrides or [{}] * len(configs))[i]})
    # distinct runs only, split over two processes (each keeps Snakemake imported)
    unique = list({json.dumps(r, sort_keys=True): r for r in runs}.values())
    chunks = [unique[i::2] for i in range(2) if unique[i::2]]
    procs = []
    for i, chunk in enumerate(chunks):
        spec, out = tmp_path / f"runs{i}.json", tmp_path / f"jobs{i}.json"
        spec.write_text(json.dumps(chunk))
        procs.append((subprocess.Popen([sys.executable, str(ROOT / "tests" / "dry_run_jobs.py"), str(spec), str(out)],
                                       cwd=ROOT, env=dry_run_env()), chunk, out))
    found = {}
    for proc, chunk, out in procs:
        assert proc.wait(timeout=1200) == 0
        for run, jobs in zip(chunk, json.loads(out.read_text())):
            found[json.dumps(run, sort_keys=True)] = jobs
    return [found[json.dumps(r, sort_keys=True)] for r in runs]


def changed_jobs(before: dict, after: dict) -> set[str]:
    return {job for job in before.keys() | after.keys() if before.get(job) != after.get(job)}


@pytest.mark.slow
def test_every_config_key_changes_some_job(tmp_path):
    pairs = variants()
    runs = dry_runs([cfg for pair in pairs.values() for cfg in pair], tmp_path)
    silent, broken = [], []
    for i, (key, _) in enumerate(pairs.items()):
        before, after = runs[2 * i], runs[2 * i + 1]
        if "error" in before:
            broken.append(f"{key} (before): {before['error'][:300]}")
        elif "error" in after:
            if REFUSED.get(key, "\0") not in after["error"]:
                broken.append(f"{key}: {after['error'][:300]}")
        elif not changed_jobs(before, after):
            silent.append(key)
    assert not broken, "\n".join(broken)
    assert not silent, f"config keys that change no job: {silent}"


@pytest.mark.slow
def test_an_aggregate_setting_reruns_the_aggregate_and_nothing_else(tmp_path):
    # a --config override: the aggregate's slice comes from the config Snakemake merged
    before, after = dry_runs([DEMO, DEMO], tmp_path, [{}, {"aggregate": {"headline": {"gsm8k": "exact_match"}}}])
    assert {after[j]["rule"] for j in changed_jobs(before, after)} == {"aggregate"}
