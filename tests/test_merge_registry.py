"""The method registry: every registered method against a formula written out here, its
declarations (base, granularity, randomness) against its behaviour, the config schema and
the CLI help against the param specs, and a new method added with one function."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import perturbed_experts
import torch
import yaml

from mergeflow.merging import methods, rng
from test_merge_methods import (ATOL, N, NAME, deltas32, inputs, ref_dare, ref_disjoint, ref_iso_cts, ref_magprune,
                               ref_multislerp, ref_nuslerp, ref_pcb, ref_sce, ref_trim)

ROOT = Path(__file__).resolve().parents[1]
W = [1.0, 0.6, 1.4]


def _wmean(dh, w):
    w = np.asarray(w, dtype=np.float64)[:, None, None]
    return (w * dh.astype(np.float64)).sum(0) / w.sum()


def _wsum(dh, w):
    return (np.asarray(w, dtype=np.float64)[:, None, None] * dh.astype(np.float64)).sum(0)


def _magpruned(d, seed, scope="row", score="rank", p=0.3, ws=0.14):
    return np.stack([ref_magprune(d[t], p, ws, seed, NAME, t, scope, score) for t in range(N)])


def _dared(d, seed, p):
    return np.stack([ref_dare(d[t], p, seed, NAME, t) for t in range(N)])


def _randrank(d, seed, scope):
    from test_merge_methods import uniforms

    out = []
    for t in range(N):
        x = d[t].reshape(1, -1) if scope == "tensor" else d[t]
        v, u = uniforms(seed, NAME, t, "rank", x.shape), uniforms(seed, NAME, t, "magprune", x.shape)
        rows = np.zeros_like(x)
        for i, row in enumerate(x):
            r = np.empty(len(row))
            r[np.argsort(v[i], kind="stable")] = np.arange(len(row))
            k = np.float32(0.7 - 0.07 + 0.14 * r / (len(row) - 1))
            rows[i] = np.where(u[i] < k, row / k, np.float32(0))
        out.append(rows.reshape(d[t].shape))
    return np.stack(out)


def _m3_ref(base, ex, seed, d):
    m = rng.mixup_weights(seed, 0.5, N)
    return base + 0.8 * _wsum(d, m)


def _slerp_ref(a, b, t):
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    cos = np.clip(a64 @ b64 / np.linalg.norm(a64) / np.linalg.norm(b64), -1, 1)
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    th = np.arccos(cos)
    return (np.sin((1 - t) * th) * a + np.sin(t * th) * b) / np.sin(th)


def _crumbs(x, density, gamma):
    """Breadcrumbs mask of one expert's tensor: sort |x| descending (ties: lower index first),
    skip the top int(gamma n) (fewer when density + gamma > 1), keep the next int(density n)."""
    g = x.ravel()
    n = len(g)
    target, n_top = int(density * n), int(gamma * n)
    skip = n - max(0, n - target - n_top) - target
    keep = np.argsort(-np.abs(g), kind="stable")[skip:skip + target]
    out = np.zeros_like(g)
    out[keep] = g[keep]
    return out.reshape(x.shape)


def _dis_sum(dh, w):
    wd = np.asarray(w, dtype=np.float64)[:, None, None] * dh.astype(np.float64)
    gamma = np.where(wd.sum(0) >= 0, 1.0, -1.0)
    return (wd * (np.sign(wd) == gamma)).sum(0)


def _stock_ref(base, d):
    """Model Stock (Jang et al. 2024, eq. 2 with the mean pairwise angle): t = k cos / (1 + (k-1) cos)."""
    v = d.astype(np.float64).reshape(len(d), -1)
    k = len(v)
    cos = np.mean([v[i] @ v[j] / np.linalg.norm(v[i]) / np.linalg.norm(v[j])
                   for i in range(k) for j in range(i + 1, k)])
    t = k * cos / (1 + (k - 1) * cos)
    return base + t * v.mean(0).reshape(base.shape)


def _consensus(d, tau, lam, k):
    """TALL masks |tau_t| > lambda_t |tau_MTL - tau_t| (Wang et al. 2024), kept where >= k agree."""
    d = d.astype(np.float64)
    count = sum((np.abs(d[t]) > lam[t] * np.abs(tau - d[t])).astype(int) for t in range(len(d)))
    return tau * (count >= k)


def _polar(a):
    p, _, q = np.linalg.svd(a, full_matrices=False)
    return p @ q


def _tsv_ref(base, d):
    """TSV-M (Gargiulo et al. 2025, eqs. 5-7): top r/T singular triplets of each task,
    concatenated, U and V^T replaced by their polar factors, U_o diag(S) V_o^T."""
    d = d.astype(np.float64)
    t, m, n = d.shape
    k = min(m, n) // t
    svds = [np.linalg.svd(x, full_matrices=False) for x in d]
    u = np.concatenate([u[:, :k] for u, _, _ in svds], axis=1)
    s = np.concatenate([s[:k] for _, s, _ in svds])
    v = np.concatenate([vh[:k] for _, _, vh in svds], axis=0)
    return _polar(u) @ np.diag(s) @ _polar(v)


def _iso_ref(d):
    """Iso-C (Marczak et al. 2025): sum of task vectors, singular values set to their mean."""
    u, s, vh = np.linalg.svd(d.astype(np.float64).sum(0), full_matrices=False)
    return s.mean() * u @ vh


# method -> (params, reference(base, experts, seed, float32 deltas) -> merged tensor)
REFERENCE = {
    "average": ({"weights": W}, lambda base, ex, s, d: _wmean(ex, W)),
    "task_arithmetic": ({"lambda": 0.7, "weights": W}, lambda base, ex, s, d: base + 0.7 * _wsum(d, W)),
    "ties": ({"density": 0.3, "weights": W, "lambda": 1.3},
             lambda base, ex, s, d: base + 1.3 * ref_disjoint(np.stack([ref_trim(x, 0.3, "tensor") for x in d]), W)),
    "ties_noelect": ({"density": 0.4, "weights": W},
                     lambda base, ex, s, d: base + _wmean(np.stack([ref_trim(x, 0.4, "tensor") for x in d]), W)),
    "dare": ({"drop_rate": 0.4, "lambda": 0.9, "weights": W},
             lambda base, ex, s, d: base + 0.9 * _wsum(_dared(d, s, 0.4), W)),
    "della": ({"weights": W}, lambda base, ex, s, d: base + 1.1 * ref_disjoint(_magpruned(d, s), W)),
    "della_norank": ({}, lambda base, ex, s, d: base + 1.1 * ref_disjoint(_magpruned(d, s, score="magnitude"),
                                                                          [1] * N)),
    "della_layer": ({}, lambda base, ex, s, d: base + 1.1 * ref_disjoint(_magpruned(d, s, "tensor"), [1] * N)),
    "della_noelect": ({"weights": W}, lambda base, ex, s, d: base + 1.1 * _wmean(_magpruned(d, s), W)),
    "della_randrank": ({}, lambda base, ex, s, d: base + 1.1 * ref_disjoint(_randrank(d, s, "row"), [1] * N)),
    "della_randrank_layer": ({}, lambda base, ex, s, d: base + 1.1 * ref_disjoint(_randrank(d, s, "tensor"),
                                                                                  [1] * N)),
    "dare_della": ({"drop_rate": 0.5}, lambda base, ex, s, d: base + 1.1 * ref_disjoint(_dared(d, s, 0.5), [1] * N)),
    "dare_noelect": ({"drop_rate": 0.5, "weights": W},
                     lambda base, ex, s, d: base + 1.1 * _wmean(_dared(d, s, 0.5), W)),
    "nodrop": ({"weights": W}, lambda base, ex, s, d: base + 1.1 * ref_disjoint(d, W)),
    "nodrop_noelect": ({"weights": W}, lambda base, ex, s, d: base + 1.1 * _wmean(d, W)),
    "m3": ({"alpha": 0.5, "lambda": 0.8}, _m3_ref),
    "slerp": ({"t": 0.3}, lambda base, ex, s, d: _slerp_ref(ex[0], ex[1], 0.3)),
    "nuslerp": ({"weights": [1.0, 0.6], "interpolate": "task_vectors"},
                lambda base, ex, s, d: base + ref_nuslerp(d[0], d[1], 0.6 / 1.6)),
    "multislerp": ({"weights": W}, lambda base, ex, s, d: ref_multislerp(ex, W)),
    "breadcrumbs": ({"density": 0.6, "gamma": 0.05, "weights": W, "lambda": 0.9},
                    lambda base, ex, s, d: base + 0.9 * _wsum(np.stack([_crumbs(x, 0.6, 0.05) for x in d]), W)),
    "breadcrumbs_ties": ({"density": 0.5, "gamma": 0.1, "weights": W, "lambda": 1.2},
                         lambda base, ex, s, d: base + 1.2 * _dis_sum(np.stack([_crumbs(x, 0.5, 0.1) for x in d]),
                                                                      W)),
    "model_stock": ({}, lambda base, ex, s, d: _stock_ref(base, d)),
    "tsv_m": ({"lambda": 0.8}, lambda base, ex, s, d: base + 0.8 * _tsv_ref(base, d)),
    "iso_c": ({"lambda": 1.3}, lambda base, ex, s, d: base + 1.3 * _iso_ref(d)),
    "iso_cts": ({"lambda": 0.7}, lambda base, ex, s, d: base + 0.7 * ref_iso_cts(d, 0.8)),
    "sce": ({"select_topk": 0.4, "lambda": 0.9}, lambda base, ex, s, d: base + 0.9 * ref_sce(d, 0.4)),
    "pcb": ({"pcb_ratio": 0.3, "weights": W, "lambda": 0.8}, lambda base, ex, s, d: base + 0.8 * ref_pcb(d, 0.3, 0.0001, W)),
    "consensus_ta": ({"tall_mask_lambda": 0.4, "k": 2, "weights": W, "lambda": 0.8},
                     lambda base, ex, s, d: base + 0.8 * _consensus(d, _wsum(d, W), [0.4] * N, 2)),
    "consensus_ties": ({"density": 0.5, "tall_mask_lambda": [0.3, 0.6, 0.4], "k": 2, "weights": W, "lambda": 1.1},
                       lambda base, ex, s, d: base + 1.1 * _consensus(
                           d, _dis_sum(np.stack([ref_trim(x, 0.5, "tensor") for x in d]), W), [0.3, 0.6, 0.4], 2)),
}


def _run(method, params, base, ex, seed=5, row0=0, experts=None):
    names = experts or [f"e{i}" for i in range(len(ex))]
    m = methods.build(method, params, names, seed)
    b = methods.Block(NAME, None if base is None or not m.uses_base else torch.tensor(base),
                      torch.tensor(ex.copy()), row0, seed, tables={})
    return m.merge(b).numpy(), m


def _inputs_for(method, seed=3):
    base, ex = inputs(seed, rows=8, cols=41)
    return (base, ex[:2]) if method in ("slerp", "nuslerp") else (base, ex)


def test_every_registered_method_has_a_reference():
    assert sorted(REFERENCE) == methods.method_names()


@pytest.mark.parametrize("method", sorted(REFERENCE))
def test_every_method_matches_its_reference_formula(method):
    params, ref = REFERENCE[method]
    base, ex = _inputs_for(method)
    got, m = _run(method, params, base, ex)
    want = ref(base, ex, 5, deltas32(base, ex))
    assert got.shape == base.shape
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert not np.allclose(got, base, atol=1e-7)  # it merged something


@pytest.mark.parametrize("method", sorted(REFERENCE))
def test_declarations_match_behaviour(method):
    """Row blocks merge like the whole tensor unless the method says `tensor` (or needs the
    engine's per-tensor top-k first: tests/test_merge_bits.py merges those in small blocks);
    a method not declared random ignores the seed; one that does not use the base never sees it."""
    params, _ = REFERENCE[method]
    base, ex = _inputs_for(method)
    whole, m = _run(method, params, base, ex)
    if m.granularity != "tensor" and not m.tensor_topk:
        parts = [_run(method, params, base[r:r + 3], ex[:, r:r + 3], row0=r)[0] for r in range(0, 8, 3)]
        assert np.array_equal(whole, np.concatenate(parts))
    other_seed, _ = _run(method, params, base, ex, seed=6)
    assert np.array_equal(whole, other_seed) == (not m.random)
    if not m.uses_base:
        assert np.array_equal(whole, _run(method, params, None, ex)[0])


def test_the_config_schema_is_generated_from_the_param_specs():
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    want = methods.merge_params_schema()
    rows = "\n".join(f"      {k}: {yaml.safe_dump(v, default_flow_style=True, width=10**4).strip()}"
                     for k, v in want["properties"].items())
    assert schema["$defs"]["merge_params"] == want, \
        f"config.schema.yaml's $defs.merge_params differs from the registry's; its properties are:\n{rows}"
    merge = schema["properties"]["merges"]["items"]["properties"]
    assert merge["method"]["enum"] == methods.method_names()
    assert merge["grid"]["propertyNames"]["enum"] == methods.grid_params()


def test_cli_help_lists_every_method_and_param(capsys):
    from mergeflow.cli import main

    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    out = capsys.readouterr().out
    for name, spec in methods.REGISTRY.items():
        block = out.split(f"\n  {name}: ", 1)[1].split("\n  ", 1)[0] if f"\n  {name}: " in out else ""
        assert block, f"{name} is not in mergeflow merge --help"
        for p in spec.params:
            assert f"      {p.name} (" in out.split(f"\n  {name}: ", 1)[1], (name, p.name)


def test_other_tools_names_get_a_hint():
    with pytest.raises(methods.ParamError, match="window_size = 2 x upstream mergekit's epsilon"):
        methods.build("della", {"epsilon": 0.07}, ["a", "b"], 0)
    with pytest.raises(methods.ParamError, match="take drop_rate"):
        methods.build("della", {"density": 0.7}, ["a", "b"], 0)
    with pytest.raises(methods.ParamError, match="exactly two experts"):
        methods.build("slerp", {"t": 0.5}, ["a", "b", "c"], 0)
    # the reference scripts' names (MergeLM, M3, DELLA)
    for method, params, advice in [
        ("dare", {"weight_mask_rate": 0.9}, "use 'drop_rate'"),
        ("dare", {"drop_rate": 0.9, "mask_apply_method": "ties"}, "use 'combine'"),
        ("ties", {"param_value_mask_rate": 0.5}, "use 'mask_rate'"),
        ("task_arithmetic", {"use_mixup": True}, "use method 'm3'"),
        ("della", {"drop_rate": 0.3, "lambda_factor": 1.1}, "use 'lambda'"),
    ]:
        with pytest.raises(methods.ParamError, match=advice) as err:
            methods.build(method, params, ["a", "b"], 0)
        assert next(iter(set(params) - {"drop_rate"})) in str(err.value)


def test_dare_ties_without_a_trim_says_so(caplog):
    """MergeLM always trims after DARE (M3's script: mask rate 0.5); density 1.0 is no trim."""
    with caplog.at_level("INFO", logger="mergeflow.merging.methods"):
        methods.build("dare", {"drop_rate": 0.3, "combine": "ties"}, ["a", "b"], 0)
    assert "without a trim" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="mergeflow.merging.methods"):
        methods.build("dare", {"drop_rate": 0.3, "combine": "ties", "mask_rate": 0.5}, ["a", "b"], 0)
    assert "without a trim" not in caplog.text


def test_slerp_matches_mergekits_function_also_near_parallel_and_at_zero():
    mk = pytest.importorskip("mergekit.merge_methods.slerp")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 33, generator=g)
    cases = {"generic": torch.randn(7, 33, generator=g), "parallel": a * 2.5 + 1e-6,
             "antiparallel": -a, "zero": torch.zeros(7, 33)}
    for label, b in cases.items():
        for t in (0.0, 0.3, 0.5, 1.0):
            ours = methods.build("slerp", {"t": t}, ["a", "b"], 0).merge(
                methods.Block(NAME, None, torch.stack([a, b]), 0, 0))
            theirs = mk.slerp(torch.tensor([t]), a.reshape(1, -1), b.reshape(1, -1)).reshape(a.shape)
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=f"{label} t={t}")


def test_a_new_method_is_one_function(tiny_model_dir, tmp_path, monkeypatch):
    """Registered here and nowhere else, a method runs through the engine end to end."""
    from safetensors.torch import load_file, save_file

    from mergeflow.merging.engine import run_merge

    monkeypatch.setattr(methods, "REGISTRY", dict(methods.REGISTRY))

    @methods.merge_method("elementwise_max", (methods.LAMBDA,), random=False)
    def elementwise_max(b, p):
        """theta_b + lambda max_t delta_t (a toy)."""
        return b.base + p["lambda"] * b.deltas().amax(dim=0)

    sd = load_file(tiny_model_dir / "model.safetensors")
    experts = {}
    for i in range(2):
        d = tmp_path / f"e{i}"
        d.mkdir()
        save_file({k: v + 0.01 * (i + 1) * torch.randn(v.shape, generator=torch.Generator().manual_seed(i))
                   for k, v in sd.items()}, d / "model.safetensors")
        experts[f"e{i}"] = str(d)
    meta = run_merge("elementwise_max", experts, str(tmp_path / "out"), base=str(tiny_model_dir),
                     params={"lambda": 0.5, "dtype": "float32"}, device="cpu", progress=False, chunk_elements=64)
    out = load_file(tmp_path / "out" / "model.safetensors")
    e = [load_file(Path(p) / "model.safetensors") for p in experts.values()]
    for k, v in sd.items():
        want = v.float() + 0.5 * torch.maximum(e[0][k].float() - v.float(), e[1][k].float() - v.float())
        torch.testing.assert_close(out[k], want, rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "out" / "mergeflow_merge.json").read_text())["params"] == {"lambda": 0.5}
    assert meta["method"] == "elementwise_max"


@pytest.mark.slow
@pytest.mark.parametrize("method,params", [
    ("consensus_ties", {"density": 0.4, "tall_mask_lambda": 0.5}),
    ("consensus_ties", {"mask_rate": 0.5, "trim_scope": "model", "tall_mask_lambda": 0.5, "k": 1}),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.02}),
    ("model_stock", {}),
])
def test_new_methods_merge_alike_in_blocks_and_whole(tiny_model_dir, tmp_path, method, params):
    """Through the engine: small row blocks (the streamed tensor top-k, the model-scope
    thresholds) give the bytes of whole tensors."""
    from safetensors.torch import load_file

    from mergeflow.merging.engine import run_merge

    sd = load_file(tiny_model_dir / "model.safetensors")
    experts = perturbed_experts(tiny_model_dir, tmp_path, 3, seed=10)
    outs = []
    for chunk in (256, 1 << 30):
        out = tmp_path / f"out{chunk}"
        run_merge(method, experts, str(out), base=str(tiny_model_dir), params=params, device="cpu", progress=False,
                  chunk_elements=chunk)
        outs.append(load_file(out / "model.safetensors"))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in sd)
    assert any(not torch.equal(outs[0][k], sd[k]) for k in sd)
