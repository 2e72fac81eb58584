"""`mergeflow plan CONFIG [OVERLAY ...]`: what a config will run and cost, before anything is submitted.

Counts jobs with the functions the workflow's rules use (mergeflow.config: evaluated models,
per-merge benchmarks; tests/test_plan.py checks the counts against a Snakemake dry run),
sizes checkpoints from disk or from benchmarks/rates.yaml, and turns the
per-stage rates in benchmarks/rates.yaml (each with its source) into GPU-hours and judge cost.
Light: yaml and jsonschema only, no Snakemake.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import yaml

from mergeflow import benchmarks as mfbenchmarks
from mergeflow import config as mfconfig
from mergeflow import selection
from mergeflow.errors import MergeflowError

RATES_PATH = mfconfig.REPO_ROOT / "benchmarks" / "rates.yaml"
PROFILE_PATH = mfconfig.REPO_ROOT / "workflow" / "profiles" / "slurm" / "profile.yaml"
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def load_rates(path: Path = RATES_PATH) -> dict:
    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise MergeflowError(f"rates file {path} is unreadable: {err}") from err


# --- what the workflow schedules (the rules use the same mfconfig functions) ---------------


def doc_count(cfg: dict, benchmark: str, root: Path) -> int:
    """Docs a generate (or loglik_mc) job of `benchmark` runs: the registry's size (or the local
    file's rows), capped by `limit`."""
    source = cfg["benchmarks"][benchmark]
    n = mfbenchmarks.get(benchmark).size_of(source)
    if n is None and "path" in source:
        path = root / source["path"]
        if path.is_file():
            n = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        elif _demo_asset(cfg, source):
            from mergeflow.demo.data import FAMILIES, validation_file
            from mergeflow.demo.models import FULL

            own_validation = {Path(cfg["demo"]["out"]) / validation_file(b) for b in FAMILIES}
            n = FULL.n_validation if Path(source["path"]) in own_validation else FULL.n_test
    if n is None:
        raise MergeflowError(f"config key 'benchmarks.{benchmark}': size unknown (not in the benchmark registry "
                             "and no local file yet); for a demo config, build the demo data first")
    generated = mfbenchmarks.get(benchmark).generates
    limit = (mfconfig.generation_settings(cfg, benchmark) if generated else mfconfig.loglik_mc_settings(cfg))["limit"]
    return min(n, limit) if limit else n


def _demo_asset(cfg: dict, source: dict) -> bool:
    """A source the demo stage builds (its declared shape stands in until it exists)."""
    out = Path(cfg["demo"]["out"])
    return bool(cfg["demo"]["enabled"]) and "path" in source and out in Path(source["path"]).parents


# --- checkpoint sizes --------------------------------------------------------------------


def _params_from_config(cfg_json: dict) -> int | None:
    """Parameters of a Llama-shaped decoder from its config.json (embeddings, layers, head)."""
    try:
        h, layers, inter, vocab = (cfg_json[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                        "vocab_size"))
    except KeyError:
        return None
    heads = cfg_json.get("num_attention_heads", 1)
    kv = cfg_json.get("num_key_value_heads", heads)
    attn = 2 * h * h + 2 * h * (h * kv // heads)
    per_layer = attn + 3 * h * inter + 2 * h
    head = 0 if cfg_json.get("tie_word_embeddings") else vocab * h
    return vocab * h + layers * per_layer + h + head


def model_size(cfg: dict, name: str, rates: dict, root: Path) -> tuple[int, float, str]:
    """Bytes and parameters of a source checkpoint, and where they were found."""
    source = cfg["models"][name]
    folder = root / (source["path"] if "path" in source else f"resources/models/{name}")
    cfg_json = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    dtype_bytes = DTYPE_BYTES.get(cfg_json.get("torch_dtype") or cfg_json.get("dtype") or "float32", 4)
    weights = [p for p in folder.glob("*") if p.suffix in WEIGHT_SUFFIXES] if folder.is_dir() else []
    if weights:
        size = sum(p.stat().st_size for p in weights)
        return size, size / dtype_bytes, f"weights in {folder}"
    params = _params_from_config(cfg_json) if cfg_json else None
    if params:
        return params * dtype_bytes, params, f"{folder}/config.json ({params / 1e9:.2f} G params)"
    if _demo_asset(cfg, source):
        from mergeflow.demo.models import FULL

        zoo = {"hidden_size": FULL.hidden_size, "num_hidden_layers": FULL.num_layers, "vocab_size": FULL.vocab_size,
               "intermediate_size": FULL.intermediate_size, "num_attention_heads": FULL.num_heads}
        params = _params_from_config(zoo)
        return params * 4, params, "the demo zoo's declared shape (mergeflow.demo.models.FULL, float32; not built yet)"
    known = (rates.get("models") or {}).get(source.get("hub"))
    if known:
        params = known["params_b"] * 1e9
        return int(params * DTYPE_BYTES[known["dtype"]]), params, "benchmarks/rates.yaml (models)"
    raise MergeflowError(f"config key 'models.{name}': checkpoint size unknown (no weights or config.json in "
                         f"{folder}, and not under 'models' in {RATES_PATH.name}); fetch it or add it there")


# --- the plan ------------------------------------------------------------------------------


def _step_s(table: dict, batch: int) -> float:
    nearest = min(table, key=lambda b: (abs(int(b) - batch), int(b)))
    return float(table[nearest])


def _first_value(sweep, specs: dict) -> list[str]:
    """A sweep's first grid value's members (one per seed): what its test side costs, whichever
    value the selection picks."""
    first = specs[sweep.members[0]].params
    return [m for m in sweep.members if specs[m].params == first]


def _split_counts(cfg: dict, bench: str, root: Path, fraction: float) -> tuple[int, int]:
    """(test docs, validation docs) of a split benchmark: its own validation split (all rows
    test) or the seeded split of its rows."""
    n = doc_count(cfg, bench, root)
    own = cfg["benchmarks"][bench].get("validation")
    if own:
        return n, doc_count({**cfg, "benchmarks": {**cfg["benchmarks"], bench: own}}, bench, root)
    n_val = selection.validation_size(n, fraction)
    return n - n_val, n_val


def _generation(cfg: dict, work: dict, params_of: dict, rates: dict, gpu: bool):
    """(jobs, prompts, per-benchmark rows, backends, GPU-seconds) of generating
    work = {model: [(benchmark, docs)]}: one job per model, one engine start per backend."""
    gen_rates = rates["generation"]
    per_bench = {}
    generate_jobs = prompts = 0
    gen_gpu_s = 0.0
    backends = set()
    for model, benches in work.items():
        params_b = params_of[model] / 1e9
        if benches:
            generate_jobs += 1  # one job per model: its benchmarks share one model load (issue 21)
        started = set()  # backends this model's job starts: one engine start each
        for bench, n in benches:
            settings = mfconfig.generation_settings(cfg, bench)
            prompts += n
            row = per_bench.setdefault(bench, {"models": 0, "prompts": 0, "docs_per_job": n,
                                               "max_new_tokens": settings["max_new_tokens"],
                                               "batch_size": settings["batch_size"]})
            row["models"] += 1
            row["prompts"] += n
            backend = settings["backend"]
            if backend == "auto":
                backend = "vllm" if gpu else "hf"
            backends.add(backend)
            if not gpu:
                continue
            scale = params_b / gen_rates["transformers"]["reference_params_b"]
            if backend == "vllm":
                decode = n * settings["max_new_tokens"] / gen_rates["vllm"]["tokens_per_s"] * scale
            else:
                # hf_decoding auto is compiled on a GPU (generation/base.py); static runs uncompiled
                compiled = settings.get("hf_decoding", "auto") in ("auto", "compiled")
                hf_rates = gen_rates["transformers_compiled" if compiled else "transformers"]
                steps = math.ceil(n / settings["batch_size"]) * settings["max_new_tokens"]
                decode = steps * _step_s(hf_rates["step_s"], settings["batch_size"]) * scale
                if compiled and ("hf", settings["batch_size"]) not in started:  # one compilation per batch shape
                    decode += hf_rates["compile_s"]
                    started.add(("hf", settings["batch_size"]))
            start = 0.0 if backend in started else gen_rates["engine_start_s"]["vllm" if backend == "vllm" else "transformers"]
            started.add(backend)
            gen_gpu_s += (decode + start) * cfg["resources"]["generate_gpus"]
    return generate_jobs, prompts, per_bench, backends, gen_gpu_s


def _loglik(cfg: dict, work: dict, params_of: dict, rates: dict, gpu: bool):
    """(jobs, docs, per-benchmark rows, GPU-seconds) of scoring work = {model: [(benchmark, docs)]}
    by log-likelihood: one job per model (rule loglik_mc), charged docs at the loglik_mc rate."""
    rate = rates["loglik_mc"]
    jobs = docs = 0
    per_bench: dict[str, dict] = {}
    gpu_s = 0.0
    for model, benches in work.items():
        jobs += bool(benches)
        for bench, n in benches:
            docs += n
            row = per_bench.setdefault(bench, {"models": 0, "docs_per_job": n, "docs": 0})
            row["models"] += 1
            row["docs"] += n
            if gpu:
                scale = params_of[model] / 1e9 / rate["reference_params_b"]
                gpu_s += n / rate["docs_per_s"] * scale * cfg["resources"]["generate_gpus"]
    return jobs, docs, per_bench, gpu_s


def build_plan(cfg: dict, *, root: Path = mfconfig.REPO_ROOT, rates: dict | None = None,
               concurrent: int | None = None) -> dict:
    rates = rates or load_rates()
    specs = mfconfig.merge_specs(cfg)
    models = mfconfig.eval_models(cfg, specs)
    if concurrent is None:
        concurrent = int((yaml.safe_load(PROFILE_PATH.read_text()) or {}).get("jobs", 1))
    gpu = cfg["resources"]["generate_gpus"] > 0
    merge_gpu = cfg["resources"]["merge_gpus"] > 0

    # sizes
    sources = {name: model_size(cfg, name, rates, root) for name in cfg["models"]}
    merge_dtype = cfg["merge"].get("dtype")
    # a merge has its base's shape, in merge.dtype (null: the base's dtype)
    merge_sizes = {m: (int(sources[s.base][1] * DTYPE_BYTES[merge_dtype]) if merge_dtype else sources[s.base][0])
                   for m, s in specs.items()}
    params_of = {**{n: p for n, (_, p, _) in sources.items()}, **{m: sources[s.base][1] for m, s in specs.items()}}
    largest_merge = max(merge_sizes.values(), default=0)
    sources_bytes = sum(b for b, _, _ in sources.values())
    alive = min(len(specs), concurrent)

    # validation-selected sweeps (docs/selection.md): every grid member merged and evaluated on
    # the validation rows; on test, the chosen value's seeds alone (counted as the first value's)
    sweeps = selection.sweeps(cfg, specs)
    members = {m for sw in sweeps.values() for m in sw.members}
    chosen = [m for sw in sweeps.values() for m in _first_value(sw, specs)]
    test_models = [m for m in models if m not in members] + chosen
    split = {b for sw in sweeps.values() for b in sw.benchmarks}
    val_benches = selection.validation_benchmarks(sweeps)  # member -> its benchmarks on validation rows
    fraction = (cfg.get("validation") or {}).get("fraction", selection.SPLIT_DEFAULTS["fraction"])
    counts = {}  # benchmark -> (test docs, validation docs)
    for model in set(test_models) | set(val_benches):
        for bench in mfconfig.benchmarks_of(cfg, model, specs):
            if bench not in counts:
                counts[bench] = _split_counts(cfg, bench, root, fraction) if bench in split else (
                    doc_count(cfg, bench, root), 0)

    # generation
    test_work = {m: [(b, counts[b][0]) for b in mfconfig.generated_benchmarks(cfg, m, specs)] for m in test_models}
    generate_jobs, prompts, per_bench, backends, gen_gpu_s = _generation(cfg, test_work, params_of, rates, gpu)
    val_work = {m: [(b, counts[b][1]) for b in benches] for m, benches in val_benches.items()}
    val_jobs, val_prompts, _, val_backends, val_gpu_s = _generation(cfg, val_work, params_of, rates, gpu)
    backends |= val_backends
    gen_gpu_s += val_gpu_s
    models = test_models

    # log-likelihood multiple choice (rule loglik_mc; never on validation rows: mergeflow.config)
    loglik_work = {m: [(b, counts[b][0]) for b in mfconfig.loglik_benchmarks_of(cfg, m, specs)] for m in models}
    loglik_jobs, loglik_docs, loglik_bench, loglik_gpu_s = _loglik(cfg, loglik_work, params_of, rates, gpu)
    loglik_backend = mfconfig.loglik_mc_settings(cfg)["backend"]
    if loglik_backend == "auto":
        loglik_backend = "vllm" if gpu else "hf"

    # likelihood
    lik = rates["likelihood"]
    likelihood_jobs = lik_gpu_s = 0
    if cfg["evaluate"]["reference_likelihood"]:
        for model in models:
            benches = [b for b in mfconfig.benchmarks_of(cfg, model, specs) if mfbenchmarks.get(b).reference_response is not None]
            if benches:
                likelihood_jobs += 1
                if gpu:
                    docs = sum(counts[b][0] for b in benches)
                    lik_gpu_s += math.ceil(docs / lik["batch_size"]) * lik["step_s"] * cfg["resources"]["generate_gpus"]

    # merges
    merge_gpu_s = 0.0
    merged = list(specs) + chosen  # the chosen members are merged again for test
    if merge_gpu:
        for m in merged:
            spec = specs[m]
            params = params_of[m] * (len(spec.experts) + 2)  # read base + experts, write one
            merge_gpu_s += params / rates["merge"]["params_per_s"] * cfg["resources"]["merge_gpus"]

    # judging
    judge = _judge_plan(cfg, models, root, rates, specs)
    servers = _judge_servers(cfg, judge, rates, sum("alpaca_eval" in b for b in val_benches.values()))
    server_gpu_s = servers["gpu_s"] if servers else 0.0

    return {
        "config": cfg.get("protocol", {}).get("name"),
        "merges": len(merged),
        "models_evaluated": len(models),
        "validation": {"sweeps": len(sweeps), "members": len(members), "merge_jobs": len(members),
                       "generate_jobs": val_jobs, "prompts": val_prompts,
                       "split_benchmarks": {b: {"test": counts[b][0], "validation": counts[b][1]}
                                            for b in sorted(split)}},
        "generate_jobs": generate_jobs,
        "prompts": prompts,
        "benchmarks": per_bench,
        "likelihood_jobs": likelihood_jobs,
        "loglik_mc_jobs": loglik_jobs,
        "loglik_mc_docs": loglik_docs,
        "loglik_mc_backend": loglik_backend if loglik_jobs else None,
        "loglik_mc": loglik_bench,
        "backends": sorted(backends),
        "judge": judge,
        "judge_servers": servers,
        "disk": {
            "sources_bytes": sources_bytes,
            "sources": {n: {"bytes": b, "from": how} for n, (b, _, how) in sources.items()},
            "checkpoint_bytes": largest_merge,
            "concurrent_jobs": concurrent,
            "peak_bytes": sources_bytes + alive * largest_merge,
            "peak_bytes_keep_merges": sources_bytes + sum(merge_sizes.values()),
            "keep_merges": cfg["keep_merges"],
        },
        "gpu_hours": {
            "merge": merge_gpu_s / 3600,
            "generate": gen_gpu_s / 3600,
            "likelihood": lik_gpu_s / 3600,
            "loglik_mc": loglik_gpu_s / 3600,
            "judge_server_starts": server_gpu_s / 3600,
            "total": (merge_gpu_s + gen_gpu_s + lik_gpu_s + loglik_gpu_s + server_gpu_s) / 3600,
        },
        "rates": _rate_sources(rates, backends if gpu else set(), loglik=bool(loglik_jobs and gpu),
                               judge_server=servers["server"] if servers else None),
    }


def _judge_prices(cfg: dict, kind: str) -> dict:
    return {**(cfg["judge"]["endpoint"].get("prices") or {}), **((cfg["judge"].get(kind) or {}).get("prices") or {})}


def _judge_plan(cfg: dict, models: list[str], root: Path, rates: dict, specs: dict) -> dict:
    tokens = rates["judge_tokens"]
    out = {}
    launch = cfg["judge"]["endpoint"].get("launch")
    if cfg["evaluate"]["gsm8k_judge"]:
        models_g = [m for m in models if "gsm8k" in mfconfig.benchmarks_of(cfg, m, specs)]
        if models_g:
            n = doc_count(cfg, "gsm8k", root)
            prompt_file = root / cfg["judge"]["gsm8k"]["prompt"]
            prompt = yaml.safe_load(prompt_file.read_text()) if prompt_file.is_file() else {}
            template_tokens = (len(prompt.get("system", "")) + len(prompt.get("user", ""))) // 4
            max_new = mfconfig.generation_settings(cfg, "gsm8k")["max_new_tokens"]
            per_in = template_tokens + tokens["gsm8k_judge"]["question_and_reference"] + max_new
            out["gsm8k_judge"] = _cost(len(models_g) * n, per_in, tokens["gsm8k_judge"]["output"],
                                       _judge_prices(cfg, "gsm8k"), launch, len(models_g), n)
    models_a = [m for m in models if "alpaca_eval" in mfconfig.benchmarks_of(cfg, m, specs)]
    if models_a:
        n = doc_count(cfg, "alpaca_eval", root)
        annotator = str(cfg["judge"]["alpaca_eval"].get("annotator", ""))
        t = tokens["alpaca_eval"]
        output = t["output_weighted"] if Path(annotator).name.startswith("weighted") else t["output"]
        out["alpaca_eval"] = _cost(len(models_a) * n, t["input"], output, _judge_prices(cfg, "alpaca_eval"), launch,
                                   len(models_a), n)
    endpoint = cfg["judge"]["endpoint"]
    judge_model = (f"{launch.get('server') or 'transformers'} serve {launch.get('hub') or launch.get('model')}"
                   if launch else endpoint.get("model"))
    paper = cfg["judge"].get("paper") or {}
    for kind, row in out.items():
        row["judge"] = judge_model if kind == "gsm8k_judge" else (
            f"{cfg['judge']['alpaca_eval'].get('annotator')} ({judge_model})")
        row["paper_judge"] = paper.get(kind)
    return out


def _judge_servers(cfg: dict, judge: dict, rates: dict, validation_judged: int) -> dict | None:
    """A launched judge's server starts: one per judging job (a model's GSM8K judging, its
    AlpacaEval judging on test and on validation rows, each agreement source), each on
    resources.judge_gpus GPUs."""
    launch = cfg["judge"]["endpoint"].get("launch")
    if not launch:
        return None
    server = launch.get("server") or "transformers"
    starts = sum(row["models"] for row in judge.values()) + validation_judged + len(cfg["judge"].get("agreement") or {})
    start_s = rates["judge_server"]["start_s"][server]
    gpus = cfg["resources"].get("judge_gpus", 0)
    return {"server": server, "starts": starts, "start_s": start_s, "gpus": gpus, "gpu_s": starts * start_s * gpus}


def _cost(requests: int, tokens_in: int, tokens_out: int, prices: dict, launch, models: int, per_model: int) -> dict:
    row = {"models": models, "per_model": per_model, "requests": requests, "input_tokens": requests * tokens_in,
           "output_tokens": requests * tokens_out, "cost_usd": None}
    if launch:
        row["cost_usd"] = 0.0  # a judge served on our own GPUs
    elif prices:
        row["cost_usd"] = (row["input_tokens"] * prices.get("input_per_1k", 0)
                           + row["output_tokens"] * prices.get("output_per_1k", 0)) / 1000
    return row


def _rate_sources(rates: dict, backends: set[str], loglik: bool = False, judge_server: str | None = None) -> list[dict]:
    used = [("merge", rates["merge"]), ("likelihood", rates["likelihood"]),
            ("engine start", rates["generation"]["engine_start_s"])]
    if "hf" in backends:
        used.append(("generate (transformers)", rates["generation"]["transformers"]))
        used.append(("generate (transformers, compiled)", rates["generation"]["transformers_compiled"]))
    if "vllm" in backends:
        used.append(("generate (vLLM)", rates["generation"]["vllm"]))
    if loglik:
        used.append(("loglik_mc", rates["loglik_mc"]))
    if judge_server:
        used.append((f"judge server start ({judge_server})", rates["judge_server"]))
    used += [("judge tokens: alpaca_eval", rates["judge_tokens"]["alpaca_eval"]),
             ("judge tokens: gsm8k_judge", rates["judge_tokens"]["gsm8k_judge"])]
    return [{"stage": stage, "kind": r["kind"], "source": r["source"]} for stage, r in used]


# --- output --------------------------------------------------------------------------------


def _gb(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 1e3:,.1f} kB"


def render(plan: dict) -> str:
    d, g = plan["disk"], plan["gpu_hours"]
    lines = [
        f"plan of config '{plan['config']}'",
        "",
        f"  merges                    {plan['merges']:>8}",
        f"  models evaluated          {plan['models_evaluated']:>8}",
        f"  generate jobs             {plan['generate_jobs']:>8}   (one per model; {plan['prompts']:,} prompts; backend {', '.join(plan['backends'])})",
        f"  likelihood jobs           {plan['likelihood_jobs']:>8}",
        f"  loglik_mc jobs            {plan['loglik_mc_jobs']:>8}"
        + (f"   (one per model; {plan['loglik_mc_docs']:,} docs of {len(plan['loglik_mc'])} benchmarks; "
           f"backend {plan['loglik_mc_backend']})" if plan["loglik_mc_jobs"] else ""),
    ]
    v = plan["validation"]
    if v["sweeps"]:
        lines += [
            f"  validation sweeps         {v['sweeps']:>8}   ({v['members']} grid members merged and generated on "
            f"validation rows: {v['generate_jobs']} generate jobs, {v['prompts']:,} prompts; on test, each sweep's "
            "chosen value, counted as its first)",
            "  split benchmarks: " + ", ".join(f"{b} {r['test']} test / {r['validation']} validation docs"
                                               for b, r in v["split_benchmarks"].items()),
        ]
    lines += [
        "",
        "  benchmark    models  docs/model  prompts  max_new_tokens  batch",
    ]
    for bench, row in plan["benchmarks"].items():
        lines.append(f"  {bench:<13}{row['models']:>6}{row['docs_per_job']:>12}{row['prompts']:>9}"
                     f"{row['max_new_tokens']:>16}{row['batch_size']:>7}")
    if plan["loglik_mc"]:
        lines += ["", "  loglik_mc    models  docs/model     docs"]
        for bench, row in plan["loglik_mc"].items():
            lines.append(f"  {bench:<13}{row['models']:>6}{row['docs_per_job']:>12}{row['docs']:>9}")
    lines += ["", "  judge          models  calls/model    calls   input tok  output tok   cost"]
    for kind, row in plan["judge"].items():
        cost = "unpriced" if row["cost_usd"] is None else f"${row['cost_usd']:,.2f}"
        lines.append(f"  {kind:<13}{row['models']:>8}{row['per_model']:>13}{row['requests']:>9}"
                     f"{row['input_tokens']:>12,}{row['output_tokens']:>12,}   {cost}")
    for kind, row in plan["judge"].items():
        lines.append(f"  {kind:<13}judged by {row['judge']}"
                     + (f"; the paper used {row['paper_judge']}" if row["paper_judge"] else ""))
    total_cost = sum(r["cost_usd"] or 0 for r in plan["judge"].values())
    js = plan["judge_servers"]
    if js:
        lines.append(f"  judge servers: {js['starts']} starts of `{js['server']} serve` (one per judging job), "
                     + (f"{js['start_s']} s each on {js['gpus']} GPUs: {js['gpu_s'] / 3600:,.1f} GPU-hours of start-up "
                        "(judging itself not estimated)" if js["gpus"] else "on the CPU"))
    lines += [
        f"  judge cost total: ${total_cost:,.2f} (configured prices; a GSM8K answer is charged its max_new_tokens)",
        "",
        f"  disk: sources {_gb(d['sources_bytes'])}, one merged checkpoint {_gb(d['checkpoint_bytes'])}",
        f"    peak, merges temporary (keep_merges: false): {_gb(d['peak_bytes'])} "
        f"(sources + {min(plan['merges'], d['concurrent_jobs'])} checkpoints alive at {d['concurrent_jobs']} concurrent jobs)",
        f"    peak, keep_merges: true:                      {_gb(d['peak_bytes_keep_merges'])}"
        f"{'   <- this config' if d['keep_merges'] else ''}",
        "",
        f"  GPU-hours: merge {g['merge']:,.1f}, generate {g['generate']:,.1f}, likelihood {g['likelihood']:,.1f}, "
        f"loglik_mc {g['loglik_mc']:,.1f}, judge server starts {g['judge_server_starts']:,.1f}, total {g['total']:,.1f}"
        + ("   (upper bound: every prompt decodes its full max_new_tokens"
           + ("; loglik_mc at the whole-run rate" if g["loglik_mc"] else "") + ")" if g["total"]
                                      else "   (no GPU in this config's resources)"),
        "",
        "  rates (benchmarks/rates.yaml):",
    ]
    for r in plan["rates"]:
        lines.append(f"    {r['stage']}: {r['kind']} - {r['source']}")
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="print the jobs, judge calls, peak disk, GPU-hours and judge cost of a config",
                              description="Plan a config before submitting it (no Snakemake needed).")
    p.add_argument("config", type=Path, nargs="+",
                   help="config file (e.g. config/della.yaml), then any overlays (config/judges/open_weights.yaml), "
                        "merged left to right as Snakemake merges --configfile files")
    p.add_argument("--jobs", type=int, default=None,
                   help="jobs running at once (default: the SLURM profile's `jobs`)")
    p.add_argument("--rates", type=Path, default=RATES_PATH, help="per-stage rates file")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = mfconfig.load(*args.config)
    plan = build_plan(cfg, root=Path.cwd(), rates=load_rates(args.rates), concurrent=args.jobs)
    print(json.dumps(plan, indent=2) if args.json else render(plan))
    return 0
