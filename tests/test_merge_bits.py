"""The same bytes as the release before the one-engine redesign (issue 16).

Small fixture checkpoints (fp32 and bf16; base + three experts; odd shapes, a 1-D tensor, a
3-D tensor, a WizardMath-like expert with one extra vocabulary row) are merged with every
method and variant of the old registry at two seeds; the sha256 of every output tensor was
recorded in tests/data/merge_bits_sha256.json by running this file as a script on the code
of commit 59d36ac (the torch engine on the CPU and the then-default `--engine auto`, i.e.
the C engine where it applied: 134 of the 182 merges, the same bytes as the torch engine in
all 182). The test recomputes them with today's engine.

    .venv/bin/python tests/test_merge_bits.py --write   # (re)record: only on purpose
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "merge_bits_sha256.json"

SHAPES = {
    "model.embed_tokens.weight": (37, 24),
    "model.layers.0.self_attn.q_proj.weight": (24, 24),
    "model.layers.0.mlp.up_proj.weight": (53, 24),
    "model.layers.0.mlp.down_proj.weight": (24, 53),
    "model.layers.0.input_layernorm.weight": (24,),
    "model.layers.0.odd.weight": (3, 5, 7),
    "model.layers.1.mlp.down_proj.weight": (5, 1381),
    "lm_head.weight": (37, 24),
}
VOCAB = ("model.embed_tokens.weight", "lm_head.weight")
EXPERTS = ("lm", "math", "code")

# (label, method, params): every method of the registry, and the variants the papers use.
CASES = [
    ("average", "average", {}),
    ("average-w", "average", {"weights": [0.5, 0.3, 0.2]}),
    ("ta", "task_arithmetic", {"lambda": 0.7}),
    ("ta-w", "task_arithmetic", {"weights": [1.0, 0.5, 0.25]}),
    ("ties", "ties", {"density": 0.3}),
    ("ties-row", "ties", {"density": 0.5, "trim_scope": "row", "lambda": 1.2}),
    ("ties-model", "ties", {"mask_rate": 0.6, "trim_scope": "model"}),
    ("ties_noelect", "ties_noelect", {"density": 0.4}),
    ("dare", "dare", {"drop_rate": 0.4}),
    ("dare-ties", "dare", {"drop_rate": 0.5, "combine": "ties", "density": 0.7}),
    ("dare-avg-none", "dare", {"drop_rate": 0.3, "combine": "average", "rescale": "none"}),
    ("dare-l1", "dare", {"drop_rate": 0.5, "rescale": "l1"}),
    ("della", "della", {}),
    ("della-nores", "della", {"drop_rate": 0.5, "window_size": 0.2, "lambda": 1.0, "rescale": False}),
    ("della-l1", "della", {"rescale": "l1"}),
    ("della_norank", "della_norank", {}),
    ("della_layer", "della_layer", {}),
    ("della_noelect", "della_noelect", {}),
    ("dare_della", "dare_della", {}),
    ("nodrop_noelect", "nodrop_noelect", {}),
    ("nodrop", "nodrop", {}),
    ("dare_noelect", "dare_noelect", {"drop_rate": 0.5}),
    ("della_randrank", "della_randrank", {}),
    ("della_randrank_layer", "della_randrank_layer", {}),
    ("m3", "m3", {"alpha": 0.5}),
    ("m3-ties", "m3", {"alpha": 2.0, "combine": "ties", "density": 0.5}),
    ("m3-avg", "m3", {"combine": "average"}),
    ("m3-dare", "m3", {"combine": "task_arithmetic", "dare": {"drop_rate": 0.3}}),
    ("m3-ties-model", "m3", {"combine": "ties", "mask_rate": 0.5, "trim_scope": "model"}),
]
# The vocabulary policies on the expert with one extra row (inputs of one dtype each).
VOCAB_CASES = [
    ("ta-truncate", "task_arithmetic", {}, "truncate"),
    ("ties-pad_mean", "ties", {"density": 0.5}, "pad_mean"),
    ("della-truncate", "della", {}, "truncate"),
    ("m3-pad_mean", "m3", {"combine": "ties", "density": 0.5}, "pad_mean"),
]
SEEDS = (0, 7)
# input dtype -> output dtype param (None: the base's dtype)
DTYPES = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "bf16>fp32": ("bfloat16", "float32")}


def _save(path: Path, tensors: dict, vocab: int) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": vocab}))


def make_zoo(root: Path, dtype: str) -> dict[str, str]:
    """base + 3 experts of `dtype` whose deltas take few distinct values (ties in every
    ranking), and `math+1`: the math expert with one extra vocabulary row."""
    import torch

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(1234)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    _save(root / "base", {k: v.to(dt) for k, v in base.items()}, SHAPES[VOCAB[0]][0])
    paths = {"base": str(root / "base")}
    for i, name in enumerate(EXPERTS):
        sd = {k: (v + 0.01 * torch.randint(-3, 4, v.shape, generator=g).float()
                  + (0.003 * i) * torch.randn(v.shape, generator=g)).to(dt) for k, v in base.items()}
        _save(root / name, sd, SHAPES[VOCAB[0]][0])
        paths[name] = str(root / name)
        if name == "math":
            wide = dict(sd)
            for k in VOCAB:
                wide[k] = torch.cat([sd[k], torch.randn(1, sd[k].shape[1], generator=g).to(dt)])
            _save(root / "math+1", wide, SHAPES[VOCAB[0]][0] + 1)
            paths["math+1"] = str(root / "math+1")
    return paths


def digests(out: Path) -> dict[str, str]:
    """sha256 of each output tensor's bytes, with its dtype and shape."""
    from safetensors import safe_open

    res = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                t = fh.get_tensor(k).contiguous()
                raw = t.view(-1).view(__import__("torch").uint8).numpy().tobytes()
                res[k] = f"{str(t.dtype)[6:]}{list(t.shape)}:{hashlib.sha256(raw).hexdigest()}"
    return dict(sorted(res.items()))


def all_cases():
    """(key, method, params, vocab_policy, dtype label, seed)."""
    for dlabel, (_, out_dtype) in DTYPES.items():
        for seed in SEEDS:
            for label, method, params in CASES:
                p = dict(params, **({"dtype": out_dtype} if out_dtype else {}))
                yield f"{label}/{dlabel}/s{seed}", method, p, None, dlabel, seed
    for label, method, params, policy in VOCAB_CASES:
        for dlabel in ("fp32", "bf16"):
            yield f"{label}/{dlabel}/s0", method, dict(params), policy, dlabel, 0


def merge(engine_run, zoo: dict, key, method, params, policy, out: Path, device="cpu") -> dict[str, str]:
    experts = {e: zoo["math+1" if policy and e == "math" else e] for e in EXPERTS}
    engine_run(method, experts, str(out), base=zoo["base"], params=params, seed=int(key.rsplit("/s", 1)[1]),
               device=device, vocab_policy=policy, progress=False)
    return digests(out)


def _torch_engine():
    from mergeflow.merging.engine import run_merge

    return run_merge


def _write(root: Path) -> None:
    """Record the engine's bytes on the CPU (the recorded file was written by the release
    before issue 16, whose default engine gave the same bytes in every case: auto_differs)."""
    run = _torch_engine()
    zoos = {d: make_zoo(root / d, DTYPES[d][0]) for d in ("fp32", "bf16")}
    record = {key: merge(run, zoos["fp32" if dlabel == "fp32" else "bf16"], key, method, params, policy, root / key)
              for key, method, params, policy, dlabel, _ in all_cases()}
    DATA.write_text(json.dumps({"torch_cpu": record, "auto_differs": {}}, indent=1, sort_keys=True) + "\n")
    print(f"{len(record)} merges recorded")


@pytest.fixture(scope="module")
def zoos(tmp_path_factory):
    root = tmp_path_factory.mktemp("bits")
    return {d: make_zoo(root / d, DTYPES[d][0]) for d in ("fp32", "bf16")}


RECORDED = json.loads(DATA.read_text())["torch_cpu"] if DATA.exists() else {}


@pytest.mark.parametrize("dlabel", ["fp32", "bf16"])
def test_tensors_merged_in_small_blocks_give_the_recorded_bytes(zoos, tmp_path, dlabel):
    """Blocks of 500 elements (every 2-D tensor but one is split): row-local methods in row
    blocks, the tensor-scope TIES trim from the engine's per-tensor pre-pass, the same bytes
    as whole tensors."""
    from mergeflow.merging.engine import run_merge

    def small_blocks(*args, **kw):
        return run_merge(*args, chunk_elements=500, **kw)

    labels = ("ties", "ties_noelect", "dare-ties", "m3-ties", "della", "ties-row", "ties-model")
    bad = []
    for key, method, params, policy, _, seed in all_cases():
        if key.split("/")[0] in labels and key.split("/")[1] == dlabel and seed == 7:
            got = merge(small_blocks, zoos[dlabel], key, method, params, policy, tmp_path / key)
            if got != RECORDED[key]:
                bad.append(key)
    assert not bad, f"merged in blocks, other bytes: {bad}"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# CUDA: bf16 outputs are the CPU's bytes (tests/test_merge_gpu.py); float32 sums may round
# differently there, so the recorded float32 bytes are the CPU's promise only.
@pytest.mark.parametrize("device,dlabel", [*(("cpu", d) for d in DTYPES), pytest.param(
    "cuda", "bf16", marks=pytest.mark.skipif("not _cuda()", reason="needs a CUDA device"))])
def test_every_method_gives_the_recorded_bytes(zoos, tmp_path, device, dlabel):
    run = _torch_engine()
    cases = [c for c in all_cases() if c[4] == dlabel]
    assert cases and all(c[0] in RECORDED for c in cases), "tests/data/merge_bits_sha256.json lacks cases"
    bad = []
    for key, method, params, policy, _, _ in cases:
        got = merge(run, zoos["fp32" if dlabel == "fp32" else "bf16"], key, method, params, policy,
                    tmp_path / key, device)
        wrong = [name for name in RECORDED[key] if got.get(name) != RECORDED[key][name]]
        if wrong or sorted(got) != sorted(RECORDED[key]):
            bad.append(f"{key}: {', '.join(wrong) or 'tensor names'}")
    assert not bad, f"{len(bad)} merges changed bytes: " + "; ".join(bad[:10])


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: tests/test_merge_bits.py --write")
    with tempfile.TemporaryDirectory() as tmp:
        _write(Path(tmp))
