"""The demo zoo's shape and its model-level operations: a tiny Llama, and WizardMath's
extra vocabulary row."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ZooSpec:
    """Sizes and training budget of the demo zoo; deepen training by raising the steps."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    max_positions: int = 1024
    n_test: int = 20  # rows per benchmark file
    n_validation: int = 6  # rows per validation file (data/validation/NAME.jsonl), apart from test and training
    n_train: int = 2000  # training rows per family
    pretrain_steps: int = 800
    pretrain_templated: float = 0.0  # share of pre-training batches drawn from the templated pairs
    finetune_steps: int = 300
    judge_steps: int = 400
    batch_size: int = 16
    max_length: int = 192  # training sequences are cut to this many tokens
    judge_max_length: int = 512
    n_judge_rows: int = 400  # training rows per judged family that become judging requests
    lr_pretrain: float = 3e-3
    # Experts: SGD, not AdamW. Adam moves every weight by about lr per step whatever its
    # gradient, so the task vectors carry dense noise that swamps the other experts' skills
    # when merged; SGD's deltas follow the gradients (docs/demo.md has the measurement).
    finetune_optimizer: str = "sgd"
    lr_finetune: float = 0.05
    lr_judge: float = 2e-3
    # torch threads while training; fixed, whatever the CPUs: the bits depend on it. The
    # fine-tunes take one each, so that they train side by side (Snakemake's demo rules).
    threads: int = 2
    finetune_threads: int = 1


FULL = ZooSpec()
# For tests: the same pipeline in a second or two.
SMALL = ZooSpec(
    vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, max_positions=512,
    n_test=4, n_validation=2, n_train=12, pretrain_steps=2, finetune_steps=2, judge_steps=2, batch_size=4, max_length=256,
    judge_max_length=512, n_judge_rows=4,
)

EXPERTS = ("lm", "math", "code")
FINETUNED = (*EXPERTS, "judge")  # trained from the base, independently of one another
MODELS = ("base", *FINETUNED)
# Which families each expert is fine-tuned on (data file names).
EXPERT_FAMILIES = {"lm": ("alpaca_eval",), "math": ("gsm8k", "math"), "code": ("mbpp",)}


def new_base(spec: ZooSpec, tokenizer, seed: int):
    """A randomly initialised Llama-architecture causal LM (seeded)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def add_pad_row(model, tokenizer):
    """Add a `<pad>` token with one more embedding and lm_head row, as WizardMath-13B has
    (32001 rows against Llama-2's 32000). The new rows start at the mean of the others."""
    import torch

    old = len(tokenizer)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    assert len(tokenizer) == old + 1 and tokenizer.pad_token_id == old
    model.resize_token_embeddings(old + 1, mean_resizing=False)
    with torch.no_grad():
        for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            weight[old] = weight[:old].mean(dim=0)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
