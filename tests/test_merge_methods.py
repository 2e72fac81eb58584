"""Every merge method against an independent formula implementation written out here.

Deterministic methods: exact up to float32 rounding. Random methods: exact given the same
masks (the reference draws its own masks from the keyed uniforms, whose bits are checked
against a pure-Python hash in test_merge_rng.py), plus statistical checks of the paper's
claims: DELLA's keep rate follows the linear rank schedule, rescaled deltas are unbiased.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import perturbed_experts
import torch

from mergeflow.errors import MergeflowError
from mergeflow.merging import methods, rng, steps

ROWS, COLS, N = 6, 37, 3
ATOL = 2e-6


def inputs(seed=0, rows=ROWS, cols=COLS, n=N):
    g = np.random.default_rng(seed)
    base = g.normal(0, 0.05, (rows, cols)).astype(np.float32)
    experts = (base + g.normal(0, 0.01, (n, rows, cols))).astype(np.float32)
    return base, experts


def run(method, params, base, experts, seed=0, name="model.layers.0.w", row0=0):
    names = [f"e{i}" for i in range(len(experts))]
    m = methods.build(method, params, names, seed)
    b = methods.Block(name, None if base is None else torch.tensor(base), torch.tensor(experts.copy()),
                      row0, seed)
    return m.merge(b).numpy(), m


def deltas32(base, experts):
    return experts - base[None]  # float32 arithmetic, as the engine


def uniforms(seed, name, t, purpose, shape, row0=0):
    return rng.uniform(rng.stream_key(seed, name, t, purpose), row0 * shape[-1], shape).numpy()


# -- independent reference steps (numpy) ------------------------------------------------


def ref_trim(d, density, scope):
    out = np.zeros_like(d)
    groups = [(slice(None), slice(None))] if scope == "tensor" else [(i, slice(None)) for i in range(d.shape[0])]
    for idx in groups:
        g = d[idx].ravel()
        k = len(g) if density >= 1 else max(1, int(density * len(g)))
        keep = np.argsort(-np.abs(g), kind="stable")[:k]
        flat = np.zeros_like(g)
        flat[keep] = g[keep]
        out[idx] = flat.reshape(d[idx].shape)
    return out


def ref_disjoint(dh, w):
    w = np.asarray(w, dtype=np.float64)[:, None, None]
    wd = w * dh.astype(np.float64)
    gamma = np.where(wd.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(wd) == gamma
    num = (wd * agree).sum(0)
    den = (w * agree).sum(0)
    den[den == 0] = 1
    return num / den


def ref_dare(d, p, seed, name, t):
    keep = np.float32(1 - p)
    u = uniforms(seed, name, t, "dare", d.shape)
    return np.where(u < keep, d / keep, np.float32(0)).astype(np.float32)


def ref_magprune(d, p, ws, seed, name, t, scope="row", score="rank"):
    eps = ws / 2
    x = d.reshape(1, -1) if scope == "tensor" else d
    u = uniforms(seed, name, t, "magprune", x.shape)
    out = np.zeros_like(x)
    for i, row in enumerate(x):
        n = len(row)
        if score == "rank":
            order = np.argsort(np.abs(row), kind="stable")
            r = np.empty(n)
            r[order] = np.arange(n)
            k = np.float32((1 - p) - eps + 2 * eps * r / (n - 1))
        else:
            a = np.abs(row)
            span = (a.max() - a.min()) + np.float32(1e-7)
            k = ((a - a.min()) / span) * np.float32(2 * eps) + np.float32((1 - p) - eps)
        out[i] = np.where(u[i] < k, row / k, np.float32(0))
    return out.reshape(d.shape)


# -- deterministic methods ----------------------------------------------------------------


def test_average_is_weighted_mean_of_experts_without_base():
    _, ex = inputs()
    got, m = run("average", {"weights": [1, 2, 3]}, None, ex)
    want = (1 * ex[0].astype(np.float64) + 2 * ex[1] + 3 * ex[2]) / 6
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert not m.uses_base
    got, _ = run("average", {}, None, ex)
    np.testing.assert_allclose(got, ex.astype(np.float64).mean(0), atol=ATOL, rtol=0)


def test_task_arithmetic_is_a_scaled_sum_not_a_mean():
    base, ex = inputs(1)
    got, _ = run("task_arithmetic", {"lambda": 0.7, "weights": {"e0": 1.0, "e2": 0.5}}, base, ex)
    d = deltas32(base, ex).astype(np.float64)
    want = base + 0.7 * (d[0] + d[1] + 0.5 * d[2])
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("scope", ["tensor", "row"])
def test_ties_trim_elect_disjoint_mean(scope):
    base, ex = inputs(2)
    w = [1.0, 0.6, 1.4]
    got, _ = run("ties", {"density": 0.3, "weights": w, "lambda": 1.3, "trim_scope": scope}, base, ex)
    d = deltas32(base, ex)
    dh = np.stack([ref_trim(d[t], 0.3, scope) for t in range(N)])
    want = base + 1.3 * ref_disjoint(dh, w)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    # The trim really trimmed: the merged delta is zero where no expert survived.
    survived = (dh != 0).any(0)
    assert ((got - base)[~survived] == 0).all() and (~survived).sum() > 0


def test_ties_mask_rate_is_one_minus_density():
    base, ex = inputs(3)
    a, _ = run("ties", {"density": 0.25}, base, ex)
    b, _ = run("ties", {"mask_rate": 0.75}, base, ex)
    assert np.array_equal(a, b)


def test_nodrop_noelect_is_weighted_mean_of_deltas_times_lambda():
    base, ex = inputs(4)
    got, m = run("nodrop_noelect", {"weights": [2, 1, 1]}, base, ex)
    d = deltas32(base, ex).astype(np.float64)
    want = base + 1.1 * (2 * d[0] + d[1] + d[2]) / 4
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert m.params["lambda"] == 1.1


# -- random methods: exact given the masks ----------------------------------------------------

NAME = "model.layers.3.mlp.down_proj.weight"


@pytest.mark.parametrize("combine", ["average", "task_arithmetic", "ties"])
def test_dare_combinations(combine):
    base, ex = inputs(5)
    params = {"drop_rate": 0.4, "combine": combine, "lambda": 0.9, "weights": [1.0, 0.5, 1.5]}
    if combine == "ties":
        params["density"] = 0.6
    got, _ = run("dare", params, base, ex, seed=11, name=NAME)
    d = deltas32(base, ex)
    dh = np.stack([ref_dare(d[t], 0.4, 11, NAME, t) for t in range(N)]).astype(np.float64)
    w = np.array(params["weights"])[:, None, None]
    if combine == "average":
        tau = (w * dh).sum(0) / w.sum()
    elif combine == "task_arithmetic":
        tau = (w * dh).sum(0)
    else:
        dh = np.stack([ref_trim(x, 0.6, "tensor") for x in dh])
        tau = ref_disjoint(dh, params["weights"])
    np.testing.assert_allclose(got, base + 0.9 * tau, atol=ATOL, rtol=0)


def test_dare_l1_rescale_matches_the_l1_norm():
    base, ex = inputs(6)
    m = methods.build("dare", {"drop_rate": 0.5, "rescale": "l1"}, ["a"], 3)
    b = methods.Block(NAME, torch.tensor(base), torch.tensor(ex[:1].copy()), 0, 3)
    dh = m.sparsified_deltas(b)[0].numpy()
    d = deltas32(base, ex[:1])[0]
    keep = uniforms(3, NAME, 0, "dare", d.shape) < np.float32(0.5)
    assert np.array_equal(dh != 0, keep & (d != 0))
    np.testing.assert_allclose(np.abs(dh).sum(), np.abs(d).sum(), rtol=1e-5)
    assert m.tensor_wide  # an L1 norm is a whole-tensor statistic


@pytest.mark.parametrize("method,scope,score,elect", [
    ("della", "row", "rank", True),
    ("della_layer", "tensor", "rank", True),
    ("della_norank", "row", "magnitude", True),
    ("della_noelect", "row", "rank", False),
])
def test_della_family(method, scope, score, elect):
    base, ex = inputs(7)
    w = [1.0, 0.8, 1.2]
    got, m = run(method, {"weights": w}, base, ex, seed=42, name=NAME)
    d = deltas32(base, ex)
    dh = np.stack([ref_magprune(d[t], 0.3, 0.14, 42, NAME, t, scope, score) for t in range(N)])
    if elect:
        tau = ref_disjoint(dh, w)
    else:  # no sign election: plain weighted mean of the pruned deltas
        tau = (np.array(w)[:, None, None] * dh.astype(np.float64)).sum(0) / sum(w)
    np.testing.assert_allclose(got, base + 1.1 * tau, atol=ATOL, rtol=0)
    assert m.params == {"lambda": 1.1, "weights": w, "drop_rate": 0.3, "rescale": "inverse",
                        "window_size": 0.14}


def test_della_noelect_differs_from_della():
    # The DELLA fork configures della_noelect exactly like della; ours skips the election.
    base, ex = inputs(8)
    a, _ = run("della", {}, base, ex, seed=1, name=NAME)
    b, _ = run("della_noelect", {}, base, ex, seed=1, name=NAME)
    assert not np.allclose(a, b)


def test_dare_della_is_dare_then_elect_and_disjoint_mean():
    base, ex = inputs(9)
    got, _ = run("dare_della", {"drop_rate": 0.5, "lambda": 1.0}, base, ex, seed=5, name=NAME)
    d = deltas32(base, ex)
    dh = np.stack([ref_dare(d[t], 0.5, 5, NAME, t) for t in range(N)])
    np.testing.assert_allclose(got, base + ref_disjoint(dh, [1, 1, 1]), atol=ATOL, rtol=0)


# -- the DELLA paper's baselines and ablations (Tables 1, 4, 6) ------------------------------


def test_nodrop_is_elect_and_disjoint_mean_without_a_drop():
    # The paper's Table 1 "TA" (DELLA with p = 0): every delta kept, signs elected, then lambda.
    base, ex = inputs(20)
    w = [1.0, 0.5, 2.0]
    got, m = run("nodrop", {"weights": w, "lambda": 1.3}, base, ex, seed=2, name=NAME)
    d = deltas32(base, ex).astype(np.float64)
    wd = np.array(w)[:, None, None] * d
    gamma = np.where(wd.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(wd) == gamma
    tau = (wd * agree).sum(0) / np.maximum((np.array(w)[:, None, None] * agree).sum(0), 1e-30)
    np.testing.assert_allclose(got, base + 1.3 * tau, atol=ATOL, rtol=0)
    assert not np.allclose(got, base + 1.3 * wd.sum(0) / sum(w))  # not nodrop_noelect's mean
    assert m.params == {"lambda": 1.3, "weights": w}


def test_dare_noelect_is_dare_then_weighted_mean():
    base, ex = inputs(21)
    w = [1.0, 0.8, 1.2]
    got, _ = run("dare_noelect", {"drop_rate": 0.4, "lambda": 0.9, "weights": w}, base, ex, seed=4, name=NAME)
    d = deltas32(base, ex)
    dh = np.stack([ref_dare(d[t], 0.4, 4, NAME, t) for t in range(N)]).astype(np.float64)
    tau = (np.array(w)[:, None, None] * dh).sum(0) / sum(w)
    np.testing.assert_allclose(got, base + 0.9 * tau, atol=ATOL, rtol=0)


def test_ties_noelect_is_per_tensor_topk_then_weighted_mean():
    base, ex = inputs(22)
    got, _ = run("ties_noelect", {"density": 0.3, "lambda": 1.1}, base, ex)
    d = deltas32(base, ex)
    dh = np.stack([ref_trim(d[t], 0.3, "tensor") for t in range(N)]).astype(np.float64)
    np.testing.assert_allclose(got, base + 1.1 * dh.mean(0), atol=ATOL, rtol=0)


@pytest.mark.parametrize("method,scope", [("della_randrank", "row"), ("della_randrank_layer", "tensor")])
def test_random_ranking_keeps_by_a_keyed_random_permutation(method, scope):
    # Table 6's random ranking: the keep table k_r = (1-p) - eps + 2 eps r/(n-1) indexed by
    # the rank r of each element's keyed uniform (purpose "rank"), not of |delta|.
    base, ex = inputs(23)
    got, m = run(method, {"drop_rate": 0.5, "window_size": 0.4, "lambda": 1.0}, base, ex, seed=9, name=NAME)
    d = deltas32(base, ex)
    dh = []
    for t in range(N):
        x = d[t].reshape(1, -1) if scope == "tensor" else d[t]
        v = uniforms(9, NAME, t, "rank", x.shape)
        u = uniforms(9, NAME, t, "magprune", x.shape)
        out = np.zeros_like(x)
        for i, row in enumerate(x):
            n = len(row)
            r = np.empty(n)
            r[np.argsort(v[i], kind="stable")] = np.arange(n)
            k = np.float32(0.5 - 0.2 + 0.4 * r / (n - 1))
            out[i] = np.where(u[i] < k, row / k, np.float32(0))
        dh.append(out.reshape(d[t].shape))
    np.testing.assert_allclose(got, base + ref_disjoint(np.stack(dh), [1, 1, 1]), atol=ATOL, rtol=0)
    by_magnitude = {"della_randrank": "della", "della_randrank_layer": "della_layer"}[method]
    magnitude, _ = run(by_magnitude, {"drop_rate": 0.5, "window_size": 0.4, "lambda": 1.0}, base, ex, seed=9, name=NAME)
    assert not np.array_equal(got, magnitude)
    assert m.tensor_wide == (scope == "tensor")


def test_blocks_of_rows_merge_like_the_whole_tensor():
    base, ex = inputs(10, rows=12, cols=29)
    whole, _ = run("della", {}, base, ex, seed=3, name=NAME)
    parts = [run("della", {}, base[r:r + 5], ex[:, r:r + 5], seed=3, name=NAME, row0=r)[0] for r in range(0, 12, 5)]
    assert np.array_equal(whole, np.concatenate(parts))


def test_one_element_row_keeps_with_one_minus_p():
    assert steps.keep_table(1, 0.3, 0.14).tolist() == [pytest.approx(0.7)]
    t = steps.keep_table(5, 0.3, 0.2)
    np.testing.assert_allclose(t.numpy(), [0.6, 0.65, 0.7, 0.75, 0.8], rtol=1e-6)


def test_ranks_are_exact_for_long_rows_with_ties():
    # The fork computes GPU ranks in fp16 (exact only up to 2048); ours are exact.
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (2, 13824), generator=g).float()  # many ties
    r = steps.ranks_ascending(x)
    for row, rk in zip(x.numpy(), r.numpy()):
        np.testing.assert_array_equal(rk, np.argsort(np.argsort(row, kind="stable"), kind="stable"))


def test_topk_mask_keeps_exactly_k_lowest_index_on_ties():
    s = torch.tensor([[3.0, 1.0, 3.0, 2.0, 3.0, 0.0]])
    assert steps.topk_mask(s, 2).tolist() == [[True, False, True, False, False, False]]
    assert steps.topk_mask(s, 4).tolist() == [[True, False, True, True, True, False]]
    assert steps.keep_count(0.5, 7) == 3 and steps.keep_count(0.01, 7) == 1


# -- M3 ------------------------------------------------------------------------------------


def test_m3_average_ta_ties_and_dare():
    base, ex = inputs(11, n=2)
    seed = 4
    lam_m = rng.mixup_weights(seed, 0.5, 2)[0]
    d = deltas32(base, ex).astype(np.float64)

    got, m = run("m3", {"combine": "average"}, None, ex, seed=seed)
    np.testing.assert_allclose(got, lam_m * ex[0] + (1 - lam_m) * ex[1].astype(np.float64), atol=ATOL, rtol=0)
    assert m.params["mixup_weights"] == [lam_m, 1 - lam_m]

    got, _ = run("m3", {"combine": "task_arithmetic", "lambda": 1.5}, base, ex, seed=seed)
    np.testing.assert_allclose(got, base + 1.5 * (lam_m * d[0] + (1 - lam_m) * d[1]), atol=ATOL, rtol=0)

    # TIES + M3 as the reference code: both survive and agree -> mixup, else mean of agreeing.
    got, _ = run("m3", {"combine": "ties", "density": 0.5}, base, ex, seed=seed)
    dh = np.stack([ref_trim(deltas32(base, ex)[t], 0.5, "tensor") for t in range(2)]).astype(np.float64)
    gamma = np.where(dh.sum(0) >= 0, 1, -1)
    agree = np.sign(dh) == gamma
    both = agree.all(0)
    mean = (dh * agree).sum(0) / np.maximum(agree.sum(0), 1)
    tau = np.where(both, lam_m * dh[0] + (1 - lam_m) * dh[1], mean)
    np.testing.assert_allclose(got, base + tau, atol=ATOL, rtol=0)
    assert both.any() and (agree.sum(0) == 1).any()

    got, _ = run("m3", {"combine": "task_arithmetic", "dare": {"drop_rate": 0.3}}, base, ex, seed=seed, name=NAME)
    dd = np.stack([ref_dare(deltas32(base, ex)[t], 0.3, seed, NAME, t) for t in range(2)]).astype(np.float64)
    np.testing.assert_allclose(got, base + lam_m * dd[0] + (1 - lam_m) * dd[1], atol=ATOL, rtol=0)


def test_m3_three_experts_use_dirichlet_weights():
    base, ex = inputs(12)
    got, m = run("m3", {"combine": "task_arithmetic"}, base, ex, seed=9)
    mw = m.params["mixup_weights"]
    assert len(mw) == 3 and abs(sum(mw) - 1) < 1e-9
    d = deltas32(base, ex).astype(np.float64)
    np.testing.assert_allclose(got, base + sum(mw[t] * d[t] for t in range(3)), atol=ATOL, rtol=0)


def test_m3_with_a_given_lambda_m_reruns_a_logged_merge():
    base, ex = inputs(12)
    for params in ({"combine": "task_arithmetic"}, {"combine": "ties", "density": 0.5}, {"combine": "average"}):
        drawn, m = run("m3", params, base, ex, seed=9)
        assert "lambda_m" not in m.params and m.random  # not given: the seeded draw, as before
        given, m2 = run("m3", dict(params, lambda_m=m.params["mixup_weights"]), base, ex, seed=1)
        np.testing.assert_array_equal(given, drawn)
        assert m2.params["lambda_m"] == m2.params["mixup_weights"] == m.params["mixup_weights"]
        assert not m2.random  # no draw left
    # two experts: one number is the first expert's ratio (the paper's lambda_m)
    b2, e2 = inputs(11, n=2)
    d = deltas32(b2, e2).astype(np.float64)
    got, m = run("m3", {"lambda_m": 0.3, "lambda": 1.2}, b2, e2, seed=3)
    np.testing.assert_allclose(got, b2 + 1.2 * (0.3 * d[0] + 0.7 * d[1]), atol=ATOL, rtol=0)
    assert m.params["lambda_m"] == [0.3, 0.7]
    _, m = run("m3", {"lambda_m": 0.3, "dare": {"drop_rate": 0.2}}, b2, e2)
    assert m.random  # DARE still draws
    got, _ = run("m3", {"lambda_m": {"e1": 0.25, "e0": 0.75}}, b2, e2)
    np.testing.assert_allclose(got, b2 + 0.75 * d[0] + 0.25 * d[1], atol=ATOL, rtol=0)
    for bad, msg in [(0.3, "one number is a ratio for two experts"), ([0.5, 0.3, 0.3], "sum to 1.1"),
                     ([1.2, -0.1, -0.1], r"'lambda_m\[0\]': 1.2 is outside"), ([0.5, 0.5], "2 weights for 3"),
                     ({"e0": 1.0}, "no ratio for expert 'e1'")]:
        with pytest.raises(methods.ParamError, match=msg):
            methods.build("m3", {"lambda_m": bad}, ["e0", "e1", "e2"], 0)


# -- statistics -----------------------------------------------------------------------------


def test_della_keep_rate_per_rank_decile_follows_the_linear_schedule():
    p, ws, n = 0.5, 0.4, 20_000
    g = np.random.default_rng(0)
    d = torch.tensor(g.normal(size=(4, n)).astype(np.float32))
    kept = torch.zeros(4, n, dtype=torch.bool)
    out = steps.magprune_(d.clone(), p, ws, "inverse", rng.stream_key(0, "t", 0, "magprune"), 0)
    kept = out != 0
    ranks = steps.ranks_ascending(d.abs())
    for dec in range(10):
        sel = (ranks >= dec * n // 10) & (ranks < (dec + 1) * n // 10)
        rate = kept[sel].float().mean().item()
        expect = (1 - p) - ws / 2 + ws * (dec + 0.5) / 10
        sd = (expect * (1 - expect) / sel.sum().item()) ** 0.5
        assert abs(rate - expect) < 5 * sd, (dec, rate, expect)
    assert abs(kept.float().mean().item() - (1 - p)) < 0.01


@pytest.mark.parametrize("kind", ["dare", "della"])
def test_rescaled_deltas_are_unbiased(kind):
    g = np.random.default_rng(1)
    d = torch.tensor(g.normal(size=(4, 64)).astype(np.float32))
    draws = []
    for seed in range(600):
        key = rng.stream_key(seed, "t", 0, kind)
        x = d.clone()
        if kind == "dare":
            steps.bernoulli_drop_(x, 0.6, "inverse", key, 0)
        else:
            steps.magprune_(x, 0.6, 0.3, "inverse", key, 0)
        draws.append(x.numpy())
    draws = np.stack(draws).astype(np.float64)
    mean, sd = draws.mean(0), draws.std(0) / np.sqrt(len(draws))
    z = (mean - d.numpy()) / sd
    assert np.abs(z).max() < 5
    assert abs(z.mean()) < 5 / np.sqrt(z.size)  # no overall bias
    # and without rescaling the survivors would be biased towards zero
    assert (np.abs(draws.mean(0)) < np.abs(d.numpy()) * 0.9).mean() < 0.1


# -- params --------------------------------------------------------------------------------


@pytest.mark.parametrize("method,params,key", [
    ("ties", {"densty": 0.5}, "densty"),
    ("ties", {}, "density"),
    ("ties", {"density": 0.5, "mask_rate": 0.5}, "mask_rate"),
    ("ties", {"density": 1.5}, "density"),
    ("ties", {"density": 0.5, "trim_scope": "layer"}, "trim_scope"),
    ("della", {"epsilon": 0.07}, "epsilon"),
    ("della", {"density": 0.7}, "density"),
    ("della", {"drop_rate": 0.9, "window_size": 0.4}, "window_size"),
    ("dare", {}, "drop_rate"),
    ("dare", {"drop_rate": 0.3, "rescale": "l2"}, "rescale"),
    ("dare", {"drop_rate": 0.3, "density": 0.5}, "density"),
    ("task_arithmetic", {"weights": [1, 2]}, "weights"),
    ("task_arithmetic", {"weights": {"nope": 1}}, "weights"),
    ("task_arithmetic", {"lambda": "big"}, "lambda"),
    ("m3", {"combine": "slerp"}, "combine"),
    ("m3", {"dare": {"drop_rate": 0.3, "p": 1}}, "dare.p"),
])
def test_bad_params_name_the_key(method, params, key):
    with pytest.raises(MergeflowError, match=repr(key)):
        methods.build(method, params, ["e0", "e1", "e2"], 0)


def test_unknown_method_is_named():
    with pytest.raises(MergeflowError, match="'slurp'"):
        methods.build("slurp", {}, ["a"], 0)


@pytest.mark.parametrize("ties", [False, True])
def test_large_tensor_trim_selects_the_k_largest_exactly(ties):
    # Above 65536 elements the CPU uses a radix select: compare with a full sort.
    g = torch.Generator().manual_seed(int(ties))
    n = 70_001
    a = torch.randint(0, 300, (n,), generator=g).float() * 1e-3 if ties else torch.rand(n, generator=g)
    for k in (777, n // 2):
        v = float(torch.sort(a, descending=True).values[k - 1])
        assert steps.kth_largest_flat(a, k) == (v, int((a > v).sum()), int((a == v).sum()))
        ref = torch.zeros(n, dtype=torch.bool)
        ref[torch.sort(-a, stable=True).indices[:k]] = True
        assert torch.equal(steps.topk_mask(a.view(1, -1), k).view(-1), ref)


def test_topk_mask_keeps_the_first_of_tied_values_as_a_stable_sort():
    # Mostly ties: which of the equal values are kept decides the bits (block edges at 2**16).
    g = torch.Generator().manual_seed(0)
    for n in (5, 65536, 65537, 200_003):
        a = torch.randint(0, 3, (n,), generator=g).float()
        for k in (1, n // 3, n // 2 + 1, n):
            ref = torch.zeros(n, dtype=torch.bool)
            ref[torch.sort(-a, stable=True).indices[:k]] = True
            assert torch.equal(steps.topk_mask(a.view(1, -1), k).view(-1), ref), (n, k)


def test_device_radix_select_matches_a_sort():
    # The CUDA trim's sync-free threshold (a radix select of the float bits), run here on the CPU.
    g = torch.Generator().manual_seed(2)
    for ties in (False, True):
        a = torch.randint(0, 300, (90_001,), generator=g).float() * 1e-3 if ties else torch.rand(90_001, generator=g)
        for k in (1, 4321, 45_000, 90_000):
            assert float(steps._kth_largest_device(a, k)) == float(torch.sort(a, descending=True).values[k - 1])


def test_breadcrumbs_mask_is_mergekits_magnitude_outliers():
    # Edge cases of mergekit's rule: outliers shrink when density + gamma > 1, gamma 0, tiny tensors.
    mk = pytest.importorskip("mergekit.sparsify")
    g = torch.Generator().manual_seed(3)
    for shape, density, gamma in [((7, 33), 0.3, 0.05), ((7, 33), 0.9, 0.2), ((100,), 0.5, 0.0),
                                  ((5, 5), 0.1, 0.5), ((3,), 0.4, 0.34), ((64, 64), 0.99, 0.02)]:
        x = torch.randn(shape, generator=g)
        want = mk.magnitude_outliers(x.clone(), density, gamma=gamma)
        got = steps.outlier_trim_(x.clone()[None], density, gamma)[0]
        assert torch.equal(got, want), (shape, density, gamma)
    # ties in |delta|: exactly int(density n) kept, the lower index counting as larger
    x = torch.tensor([[1.0, -1.0, 1.0, 0.5, -0.5, 0.5, 2.0, 0.25]])
    got = steps.outlier_trim_(x.clone()[None], 0.5, 0.125)[0]
    assert torch.equal(got, torch.tensor([[1.0, -1.0, 1.0, 0.5, 0, 0, 0, 0]]))


def test_breadcrumbs_params():
    base, ex = inputs(4)
    # density 1 keeps everything (mergekit ignores gamma there): task arithmetic
    got, m = run("breadcrumbs", {"density": 1.0, "gamma": 0.3, "lambda": 0.5}, base, ex)
    want, _ = run("task_arithmetic", {"lambda": 0.5}, base, ex)
    np.testing.assert_array_equal(got, want)
    assert m.granularity == "element"
    _, m = run("breadcrumbs_ties", {"mask_rate": 0.4}, base, ex)
    assert m.params["density"] == pytest.approx(0.6) and m.params["gamma"] == 0.01 and m.granularity == "tensor"
    with pytest.raises(methods.ParamError, match="'density': is required"):
        methods.build("breadcrumbs", {}, ["a", "b"], 0)
    with pytest.raises(methods.ParamError, match="'gamma': 1.5 is outside"):
        methods.build("breadcrumbs_ties", {"density": 0.5, "gamma": 1.5}, ["a", "b"], 0)


def test_model_stock_follows_mergekits_formula_also_at_its_edges():
    # mergekit 0.1.5's model_stock written out: clamped norms and cosines, t = 0 at the singularity
    g = torch.Generator().manual_seed(5)
    base = torch.randn(9, 31, generator=g)
    a = torch.randn(9, 31, generator=g)
    cases = {"generic": [a, torch.randn(9, 31, generator=g), torch.randn(9, 31, generator=g)],
             "parallel": [a, 2 * a], "opposed (1 + (k-1) cos = 0)": [a, -a], "zero": [a, torch.zeros(9, 31)]}
    for label, ds in cases.items():
        ours = methods.build("model_stock", {}, [f"e{i}" for i in range(len(ds))], 0).merge(
            methods.Block(NAME, base.clone(), torch.stack([base + d for d in ds]), 0, 0))
        ws = [base] + [base + d for d in ds]
        cos = torch.stack([(x - base).flatten() @ (y - base).flatten()
                           / ((x - base).norm() * (y - base).norm()).clamp(min=1e-6)
                           for i, x in enumerate(ws[1:]) for y in ws[i + 2:]]).clamp(-1, 1).mean()
        k = len(ds)
        t = 0.0 if abs(1 + (k - 1) * cos) < 1e-6 else k * cos / (1 + (k - 1) * cos)
        want = t * sum(ws[1:]) / k + (1 - t) * base
        torch.testing.assert_close(ours, want, rtol=0, atol=1e-5, msg=label)
    with pytest.raises(methods.ParamError, match="at least two fine-tunes"):
        methods.build("model_stock", {}, ["a"], 0)


def test_consensus_by_hand_and_its_params():
    # two experts, lambda 0.5: masks [T, T, F, T] and [T, T, T, F]; counts [2, 2, 1, 1]
    ex = np.array([[[1.0, 1.0, 0.1, -1.0]], [[1.0, -1.0, 1.0, 0.05]]], dtype=np.float32)
    base = np.zeros((1, 4), dtype=np.float32)
    got, _ = run("consensus_ta", {"tall_mask_lambda": 0.5, "k": 2}, base, ex)
    np.testing.assert_array_equal(got, [[2.0, 0.0, 0.0, 0.0]])
    got, _ = run("consensus_ta", {"tall_mask_lambda": 0.5, "k": 1}, base, ex)
    np.testing.assert_allclose(got, [[2.0, 0.0, 1.1, -0.95]], rtol=1e-6)
    # per-expert lambdas: expert 2's threshold 2 |tau - delta_2| drops its third entry
    got, _ = run("consensus_ta", {"tall_mask_lambda": [0.5, 20.0], "k": 1}, base, ex)
    np.testing.assert_allclose(got, [[2.0, 0.0, 0.0, -0.95]], rtol=1e-6)
    # k = 0 keeps everything: task arithmetic
    b2, e2 = inputs(6)
    got, _ = run("consensus_ta", {"tall_mask_lambda": 0.4, "k": 0, "lambda": 0.7}, b2, e2)
    np.testing.assert_array_equal(got, run("task_arithmetic", {"lambda": 0.7}, b2, e2)[0])
    _, m = run("consensus_ties", {"tall_mask_lambda": 0.4, "mask_rate": 0.3}, b2, e2)
    assert m.params["density"] == pytest.approx(0.7) and m.params["k"] == 2.0 and m.tensor_topk
    with pytest.raises(methods.ParamError, match="'k': 4 exceeds the 3 experts"):
        methods.build("consensus_ta", {"tall_mask_lambda": 0.4, "k": 4}, ["a", "b", "c"], 0)
    with pytest.raises(methods.ParamError, match="'tall_mask_lambda': is required"):
        methods.build("consensus_ta", {}, ["a", "b"], 0)
    with pytest.raises(methods.ParamError, match=r"'tall_mask_lambda\[1\]': -0.1 is negative"):
        methods.build("consensus_ta", {"tall_mask_lambda": [0.3, -0.1]}, ["a", "b"], 0)
    with pytest.raises(methods.ParamError, match="'density': is required"):
        methods.build("consensus_ties", {"tall_mask_lambda": 0.4}, ["a", "b"], 0)
    with pytest.raises(methods.ParamError, match="use 'k'"):
        methods.build("consensus_ta", {"tall_mask_lambda": 0.4, "prun_thre_k": 2}, ["a", "b"], 0)


@pytest.mark.parametrize("method", ["tsv_m", "iso_c"])
def test_svd_methods_take_the_mean_delta_off_matrices(method):
    base, ex = inputs(8, rows=1, cols=40)
    d = deltas32(base, ex).astype(np.float64)
    for shape in [(40,), (1, 5, 8)]:  # a 1-D tensor, a 3-D one (the engine's 2-D view [rows, cols])
        m = methods.build(method, {"lambda": 0.5}, ["a", "b", "c"], 0)
        got = m.merge(methods.Block(NAME, torch.tensor(base), torch.tensor(ex.copy()), 0, 0, shape=shape))
        np.testing.assert_allclose(got.numpy(), base + 0.5 * d.mean(0), atol=ATOL, rtol=0)
    # as a [1, 40] matrix: rank 1, so TSV-M keeps int(1/3) = 0 triplets per task (as the reference)
    got = methods.build(method, {}, ["a", "b", "c"], 0).merge(
        methods.Block(NAME, torch.tensor(base), torch.tensor(ex.copy()), 0, 0, shape=(1, 40))).numpy()
    if method == "tsv_m":
        np.testing.assert_array_equal(got, base)
    else:  # rank 1: the isotropic sum is the sum itself
        np.testing.assert_allclose(got, base + d.sum(0), atol=ATOL, rtol=0)


def test_svd_methods_through_the_engine(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from mergeflow.merging.engine import run_merge

    sd = load_file(tiny_model_dir / "model.safetensors")
    experts = perturbed_experts(tiny_model_dir, tmp_path, 2, seed=20)
    e = [load_file(Path(p) / "model.safetensors") for p in experts.values()]
    run_merge("iso_c", experts, str(tmp_path / "out"), base=str(tiny_model_dir), params={"dtype": "float32"},
              device="cpu", progress=False)
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert {len(v.shape) for v in sd.values()} == {1, 2}
    for k, v in sd.items():
        tau = (e[0][k].float() - v.float()) + (e[1][k].float() - v.float())
        if v.dim() == 2:
            u, s, vh = torch.linalg.svd(tau.double(), full_matrices=False)
            want = v.double() + s.mean() * u @ vh
        else:
            want = v.double() + tau.double() / 2
        torch.testing.assert_close(out[k].double(), want, rtol=0, atol=2e-6, msg=k)


# -- SCE (FuseChat; mergekit 0.1.5 `sce`) ---------------------------------------------------


def ref_sce(d, select_topk):
    """SCE written out (float64): keep the int(select_topk * #(var > 0)) elements of largest
    variance across experts, c_t = mean(delta_t^2) normalised, keep experts agreeing with
    sign(sum_t delta_t), tau = sum_t c_t delta_t [kept] / max(sum_t c_t [kept], 1e-6)."""
    d = d.astype(np.float64)
    if select_topk < 1:
        var = d.var(0)
        k = int(np.count_nonzero(var) * select_topk)
        keep = np.zeros(var.size, dtype=bool)
        keep[np.argsort(-var.ravel(), kind="stable")[:k]] = True
        d = d * keep.reshape(var.shape)
    c = (d ** 2).reshape(len(d), -1).mean(1)
    c = c / c.sum() if abs(c.sum()) >= 1e-6 else np.full(len(d), 1 / len(d))
    kept = np.sign(d) == np.where(d.sum(0) >= 0, 1.0, -1.0)
    cw = c[:, None, None] * kept
    return (cw * d).sum(0) / np.maximum(cw.sum(0), 1e-6)


@pytest.mark.parametrize("select_topk", [1.0, 0.3])
def test_sce_select_calculate_erase(select_topk):
    base, ex = inputs(11, rows=7, cols=45)
    got, m = run("sce", {"select_topk": select_topk, "lambda": 0.8}, base, ex)
    np.testing.assert_allclose(got, base + 0.8 * ref_sce(deltas32(base, ex), select_topk), atol=ATOL, rtol=0)
    assert m.granularity == "tensor" and not m.random and m.uses_base
    if select_topk < 1:  # the selection zeroes all but 30 % of the merged deltas
        assert np.count_nonzero(got - base) <= int(0.3 * got.size)


def test_sce_matches_mergekits_steps_at_the_edges():
    # mergekit's own helpers composed as its sce_merge does; bit for bit in float32
    mk = pytest.importorskip("mergekit.merge_methods.sce")
    g = torch.Generator().manual_seed(12)
    base = torch.randn(9, 31, generator=g)
    generic = torch.randn(3, 9, 31, generator=g) * 0.01
    one_zero = generic.clone()
    one_zero[1] = 0  # an expert equal to the base
    cases = {"generic": generic, "one expert unchanged": one_zero, "all unchanged": torch.zeros(3, 9, 31),
             "two experts": generic[:2].clone()}
    for label, d in cases.items():
        for topk in (1.0, 0.5, 0.07):
            ex = base + d
            tv = ex - base
            if topk < 1:
                tv = tv * mk.sce_mask(tv, topk, tv.dtype).unsqueeze(0)
            erase = mk.sign_consensus_mask(tv, method="sum", mask_dtype=tv.dtype)
            w = mk.sce_weight(tv).view(-1, 1, 1) * erase
            want = base + (tv * w).sum(dim=0) / torch.sum(w, dim=0).clamp(min=1e-6)
            got = methods.build("sce", {"select_topk": topk}, [f"e{i}" for i in range(len(d))], 0).merge(
                methods.Block(NAME, base.clone(), ex.clone(), 0, 0))
            assert torch.equal(got, want), (label, topk)


def test_sce_params():
    with pytest.raises(methods.ParamError, match="'select_topk': 0.0 is outside"):
        methods.build("sce", {"select_topk": 0}, ["a", "b"], 0)
    with pytest.raises(methods.ParamError, match="'density'.*use 'select_topk'|'density'.*select_topk"):
        methods.build("sce", {"density": 0.5}, ["a", "b"], 0)
    with pytest.raises(methods.ParamError, match="'weights'.*no weight"):
        methods.build("sce", {"weights": [1, 2]}, ["a", "b"], 0)
    assert methods.build("sce", {}, ["a", "b"], 0).params == {"lambda": 1.0, "select_topk": 1.0}


# -- PCB-merging (Du et al., NeurIPS 2024; the authors' PCB_merge) ---------------------------


def ref_pcb(d, pcb_ratio=0.1, clamp_ratio=0.0001, w=None):
    """The authors' PCB_merge (duguodong7/pcb-merging, pcb-merging.py) in float64 numpy on
    one tensor flattened to [N, d], with their per-task lams as w."""
    x = d.astype(np.float64).reshape(len(d), -1)
    n, dim = x.shape
    w = np.ones(n) if w is None else np.asarray(w, dtype=np.float64)

    def clamp(v, min_ratio, max_ratio):  # the reference's sort-based clamp
        srt = np.sort(v, axis=1)
        return np.clip(v, srt[:, [int(dim * min_ratio)]], srt[:, [int(dim * (1 - max_ratio) - 1)]])

    def normalize(v):
        lo, hi = v.min(1, keepdims=True), v.max(1, keepdims=True)
        return (v - lo) / (hi - lo)

    a = clamp(np.abs(x), clamp_ratio, clamp_ratio)
    score = np.exp(n * normalize(a) ** 2) * np.tanh(x * x.sum(0))
    scale = normalize(clamp(score, 1 - pcb_ratio, 0))
    tvs = np.sign(x) * a * w[:, None]
    return ((tvs * scale).sum(0) / np.maximum(scale.sum(0), 1e-12)).reshape(d.shape[1:])


@pytest.mark.parametrize("params", [{}, {"pcb_ratio": 0.3, "clamp_ratio": 0.02, "weights": [1.2, 0.8, 1.0],
                                         "lambda": 0.7}])
def test_pcb_balances_drops_and_rescales_as_the_reference(params):
    base, ex = inputs(13, rows=7, cols=45)
    got, m = run("pcb", params, base, ex)
    want = ref_pcb(deltas32(base, ex), params.get("pcb_ratio", 0.1), params.get("clamp_ratio", 0.0001),
                   params.get("weights"))
    np.testing.assert_allclose(got, base + params.get("lambda", 1.0) * want, atol=ATOL, rtol=0)
    assert m.granularity == "tensor" and not m.random
    # each task keeps about pcb_ratio of its scores: the merge moves at most N times that many
    kept = int(base.size - int(base.size * (1 - params.get("pcb_ratio", 0.1))))
    assert 0 < np.count_nonzero(got - base) <= 3 * kept


def test_pcb_by_hand_and_where_we_differ():
    # two experts, four elements, no clamp, keep all but the lowest score (pcb_ratio 0.75)
    d = np.array([[[0.2, -0.1, 0.4, 0.0]], [[0.2, 0.3, -0.4, 0.1]]], dtype=np.float32)
    base = np.zeros((1, 4), dtype=np.float32)
    got, _ = run("pcb", {"pcb_ratio": 0.75, "clamp_ratio": 0.0}, base, d)
    np.testing.assert_allclose(got[0], ref_pcb(d, 0.75, 0.0)[0], atol=1e-6, rtol=0)
    # by hand: intra_t = exp(2 minmax(|d_t|)^2), inter_t = tanh(d_t (d_1 + d_2)), the lowest score of
    # each task scales to 0, the rest min-max; element 3 (opposed 0.4 / -0.4) sums to 0 and scores 0
    x = d[:, 0].astype(np.float64)
    a = np.abs(x)
    score = np.exp(2 * ((a - a.min(1, keepdims=True)) / np.ptp(a, 1, keepdims=True)) ** 2) * np.tanh(x * x.sum(0))
    lo = np.sort(score, 1)[:, [1]]
    s = (np.maximum(score, lo) - lo) / (score.max(1, keepdims=True) - lo)
    np.testing.assert_allclose(got[0], (x * s).sum(0) / np.maximum(s.sum(0), 1e-12), atol=1e-6, rtol=0)
    assert got[0, 2] == 0.0
    # an expert equal to the base in a tensor: the reference's min-max divides 0 by 0 (NaN
    # everywhere); ours normalises that constant row to 0, so the other experts merge
    d2 = d.copy()
    d2[1] = 0
    got, _ = run("pcb", {"pcb_ratio": 0.75, "clamp_ratio": 0.0}, base, d2)
    with np.errstate(invalid="ignore"):
        assert np.isnan(ref_pcb(d2, 0.75, 0.0)).all()
    assert np.isfinite(got).all() and np.count_nonzero(got) > 0


def test_pcb_params():
    with pytest.raises(methods.ParamError, match="'pcb_ratio': 0.0 is outside"):
        methods.build("pcb", {"pcb_ratio": 0}, ["a", "b"], 0)
    with pytest.raises(methods.ParamError, match="'clamp_ratio': 0.5 is outside"):
        methods.build("pcb", {"clamp_ratio": 0.5}, ["a", "b"], 0)
    with pytest.raises(methods.ParamError, match="'min_ratio'.*use 'clamp_ratio'"):
        methods.build("pcb", {"min_ratio": 0.01}, ["a", "b"], 0)
    with pytest.raises(methods.ParamError, match="'density'.*pcb_ratio"):
        methods.build("pcb", {"density": 0.2}, ["a", "b"], 0)
    with pytest.raises(methods.ParamError, match="'scaling_factor'.*use 'lambda'"):
        methods.build("pcb", {"scaling_factor": 0.3}, ["a", "b"], 0)
    p = methods.build("pcb", {}, ["a", "b"], 0).params
    assert p == {"lambda": 1.0, "weights": [1.0, 1.0], "pcb_ratio": 0.1, "clamp_ratio": 0.0001}


# -- Iso-CTS (Marczak et al., ICML 2025; the authors' iso_cts as in FusionBench) ------------


def ref_iso_cts(d, f):
    """The authors' iso_cts on one matrix, float64 numpy: common subspace from the SVD of the
    sum, each task's top directions of (I - U_c U_c^T) delta_t, U and V orthogonalised by
    their polar factors, singular values set to their mean."""
    d = d.astype(np.float64)
    t, m, n = d.shape
    r = min(m, n)
    c = int(r * f)
    c = r - round((r - c) / t) * t
    k = int((r - c) / t)
    u, s, vh = np.linalg.svd(d.sum(0), full_matrices=False)
    uc = u[:, :c]
    U, S, V = np.zeros((m, r)), np.zeros(r), np.zeros((r, n))
    for i in range(t):
        ui, si, vi = np.linalg.svd(d[i] - uc @ uc.T @ d[i], full_matrices=False)
        U[:, i * k:(i + 1) * k], S[i * k:(i + 1) * k], V[i * k:(i + 1) * k] = ui[:, :k], si[:k], vi[:k]
    U[:, t * k:], S[t * k:], V[t * k:] = uc, s[:c], vh[:c]

    def polar(a):
        p, _, q = np.linalg.svd(a, full_matrices=False)
        return p @ q

    return S.mean() * polar(U) @ polar(V)


@pytest.mark.parametrize("rows,cols,f", [(8, 41, 0.8), (12, 10, 0.5), (9, 30, 0.0)])
def test_iso_cts_common_and_task_subspaces(rows, cols, f):
    base, ex = inputs(14, rows=rows, cols=cols)
    got, m = run("iso_cts", {"common_space_fraction": f, "lambda": 0.6}, base, ex)
    np.testing.assert_allclose(got, base + 0.6 * ref_iso_cts(deltas32(base, ex), f), atol=ATOL, rtol=0)
    assert m.granularity == "tensor" and not m.random
    # the task-specific directions make it another matrix than Iso-C's
    iso_c, _ = run("iso_c", {"lambda": 0.6}, base, ex)
    assert not np.allclose(got, iso_c, atol=1e-5)


def test_iso_cts_edges():
    base, ex = inputs(15, rows=8, cols=41)
    # all of the rank common: Iso-C (the polar factors of orthonormal U, V are themselves)
    got, _ = run("iso_cts", {"common_space_fraction": 1.0}, base, ex)
    np.testing.assert_allclose(got, run("iso_c", {}, base, ex)[0], atol=ATOL, rtol=0)
    # r = 2, 3 tasks, f = 0.1: the reference's rounding asks for 3 task directions of 2 (its
    # common size goes negative); we give the task subspaces one share less: all common, Iso-C
    b2, e2 = inputs(16, rows=2, cols=40)
    got, _ = run("iso_cts", {"common_space_fraction": 0.1}, b2, e2)
    np.testing.assert_allclose(got, run("iso_c", {}, b2, e2)[0], atol=ATOL, rtol=0)
    # not a matrix: the mean task vector, as iso_c and the reference
    d = deltas32(b2, e2).astype(np.float64)
    for shape in [(80,), (2, 5, 8)]:
        m = methods.build("iso_cts", {"lambda": 0.5}, ["a", "b", "c"], 0)
        out = m.merge(methods.Block(NAME, torch.tensor(b2), torch.tensor(e2.copy()), 0, 0, shape=shape))
        np.testing.assert_allclose(out.numpy(), b2 + 0.5 * d.mean(0), atol=ATOL, rtol=0)
    with pytest.raises(methods.ParamError, match="'common_space_fraction': 1.5 is outside"):
        methods.build("iso_cts", {"common_space_fraction": 1.5}, ["a", "b"], 0)
    with pytest.raises(methods.ParamError, match="'scaling_factor'.*use 'lambda'"):
        methods.build("iso_cts", {"scaling_factor": 1.0}, ["a", "b"], 0)


# -- NuSLERP and Multi-SLERP (mergekit 0.1.5 `nuslerp`, `multislerp`) ------------------------


def ref_nuslerp(v0, v1, t):
    """mergekit's nuslerp (flattened) in float64: normalised vectors (norms clamped at 1e-7),
    linear where 1 - cos^2 <= 1e-16, else (sin((1 - t) O) v0 + sin(t O) v1) / sin O."""
    v0, v1 = v0.astype(np.float64), v1.astype(np.float64)
    cos = np.clip((v0 / max(np.linalg.norm(v0), 1e-7) * (v1 / max(np.linalg.norm(v1), 1e-7))).sum(), -1, 1)
    if 1 - cos ** 2 <= 1e-16:
        return (1 - t) * v0 + t * v1
    th = np.arccos(cos)
    return (np.sin((1 - t) * th) * v0 + np.sin(t * th) * v1) / np.sin(th)


def ref_multislerp(x, w, eps=1e-8):
    """mergekit's multislerp in float64: the normalised weighted mean of the unit vectors,
    the weighted tangent there, the exponential map, scaled by the weighted mean norm."""
    shape = x.shape[1:]
    x = x.astype(np.float64).reshape(len(x), -1)
    w = np.asarray(w, dtype=np.float64) / sum(w)
    norms = np.linalg.norm(x, axis=1)
    u = x / (norms[:, None] + eps)
    m = (u * w[:, None]).sum(0)
    m /= np.linalg.norm(m)
    g = ((u - (u @ m)[:, None] * m) * w[:, None]).sum(0)
    gn = np.linalg.norm(g) + eps
    return ((m * np.cos(gn) + g * np.sin(gn) / gn) * (norms * w).sum()).reshape(shape)


def test_nuslerp_matches_mergekits_function():
    mk = pytest.importorskip("mergekit.merge_methods.nuslerp")
    g = torch.Generator().manual_seed(17)
    a = torch.randn(7, 33, generator=g)
    cases = {"generic": torch.randn(7, 33, generator=g), "parallel": a * 2.5, "antiparallel": -a,
             "near parallel": a + 1e-3 * torch.randn(7, 33, generator=g), "zero": torch.zeros(7, 33)}
    for label, b in cases.items():
        for w in ([1.0, 1.0], [0.3, 0.7], [2.0, -0.5], [1.0, -1.0]):
            t = 0.5 if abs(sum(w)) < 1e-6 else w[1] / sum(w)
            ours = methods.build("nuslerp", {"weights": w}, ["a", "b"], 0).merge(
                methods.Block(NAME, None, torch.stack([a, b]), 0, 0))
            theirs = mk.nuslerp(t, a, b, flatten=True)
            # antiparallel: float32 cos = -0.99999994 in both, not colinear, so both take the
            # spherical branch, where 1 / sin(theta) ~ 3e3 magnifies the float32 rounding
            tol = 2e-3 if label == "antiparallel" else 1e-5
            torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol, msg=f"{label} w={w}")
            if label == "antiparallel" and 0 < t < 1:  # ... whose limit is not the linear interpolation
                assert not torch.allclose(ours, (1 - t) * a + t * b, atol=1e-2) or t == 0.5
            if label != "antiparallel":  # (in float64 cos is -1 there: the linear branch)
                np.testing.assert_allclose(ours.numpy(), ref_nuslerp(a.numpy(), b.numpy(), t), rtol=1e-5, atol=1e-5)


def test_nuslerp_of_task_vectors_and_params():
    base, ex = inputs(18, rows=5, cols=30, n=2)
    got, m = run("nuslerp", {"weights": [0.25, 0.75], "interpolate": "task_vectors"}, base, ex)
    d = deltas32(base, ex)
    np.testing.assert_allclose(got, base + ref_nuslerp(d[0], d[1], 0.75), atol=ATOL, rtol=0)
    assert m.uses_base and m.granularity == "tensor"
    got, m = run("nuslerp", {}, None, ex)
    np.testing.assert_allclose(got, ref_nuslerp(ex[0], ex[1], 0.5), atol=ATOL, rtol=0)
    assert not m.uses_base
    with pytest.raises(methods.ParamError, match="exactly two experts"):
        methods.build("nuslerp", {}, ["a", "b", "c"], 0)
    with pytest.raises(methods.ParamError, match="'t'.*takes 'weights'"):
        methods.build("nuslerp", {"t": 0.3}, ["a", "b"], 0)
    with pytest.raises(methods.ParamError, match="'nuslerp_flatten'.*one vector"):
        methods.build("nuslerp", {"nuslerp_flatten": False}, ["a", "b"], 0)
    with pytest.raises(methods.ParamError, match="'interpolate'"):
        methods.build("nuslerp", {"interpolate": "rows"}, ["a", "b"], 0)


def test_multislerp_on_the_sphere_and_its_edges():
    base, ex = inputs(19, rows=6, cols=25)
    w = [0.5, 1.0, 1.5]
    got, m = run("multislerp", {"weights": w}, None, ex)
    np.testing.assert_allclose(got, ref_multislerp(ex, w), atol=ATOL, rtol=0)
    assert not m.uses_base and m.granularity == "tensor"
    got, _ = run("multislerp", {"weights": w, "interpolate": "task_vectors"}, base, ex)
    np.testing.assert_allclose(got, base + ref_multislerp(deltas32(base, ex), w), atol=ATOL, rtol=0)
    # two experts: the same great circle as NuSLERP's at t = 1/2 where the norms are equal
    a = ex[0] / np.linalg.norm(ex[0])
    b = ex[1] / np.linalg.norm(ex[1])
    two = np.stack([a, b]).astype(np.float32)
    np.testing.assert_allclose(run("multislerp", {}, None, two)[0], ref_nuslerp(a, b, 0.5), atol=1e-6, rtol=0)
    # antipodal pair with equal weights: the linear mean (0), as mergekit; three experts: an error
    anti = np.stack([a, -a]).astype(np.float32)
    np.testing.assert_array_equal(run("multislerp", {}, None, anti)[0], np.zeros_like(a))
    with pytest.raises(MergeflowError, match=f"tensor '{NAME}'.*weighted mean of the normalised experts is zero"):
        run("multislerp", {"weights": [1.0, 1.0, 2.0]}, None, np.stack([a, -a, np.zeros_like(a)]).astype(np.float32),
            name=NAME)
    with pytest.raises(methods.ParamError, match="weights sum to zero"):
        methods.build("multislerp", {"weights": [1, -1]}, ["a", "b"], 0)
    with pytest.raises(methods.ParamError, match="'normalize_weights'.*always normalises"):
        methods.build("multislerp", {"normalize_weights": False}, ["a", "b"], 0)
    with pytest.raises(methods.ParamError, match="at least two experts"):
        methods.build("multislerp", {}, ["a"], 0)
