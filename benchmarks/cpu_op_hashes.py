"""Which CPU operation gives different bits on different machines? Runs, on fixed seeded
inputs shaped like the demo zoo's training (hidden 128, batch 16 x 192 tokens, vocab 1024),
each operation a training step uses, forward and backward, and prints one JSON line: the
environment (CPU, glibc, torch, kernels) and the sha256 (first 12) of each result. Compare
the lines of two machines to find the first operation that differs:

    ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE,STRICT python benchmarks/cpu_op_hashes.py
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path


def main() -> None:
    import torch
    import torch.nn.functional as F

    from mergeflow.demo.train import portable_adamw

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    def digest(t: torch.Tensor) -> str:
        return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:12]

    x = rand(16, 192, 128)
    w = rand(256, 128, scale=0.05)
    wv = rand(1024, 128, scale=0.05)
    q, k, v = (rand(16, 4, 192, 32) for _ in range(3))
    logits = rand(16 * 192, 1024)
    labels = torch.randint(1024, (16 * 192,), generator=gen)
    out = {}
    ops = {
        "randn": lambda: x,
        "matmul": lambda: x @ w.T,
        "linear": lambda: F.linear(x, w),
        "lm_head": lambda: F.linear(x, wv),
        "bmm": lambda: torch.matmul(q, k.transpose(-1, -2)),
        "exp": lambda: torch.exp(x),
        "log": lambda: torch.log(x.abs() + 1e-3),
        "tanh": lambda: torch.tanh(x),
        "sigmoid": lambda: torch.sigmoid(x),
        "silu": lambda: F.silu(x),
        "rsqrt": lambda: torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6),
        "sin_cos": lambda: torch.sin(x) + torch.cos(x),
        "pow": lambda: torch.pow(10000.0, torch.arange(0, 32, 2).float() / 32),
        "sum": lambda: x.sum(-1),
        "mean": lambda: x.mean(-1),
        "softmax": lambda: torch.softmax(x, -1),
        "log_softmax": lambda: torch.log_softmax(logits, -1),
        "cross_entropy": lambda: F.cross_entropy(logits, labels),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "norm": lambda: torch.linalg.vector_norm(x),
    }
    for name, fn in ops.items():
        out[name] = digest(fn())
    # backward through a linear + silu + cross-entropy, and an AdamW step
    w1 = w.clone().requires_grad_()
    wl = wv.clone().requires_grad_()
    h = F.silu(F.linear(x, w1) @ w1)
    loss = F.cross_entropy(F.linear(h, wl).reshape(-1, 1024), labels.reshape(16, 192).reshape(-1))
    loss.backward()
    out["grad_w1"] = digest(w1.grad)
    out["grad_lm_head"] = digest(wl.grad)
    g, m, v2 = w1.grad, rand(256, 128, scale=0.01), rand(256, 128).abs() * 1e-4
    steps = {  # the element-wise operations of an AdamW / SGD step, one by one
        "mul_scalar": lambda: w * (1 - 1e-3 * 0.01),
        "lerp": lambda: torch.lerp(m, g, 0.1),
        "addcmul": lambda: torch.addcmul(v2 * 0.98, g, g, value=0.02),
        "sqrt": lambda: v2.sqrt(),
        "div_scalar": lambda: v2.sqrt() / 0.7,
        "add_scalar": lambda: v2 + 1e-8,
        "addcdiv": lambda: torch.addcdiv(w, m, v2.sqrt() + 1e-8, value=-1e-3),
        "add_alpha": lambda: torch.add(w, g, alpha=-0.05),
        "foreach_norm": lambda: torch._foreach_norm([g, w])[0],
        "clip_grad_norm": lambda: _clipped(g.clone()),
    }

    def _clipped(grad):
        p = torch.nn.Parameter(torch.zeros_like(grad))
        p.grad = grad
        torch.nn.utils.clip_grad_norm_([p], 1e-3)
        return p.grad

    for name, fn in steps.items():
        out[name] = digest(fn())
    for name, make in {"adamw_step": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
                       "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
                       "portable_adamw": lambda ps: portable_adamw(ps, lr=1e-3, betas=(0.9, 0.98)),
                       "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True)}.items():
        p = torch.nn.Parameter(w.clone())
        p.grad = g.clone()
        opt = make([p])
        opt.step()
        opt.step()
        out[name] = digest(p)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(json.dumps({"cpu": cpu, "glibc": " ".join(platform.libc_ver()), "torch": torch.__version__,
                      "capability": torch.backends.cpu.get_cpu_capability(), "MKL_CBWR": os.environ.get("MKL_CBWR"),
                      "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"), "ops": out}))


if __name__ == "__main__":
    main()
