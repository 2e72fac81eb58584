#!/usr/bin/env python
"""Time the per-matrix SVD steps of TSV-M and Iso-C (`steps.tsv_merge`, `steps.iso_merge`) on
Llama-2-13B-shaped task vectors, three experts, on one device; and, where CUDA is, how far
the CUDA result is from the CPU's (the SVD methods agree to rounding, not bit for bit).

    PYTHONPATH=src python benchmarks/svd_bench.py --device cuda --json out.jsonl

mergekit has neither method; FusionBench's reference code runs the same torch calls per
matrix (torch.linalg.svd in float32), so the step's time is what either spends per matrix.

`--peer fusionbench` (issue 17) times FusionBench's own functions on the same task-vector
matrices, side by side with mergeflow's steps (TSV-M, Iso-C and Iso-CTS by default),
interleaved (the order alternates from one run to the next), on the same device, and reports
the largest absolute difference of the two results per matrix:

    TSV-M    TSVM_utils.compute_and_sum_svd_mem_reduction  vs steps.tsv_merge(deltas)
    Iso-C    iso_utils.iso_c                               vs steps.iso_merge(deltas.sum(0))
    Iso-CTS  iso_utils.iso_cts(common_space_fraction=f)    vs steps.iso_cts_merge(deltas, f)

(the task vectors alone: the scaling by alpha / lambda, and the addition to the base, that
FusionBench's algorithm classes and mergeflow's methods do afterwards are left out on both
sides). Each FusionBench function takes a list of state dicts, one per task; it gets
[{"w": deltas[t]} for t in tasks] (views of the same tensors mergeflow gets; one 2-D key, so
its per-key loop does one matrix and its branch for 1-D / excluded keys, a plain mean, is
not taken), with `accelerator` set to the device the tensors are already on.

The FusionBench modules are loaded one of two ways (`--peer-import`):
  files (default): the two module files, `method/task_singular_vector/utils/TSVM_utils.py`
    and `method/isotropic_merging/iso_utils.py`, executed as they are, with the package
    __init__ files above them (fusion_bench, fusion_bench.method, ...) replaced by empty
    packages pointing at the same folders. fusion_bench's own __init__ imports its
    constants / metrics / optim / tasks and fusion_bench.method's, which pull in hydra-core,
    omegaconf, datasets, bidict, lightning, transformers...: none of them is needed by these
    functions, which import only torch, fusion_bench.utils (whose real __init__ is lazy:
    functools -> packaging, then timer for `timeit_context`) and fusion_bench.utils.type
    (typing_extensions). So the one wheel fusion-bench (installed with --no-deps) is enough.
  package: a plain `import fusion_bench.method...` (needs fusion-bench's dependencies).
`--dtype float64` runs both sides without float32 rounding. Either way the row records the fusion-bench version (from its installed metadata) and the
sha256 of the two module files.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import time

SHAPES = {"mlp_up (13824 x 5120)": (13824, 5120), "mlp_down (5120 x 13824)": (5120, 13824),
          "attn (5120 x 5120)": (5120, 5120), "small (256 x 688)": (256, 688)}

FB_PACKAGES = ("fusion_bench", "fusion_bench.method", "fusion_bench.method.task_singular_vector",
               "fusion_bench.method.task_singular_vector.utils", "fusion_bench.method.isotropic_merging")
FB_MODULES = {"tsv_m": "fusion_bench.method.task_singular_vector.utils.TSVM_utils",
              "iso_c": "fusion_bench.method.isotropic_merging.iso_utils",
              "iso_cts": "fusion_bench.method.isotropic_merging.iso_utils"}
FB_FUNCTIONS = {"tsv_m": "compute_and_sum_svd_mem_reduction", "iso_c": "iso_c", "iso_cts": "iso_cts"}


def shape_of(label: str) -> tuple[int, int]:
    """A key of SHAPES, or 'MxN' (e.g. 256x512)."""
    if label in SHAPES:
        return SHAPES[label]
    m, n = label.lower().split("x")
    return int(m), int(n)


def load_fusionbench(how: str = "files") -> dict:
    """FusionBench's three functions, their module files' sha256 and the fusion-bench version."""
    import importlib
    import importlib.util
    import sys
    import types
    from importlib.metadata import PackageNotFoundError, version

    if how == "files":
        spec = importlib.util.find_spec("fusion_bench")  # finds the package without running its __init__
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("fusion_bench is not on sys.path (install the fusion-bench wheel)")
        root = list(spec.submodule_search_locations)[0]
        for name in FB_PACKAGES:  # empty packages in place of the __init__s, same folders
            if name in sys.modules:
                continue
            pkg = types.ModuleType(name)
            pkg.__path__ = [os.path.join(root, *name.split(".")[1:])]
            pkg.__package__ = name
            pkg.__file__ = None
            sys.modules[name] = pkg
            parent, _, leaf = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], leaf, pkg)
    elif how != "package":
        raise ValueError(f"--peer-import: files or package, not {how!r}")
    mods = {k: importlib.import_module(m) for k, m in FB_MODULES.items()}
    try:
        ver = version("fusion-bench")
    except PackageNotFoundError:
        ver = None
    sha = {}
    for m in mods.values():
        with open(m.__file__, "rb") as fh:
            sha[m.__name__.rsplit(".", 1)[1] + ".py"] = hashlib.sha256(fh.read()).hexdigest()[:16]
    return {"functions": {k: getattr(mods[k], FB_FUNCTIONS[k]) for k in mods}, "version": ver,
            "import": how, "sha256": sha}


def _ours(steps, method: str, common_fraction: float):
    return {"tsv_m": lambda x: steps.tsv_merge(x),
            "iso_c": lambda x: steps.iso_merge(x.sum(0)),
            "iso_cts": lambda x: steps.iso_cts_merge(x, common_fraction)}[method]


def _peers(fb: dict, method: str, common_fraction: float, accelerator: str):
    f = fb["functions"][method]
    kw = {"exclude_keys": [], "accelerator": accelerator}
    if method == "iso_cts":
        kw["common_space_fraction"] = common_fraction
    return lambda tvs: f(tvs, **kw)["w"]


def _timed(fn, arg, dev, torch):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # FusionBench prints a line per key; both sides alike
        out = fn(arg)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return out, time.perf_counter() - t


def _emit(row, args):
    print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def main(argv=None) -> int:
    import torch

    from mergeflow.merging import steps

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs after the first (warm-up) one")
    ap.add_argument("--shapes", default=",".join(list(SHAPES)[:3]),
                    help="comma-separated keys of SHAPES, or MxN (e.g. 256x512)")
    ap.add_argument("--methods", help="comma-separated of tsv_m, iso_c, iso_cts (default: tsv_m,iso_c; "
                                      "with --peer all three)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                    help="of the task vectors (float64: the two sides' arithmetic without float32 rounding)")
    ap.add_argument("--common-fraction", type=float, default=0.8, help="Iso-CTS's common_space_fraction")
    ap.add_argument("--compare-cpu", action="store_true", help="also run on the CPU once and report max |diff|")
    ap.add_argument("--peer", choices=["fusionbench"], help="also time FusionBench's function, interleaved")
    ap.add_argument("--peer-import", default="files", choices=["files", "package"],
                    help="how FusionBench's modules are loaded (see the module docstring)")
    ap.add_argument("--json", help="append results as JSON lines to this file")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    methods = (args.methods or ("tsv_m,iso_c,iso_cts" if args.peer else "tsv_m,iso_c")).split(",")
    fb = None
    if args.peer:
        t = time.perf_counter()
        fb = load_fusionbench(args.peer_import)
        print(f"# fusion-bench {fb['version']} ({fb['import']} import, {time.perf_counter() - t:.2f} s), "
              f"torch {torch.__version__}, files {fb['sha256']}", flush=True)
    rows = []
    for si, label in enumerate(args.shapes.split(",")):
        m, n = shape_of(label)
        g = torch.Generator().manual_seed(0)
        d = (0.002 * torch.randn(args.experts, m, n, generator=g)).to(dev, getattr(torch, args.dtype))
        for mi, name in enumerate(methods):
            fn = _ours(steps, name, args.common_fraction)
            if not args.peer:
                times = []
                for _ in range(args.repeats + 1):  # the first run warms cuSOLVER / MKL up
                    out, dt = _timed(fn, d, dev, torch)
                    times.append(dt)
                row = {"shape": label, "method": name, "device": str(dev), "experts": args.experts,
                       "threads": torch.get_num_threads(), "warm_s": round(min(times[1:] or times), 3),
                       "first_s": round(times[0], 3)}
            else:
                tvs = [{"w": d[i]} for i in range(args.experts)]  # views: FusionBench's list of state dicts
                peer = _peers(fb, name, args.common_fraction, str(dev))
                times, ptimes, orders = [], [], []
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)  # peak_gpu_mem_gib: this matrix and method, both tools
                for rep in range(args.repeats + 1):  # interleaved; who goes first alternates
                    first_ours = (rep + mi + si) % 2 == 0
                    orders.append("mergeflow,fusionbench" if first_ours else "fusionbench,mergeflow")
                    for side in ((0, 1) if first_ours else (1, 0)):
                        if side == 0:
                            out, dt = _timed(fn, d, dev, torch)
                            times.append(dt)
                        else:
                            pout, dt = _timed(peer, tvs, dev, torch)
                            ptimes.append(dt)
                warm, pwarm = min(times[1:] or times), min(ptimes[1:] or ptimes)
                row = {"shape": label, "method": name, "device": str(dev), "experts": args.experts,
                       "threads": torch.get_num_threads(), "warm_s": round(warm, 3), "first_s": round(times[0], 3),
                       "peer": "fusionbench", "peer_function": f"{FB_MODULES[name]}.{FB_FUNCTIONS[name]}",
                       "peer_warm_s": round(pwarm, 3), "peer_first_s": round(ptimes[0], 3),
                       "ratio_peer_over_mergeflow": round(pwarm / warm, 3) if warm > 0 else None,
                       "times_s": [round(x, 3) for x in times], "peer_times_s": [round(x, 3) for x in ptimes],
                       "order": orders,
                       "max_abs_diff_vs_peer": float((out.double() - pout.double()).abs().max()),
                       "max_abs_out": float(pout.abs().max()),
                       "dtype": str(d.dtype).replace("torch.", ""), "torch": torch.__version__,
                       "fusion_bench": fb["version"], "peer_import": fb["import"], "peer_files_sha256": fb["sha256"],
                       "loadavg_1m": round(os.getloadavg()[0], 2)}
                if name == "iso_cts":
                    row["common_space_fraction"] = args.common_fraction
                if dev.type == "cuda":
                    row["gpu"] = torch.cuda.get_device_name(dev)
                    row["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
                del pout
            if args.compare_cpu and dev.type != "cpu":
                ref = fn(d.cpu())
                row["max_abs_diff_vs_cpu"] = float((out.cpu() - ref).abs().max())
                row.setdefault("max_abs_out", float(ref.abs().max()))
            del out
            rows.append(row)
            _emit(row, args)
    if args.peer:
        print("\n| matrix | method | device | mergeflow s | FusionBench s | FB / mf | max abs diff | max abs out |\n"
              "|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['shape']} | {r['method']} | {r['device']} | {r['warm_s']} | {r['peer_warm_s']} | "
                  f"{r['ratio_peer_over_mergeflow']} | {r['max_abs_diff_vs_peer']:.2g} | {r['max_abs_out']:.2g} |")
        return 0
    print("\n| matrix | method | device | s per matrix (3 experts) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['method']} | {r['device']} | {r['warm_s']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
