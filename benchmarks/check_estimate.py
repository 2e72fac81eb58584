"""The pre-merge check's memory estimate against measured peaks: `mergeflow check`'s host
(and GPU) estimate (mergeflow.merging.check.estimate_resources) for the merges whose peak RSS
merge_bench.py recorded in benchmarks/measured/, computed from the same shapes and settings.

    python benchmarks/check_estimate.py benchmarks/measured/2026-12-02-cpu-0.3b-one-engine.jsonl ...

Prints one Markdown row per (size, method, device), the last recorded run of each.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _bench():
    spec = importlib.util.spec_from_file_location("merge_bench", HERE / "merge_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def estimate(size: str, method: str, device: str, threads: int) -> dict:
    from mergeflow.merging import methods, set_cpu_threads
    from mergeflow.merging.check import estimate_resources
    from mergeflow.merging.engine import DEFAULT_CHUNK_ELEMENTS, MAX_ELEMENTS, SLAB_BYTES, thread_counts

    bench = _bench()
    name, params = bench.METHODS[method][:2]
    experts = ["lm", "math", "code"]  # merge_bench: a base and three experts, bf16 in and out
    m = methods.build(name, params, experts, 0)
    n_in = len(experts) + int(m.uses_base)
    tensors = []
    for tname, shape in bench.llama_tensors(*bench.SIZES[size]):
        numel = 1
        for s in shape:
            numel *= s
        tensors.append((tname, numel, 2 * n_in, 2, False))
    set_cpu_threads(threads)
    io, write = thread_counts(device)
    cuda = device == "cuda"
    chunk = MAX_ELEMENTS if cuda else DEFAULT_CHUNK_ELEMENTS
    return estimate_resources(tensors, len(experts), m.uses_base, cuda, chunk, (4 << 30) if cuda else (256 << 20),
                              m.tensor_wide, io, write, SLAB_BYTES)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jsonl", nargs="+", help="merge_bench.py --json files")
    ap.add_argument("--threads", type=int, default=None,
                    help="the runs' --threads (default: 2 on the CPU, 16 on CUDA, as those runs used)")
    args = ap.parse_args(argv)
    rows = {}
    for f in args.jsonl:
        for line in Path(f).read_text().splitlines():
            r = json.loads(line)
            if (r.get("mergeflow") or {}).get("peak_rss_gib") is not None:
                rows[(r["size"], r["method"], r.get("device", "cpu"))] = (r, Path(f).name)
    print("| size | method | device | estimated host GiB | measured peak RSS GiB | estimate / measured | "
          "estimated GPU GiB | file |")
    print("|---|---|---|---|---|---|---|---|")
    for (size, method, device), (r, fname) in rows.items():
        threads = args.threads or (16 if device == "cuda" else 2)
        est = estimate(size, method, device, threads)
        got = r["mergeflow"]["peak_rss_gib"]
        host = est["host_bytes"] / 2**30
        gpu = "" if est["gpu_bytes"] is None else f"{est['gpu_bytes'] / 2**30:.2f}"
        print(f"| {size} | {method} | {device} | {host:.2f} | {got:.2f} | {host / got:.2f} | {gpu} | {fname} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
