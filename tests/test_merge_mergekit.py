"""Agreement with mergekit 0.1.5 (PyPI) on tiny real checkpoints: task_arithmetic, ties,
linear (our `average`), slerp, breadcrumbs, breadcrumbs_ties, model_stock, sce, nuslerp and multislerp, run through mergekit's own
Python entry point."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergeflow.merging.engine import run_merge

mergekit = pytest.importorskip("mergekit")  # a dev dependency (pyproject [dev]); CI installs it

EXPERTS = ("lm", "math", "code")
WEIGHTS = {"lm": 1.0, "math": 0.7, "code": 1.3}


@pytest.fixture(scope="module")
def zoo(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mk_zoo")
    base_sd = load_file(tiny_model_dir / "model.safetensors")
    experts = {}
    for i, name in enumerate(EXPERTS):
        g = torch.Generator().manual_seed(100 + i)
        d = experts[name] = root / name
        d.mkdir()
        save_file({k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base_sd.items()},
                  d / "model.safetensors", metadata={"format": "pt"})
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny_model_dir / f, d / f)
    return tiny_model_dir, experts


def run_mergekit(config: dict, out: Path) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mk_run
    from mergekit.options import MergeOptions

    cfg = MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(config)))
    mk_run(cfg, str(out), options=MergeOptions(write_model_card=False, copy_tokenizer=False, quiet=True,
                                                lazy_unpickle=False, device="cpu"))
    sd = {}
    for f in out.glob("*.safetensors"):
        sd.update(load_file(f))
    return sd


def run_ours(method, params, base, experts, out: Path) -> dict:
    run_merge(method, {k: str(v) for k, v in experts.items()}, str(out), base=None if base is None else str(base),
              params=params, device="cpu", progress=False)
    return load_file(out / "model.safetensors")


def compare(ours: dict, theirs: dict, atol: float):
    assert sorted(ours) == sorted(theirs)
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert worst <= atol, worst
    return worst


def models_block(experts, **per_model):
    return [{"model": str(experts[e]), "parameters": {k: v[e] for k, v in per_model.items()}} for e in EXPERTS]


@pytest.mark.slow
def test_task_arithmetic_matches_mergekit(zoo, tmp_path):
    base, experts = zoo
    theirs = run_mergekit({"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
                           "parameters": {"lambda": 0.8},
                           "models": models_block(experts, weight=WEIGHTS)}, tmp_path / "mk")
    ours = run_ours("task_arithmetic", {"lambda": 0.8, "weights": WEIGHTS}, base, experts, tmp_path / "mf")
    compare(ours, theirs, atol=1e-6)


@pytest.mark.slow
def test_ties_matches_mergekit_exactly(zoo, tmp_path):
    base, experts = zoo
    density = {"lm": 0.4, "math": 0.4, "code": 0.4}
    theirs = run_mergekit({"merge_method": "ties", "base_model": str(base), "dtype": "float32",
                           "parameters": {"lambda": 1.2},
                           "models": models_block(experts, weight=WEIGHTS, density=density)}, tmp_path / "mk")
    ours = run_ours("ties", {"lambda": 1.2, "weights": WEIGHTS, "density": 0.4}, base, experts, tmp_path / "mf")
    # Same trim, election, disjoint mean and operation order: bit-identical in float32.
    assert compare(ours, theirs, atol=0.0) == 0.0


@pytest.mark.slow
def test_linear_matches_our_average(zoo, tmp_path):
    _, experts = zoo
    theirs = run_mergekit({"merge_method": "linear", "dtype": "float32",
                           "models": models_block(experts, weight=WEIGHTS)}, tmp_path / "mk")
    ours = run_ours("average", {"weights": WEIGHTS}, None, experts, tmp_path / "mf")
    compare(ours, theirs, atol=1e-6)


@pytest.mark.slow
def test_slerp_matches_mergekit(zoo, tmp_path):
    _, experts = zoo
    # mergekit: t = 0 is its base_model, t = 1 the other model; ours: the first and second expert
    theirs = run_mergekit({"merge_method": "slerp", "base_model": str(experts["lm"]), "dtype": "float32",
                           "parameters": {"t": 0.35},
                           "models": [{"model": str(experts["lm"])}, {"model": str(experts["math"])}]},
                          tmp_path / "mk")
    ours = run_ours("slerp", {"t": 0.35}, None, {"lm": experts["lm"], "math": experts["math"]}, tmp_path / "mf")
    compare(ours, theirs, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_match_mergekit(zoo, tmp_path, method):
    base, experts = zoo
    per_model = {"density": {e: 0.6 for e in EXPERTS}, "gamma": {e: 0.05 for e in EXPERTS}}
    theirs = run_mergekit({"merge_method": method, "base_model": str(base), "dtype": "float32",
                           "parameters": {"lambda": 0.9},
                           "models": models_block(experts, weight=WEIGHTS, **per_model)}, tmp_path / "mk")
    ours = run_ours(method, {"lambda": 0.9, "weights": WEIGHTS, "density": 0.6, "gamma": 0.05}, base, experts,
                    tmp_path / "mf")
    # Same masks (continuous deltas: no ties in |delta|). breadcrumbs_ties fuses in mergekit's
    # order (bit-identical); breadcrumbs' weighted sum uses add-with-alpha (one rounding apart).
    worst = compare(ours, theirs, atol=1e-6)
    assert method == "breadcrumbs" or worst == 0.0


@pytest.mark.slow
def test_model_stock_matches_mergekit(zoo, tmp_path):
    base, experts = zoo
    theirs = run_mergekit({"merge_method": "model_stock", "base_model": str(base), "dtype": "float32",
                           "models": [{"model": str(experts[e])} for e in EXPERTS]}, tmp_path / "mk")
    ours = run_ours("model_stock", {}, base, experts, tmp_path / "mf")
    compare(ours, theirs, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("select_topk", [1.0, 0.3])
def test_sce_matches_mergekit(zoo, tmp_path, select_topk):
    base, experts = zoo
    theirs = run_mergekit({"merge_method": "sce", "base_model": str(base), "dtype": "float32",
                           "parameters": {"select_topk": select_topk},
                           "models": [{"model": str(experts[e])} for e in EXPERTS]}, tmp_path / "mk")
    ours = run_ours("sce", {"select_topk": select_topk}, base, experts, tmp_path / "mf")
    # Same selection, election and fuse order; the coefficients' float32 sums may round apart
    compare(ours, theirs, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_and_multislerp_match_mergekit(zoo, tmp_path, with_base):
    base, experts = zoo
    w = {"lm": 0.4, "math": 0.6, "code": 1.0}
    params = {"interpolate": "task_vectors"} if with_base else {}
    for method, names in (("nuslerp", ("lm", "math")), ("multislerp", EXPERTS)):
        cfg = {"merge_method": method, "dtype": "float32",
               "models": [{"model": str(experts[e]), "parameters": {"weight": w[e]}} for e in names]}
        if with_base:
            cfg["base_model"] = str(base)
        theirs = run_mergekit(cfg, tmp_path / f"mk-{method}")
        ours = run_ours(method, {"weights": [w[e] for e in names], **params}, base if with_base else None,
                        {e: experts[e] for e in names}, tmp_path / f"mf-{method}")
        # the same formulas; scalars from fixed-order float64 sums here, float32 torch reductions there
        compare(ours, theirs, atol=1e-6)  # measured: 6e-8 to 4e-7
