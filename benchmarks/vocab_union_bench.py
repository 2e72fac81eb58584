"""What the `union` vocabulary policy costs at a Llama-3 vocabulary size (issue 17).

Builds a base with a 128256-token tokenizer (a BPE model over a synthetic vocabulary: the
size, not the strings, is what costs) and two experts that add 64 tokens each (MergeBench's
Llama-3.2-3B experts have 128320 rows), half of them shared and numbered the other way
round, then merges them with task_arithmetic under `truncate` and under `union` and prints
the wall and plan times (the union's tokenizer loading and row plan happen in plan_s).
Only the vocabulary tensors and one norm are in the checkpoints, so the difference is the
policy's cost, not the rest of the model's.

    .venv/bin/python benchmarks/vocab_union_bench.py [--hidden 256] [--out /tmp/vocab_union_bench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

VOCAB = 128256
ADDED = 64


def build(out: Path, hidden: int) -> tuple[Path, dict[str, str]]:
    import torch
    from safetensors.torch import save_file
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    g = torch.Generator().manual_seed(0)

    names = ("model.embed_tokens.weight", "lm_head.weight")
    base_sd = {n: torch.randn((VOCAB, hidden), generator=g) for n in names}

    def save(d: Path, fast, rows: int, seed: int):
        g.manual_seed(seed)
        d.mkdir(parents=True)
        # a fine-tune's rows: the base's plus a small delta; new rows drawn afresh
        sd = {n: torch.cat([base_sd[n] + (0.01 * torch.randn((VOCAB, hidden), generator=g) if seed else 0),
                            torch.randn((rows - VOCAB, hidden), generator=g)]) for n in names}
        sd["model.norm.weight"] = torch.ones(hidden)
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
        fast.save_pretrained(d)
        (d / "config.json").write_text(json.dumps({"vocab_size": rows, "architectures": ["LlamaForCausalLM"]}))

    base = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    save(out / "base", base, VOCAB, 0)
    shared = [f"<shared_{i}>" for i in range(ADDED // 2)]
    experts = {}
    for k, name in enumerate(("a", "b")):
        fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.to_str()), unk_token="<unk>",
                                       bos_token="<s>", eos_token="</s>")
        own = [f"<{name}_{i}>" for i in range(ADDED // 2)]
        fast.add_tokens([AddedToken(t, special=True, normalized=False) for t in
                         (shared if k == 0 else shared[::-1]) + own], special_tokens=True)
        save(out / name, fast, len(fast), k + 1)
        experts[name] = str(out / name)
    return out / "base", experts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--out", default="/tmp/vocab_union_bench")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from mergeflow.merging.engine import run_merge

    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    base, experts = build(root / "models", args.hidden)
    print(f"vocabulary {VOCAB} + {ADDED} per expert ({ADDED // 2} shared), hidden {args.hidden}, float32")
    for policy in ("truncate", "union"):
        walls, plans, merges = [], [], []
        for r in range(args.repeats):
            t = time.time()
            meta = run_merge("task_arithmetic", experts, str(root / f"{policy}-{r}"), base=str(base),
                             vocab_policy=policy, device="cpu", progress=False)
            walls.append(time.time() - t)
            plans.append(meta["timings"]["plan_s"])
            merges.append(meta["timings"]["merge_s"])
        rows = meta["vocab_resized"].get("lm_head.weight")
        print(f"{policy:9s} rows {rows}: wall {min(walls):.2f} s (min of {args.repeats}), "
              f"plan {min(plans):.2f} s, merge {min(merges):.2f} s")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
