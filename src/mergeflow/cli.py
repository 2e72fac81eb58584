"""Command-line entry point: `mergeflow <stage> ...`.

Each stage owns its sub-command in `<stage>/cli.py` (function `add_parser(subparsers)`),
so the CLI stays a thin dispatcher and stages stay independent of each other.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import logging
import sys

from mergeflow.errors import MergeflowError

# (sub-command, module that defines add_parser); imported lazily so `mergeflow --help`
# and light stages do not pay for torch/transformers/lm-eval imports.
STAGES = [
    ("demo", "mergeflow.demo.cli"),
    ("fetch", "mergeflow.fetch"),
    ("merge", "mergeflow.merging.cli"),
    ("check", "mergeflow.merging.check"),
    ("generate", "mergeflow.generation.cli"),
    ("likelihood", "mergeflow.generation.likelihood_cli"),
    ("score", "mergeflow.scoring.cli"),
    ("loglik-mc", "mergeflow.scoring.loglik_mc_cli"),
    ("judge", "mergeflow.judge.cli"),
    ("aggregate", "mergeflow.aggregate.cli"),
    ("compare", "mergeflow.aggregate.paired"),
    ("split", "mergeflow.selection"),
    ("select", "mergeflow.selection"),
    ("robustness", "mergeflow.robustness.cli"),
    ("plan", "mergeflow.plan"),
]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; `only`: register just that stage (its module alone is imported)."""
    from mergeflow import __version__

    parser = argparse.ArgumentParser(prog="mergeflow", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mergeflow {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in STAGES:
        if only is None or name == only:
            importlib.import_module(module).add_parser(sub)
    return parser


def _stage(argv: list[str]) -> str | None:
    """The stage named on the command line, if any (first non-option word)."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in dict(STAGES) else None


def main(argv: list[str] | None = None) -> int:
    # Import only the named stage's CLI: each stage's imports cost start-up time (e.g. a
    # merge need not load the config schema or the evaluation stages).
    parser = build_parser(_stage(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    spare_exit_collection()
    try:
        return int(args.func(args) or 0)
    except MergeflowError as err:  # bad input: a clear message, no traceback
        print(f"mergeflow {args.command}: error: {err}", file=sys.stderr)
        return 2


_SPARED = False


def spare_exit_collection() -> None:
    """At interpreter exit, keep the last garbage collection off what is still alive: it would
    walk every object torch, transformers or lm-eval made at import, 0.4-0.7 s per process
    (benchmarks/README.md, "Process exit"). An atexit handler, so a process that runs commands
    in-process (tests, a notebook) collects as usual until it exits; the other atexit handlers,
    stream flushing and module teardown still run."""
    global _SPARED
    if not _SPARED:
        atexit.register(gc.freeze)
        _SPARED = True


if __name__ == "__main__":
    sys.exit(main())
