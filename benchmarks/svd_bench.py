#!/usr/bin/env python
"""Time the per-matrix SVD steps of TSV-M and Iso-C (`steps.tsv_merge`, `steps.iso_merge`) on
Llama-2-13B-shaped task vectors, three experts, on one device; and, where CUDA is, how far
the CUDA result is from the CPU's (the SVD methods agree to rounding, not bit for bit).

    PYTHONPATH=src python benchmarks/svd_bench.py --device cuda --json out.jsonl

mergekit has neither method; FusionBench's reference code runs the same torch calls per
matrix (torch.linalg.svd in float32), so the step's time is what either spends per matrix.
"""

from __future__ import annotations

import argparse
import json
import time

SHAPES = {"mlp_up (13824 x 5120)": (13824, 5120), "mlp_down (5120 x 13824)": (5120, 13824),
          "attn (5120 x 5120)": (5120, 5120), "small (256 x 688)": (256, 688)}


def main(argv=None) -> int:
    import torch

    from mergeflow.merging import steps

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--shapes", default=",".join(list(SHAPES)[:3]), help="comma-separated keys of SHAPES")
    ap.add_argument("--compare-cpu", action="store_true", help="also run on the CPU once and report max |diff|")
    ap.add_argument("--json", help="append results as JSON lines to this file")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    rows = []
    for label in args.shapes.split(","):
        m, n = SHAPES[label]
        g = torch.Generator().manual_seed(0)
        d = (0.002 * torch.randn(args.experts, m, n, generator=g)).to(dev)
        for name, fn in (("tsv_m", lambda x: steps.tsv_merge(x)), ("iso_c", lambda x: steps.iso_merge(x.sum(0)))):
            times = []
            for _ in range(args.repeats + 1):  # the first run warms cuSOLVER / MKL up
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t = time.perf_counter()
                out = fn(d)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                times.append(time.perf_counter() - t)
            row = {"shape": label, "method": name, "device": str(dev), "experts": args.experts,
                   "threads": torch.get_num_threads(), "warm_s": round(min(times[1:] or times), 3),
                   "first_s": round(times[0], 3)}
            if args.compare_cpu and dev.type != "cpu":
                ref = fn(d.cpu())
                row["max_abs_diff_vs_cpu"] = float((out.cpu() - ref).abs().max())
                row["max_abs_out"] = float(ref.abs().max())
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
    print("\n| matrix | method | device | s per matrix (3 experts) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['method']} | {r['device']} | {r['warm_s']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
