"""`python -m mergeflow.merging ...` = `mergeflow merge ...` (used by benchmarks/merge_bench.py)."""

import argparse
import sys

from mergeflow.cli import spare_exit_collection
from mergeflow.errors import MergeflowError
from mergeflow.merging import cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mergeflow.merging")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.add_parser(sub)
    args = parser.parse_args(["merge", *(sys.argv[1:] if argv is None else argv)])
    spare_exit_collection()
    try:
        return int(args.func(args) or 0)
    except MergeflowError as err:
        print(f"mergeflow merge: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
