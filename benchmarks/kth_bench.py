"""The CUDA TIES trim's exact k-th largest |delta| of a whole tensor: a full sort of the float
bits (the earlier code) against torch.topk's radix select (unsorted), on task vectors shaped and
valued like Llama-2-13B's (bf16 weights, fine-tuned differences: few distinct values, many ties).

    python benchmarks/kth_bench.py --shapes 13824x5120,5120x5120 --repeats 5 [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def by_sort(a, k):
    srt = torch.sort(a.reshape(-1).view(torch.int32)).values
    return srt[a.numel() - k].view(torch.float32)


def by_topk(a, k):
    return torch.topk(a.reshape(-1).view(torch.int32), k, sorted=False).values.min().view(torch.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="13824x5120,5120x5120")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        r, c = map(int, shape.split("x"))
        base = (torch.randn(r, c, generator=g, device=dev) * 0.02).bfloat16()
        expert = (base.float() + torch.randn(r, c, generator=g, device=dev) * 0.002).bfloat16()
        a = (expert.float() - base.float()).abs()
        k = max(1, int(args.density * a.numel()))
        times = {}
        want = by_sort(a, k)
        for name, fn in (("sort", by_sort), ("topk", by_topk)):
            assert torch.equal(fn(a, k), want), name  # the same threshold, bit for bit
            ts = []
            for _ in range(args.repeats):
                torch.cuda.synchronize()
                t = time.perf_counter()
                fn(a, k)
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t)
            times[name] = round(statistics.median(ts) * 1e3, 2)
        row = {"shape": shape, "k": k, "distinct": int(torch.unique(a).numel()), "ms": times,
               "sort_over_topk": round(times["sort"] / times["topk"], 2), "gpu": torch.cuda.get_device_name()}
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
