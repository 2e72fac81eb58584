"""Reductions that feed merged weights give the same bits whatever orders the sum.

A float32 sum depends on the order of its additions, which differs between torch's CPU
kernel (by vector width and thread count) and a CUDA reduction. The merge's L1 norms
(rescale=l1), SLERP's norms and dot, and the TIES sign election therefore go through
`steps.cascade_sum` / `steps.sum_experts`: fixed orders of element-wise adds. Here: they
equal torch's single-threaded CPU sums (so the recorded release bytes stay), and merges
that use them give the same bytes with 1 and 2 torch threads (torch's own CPU sum of more
than 32768 elements splits over threads, so it would not). tests/test_merge_gpu.py checks
CPU against CUDA.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeflow.merging import steps
from mergeflow.merging.engine import run_merge

# float32 lanes of torch's vectorised CPU sum, by the kernel build torch dispatched to: the
# replay is of the AVX2 build's order (the recorded bytes'); an AVX-512 build's sum of 10
# elements already differed from it on the H200 machine's Xeon (2026-12-02)
LANES = {"AVX2": 8, "DEFAULT": 8}.get(torch.backends.cpu.get_cpu_capability())


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.skipif(LANES is None, reason="torch's CPU sum here is not its AVX2 (or portable) x86 kernel")
def test_cascade_sum_replays_torchs_single_threaded_cpu_sum(one_thread):
    g = torch.Generator().manual_seed(0)
    # every branch: scalar kernel (< 8), lane and interleave tails, 1-3 cascade levels, and
    # a level step of 32 (more than 2^19 interleaved rows)
    sizes = [*range(0, 70), 127, 128, 129, 888, 6905, 16 * 32 * 16 + 7, 16 * 32 * 256 + 37,
             16 * 32 * 4096 + 5, 300_001, (1 << 19) * 32 + 1234]
    for n in sizes:
        x = torch.rand(n, generator=g) * torch.exp2(torch.randint(-20, 5, (n,), generator=g).float())
        assert steps.cascade_sum(x, lanes=LANES) == float(x.sum()), n
    x = torch.rand(37, 24, generator=g)
    assert steps.cascade_sum(x, lanes=LANES) == float(x.sum())  # a 2-D tensor sums as its flat view


def test_cascade_sum_depends_on_the_values_only():
    """Not on strides or the thread count: a transposed copy and 2 threads, the same bits."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(500, 301, generator=g)
    ref = steps.cascade_sum(x)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert steps.cascade_sum(x.t().contiguous().t()) == ref
        torch.set_num_threads(1)
        assert steps.cascade_sum(x) == ref
    finally:
        torch.set_num_threads(old)
    assert abs(ref - float(x.double().sum())) < 1e-6 * ref  # and it is the sum


def test_sum_experts_is_torchs_sum_over_experts(one_thread):
    g = torch.Generator().manual_seed(2)
    for n in (1, 2, 3, 4):
        x = torch.randn(n, 13, 301, generator=g)
        assert torch.equal(steps.sum_experts(x), x.sum(dim=0))


@pytest.fixture(scope="module")
def big_zoo(tmp_path_factory):
    """base + 3 bf16 experts with one tensor of 60,000 elements (> torch's 32,768 grain)."""
    root = tmp_path_factory.mktemp("reduce_zoo")
    g = torch.Generator().manual_seed(3)
    shapes = {"model.layers.0.mlp.up_proj.weight": (300, 200), "model.norm.weight": (200,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    paths = {}
    for name in ("base", "lm", "math", "code"):
        d = root / name
        d.mkdir()
        sd = base if name == "base" else {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, d / "model.safetensors")
        paths[name] = str(d)
    return paths


@pytest.mark.parametrize("method,params", [
    ("dare", {"drop_rate": 0.5, "rescale": "l1", "dtype": "float32"}),
    ("della", {"rescale": "l1", "dtype": "float32"}),
    ("slerp", {"t": 0.3, "dtype": "float32"}),
])
def test_merges_with_reductions_do_not_depend_on_the_thread_count(big_zoo, tmp_path, method, params):
    experts = {e: big_zoo[e] for e in (("lm", "math") if method == "slerp" else ("lm", "math", "code"))}
    base = None if method == "slerp" else big_zoo["base"]
    outs = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            run_merge(method, experts, str(tmp_path / str(threads)), base=base, params=params, seed=5,
                      progress=False)
            outs.append(load_file(tmp_path / str(threads) / "model.safetensors"))
    finally:
        torch.set_num_threads(old)
    assert sorted(outs[0]) == sorted(outs[1])
    for name, t in outs[0].items():
        assert torch.equal(t, outs[1][name]), name
