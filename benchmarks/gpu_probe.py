#!/usr/bin/env python
"""Per-step GPU timings of the merge methods on one Llama-2.7B-shaped tensor of each kind
(bf16 weights, expert = base + small noise, as merge_bench.py writes them).

    python benchmarks/gpu_probe.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch

    from mergeflow.merging import methods, rng, steps

    dev = torch.device("cuda")
    res: dict = {}

    def timeit(name, fn, reps=10):
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        res[name] = round((time.perf_counter() - t) / reps * 1e3, 3)
        print(f"{name:50s} {res[name]:9.3f} ms", flush=True)

    def old_kth(a, k):  # the histogram radix select this session replaced
        bits = a.view(torch.int32)
        hi = bits >> 16

        def bins(v, nb):
            h = torch.zeros(nb, dtype=torch.int64, device=v.device)
            return h.index_add_(0, v, torch.ones((), dtype=torch.int64, device=v.device).expand(v.numel()))

        top = bins(hi, 1 << 16).flip(0).cumsum(0)
        kt = torch.tensor([k], dtype=torch.int64, device=a.device)
        j = torch.searchsorted(top, kt)
        b = (1 << 16) - 1 - j
        above = torch.where(j > 0, top[(j - 1).clamp_(min=0)], 0)
        low = torch.where(hi == b.to(torch.int32), bits & 0xFFFF, (bits & 0xFFF) + (1 << 16))
        top2 = bins(low, (1 << 16) + 4096)[: 1 << 16].flip(0).cumsum(0)
        lo = (1 << 16) - 1 - torch.searchsorted(top2, kt - above)
        return ((b << 16) | lo).to(torch.int32).view(torch.float32).view(())

    g = torch.Generator(device=dev).manual_seed(0)

    def probe(shape):
        tag = "x".join(map(str, shape))
        base = (torch.randn(shape, generator=g, device=dev) * 0.02).to(torch.bfloat16)
        exps = [(base.float() + 0.002 * torch.randn(shape, generator=g, device=dev)).to(torch.bfloat16)
                for _ in range(3)]
        d = exps[0].float() - base.float()
        flat = d.abs().view(-1)
        k = flat.numel() // 2
        assert float(old_kth(flat, k)) == float(steps._kth_largest_device(flat, k))
        timeit(f"{tag} kth hist (old)", lambda: old_kth(flat, k))
        timeit(f"{tag} kth sort (new)", lambda: steps._kth_largest_device(flat, k))
        timeit(f"{tag} topk_mask tensor", lambda: steps.topk_mask(flat.view(1, -1), k))
        timeit(f"{tag} sorted_columns rows", lambda: steps.sorted_columns(d.abs()))
        key = (123, 456)
        for backend in ("triton", "torch"):
            os.environ["MERGEFLOW_GPU_RNG"] = backend
            rng._GPU.clear()
            timeit(f"{tag} uniform {backend}", lambda: rng.uniform(key, 0, shape, dev))
        os.environ["MERGEFLOW_GPU_RNG"] = "triton"
        rng._GPU.clear()
        bf = base.float()
        for name, params in [("task_arithmetic", {}), ("ties", {"density": 0.5}),
                             ("dare", {"drop_rate": 0.5, "combine": "ties"}),
                             ("della", {"drop_rate": 0.3, "window_size": 0.14, "lambda": 1.1})]:
            m = methods.build(name, params, ["a", "b", "c"], 42)

            def run(m=m):
                stack = torch.empty((3, *shape), dtype=torch.float32, device=dev)
                for i, e in enumerate(exps):
                    torch.sub(e, bf, out=stack[i])
                blk = methods.Block("model.layers.0.mlp.up_proj.weight", bf, stack, 0, 42, tables={},
                                    is_delta=True)
                return m.merge(blk).to(torch.bfloat16)

            timeit(f"{tag} merge {name}", run, reps=5)

    for shape in [(6912, 2560), (2560, 6912), (2560, 2560), (32000, 2560)]:
        probe(shape)
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
