"""A small, deterministic causal-LM training loop (CPU-friendly) for the demo zoo."""

from __future__ import annotations

import math

Example = tuple[list[int], list[int]]  # (prompt ids, response ids); loss on the response only


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], max_length: int) -> list[Example]:
    """(prompt ids with <s>, response ids + </s>); tokenized apart, as at generation time.

    Responses are cut to fit `max_length`; pairs whose prompt alone fills it are left out."""
    return _fit([(tokenizer(prompt).input_ids,
                  tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id])
                 for prompt, response in pairs], max_length)


def encode_chats(tokenizer, chats: list[tuple[list[dict], str]], max_length: int) -> list[Example]:
    """(chat prompt ids, reply ids + </s>): the prompt as `transformers serve` builds it
    (the chat template with the generation prompt, tokenized by apply_chat_template)."""
    out = []
    for messages, reply in chats:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        out.append((list(prompt), tokenizer(reply, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]))
    return _fit(out, max_length)


def _fit(examples: list[Example], max_length: int) -> list[Example]:
    out = [(p, r[: max_length - len(p)]) for p, r in examples if len(p) < max_length]
    if not out:
        raise ValueError(f"no training pair fits in max_length={max_length} tokens")
    return out


def portable_adamw(params, *, lr: float, betas: tuple[float, float], eps: float = 1e-8):
    """torch.optim.AdamW's update (no weight decay) with sqrt(v) computed as v * rsqrt(v):
    ATen's sqrt goes through MKL's vector maths, whose bits differ between Intel and AMD
    CPUs even under MKL_CBWR=COMPATIBLE; rsqrt, a product and a division are IEEE-exact."""
    import torch

    class PortableAdamW(torch.optim.Optimizer):
        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                beta1, beta2 = group["betas"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if not state:
                        state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                    state["step"] += 1
                    m, v = state["exp_avg"], state["exp_avg_sq"]
                    m.lerp_(p.grad, 1 - beta1)
                    v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                    v_hat = v / (1 - beta2 ** state["step"])
                    root = torch.where(v_hat > 0, v_hat * v_hat.rsqrt(), 0.0)
                    p.addcdiv_(m, root.add_(group["eps"]), value=-group["lr"] / (1 - beta1 ** state["step"]))

    return PortableAdamW(params, dict(lr=lr, betas=betas, eps=eps))


def train(model, groups: list[list[Example]], *, steps: int, batch_size: int, lr: float, seed: int,
          pad_id: int, optimizer: str = "adamw", weights: list[float] | None = None) -> list[float]:
    """AdamW (or SGD with Nesterov momentum) with linear warm-up/decay; loss on response tokens
    only. Returns per-step losses.

    Each step draws its batch from one group (round robin, or drawn with `weights`): groups
    are task families, whose sequences have similar lengths, so batches carry little padding."""
    import torch

    if steps <= 0:
        return []
    if weights is not None:
        keep = [i for i, g in enumerate(groups) if g]
        groups, probs = [groups[i] for i in keep], torch.tensor([float(weights[i]) for i in keep])
    gen = torch.Generator().manual_seed(seed)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    else:
        opt = portable_adamw(model.parameters(), lr=lr, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    device = next(model.parameters()).device
    model.train()
    losses = []
    for step in range(steps):
        if weights is None:
            examples = groups[step % len(groups)]
        else:
            examples = groups[int(torch.multinomial(probs, 1, generator=gen))]
        idx = torch.randint(len(examples), (batch_size,), generator=gen).tolist()
        batch = [examples[i] for i in idx]
        width = max(len(p) + len(r) for p, r in batch)
        ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, (p, r) in enumerate(batch):
            seq = p + r
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, len(p) : len(seq)] = torch.tensor(r)
            mask[row, : len(seq)] = 1
        loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise RuntimeError(f"demo training diverged (loss {value}); lower the learning rate")
        losses.append(value)
    model.eval()
    return losses
