#!/usr/bin/env python
"""mergeflow against FusionBench 0.2.33 on the same float32 checkpoints: agreement and time.

Writes a base and three experts (Llama tensor names and shapes of `merge_bench.py --size`,
float32, one safetensors file each; expert t = base + a_t · shared + own noise, so the
task vectors are correlated and the pairwise cosines differ), then for each method runs
mergeflow (`python -m mergeflow.merging`, the `mergeflow merge` command) and FusionBench's
own function on the same files, each as a whole process, side by side, the order
alternating between interleaved repeats. FusionBench runs in its own environment
(`--fusionbench-python`, `.venv-fusionbench`): this file again, as `--fusionbench-worker`,
loads the files with safetensors, calls the lowest-level FusionBench function that takes
state dicts or flat tensors (not its Hydra/Lightning program), adds the scaled task vector
to the base as FusionBench's algorithm class does, and saves the result.

Per method it reports, from the first repeat's two outputs: the largest absolute
difference of any weight, the largest difference relative to the tensor's largest merged
change (max |a − b| / max |b − θ_b|, per tensor, the worst tensor), whether every tensor's
bytes are equal, and how many elements one side changed and the other left at the base
(masks); for DARE (random on both sides, different generators) statistics of each side
against their expectation instead. TSV-M, Iso-C and Iso-CTS, whose outputs differ by
rounding, are computed again in float64 (FusionBench's functions, and mergeflow's method
functions on whole-tensor blocks, in FusionBench's environment with `src/` on the path),
and FusionBench's Model Stock once more with the mean cosine in place of its mean angle
(the one deliberate difference). Timing: whole-process wall and peak RSS (from wait4, as
merge_bench.py), and inside the process mergeflow's engine time and merge phase against
FusionBench's import, load, merge-function and save times. The load average is recorded
with every run (the box may be shared).

    .venv/bin/python benchmarks/fusionbench_compare.py --workdir /tmp/fbc --repeats 3 \\
        --json benchmarks/measured/DATE-cpu-fusionbench-compare.jsonl

See benchmarks/README.md ("Issue 17 methods against FusionBench 0.2.33, CPU").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

EXPERTS = ("lm", "math", "code")
SHARED = (1.0, 0.6, 0.3)  # a_t: each expert's share of the common direction (pairwise cosines differ)
DELTA_SCALE = 0.002
SEED = 42

# name -> mergeflow (method, params), FusionBench (what the worker calls, its params), experts,
# random, and the FusionBench code the worker runs.
METHODS = {
    "tsv_m": (("tsv_m", {"lambda": 0.7}), ("tsv_m", {"alpha": 0.7}), 3, False,
              "task_singular_vector/utils/TSVM_utils.compute_and_sum_svd_mem_reduction; "
              "alpha (a float) scales the merged task vector, as TaskSingularVectorMerging.run"),
    "iso_c": (("iso_c", {"lambda": 1.3}), ("iso_c", {"scaling_factor": 1.3}), 3, False,
              "isotropic_merging/iso_utils.iso_c; + scaling_factor x, as ISO_C_Merge.run"),
    "iso_cts": (("iso_cts", {"lambda": 1.5, "common_space_fraction": 0.8}),
                ("iso_cts", {"scaling_factor": 1.5, "common_space_fraction": 0.8}), 3, False,
                "isotropic_merging/iso_utils.iso_cts; + scaling_factor x, as ISO_CTS_Merge.run"),
    "task_arithmetic": (("task_arithmetic", {"lambda": 0.3}), ("task_arithmetic", {"scaling_factor": 0.3}), 3, False,
                        "task_arithmetic/task_arithmetic.TaskArithmeticAlgorithm.run on a pool of in-memory "
                        "modules (state_dict_sub / add / mul)"),
    "ties": (("ties", {"density": 0.2, "trim_scope": "model", "lambda": 0.3}),
             ("ties", {"threshold": 20, "merge_func": "mean", "scaling_factor": 0.3}), 3, False,
             "ties_merging/ties_merging_utils.ties_merging on the flattened model, merge_func mean; "
             "the flatten / unflatten and scaling of TiesMergingAlgorithm.run"),
    "ties_q": (("ties", {"density": 0.25, "trim_scope": "model", "lambda": 0.3}),
               ("ties", {"threshold": 25, "merge_func": "mean", "scaling_factor": 0.3}), 3, False,
               "as ties, density 0.25: n x density is a whole number here, so both rank conventions agree"),
    "ties_dis_sum": (("consensus_ties", {"density": 0.2, "trim_scope": "model", "lambda": 0.3,
                                         "tall_mask_lambda": 1.0, "k": 0}),
                     ("ties", {"threshold": 20, "merge_func": "sum", "scaling_factor": 0.3}), 3, False,
                     "ties_merging (FusionBench's default merge_func sum) against mergeflow consensus_ties "
                     "with k 0 (no consensus mask: TIES with the disjoint sum)"),
    "consensus_ta": (("consensus_ta", {"tall_mask_lambda": 0.4, "k": 2, "lambda": 0.3}),
                     ("consensus", {"tall_mask_lambda": 0.4, "k": 2, "scaling_factor": 0.3, "ties": False}), 3, False,
                     "tall_mask/utils.generate_task_masks (flat) + construct_consensus_mask's count "
                     "(that function reads the masks from disk); no consensus merge class in FusionBench"),
    "consensus_ties": (("consensus_ties", {"density": 0.2, "trim_scope": "model", "tall_mask_lambda": 0.4, "k": 2,
                                           "lambda": 0.3}),
                       ("consensus", {"tall_mask_lambda": 0.4, "k": 2, "scaling_factor": 0.3, "ties": True,
                                      "threshold": 20}), 3, False,
                       "ties_merging (merge_func sum) + tall_mask/utils.generate_task_masks + the consensus count"),
    "model_stock": (("model_stock", {}), ("model_stock", {}), 3, False,
                    "model_stock/model_stock.ModelStock.run on a pool of in-memory modules (its N-model "
                    "path is inside run)"),
    "model_stock_2": (("model_stock", {}), ("model_stock", {}), 2, False,
                      "ModelStock.run with two experts (compute_angle, compute_ratio, merge_weights)"),
    "dare": (("dare", {"drop_rate": 0.5, "rescale": "inverse", "combine": "task_arithmetic", "lambda": 0.3}),
             ("dare", {"sparsity_ratio": 0.5, "rescale": True, "scaling_factor": 0.3,
                       "only_on_linear_weights": False}), 3, True,
             "dare/task_arithmetic.DareTaskArithmetic.run on a pool of in-memory modules "
             "(param_random_drop_ on every tensor, state_dict_sum)"),
}

# mergeflow methods of issue 17 with no FusionBench counterpart (0.2.33 is the newest release)
NOT_IN_FUSIONBENCH = {
    "pcb": "no PCB-merging in FusionBench 0.2.33 (no module, config or mention); checked against the "
           "authors' PCB_merge written out in tests/test_merge_methods.py",
    "breadcrumbs": "no Model Breadcrumbs in FusionBench 0.2.33; checked against mergekit",
    "breadcrumbs_ties": "no Model Breadcrumbs in FusionBench 0.2.33; checked against mergekit",
}


# ---------------------------------------------------------------------------------------
# the FusionBench side (runs in .venv-fusionbench; imports nothing of mergeflow)
# ---------------------------------------------------------------------------------------


def _as_module(sd, torch):
    """An nn.Module whose state_dict() is `sd` (nested modules from the dotted names), for
    the FusionBench functions and algorithm classes that take modules."""
    root = torch.nn.Module()
    for name, t in sd.items():
        *path, leaf = name.split(".")
        m = root
        for p in path:
            if p not in m._modules:
                m.add_module(p, torch.nn.Module())
            m = m._modules[p]
        m.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=True))
    return root


def _pool(base, experts, torch):
    """A FusionBench model pool of in-memory modules: the base as `_pretrained_`, then the experts."""
    from fusion_bench.modelpool import BaseModelPool

    models = {"_pretrained_": _as_module(base, torch)}
    models.update({f"expert{i}": _as_module(e, torch) for i, e in enumerate(experts)})
    return BaseModelPool(models)


def _flat(base, experts):
    from fusion_bench.method.ties_merging.ties_merging_utils import state_dict_to_vector

    flat_ft = __import__("torch").vstack([state_dict_to_vector(e, []) for e in experts])
    flat_ptm = state_dict_to_vector(base, [])
    return flat_ft, flat_ptm, flat_ft - flat_ptm


# the FusionBench modules each kind calls, imported before the merge is timed (fusion_bench
# imports its methods lazily: the first `from fusion_bench.method... import` costs seconds)
FB_MODULES = {
    "tsv_m": ["fusion_bench.method.task_singular_vector.utils.TSVM_utils"],
    "iso_c": ["fusion_bench.method.isotropic_merging.iso_utils"],
    "iso_cts": ["fusion_bench.method.isotropic_merging.iso_utils"],
    "task_arithmetic": ["fusion_bench.method.task_arithmetic.task_arithmetic", "fusion_bench.modelpool"],
    "ties": ["fusion_bench.method.ties_merging.ties_merging_utils"],
    "consensus": ["fusion_bench.method.ties_merging.ties_merging_utils", "fusion_bench.method.tall_mask.utils"],
    "model_stock": ["fusion_bench.method.model_stock.model_stock", "fusion_bench.modelpool"],
    "model_stock_mean_cos": ["fusion_bench.method.model_stock.model_stock"],
    "dare": ["fusion_bench.method.dare.task_arithmetic", "fusion_bench.modelpool"],
}


def fusionbench_merge(kind: str, p: dict, base: dict, experts: list[dict], seed: int) -> dict:
    import torch
    from fusion_bench.utils.state_dict_arithmetic import state_dict_add, state_dict_mul, state_dict_sub

    if kind == "tsv_m":
        from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction

        tvs = [state_dict_sub(e, base) for e in experts]
        tv = compute_and_sum_svd_mem_reduction(tvs, exclude_keys=[], accelerator="cpu")
        tv = state_dict_mul(state_dict=tv, scalar=p["alpha"])  # TaskSingularVectorMerging.run, float alpha
        return state_dict_add(tv, base)
    if kind in ("iso_c", "iso_cts"):
        from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts

        tvs = [state_dict_sub(e, base) for e in experts]
        tv = (iso_c(tvs, accelerator="cpu", exclude_keys=[]) if kind == "iso_c"
              else iso_cts(tvs, common_space_fraction=p["common_space_fraction"], accelerator="cpu", exclude_keys=[]))
        return state_dict_add(base, state_dict_mul(tv, p["scaling_factor"]))  # ISO_C_Merge / ISO_CTS_Merge.run
    if kind == "task_arithmetic":
        # TaskArithmeticAlgorithm.run (its module-level task_arithmetic_merge raises a TypeError on
        # modules with parameters in 0.2.33: it adds a Tensor to state_dict(keep_vars=True)'s Parameters)
        from fusion_bench.method.task_arithmetic.task_arithmetic import TaskArithmeticAlgorithm

        merged = TaskArithmeticAlgorithm(scaling_factor=p["scaling_factor"]).run(_pool(base, experts, torch))
        return {k: v.detach() for k, v in merged.state_dict().items()}
    if kind == "ties":
        from fusion_bench.method.ties_merging.ties_merging_utils import ties_merging, vector_to_state_dict

        _, flat_ptm, tv_flat = _flat(base, experts)  # TiesMergingAlgorithm.run, line for line
        merged_tv = ties_merging(tv_flat, reset_thresh=p["threshold"], merge_func=p["merge_func"])
        return vector_to_state_dict(flat_ptm + p["scaling_factor"] * merged_tv, base, remove_keys=[])
    if kind == "consensus":
        from fusion_bench.method.tall_mask.utils import generate_task_masks
        from fusion_bench.method.ties_merging.ties_merging_utils import ties_merging, vector_to_state_dict

        flat_ft, flat_ptm, tv_flat = _flat(base, experts)
        merged_tv = (ties_merging(tv_flat, reset_thresh=p["threshold"], merge_func="sum") if p["ties"]
                     else tv_flat.sum(0))
        masks = generate_task_masks(tv_flat, flat_ft, flat_ptm, tv=merged_tv, tall_mask_lambda=p["tall_mask_lambda"])
        # construct_consensus_mask: count each parameter's tasks, keep where >= prun_thre_k
        consensus = masks.float().sum(0) >= p["k"]
        return vector_to_state_dict(flat_ptm + p["scaling_factor"] * (merged_tv * consensus), base, remove_keys=[])
    if kind == "model_stock":
        from fusion_bench.method.model_stock.model_stock import ModelStock

        merged = ModelStock(ignore_keys=[], model_save_path=None).run(_pool(base, experts, torch))
        return {k: v.detach() for k, v in merged.state_dict().items()}
    if kind == "model_stock_mean_cos":
        # diagnostic, not FusionBench's method: ModelStock.run's N-model path with the pairwise
        # cosines (compute_angle(return_cos=True)) averaged instead of the angles, as mergekit
        from fusion_bench.method.model_stock.model_stock import EPS, compute_angle

        k = len(experts)
        cos = [compute_angle(experts[i], experts[j], base, return_cos=True) for i in range(k) for j in range(i + 1, k)]
        out = {}
        for key in base:
            c = sum(d[key] for d in cos) / len(cos)
            r = k * c / ((k - 1) * c + 1 + EPS)
            avg = torch.zeros_like(experts[0][key])
            for e in experts:
                avg += e[key]
            avg /= k
            out[key] = avg * r + base[key] * (1.0 - r)
        return out
    if kind == "dare":
        from fusion_bench.method.dare.task_arithmetic import DareTaskArithmetic

        torch.manual_seed(seed)
        merged = DareTaskArithmetic(**p).run(_pool(base, experts, torch))
        return {k: v.detach() for k, v in merged.state_dict().items()}
    raise ValueError(kind)


def worker(spec_file: str) -> int:
    t0 = time.perf_counter()
    spec = json.loads(Path(spec_file).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    from safetensors.torch import load_file, save_file

    import importlib

    import fusion_bench.utils.state_dict_arithmetic  # noqa: F401  (the package: Lightning, Hydra, transformers)

    for mod in FB_MODULES[spec["kind"]]:
        importlib.import_module(mod)

    t1 = time.perf_counter()
    base = load_file(spec["base"])
    experts = [load_file(f) for f in spec["experts"]]
    t2 = time.perf_counter()
    with torch.no_grad():
        merged = fusionbench_merge(spec["kind"], spec["params"], base, experts, spec["seed"])
    t3 = time.perf_counter()
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: merged[k].contiguous() for k in base}, out / "model.safetensors", metadata={"format": "pt"})
    t4 = time.perf_counter()
    (out / "fusionbench_timings.json").write_text(json.dumps({
        "import_s": round(t1 - t0, 3), "load_s": round(t2 - t1, 3), "merge_s": round(t3 - t2, 3),
        "save_s": round(t4 - t3, 3), "fusion_bench_version": _version("fusion-bench"),
        "torch_version": torch.__version__, "torch_threads": torch.get_num_threads()}))
    return 0


# methods whose float32 outputs differ by rounding alone (SVDs, reduction order): both
# computed again in float64 from the same float32 inputs, in FusionBench's environment with
# mergeflow's source on the path (its method functions on whole-tensor blocks, no engine)
CHECK64 = ("tsv_m", "iso_c", "iso_cts")


def check_worker(spec_file: str) -> int:
    import contextlib
    import io

    import torch

    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec["threads"])
    from safetensors.torch import load_file

    from mergeflow.merging import methods as mf_methods
    from mergeflow.merging.steps import Block

    base32 = load_file(spec["base"])
    ex32 = [load_file(f) for f in spec["experts"]]
    base = {k: v.double() for k, v in base32.items()}
    experts = [{k: v.double() for k, v in e.items()} for e in ex32]
    res = {}
    for name, (mf_method, mf_params, fb_kind, fb_params) in spec["float64"].items():
        with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            fb = fusionbench_merge(fb_kind, fb_params, base, experts, SEED)
        meth = mf_methods.build(mf_method, mf_params, list(EXPERTS), SEED)
        mf = {}
        with torch.no_grad():
            for k, t in base.items():
                cols = t.shape[-1]
                blk = Block(k, t.reshape(-1, cols).clone(), torch.stack([e[k].reshape(-1, cols) for e in experts]),
                            0, SEED, shape=tuple(t.shape))
                mf[k] = meth.merge(blk).reshape(t.shape)
        r = {"float64_max_abs_diff": max(float((mf[k] - fb[k]).abs().max()) for k in base),
             "float64_max_rel_diff": max(float((mf[k] - fb[k]).abs().max() / (fb[k] - base[k]).abs().max())
                                         for k in base)}
        # each float32 output (the timed runs') against the float64 result
        for side in ("mergeflow", "fusionbench"):
            out = load_file(Path(spec["outputs"][name][side]) / "model.safetensors")
            r[f"{side}_float32_max_abs_err"] = max(float((out[k].double() - fb[k]).abs().max()) for k in base)
        res[name] = r
        print(name, json.dumps(r), flush=True)
    for name, (fb_kind, mf_out) in spec["float32"].items():
        with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            fb = fusionbench_merge(fb_kind, {}, base32, ex32, SEED)
        out = load_file(Path(mf_out) / "model.safetensors")
        res[name] = {"max_abs_diff": max(float((out[k].double() - fb[k].double()).abs().max()) for k in base32),
                     "max_rel_diff": max(float((out[k].double() - fb[k].double()).abs().max()
                                               / (fb[k].double() - base32[k].double()).abs().max()) for k in base32)}
        print(name, json.dumps(res[name]), flush=True)
    Path(spec["result"]).write_text(json.dumps(res))
    return 0


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------
# the driver (runs in mergeflow's .venv)
# ---------------------------------------------------------------------------------------


def write_models(workdir: Path, size: str) -> dict[str, Path]:
    """Base + 3 experts, float32, one model.safetensors each, Llama names and config."""
    import torch
    from safetensors.torch import save_file

    from merge_bench import SIZES, llama_config, llama_tensors

    hidden, inter, layers, vocab = SIZES[size]
    names = ("base", *EXPERTS)
    dirs = {n: workdir / f"{size}-f32-{n}" for n in names}
    if all((d / "model.safetensors").exists() for d in dirs.values()):
        return dirs
    cfg = llama_config(size, "float32")
    g = torch.Generator().manual_seed(0)
    sds = {n: {} for n in names}
    for tname, shape in llama_tensors(hidden, inter, layers, vocab):
        # norms start at 1 as in a real Llama; matrices ~ N(0, 0.02^2)
        base = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g).mul_(0.02)
        shared = torch.randn(shape, generator=g)
        sds["base"][tname] = base
        for n, a in zip(EXPERTS, SHARED):
            sds[n][tname] = base + DELTA_SCALE * (a * shared + torch.randn(shape, generator=g))
    for n in names:
        shutil.rmtree(dirs[n], ignore_errors=True)
        dirs[n].mkdir(parents=True)
        cfg.to_json_file(dirs[n] / "config.json")
        save_file(sds[n], dirs[n] / "model.safetensors", metadata={"format": "pt"})
    return dirs


def compare(mf_dir: Path, fb_dir: Path, base_dir: Path) -> dict:
    """Element-wise agreement of two merged models (float32, same tensor names)."""
    import torch
    from safetensors.torch import load_file

    a, b, base = (load_file(d / "model.safetensors") for d in (mf_dir, fb_dir, base_dir))
    assert set(a) == set(b) == set(base), "tensor names differ"
    res = {"tensors": len(a), "elements": 0, "max_abs_diff": 0.0, "max_abs_diff_2d": 0.0, "max_abs_diff_1d": 0.0,
           "max_rel_diff": 0.0, "worst_tensor": None, "tensors_bytes_equal": 0, "elements_differing": 0,
           "changed_mismatch": 0, "max_abs_merged_change": 0.0}
    for k in sorted(a):
        x, y, z = a[k], b[k], base[k]
        assert x.dtype == y.dtype == torch.float32 and x.shape == y.shape, k
        same = torch.equal(x.view(torch.int32), y.view(torch.int32))
        res["tensors_bytes_equal"] += same
        res["elements"] += x.numel()
        d = (x.double() - y.double()).abs()
        mad = float(d.max())
        change = float((y.double() - z.double()).abs().max())
        rel = mad / change if change > 0 else (0.0 if mad == 0 else math.inf)
        res["elements_differing"] += int((x.view(torch.int32) != y.view(torch.int32)).sum())
        res["changed_mismatch"] += int(((x != z) ^ (y != z)).sum())
        res["max_abs_merged_change"] = max(res["max_abs_merged_change"], change)
        dim_key = "max_abs_diff_2d" if x.dim() == 2 else "max_abs_diff_1d"
        res[dim_key] = max(res[dim_key], mad)
        if mad > res["max_abs_diff"]:
            res["max_abs_diff"], res["worst_tensor"] = mad, k
        res["max_rel_diff"] = max(res["max_rel_diff"], rel)
    res["bytes_equal"] = res["tensors_bytes_equal"] == res["tensors"]
    return res


def dare_stats(out_dir: Path, base_dir: Path, expert_dirs: list[Path], p: float, lam: float) -> dict:
    """DARE (drop p, rescale 1/(1-p), sum, x lambda) against its expectation, in float64:
    the share of elements left at the base (every expert dropped them: p^T expected), and
    sum (merged - TA)^2 / (lambda^2 p/(1-p) sum_t |delta_t|^2) (1 expected), TA = the
    undropped task arithmetic; and the mean residual in standard errors."""
    import torch
    from safetensors.torch import load_file

    out, base = load_file(out_dir / "model.safetensors"), load_file(base_dir / "model.safetensors")
    experts = [load_file(d / "model.safetensors") for d in expert_dirs]
    n = at_base = 0
    sq = expect = s1 = 0.0
    for k in base:
        deltas = [e[k].double() - base[k].double() for e in experts]
        ta = base[k].double() + lam * sum(deltas)
        r = out[k].double() - ta
        n += r.numel()
        at_base += int((out[k] == base[k]).sum())
        sq += float((r * r).sum())
        s1 += float(r.sum())
        expect += lam ** 2 * p / (1 - p) * sum(float((d * d).sum()) for d in deltas)
    t = len(experts)
    se_share = math.sqrt(p ** t * (1 - p ** t) / n)
    mean, var = s1 / n, sq / n
    return {"share_at_base": at_base / n, "share_expected": p ** t,
            "share_z": round((at_base / n - p ** t) / se_share, 2),
            "residual_energy_ratio": sq / expect, "residual_mean_z": round(mean / math.sqrt(var / n), 2)}


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--fusionbench-worker"]:
        return worker(argv[1])
    if argv[:1] == ["--check-worker"]:
        return check_worker(argv[1])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from merge_bench import SIZES, run_child

    root = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ap.add_argument("--workdir", default="/tmp/fusionbench_compare")
    ap.add_argument("--methods", default=",".join([*METHODS, *NOT_IN_FUSIONBENCH]))
    ap.add_argument("--repeats", type=int, default=3, help="runs of each method and tool, interleaved")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fusionbench-python", default=str(root / ".venv-fusionbench" / "bin" / "python"))
    ap.add_argument("--json", help="append one JSON line per method to this file")
    args = ap.parse_args(argv)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dirs = write_models(work, args.size)
    print(f"# {args.size} float32 checkpoints in {work} ({time.perf_counter() - t0:.0f} s)", flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # both tools (mergeflow's CLI sets it itself)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"# uptime at start: {uptime}", flush=True)
    methods = args.methods.split(",")
    rows = {m: {"method": m, "size": args.size, "dtype": "float32", "threads": args.threads,
                "uptime_start": uptime, "runs": []} for m in methods}
    for rep in range(args.repeats):
        for m in methods:
            if m in NOT_IN_FUSIONBENCH:
                continue
            (mf_method, mf_params), (fb_kind, fb_params), n_exp, _, _ = METHODS[m]
            experts = EXPERTS[:n_exp]
            tools = ("mergeflow", "fusionbench") if (rep + methods.index(m)) % 2 == 0 else ("fusionbench", "mergeflow")
            run = {"repeat": rep, "order": list(tools)}
            for tool in tools:
                out = work / f"out-{tool}-{m}"
                shutil.rmtree(out, ignore_errors=True)
                log = work / f"log-{tool}-{m}.txt"
                if tool == "mergeflow":
                    cmd = [sys.executable, "-m", "mergeflow.merging", "--method", mf_method, "--base",
                           str(dirs["base"]), "--expert", *[f"{n}={dirs[n]}" for n in experts],
                           "--params", json.dumps(mf_params), "--device", "cpu", "--seed", str(SEED),
                           "--threads", str(args.threads), "--out", str(out)]
                else:
                    spec = work / f"spec-{m}.json"
                    spec.write_text(json.dumps({
                        "kind": fb_kind, "params": fb_params, "seed": SEED, "threads": args.threads,
                        "base": str(dirs["base"] / "model.safetensors"), "out": str(out),
                        "experts": [str(dirs[n] / "model.safetensors") for n in experts]}))
                    cmd = [args.fusionbench_python, str(Path(__file__).resolve()), "--fusionbench-worker", str(spec)]
                load = os.getloadavg()[0]
                wall, rss, rc = run_child(cmd, env, log)
                r = {"wall_s": round(wall, 2), "peak_rss_gib": round(rss / 2**30, 2), "rc": rc,
                     "loadavg_1m_before": round(load, 2)}
                if rc != 0:
                    print(f"!! {tool} {m} failed (exit {rc}), see {log}:\n" + log.read_text()[-3000:], flush=True)
                elif tool == "mergeflow":
                    meta = json.loads((out / "mergeflow_merge.json").read_text())
                    r["engine_s"] = meta["wall_time_s"]
                    r["merge_s"] = (meta.get("timings") or {}).get("merge_s")
                else:
                    r.update(json.loads((out / "fusionbench_timings.json").read_text()))
                run[tool] = r
                print(f"  {m:16s} rep {rep} {tool:12s} {wall:7.2f} s  (load {load:.1f})"
                      + (f"  engine {r.get('engine_s')} merge {r.get('merge_s')}" if tool == "mergeflow" else
                         f"  import {r.get('import_s')} load {r.get('load_s')} merge {r.get('merge_s')} "
                         f"save {r.get('save_s')}"), flush=True)
            if rep == 0 and all(run[t]["rc"] == 0 for t in tools):
                if METHODS[m][3]:  # random: statistics of each side
                    p, lam = mf_params["drop_rate"], mf_params["lambda"]
                    rows[m]["statistics"] = {
                        t: dare_stats(work / f"out-{t}-{m}", dirs["base"], [dirs[n] for n in experts], p, lam)
                        for t in ("mergeflow", "fusionbench")}
                    print(f"  {m}: {json.dumps(rows[m]['statistics'])}", flush=True)
                else:
                    rows[m]["agreement"] = compare(work / f"out-mergeflow-{m}", work / f"out-fusionbench-{m}",
                                                   dirs["base"])
                    print(f"  {m}: {json.dumps(rows[m]['agreement'])}", flush=True)
            rows[m]["runs"].append(run)
    # float64: the rounding-only methods' algorithms, and Model Stock's one deliberate difference
    f64 = [m for m in methods if m in CHECK64 and "agreement" in rows[m]]
    if f64 or "agreement" in rows.get("model_stock", {}):
        spec = work / "spec-check.json"
        spec.write_text(json.dumps({
            "threads": args.threads, "result": str(work / "check.json"),
            "base": str(dirs["base"] / "model.safetensors"),
            "experts": [str(dirs[n] / "model.safetensors") for n in EXPERTS],
            "float64": {m: [*METHODS[m][0], *METHODS[m][1]] for m in f64},
            "outputs": {m: {t: str(work / f"out-{t}-{m}") for t in ("mergeflow", "fusionbench")} for m in f64},
            "float32": ({"model_stock_mean_cos": ["model_stock_mean_cos", str(work / "out-mergeflow-model_stock")]}
                        if "agreement" in rows.get("model_stock", {}) else {})}))
        cenv = dict(env, PYTHONPATH=str(root / "src"))
        rc = subprocess.run([args.fusionbench_python, str(Path(__file__).resolve()), "--check-worker", str(spec)],
                            env=cenv, check=False).returncode
        if rc == 0:
            checks = json.loads((work / "check.json").read_text())
            for m in f64:
                rows[m]["float64_check"] = checks[m]
            if "model_stock_mean_cos" in checks:
                rows["model_stock"]["mean_cosine_variant"] = checks["model_stock_mean_cos"]
        else:
            print(f"!! the float64 check failed (exit {rc})", flush=True)
    uptime_end = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"# uptime at end: {uptime_end}", flush=True)

    print("\n| method | max abs diff | max rel diff | bytes equal | mergeflow s | FusionBench s | ratio FB/mf | "
          "merge phase mergeflow / FusionBench s | peak RSS mergeflow / FusionBench GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in methods:
        row = rows[m]
        if m in NOT_IN_FUSIONBENCH:
            row["fusionbench"] = None
            row["note"] = NOT_IN_FUSIONBENCH[m]
            print(f"| {m} | – | – | – | – | – | – | – | {NOT_IN_FUSIONBENCH[m]} |")
        else:
            (mf_method, mf_params), (fb_kind, fb_params), n_exp, random, code = METHODS[m]
            row.update({"experts": n_exp, "mergeflow": {"method": mf_method, "params": mf_params},
                        "fusionbench": {"function": code, "params": fb_params}, "random": random,
                        "uptime_end": uptime_end})
            ok = [r for r in row["runs"] if r.get("mergeflow", {}).get("rc") == 0
                  and r.get("fusionbench", {}).get("rc") == 0]
            if ok:
                med = {t: statistics.median(r[t]["wall_s"] for r in ok) for t in ("mergeflow", "fusionbench")}
                ph = {t: statistics.median(r[t]["merge_s"] for r in ok) for t in ("mergeflow", "fusionbench")}
                rss = {t: max(r[t]["peak_rss_gib"] for r in ok) for t in ("mergeflow", "fusionbench")}
                row["median_wall_s"], row["median_merge_s"], row["max_peak_rss_gib"] = med, ph, rss
                row["ratio_fusionbench_over_mergeflow"] = round(med["fusionbench"] / med["mergeflow"], 2)
                ag = row.get("agreement")
                print(f"| {m} | {ag['max_abs_diff']:.2g} | {ag['max_rel_diff']:.2g} | {ag['bytes_equal']} "
                      if ag else f"| {m} | (random: statistics) | | ",
                      end="")
                print(f"| {med['mergeflow']:.2f} | {med['fusionbench']:.2f} | "
                      f"{row['ratio_fusionbench_over_mergeflow']:.2f} | {ph['mergeflow']} / {ph['fusionbench']} | "
                      f"{rss['mergeflow']} / {rss['fusionbench']} |")
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
