#!/usr/bin/env python
"""Where a merge process' fixed costs go: interpreter, `import torch` (and variants),
CUDA context, pinned memory, Triton, and page-cache write throughput by write pattern.

    python benchmarks/startup_probe.py --json probe.json [--write-dir /tmp/wp --write-gb 5.4]

Every timing runs in a fresh interpreter (subprocess), median of `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PY = sys.executable


def _time(code: str, env=None, repeats=3, args=()) -> dict:
    walls, outs = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        p = subprocess.run([PY, *args, "-c", code], capture_output=True, text=True,
                           env=dict(os.environ, **(env or {})), check=False)
        walls.append(round(time.perf_counter() - t0, 3))
        outs.append(p.stdout.strip()[-300:] + (p.stderr.strip()[-300:] if p.returncode else ""))
    return {"median_s": statistics.median(walls), "all_s": walls, "out": outs[-1]}


CUDA_CTYPES = r"""
import ctypes, threading, time
t0 = time.perf_counter()
res = {}
def init():
    cu = ctypes.CDLL("libcuda.so.1")
    a = time.perf_counter()
    assert cu.cuInit(0) == 0
    dev = ctypes.c_int()
    cu.cuDeviceGet(ctypes.byref(dev), 0)
    ctx = ctypes.c_void_p()
    assert cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0
    cu.cuCtxSetCurrent(ctx)
    b = time.perf_counter()
    p = ctypes.c_void_p()
    for _ in range(PIN):
        assert cu.cuMemHostAlloc(ctypes.byref(p), 8 << 20, 0) == 0
    res["ctx_s"] = b - a
    res["pin_s"] = time.perf_counter() - b
    res["done_at"] = time.perf_counter() - t0
th = threading.Thread(target=init)
if BG: th.start()
import torch
res["torch_imported_at"] = time.perf_counter() - t0
if BG: th.join()
else: init()
res["joined_at"] = time.perf_counter() - t0
torch.zeros(1, device="cuda"); torch.cuda.synchronize()
res["torch_cuda_ready_at"] = time.perf_counter() - t0
print({k: round(v, 3) for k, v in res.items()})
"""

TORCH_CUDA = r"""
import time
t0 = time.perf_counter()
import torch
a = time.perf_counter()
torch.zeros(1, device="cuda"); torch.cuda.synchronize()
b = time.perf_counter()
slabs = [torch.empty(8 << 20, dtype=torch.uint8, pin_memory=True) for _ in range(40)]
c = time.perf_counter()
print(dict(import_s=round(a - t0, 3), cuda_s=round(b - a, 3), pin40x8MB_s=round(c - b, 3)))
"""

TRITON = r"""
import time
t0 = time.perf_counter()
import torch
torch.zeros(1, device="cuda")
a = time.perf_counter()
from mergeflow.merging import rng
k = rng._triton_uniform()
b = time.perf_counter()
u = rng.uniform((1, 2), 0, (1 << 20,), "cuda"); torch.cuda.synchronize()
c = time.perf_counter()
print(dict(import_triton_s=round(b - a, 3), first_launch_s=round(c - b, 3)))
"""


# How often a background thread gets the GIL while the main thread imports torch: the
# limit of any work a background Python thread could overlap with the import.
GIL_GAPS = r"""
import os, threading, time
stop = False
gaps = []
def bg():
    last = time.perf_counter()
    while not stop:
        time.sleep(0)  # releases and re-takes the GIL
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
th = threading.Thread(target=bg); th.start()
t0 = time.perf_counter()
import torch
t = time.perf_counter() - t0
stop = True; th.join()
gaps.sort()
big = sum(g for g in gaps if g > 0.002)
print(dict(import_s=round(t, 3), turns=len(gaps), max_gap_s=round(gaps[-1], 3),
           p99_gap_ms=round(gaps[int(len(gaps) * 0.99)] * 1e3, 2), time_in_gaps_over_2ms_s=round(big, 3)))
"""


def write_tests(d: Path, nbytes: int) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    res = {}
    chunk8, chunk64 = bytes(8 << 20), bytes(64 << 20)

    def run(name, files, chunk, threads, prealloc=False):
        paths = [d / f"w{i}.bin" for i in range(files)]
        per = -(-nbytes // files // len(chunk)) * len(chunk)
        fds = []
        for p in paths:
            fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            if prealloc:
                os.posix_fallocate(fd, 0, per)
            else:
                os.ftruncate(fd, per)
            fds.append(fd)
        jobs = [(fd, off) for fd in fds for off in range(0, per, len(chunk))]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda j: os.pwrite(j[0], chunk, j[1]), jobs))
        res[name] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        for fd in fds:
            os.close(fd)
        for p in paths:
            p.unlink()
        res[name + "_close_unlink"] = round(time.perf_counter() - t0, 3)

    run("warmup_1f_16t_64M", 1, chunk64, 16)
    for rep in range(2):
        run(f"r{rep}_1f_1t_8M", 1, chunk8, 1)
        run(f"r{rep}_1f_8t_8M", 1, chunk8, 8)
        run(f"r{rep}_1f_16t_64M", 1, chunk64, 16)
        run(f"r{rep}_2f_8t_8M", 2, chunk8, 8)
        run(f"r{rep}_6f_8t_8M", 6, chunk8, 8)
        run(f"r{rep}_6f_12t_8M", 6, chunk8, 12)
        run(f"r{rep}_1f_8t_8M_falloc", 1, chunk8, 8, prealloc=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--importtime", help="write `-X importtime` of `import torch` here")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write-dir")
    ap.add_argument("--write-gb", type=float, default=5.4)
    ap.add_argument("--gil-only", action="store_true", help="only the GIL-gap test")
    args = ap.parse_args()
    r = args.repeats
    res: dict = {"python": sys.version.split()[0]}
    if args.gil_only:
        res["gil_gaps"] = [_time(GIL_GAPS, repeats=1)["out"] for _ in range(r)]
        print(json.dumps(res, indent=1))
        return 0
    import torch

    res["torch"] = torch.__version__
    res["torch_file"] = torch.__file__
    pc = Path(torch.__file__).parent / "__pycache__"
    res["torch_pycache_exists"] = pc.exists()
    res["torch_pycache_writable"] = os.access(pc if pc.exists() else pc.parent, os.W_OK)
    res["sys_path"] = sys.path
    del torch
    res["python_pass"] = _time("pass", repeats=r)
    res["python_S_pass"] = _time("pass", repeats=r, args=("-S",))
    res["python_I_pass"] = _time("pass", repeats=r, args=("-I",))
    res["import_numpy"] = _time("import numpy", repeats=r)
    res["import_torch"] = _time("import torch", repeats=r)
    res["import_torch_I"] = _time("import torch", repeats=r, args=("-I",))
    res["import_torch_noautoload"] = _time("import torch", {"TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}, repeats=r)
    res["import_torch_pycacheprefix"] = _time("import torch", {"PYTHONPYCACHEPREFIX": "/tmp/pycache_probe"}, repeats=r + 1)
    res["import_torch_nonumpy"] = _time("import sys; sys.modules['numpy'] = None; import torch", repeats=r)
    res["import_mergeflow_cli"] = _time("import mergeflow.merging.cli, mergeflow.merging.engine", repeats=r)
    res["import_safetensors_torch"] = _time("import safetensors.torch", repeats=r)
    res["import_triton"] = _time("import triton", repeats=r)
    if args.importtime:
        p = subprocess.run([PY, "-X", "importtime", "-c", "import torch"], capture_output=True, text=True,
                           check=False)
        Path(args.importtime).write_text(p.stderr)
    res["torch_cuda_pin"] = _time(TORCH_CUDA, repeats=r)
    res["ctypes_ctx_fg"] = _time(CUDA_CTYPES.replace("PIN", "40").replace("BG", "False"), repeats=r)
    res["ctypes_ctx_bg"] = _time(CUDA_CTYPES.replace("PIN", "40").replace("BG", "True"), repeats=r)
    res["triton_uniform"] = _time(TRITON, repeats=2)
    if args.write_dir:
        res["writes"] = write_tests(Path(args.write_dir), int(args.write_gb * 1e9))
    for k in ("dirty_ratio", "dirty_background_ratio", "dirty_bytes", "dirty_background_bytes"):
        try:
            res["vm_" + k] = Path(f"/proc/sys/vm/{k}").read_text().strip()
        except OSError:
            pass
    out = json.dumps(res, indent=1)
    print(out)
    if args.json:
        Path(args.json).write_text(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
