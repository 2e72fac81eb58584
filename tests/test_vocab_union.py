"""Vocabulary policy `union` (issue 17): experts that add different tokens keep them all.

The expected rows are computed here by token string, independently of the engine's index
plan: out(s) = b(s) + lambda * sum over experts e that have s of (e(s) - b(s)), b(s) the
base's row for s or, where the base lacks s, the float64 mean of all base rows.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergeflow.errors import MergeflowError
from mergeflow.merging.engine import METADATA_FILE, run_merge

VOCAB = ("model.embed_tokens.weight", "lm_head.weight")
ROOT = Path(__file__).resolve().parents[1]
# expert -> the tokens it adds, in its id order, and whether each is special
ADDS = {
    "fim": [("<fim_prefix>", True), ("<fim_suffix>", True)],
    "chat": [("<|im_start|>", True), ("<think>", False)],
    "mix": [("<fim_suffix>", True), ("<fim_prefix>", True)],  # fim's tokens, numbered the other way round
}


def make_expert(base: Path, out: Path, seed: int, adds, drop_lm_head=False) -> Path:
    """base + seeded noise; the tokenizer extended by `adds`, the vocabulary tensors by one
    seeded row per added token."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    for text, special in adds:
        token = AddedToken(text, special=special, normalized=False)
        if special:
            tok.add_special_tokens({"additional_special_tokens": [token]}, replace_extra_special_tokens=False)
        else:
            tok.add_tokens([token])
    g = torch.Generator().manual_seed(seed)
    sd = {k: (v + 0.02 * torch.randn(v.shape, generator=g)).contiguous() for k, v in load_file(base / "model.safetensors").items()}
    for name in VOCAB:
        if name in sd:
            extra = torch.randn((len(tok) - sd[name].shape[0], sd[name].shape[1]), generator=g)
            sd[name] = torch.cat([sd[name], extra]).contiguous()
    if drop_lm_head:
        sd.pop("lm_head.weight", None)
    out.mkdir(parents=True)
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    tok.save_pretrained(out)
    cfg = json.loads((base / "config.json").read_text())
    cfg["vocab_size"] = len(tok)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def zoo(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("union")
    experts = {name: make_expert(tiny_model_dir, root / name, i + 1, ADDS[name]) for i, name in enumerate(ADDS)}
    return tiny_model_dir, experts


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _sd(path):
    return load_file(Path(path) / "model.safetensors")


def _row(sd, tok, name, s):
    """The row of token string `s` in checkpoint `sd` through its tokenizer, or None."""
    i = tok.get_vocab().get(s)
    return None if i is None else sd[name][i]


def test_union_vocabulary_tokenizer_and_rows(zoo, tmp_path):
    base, experts = zoo
    ex = {k: str(v) for k, v in experts.items()}
    out = tmp_path / "union"
    meta = run_merge("task_arithmetic", ex, str(out), base=str(base), params={"lambda": 0.7},
                     vocab_policy="union", device="cpu", progress=False)
    btok = _tok(base)
    n = len(btok)
    # base vocabulary, then fim's tokens in its id order, then chat's; mix adds nothing new
    order = ["<fim_prefix>", "<fim_suffix>", "<|im_start|>", "<think>"]
    assert [(a["token"], a["id"], a["special"], a["experts"]) for a in meta["vocab_union"]["added"]] == [
        ("<fim_prefix>", n, True, ["fim", "mix"]), ("<fim_suffix>", n + 1, True, ["fim", "mix"]),
        ("<|im_start|>", n + 2, True, ["chat"]), ("<think>", n + 3, False, ["chat"])]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == n + 4 and meta["donor"] == "base"
    assert meta["vocab_resized"] == {name: n + 4 for name in VOCAB}

    tok = _tok(out)
    assert len(tok) == n + 4
    assert tok.get_vocab() == {**btok.get_vocab(), **{s: n + k for k, s in enumerate(order)}}
    for k, s in enumerate(order):
        assert tok("a" + s + "b", add_special_tokens=False).input_ids.count(n + k) == 1
        assert tok.added_tokens_decoder[n + k].special == (s != "<think>")
    ids = tok("<|im_start|>12", add_special_tokens=False).input_ids
    assert tok.decode(ids, skip_special_tokens=True) == "12"

    got = {k: v for k, v in load_file(out / "model.safetensors").items()}
    b = _sd(base)
    e = {k: _sd(v) for k, v in ex.items()}
    etok = {k: _tok(v) for k, v in ex.items()}
    vocab = tok.get_vocab()
    for name in VOCAB:
        assert got[name].shape == (n + 4, b[name].shape[1])
        mean = b[name].mean(0, dtype=torch.float64).float()
        for s, i in vocab.items():
            bs = _row(b, btok, name, s)
            bs = mean if bs is None else bs
            want = bs + 0.7 * sum((r - bs for r in (_row(e[x], etok[x], name, s) for x in ex) if r is not None),
                                  torch.zeros_like(bs))
            torch.testing.assert_close(got[name][i], want, atol=2e-6, rtol=0, msg=f"{name} row {s!r}")
    # one owner's share of a token only it has: its delta from the base mean, times lambda
    i = vocab["<|im_start|>"]
    torch.testing.assert_close(got["lm_head.weight"][i] - b["lm_head.weight"].mean(0, dtype=torch.float64).float(),
                               0.7 * (e["chat"]["lm_head.weight"][etok["chat"].get_vocab()["<|im_start|>"]]
                                      - b["lm_head.weight"].mean(0, dtype=torch.float64).float()), atol=2e-6, rtol=0)

    # the base's rows and every other tensor: the bytes of `truncate`
    trunc = tmp_path / "truncate"
    run_merge("task_arithmetic", ex, str(trunc), base=str(base), params={"lambda": 0.7}, vocab_policy="truncate",
              device="cpu", progress=False)
    t = load_file(trunc / "model.safetensors")
    assert set(t) == set(got)
    for name in t:
        assert torch.equal(got[name][:n] if name in VOCAB else got[name], t[name]), name

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == n + 4
    prompt = tok("<fim_prefix>def add<fim_suffix><|im_start|>", return_tensors="pt")
    gen = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > prompt.input_ids.shape[1] and int(gen.max()) < n + 4
    assert torch.equal(gen[0, :prompt.input_ids.shape[1]], prompt.input_ids[0])


def test_union_without_a_base_averages_the_experts_that_have_the_token(zoo, tmp_path):
    base, experts = zoo
    ex = {"chat": str(experts["chat"]), "mix": str(experts["mix"]), "fim": str(experts["fim"])}
    out = tmp_path / "avg"
    meta = run_merge("average", ex, str(out), vocab_policy="union", device="cpu", progress=False)
    # the first expert's vocabulary comes first; then mix's tokens in mix's id order
    ctok = _tok(ex["chat"])
    n = len(ctok)
    assert [(a["token"], a["id"], a["experts"]) for a in meta["vocab_union"]["added"]] == [
        ("<fim_suffix>", n, ["mix", "fim"]), ("<fim_prefix>", n + 1, ["mix", "fim"])]
    tok = _tok(out)
    got = load_file(out / "model.safetensors")
    e = {k: _sd(v) for k, v in ex.items()}
    etok = {k: _tok(v) for k, v in ex.items()}
    for name in VOCAB:
        assert got[name].shape[0] == n + 2
        for s, i in tok.get_vocab().items():
            rows = [r for r in (_row(e[x], etok[x], name, s) for x in ex) if r is not None]
            torch.testing.assert_close(got[name][i], torch.stack(rows).mean(0), atol=2e-6, rtol=0,
                                       msg=f"{name} row {s!r}")


def test_union_of_equal_vocabularies_changes_nothing(zoo, tmp_path):
    base, experts = zoo
    ex = {"a": str(experts["fim"]), "b": str(experts["mix"])}  # the same tokens, numbered differently
    plain = {"a": str(experts["fim"]), "b": str(experts["fim"])}
    run_merge("task_arithmetic", plain, str(tmp_path / "none"), base=str(experts["fim"]), device="cpu",
              progress=False)
    meta = run_merge("task_arithmetic", plain, str(tmp_path / "union"), base=str(experts["fim"]),
                     vocab_policy="union", device="cpu", progress=False)
    assert meta["vocab_resized"] == {} and meta["vocab_union"]["added"] == []
    assert (tmp_path / "none" / "model.safetensors").read_bytes() == \
        (tmp_path / "union" / "model.safetensors").read_bytes()
    # mix numbers fim's two tokens the other way round: same row count, rows swapped back by string
    meta = run_merge("average", ex, str(tmp_path / "swap"), vocab_policy="union", device="cpu", progress=False)
    assert meta["vocab_resized"] == {name: len(_tok(ex["a"])) for name in VOCAB}
    got, a, b = (load_file(Path(p) / "model.safetensors") for p in (tmp_path / "swap", ex["a"], ex["b"]))
    i, j = _tok(ex["a"]).get_vocab()["<fim_prefix>"], _tok(ex["b"]).get_vocab()["<fim_prefix>"]
    assert i != j
    torch.testing.assert_close(got["lm_head.weight"][i], (a["lm_head.weight"][i] + b["lm_head.weight"][j]) / 2,
                               atol=2e-6, rtol=0)


def test_union_of_tied_models_maps_the_one_embedding(zoo, tmp_path):
    base, _ = zoo
    tied = tmp_path / "tied"
    tied.mkdir()
    sd = _sd(base)
    del sd["lm_head.weight"]
    save_file(sd, tied / "model.safetensors", metadata={"format": "pt"})
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special", "chat")):
            shutil.copy(f, tied / f.name)
    cfg = json.loads((base / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    ex = {k: str(make_expert(tied, tmp_path / k, 10 + i, ADDS[k], drop_lm_head=True))
          for i, k in enumerate(("fim", "chat"))}
    out = tmp_path / "out"
    meta = run_merge("ties", ex, str(out), base=str(tied), params={"density": 0.5}, vocab_policy="union",
                     device="cpu", progress=False)
    n = len(_tok(tied))
    assert meta["vocab_resized"] == {"model.embed_tokens.weight": n + 4}
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    tok = _tok(out)
    ids = tok("<|im_start|><fim_prefix>", return_tensors="pt").input_ids
    assert (n + 2) in ids[0].tolist() and n in ids[0].tolist()
    logits = model(ids).logits
    assert logits.shape[-1] == n + 4 and torch.isfinite(logits).all()


def test_union_errors_name_the_token_or_input(zoo, tmp_path, monkeypatch, capsys):
    base, experts = zoo
    plain = make_expert(base, tmp_path / "plain", 7, [("<|im_start|>", False)])  # not special here
    with pytest.raises(MergeflowError, match=r"token '<\|im_start\|>' is special in expert 'chat' but not "
                                             r"special in expert 'plain'"):
        run_merge("task_arithmetic", {"chat": str(experts["chat"]), "plain": str(plain)}, str(tmp_path / "o1"),
                  base=str(base), vocab_policy="union", device="cpu", progress=False)
    notok = tmp_path / "notok"
    notok.mkdir()
    shutil.copy(experts["fim"] / "model.safetensors", notok / "model.safetensors")
    from mergeflow import cli

    monkeypatch.setattr(cli, "STAGES", [("merge", "mergeflow.merging.cli")])
    argv = ["merge", "--method", "task_arithmetic", "--base", str(base), "--expert", f"fim={notok}",
            "--expert", f"chat={experts['chat']}", "--vocab-policy", "union", "--device", "cpu",
            "--out", str(tmp_path / "o2")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "expert 'fim'" in err and "no tokenizer file" in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o2").exists()
    argv[argv.index(f"fim={notok}")] = f"fim={experts['fim']}"
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "o2" / METADATA_FILE).read_text())["vocab_policy"] == "union"


def test_union_is_a_config_value_and_documented():
    from mergeflow import config as mfconfig

    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    good = copy.deepcopy(cfg)
    good["merge"]["vocab_policy"] = "union"
    assert mfconfig.prepare(good)["merge"]["vocab_policy"] == "union"
    bad = copy.deepcopy(cfg)
    bad["merge"]["vocab_policy"] = "unions"
    with pytest.raises(MergeflowError, match="'merge.vocab_policy'"):
        mfconfig.prepare(bad)
    assert "`union`" in (ROOT / "config" / "README.md").read_text()
    assert "truncate|pad_mean|union" in (ROOT / "docs" / "merging.md").read_text()
