"""`mergeflow merge`: merge expert checkpoints onto a base with one method."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from mergeflow import gpus
from mergeflow.errors import MergeflowError


def _expert(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, path


def _params(text: str) -> dict:
    """JSON object, or @FILE holding JSON or YAML."""
    src = text
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            src = path.read_text()
        except OSError as err:
            raise MergeflowError(f"--params: cannot read {path}: {err}") from err
        if path.suffix in (".yaml", ".yml"):
            import yaml

            value = yaml.safe_load(src)
            if not isinstance(value, dict):
                raise MergeflowError(f"--params: {path} does not hold a mapping")
            return value
    try:
        value = json.loads(src)
    except ValueError as err:
        raise MergeflowError(f"--params: not valid JSON ({err}): {src[:80]!r}") from err
    if not isinstance(value, dict):
        raise MergeflowError(f"--params: expected a JSON object, got {type(value).__name__}")
    return value


def add_parser(subparsers) -> None:
    from mergeflow.checkpoints import VOCAB_POLICIES
    from mergeflow.config import DEFAULTS
    from mergeflow.merging.methods import OUTPUT_DTYPES, help_text, method_names  # light: no torch at import

    p = subparsers.add_parser(
        "merge",
        help=f"merge expert checkpoints ({len(method_names())} methods, listed by `mergeflow merge --help`)",
        description="Merge expert checkpoints tensor by tensor; see docs/merging.md for methods and params.",
        epilog=help_text(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", required=True, choices=method_names())
    p.add_argument("--base", help="base (pre-trained) model directory")
    p.add_argument("--expert", action="extend", nargs="+", type=_expert, required=True, metavar="NAME=DIR",
                   help="expert models (one or more, or repeat the option; order matters for list-valued params)")
    p.add_argument("--params", type=str, default="{}",
                   help="method params as JSON (or @FILE with JSON/YAML); engine keys: dtype, donor")
    p.add_argument("--dtype", choices=("auto", *OUTPUT_DTYPES), default="auto",
                   help="output dtype (engine key dtype; auto: each tensor keeps the base's dtype)")
    p.add_argument("--donor", default="auto", metavar="LABEL",
                   help="'base' or an expert name: the input whose config and tokenizer the output ships "
                        "(engine key donor; auto: the base, or under pad_mean the owner of the larger vocabulary)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads the merge's pools may use (default: every CPU; a workflow job: its {threads})")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="config key seed (default %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--vocab-policy", choices=VOCAB_POLICIES, default=None,
                   help="reconcile embedding/lm_head row counts (default: fail on a mismatch); union: keep "
                        "every expert's added tokens, merge the tokenizers, map rows by token string")
    p.add_argument("--shard-size", default="5GB", help="largest output shard (e.g. 5GB, 500MB)")
    p.add_argument("--io-threads", type=int, default=None, help="reader threads (default: min(8, CPUs); min(12, CPUs) on CUDA)")
    p.add_argument("--out", required=True, help="output model directory (written atomically)")
    p.add_argument("--force", action="store_true",
                   help="replace an --out that is not a previous merge output (never an input)")
    gpus.add_argument(p)
    p.add_argument("--metadata-out", default=None, metavar="FILE.json",
                   help="also write the merge metadata here (it outlives a temporary checkpoint)")
    p.set_defaults(func=run)


def run(args) -> int:
    # Our reader/writer threads share the cores with torch's OpenMP pool; spinning OpenMP
    # workers then starve them on a busy machine. Only effective
    # before torch is first imported, which is the case for the CLI.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    gpus.prepare(args.gpus, query="none")  # claimed now, checked through torch below
    from mergeflow.merging.engine import run_merge  # (no torch yet)

    experts = {}
    for name, path in args.expert:
        if name in experts or name == "base":
            raise MergeflowError(f"--expert {name}={path}: the name {name!r} is "
                                 + ("reserved" if name == "base" else "given twice"))
        experts[name] = path
    params = _params(args.params)
    for key, value in (("dtype", args.dtype), ("donor", args.donor)):
        if value == "auto":
            continue
        if params.get(key, value) != value:
            raise MergeflowError(f"--{key} {value}: --params sets {key} to {params[key]!r}")
        params[key] = value
    if args.threads is not None:
        if args.threads < 1:
            raise MergeflowError(f"--threads {args.threads}: expected at least 1")
        from mergeflow.merging import set_cpu_threads

        set_cpu_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # torch's pool (read at its import)
    common = dict(base=args.base, params=params, seed=args.seed, device=args.device,
                  vocab_policy=args.vocab_policy, shard_size=args.shard_size, io_threads=args.io_threads,
                  force=args.force)
    if args.gpus:
        gpus.check_torch(args.gpus)  # a CPU build of torch would merge on the CPU
    meta = run_merge(args.method, experts, args.out, **common)
    if args.metadata_out:
        from mergeflow.atomic import write_text
        from mergeflow.merging.engine import METADATA_FILE

        # the same bytes as the checkpoint's own metadata file: one source for both
        try:
            write_text(args.metadata_out, (Path(args.out) / METADATA_FILE).read_text())
        except OSError as err:  # (a full disk, a read-only directory): the merge itself is done
            raise MergeflowError(f"--metadata-out {args.metadata_out}: cannot write it ({err.strerror})") from None
    print(f"merged {len(experts)} experts with {meta['method']} into {args.out} "
          f"in {meta['wall_time_s']:.1f} s on {meta['device']}, {meta['engine']} engine "
          f"(peak RSS {meta['peak_rss_bytes'] / 2**30:.2f} GiB)")
    return 0
