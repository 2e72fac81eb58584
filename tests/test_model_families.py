"""Every registered merge method on the layouts people merge today (issue 17, "Model families").

Tiny random checkpoints built with transformers' own config classes, saved as transformers
saves the releases: bf16, sharded safetensors with an index, and for tied models one
embedding tensor (no `lm_head.weight`):

- `llama3`: Llama-3.2-1B/3B's layout: grouped-query attention (2 key/value heads for 4 query
  heads), tied word embeddings, llama3 rope scaling;
- `qwen2`: Qwen2.5-0.5B-3B's: q/k/v biases, GQA, tied embeddings;
- `qwen3`: Qwen3-0.6B-4B's: per-head q/k norms, GQA, tied embeddings;
- `mistral`: Mistral-7B's: GQA, untied `lm_head`;
- `gemma2`: Gemma-2's: RMSNorm weights stored as offsets (scale 1 + w, initialised 0),
  pre/post feed-forward norms, a head_dim apart from hidden / heads, soft-capping, tied.

A base and three experts (the base plus seeded Gaussian noise) per family. Each method merges
each family on the CPU through `run_merge`, in small row blocks (`CHUNK`) as a 7B model's
large tensors are; the output must have exactly the base's tensor names, shapes and dtypes,
load with AutoModelForCausalLM with no missing, unexpected or mismatched key (tied models
still tied), and generate. Task arithmetic is checked tensor by tensor against its formula
written out here. One Llama-3.2-style family has an expert whose vocabulary is 8 rows longer
(as MergeBench's Llama-3.2-3B experts: 128320 rows against 128256), merged under both
vocabulary policies. The fast tier runs task arithmetic per family and the two policies; the
slow tier every method on every family and on the extended vocabulary.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mergeflow.merging import methods
from mergeflow.merging.engine import run_merge

SCALE = 0.01  # expert noise: bf16 resolves it on the base's 0.02-sized weights and on norms at 1
SHARD = "40KB"  # the tiny checkpoints (about 200 KB) come in 4-6 shards, input and output
CHUNK = 8192  # row blocks of at most 8192 elements: the embedding (512 x 64) is merged in pieces, as a 7B model's large tensors are
LAMBDA = 0.7
EXTRA_ROWS = 8
EXPERTS = ("e0", "e1", "e2")

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)
FAMILIES = {
    "llama3": ("LlamaConfig", dict(tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True, head_dim=16)),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=32)),
    "gemma2": ("Gemma2Config", dict(tie_word_embeddings=True, head_dim=24, query_pre_attn_scalar=24,
                                    sliding_window=32, final_logit_softcapping=30.0,
                                    attn_logit_softcapping=50.0)),
}
TIED = {f for f, (_, kw) in FAMILIES.items() if kw["tie_word_embeddings"]}

# Values for the params that have no default, by name (a new method's required param goes here).
REQUIRED_VALUES = {"t": 0.3, "drop_rate": 0.3, "density": 0.5, "tall_mask_lambda": 0.4}
# Variants beyond the defaults that take other engine paths: the model-scope trim (two
# pre-passes and the majority sign), the row-scope trim, DARE's L1 rescale (whole tensors).
VARIANTS = {
    "ties[model]": ("ties", {"density": 0.5, "trim_scope": "model"}),
    "ties[row]": ("ties", {"density": 0.5, "trim_scope": "row"}),
    "dare[ties,l1]": ("dare", {"drop_rate": 0.3, "combine": "ties", "density": 0.7, "rescale": "l1"}),
}


def method_case(method: str) -> tuple[dict, tuple[str, ...]]:
    """(params, experts) with which a registered method runs: its required params from
    REQUIRED_VALUES, three experts unless it refuses three (SLERP takes exactly two)."""
    params, experts = {}, EXPERTS
    for _ in range(10):
        try:
            methods.check_params(method, params, list(experts), 0)
            return params, experts
        except methods.ParamError as err:
            if err.key == "experts" and len(experts) == 3:
                experts = EXPERTS[:2]
            elif err.key in REQUIRED_VALUES and err.key not in params:
                params[err.key] = REQUIRED_VALUES[err.key]
            else:
                raise AssertionError(f"give {method!r} a value for its param in REQUIRED_VALUES: {err}") from err
    raise AssertionError(f"no params found for {method!r}")


CASES = {name: (name, None) for name in methods.method_names()} | VARIANTS


# --- building the checkpoints -----------------------------------------------------------------


def family_config(family: str, tok):
    import transformers

    cls, extra = FAMILIES[family]
    return getattr(transformers, cls)(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                      **_COMMON, **extra)


def save(model, tok, out: Path) -> Path:
    model.save_pretrained(out, max_shard_size=SHARD)
    tok.save_pretrained(out)
    return out


def perturbed(model, seed: int):
    """A copy with seeded Gaussian noise on every parameter (a tied embedding is one parameter:
    perturbed once, still tied)."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_((p.float() + SCALE * torch.randn(p.shape, generator=g)).to(p.dtype))
    return m


def build_family(family: str, root: Path, tok, extend: bool = False) -> tuple[Path, dict[str, str]]:
    """A base and three experts; with `extend`, expert e2 has EXTRA_ROWS more tokens and rows."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(family_config(family, tok)).to(torch.bfloat16)
    base_dir = save(base, tok, root / "base")
    experts = {}
    for i, name in enumerate(EXPERTS):
        model, etok = perturbed(base, 100 + i), tok
        if extend and name == "e2":
            etok = copy.deepcopy(tok)
            etok.add_tokens([f"<|extra_{j}|>" for j in range(EXTRA_ROWS)])
            torch.manual_seed(1)
            model.resize_token_embeddings(len(etok))
        experts[name] = str(save(model, etok, root / name))
    return base_dir, experts


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def zoo(tokenizer, tmp_path_factory):
    """zoo(family, extend=False) -> (base dir, {expert: dir}), each built once per module."""
    built: dict = {}

    def get(family: str, extend: bool = False):
        if (family, extend) not in built:
            root = tmp_path_factory.mktemp(family + ("-extended" if extend else ""))
            built[family, extend] = build_family(family, root, tokenizer, extend)
        return built[family, extend]

    return get


# --- reading them back, independently of mergeflow's reader ----------------------------------


def shards(d: str | Path) -> list[Path]:
    return sorted(Path(d).glob("*.safetensors"))


def headers(d: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for f in shards(d):
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                out[k] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def tensors(d: str | Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in shards(d):
        with safe_open(f, "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def merge(base, experts: dict, out: Path, method: str, params: dict | None, policy=None) -> dict:
    return run_merge(method, experts, str(out), base=str(base), params=params, seed=5, device="cpu",
                     vocab_policy=policy, shard_size=SHARD, chunk_elements=CHUNK, progress=False)


def embed_name(names) -> str:
    return next(n for n in names if n.endswith("embed_tokens.weight"))


def check_loads_and_generates(out: Path, tied: bool, vocab: int):
    """The merged directory loads with transformers (no missing, unexpected or mismatched
    key; a tied head still the embedding), its tokenizer has `vocab` tokens, and it generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.dtype == torch.bfloat16
    assert model.config.tie_word_embeddings == tied
    head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert (head.data_ptr() == emb.data_ptr()) == tied
    assert emb.shape[0] == head.shape[0] == model.config.vocab_size == vocab
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == vocab
    ids = tok("The answer is: 42. Let's think", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
        gen = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    assert gen.shape == (1, ids.shape[1] + 4) and torch.equal(gen[0, :ids.shape[1]], ids[0])


def check_donor_files(out: Path, donor: str | Path):
    """Config, generation config and tokenizer files: the donor's, byte for byte (nothing to
    update: the dtype and vocabulary size are the donor's)."""
    files = [f for f in Path(donor).iterdir() if not f.name.startswith("model")]
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= {f.name for f in files}
    for f in files:
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def check_layout(family: str, base: Path, experts: dict):
    """The checkpoints are what the family's releases look like."""
    h = headers(base)
    assert (base / "model.safetensors.index.json").exists() and len(shards(base)) >= 2
    assert {dt for _, dt in h.values()} == {"BF16"}
    assert ("lm_head.weight" in h) == (family not in TIED)
    q, k = h["model.layers.0.self_attn.q_proj.weight"][0], h["model.layers.0.self_attn.k_proj.weight"][0]
    assert k[0] * 2 == q[0]  # grouped-query attention: half as many key/value heads
    if family == "qwen2":
        assert {f"model.layers.0.self_attn.{p}_proj.bias" for p in "qkv"} <= set(h)
    if family == "qwen3":
        assert h["model.layers.0.self_attn.q_norm.weight"][0] == (16,)
    if family == "gemma2":
        assert q[0] == 4 * 24 != 64 and "model.layers.0.pre_feedforward_layernorm.weight" in h
        norm = tensors(base)["model.norm.weight"]
        assert not norm.any()  # an offset: the scale is 1 + w
    for d in experts.values():
        assert headers(d) == h


# --- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_task_arithmetic_on_each_family(family, zoo, tmp_path):
    """theta_b + lambda sum_t (theta_t - theta_b) in float32, cast to bf16, on every tensor:
    the tied embedding and the q/k/v biases included."""
    base, experts = zoo(family)
    check_layout(family, base, experts)
    out = tmp_path / "out"
    meta = merge(base, experts, out, "task_arithmetic", {"lambda": LAMBDA})
    assert headers(out) == headers(base) and len(shards(out)) >= 2
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].keys() == headers(base).keys()
    assert meta["donor"] == "base" and meta["vocab_resized"] == {}
    check_donor_files(out, base)
    b, ex, got = tensors(base), [tensors(d) for d in experts.values()], tensors(out)
    for name, tb in b.items():
        base32 = tb.float()
        tau = ex[0][name].float() - base32
        for e in ex[1:]:
            tau = tau + (e[name].float() - base32)
        want = (base32 + LAMBDA * tau).to(torch.bfloat16)
        assert torch.equal(got[name], want), name
        assert not torch.equal(got[name], tb), name
    checked = set(b)
    assert embed_name(checked) in checked and ("lm_head.weight" in checked) == (family not in TIED)
    if family == "qwen2":
        assert sum(n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for n in checked) == 3 * 2
    check_loads_and_generates(out, family in TIED, _vocab(base))


def _vocab(d) -> int:
    return json.loads((Path(d) / "config.json").read_text())["vocab_size"]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_method_on_each_family(family, case, zoo, tmp_path):
    method, params = CASES[case]
    base, experts = zoo(family)
    default, names = method_case(method)
    out = tmp_path / "out"
    merge(base, {n: experts[n] for n in names}, out, method, params or default)
    assert headers(out) == headers(base)
    b, got = tensors(base), tensors(out)
    assert any(not torch.equal(got[n], b[n]) for n in b)
    assert all(torch.isfinite(t.float()).all() for t in got.values())
    check_loads_and_generates(out, family in TIED, _vocab(base))


def check_extended(base, experts, out, policy, meta):
    """Row counts, donor, and the embedding by the formula: the base's rows exactly; under
    pad_mean the added rows from each shorter model's float64 mean row (float32 rounding)."""
    vocab = _vocab(base)
    name = embed_name(headers(base))
    rows = vocab if policy == "truncate" else vocab + EXTRA_ROWS
    h_out, h_base = headers(out), headers(base)
    assert h_out.keys() == h_base.keys() and "lm_head.weight" not in h_out
    assert h_out[name] == ((rows, h_base[name][0][1]), "BF16")
    assert {k: v for k, v in h_out.items() if k != name} == {k: v for k, v in h_base.items() if k != name}
    assert meta["vocab_resized"] == {name: rows}
    assert meta["donor"] == ("base" if policy == "truncate" else "e2")
    assert _vocab(out) == rows
    check_donor_files(out, base if policy == "truncate" else experts["e2"])
    b = tensors(base)[name].float()
    ex = [tensors(experts[n])[name].float() for n in EXPERTS]
    assert [e.shape[0] for e in ex] == [vocab, vocab, vocab + EXTRA_ROWS]

    def fit(x):
        if x.shape[0] >= rows:
            return x[:rows]
        mean = x.double().mean(dim=0, keepdim=True).float()
        return torch.cat([x, mean.expand(rows - x.shape[0], -1)])

    b, ex = fit(b), [fit(e) for e in ex]
    want = (b + LAMBDA * ((ex[0] - b) + (ex[1] - b) + (ex[2] - b))).to(torch.bfloat16)
    got = tensors(out)[name]
    assert torch.equal(got[:vocab], want[:vocab])
    # the added rows: a float64 mean may round apart in its last float32 bit, one bf16 step at most
    torch.testing.assert_close(got[vocab:].float(), want[vocab:].float(), rtol=2 ** -7, atol=1e-6)
    if policy == "pad_mean":  # the added rows are the extended expert's, not the base's mean
        assert not torch.equal(got[vocab:], b[vocab:].to(torch.bfloat16))


@pytest.mark.parametrize("policy", ["truncate", "pad_mean"])
def test_extended_vocabulary(policy, zoo, tmp_path):
    """Llama-3.2 layout, tied, expert e2 with 8 added tokens: the rows, donor, config and
    tokenizer each policy gives, and the embedding by the formula."""
    base, experts = zoo("llama3", extend=True)
    assert headers(experts["e2"])["model.embed_tokens.weight"][0][0] == _vocab(base) + EXTRA_ROWS
    assert "lm_head.weight" not in headers(experts["e2"])
    out = tmp_path / "out"
    meta = merge(base, experts, out, "task_arithmetic", {"lambda": LAMBDA}, policy)
    check_extended(base, experts, out, policy, meta)
    check_loads_and_generates(out, True, _vocab(out))


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["truncate", "pad_mean"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_method_on_an_extended_vocabulary(case, policy, zoo, tmp_path):
    method, params = CASES[case]
    base, experts = zoo("llama3", extend=True)
    default, names = method_case(method)
    if "e2" not in names:  # two-expert methods: the extended one and one other
        names = ("e0", "e2")
    out = tmp_path / "out"
    meta = merge(base, {n: experts[n] for n in names}, out, method, params or default, policy)
    rows = _vocab(base) + (EXTRA_ROWS if policy == "pad_mean" else 0)
    assert headers(out)["model.embed_tokens.weight"][0][0] == rows == _vocab(out)
    assert meta["vocab_resized"] == {"model.embed_tokens.weight": rows}
    check_loads_and_generates(out, True, rows)


def test_a_head_tied_in_one_input_only_is_refused_naming_it(zoo, tmp_path):
    """An expert that stores its own lm_head against a tied base (and the reverse) stops at the
    plan, before any write, naming the tensor and saying which input ties it."""
    from safetensors.torch import save_file

    from mergeflow.errors import MergeflowError

    base, experts = zoo("llama3")
    untied = tmp_path / "untied"
    untied.mkdir()
    sd = tensors(experts["e1"])
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, untied / "model.safetensors")
    cases = [(base, dict(experts, e1=str(untied)), r"tensor 'lm_head.weight' of expert 'e1' .* is not in base: "
              r"base ties its output head to its input embedding \(one tensor\), expert 'e1' stores its own"),
             (untied, {"e0": experts["e0"]}, r"tensor 'lm_head.weight' is missing from expert 'e0' .*: "
              r"expert 'e0' ties its output head to its input embedding \(one tensor\), base stores its own")]
    for b, ex, message in cases:
        with pytest.raises(MergeflowError, match=message):
            merge(b, ex, tmp_path / "out", "task_arithmetic", None)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
