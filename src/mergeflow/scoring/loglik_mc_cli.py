"""`mergeflow loglik-mc`: one model's multiple-choice benchmarks scored by log-likelihood (lm-eval's own tasks)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mergeflow import gpus
from mergeflow.errors import MergeflowError

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "loglik-mc",
        help="score multiple-choice benchmarks (MergeBench's okapi tasks) on a model by log-likelihood, with lm-eval",
        description="Runs each benchmark's lm-eval task (its prompt, choices and acc / acc_norm, unchanged) on the "
        "model with lm-eval's hf or vllm model class, on the benchmark's rows; writes a score file and "
        "<out>.samples.jsonl per benchmark as each finishes. Every --task is checked before the model loads; "
        "log-likelihoods go to the task's cache as they are computed, so a rerun after a kill or a failure "
        "computes only the rest.",
    )
    p.add_argument("--model", required=True, type=Path, help="model directory (config.json, weights, tokenizer)")
    p.add_argument("--task", nargs=4, action="append", required=True, metavar=("BENCHMARK", "DATA", "CACHE", "OUT"),
                   help="a loglik_mc benchmark (e.g. arc_fr), its data file (JSONL in the dataset's schema), its "
                        "cache JSONL ('-': none) and its score file (.json); repeatable (one model load for all)")
    p.add_argument("--settings", default="{}", help="protocol.loglik_mc as JSON, inline or a file: backend, dtype, "
                                                    "batch_size, limit, gpu_memory_utilization")
    gpus.add_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import tempfile

    from mergeflow import benchmarks
    from mergeflow.config import parse_settings
    from mergeflow.generation.cache import PromptCache, model_fingerprint
    from mergeflow.scoring import loglik_mc, results

    gpus.prepare(args.gpus)  # before any model load: a job without its GPUs stops here
    settings = loglik_mc.LoglikSettings.from_dict(parse_settings(args.settings))
    if not (args.model / "config.json").is_file():
        raise MergeflowError(f"--model {args.model}: not a model directory (no config.json)")
    # every task checked before anything is computed or written: a bad last task costs nothing
    jobs, outs = [], set()
    for name, data, cache, out in args.task:
        bench = benchmarks.get(name)
        if bench.generates:
            raise MergeflowError(f"--task {name}: scored on generations (mergeflow score), not by log-likelihood")
        if Path(out).resolve() in outs:
            raise MergeflowError(f"--task {name}: output {out} named twice")
        outs.add(Path(out).resolve())
        docs = bench.load(Path(data), limit=settings.limit)
        if not docs:
            raise MergeflowError(f"--task {name}: no rows in {data}")
        jobs.append((bench, docs, bench.doc_ids(docs), None if cache == "-" else Path(cache), Path(out)))
    setup = loglik_mc.resolve_setup(settings, args.model)
    model = loglik_mc.SharedModel(args.model, setup, settings)
    fingerprint = model_fingerprint(args.model)
    for bench, docs, ids, cache, out in jobs:
        lm = loglik_mc.CachedLoglikelihoods(model, PromptCache(cache), fingerprint, setup)
        with tempfile.TemporaryDirectory(prefix="mergeflow-loglik-") as tmp:
            rows, details, samples = loglik_mc.score(bench, docs, ids, lm, Path(tmp))
        results.write_score(out, bench.name, loglik_mc.SCORER, rows, details, samples)
        log.info("%s: %d docs, %d log-likelihoods computed, %d from the cache; %s", bench.name, len(docs),
                 lm.computed, lm.reused, ", ".join(f"{r['metric']} = {r['value']:.4f}" for r in rows))
    log.info("%d benchmark(s), %d model load(s)", len(jobs), int(model.lm is not None))
    return 0
