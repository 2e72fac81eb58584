"""`mergeflow generate`: one model's generations for one or several benchmarks (one model load)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mergeflow import gpus
from mergeflow.errors import MergeflowError

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate benchmarks' completions with a model (hf or vllm backend, resumable)",
        description="Greedy generation for every doc of a benchmark file; writes doc_id, prompt, "
        "output and completion per doc. Finished prompts go to the cache as they finish, so a rerun "
        "after a kill only generates the rest. Several benchmarks (--task, repeatable) share one "
        "model load, each with its own settings, cache and output.",
    )
    p.add_argument("--model", required=True, type=Path, help="model directory (config.json, weights, tokenizer)")
    p.add_argument("--task", nargs=5, action="append", default=[],
                   metavar=("BENCHMARK", "DATA", "SETTINGS", "CACHE", "OUT"),
                   help="a benchmark, its data file, its generation settings (JSON), its cache JSONL ('-': none) "
                   "and its output JSONL; repeatable (one model load for all). Instead of the four options below")
    p.add_argument("--benchmark", help="one benchmark: gsm8k, math, mbpp, humaneval or alpaca_eval")
    p.add_argument("--data", type=Path, help="benchmark JSONL (from `mergeflow fetch data` or the demo)")
    p.add_argument("--settings", help="generation settings: inline JSON or a JSON file")
    p.add_argument("--out", type=Path, help="output JSONL")
    p.add_argument("--cache", type=Path, default=None, help="append-only cache JSONL (resume after a kill)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    gpus.add_argument(p)
    p.set_defaults(func=run)


def _tasks(args: argparse.Namespace) -> list[tuple[str, Path, str, Path | None, Path]]:
    """(benchmark, data, settings, cache, out) per benchmark, from --task or the single form."""
    single = {"--benchmark": args.benchmark, "--data": args.data, "--settings": args.settings, "--out": args.out}
    if args.task:
        given = [flag for flag, v in {**single, "--cache": args.cache}.items() if v is not None]
        if given:
            raise MergeflowError(f"--task and {', '.join(given)} given together: name each benchmark by --task")
        tasks = [(b, Path(d), s, None if c == "-" else Path(c), Path(o)) for b, d, s, c, o in args.task]
    else:
        missing = [flag for flag, v in single.items() if v is None]
        if missing:
            raise MergeflowError(f"missing {', '.join(missing)} (or give each benchmark as --task)")
        tasks = [(args.benchmark, args.data, args.settings, args.cache, args.out)]
    outs = [str(t[4].resolve()) for t in tasks]
    dup = sorted({o for o in outs if outs.count(o) > 1})
    if dup:
        raise MergeflowError(f"--task: output {dup[0]} named twice")
    return tasks


def run(args: argparse.Namespace) -> int:
    from mergeflow import benchmarks
    from mergeflow.generation.base import resolve_decoding
    from mergeflow.generation.cache import PromptCache
    from mergeflow.generation.run import SharedBackends, generate_records, write_jsonl_atomic
    from mergeflow.generation.settings import load_settings

    gpus.prepare(args.gpus)  # before any model load: a job without its GPUs stops here
    tasks = _tasks(args)
    if not (args.model / "config.json").is_file():
        raise MergeflowError(f"--model {args.model}: not a model directory (no config.json)")
    # Every benchmark checked before the model loads: a bad last task costs no load.
    jobs = []
    for name, data, raw, cache, out in tasks:
        settings = load_settings(raw)
        bench = benchmarks.get(name)
        docs = bench.load(data, limit=settings.limit)
        jobs.append((bench, settings, docs, resolve_decoding(settings, args.model), cache, out))
    # Benchmarks that share a load run next to each other (a reload only between load keys).
    jobs.sort(key=lambda j: repr(j[3].load_key()))
    backends = SharedBackends()
    for bench, settings, docs, decoding, cache, out in jobs:
        log.info("generating %d %s docs with %s (%s, %s)", len(docs), bench.name, args.model, decoding.backend,
                 decoding.dtype)
        records = generate_records(docs, bench, settings, args.model, decoding, PromptCache(cache),
                                   backend_factory=backends, progress=not args.no_progress)
        write_jsonl_atomic(out, records)
        log.info("wrote %d records to %s", len(records), out)
    log.info("%d benchmark(s), %d model load(s)", len(jobs), backends.loads)
    return 0
