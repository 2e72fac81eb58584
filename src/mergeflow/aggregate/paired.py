"""`mergeflow compare`: a paired test of two models' score files on the documents both scored."""

from __future__ import annotations

import json
from pathlib import Path

from mergeflow.errors import MergeflowError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="paired test of two models on the same documents (McNemar or paired bootstrap)",
        description="For each metric both score files report (or --metric): the difference A - B on the "
        "documents both scored, with the exact McNemar test for 0/1 outcomes and the paired bootstrap "
        "otherwise, from the per-doc results beside each score file (<score>.samples.jsonl).")
    p.add_argument("a", type=Path, help="score file of model A (results/scores/<model>/<benchmark>.json)")
    p.add_argument("b", type=Path, help="score file of model B, same benchmark")
    p.add_argument("--metric", help="only this metric (default: every metric both files have per-doc results for)")
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the bootstrap interval (0.95)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (0)")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.set_defaults(func=run)


def run(args) -> int:
    from mergeflow.aggregate.uncertainty import compare, score_file_per_doc

    if not 0 < args.level < 1:
        raise MergeflowError(f"--level must lie in (0, 1), got {args.level}")
    if args.resamples < 1:
        raise MergeflowError(f"--resamples must be positive, got {args.resamples}")
    a, b = score_file_per_doc(args.a), score_file_per_doc(args.b)
    by_metric_a = {(bench, metric): v for (_m, bench, metric), v in a.items()}
    by_metric_b = {(bench, metric): v for (_m, bench, metric), v in b.items()}
    keys = [k for k in by_metric_a if k in by_metric_b and (args.metric is None or k[1] == args.metric)]
    if not keys:
        wanted = f"metric {args.metric!r}" if args.metric else "any metric"
        raise MergeflowError(f"{args.a} and {args.b} share no per-doc results for {wanted} "
                             "(same benchmark? <score>.samples.jsonl beside both?)")
    settings = {"ci_level": args.level, "bootstrap": {"resamples": args.resamples, "seed": args.seed}}
    results = []
    for bench, metric in keys:
        res = {"a": str(args.a), "b": str(args.b), "benchmark": bench, "metric": metric,
               **compare(by_metric_a[(bench, metric)], by_metric_b[(bench, metric)], settings)}
        results.append(res)
        diff = "–" if res["diff"] is None else f"{res['diff']:+.4g}"
        p = "–" if res["p"] is None else f"{res['p']:.4g}"
        interval = f" [{res['low']:+.4g}, {res['high']:+.4g}]" if "low" in res else ""
        print(f"{bench} {metric}: A - B = {diff}{interval}, {res['test']} p = {p} "
              f"(n = {res['n_common']} common documents; {res['note']})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0
