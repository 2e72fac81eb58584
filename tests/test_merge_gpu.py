"""CPU and CUDA give the same draws, ranks, trims and merges (runs only where CUDA is)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeflow.merging import fused, rng, steps
from mergeflow.merging.engine import run_merge

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("offset", [0, 7, 2**31 - 1000, 2**32 - 300_000])
def test_uniforms_are_bit_identical_on_cpu_and_cuda(monkeypatch, backend, offset):
    monkeypatch.setenv("MERGEFLOW_GPU_RNG", backend)
    monkeypatch.setattr(rng, "_GPU", {})
    monkeypatch.setattr(fused, "_KERNELS", None)
    key = rng.stream_key(42, "model.layers.7.mlp.up_proj.weight", 2, "magprune")
    cpu = rng.uniform(key, offset, (300, 1000))
    kernel = rng._gpu_uniform(torch.device("cuda"))
    assert (kernel is None) == (backend == "torch")  # the Triton kernel is the one in use
    gpu = rng.uniform(key, offset, (300, 1000), "cuda")
    assert torch.equal(cpu, gpu.cpu())


def test_kernel_warmed_in_a_thread_while_the_main_thread_draws(monkeypatch):
    monkeypatch.setattr(rng, "_GPU", {})
    monkeypatch.setattr(fused, "_KERNELS", None)
    key = rng.stream_key(3, "lm_head.weight", 1, "dare")
    warm = fused.warm(torch.device("cuda"), draws=True, experts=3)
    gpu = rng.uniform(key, 5, (70_000,), "cuda")  # waits for the kernel the thread loads
    warm.join(timeout=120)
    assert not warm.is_alive() and rng._gpu_uniform(torch.device("cuda")) is not None
    assert torch.equal(gpu.cpu(), rng.uniform(key, 5, (70_000,)))


def _adversarial(shape, seed):
    """Few distinct values: exact ties, cancelling sums, +0 and -0 (the sign of zero checked too)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, shape, generator=g).float() * 0.375
    return torch.where(torch.rand(shape, generator=g) < 0.5, x, -x)


def _bits(t):
    return t.contiguous().view(torch.int32).cpu()


@pytest.mark.parametrize("n_exp,weights", [(1, [0.7]), (2, [1.0, 1.0]), (3, [0.7, -0.3, 1.0]),
                                           (5, [1.0, 0.3, 2.5, -1.25, 0.1])])
@pytest.mark.parametrize("zero_sign", [1, -1, 0])
def test_fused_disjoint_mean_gives_the_cpu_steps_bits(monkeypatch, n_exp, weights, zero_sign):
    x = _adversarial((n_exp, 257, 1031), n_exp)
    monkeypatch.setenv("MERGEFLOW_GPU_FUSED", "torch")
    ref = steps.disjoint_fuse_(x.cuda(), weights, zero_sign=zero_sign)
    cpu = steps.disjoint_fuse_(x.clone(), weights, zero_sign=zero_sign)
    monkeypatch.setenv("MERGEFLOW_GPU_FUSED", "triton")
    assert fused.enabled()
    out = steps.disjoint_fuse_(x.cuda(), weights, zero_sign=zero_sign)
    # the CPU's bits (the recorded release bytes' semantics: clamp keeps a -0); torch's CUDA
    # steps give the same values, some zeros with the other sign
    assert torch.equal(_bits(out), _bits(cpu))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("drop_rate,offset", [(0.5, 0), (0.9, 12345), (0.1, 2**32 - 300_000)])
def test_fused_dare_drop_gives_the_torch_steps_bits(monkeypatch, drop_rate, offset):
    x = _adversarial((291, 1000), 7)
    key = rng.stream_key(42, "model.layers.3.mlp.down_proj.weight", 1, "dare")
    monkeypatch.setenv("MERGEFLOW_GPU_FUSED", "torch")
    ref = steps.bernoulli_drop_(x.cuda(), drop_rate, "inverse", key, offset)
    cpu = steps.bernoulli_drop_(x.clone(), drop_rate, "inverse", key, offset)
    monkeypatch.setenv("MERGEFLOW_GPU_FUSED", "triton")
    out = steps.bernoulli_drop_(x.cuda(), drop_rate, "inverse", key, offset)
    assert torch.equal(_bits(out), _bits(ref))
    assert torch.equal(_bits(out), _bits(cpu))


def test_sorted_columns_and_trims_match_on_cpu_and_cuda():
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 40, (64, 5000), generator=g).float() * 1e-3)  # many ties
    assert torch.equal(steps.sorted_columns(x), steps.sorted_columns(x.cuda()).cpu())
    for k in (1, 1234, 2500):
        assert torch.equal(steps.topk_mask(x, k), steps.topk_mask(x.cuda(), k).cpu())
        flat = x.view(1, -1)
        assert torch.equal(steps.topk_mask(flat, k * 50), steps.topk_mask(flat.cuda(), k * 50).cpu())


def test_fixed_order_reductions_match_on_cpu_and_cuda():
    """The L1 norm, SLERP's sums and the sign election: fixed orders, the same float32 bits."""
    g = torch.Generator().manual_seed(3)
    for n in (5, 8, 1381, 888 * 37, 300_001, (1 << 19) * 32 + 77, 40_000_000):
        x = torch.rand(n, generator=g) * torch.exp2(torch.randint(-20, 5, (n,), generator=g).float())
        assert steps.cascade_sum(x) == steps.cascade_sum(x.cuda()), n
    st = torch.randn(7, 64, 1000, generator=g)
    assert torch.equal(steps.sum_experts(st), steps.sum_experts(st.cuda()).cpu())


def test_slerp_merges_match_on_cpu_and_cuda(zoo, tmp_path):
    _, experts = zoo
    two = {k: experts[k] for k in ("lm", "math")}
    outs = {}
    for dev in ("cpu", "cuda"):
        run_merge("slerp", two, str(tmp_path / dev), params={"t": 0.3}, device=dev, progress=False)
        outs[dev] = load_file(tmp_path / dev / "model.safetensors")
    assert sorted(outs["cpu"]) == sorted(outs["cuda"])
    assert all(torch.equal(t, outs["cuda"][k]) for k, t in outs["cpu"].items())


@pytest.fixture(scope="module")
def zoo(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_zoo")
    sd = load_file(tiny_model_dir / "model.safetensors")
    experts = {}
    for i, name in enumerate(("lm", "math", "code")):
        gen = torch.Generator().manual_seed(i)
        d = experts[name] = root / name
        d.mkdir()
        save_file({k: (v + 0.02 * torch.randn(v.shape, generator=gen)).to(torch.bfloat16) for k, v in sd.items()},
                  d / "model.safetensors")
    base = root / "base"
    base.mkdir()
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, base / "model.safetensors")
    (base / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    return base, {k: str(v) for k, v in experts.items()}


@pytest.mark.parametrize("method,params", [
    ("della", {}),
    ("della_layer", {}),
    ("dare", {"drop_rate": 0.5, "combine": "ties"}),
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.3, "trim_scope": "model"}),
    ("m3", {"combine": "ties", "density": 0.5}),
    ("task_arithmetic", {"weights": [1.0, 0.5, 0.25]}),
    ("m3", {"combine": "ties", "density": 0.5, "trim_scope": "model"}),
    ("dare", {"drop_rate": 0.5, "combine": "ties", "density": 0.5, "trim_scope": "model"}),
    ("nodrop", {}),
    ("dare_noelect", {}),
    ("ties_noelect", {"density": 0.7}),
    ("della_randrank", {}),
    ("della_randrank_layer", {}),
    ("average", {}),
    ("della_noelect", {}),
    ("dare", {"drop_rate": 0.3, "combine": "average"}),
    ("della", {"weights": [1.0, 0.7, 0.3]}),
    ("della_norank", {}),
    ("dare_della", {}),
    ("nodrop_noelect", {}),
    ("dare", {"drop_rate": 0.5, "rescale": "l1"}),
    ("della", {"rescale": "l1"}),
    ("dare", {"drop_rate": 0.5, "rescale": "l1", "dtype": "float32"}),
    ("ties", {"density": 0.3, "dtype": "float32"}),
    ("task_arithmetic", {"weights": [0.3, 0.7, 0.45], "dtype": "float32"}),  # a + w * b: FMA on both
    ("m3", {"combine": "ties", "density": 0.5, "dtype": "float32"}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.02, "dtype": "float32"}),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.02, "dtype": "float32"}),
    ("model_stock", {"dtype": "float32"}),
    ("consensus_ta", {"tall_mask_lambda": 0.4, "dtype": "float32"}),
    ("consensus_ties", {"density": 0.5, "tall_mask_lambda": [0.3, 0.5, 0.4], "dtype": "float32"}),
    ("consensus_ties", {"mask_rate": 0.5, "trim_scope": "model", "tall_mask_lambda": 0.4, "k": 1}),
    ("m3", {"combine": "ties", "density": 0.5, "lambda_m": [0.2, 0.5, 0.3]}),
    ("multislerp", {"interpolate": "task_vectors", "weights": [1.0, 0.5, 0.25], "dtype": "float32"}),
])
def test_cpu_and_cuda_merges_are_identical(zoo, tmp_path, method, params):
    base, experts = zoo
    outs = {}
    for dev in ("cpu", "cuda"):
        run_merge(method, experts, str(tmp_path / dev), base=str(base), params=params, device=dev, seed=1,
                  progress=False)
        outs[dev] = load_file(tmp_path / dev / "model.safetensors")
    for name, t in outs["cpu"].items():
        assert torch.equal(t, outs["cuda"][name]), name


def test_cuda_blocks_and_bin_inputs_merge_like_the_cpu(zoo, tmp_path):
    base, experts = zoo
    b = tmp_path / "math_bin"
    b.mkdir()
    torch.save(load_file(f"{experts['math']}/model.safetensors"), b / "pytorch_model.bin")
    ex = dict(experts, math=str(b))
    run_merge("della", experts, str(tmp_path / "cpu"), base=str(base), device="cpu", progress=False)
    run_merge("della", ex, str(tmp_path / "cuda"), base=str(base), device="cuda", chunk_elements=1000,
              shard_size="100KB", progress=False)
    cpu = load_file(tmp_path / "cpu" / "model.safetensors")
    gpu = {}
    for f in (tmp_path / "cuda").glob("*.safetensors"):
        gpu.update(load_file(f))
    assert sorted(cpu) == sorted(gpu) and all(torch.equal(cpu[k], gpu[k]) for k in cpu)


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_svd_merges_agree_on_cpu_and_cuda_to_rounding(zoo, tmp_path, method):
    """LAPACK and cuSOLVER round differently: the SVD methods agree, not bit for bit."""
    base, experts = zoo
    outs = {}
    for dev in ("cpu", "cuda"):
        run_merge(method, experts, str(tmp_path / dev), base=str(base), params={"dtype": "float32"}, device=dev,
                  progress=False)
        outs[dev] = load_file(tmp_path / dev / "model.safetensors")
    for name, t in outs["cpu"].items():
        # float32 singular vectors of cuSOLVER and LAPACK part in the 5th decimal (weights ~0.1)
        diff = (outs["cuda"][name] - t).abs().max().item()
        assert diff <= 1e-4, f"{name}: CPU and CUDA merges differ by {diff:.3g}"
    # ... which is rounding alone: in float64 the two devices give the same matrices
    from mergeflow.merging import steps

    b = load_file(f"{base}/model.safetensors")["lm_head.weight"].double()
    d = torch.stack([load_file(f"{e}/model.safetensors")["lm_head.weight"].double() - b for e in experts.values()])
    merge = {"tsv_m": steps.tsv_merge, "iso_c": lambda x: steps.iso_merge(x.sum(0)),
             "iso_cts": lambda x: steps.iso_cts_merge(x, 0.8)}[method]
    torch.testing.assert_close(merge(d.cuda()).cpu(), merge(d.clone()), rtol=0, atol=1e-12)


def test_nuslerp_merges_match_on_cpu_and_cuda(zoo, tmp_path):
    base, experts = zoo
    two = {k: experts[k] for k in ("lm", "math")}
    for interpolate in ("weights", "task_vectors"):
        outs = {}
        for dev in ("cpu", "cuda"):
            out = tmp_path / f"{interpolate}-{dev}"
            run_merge("nuslerp", two, str(out), base=str(base), params={"weights": [0.7, 0.3], "interpolate": interpolate,
                      "dtype": "float32"}, device=dev, progress=False)
            outs[dev] = load_file(out / "model.safetensors")
        for name, t in outs["cpu"].items():
            assert torch.equal(t, outs["cuda"][name]), (interpolate, name)


# Methods whose CPU and CUDA results may part by rounding: LAPACK vs cuSOLVER singular
# vectors (TSV-M, Iso-C, Iso-CTS), torch.var's reduction order (SCE), exp/tanh's last ulp
# (PCB). Rounding moves an output element by at most 2 ulps of its dtype; SCE and PCB may
# also move a few elements across their selection threshold (up to a task vector's size).
ROUNDING = {"tsv_m", "iso_c", "iso_cts"}
SELECTION = {"sce", "pcb"}


def _compare(cpu: dict, gpu: dict, case: str, scale: float) -> tuple[str, str | None]:
    """(a report line, the failure or None)."""
    assert sorted(cpu) == sorted(gpu), case
    method = case.split("[")[0]
    n = diff = far = 0
    worst = 0.0
    for name, t in cpu.items():
        g = gpu[name]
        assert g.dtype == t.dtype and g.shape == t.shape, (case, name)
        d = (g.float() - t.float()).abs()
        # 2 ulps of the value, plus the float32 results' own difference (SVD: <= 2e-5, above)
        ulps2 = 2 * torch.finfo(t.dtype).eps * t.float().abs() + (1e-4 if method in ROUNDING else 0)
        n += t.numel()
        diff += int((d > 0).sum())
        far += int((d > ulps2).sum())
        worst = max(worst, d.max().item())
    line = f"{case}: {diff}/{n} elements differ, {far} beyond rounding, max {worst:.3g}"
    ok = (diff == 0 if method not in ROUNDING | SELECTION
          else far == 0 if method in ROUNDING
          else far <= n // 1000 and worst <= 4 * scale)
    return line, None if ok else line


@pytest.mark.parametrize("family,extend", [("qwen3", False), ("gemma2", False), ("llama3", True)])
def test_every_method_on_model_families_on_cuda(family, extend, tiny_model_dir, tmp_path_factory):
    """Every registered method (and the engine-path variants) of tests/test_model_families.py,
    on a family's tiny sharded bf16 checkpoints, merged on CUDA and on the CPU: the same bytes,
    or for the ROUNDING methods the same to rounding. `llama3` with an expert 8 rows longer,
    under pad_mean."""
    import test_model_families as fam
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp(f"gpu-{family}")
    base, experts = fam.build_family(family, root, AutoTokenizer.from_pretrained(tiny_model_dir), extend)
    policy = "pad_mean" if extend else None
    report, failed = [], []
    for case, (method, params) in fam.CASES.items():
        default, names = fam.method_case(method)
        outs = {}
        for dev in ("cpu", "cuda"):
            out = root / f"{case}-{dev}"
            run_merge(method, {n: experts[n] for n in names}, str(out), base=str(base), params=params or default,
                      seed=5, device=dev, vocab_policy=policy, shard_size=fam.SHARD, chunk_elements=fam.CHUNK,
                      progress=False)
            outs[dev] = fam.tensors(out)
        line, bad = _compare(outs["cpu"], outs["cuda"], case, fam.SCALE)
        report.append(line)
        failed += [bad] if bad else []
    print("\n".join(report))
    assert not failed, failed


def test_union_vocabulary_merges_match_on_cpu_and_cuda(tiny_model_dir, tmp_path):
    import test_vocab_union as union

    experts = {n: str(union.make_expert(tiny_model_dir, tmp_path / n, i + 1, union.ADDS[n]))
               for i, n in enumerate(union.ADDS)}
    outs = {}
    for dev in ("cpu", "cuda"):
        run_merge("ties", experts, str(tmp_path / dev), base=str(tiny_model_dir), params={"density": 0.5},
                  vocab_policy="union", device=dev, progress=False)
        outs[dev] = load_file(tmp_path / dev / "model.safetensors")
    assert outs["cpu"]["model.embed_tokens.weight"].shape[0] == outs["cuda"]["model.embed_tokens.weight"].shape[0]
    line, bad = _compare(outs["cpu"], outs["cuda"], "ties[union]", 0.02)
    print(line)
    assert bad is None, bad
