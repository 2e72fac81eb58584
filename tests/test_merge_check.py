"""The pre-merge check (mergeflow.merging.check, `mergeflow check`): each check fires on a
crafted bad input, naming the tensor / token / config key, and stays quiet on good inputs;
the derives-from-base statistics against a direct computation; the CLI; the same check at
the start of every merge (warnings in the metadata, errors before anything is written)."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import perturbed_experts
from mergeflow.cli import main
from mergeflow.errors import MergeflowError
from mergeflow.merging import check
from mergeflow.merging.check import Thresholds, check_inputs, estimate_resources
from mergeflow.merging.engine import METADATA_FILE, MergeEngine, run_merge

META_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
Q = "model.layers.1.self_attn.q_proj.weight"
FIM = ["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]


def copy_meta(src: Path, dst: Path) -> None:
    for f in META_FILES:
        if (src / f).exists():
            shutil.copy(src / f, dst / f)


def variant(src: Path, dst: Path, tensors=None, config=None, tokenizer=None) -> Path:
    """A copy of model dir `src` with its tensors / config / tokenizer.json edited."""
    shutil.rmtree(dst, ignore_errors=True)  # (module-scoped root: a test may run twice)
    dst.mkdir(parents=True)
    sd = load_file(src / "model.safetensors")
    save_file({k: v.contiguous() for k, v in (tensors(sd) if tensors else sd).items()}, dst / "model.safetensors")
    copy_meta(src, dst)
    for fname, edit in (("config.json", config), ("tokenizer.json", tokenizer)):
        if edit:
            data = json.loads((dst / fname).read_text())
            (dst / fname).write_text(json.dumps(edit(data)))
    return dst


def found(report, check_name=None, severity=None, culprit=None):
    return [f for f in report.findings if (check_name is None or f.check == check_name)
            and (severity is None or f.severity == severity) and (culprit is None or culprit in f.culprit)]


def loud(report):
    return [f.line() for f in report.findings if f.severity != "info"]


@pytest.fixture(scope="module")
def good(tiny_model_dir, tmp_path_factory):
    """The tiny base and two experts (base + small seeded noise) with its config and tokenizer."""
    root = tmp_path_factory.mktemp("check")
    experts = perturbed_experts(tiny_model_dir, root, 2, seed=3)
    for path in experts.values():
        copy_meta(tiny_model_dir, Path(path))
    return Path(tiny_model_dir), experts, root


def run_check(base, experts, **kw):
    kw.setdefault("device", "cpu")
    return check_inputs(str(base), {k: str(v) for k, v in experts.items()}, **kw)


def test_good_inputs_are_quiet(good, tmp_path):
    base, experts, _ = good
    report = run_check(base, experts, method="task_arithmetic", out=str(tmp_path / "out"))
    assert loud(report) == []
    rel = report.derivation["rel_norm"]
    assert set(rel) == set(experts) and all(0.05 < r < 0.5 for r in rel.values()), rel
    assert {f.check for f in report.findings} >= {"derivation", "resources"}
    for policy in ("truncate", "pad_mean", "union"):
        assert loud(run_check(base, experts, vocab_policy=policy, stats="off")) == []


def test_relative_norm_and_cosine_match_a_direct_computation(good, tmp_path):
    base, experts, root = good
    b, e0 = load_file(base / "model.safetensors"), load_file(Path(experts["e0"]) / "model.safetensors")
    twin = variant(base, root / "twin",  # e0's task vector halved: cosine 1 with e0's
                   tensors=lambda sd: {k: b[k] + 0.5 * (e0[k] - b[k]) for k in sd})
    ex = {**experts, "twin": str(twin)}
    report = run_check(base, ex, stats="full")
    b = load_file(base / "model.safetensors")
    flat = lambda sd: torch.cat([sd[k].double().reshape(-1) for k in sorted(b)])  # noqa: E731
    fb = flat(b)
    deltas = {n: flat(load_file(Path(p) / "model.safetensors")) - fb for n, p in ex.items()}
    for n, d in deltas.items():
        assert report.derivation["rel_norm"][n] == pytest.approx(float(d.norm() / fb.norm()), rel=1e-9)
        for m, d2 in deltas.items():
            want = float(d @ d2 / (d.norm() * d2.norm()))
            assert report.derivation["cosine"][n][m] == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert report.derivation["mode"] == "full"
    assert report.derivation["cosine"]["e0"]["twin"] == pytest.approx(1.0, abs=1e-6)
    dup = found(report, "derivation", "warning", "expert 'twin'")
    assert len(dup) == 1 and "same task vector" in dup[0].message and "expert 'e0'" in dup[0].message
    # sampled: a few rows of every tensor, each tensor weighted by its size; the output says so
    sampled = run_check(base, experts, sample_elements=512)
    assert sampled.derivation["mode"] == "sample" and sampled.derivation["elements_read"] < \
        sampled.derivation["elements"]
    assert any("sampled:" in line for line in sampled.lines())
    for n in experts:
        assert sampled.derivation["rel_norm"][n] == pytest.approx(report.derivation["rel_norm"][n], rel=0.3)


def test_nan_or_inf_in_a_sampled_window_names_the_input_and_tensor(good):
    base, experts, root = good
    b = load_file(base / "model.safetensors")
    rows = b[Q].shape[0]

    def poisoned(value, row):
        def edit(sd):
            t = sd[Q].clone()
            t[row, 3] = value
            return {**sd, Q: t}
        return edit
    # row 0 lies in the first sampled window; an Inf in e1 and a NaN in the base at the same tensor: the base is named
    bad_e1 = variant(Path(experts["e1"]), root / "inf_e1", tensors=poisoned(float("inf"), 0))
    report = run_check(base, {"e0": experts["e0"], "e1": bad_e1}, sample_elements=512)
    err = found(report, "derivation", "error")
    assert len(err) == 1 and err[0].culprit == f"tensor {Q!r}" and "expert 'e1'" in err[0].message, loud(report)
    assert "NaN or Inf" in err[0].message and "rel_norm" not in (report.derivation or {})
    bad_base = variant(base, root / "nan_base", tensors=poisoned(float("nan"), rows - 1))  # the last window
    report = run_check(bad_base, {"e0": experts["e0"], "e1": bad_e1}, sample_elements=512)
    err = found(report, "derivation", "error")
    assert len(err) == 1 and "base" in err[0].message and err[0].culprit == f"tensor {Q!r}", loud(report)
    # finite inputs: no such error
    assert not found(run_check(base, experts, sample_elements=512), "derivation", "error")


def test_an_expert_of_another_base_an_outlier_and_an_empty_task_vector_are_flagged(good):
    base, experts, root = good
    g = torch.Generator().manual_seed(11)
    other = variant(base, root / "other", tensors=lambda sd: {  # another initialisation, same shapes
        k: torch.randn(v.shape, generator=g) * (v.std() if v.dim() > 1 else 0.5) + v.mean() for k, v in sd.items()})
    report = run_check(base, {**experts, "other": other})
    flag = found(report, "derivation", "warning")
    assert len(flag) == 1 and "expert 'other'" in flag[0].message and "may not derive" in flag[0].message
    assert report.derivation["rel_norm"]["other"] > Thresholds().rel_norm_max
    worst = report.derivation["largest"]["other"][0]  # a weight matrix: about sqrt(2), two independent draws
    assert flag[0].culprit == f"tensor {worst['tensor']!r}" and worst["rel_norm"] > 1.2
    assert not found(report, severity="error")
    # an outlier below rel_norm_max: far above the other experts' median
    shutil.rmtree(root / "small", ignore_errors=True)
    (root / "small").mkdir()
    small = perturbed_experts(base, root / "small", 2, seed=20, scale=0.002)
    big = variant(base, root / "big", tensors=lambda sd: {
        k: v + 0.02 * torch.randn(v.shape, generator=torch.Generator().manual_seed(5)) for k, v in sd.items()})
    report = run_check(base, {**small, "big": big})
    rel = report.derivation["rel_norm"]
    assert rel["big"] < Thresholds().rel_norm_max < rel["big"] * 2, rel
    flag = found(report, "derivation", "warning")
    assert len(flag) == 1 and "expert 'big'" in flag[0].message and "median" in flag[0].message
    # the same experts with a higher ratio threshold: quiet
    assert not found(run_check(base, {**small, "big": big}, thresholds=Thresholds(rel_norm_ratio=100)),
                     "derivation", "warning")
    same = variant(base, root / "same")
    flag = found(run_check(base, {"e0": experts["e0"], "same": same}), "derivation", "warning")
    assert len(flag) == 1 and "expert 'same' equals the base" in flag[0].message


def test_architecture_keys(good):
    base, experts, root = good
    cases = {"model_type": ("mistral", "error"), "num_attention_heads": (8, "error"),
             "rope_theta": (1e6, "warning")}
    for key, (value, severity) in cases.items():
        bad = variant(base, root / f"cfg_{key}", config=lambda c, key=key, value=value: {**c, key: value})
        report = run_check(base, {"e0": experts["e0"], "bad": bad}, stats="off")
        hits = found(report, "architecture", culprit=f"config {key!r}")
        assert [f.severity for f in hits] == [severity], loud(report)
        assert "expert 'bad'" in hits[0].message and repr(value) in hits[0].message
        assert len(loud(report)) == 1, loud(report)


def test_tensor_names_shapes_and_dtypes(good):
    base, experts, root = good
    edits = {
        "missing": (lambda sd: {k: v for k, v in sd.items() if k != Q}, "is missing from expert 'bad'"),
        "extra": (lambda sd: {**sd, "extra.bias": torch.zeros(3)}, "'extra.bias'"),
        "shape": (lambda sd: {**sd, Q: sd[Q][:, :-1]}, "shape mismatch"),
        "int": (lambda sd: {**sd, Q: (sd[Q] * 100).to(torch.int32)}, "int32"),
    }
    for label, (edit, needle) in edits.items():
        bad = variant(base, root / f"t_{label}", tensors=edit)
        report = run_check(base, {"e0": experts["e0"], "bad": bad}, stats="off")
        errors = found(report, severity="error")
        assert len(errors) == 1 and needle in errors[0].message, (label, loud(report))
        name = "extra.bias" if label == "extra" else Q
        assert errors[0].culprit == f"tensor {name!r}" and repr(name) in errors[0].message


def test_mixed_dtypes(good):
    base, experts, root = good
    bf16 = variant(base, root / "bf16", tensors=lambda sd: {k: v.to(torch.bfloat16) for k, v in sd.items()})
    report = run_check(base, {"e0": experts["e0"], "bf16": bf16})
    hits = found(report, "dtype", "warning")
    assert len(hits) == 1 and "bfloat16 in expert 'bf16' but float32 in base" in hits[0].message
    assert hits[0].culprit.startswith("tensor '") and not found(report, severity="error")


def test_tied_embeddings(good):
    base, experts, root = good
    tied = variant(base, root / "tied", tensors=lambda sd: {k: v for k, v in sd.items() if k != HEAD},
                   config=lambda c: {**c, "tie_word_embeddings": True})
    report = run_check(base, {"e0": experts["e0"], "tied": tied}, stats="off")
    errors = found(report, severity="error")
    assert len(errors) == 1 and errors[0].check == "tied" and errors[0].culprit == f"tensor {HEAD!r}"
    assert "expert 'tied' ties its output head" in errors[0].message and repr(EMBED) in errors[0].message
    flag = variant(base, root / "tied_flag", config=lambda c: {**c, "tie_word_embeddings": True})
    report = run_check(base, {"e0": experts["e0"], "flag": flag}, stats="off")
    assert [(f.check, f.severity, f.culprit) for f in report.findings if f.severity != "info"] == \
        [("tied", "warning", f"tensor {HEAD!r}")]
    assert report.inputs["expert 'flag'"]["tied_embeddings"] and not report.inputs["base"]["tied_embeddings"]


def _extend(base: Path, dst: Path, tokens: list[str], seed: int) -> Path:
    """An expert with `tokens` added: embedding and head rows appended, tokenizer and config."""
    g = torch.Generator().manual_seed(seed)
    rows = load_file(base / "model.safetensors")[EMBED].shape[0]

    def tensors(sd):
        return {k: torch.cat([v, 0.02 * torch.randn(len(tokens), v.shape[1], generator=g)]) if k in (EMBED, HEAD)
                else v + 0.01 * torch.randn(v.shape, generator=g) for k, v in sd.items()}

    def tokenizer(tj):
        tj["added_tokens"] += [{"id": rows + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                                "normalized": False, "special": True} for i, t in enumerate(tokens)]
        return tj

    return variant(base, dst, tensors=tensors, config=lambda c: {**c, "vocab_size": rows + len(tokens)},
                   tokenizer=tokenizer)


@pytest.fixture(scope="module")
def extended(good):
    base, experts, root = good
    return _extend(base, root / "fim", FIM, 7), _extend(base, root / "pad", ["[PAD]"], 8)


def test_vocabulary_policies_name_the_tokens_they_lose(good, extended):
    base, experts, _ = good
    fim, pad = extended
    rows = load_file(base / "model.safetensors")[EMBED].shape[0]
    ex = {"e0": experts["e0"], "fim": fim}
    report = run_check(base, ex, stats="off")
    errors = found(report, severity="error")
    assert len(errors) == 1 and errors[0].culprit == f"tensor {HEAD!r}" and "vocabulary size mismatch" in \
        errors[0].message and all(p in errors[0].message for p in ("truncate:", "pad_mean:", "union:"))
    # truncate: the FIM rows are cut and their tokens lost, every one named
    report = run_check(base, ex, stats="off", vocab_policy="truncate")
    lost = found(report, "vocab", "warning")
    assert len(lost) == 1 and lost[0].culprit == "token '<fim_prefix>'" and "expert 'fim'" in lost[0].message
    assert all(repr(t) in lost[0].message for t in FIM) and not found(report, severity="error")
    group = report.vocab["groups"][0]
    assert group["tensors"] == [HEAD, EMBED]  # (natural name order)
    out = group["policies"]["truncate"]["inputs"]["expert 'fim'"]
    assert out["tokens_lost"] == FIM and out["rows_dropped"] == 4
    # pad_mean: the FIM expert's tokenizer ships; nothing lost, the others padded
    report = run_check(base, ex, stats="off", vocab_policy="pad_mean")
    assert loud(report) == []
    pm = report.vocab["groups"][0]["policies"]["pad_mean"]
    assert pm["rows"] == rows + 4 and pm["donor"] == "expert 'fim'" and pm["inputs"]["base"]["rows_padded"] == 4
    # union: every token kept
    un = run_check(base, ex, stats="off", vocab_policy="union")
    assert loud(un) == [] and un.vocab["groups"][0]["policies"]["union"]["tokens_added"] == FIM
    # two experts that add different tokens at the same id: pad_mean ships the larger one's tokenizer
    report = run_check(base, {"fim": fim, "pad": pad}, stats="off", vocab_policy="pad_mean")
    warn = found(report, "vocab", "warning")
    assert {f.culprit for f in warn} == {"token '[PAD]'"}, loud(report)
    assert any("loses tokens '[PAD]' of expert 'pad'" in f.message for f in warn)
    assert any(f"'[PAD]' at id {rows} is read as '<fim_prefix>'" in f.message for f in warn)
    un = run_check(base, {"fim": fim, "pad": pad}, stats="off", vocab_policy="union")
    assert loud(un) == [] and un.vocab["groups"][0]["policies"]["union"]["rows"] == rows + 5


def test_tokenizers_compared_where_rows_agree(good):
    base, experts, root = good
    tj = json.loads((base / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]

    def swap(t):
        t["model"]["vocab"][a], t["model"]["vocab"][b] = vocab[b], vocab[a]
        return t

    swapped = variant(base, root / "swapped", tokenizer=swap)
    report = run_check(base, {"e0": experts["e0"], "sw": swapped}, stats="off")
    hits = found(report, "tokenizer", "warning")
    assert len(hits) == 1 and hits[0].culprit in (f"token {a!r}", f"token {b!r}")
    assert "2 ids differ" in hits[0].message and "expert 'sw'" in hits[0].message
    # an added token at the same row count (a padded checkpoint): lost with the shipped tokenizer
    extra = variant(base, root / "extra_tok", tokenizer=lambda t: {**t, "added_tokens": t["added_tokens"] + [
        {"id": 100000, "content": "<|im_end|>", "special": True}]})
    report = run_check(base, {"e0": experts["e0"], "x": extra}, stats="off")
    hits = found(report, "vocab", "warning")
    assert len(hits) == 1 and hits[0].culprit == "token '<|im_end|>'" and "union keeps them" in hits[0].message


def test_resources_against_what_the_machine_has(good, tmp_path, monkeypatch):
    base, experts, _ = good
    report = run_check(base, experts, method="ties", params={"density": 0.5}, out=str(tmp_path / "o"))
    res = report.resources
    sd = load_file(base / "model.safetensors")
    assert res["disk_bytes"] == sum(v.numel() * v.element_size() for v in sd.values())
    assert res["gpu_bytes"] is None and res["host_bytes"] > check.PROCESS_BYTES
    monkeypatch.setattr(check, "available_host_memory", lambda: 1000)
    monkeypatch.setattr(check.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6 - 10, 10))
    report = run_check(base, experts, method="ties", params={"density": 0.5}, out=str(tmp_path / "o"))
    (disk,) = found(report, "resources", "error")
    assert disk.culprit == "--out" and f"--out {tmp_path / 'o'}: no space left" in disk.message
    (ram,) = found(report, "resources", "warning")
    assert "host memory" in ram.message and ram.culprit in (f"tensor {EMBED!r}", f"tensor {HEAD!r}")


def test_memory_estimate_formula():
    # (name, elements, input bytes per element over the inputs read, output itemsize, resized)
    tensors = [("embed", 1000, 8, 2, False), ("w", 3000, 8, 2, False), ("norm", 10, 8, 2, False)]
    gib = 1 << 30
    got = estimate_resources(tensors, 3, True, False, chunk=500, read_ahead=gib, tensor_wide=False,
                             io_threads=2, write_threads=1, slab_bytes=8 << 20)
    per = 8 + 4 * 4 + 2 + 4 * 3  # raw inputs + float32 stack and base + output + one temporary per expert
    raw = 4010 * 8
    assert got["bytes_per_element"] == per and got["largest_block_elements"] == 500
    assert got["host_bytes"] == check.PROCESS_BYTES + 500 * per + raw + min(8, 3) * 500 * 2
    assert got["disk_bytes"] == 4010 * 2
    whole = estimate_resources(tensors, 3, True, False, chunk=500, read_ahead=gib, tensor_wide=True,
                               io_threads=2, write_threads=1, slab_bytes=8 << 20)
    assert whole["largest_block"] == "w" and whole["largest_block_elements"] == 3000
    cuda = estimate_resources(tensors, 3, True, True, chunk=1 << 32, read_ahead=gib, tensor_wide=False,
                              io_threads=2, write_threads=1, slab_bytes=8 << 20)
    assert cuda["gpu_bytes"] == check.CUDA_CONTEXT_BYTES + 3000 * per + raw
    assert cuda["host_bytes"] == check.CUDA_PROCESS_BYTES + 6 * (8 << 20)


def test_cli_reports_and_exits_2_naming_the_culprit(good, tmp_path, capsys, monkeypatch):
    from mergeflow import cli

    base, experts, root = good
    monkeypatch.setattr(cli, "STAGES", [("check", "mergeflow.merging.check")])
    argv = ["check", "--base", str(base), "--device", "cpu", "--json", str(tmp_path / "r.json")]
    for n, p in experts.items():
        argv += ["--expert", f"{n}={p}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "derivation" in out and "0 errors, 0 warnings" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["ok"] and set(data["derivation"]["rel_norm"]) == set(experts)
    bad = variant(base, root / "cli_bad", config=lambda c: {**c, "model_type": "qwen2"})
    assert main(argv + ["--expert", f"bad={bad}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and "config 'model_type'" in err and "expert 'bad'" in err
    assert not json.loads((tmp_path / "r.json").read_text())["ok"]
    rope = variant(base, root / "cli_rope", config=lambda c: {**c, "rope_theta": 1e6})
    assert main(argv + ["--expert", f"rope={rope}"]) == 0
    assert main(argv + ["--expert", f"rope={rope}", "--strict"]) == 2
    assert "'rope_theta'" in capsys.readouterr().err


def test_help_lists_check(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "check" in capsys.readouterr().out


def test_a_merge_runs_the_check(good, extended, tmp_path, caplog):
    base, experts, root = good
    bad = variant(base, root / "merge_bad", config=lambda c: {**c, "num_attention_heads": 8})
    out = tmp_path / "out"
    with pytest.raises(MergeflowError, match="pre-merge check: config 'num_attention_heads': expert 'bad'"):
        run_merge("task_arithmetic", {"e0": experts["e0"], "bad": str(bad)}, str(out), base=str(base),
                  device="cpu", progress=False)
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))
    # warnings: in the log and in the metadata, under `check`
    fim, _ = extended
    with caplog.at_level(logging.WARNING, logger="mergeflow.merging.check"):
        meta = run_merge("task_arithmetic", {"e0": experts["e0"], "fim": str(fim)}, str(out), base=str(base),
                         device="cpu", progress=False, vocab_policy="truncate")
    warnings = meta["check"]["warnings"]
    assert [w["culprit"] for w in warnings] == ["token '<fim_prefix>'"]
    assert json.loads((out / METADATA_FILE).read_text())["check"] == meta["check"]
    assert set(meta["check"]["derivation"]["rel_norm"]) == {"e0", "fim"}
    assert meta["check"]["resources"]["disk_bytes"] == meta["output"]["bytes"]
    assert any("pre-merge check" in r.message and "<fim_prefix>" in r.message for r in caplog.records)
    assert math.isfinite(meta["timings"]["check_s"])


def merge_with_check(base, experts, out, background: bool):
    """A CPU merge whose check's weight statistics run as on the GPU (beside the merge) or before it."""
    engine = MergeEngine("task_arithmetic", {k: str(v) for k, v in experts.items()}, str(base), {"lambda": 0.5}, 42,
                         "cpu", "truncate", str(out), progress=False)
    engine.check_in_background = background
    with torch.inference_mode():
        return engine, engine.run()


def test_the_check_beside_the_merge_reports_as_the_check_before_it(good, extended, tmp_path, caplog):
    base, experts, root = good
    fim, _ = extended
    ex = {"e0": experts["e0"], "fim": str(fim)}
    before, meta_before = merge_with_check(base, ex, tmp_path / "before", background=False)
    beside, meta_beside = merge_with_check(base, ex, tmp_path / "beside", background=True)
    assert "check_stats_s" in meta_beside["timings"] and "check_stats_s" not in meta_before["timings"]
    live = ("host_available_bytes", "gpu_available_bytes", "disk_free_bytes")  # what the machine has now
    for meta in (meta_before, meta_beside):
        for k in live:
            meta["check"]["resources"].pop(k, None)
    assert meta_beside["check"] == meta_before["check"] and meta_beside["check"]["derivation"]["rel_norm"]
    # every finding, in the same order (the free disk space in the resources' note aside)
    said = lambda r: [(f.severity, f.check, f.culprit, f.message if f.check != "resources" else "")  # noqa: E731
                      for f in r.findings]
    assert said(beside.check) == said(before.check) and beside.check.derivation == before.check.derivation
    assert (tmp_path / "before" / "model.safetensors").read_bytes() == (tmp_path / "beside" / "model.safetensors").read_bytes()
    # a NaN the statistics find while the merge runs: the check's error (it names the input), and
    # the previous output at --out is left as it was
    def poison(sd):
        t = sd[Q].clone()
        t[0, 3] = float("nan")
        return {**sd, Q: t}
    bad = variant(Path(experts["e1"]), root / "nan_beside", tensors=poison)
    kept = (tmp_path / "beside" / "model.safetensors").read_bytes()
    with pytest.raises(MergeflowError, match=r"pre-merge check: tensor .*q_proj.* of expert 'bad' .*NaN or Inf"):
        merge_with_check(base, {"e0": experts["e0"], "bad": bad}, tmp_path / "beside", background=True)
    assert (tmp_path / "beside" / "model.safetensors").read_bytes() == kept
    assert not list(tmp_path.glob("beside.tmp-*"))


def test_a_merge_of_incompatible_inputs_via_the_cli_exits_2(good, tmp_path, capsys):
    base, experts, root = good
    tied = variant(base, root / "tied_cli", tensors=lambda sd: {k: v for k, v in sd.items() if k != HEAD})
    out = tmp_path / "m"
    argv = ["merge", "--method", "average", "--expert", f"e0={experts['e0']}", f"tied={tied}", "--device", "cpu",
            "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and repr(HEAD) in err
    assert not out.exists()


def test_vocabulary_of_the_real_llama2_tokenizer(tmp_path):
    """tokenizer.json, tokenizer.model (sentencepiece) and transformers agree on the real
    Llama-2 vocabulary; CodeLlama's added tokens (tokenizer_config.json) are read."""
    from transformers import AutoTokenizer

    from real_assets import llama2_tokenizer_dir

    src = llama2_tokenizer_dir()
    spm = tmp_path / "spm"
    spm.mkdir()
    shutil.copy(src / "tokenizer.model", spm / "tokenizer.model")
    from_json, from_spm = check.load_vocab(src), check.load_vocab(spm)
    assert (from_json.source, from_spm.source) == ("tokenizer.json", "tokenizer.model")
    want = {i: t for t, i in AutoTokenizer.from_pretrained(str(src)).get_vocab().items()}
    assert from_json.tokens == want and from_spm.tokens == want and len(want) == 32000
    (spm / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        str(32000 + i): {"content": t, "special": False} for i, t in enumerate(["▁<PRE>", "▁<SUF>", "▁<MID>"])}}))
    code = check.load_vocab(spm)
    assert [code.tokens[i] for i in (32000, 32001, 32002)] == ["▁<PRE>", "▁<SUF>", "▁<MID>"]
    assert code.added == {32000, 32001, 32002}
