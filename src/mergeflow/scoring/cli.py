"""`mergeflow score`: score stored generations of one benchmark, with the scorer the
benchmark declares (mergeflow.benchmarks):

lm_eval     -> lm-eval replay (lm_eval_replay.py)
execution   -> sandboxed execution, pass@1 (code_exec.py, sandbox.py)
alpaca_eval -> alpaca_eval win rate against the configured judge (alpaca.py)

(loglik_mc benchmarks have no generations: `mergeflow loglik-mc`, loglik_mc_cli.py, scores them.)
"""

from __future__ import annotations

import argparse
import logging

from mergeflow import benchmarks, gpus

log = logging.getLogger(__name__)

# declared by each benchmark; those scored on log-likelihoods are `mergeflow loglik-mc`'s (no generations)
SCORERS = {name: benchmarks.get(name).scorer for name in benchmarks.NAMES if benchmarks.get(name).generates}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("score", help="score a benchmark's stored generations")
    parser.add_argument("--benchmark", required=True, choices=sorted(SCORERS))
    parser.add_argument("--data", required=True, help="benchmark data file (.jsonl)")
    parser.add_argument("--generations", required=True, help="generation records (.jsonl)")
    parser.add_argument("--settings", default="{}",
                        help="JSON object or file: sandbox limits for code, judge settings for alpaca_eval")
    parser.add_argument("--out", required=True, help="score file to write (.json); details go to <out>.samples.jsonl")
    gpus.add_argument(parser)  # alpaca_eval with a judge server launched on the job's GPU
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mergeflow import benchmarks
    from mergeflow.scoring import results

    from mergeflow import config as mfconfig

    gpus.prepare(args.gpus)
    settings = mfconfig.parse_settings(args.settings)
    bench = benchmarks.get(args.benchmark)
    docs = bench.load(args.data)
    ids = [bench.doc_id(d) for d in docs]
    generations = results.read_generations(args.generations)
    pairs = results.pair_with_docs(docs, ids, generations, args.data)
    scorer = SCORERS[args.benchmark]
    log.info("scoring %d %s generations with %s", len(pairs), args.benchmark, scorer)
    if scorer == "lm_eval":
        from mergeflow.scoring import lm_eval_replay

        rows, details, samples = lm_eval_replay.score(args.benchmark, pairs, bench.doc_id, bench.reference_answer,
                                                      settings)
    elif scorer == "execution":
        from mergeflow.scoring import code_exec

        rows, details, samples = code_exec.score(pairs, bench.program, bench.doc_id, settings)
    else:
        from mergeflow.scoring import alpaca

        row_of = {doc_id: i for i, doc_id in enumerate(ids)}
        rows, details, samples = alpaca.score(pairs, bench.doc_id, settings, out=args.out,
                                              positions=[row_of[bench.doc_id(d)] for d, _ in pairs])
    results.write_score(args.out, args.benchmark, scorer, rows, details, samples, generations=generations)
    for row in rows:
        log.info("%s %s = %s (n=%s)", args.benchmark, row["metric"], row["value"], row["n"])
    return 0
