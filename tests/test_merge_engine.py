"""The streaming engine end to end on tiny real checkpoints: output, metadata,
reproducibility (tensor order, shard layout, format, blocks, threads), global trim,
vocabulary policies, bad inputs, atomicity and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeflow.errors import MergeflowError
from mergeflow.merging.engine import METADATA_FILE, run_merge

EXPERTS = ("lm", "math", "code")


def make_expert(base_dir: Path, out: Path, seed: int, edit=None, fmt="safetensors") -> Path:
    sd = load_file(base_dir / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    sd = {k: (v + 0.02 * torch.randn(v.shape, generator=g)).contiguous() for k, v in sd.items()}
    if edit:
        sd = edit(sd)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "bin":
        torch.save(sd, out / "pytorch_model.bin")
    else:
        save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(base_dir / "config.json", out / "config.json")
    return out


def reshard(src: Path, out: Path, per_shard: int) -> Path:
    sd = load_file(src / "model.safetensors")
    names = sorted(sd)[::-1]  # a different tensor order inside the files, too
    out.mkdir(parents=True)
    wm = {}
    for i in range(0, len(names), per_shard):
        fname = f"part-{i}.safetensors"
        save_file({k: sd[k] for k in names[i:i + per_shard]}, out / fname)
        wm.update({k: fname for k in names[i:i + per_shard]})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (src / f).exists():
            shutil.copy(src / f, out / f)
    return out


@pytest.fixture(scope="module")
def zoo(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    experts = {name: make_expert(tiny_model_dir, root / name, i + 1) for i, name in enumerate(EXPERTS)}
    return tiny_model_dir, experts, root


def merged(out: Path) -> dict:
    sd = {}
    for f in sorted(out.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def digest(out: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(out.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def test_merge_output_loads_and_metadata_is_complete(zoo, tmp_path):
    base, experts, _ = zoo
    out = tmp_path / "della"
    meta = run_merge("della", {k: str(v) for k, v in experts.items()}, str(out), base=str(base), seed=7,
                     device="cpu", progress=False)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The answer is", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()
    on_disk = json.loads((out / METADATA_FILE).read_text())
    assert on_disk == meta
    assert meta["method"] == "della" and meta["seed"] == 7 and meta["device"] == "cpu"
    assert meta["params"]["drop_rate"] == 0.3 and meta["params"]["window_size"] == 0.14
    assert meta["inputs"]["base"]["path"] == str(base.resolve())
    assert set(meta["inputs"]["experts"]) == set(EXPERTS)
    for key in ("mergeflow_version", "torch_version", "wall_time_s", "peak_rss_bytes"):
        assert meta[key]
    assert meta["output"]["tensors"] == len(load_file(base / "model.safetensors"))
    # every tensor changed, and stays close to the base (deltas were 0.02-sized)
    b = load_file(base / "model.safetensors")
    for name, t in merged(out).items():
        assert t.dtype == b[name].dtype and t.shape == b[name].shape
        assert not torch.equal(t, b[name]) and (t - b[name]).abs().max() < 0.5


def test_same_bytes_whatever_the_layout_format_blocks_and_threads(zoo, tmp_path):
    base, experts, _ = zoo
    ex = {k: str(v) for k, v in experts.items()}
    ref = tmp_path / "ref"
    run_merge("della", ex, str(ref), base=str(base), seed=3, device="cpu", progress=False)
    # base resharded (reversed tensor order), one expert as pickled .bin, tiny row blocks,
    # one reader thread, output in several shards
    base2 = reshard(base, tmp_path / "base2", per_shard=3)
    b = tmp_path / "math_bin"
    b.mkdir()
    torch.save(load_file(experts["math"] / "model.safetensors"), b / "pytorch_model.bin")
    ex2 = dict(ex, math=str(b))
    alt = tmp_path / "alt"
    run_merge("della", ex2, str(alt), base=str(base2), seed=3, device="cpu", chunk_elements=500,
              io_threads=1, shard_size="20KB", progress=False)
    assert len(list(alt.glob("*.safetensors"))) > 1
    a, r = merged(alt), merged(ref)
    assert sorted(a) == sorted(r) and all(torch.equal(a[k], r[k]) for k in r)
    again = tmp_path / "again"
    run_merge("della", ex, str(again), base=str(base), seed=3, device="cpu", io_threads=4, progress=False)
    assert digest(again) == digest(ref)
    other_seed = tmp_path / "seed4"
    run_merge("della", ex, str(other_seed), base=str(base), seed=4, device="cpu", progress=False)
    assert digest(other_seed) != digest(ref)


def test_a_tensor_merges_the_same_without_the_others(zoo, tmp_path):
    """The draws of a tensor depend on its name only, not on what else is merged or when."""
    base, experts, _ = zoo
    keep = "model.layers.1.mlp.up_proj.weight"
    sub = {}
    for label, d in [("base", base), *experts.items()]:
        sd = load_file(d / "model.safetensors")
        sub[label] = tmp_path / f"sub_{label}"
        sub[label].mkdir()
        save_file({keep: sd[keep], "model.norm.weight": sd["model.norm.weight"]}, sub[label] / "model.safetensors")
    full, part = tmp_path / "full", tmp_path / "part"
    run_merge("dare", {k: str(v) for k, v in experts.items()}, str(full), base=str(base),
              params={"drop_rate": 0.5}, device="cpu", progress=False)
    run_merge("dare", {k: str(sub[k]) for k in EXPERTS}, str(part), base=str(sub["base"]),
              params={"drop_rate": 0.5}, device="cpu", progress=False)
    assert torch.equal(merged(full)[keep], merged(part)[keep])


@pytest.mark.slow
def test_model_scope_ties_uses_one_global_threshold(zoo, tmp_path):
    base, experts, _ = zoo
    out = tmp_path / "global"
    meta = run_merge("ties", {k: str(v) for k, v in experts.items()}, str(out), base=str(base),
                     params={"mask_rate": 0.8, "trim_scope": "model"}, device="cpu", chunk_elements=1000,
                     progress=False)
    b = load_file(base / "model.safetensors")
    names = sorted(b)
    sds = {e: load_file(experts[e] / "model.safetensors") for e in EXPERTS}
    deltas = {e: {n: sds[e][n] - b[n] for n in names} for e in EXPERTS}
    # MergeLM: k = int(n * mask_rate), keep |delta| >= k-th smallest over the whole model
    thr = {}
    for e in EXPERTS:
        flat = torch.cat([deltas[e][n].abs().view(-1) for n in names]).numpy()
        k = int(flat.size * 0.8)
        thr[e] = np.partition(flat, k - 1)[k - 1]
        assert meta["global_trim_thresholds"][e] == pytest.approx(float(thr[e]), rel=0, abs=0)
    got = merged(out)
    for n in names:
        dh = np.stack([np.where(np.abs(deltas[e][n].numpy()) >= thr[e], deltas[e][n].numpy(), 0) for e in EXPERTS])
        dh = dh.astype(np.float64)
        gamma = np.where(dh.sum(0) >= 0, 1, -1)
        agree = np.sign(dh) == gamma
        cnt = agree.sum(0)
        tau = (dh * agree).sum(0) / np.where(cnt == 0, 1, cnt)
        np.testing.assert_allclose(got[n].numpy(), b[n].numpy() + tau, atol=2e-6, rtol=0)


def _extra_row(sd):
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[k] = torch.cat([sd[k], torch.full((1, sd[k].shape[1]), 0.5)])
    return sd


@pytest.mark.parametrize("policy", ["truncate", "pad_mean"])
def test_vocab_policies(zoo, tmp_path, policy):
    base, experts, _ = zoo
    math = make_expert(base, tmp_path / "math_big", 2, edit=_extra_row)
    ex = {"lm": str(experts["lm"]), "math": str(math)}
    out = tmp_path / policy
    meta = run_merge("task_arithmetic", ex, str(out), base=str(base), vocab_policy=policy, device="cpu",
                     progress=False)
    b = load_file(base / "model.safetensors")
    e = {k: load_file(Path(v) / "model.safetensors") for k, v in ex.items()}
    got = merged(out)
    rows = b["lm_head.weight"].shape[0]
    cfg = json.loads((out / "config.json").read_text())
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if policy == "truncate":
            assert got[name].shape[0] == rows
            want = b[name] + (e["lm"][name] - b[name]) + (e["math"][name][:rows] - b[name])
            assert cfg["vocab_size"] == rows and meta["donor"] == "base"
        else:
            assert got[name].shape[0] == rows + 1
            pad = lambda t: torch.cat([t, t.double().mean(0, keepdim=True).float()])
            bb, ll = pad(b[name]), pad(e["lm"][name])
            want = bb + (ll - bb) + (e["math"][name] - bb)
            assert cfg["vocab_size"] == rows + 1 and meta["donor"] == "math"
        torch.testing.assert_close(got[name], want, atol=2e-6, rtol=0)
    n = rows if policy == "truncate" else rows + 1
    assert meta["vocab_resized"] == {"model.embed_tokens.weight": n, "lm_head.weight": n}


def _bad_cases(base, experts, tmp):
    def variant(label, edit, fmt="safetensors"):
        return make_expert(base, tmp / label, 9, edit=edit, fmt=fmt)

    def set_(name, value):
        def edit(sd):
            sd[name] = value(sd[name])
            return sd
        return edit

    def drop(name):
        def edit(sd):
            del sd[name]
            return sd
        return edit

    w = "model.layers.1.self_attn.q_proj.weight"
    return {
        "shape": (variant("shape", set_(w, lambda t: t[:, :-1].contiguous())), None, f"'{w}'.*shape mismatch"),
        "vocab_no_policy": (variant("vocab", _extra_row), None, "vocab-policy"),
        "missing": (variant("missing", drop(w)), None, f"'{w}' is missing from expert 'bad'"),
        "extra": (variant("extra", set_("model.norm.weight", lambda t: t) and
                          (lambda sd: {**sd, "extra.bias": torch.zeros(3)})), None, "'extra.bias'"),
        "nan": (variant("nan", set_(w, lambda t: t.index_fill(0, torch.tensor([3]), float("nan")))), None,
                f"'{w}' of expert 'bad'.*NaN"),
        "inf_bin": (variant("inf", set_(w, lambda t: t.index_fill(1, torch.tensor([0]), float("inf"))), "bin"),
                    None, f"'{w}' of expert 'bad'.*NaN or Inf"),
        "int": (variant("int", set_(w, lambda t: (t * 100).to(torch.int32))), None, f"'{w}'.*int32"),
        "dtype_param": (experts["code"], {"dtype": "float8"}, "'dtype'"),
        "donor_param": (experts["code"], {"donor": "nobody"}, "'donor'"),
    }


@pytest.mark.parametrize("case", ["shape", "vocab_no_policy", "missing", "extra", "nan", "inf_bin", "int",
                                  "dtype_param", "donor_param"])
def test_bad_inputs_fail_naming_the_culprit_and_leave_nothing(zoo, tmp_path, case):
    base, experts, _ = zoo
    bad, params, pattern = _bad_cases(base, experts, tmp_path)[case]
    out = tmp_path / "out"
    with pytest.raises(MergeflowError, match=pattern):
        run_merge("ties", {"lm": str(experts["lm"]), "bad": str(bad)}, str(out), base=str(base),
                  params={"density": 0.5, **(params or {})}, device="cpu", progress=False)
    assert not out.exists()
    assert not list(tmp_path.glob("out.tmp-*"))


def test_method_needing_a_base_and_output_dtype(zoo, tmp_path):
    _, experts, _ = zoo
    ex = {k: str(v) for k, v in experts.items()}
    with pytest.raises(MergeflowError, match="needs a base"):
        run_merge("ties", ex, str(tmp_path / "x"), params={"density": 0.5}, device="cpu", progress=False)
    out = tmp_path / "bf16"
    run_merge("average", ex, str(out), params={"dtype": "bfloat16"}, device="cpu", progress=False)
    got = merged(out)
    want = {n: sum(load_file(Path(p) / "model.safetensors")[n] for p in ex.values()) / 3 for n in got}
    for n, t in got.items():
        assert t.dtype == torch.bfloat16
        torch.testing.assert_close(t.float(), want[n], atol=1e-2, rtol=1e-2)
    assert json.loads((out / "config.json").read_text()).get("dtype") in ("bfloat16", None)


KILL_SCRIPT = r"""
import os, signal, sys
import mergeflow.checkpoints as c
orig = c.ShardedWriter.write
def write(self, *a, **k):
    orig(self, *a, **k)
    os.kill(os.getpid(), signal.SIGKILL)  # die mid-merge, after the first tensor
c.ShardedWriter.write = write
from mergeflow.merging.engine import run_merge
run_merge("task_arithmetic", {"a": sys.argv[1]}, sys.argv[3], base=sys.argv[2], device="cpu", progress=False)
"""


def test_a_killed_merge_leaves_no_complete_looking_directory(zoo, tmp_path):
    base, experts, _ = zoo
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(experts["lm"]), str(base), str(out)],
                       capture_output=True, timeout=120, check=False)
    assert p.returncode == -9, p.stderr.decode()[-2000:]
    assert not out.exists()
    leftovers = list(tmp_path.glob("out.tmp-*"))
    assert len(leftovers) == 1 and not (leftovers[0] / "config.json").exists()


def test_cli_merges_and_reports_bad_input_with_exit_code_2(zoo, tmp_path, monkeypatch, capsys):
    from mergeflow import cli

    base, experts, _ = zoo
    # Only this stage's parser: the other stages are not this test's business.
    monkeypatch.setattr(cli, "STAGES", [("merge", "mergeflow.merging.cli")])
    out = tmp_path / "m3"
    argv = ["merge", "--method", "m3", "--base", str(base), "--expert", f"lm={experts['lm']}",
            "--expert", f"math={experts['math']}", "--params", json.dumps({"combine": "ties", "density": 0.5}),
            "--seed", "5", "--device", "cpu", "--out", str(out)]
    assert cli.main(argv) == 0
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["lambda_m"] == meta["params"]["mixup_weights"] and len(meta["lambda_m"]) == 2
    assert meta["seed"] == 5 and "merged 2 experts" in capsys.readouterr().out
    bad = argv[:-2] + ["--out", str(tmp_path / "bad")]
    bad[bad.index("--params") + 1] = json.dumps({"combine": "ties", "density": 0.5, "gamma": 1})
    assert cli.main(bad) == 2
    err = capsys.readouterr().err
    assert "'gamma'" in err and "Traceback" not in err
    params_file = tmp_path / "p.yaml"
    params_file.write_text("combine: average\n")
    argv[argv.index("--params") + 1] = f"@{params_file}"
    argv[-1] = str(tmp_path / "m3avg")
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "m3avg" / METADATA_FILE).read_text())["params"]["combine"] == "average"
    assert os.path.exists(tmp_path / "m3avg" / "config.json")


def _mergelm_ties(base: dict, experts: list[dict], mask_rate: float) -> dict:
    """MergeLM's `ties_merging` (model_merging_methods/merging_methods.py) on the flattened
    model: global trim, sign election with the model-wide majority sign where the sum is 0,
    disjoint mean; written out here as the reference."""
    names = sorted(base)
    flat = torch.vstack([torch.cat([(e[n].float() - base[n].float()).flatten() for n in names]) for e in experts])
    k = int(flat.shape[1] * mask_rate)
    kth = flat.abs().kthvalue(k, dim=1, keepdim=True).values
    flat = flat * (flat.abs() >= kth)
    signs = torch.sign(flat.sum(dim=0))
    majority = torch.sign(signs.sum(dim=0))
    signs[signs == 0] = majority
    keep = ((signs > 0) & (flat > 0)) | ((signs < 0) & (flat < 0))
    kept = flat * keep
    tau = kept.sum(dim=0) / torch.clamp((kept != 0).sum(dim=0).float(), min=1.0)
    out, i = {}, 0
    for n in names:
        m = base[n].numel()
        out[n] = (base[n].float() + tau[i:i + m].view(base[n].shape)).to(base[n].dtype)
        i += m
    return out


@pytest.mark.slow
def test_model_scope_ties_elects_mergelm_majority_sign_bf16(tiny_model_dir, tmp_path):
    """bf16 experts whose trimmed deltas cancel exactly at many positions, most elected signs
    negative: MergeLM (and model scope) elects - there, tensor scope keeps +."""
    g = torch.Generator().manual_seed(7)
    template = load_file(tiny_model_dir / "model.safetensors")
    step = 2.0 ** -7  # base in [1, 1.75) and deltas m * 2^-7: every value and difference is exact in bf16
    base, e1, e2 = {}, {}, {}
    for n, t in template.items():
        b = (1 + step * torch.randint(0, 96, t.shape, generator=g)).to(torch.bfloat16)
        mag = step * torch.randint(1, 9, t.shape, generator=g)
        sign1 = torch.where(torch.rand(t.shape, generator=g) < 0.3, 1.0, -1.0)
        sign2 = torch.where(torch.rand(t.shape, generator=g) < 0.3, 1.0, -1.0)
        cancel = torch.rand(t.shape, generator=g) < 0.3
        d1 = sign1 * mag
        d2 = torch.where(cancel, -d1, sign2 * step * torch.randint(1, 9, t.shape, generator=g))
        base[n] = b.contiguous()
        e1[n] = (b.float() + d1).to(torch.bfloat16).contiguous()
        e2[n] = (b.float() + d2).to(torch.bfloat16).contiguous()
        assert torch.equal(e1[n].float() - b.float(), d1) and torch.equal(e2[n].float() - b.float(), d2)
    dirs = {}
    for label, sd in (("base", base), ("a", e1), ("b", e2)):
        dirs[label] = tmp_path / label
        dirs[label].mkdir()
        save_file(sd, dirs[label] / "model.safetensors", metadata={"format": "pt"})
        shutil.copy(tiny_model_dir / "config.json", dirs[label] / "config.json")
    experts = {"a": str(dirs["a"]), "b": str(dirs["b"])}

    meta = run_merge("ties", experts, str(tmp_path / "model"), base=str(dirs["base"]),
                     params={"mask_rate": 0.5, "trim_scope": "model"}, device="cpu", chunk_elements=1000,
                     progress=False)
    got = merged(tmp_path / "model")
    want = _mergelm_ties(base, [e1, e2], 0.5)
    assert meta["majority_sign"] == -1
    # The case is the one that matters: many exact cancellations after the trim.
    n_cancel = 0
    for n in base:
        thr = [meta["global_trim_thresholds"][e] for e in ("a", "b")]
        d1, d2 = ((e[n].float() - base[n].float()) for e in (e1, e2))
        t1, t2 = d1 * (d1.abs() >= thr[0]), d2 * (d2.abs() >= thr[1])
        n_cancel += int(((t1 + t2 == 0) & (t1 != 0)).sum())
        assert got[n].dtype == torch.bfloat16
        assert torch.equal(got[n], want[n]), n
    assert n_cancel > 1000

    # Tensor scope keeps mergekit's + at a zero sum: there the merge takes the positive delta.
    run_merge("ties", experts, str(tmp_path / "tensor"), base=str(dirs["base"]),
              params={"mask_rate": 0.5, "trim_scope": "tensor"}, device="cpu", progress=False)
    n = "model.layers.0.mlp.up_proj.weight"
    from mergeflow.merging import steps

    t1, t2 = steps.magnitude_trim_(torch.stack([e[n].float() - base[n].float() for e in (e1, e2)]), 0.5, "tensor")
    cancels = (t1 + t2 == 0) & (t1 != 0)
    tensor_scope = merged(tmp_path / "tensor")[n].float() - base[n].float()
    assert cancels.any() and torch.equal(tensor_scope[cancels], torch.maximum(t1, t2)[cancels])


def test_cli_dtype_donor_and_threads_reach_the_merge(zoo, tmp_path, monkeypatch, capsys):
    # the workflow passes config merge.dtype / merge.donor and the rule's {threads} this way
    from mergeflow import cli
    from mergeflow.merging import set_cpu_threads

    base, experts, _ = zoo
    monkeypatch.setattr(cli, "STAGES", [("merge", "mergeflow.merging.cli")])
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setenv("OMP_NUM_THREADS", "64")
    math = shutil.copytree(experts["math"], tmp_path / "math")
    (math / "config.json").write_text(json.dumps({**json.loads((math / "config.json").read_text()), "mark": "math"}))
    out = tmp_path / "ta"
    argv = ["merge", "--method", "task_arithmetic", "--base", str(base), "--expert", f"lm={experts['lm']}",
            f"math={math}", "--params", '{"lambda": 0.5}', "--dtype", "bfloat16", "--donor", "math",
            "--threads", "1", "--device", "cpu", "--out", str(out)]
    try:
        assert cli.main(argv) == 0
    finally:
        set_cpu_threads(None)
    meta = json.loads((out / METADATA_FILE).read_text())
    assert {t.dtype for t in merged(out).values()} == {torch.bfloat16}
    assert meta["output"]["dtype"] == ["bfloat16"] and meta["donor"] == "math"
    assert json.loads((out / "config.json").read_text())["mark"] == "math"
    assert meta["threads"] == {"read": 2, "write": 1}  # not 8 readers of a 64-CPU machine
    assert os.environ["OMP_NUM_THREADS"] == "1"
    clash = argv[:-2] + ["--out", str(tmp_path / "clash")]
    clash[clash.index("--params") + 1] = '{"lambda": 0.5, "dtype": "float16"}'
    assert cli.main(clash) == 2
    assert "--dtype bfloat16" in capsys.readouterr().err
