"""Building the demo zoo: benchmark-shaped data, a tokenizer, a pre-trained tiny base, three
experts fine-tuned from it and a judge fine-tuned from it. Everything follows from the seed
and the ZooSpec."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from mergeflow import atomic
from mergeflow.demo import cpu
from mergeflow.demo import data as families
from mergeflow.demo import judging
from mergeflow.demo.models import EXPERT_FAMILIES, FINETUNED, MODELS, ZooSpec, add_pad_row, new_base
from mergeflow.demo.tokenizer import train_tokenizer
from mergeflow.demo.train import encode_chats, encode_pairs, train
from mergeflow.errors import MergeflowError

log = logging.getLogger(__name__)


def build_demo(out: Path, seed: int, spec: ZooSpec, models: tuple[str, ...] = MODELS,
               gsm8k_judge_prompt: str | Path | None = None, annotator: str | Path | None = None) -> dict:
    """Write `out/data/*.jsonl` (test rows), `out/data/validation/*.jsonl`, `out/models/{base,lm,math,code,judge}/`, `out/training/*.json`
    and `out/demo.json`: the base step, then each fine-tuned model (`models` picks them).

    `gsm8k_judge_prompt` / `annotator`: the judge prompt file and alpaca_eval annotator the
    pipeline will use (default: the demo's, under workflow/judges/); the judge learns them."""
    started = time.monotonic()
    build_base(out, seed, spec, gsm8k_judge_prompt, annotator)
    for name in FINETUNED:
        if name in models:
            build_finetuned(out, name, gsm8k_judge_prompt, annotator)
    log.info("demo zoo built in %.1f s", time.monotonic() - started)
    return manifest_of(out)


def manifest_of(out: Path) -> dict:
    """demo.json with each trained model's summary (out/training/NAME.json) under "models"."""
    manifest = json.loads((Path(out) / "demo.json").read_text())
    manifest["models"] = {p.stem: json.loads(p.read_text()) for p in sorted((Path(out) / "training").glob("*.json"))}
    return manifest


def _start(threads: int) -> None:
    import torch

    if not cpu.pinned():
        log.warning("CPU kernels not pinned (%s): this zoo's bytes depend on this CPU; `mergeflow demo` pins them",
                    " ".join(f"{k}={v}" for k, v in cpu.PINNED_ENV.items()))
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)


def _training_data(seed: int, spec: ZooSpec, gsm8k_judge_prompt, annotator):
    """(test/train splits, pre-training texts, templated pairs, judging requests): from the seed alone."""
    splits = {name: families.split_rows(name, seed, spec.n_test, spec.n_train) for name in families.FAMILIES}
    plain = {n: [families.pretraining_text(n, r) for r in train_rows] for n, (_, train_rows) in splits.items()}
    pairs = {n: [families.FAMILIES[n][1](r) for r in train_rows] for n, (_, train_rows) in splits.items()}
    judge_items = _judge_items(splits, seed, spec.n_judge_rows, gsm8k_judge_prompt, annotator)
    return splits, plain, pairs, judge_items


def build_base(out: Path, seed: int, spec: ZooSpec, gsm8k_judge_prompt=None, annotator=None) -> None:
    """The base step: data files, the tokenizer, the pre-trained base and demo.json."""
    out = Path(out)
    _start(spec.threads)
    splits, plain, pairs, judge_items = _training_data(seed, spec, gsm8k_judge_prompt, annotator)
    for name, (test, train_rows) in splits.items():
        atomic.write_jsonl(out / "data" / f"{name}.jsonl", test)
        # validation rows: another stream, after the others (nothing trained on them, nothing else moves)
        atomic.write_jsonl(out / families.validation_file(name),
                           families.validation_rows(name, seed, spec.n_validation, test, train_rows))
    # The tokenizer sees only training text (plain, templated, judging requests), never test rows.
    tokenizer = train_tokenizer(
        [t for texts in plain.values() for t in texts] + [p + r for ps in pairs.values() for p, r in ps]
        + [_chat_text(item.messages, item.reply) for items in judge_items.values() for item in items],
        spec.vocab_size,
    )
    base = new_base(spec, tokenizer, seed)
    corpus = [encode_pairs(tokenizer, [("", t) for t in texts], spec.max_length) for texts in plain.values()]
    templated = [encode_pairs(tokenizer, ps, spec.max_length) for ps in pairs.values()]
    share = spec.pretrain_templated / len(templated)
    weights = [(1 - spec.pretrain_templated) / len(corpus)] * len(corpus) + [share] * len(templated)
    t0 = time.monotonic()
    losses = train(base, corpus + templated, steps=spec.pretrain_steps, batch_size=spec.batch_size,
                   lr=spec.lr_pretrain, seed=seed, pad_id=tokenizer.pad_token_id, weights=weights)
    _save(base, tokenizer, out / "models" / "base")
    _record(out, "base", losses, len(tokenizer), time.monotonic() - t0)
    manifest = {"seed": seed, "spec": asdict(spec), "data": {n: len(t) for n, (t, _) in splits.items()},
                "validation": {n: spec.n_validation for n in splits},
                "cpu_kernels": "pinned" if cpu.pinned() else "native"}
    atomic.write_text(out / "demo.json", json.dumps(manifest, indent=2) + "\n")


def build_finetuned(out: Path, name: str, gsm8k_judge_prompt=None, annotator=None, seed: int | None = None) -> None:
    """One fine-tuned model (an expert or the judge) from the base step's output in `out`,
    trained with `spec.finetune_threads` threads: the fine-tunes can train side by side.
    `seed`, if given, must be the base step's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    if name not in FINETUNED:
        raise MergeflowError(f"unknown demo model {name!r}; fine-tuned models: {', '.join(FINETUNED)}")
    try:
        manifest = json.loads((out / "demo.json").read_text())
    except (OSError, ValueError) as err:
        raise MergeflowError(f"{out / 'demo.json'}: the base step's manifest is missing or unreadable ({err}); "
                             f"build the base first (`mergeflow demo --out {out} --model base`)") from None
    if seed is not None and seed != manifest["seed"]:
        raise MergeflowError(f"--seed {seed}: {out} holds the zoo of seed {manifest['seed']}; "
                             "build the base again with this seed first")
    seed, spec = manifest["seed"], ZooSpec(**manifest["spec"])
    _start(spec.finetune_threads)
    _, _, pairs, judge_items = _training_data(seed, spec, gsm8k_judge_prompt, annotator)
    tok = AutoTokenizer.from_pretrained(out / "models" / "base")
    model = AutoModelForCausalLM.from_pretrained(out / "models" / "base", dtype=torch.float32)
    if name == "math":
        add_pad_row(model, tok)
    if name == "judge":
        groups = [encode_chats(tok, [(item.messages, item.reply) for item in items], spec.judge_max_length)
                  for items in judge_items.values()]
        steps, lr, optimizer = spec.judge_steps, spec.lr_judge, "adamw"
    else:
        groups = [encode_pairs(tok, pairs[fam], spec.max_length) for fam in EXPERT_FAMILIES[name]]
        # the same number of steps per task family (math learns GSM8K and MATH)
        steps, lr, optimizer = spec.finetune_steps * len(groups), spec.lr_finetune, spec.finetune_optimizer
    t0 = time.monotonic()
    losses = train(model, groups, steps=steps, batch_size=spec.batch_size, lr=lr,
                   seed=seed * 1000 + FINETUNED.index(name) + 1, pad_id=tok.pad_token_id, optimizer=optimizer)
    _save(model, tok, out / "models" / name)
    _record(out, name, losses, len(tok), time.monotonic() - t0)


def _record(out: Path, name: str, losses: list[float], vocab: int, seconds: float) -> None:
    # Timings vary between machines: logged, not written (the same seed gives the same bytes).
    log.info("%s trained in %.1f s", name, seconds)
    atomic.write_text(out / "training" / f"{name}.json", json.dumps(_summary(losses, vocab), indent=2) + "\n")


def _judge_items(splits: dict, seed: int, n_rows: int, gsm8k_judge_prompt, annotator) -> dict[str, list]:
    """Judging requests built from the training rows of the GSM8K and AlpacaEval families."""
    return {
        "gsm8k": judging.gsm8k_items(splits["gsm8k"][1][:n_rows], seed, gsm8k_judge_prompt),
        "alpaca_eval": judging.alpaca_items(splits["alpaca_eval"][1][:n_rows], seed, annotator),
    }


def _chat_text(messages: list[dict], reply: str) -> str:
    return "\n".join(m["content"] for m in messages) + "\n" + reply


def _summary(losses: list[float], vocab: int) -> dict:
    return {"steps": len(losses), "first_loss": round(losses[0], 4) if losses else None,
            "last_loss": round(losses[-1], 4) if losses else None, "vocab_rows": vocab}


def _save(model, tokenizer, path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)  # no stale shards from an earlier, different build
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    log.info("saved %s", path)
