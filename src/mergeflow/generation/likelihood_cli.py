"""`mergeflow likelihood`: reference-response likelihood of one model on its benchmarks."""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from mergeflow import gpus
from mergeflow.errors import MergeflowError

log = logging.getLogger(__name__)
METRIC = "ref_nll"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "likelihood",
        help="score how likely a model finds each benchmark's reference response (transformers)",
        description="Per benchmark: the mean negative log-likelihood per token of the reference "
        "responses (metric ref_nll, lower is better), the prompt built as for generation. "
        "Writes one score file with a row per benchmark and the per-doc values.",
    )
    p.add_argument("--model", required=True, type=Path, help="model directory")
    p.add_argument("--task", nargs=3, action="append", required=True, metavar=("BENCHMARK", "DATA", "SETTINGS"),
                   help="a benchmark, its data file and its generation settings (JSON); repeatable")
    p.add_argument("--out", required=True, type=Path, help="score file (JSON)")
    gpus.add_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mergeflow import atomic, benchmarks
    from mergeflow.generation.base import resolve_dtype
    from mergeflow.generation.likelihood import load_model, reference_nll
    from mergeflow.generation.settings import load_settings
    from mergeflow.generation.templates import build_prompt

    gpus.prepare(args.gpus)
    if not (args.model / "config.json").is_file():
        raise MergeflowError(f"--model {args.model}: not a model directory (no config.json)")
    tasks = []
    for name, data, raw in args.task:
        bench = benchmarks.get(name)
        if bench.reference_response is None:
            raise MergeflowError(f"benchmark {name!r} declares no reference response to score")
        settings = load_settings(raw)
        docs = bench.load(Path(data), limit=settings.limit)
        pairs = [(build_prompt(settings.template, settings.instruction, bench.fields(d)), bench.reference_response(d))
                 for d in docs]
        tasks.append((bench, docs, pairs, settings))
    dtypes = {resolve_dtype(s.dtype, "hf") for *_, s in tasks}
    if len(dtypes) > 1:
        raise MergeflowError(f"--task settings ask for several dtypes {sorted(dtypes)}: one model load has one")
    model, tokenizer, pad = load_model(args.model, dtypes.pop())
    rows, details = [], {}
    for bench, docs, pairs, settings in tasks:
        scored = reference_nll(model, tokenizer, pad, pairs, settings.batch_size)
        nll, tokens = sum(n for n, _ in scored), sum(t for _, t in scored)
        value = nll / tokens
        if not math.isfinite(value):
            raise MergeflowError(f"{args.model}: non-finite likelihood on {bench.name} (NaN/Inf weights?)")
        rows.append({"benchmark": bench.name, "metric": METRIC, "value": value, "n": len(docs), "tokens": tokens})
        details[bench.name] = [{"doc_id": bench.doc_id(d), "nll": n, "tokens": t} for d, (n, t) in zip(docs, scored)]
        log.info("%s: %s %.4f over %d tokens of %d docs", bench.name, METRIC, value, tokens, len(docs))
    payload = {"benchmark": "reference_likelihood", "scorer": "mergeflow.likelihood", "rows": rows,
               "details": {"per_doc": details}}
    atomic.write_text(args.out, json.dumps(payload, indent=1) + "\n")
    return 0
