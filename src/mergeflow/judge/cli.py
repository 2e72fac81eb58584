"""`mergeflow judge gsm8k ...` (DELLA's LLM-judge protocol), `judge alpaca_eval`, `judge preflight`,
`judge agreement` (a judge against recorded judgments) and `judge serve ...`."""

from __future__ import annotations

import argparse
import logging

from mergeflow import gpus

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "judge", help="LLM judge: GSM8K judging, agreement with recorded judgments, local judge server")
    sub = parser.add_subparsers(dest="judge_command", required=True, metavar="JUDGE_COMMAND")

    def judging(name, help, data, settings, func):
        p = sub.add_parser(name, help=help)
        p.add_argument("--data", required=True, help=f"{data} data file (.jsonl)")
        p.add_argument("--generations", required=True, help="generation records (.jsonl)")
        p.add_argument("--settings", required=True, help=f"judge settings{settings}: JSON object or file")
        p.add_argument("--out", required=True, help="score file to write (.json)")
        gpus.add_argument(p)  # for a judge server launched on the job's GPU(s)
        p.set_defaults(func=func)

    judging("gsm8k", "judge GSM8K responses against the reference solution (DELLA)", "GSM8K", "", run_gsm8k)
    judging("alpaca_eval", "alpaca_eval win rate (as `mergeflow score --benchmark alpaca_eval`)", "AlpacaEval",
            " (with annotator)", run_alpaca_eval)

    preflight = sub.add_parser("preflight", help="check that the judge can answer, before any judging job runs")
    preflight.add_argument("--settings", required=True, help="judge settings: JSON object or file")
    preflight.add_argument("--model-dir-built", action="store_true",
                           help="the launched server's model directory is produced later (not checked)")
    preflight.add_argument("--env-provides-server", action="store_true",
                           help="the judging job's own environment has the server executable (not checked)")
    preflight.set_defaults(func=run_preflight)

    agree = sub.add_parser("agreement", help="re-judge recorded judgments: agreement and Cohen's kappa with them")
    agree.add_argument("--source", required=True, choices=("alpaca_eval", "gsm8k"),
                       help="alpaca_eval: an alpaca_eval annotations JSON; gsm8k: labelled GSM8K judgments (.jsonl)")
    agree.add_argument("--recorded", required=True, help="file of recorded judgments")
    agree.add_argument("--limit", type=int, default=None, help="re-judge only the first N recorded judgments")
    agree.add_argument("--settings", required=True, help="judge settings: JSON object or file")
    agree.add_argument("--out", required=True, help="agreement file to write (.json)")
    gpus.add_argument(agree)
    agree.set_defaults(func=run_agreement)

    serve = sub.add_parser("serve", help="serve a local model as an OpenAI-compatible judge (foreground)")
    serve.add_argument("--model", required=True, help="model directory")
    serve.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one)")
    serve.add_argument("--device", default="auto", help="device for transformers serve (auto, cpu, cuda:0)")
    serve.set_defaults(func=run_serve)


def run_gsm8k(args: argparse.Namespace) -> int:
    from mergeflow import benchmarks
    from mergeflow.judge import gsm8k
    from mergeflow.judge.client import Endpoint, JudgeClient, default_cache_path, describe, reach
    from mergeflow.scoring import results
    from mergeflow.scoring.paths import resolve_file

    from mergeflow import config as mfconfig

    gpus.prepare(args.gpus)
    settings = mfconfig.parse_settings(args.settings)
    endpoint = Endpoint.from_settings(settings)
    prompt = gsm8k.JudgePrompt.load(resolve_file(settings.get("prompt") or gsm8k.DEFAULT_PROMPT_FILE, "judges"))
    bench = benchmarks.get("gsm8k")
    docs = bench.load(args.data)
    generations = results.read_generations(args.generations)
    pairs = results.pair_with_docs(docs, [bench.doc_id(d) for d in docs], generations, args.data)
    cache = endpoint.cache or default_cache_path(args.out)
    with reach(endpoint) as where:
        with JudgeClient.from_endpoint(endpoint, where.base_url, request_model=where.request_model,
                                       cache_path=cache, local=where.local) as client:
            rows, details, samples = gsm8k.score(pairs, bench.doc_id, client, prompt)
            usage = client.usage()
    details = {"judge": {**describe(endpoint), "protocol": "della_gsm8k"}, "usage": usage, **details}
    results.write_score(args.out, "gsm8k", "llm_judge", rows, details, samples, generations=generations)
    log.info("gsm8k judge: %s (usage %s)", rows[0], {k: usage[k] for k in ("answered", "cache_hits", "cost_usd")})
    return 0


def run_alpaca_eval(args: argparse.Namespace) -> int:
    """The judging rule's entry point when the judge server needs its own environment
    (vLLM): the same scoring as `mergeflow score --benchmark alpaca_eval`."""
    from mergeflow.scoring.cli import run

    args.benchmark = "alpaca_eval"
    return run(args)


def run_preflight(args: argparse.Namespace) -> int:
    from mergeflow import config as mfconfig
    from mergeflow.judge.preflight import preflight

    settings = mfconfig.parse_settings(args.settings)
    checked = preflight(settings, model_dir_built=args.model_dir_built, env_provides_server=args.env_provides_server)
    print(f"judge preflight: {checked}")
    return 0


def run_agreement(args: argparse.Namespace) -> int:
    from mergeflow import config as mfconfig
    from mergeflow.errors import MergeflowError
    from mergeflow.judge import agreement

    gpus.prepare(args.gpus)
    if args.limit is not None and args.limit < 1:
        raise MergeflowError(f"--limit must be >= 1, got {args.limit}")
    result = agreement.run(args.source, args.recorded, mfconfig.parse_settings(args.settings), args.out, args.limit)
    log.info("judge agreement (%s): %s vs %s: n=%d, unparsed=%d, agreement=%s, kappa=%s", args.source,
             result["judge"]["name"], result["recorded"]["judge"], result["n"], result["n_unparsed"],
             result["agreement"], result["cohen_kappa"])
    return 0


def run_serve(args: argparse.Namespace) -> int:
    import threading

    from mergeflow.judge.server import local_server, served_model_name

    with local_server(args.model, port=args.port, device=args.device) as base_url:
        print(f"judge server: base_url={base_url} model={served_model_name(args.model)}  (Ctrl-C stops it)",
              flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0
