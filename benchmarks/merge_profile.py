#!/usr/bin/env python
"""Where a merge's wall time goes: the whole process's start-up and exit, and inside the engine
the main thread's waits, the readers' and writers' busy time and the GPU time of the arithmetic.

For issue 16's whole-process target: which part to cut. Uses merge_bench.py's synthetic Llama
checkpoints (same sizes and method params). Two measurements per method:

1. the CLI as a whole process, with time stamps (epoch clock) at interpreter start, after the
   imports, after the merge and at process end (seen by the parent), so start-up and exit are
   separated from the engine's own `wall_time_s`;
2. the engine in this process (after one warm-up merge), its hot functions wrapped with timers
   and CUDA events: how long the main thread waited for blocks (reads + the float32 prepare)
   and for free write slabs, the readers' pread+copy time, the writers' pwrite time, and the
   GPU time of prepare + merge per block.

    python benchmarks/merge_profile.py --size 2.7b --device cuda --methods ties,dare_ties --json out.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_bench  # noqa: E402  (the checkpoints and the method params)

CHILD = r"""
import json, sys, time
t_start = time.time()
import torch  # noqa: F401  (what the CLI imports first thing in the engine)
t_torch = time.time()
from mergeflow.merging.__main__ import main
rc = main(sys.argv[2:])
t_end = time.time()
with open(sys.argv[1], "w") as fh:
    json.dump({"start": t_start, "torch": t_torch, "end": t_end, "rc": rc}, fh)
"""


def whole_process(args, dirs, method: str, work: Path) -> dict:
    mf_method, mf_params, *_ = merge_bench.METHODS[method]
    out = work / f"prof-out-{method}"
    stamps = work / f"prof-{method}.stamps.json"
    cmd = [sys.executable, "-c", CHILD, str(stamps), "--method", mf_method, "--params", json.dumps(mf_params),
           "--base", str(dirs["base"]), *[f"--expert={n}={dirs[n]}" for n in ("lm", "math", "code")],
           "--device", args.device, "--threads", str(args.threads), "--out", str(out),
           "--metadata-out", str(work / f"prof-{method}.meta.json")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE")
    t0 = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    t1 = time.time()
    subprocess.run(["rm", "-rf", str(out)])
    if p.returncode != 0:
        return {"rc": p.returncode, "stderr": p.stderr[-2000:]}
    s = json.loads(stamps.read_text())
    meta = json.loads((work / f"prof-{method}.meta.json").read_text())
    return {"wall_s": round(t1 - t0, 3), "interpreter_s": round(s["start"] - t0, 3),
            "import_torch_s": round(s["torch"] - s["start"], 3),
            "cli_and_engine_s": round(s["end"] - s["torch"], 3), "engine_s": meta["wall_time_s"],
            "exit_s": round(t1 - s["end"], 3), "timings": meta.get("timings")}


class Acc:
    """Seconds per key, summed over threads."""

    def __init__(self):
        self.s: dict[str, float] = defaultdict(float)
        self.n: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()

    def add(self, key, dt):
        with self.lock:
            self.s[key] += dt
            self.n[key] += 1


def in_process(args, dirs, method: str, work: Path) -> dict:
    import torch

    from mergeflow.merging import engine as eng

    mf_method, mf_params, *_ = merge_bench.METHODS[method]
    acc = Acc()
    events: list = []
    orig = {k: getattr(eng.MergeEngine, k) for k in ("_read_one", "_blocks", "_prepare", "_pin", "_open_output")}
    orig_get, orig_wb = eng.PinnedPool.get, eng.ShardedWriter.write_bytes
    orig_w = eng.ShardedWriter.write
    cuda = args.device == "cuda"

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc.add(name, time.perf_counter() - t)
        return wrapper

    def blocks(self, items):
        gen = orig["_blocks"](self, items)
        while True:
            t = time.perf_counter()
            try:
                item, block = next(gen)
            except StopIteration:
                return
            acc.add("main_wait_block", time.perf_counter() - t)
            yield item, block

    def prepare(self, item, parts):
        ev0 = torch.cuda.Event(enable_timing=True) if cuda else None
        if cuda:
            ev0.record()
        blk = orig["_prepare"](self, item, parts)
        merge = self.method.merge
        if not getattr(merge, "_profiled", False):
            def merged(block, _m=merge):
                t = time.perf_counter()
                e0 = torch.cuda.Event(enable_timing=True) if cuda else None
                if cuda:
                    e0.record()
                r = _m(block)
                if cuda:
                    e1 = torch.cuda.Event(enable_timing=True)
                    e1.record()
                    events.append(("gpu_merge", e0, e1))
                acc.add("main_merge_launch", time.perf_counter() - t)
                return r
            merged._profiled = True
            self.method.merge = merged
        if cuda:
            ev1 = torch.cuda.Event(enable_timing=True)
            ev1.record()
            events.append(("gpu_prepare", ev0, ev1))
        return blk

    def pool_get(self):
        t = time.perf_counter()
        try:
            return orig_get(self)
        finally:
            acc.add(f"wait_slab_{'read' if threading.current_thread().name.startswith('mergeflow-read') else 'write'}",
                    time.perf_counter() - t)

    patches = {"_read_one": timed("readers_busy", orig["_read_one"]), "_blocks": blocks, "_prepare": prepare,
               "_pin": timed("pin", orig["_pin"]), "_open_output": timed("open_output", orig["_open_output"])}
    for k, v in patches.items():
        setattr(eng.MergeEngine, k, v)
    eng.PinnedPool.get = pool_get
    eng.ShardedWriter.write_bytes = timed("writers_busy", orig_wb)
    eng.ShardedWriter.write = timed("writers_busy", orig_w)
    out = work / f"prof-inproc-{method}"
    try:
        res = {}
        for run in ("warm", "profiled"):
            acc.s.clear()
            acc.n.clear()
            events.clear()
            subprocess.run(["rm", "-rf", str(out)])
            t = time.perf_counter()
            meta = eng.run_merge(mf_method, {n: str(dirs[n]) for n in ("lm", "math", "code")}, str(out),
                                 base=str(dirs["base"]), params=dict(mf_params), device=args.device, progress=False)
            wall = time.perf_counter() - t
            if cuda:
                torch.cuda.synchronize()
            gpu = defaultdict(float)
            for key, e0, e1 in events:
                gpu[key] += e0.elapsed_time(e1) / 1e3
            res[run] = {"wall_s": round(wall, 3), "timings": meta.get("timings"),
                        "sums_s": {k: round(v, 3) for k, v in sorted(acc.s.items())},
                        "counts": dict(acc.n), "gpu_s": {k: round(v, 3) for k, v in gpu.items()},
                        "blocks": sum(1 for k, *_ in events if k == "gpu_prepare")}
        return res
    finally:
        for k, v in orig.items():
            setattr(eng.MergeEngine, k, v)
        eng.PinnedPool.get, eng.ShardedWriter.write_bytes, eng.ShardedWriter.write = orig_get, orig_wb, orig_w
        subprocess.run(["rm", "-rf", str(out)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny", choices=sorted(merge_bench.SIZES))
    ap.add_argument("--workdir", default="/tmp/merge_bench")
    ap.add_argument("--methods", default="task_arithmetic,ties,dare_ties,della")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--json", help="append one JSON line per method")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    dirs = merge_bench.write_models(work, args.size, 2 * 10**9, args.device)
    for method in args.methods.split(","):
        row = {"size": args.size, "device": args.device, "method": method,
               "process": whole_process(args, dirs, method, work), "engine": in_process(args, dirs, method, work)}
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
