"""Reference likelihood: how probable a model finds the benchmark's reference response.

A graded view of a skill next to the all-or-nothing exact-match and pass@1 scores: a merge
that keeps most of an expert's skill but still slips one token of a chain of thought
scores 0 there, yet its likelihood of the reference answer shows how much it kept. Per doc,
the prompt is built exactly as for generation; the prompt and the reference are tokenized
apart (as lm-eval's `loglikelihood` requests are) and only the reference tokens are scored.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mergeflow.errors import MergeflowError

log = logging.getLogger(__name__)


def encode(tokenizer, prompt: str, reference: str) -> tuple[list[int], list[int]]:
    """(prompt ids with the tokenizer's special tokens, reference ids without)."""
    ids = tokenizer(prompt).input_ids
    ref = tokenizer(reference, add_special_tokens=False).input_ids
    return list(ids), list(ref)


def sequence_nll(model, batch: list[tuple[list[int], list[int]]], pad_id: int) -> list[tuple[float, int]]:
    """(sum of -log p over the reference tokens, their count) per (prompt, reference) pair.

    Right padding with an attention mask: a token's logits depend only on the tokens before
    it, so padding after a sequence changes nothing it is scored on."""
    import torch

    device = next(model.parameters()).device
    width = max(len(p) + len(r) for p, r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    target = torch.zeros((len(batch), width), dtype=torch.bool)
    for row, (p, r) in enumerate(batch):
        ids[row, : len(p) + len(r)] = torch.tensor(p + r)
        mask[row, : len(p) + len(r)] = 1
        target[row, len(p) : len(p) + len(r)] = True
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    # position t predicts token t+1
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
    scored = target[:, 1:].to(device)
    nll = -(logp * scored).sum(dim=1)
    return [(float(n), int(c)) for n, c in zip(nll.cpu(), scored.sum(dim=1).cpu())]


def load_model(model_dir: Path, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise MergeflowError(f"{model_dir}: tokenizer has no pad, unk or eos token to pad batches with")
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), device_map="auto" if torch.cuda.is_available() else None
    )
    return model.eval(), tokenizer, pad


def reference_nll(model, tokenizer, pad_id: int, pairs: list[tuple[str, str]], batch_size: int) -> list[tuple[float, int]]:
    """(nll sum, tokens) for every (prompt, reference) pair, in order."""
    encoded = [encode(tokenizer, p, r) for p, r in pairs]
    for i, (_, ref) in enumerate(encoded):
        if not ref:
            raise MergeflowError(f"reference response of doc {i} is empty: nothing to score")
    # longest first, so a batch holds similar lengths; results go back to the input order
    order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
    out: list[tuple[float, int] | None] = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for i, res in zip(chunk, sequence_nll(model, [encoded[i] for i in chunk], pad_id)):
            out[i] = res
    return out  # type: ignore[return-value]
