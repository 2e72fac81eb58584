#!/usr/bin/env python
"""Process exit after the heavy imports, with and without `gc.freeze()` registered as an atexit
handler before them (what `mergeflow.cli.spare_exit_collection` does in every CLI command).

Each case is a fresh interpreter that imports a stage's libraries, prints the epoch time and
exits; the parent notes when the process has ended. Interleaved, `--repeats` each.

    python benchmarks/exit_time.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CASES = {  # what a stage's job has imported when it is done
    "merge (torch)": "import torch",
    "generate (torch, transformers)": "import torch, transformers; from transformers import AutoModelForCausalLM",
    "score (lm-eval)": "import lm_eval, datasets, lm_eval.evaluator",
}


def exit_s(code: str, freeze: bool) -> float:
    head = "import atexit, gc; atexit.register(gc.freeze); " if freeze else ""
    p = subprocess.run([sys.executable, "-c", f"{head}{code}; import time; print(time.time())"],
                       capture_output=True, text=True, check=True)
    t_end = time.time()
    return t_end - float(p.stdout.split()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    rows = {}
    for _ in range(args.repeats):
        for name, code in CASES.items():
            for freeze in (False, True):
                rows.setdefault((name, freeze), []).append(exit_s(code, freeze))
    print("| imports | exit s, plain (median; runs) | exit s, gc.freeze() at exit (median; runs) |\n|---|---|---|")
    for name in CASES:
        plain, frozen = rows[(name, False)], rows[(name, True)]
        fmt = lambda xs: f"{statistics.median(xs):.3f} ({', '.join(f'{x:.2f}' for x in xs)})"  # noqa: E731
        print(f"| {name} | {fmt(plain)} | {fmt(frozen)} |")
    print(json.dumps({f"{k[0]} {'freeze' if k[1] else 'plain'}": v for k, v in rows.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
