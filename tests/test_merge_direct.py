"""The direct engines (no torch in the merge process) against the torch engine.

Everywhere: the shipped PTX matches its sources, the device ring's allocation rules,
which recipes fall back to torch, the CLI's engine choice, and every merge of the CPU
engine (C built from the per-element code the GPU kernels share) bit for bit against the
torch engine, which tests/test_merge_methods.py checks against formulas written out in
the tests. Where a GPU is, the same merges through the CUDA engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mergeflow.errors import MergeflowError
from mergeflow.merging import direct, methods

ROOT = Path(__file__).resolve().parents[1]
HAS_GPU = direct.device_count() > 0
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a GPU and the CUDA driver")


# ---------------------------------------------------------------------------------------
# everywhere
# ---------------------------------------------------------------------------------------


def test_shipped_ptx_is_built_from_kernels_cu():
    src = b"".join((ROOT / "src/mergeflow/merging" / f).read_bytes() for f in ("kernels.cu", "merge_ops.h"))
    ptx = (ROOT / "src/mergeflow/merging/kernels.ptx").read_text()
    first = ptx.splitlines()[0]
    assert first == f"// mergeflow kernels.cu sha256 {hashlib.sha256(src).hexdigest()}", \
        "kernels.ptx is stale: run scripts/build_kernels.sh"
    assert "\n.version 7.0\n" in ptx and "\n.target sm_75\n" in ptx
    for name in direct.KERNELS:
        assert f".visible .entry {name}(" in ptx


class FakeEvents:
    def __init__(self):
        self.finished = set()
        self.waited = []

    def done(self, ev):
        return ev in self.finished

    def wait(self, ev):
        self.waited.append(ev)
        self.finished.add(ev)


def test_device_ring_is_a_fifo_that_wraps_and_waits_only_for_retired_regions():
    ev = FakeEvents()
    ring = direct.DeviceRing(1000, 100, ev.done, ev.wait)
    a = ring.alloc(40, blocking=True)
    b = ring.alloc(40, blocking=True)
    assert (a[0], b[0]) == (0, 40)
    assert ring.alloc(30, blocking=False) is None  # 20 left at the end, nothing retired
    with pytest.raises(MergeflowError):  # would wait for a region still in use
        ring.alloc(30, blocking=True)
    direct.DeviceRing.retire(a, "ev-a")
    assert ring.alloc(30, blocking=False) is None  # retired but its event is still pending
    c = ring.alloc(30, blocking=True)  # waits for a, then wraps to the front
    assert ev.waited == ["ev-a"] and c[0] == 0
    direct.DeviceRing.retire(b, "ev-b")
    direct.DeviceRing.retire(c, "ev-c")
    ev.finished |= {"ev-b"}
    d = ring.alloc(50, blocking=False)  # b released: 30..100 is free behind c
    assert d[0] == 30 and ring.alloc(21, blocking=False) is None
    ev.finished |= {"ev-c"}
    direct.DeviceRing.retire(d, "ev-d")
    ev.finished |= {"ev-d"}
    assert ring.alloc(100, blocking=False)[0] == 0  # everything released: starts over


@pytest.mark.parametrize("method,params,why", [
    ("della_layer", {}, "MagPrune scope"),
    ("della_norank", {}, "score"),
    ("della_randrank", {}, "score 'random'"),
    ("della_randrank_layer", {}, "MagPrune scope 'tensor'"),
    ("dare", {"drop_rate": 0.5, "rescale": "l1"}, "rescale 'l1'"),
    ("ties", {"density": 0.5, "trim_scope": "model"}, "trim scope 'model'"),
])
def test_recipes_the_direct_engine_leaves_to_torch(method, params, why):
    m = methods.build(method, params, ["a", "b"], 0)
    assert why in direct.recipe_unsupported(m)


def test_recipes_the_direct_engine_runs():
    for method, params in SUPPORTED:
        assert direct.recipe_unsupported(methods.build(method, params, ["lm", "math", "code"], 0)) is None
    many = [f"e{i}" for i in range(9)]
    assert "9 experts" in direct.recipe_unsupported(methods.build("task_arithmetic", {}, many, 0))


def _cli(args):
    from mergeflow.cli import main

    return main(["merge", *args])


@pytest.mark.skipif(HAS_GPU, reason="checks the behaviour without a GPU")
def test_without_a_gpu_auto_merges_on_the_cpu_engine_and_cuda_is_refused(zoo, tmp_path, capsys):
    base, experts = zoo
    ex = [a for n, p in experts.items() for a in ("--expert", f"{n}={p}")]
    assert _cli(["--method", "ties", "--base", str(base), *ex, "--params", '{"density": 0.5}',
                 "--out", str(tmp_path / "auto")]) == 0
    assert "torch engine (" not in capsys.readouterr().err
    meta = json.loads((tmp_path / "auto" / "mergeflow_merge.json").read_text())
    assert meta["engine"] == "cpu-direct" and meta["device"] == "cpu"
    assert _cli(["--method", "ties", "--base", str(base), *ex, "--params", '{"density": 0.5}',
                 "--device", "cuda", "--engine", "direct", "--out", str(tmp_path / "d")]) == 2
    assert "requested but CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_cli_falls_back_to_torch_where_it_must(zoo, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MERGEFLOW_FAST_EXIT", "0")  # (the CLI would os._exit after a GPU merge)
    base, experts = zoo
    ex = [a for n, p in experts.items() for a in ("--expert", f"{n}={p}")]
    assert _cli(["--method", "della", "--base", str(base), *ex, "--out", str(tmp_path / "a")]) == 0
    meta = json.loads((tmp_path / "a" / "mergeflow_merge.json").read_text())
    assert meta["engine"] == ("cuda-direct" if HAS_GPU else "cpu-direct")
    assert (tmp_path / "a" / "config.json").exists()
    assert _cli(["--method", "della_layer", "--base", str(base), *ex, "--out", str(tmp_path / "b")]) == 0
    assert "torch engine (MagPrune scope 'tensor'" in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "mergeflow_merge.json").read_text())["engine"] == "torch"
    assert _cli(["--method", "della_layer", "--base", str(base), *ex, "--engine", "direct",
                 "--out", str(tmp_path / "c")]) == 2
    assert "--engine direct cannot run this merge: MagPrune scope 'tensor'" in capsys.readouterr().err
    assert _cli(["--method", "della", "--base", str(base), *ex, "--engine", "torch", "--device", "cpu",
                 "--out", str(tmp_path / "t")]) == 0
    assert json.loads((tmp_path / "t" / "mergeflow_merge.json").read_text())["engine"] == "torch"
    assert all(v.equal(_load(tmp_path / "t")[k]) for k, v in _load(tmp_path / "a").items())


def test_random_ranking_runs_on_the_torch_engine_and_direct_refuses_it(zoo, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MERGEFLOW_FAST_EXIT", "0")
    base, experts = zoo
    ex = [a for n, p in experts.items() for a in ("--expert", f"{n}={p}")]
    assert _cli(["--method", "della_randrank", "--base", str(base), *ex, "--out", str(tmp_path / "a")]) == 0
    assert "torch engine (MagPrune scope 'row' / score 'random')" in capsys.readouterr().err
    assert json.loads((tmp_path / "a" / "mergeflow_merge.json").read_text())["engine"] == "torch"
    assert _cli(["--method", "della_randrank", "--base", str(base), *ex, "--engine", "direct",
                 "--out", str(tmp_path / "b")]) == 2
    assert "--engine direct cannot run this merge: MagPrune scope 'row' / score 'random'" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_cpu_engine_without_a_compiler_falls_back(zoo, tmp_path):
    """A fresh process (nothing compiled or loaded yet) with an empty kernel cache and no compiler."""
    env = {**os.environ, "MERGEFLOW_CACHE": str(tmp_path / "cache"), "CC": str(tmp_path / "no-such-cc")}
    base, experts = zoo
    ex = [a for n, p in experts.items() for a in ("--expert", f"{n}={p}")]
    res = subprocess.run([sys.executable, "-m", "mergeflow", "merge", "--method", "ties", "--base", str(base), *ex,
                          "--params", '{"density": 0.5}', "--device", "cpu", "--out", str(tmp_path / "o")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "torch engine (compiling the CPU kernels" in res.stderr
    assert json.loads((tmp_path / "o" / "mergeflow_merge.json").read_text())["engine"] == "torch"
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-built is left to load


# ---------------------------------------------------------------------------------------
# the direct engines (CPU everywhere, GPU where there is one) against the torch engine on
# the CPU: the same bits
# ---------------------------------------------------------------------------------------

SHAPES = {
    "model.embed_tokens.weight": (300, 64),
    "model.layers.0.self_attn.q_proj.weight": (64, 64),
    "model.layers.0.mlp.up_proj.weight": (176, 64),
    "model.layers.0.mlp.down_proj.weight": (64, 176),
    "model.layers.0.input_layernorm.weight": (64,),
    "model.layers.0.odd.weight": (3, 5, 7),
    "model.layers.1.mlp.down_proj.weight": (6, 13824),  # Llama-2-13B rows: 128 KiB of keys
    "model.layers.1.post_attention_layernorm.weight": (5120,),
    "lm_head.weight": (300, 64),
}


def _save(path: Path, tensors: dict, config: bool = False) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors")
    if config:
        (path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 300}))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """bf16 base + three experts whose deltas take few distinct values (many ties)."""
    import torch

    root = tmp_path_factory.mktemp("direct_zoo")
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in SHAPES.items()}
    _save(root / "base", base, config=True)
    experts = {}
    for i, name in enumerate(("lm", "math", "code")):
        d = {k: (v.float() + 0.01 * torch.randint(-3, 4, v.shape, generator=g).float()
                 + (0.003 * i) * torch.randn(v.shape, generator=g)).to(torch.bfloat16)
             for k, v in base.items()}
        _save(root / name, d)
        experts[name] = str(root / name)
    return root / "base", experts


SUPPORTED = [
    ("average", {}),
    ("average", {"weights": [0.5, 0.3, 0.2]}),
    ("task_arithmetic", {"lambda": 0.7}),
    ("task_arithmetic", {"weights": [1.0, 0.5, 0.25]}),
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.5, "trim_scope": "row", "lambda": 1.2}),
    ("dare", {"drop_rate": 0.4}),
    ("dare", {"drop_rate": 0.5, "combine": "ties", "density": 0.7}),
    ("dare", {"drop_rate": 0.3, "combine": "average", "rescale": "none"}),
    ("della", {}),
    ("della", {"drop_rate": 0.5, "window_size": 0.2, "lambda": 1.0, "rescale": False}),
    ("della_noelect", {}),
    ("dare_della", {}),
    ("nodrop_noelect", {}),
    ("nodrop", {}),
    ("dare_noelect", {"drop_rate": 0.5}),
    ("ties_noelect", {"density": 0.4}),
    ("m3", {"alpha": 0.5}),
    ("m3", {"alpha": 2.0, "combine": "ties", "density": 0.5}),
    ("m3", {"combine": "average"}),
    ("m3", {"combine": "task_arithmetic", "dare": {"drop_rate": 0.3}}),
]


def _load(out: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


DEVICES = ["cpu", pytest.param("cuda", marks=gpu)]


def _merge(engine, method, experts, out, **kw):
    if engine in ("cpu", "cuda"):
        return direct.run_merge(method, experts, str(out), device=engine, progress=False, **kw)
    from mergeflow.merging.engine import run_merge

    return run_merge(method, experts, str(out), device="cpu", progress=False, **kw)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("method,params", SUPPORTED, ids=[f"{m}-{i}" for i, (m, _) in enumerate(SUPPORTED)])
def test_direct_engine_merges_like_the_torch_engine(zoo, tmp_path, dev, method, params):
    import torch

    base, experts = zoo
    for dtype in ("float32", "bfloat16"):
        p = dict(params, dtype=dtype)
        meta = _merge(dev, method, experts, tmp_path / f"d-{dtype}", base=str(base), params=p, seed=3)
        assert meta["engine"] == f"{dev}-direct" and meta["device"].startswith(dev)
        _merge("torch", method, experts, tmp_path / f"t-{dtype}", base=str(base), params=p, seed=3)
        got, ref = _load(tmp_path / f"d-{dtype}"), _load(tmp_path / f"t-{dtype}")
        assert sorted(got) == sorted(ref)
        for name in ref:
            assert got[name].dtype == ref[name].dtype and got[name].shape == ref[name].shape, name
            if dtype == "float32":  # a mask that differs anywhere moves a value by a whole delta
                torch.testing.assert_close(got[name], ref[name], rtol=2e-6, atol=2e-6, msg=name)
            else:  # the same arithmetic in the same order: the same bits
                assert torch.equal(got[name], ref[name]), name


@pytest.mark.parametrize("dev", DEVICES)
def test_direct_engine_is_deterministic_across_threads_and_shards(zoo, tmp_path, monkeypatch, dev):
    from mergeflow.merging import direct_cpu

    base, experts = zoo
    p = {"drop_rate": 0.3, "window_size": 0.14}
    _merge(dev, "della", experts, tmp_path / "a", base=str(base), params=p, seed=7)
    # tiny slabs, pieces and ring: many reads per tensor, a ring that wraps and waits
    monkeypatch.setattr(direct, "SLAB_BYTES", 4096)
    monkeypatch.setattr(direct, "PIECE_BYTES", 3 * 4096)
    monkeypatch.setattr(direct, "RING_BYTES", 1)
    monkeypatch.setattr(direct_cpu, "INFLIGHT_BYTES", 1)
    _merge(dev, "della", experts, tmp_path / "b", base=str(base), params=p, seed=7, io_threads=1,
           shard_size="50KB")
    _merge(dev, "della", experts, tmp_path / "c", base=str(base), params=p, seed=8)
    a, b, c = _load(tmp_path / "a"), _load(tmp_path / "b"), _load(tmp_path / "c")
    assert len(list((tmp_path / "b").glob("*.safetensors"))) > 1
    assert all(a[k].equal(b[k]) for k in a)
    assert not all(a[k].equal(c[k]) for k in a)  # another seed, other masks


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("policy", ["truncate", "pad_mean"])
def test_direct_engine_vocab_policies_match_torch(zoo, tmp_path, policy, dev):
    import torch
    from safetensors.torch import load_file

    base, experts = zoo
    # the math expert has 7 more vocabulary rows (truncate: its extra rows are dropped;
    # pad_mean: the others get mean rows)
    sd = load_file(Path(experts["math"]) / "model.safetensors")
    g = torch.Generator().manual_seed(5)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[k] = torch.cat([sd[k], torch.randn(7, 64, generator=g).to(torch.bfloat16)])
    _save(tmp_path / "math7", sd)
    ex = dict(experts, math=str(tmp_path / "math7"))
    p = {"density": 0.4, "dtype": "float32"}
    meta = _merge(dev, "ties", ex, tmp_path / "d", base=str(base), params=p, vocab_policy=policy)
    _merge("torch", "ties", ex, tmp_path / "t", base=str(base), params=p, vocab_policy=policy)
    assert meta["engine"] == f"{dev}-direct"
    got, ref = _load(tmp_path / "d"), _load(tmp_path / "t")
    assert got["lm_head.weight"].shape[0] == (300 if policy == "truncate" else 307)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=2e-6, atol=2e-6, msg=name)


@pytest.mark.parametrize("dev", DEVICES)
def test_direct_engine_reads_float16_and_float32_inputs(zoo, tmp_path, dev):
    import torch
    from safetensors.torch import load_file

    base, experts = zoo
    ex = dict(experts)
    for name, dt in (("lm", torch.float16), ("code", torch.float32)):
        sd = {k: v.to(dt) for k, v in load_file(Path(experts[name]) / "model.safetensors").items()}
        _save(tmp_path / name, sd)
        ex[name] = str(tmp_path / name)
    p = {"drop_rate": 0.5, "combine": "ties", "density": 0.6, "dtype": "float32"}
    _merge(dev, "dare", ex, tmp_path / "d", base=str(base), params=p)
    _merge("torch", "dare", ex, tmp_path / "t", base=str(base), params=p)
    got, ref = _load(tmp_path / "d"), _load(tmp_path / "t")
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=2e-6, atol=2e-6, msg=name)


@pytest.mark.parametrize("dev", DEVICES)
def test_direct_engine_names_the_input_holding_nan(zoo, tmp_path, dev):
    import torch
    from safetensors.torch import load_file

    base, experts = zoo
    sd = load_file(Path(experts["code"]) / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight"][5, 7] = float("nan")
    _save(tmp_path / "bad", sd)
    ex = dict(experts, code=str(tmp_path / "bad"))
    with pytest.raises(MergeflowError, match=r"'model.layers.0.mlp.up_proj.weight' of expert 'code'.*NaN"):
        _merge(dev, "ties", ex, tmp_path / "out", base=str(base), params={"density": 0.5})
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
    assert torch.isnan(sd["model.layers.0.mlp.up_proj.weight"]).sum() == 1


def test_keep_table_np_is_the_linear_schedule():
    t = direct.steps.keep_table_np(5, 0.3, 0.2)
    assert t.dtype == np.float32
    np.testing.assert_allclose(t, [0.6, 0.65, 0.7, 0.75, 0.8], rtol=1e-6)
