#!/usr/bin/env python
"""Merge speed and memory: mergeflow vs mergekit on the same synthetic Llama checkpoints.

Writes a base and three experts of a chosen size (bf16, sharded safetensors, Llama-shaped
tensor names and config), then runs each method as a whole process with both tools, side
by side, and reports wall time, the ratio, peak RSS (from wait4, per child) and the
read-and-write floor (reading every input file once and writing one output's bytes with
the same primitives, page cache warm). On a GPU it also times the host-to-device copy of
the inputs. See benchmarks/README.md for commands and figures.

    python benchmarks/merge_bench.py --size 0.3b --workdir /tmp/mb --methods ties,della
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# name: (hidden, intermediate, layers, vocab)
SIZES = {
    "tiny": (256, 688, 4, 32000),
    "0.3b": (1024, 2816, 16, 32000),
    "1b": (2048, 5632, 22, 32000),  # TinyLlama-1.1B shapes
    "2.7b": (2560, 6912, 32, 32000),  # 2.7 B params, 5.4 GB in bf16
    "13b-rows": (5120, 13824, 8, 32000),  # Llama-2-13B row shapes, 8 layers: 2.87 B params
}

# method -> (mergeflow method, mergeflow params, mergekit method, mergekit per-model params, global)
METHODS = {
    "task_arithmetic": ("task_arithmetic", {"lambda": 1.0}, "task_arithmetic", {"weight": 1.0}, {"lambda": 1.0}),
    "ties": ("ties", {"density": 0.5}, "ties", {"weight": 1.0, "density": 0.5}, {}),
    "dare_ties": ("dare", {"drop_rate": 0.5, "combine": "ties"}, "dare_ties", {"weight": 1.0, "density": 0.5}, {}),
    "della": ("della", {"drop_rate": 0.3, "window_size": 0.14, "lambda": 1.1}, "della",
              {"weight": 1.0, "density": 0.7, "epsilon": 0.07}, {"lambda": 1.1}),
    "breadcrumbs": ("breadcrumbs", {"density": 0.5, "gamma": 0.01}, "breadcrumbs",
                    {"weight": 1.0, "density": 0.5, "gamma": 0.01}, {}),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.01}, "breadcrumbs_ties",
                         {"weight": 1.0, "density": 0.5, "gamma": 0.01}, {}),
    "model_stock": ("model_stock", {}, "model_stock", {}, {}),
    "sce": ("sce", {"select_topk": 0.5}, "sce", {}, {"select_topk": 0.5}),
    "multislerp": ("multislerp", {"interpolate": "task_vectors"}, "multislerp", {"weight": 1.0}, {}),
    # TSV-M, Iso-C, Iso-CTS, PCB (mergekit has none): against mergekit's task arithmetic, the same reads and writes
    "tsv_m": ("tsv_m", {}, "task_arithmetic", {"weight": 1.0}, {"lambda": 1.0}),
    "iso_c": ("iso_c", {}, "task_arithmetic", {"weight": 1.0}, {"lambda": 1.0}),
    "iso_cts": ("iso_cts", {}, "task_arithmetic", {"weight": 1.0}, {"lambda": 1.0}),
    "pcb": ("pcb", {}, "task_arithmetic", {"weight": 1.0}, {"lambda": 1.0}),
    # M3 (mergekit has none): against mergekit's method doing the same work with fixed weights
    "m3_ta": ("m3", {"alpha": 0.5}, "task_arithmetic", {"weight": 0.33}, {"lambda": 1.0}),
    "m3_ties": ("m3", {"alpha": 0.5, "combine": "ties", "density": 0.5}, "ties",
                {"weight": 0.33, "density": 0.5}, {}),
    "m3_dare": ("m3", {"alpha": 0.5, "dare": {"drop_rate": 0.5}}, "dare_linear", {"weight": 0.33, "density": 0.5},
                {}),
}


def llama_tensors(hidden, inter, layers, vocab):
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield p + f"self_attn.{n}.weight", (hidden, hidden)
        yield p + "mlp.gate_proj.weight", (inter, hidden)
        yield p + "mlp.up_proj.weight", (inter, hidden)
        yield p + "mlp.down_proj.weight", (hidden, inter)
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "post_attention_layernorm.weight", (hidden,)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def llama_config(size: str, dtype: str):
    """The transformers config of the synthetic Llama checkpoints of `size` (SIZES)."""
    from transformers import LlamaConfig

    hidden, inter, layers, vocab = SIZES[size]
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 128),
                       vocab_size=vocab, tie_word_embeddings=False, dtype=dtype, architectures=["LlamaForCausalLM"])


def write_models(workdir: Path, size: str, shard_bytes: int, device: str) -> dict[str, Path]:
    """Base + 3 experts (expert = base + small seeded noise), bf16, sharded safetensors."""
    import torch
    from safetensors.torch import save_file

    hidden, inter, layers, vocab = SIZES[size]
    names = ["base", "lm", "math", "code"]
    dirs = {n: workdir / f"{size}-{n}" for n in names}
    if all((d / "model.safetensors.index.json").exists() for d in dirs.values()):
        return dirs
    cfg = llama_config(size, "bfloat16")
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        cfg.to_json_file(d / "config.json")
    shards: dict[str, list] = {n: [] for n in names}  # per model: list of (fname, {name: tensor})
    cur: dict[str, dict] = {n: {} for n in names}
    cur_bytes = 0
    index: dict[str, str] = {}
    g = torch.Generator(device=device).manual_seed(0)

    def flush():
        nonlocal cur_bytes
        k = len(shards["base"]) + 1
        for n in names:
            fname = f"model-{k:05d}.safetensors"
            save_file(cur[n], dirs[n] / fname, metadata={"format": "pt"})
            shards[n].append(fname)
            cur[n] = {}
        cur_bytes = 0

    for tname, shape in llama_tensors(hidden, inter, layers, vocab):
        nbytes = 2
        for s in shape:
            nbytes *= s
        if cur["base"] and cur_bytes + nbytes > shard_bytes:
            flush()
        base = torch.randn(shape, generator=g, device=device).mul_(0.02)
        for i, n in enumerate(names):
            t = base if n == "base" else base + 0.002 * torch.randn(shape, generator=g, device=device)
            cur[n][tname] = t.to(torch.bfloat16).cpu()
        index[tname] = f"model-{len(shards['base']) + 1:05d}.safetensors"
        cur_bytes += nbytes
    flush()
    total = sum((dirs["base"] / f).stat().st_size for f in shards["base"])
    for n in names:
        (dirs[n] / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}))
    return dirs


# Runs the command from a fresh, small interpreter and reports the child's peak RSS. A
# child forked straight from this (large) process would inherit its resident-set high
# water mark: Linux keeps it across exec.
LAUNCHER = r"""
import os, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[2:], stdout=sys.stdout, stderr=subprocess.STDOUT)
_, status, ru = os.wait4(p.pid, 0)
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as fh:
    fh.write(f"{wall} {ru.ru_maxrss * 1024} {os.waitstatus_to_exitcode(status)}")
"""


def run_child(cmd: list[str], env=None, log: Path | None = None) -> tuple[float, int, int]:
    """Run `cmd`, return (wall seconds, peak RSS bytes of the child, exit status)."""
    result = Path(str(log or "/tmp/merge_bench_child") + ".rusage")
    with open(log or os.devnull, "w") as out:
        subprocess.run([sys.executable, "-c", LAUNCHER, str(result), *cmd], stdout=out,
                       stderr=subprocess.STDOUT, env=env, check=False)
    wall, rss, rc = result.read_text().split()
    return float(wall), int(rss), int(rc)


def read_write_floor(dirs: dict[str, Path], out_dir: Path, threads: int, device: str) -> dict:
    """Read every input shard once (pread into reused buffers, `threads` in parallel) and
    write one model's bytes to a new file; with CUDA also copy the inputs to the GPU."""
    import torch

    files = [f for d in dirs.values() for f in sorted(d.glob("*.safetensors"))]
    chunk = 64 << 20

    def read_file(f):
        buf = bytearray(chunk)
        mv = memoryview(buf)
        fd = os.open(f, os.O_RDONLY)
        off = 0
        try:
            while True:
                n = os.preadv(fd, [mv], off)
                if n <= 0:
                    break
                off += n
        finally:
            os.close(fd)
        return off

    for f in files:  # warm the page cache first, as the merges will find it
        read_file(f)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total_read = sum(pool.map(read_file, files))
    t_read = time.perf_counter() - t0
    out_bytes = sum(f.stat().st_size for f in dirs["base"].glob("*.safetensors"))
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "floor.bin"
    buf = bytes(chunk)
    t0 = time.perf_counter()
    n_chunks = out_bytes // chunk + 1

    def write_part(i):
        fd = os.open(target, os.O_WRONLY)
        try:
            os.pwrite(fd, buf, i * chunk)
        finally:
            os.close(fd)

    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.ftruncate(fd, n_chunks * chunk)
    os.close(fd)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write_part, range(n_chunks)))
    t_write = time.perf_counter() - t0
    target.unlink()
    # the same into a preallocated file (posix_fallocate), for comparison
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    t0 = time.perf_counter()
    os.posix_fallocate(fd, 0, n_chunks * chunk)
    os.close(fd)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write_part, range(n_chunks)))
    t_write_falloc = time.perf_counter() - t0
    target.unlink()
    res = {"read_s": round(t_read, 3), "read_bytes": total_read, "write_s": round(t_write, 3),
           "write_fallocate_s": round(t_write_falloc, 3), "write_bytes": n_chunks * chunk}
    # what every run pays before merging: interpreter + torch import (+ CUDA start-up)
    probe = "import time; t=time.perf_counter(); import torch; a=time.perf_counter()-t; " + (
        "torch.zeros(1, device='cuda'); torch.cuda.synchronize(); " if device == "cuda" else "") + \
        "print(a, time.perf_counter()-t)"
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False).stdout.split()
    res["python_torch_startup_s"] = round(time.perf_counter() - t0, 3)
    if len(out) == 2:
        res["import_torch_s"], res["torch_ready_s"] = round(float(out[0]), 3), round(float(out[1]), 3)
    if device == "cuda":
        pinned = torch.empty(chunk, dtype=torch.uint8).pin_memory()
        dev = torch.empty(total_read, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, total_read, chunk):
            n = min(chunk, total_read - i)
            dev[i:i + n].copy_(pinned[:n], non_blocking=True)
        torch.cuda.synchronize()
        res["h2d_s"] = round(time.perf_counter() - t0, 3)
        del dev
    res["floor_s"] = round(res["read_s"] + res["write_s"] + res.get("h2d_s", 0.0), 3)
    return res


def _mergekit_yaml() -> str:
    here = Path(sys.executable).parent / "mergekit-yaml"  # the same environment's script
    return str(here) if here.exists() else (shutil.which("mergekit-yaml") or "mergekit-yaml")


def mergekit_config(method: str, dirs: dict[str, Path]) -> dict:
    _, _, mk_method, per_model, glob = METHODS[method]
    return {"merge_method": mk_method, "base_model": str(dirs["base"]), "dtype": "bfloat16",
            "parameters": glob,
            "models": [{"model": str(dirs[n]), "parameters": per_model} for n in ("lm", "math", "code")]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="0.3b", choices=sorted(SIZES))
    ap.add_argument("--workdir", default="/tmp/merge_bench")
    ap.add_argument("--methods", default="task_arithmetic,ties,dare_ties,della")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--tools", default="mergeflow,mergekit",
                    help="mergeflow, mergekit, and mergeflow@DIR: mergeflow from the tree DIR (an A/B)")
    ap.add_argument("--shard-size", type=int, default=2 * 10**9, help="input shard bytes")
    ap.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 2))
    ap.add_argument("--json", help="append results as JSON lines to this file")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each method and tool (interleaved)")
    args = ap.parse_args(argv)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dirs = write_models(work, args.size, args.shard_size, args.device)
    n_params = 0
    for _, shape in llama_tensors(*SIZES[args.size]):
        k = 1
        for s in shape:
            k *= s
        n_params += k
    print(f"# size {args.size}: {n_params / 1e9:.2f} B params, "
          f"{n_params * 2 / 1e9:.2f} GB per model (bf16); models ready in {time.perf_counter() - t0:.0f} s",
          flush=True)
    floor = read_write_floor(dirs, work / "floor", args.threads, args.device)
    print(f"# read+write floor: {json.dumps(floor)}", flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # Same OpenMP setting for both tools (mergeflow's CLI sets it by default): on a busy
    # machine spinning OpenMP workers slow any threaded program several-fold.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    rows = []
    for method, rep in [(m, r) for r in range(args.repeats) for m in args.methods.split(",")]:
        mf_method, mf_params, *_ = METHODS[method]
        res = {"size": args.size, "method": method, "device": args.device, "repeat": rep, "floor": floor}
        for tool in args.tools.split(","):
            label = tool.replace("/", "_")
            out = work / f"out-{label}-{method}"
            shutil.rmtree(out, ignore_errors=True)
            log = work / f"log-{label}-{method}.txt"
            tool_env = env
            if tool.startswith("mergeflow@"):  # an A/B: mergeflow from another source tree (DIR/src)
                src = str(Path(tool.partition("@")[2]).resolve() / "src")
                here = str(Path(__file__).resolve().parents[1] / "src")
                path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != Path(here)]
                tool_env = dict(env, PYTHONPATH=os.pathsep.join([src, *path]))
            if tool.startswith("mergeflow"):
                cmd = [sys.executable, "-m", "mergeflow.merging", "--method", mf_method, "--base", str(dirs["base"])]
                for n in ("lm", "math", "code"):
                    cmd += ["--expert", f"{n}={dirs[n]}"]
                cmd += ["--params", json.dumps(mf_params), "--device", args.device, "--out", str(out),
                        "--seed", "42", "--threads", str(args.threads)]
            else:
                cfg = work / f"mergekit-{method}.yml"
                cfg.write_text(json.dumps(mergekit_config(method, dirs)))
                cmd = [_mergekit_yaml(), str(cfg), str(out),
                       "--no-write-model-card", "--no-copy-tokenizer", "--random-seed", "42"]
                if args.device == "cuda":
                    cmd.append("--cuda")
            os.sync()  # the previous run's output written back now, not during this one
            wall, rss, rc = run_child(cmd, tool_env, log)
            res[tool] = {"wall_s": round(wall, 2), "peak_rss_gib": round(rss / 2**30, 2), "rc": rc}
            if rc != 0:
                print(f"!! {tool} {method} failed (exit {rc}), see {log}:\n" + log.read_text()[-3000:], flush=True)
            if tool.startswith("mergeflow") and rc == 0:
                meta = json.loads((out / "mergeflow_merge.json").read_text())
                res[tool]["engine"] = meta.get("engine")
                res[tool]["timings"] = dict(meta.get("timings") or {}, engine_s=meta["wall_time_s"])
                # before the engine starts: interpreter, imports (torch), CLI; after: exit
                res[tool]["outside_engine_s"] = round(wall - meta["wall_time_s"], 3)
            shutil.rmtree(out, ignore_errors=True)
            print(f"  {method:16s} {tool:15s} {wall:7.2f} s  peak RSS {rss / 2**30:6.2f} GiB"
                  + (f"  {res[tool]['timings']}" if "timings" in res[tool] else ""), flush=True)
        if "mergeflow" in res and "mergekit" in res:
            res["speedup"] = round(res["mergekit"]["wall_s"] / res["mergeflow"]["wall_s"], 2)
            res["rss_ratio"] = round(res["mergeflow"]["peak_rss_gib"] / max(res["mergekit"]["peak_rss_gib"], 1e-9), 2)
        rows.append(res)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(res) + "\n")
    print()
    print("| size | method | device | mergeflow s (merge phase) | mergekit s | speedup | "
          "RSS mergeflow / mergekit GiB | floor s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mf, mk = r.get("mergeflow", {}), r.get("mergekit", {})
        phase = (mf.get("timings") or {}).get("merge_s")
        print(f"| {r['size']} | {r['method']} | {r['device']} | {mf.get('wall_s', '-')} ({phase}) "
              f"| {mk.get('wall_s', '-')} | {r.get('speedup', '-')} | "
              f"{mf.get('peak_rss_gib', '-')} / {mk.get('peak_rss_gib', '-')} | {floor['floor_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
