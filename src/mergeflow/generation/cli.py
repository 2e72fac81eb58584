"""`mergeflow generate`: one benchmark's generations for one model."""

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
        help="generate a benchmark's completions with a model (hf or vllm backend, resumable)",
        description="Greedy generation for every doc of a benchmark file; writes doc_id, prompt, "
        "output and completion per doc. Finished prompts go to --cache as they finish, so a rerun "
        "after a kill only generates the rest.",
    )
    p.add_argument("--model", required=True, type=Path, help="model directory (config.json, weights, tokenizer)")
    p.add_argument("--benchmark", required=True, help="gsm8k, math, mbpp, humaneval or alpaca_eval")
    p.add_argument("--data", required=True, type=Path, help="benchmark JSONL (from `mergeflow fetch data` or the demo)")
    p.add_argument("--settings", required=True, help="generation settings: inline JSON or a JSON file")
    p.add_argument("--out", required=True, type=Path, help="output JSONL")
    p.add_argument("--cache", type=Path, default=None, help="append-only cache JSONL (resume after a kill)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    gpus.add_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mergeflow import benchmarks
    from mergeflow.generation.base import resolve_decoding
    from mergeflow.generation.cache import PromptCache
    from mergeflow.generation.run import generate_records, write_jsonl_atomic
    from mergeflow.generation.settings import load_settings

    gpus.prepare(args.gpus)  # before any model load: a job without its GPUs stops here
    settings = load_settings(args.settings)
    bench = benchmarks.get(args.benchmark)
    if not (args.model / "config.json").is_file():
        raise MergeflowError(f"--model {args.model}: not a model directory (no config.json)")
    docs = bench.load(args.data, limit=settings.limit)
    decoding = resolve_decoding(settings, args.model)
    log.info("generating %d %s docs with %s (%s, %s)", len(docs), bench.name, args.model, decoding.backend,
             decoding.dtype)
    records = generate_records(
        docs, bench, settings, args.model, decoding, PromptCache(args.cache), progress=not args.no_progress
    )
    write_jsonl_atomic(args.out, records)
    log.info("wrote %d records to %s", len(records), args.out)
    return 0
