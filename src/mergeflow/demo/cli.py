"""`mergeflow demo`: the demo zoo (tiny Llama base + lm/math/code experts) and its data."""

from __future__ import annotations

import argparse
from pathlib import Path

from mergeflow.demo.models import MODELS  # light: dataclasses only


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="build the demo zoo and benchmark-shaped data (deterministic from --seed)",
        description="Writes OUT/data/{gsm8k,mbpp,alpaca_eval,math}.jsonl (test rows), OUT/data/validation/*.jsonl "
        "(their validation rows, apart from test and training), OUT/models/{base,lm,math,code}/ "
        "(safetensors + tokenizer) and OUT/demo.json. The same seed gives the same bytes on every x86-64 CPU "
        "(training runs with portable CPU kernels: ATEN_CPU_CAPABILITY=default, MKL_CBWR=COMPATIBLE,STRICT).",
    )
    p.add_argument("--out", type=Path, default=Path("resources/demo"), help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed of data, tokenizer and training")
    p.add_argument("--small", action="store_true", help="a minimal zoo in seconds (for tests)")
    p.add_argument("--spec-json", default=None, metavar="JSON",
                   help="override ZooSpec fields of the base step, e.g. '{\"pretrain_steps\": 200}' (for "
                        "benchmarks/zoo_budget.py; the workflow never passes it). The fine-tunes read the spec "
                        "from OUT/demo.json")
    p.add_argument("--model", choices=MODELS, default=None,
                   help="build one step only: `base` (data, tokenizer, base, demo.json), or one fine-tuned model "
                        "from OUT's base (the fine-tunes are independent: run them side by side); default: all")
    p.set_defaults(func=run)
    sub = p.add_subparsers(dest="demo_command", metavar="DEMO_COMMAND")  # optional: none builds the zoo
    labels = sub.add_parser(
        "judge-labels",
        help="the demo judge's labelled GSM8K judging requests, as recorded judgments for `mergeflow judge agreement`",
        description="Builds judging requests (right and wrong responses) from GSM8K rows as the demo judge was "
        "trained on them, and writes them with their true verdicts (.jsonl: question, answer, response, verdict, "
        "judge). Deterministic from --seed.",
    )
    labels.add_argument("--data", required=True, type=Path, help="GSM8K rows (.jsonl), e.g. the held-out demo data")
    labels.add_argument("--rows", type=int, default=4, help="rows to build requests from (about 9 requests each)")
    labels.add_argument("--seed", type=int, default=0, help="seed of the responses")
    labels.add_argument("--prompt", default=None, help="GSM8K judge prompt file (default: the demo's)")
    labels.add_argument("--out", required=True, type=Path, help="file to write (.jsonl)")
    labels.set_defaults(func=run_judge_labels)


def run(args: argparse.Namespace) -> int:
    from mergeflow.demo import build, cpu
    from mergeflow.demo.models import FULL, SMALL
    from mergeflow.errors import MergeflowError

    if args.seed < 0:
        raise MergeflowError(f"--seed must be >= 0, got {args.seed}")
    if not cpu.pinned():  # the same bytes on every CPU need kernels chosen before torch starts
        return cpu.rerun_pinned(["demo", "--out", str(args.out), "--seed", str(args.seed)]
                                + (["--small"] if args.small else []) + (["--model", args.model] if args.model else [])
                                + (["--spec-json", args.spec_json] if args.spec_json is not None else []))
    spec = override_spec(SMALL if args.small else FULL, args.spec_json)
    if args.spec_json is not None and args.model not in (None, "base"):
        raise MergeflowError(f"--spec-json with --model {args.model}: a fine-tune takes the base step's spec "
                             "(OUT/demo.json); give --spec-json to the base step")
    if args.model is None:
        manifest = build.build_demo(args.out, args.seed, spec)
    elif args.model == "base":
        build.build_base(args.out, args.seed, spec)
        manifest = build.manifest_of(args.out)
    else:  # the seed and sizes are the base step's (OUT/demo.json)
        build.build_finetuned(args.out, args.model, seed=args.seed)
        manifest = build.manifest_of(args.out)
    for name, info in manifest["models"].items():
        if args.model not in (None, name):
            continue
        print(f"{name}: {info['steps']} steps, loss {info['first_loss']} -> {info['last_loss']}, "
              f"{info['vocab_rows']} vocab rows")
    return 0


def override_spec(spec, raw: str | None, flag: str = "--spec-json"):
    """`spec` with the fields of the JSON object `raw` replaced (types checked against the field's);
    errors name `flag`."""
    import dataclasses

    from mergeflow.config import parse_settings
    from mergeflow.errors import MergeflowError

    if raw is None:
        return spec
    fields = parse_settings(raw, flag)  # a JSON object, inline or in a file
    known = {f.name: type(getattr(spec, f.name)) for f in dataclasses.fields(spec)}
    for key, value in fields.items():
        if key not in known:
            raise MergeflowError(f"{flag}: unknown ZooSpec field {key!r}; fields: {', '.join(known)}")
        kind = known[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = fields[key] = float(value)
            ok = True
        if not ok:
            raise MergeflowError(f"{flag}: {key}={value!r} is not of type {kind.__name__}")
    return dataclasses.replace(spec, **fields)


def run_judge_labels(args: argparse.Namespace) -> int:
    from mergeflow import atomic, benchmarks
    from mergeflow.demo.judging import gsm8k_labelled
    from mergeflow.errors import MergeflowError

    if args.rows < 1:
        raise MergeflowError(f"--rows must be >= 1, got {args.rows}")
    rows = benchmarks.get("gsm8k").load(args.data)[: args.rows]
    labelled = gsm8k_labelled(rows, args.seed, args.prompt)
    atomic.write_jsonl(args.out, labelled)
    print(f"{args.out}: {len(labelled)} labelled judging requests from {len(rows)} GSM8K rows "
          f"({sum(r['verdict'] == 'correct' for r in labelled)} correct)")
    return 0
