#!/usr/bin/env python
"""The pre-merge check's time, this tree against another revision's check.py, side by side.

On merge_bench.py's synthetic Llama checkpoints (base + 3 experts), in one process with torch
already imported, both `--stats` modes, interleaved, `--repeats` each (the first run of each
includes its first-use costs).

    python benchmarks/check_speed.py --size 0.3b --rev e61827e --repeats 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import merge_bench  # noqa: E402


def load_revision(rev: str):
    src = subprocess.run(["git", "show", f"{rev}:src/mergeflow/merging/check.py"], cwd=HERE.parent,
                         capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "check_rev.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("mergeflow.merging.check_rev", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="0.3b", choices=sorted(merge_bench.SIZES))
    ap.add_argument("--workdir", default="/tmp/merge_bench")
    ap.add_argument("--rev", required=True, help="the git revision to compare with")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    import torch  # noqa: F401  (imported before any timing)

    from mergeflow.merging import check as current

    dirs = merge_bench.write_models(Path(args.workdir), args.size, 2 * 10**9, "cpu")
    experts = {k: str(dirs[k]) for k in ("lm", "math", "code")}
    tools = {args.rev: load_revision(args.rev), "this tree": current}
    times: dict[str, list[float]] = {}
    results = {}
    for _ in range(args.repeats):
        for mode in ("sample", "full"):
            for name, mod in tools.items():
                t = time.perf_counter()
                rep = mod.check_inputs(str(dirs["base"]), experts, device="cpu", stats=mode)
                times.setdefault(f"{mode} {name}", []).append(round(time.perf_counter() - t, 3))
                results[(mode, name)] = rep.derivation["rel_norm"]
    for mode in ("sample", "full"):  # the same statistics (float64 sums in another order)
        a, b = (results[(mode, n)] for n in tools)
        assert all(abs(a[k] - b[k]) <= 1e-9 * abs(a[k]) for k in a), (mode, a, b)
    print(json.dumps({"size": args.size, "seconds": times}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
