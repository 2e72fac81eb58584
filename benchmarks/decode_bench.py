"""GPU decoding (issue 21): ms per decoding step of plain `generate` vs the hf backend's
`hf_decoding` set-ups, against the weights-read floor.

    python benchmarks/decode_bench.py --json out.jsonl            # CUDA: Llama-2-13B-shaped, bf16
    python benchmarks/decode_bench.py --small --json out.jsonl    # + the real HFBackend, both set-ups
    python benchmarks/decode_bench.py --device cpu --tiny --json /tmp/d.jsonl   # the script itself, on a CPU

The model is a Llama with random weights built directly on the device (no checkpoint on
disk): by default Llama-2-13B's shape (hidden 5120, 40 layers, 40 heads, intermediate 13824,
vocab 32000), bf16. Prompts are random token ids (seeded), --prompt-len long, the same for
every row of the batch (no padding); `min_new_tokens` keeps eos from stopping early.

Per batch size and set-up (`plain`: transformers' default `generate`; `static`/`compiled`:
the `GenerationConfig` arguments that mergeflow.generation.hf uses, taken from there):
- warm-up: the first full call (for `compiled`: torch.compile of the decoding step and CUDA
  graph capture), reported apart;
- ms per step: (time of a call of --new-tokens tokens - time of a call of 1 token) /
  (--new-tokens - 1), best of --repeats; prefill is in both and cancels;
- the greedy tokens compared with plain's (same batch): how many rows agree in full and the
  first position where any row differs.
The floor: parameter bytes / measured memory bandwidth (a device-to-device copy of
--copy-gib GiB, read + write bytes over its time, best of 5), i.e. reading every weight once
per step; the ratio step / floor is the issue's target (within 3x at batch 1).

--small (after the timings): builds the tests' tiny Llama checkpoint and runs mergeflow's HFBackend (the real
code path: tokenizer, left padding, stop strings, batches) with every set-up on a few prompts,
batch sizes 1 and 3 (the last call's short batch is filled up under `compiled`). float32:
asserts identical completions (exit status 1 if not, after writing the JSON). bfloat16:
counts the prompts whose completions agree; the static cache's attention runs over the whole
preallocated length (masked), which rounds differently in bf16 and can flip a near-tie of a
random tiny model (on the CPU, static: 3 and 4 of 5 prompts agreed; compiled: 1 and 0), so
there it is a measurement.

Bounded: batch sizes after the first are skipped when fewer than --need-per-batch of the
--budget seconds are left, and --small's bfloat16 runs once the budget is spent (a row says
so). JSON lines to --json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

LLAMA_13B = dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                 intermediate_size=13824, vocab_size=32000)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=128, vocab_size=512)
T0 = time.perf_counter()


def emit(out, row: dict) -> None:
    row = {"elapsed_s": round(time.perf_counter() - T0, 1), **row}
    print(json.dumps(row), flush=True)
    if out is not None:
        out.write(json.dumps(row) + "\n")
        out.flush()


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bandwidth(device, gib: float) -> float:
    """Bytes per second of a big device-to-device copy (read + write), best of 5."""
    import torch

    n = int(gib * (1 << 30)) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):  # the first is a warm-up
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    bw = 2 * src.numel() * src.element_size() / best
    del src, dst
    return bw


def build_model(shape: dict, device, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the target dtype: no fp32 copy of 13B weights
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def timed_generate(model, input_ids, new_tokens: int, extra: dict):
    import torch
    from transformers import GenerationConfig

    cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           eos_token_id=2, pad_token_id=0, **extra)
    sync(input_ids.device)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=cfg)
    sync(input_ids.device)
    return time.perf_counter() - t, out[:, input_ids.shape[1]:]


def compare(tokens, reference) -> dict:
    same_rows = int((tokens == reference).all(dim=1).sum())
    differs = (tokens != reference).any(dim=0).nonzero()
    return {"rows_same_as_plain": same_rows, "rows": tokens.shape[0],
            "first_differing_step": int(differs[0]) if len(differs) else None}


def bench_model(args, out, device) -> int:
    import torch

    from mergeflow.generation.hf import generation_kwargs

    dtype = getattr(torch, args.dtype)
    shape = TINY if args.tiny else LLAMA_13B
    if device.type == "cuda":
        emit(out, {"what": "device", "name": torch.cuda.get_device_name(device), "torch": torch.__version__,
                   "transformers": __import__("transformers").__version__})
    bw = bandwidth(device, args.copy_gib)
    emit(out, {"what": "bandwidth", "copy_gib": args.copy_gib, "bytes_per_s": bw, "tb_per_s": round(bw / 1e12, 3)})
    t = time.perf_counter()
    model = build_model(shape, device, dtype)
    sync(device)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    floor_ms = param_bytes / bw * 1e3
    emit(out, {"what": "model", "shape": shape, "dtype": args.dtype, "param_bytes": param_bytes,
               "build_s": round(time.perf_counter() - t, 1), "floor_ms_per_step": round(floor_ms, 3),
               "floor": "param bytes / measured copy bandwidth (weights read once per step)"})
    gen = torch.Generator().manual_seed(0)
    for i, batch in enumerate(args.batch_sizes):
        left = args.budget - (time.perf_counter() - T0)
        if i > 0 and left < args.need_per_batch:
            emit(out, {"what": "skipped", "batch": batch, "reason": f"{left:.0f} s of the budget left"})
            continue
        ids = torch.randint(3, shape["vocab_size"], (batch, args.prompt_len), generator=gen).to(device)
        kv_bytes = 2 * shape["num_hidden_layers"] * batch * (args.prompt_len + args.new_tokens) * \
            shape["hidden_size"] * torch.finfo(dtype).bits // 8
        reference = None
        for mode in args.modes:
            extra = {} if mode == "plain" else generation_kwargs(mode, device.type)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            if mode == "compiled":
                torch._dynamo.reset()  # each batch size compiled afresh with static shapes, as in a job
                torch._dynamo.utils.counters.clear()
            warm_n = args.new_tokens if mode == "compiled" else 4  # compiled: compile + capture in here
            warm, _ = timed_generate(model, ids, warm_n, extra)
            fulls, ones, tokens = [], [], None
            for _ in range(args.repeats if mode != "plain" else 1):  # plain: one call is ~30 s at 13B
                t_full, tokens = timed_generate(model, ids, args.new_tokens, extra)
                t_one, _ = timed_generate(model, ids, 1, extra)
                fulls.append(t_full)
                ones.append(t_one)
            step_ms = (min(fulls) - min(ones)) / (args.new_tokens - 1) * 1e3
            row = {"what": "decode", "batch": batch, "mode": mode, "prompt_len": args.prompt_len,
                   "new_tokens": args.new_tokens, "warmup_s": round(warm, 2), "call_s": round(min(fulls), 3),
                   "prefill_1_token_s": round(min(ones), 4), "ms_per_step": round(step_ms, 3),
                   "tokens_per_s": round(batch * 1e3 / step_ms, 1), "floor_ms_per_step": round(floor_ms, 3),
                   "step_over_floor": round(step_ms / floor_ms, 2), "kv_cache_bytes": kv_bytes}
            if mode == "compiled":
                row["compiled_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            if device.type == "cuda":
                row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / (1 << 30), 2)
            if mode == "plain":
                reference = tokens
            elif reference is not None:
                row.update(compare(tokens, reference))
            emit(out, row)
    return 0


SMALL_PROMPTS = [
    "The answer is: 42. Let's think step by step. 0 1 2 3 4 5 6 7 8 9 + - * / = ( )",
    "Below is an instruction that describes a task. Write a response.",
    "The answer is: 42. Let's think",
    "def add(a, b):\n    return",
    "0 1 2",
]


def small_check(args, out, device) -> int:
    """mergeflow's HFBackend with each set-up on the tests' tiny checkpoint: identical completions."""
    import tempfile

    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_llama

    from mergeflow.generation.base import Decoding
    from mergeflow.generation.hf import HFBackend

    model_dir = build_tiny_llama(Path(tempfile.mkdtemp(prefix="decode-bench-")) / "tiny")
    failures = 0
    for dtype, batch in (("float32", 1), ("float32", 3), ("bfloat16", 1), ("bfloat16", 3)):
        if dtype == "bfloat16" and time.perf_counter() - T0 > args.budget:
            emit(out, {"what": "skipped", "small": [dtype, batch], "reason": "past the budget"})
            continue
        got = {}
        for mode in args.modes:
            torch._dynamo.reset()  # each set-up compiles afresh: its own warm-up time
            t = time.perf_counter()
            backend = HFBackend(model_dir, Decoding("hf", dtype, 48, ("0 1 2 3",), 0, batch_size=batch,
                                                    hf_decoding=mode))
            texts = []
            for start in range(0, len(SMALL_PROMPTS), batch):  # longest first, as generate_records does
                texts += backend.generate(SMALL_PROMPTS[start:start + batch])
            got[mode] = texts
            emit(out, {"what": "small", "device": str(backend.device), "dtype": dtype, "batch": batch,
                       "mode": mode, "s": round(time.perf_counter() - t, 2),
                       "same_as_plain": texts == got.get("plain", texts),
                       "prompts_same_as_plain": sum(a == b for a, b in zip(texts, got.get("plain", texts)))})
            failures += dtype == "float32" and texts != got.get("plain", texts)
            del backend
    emit(out, {"what": "small_result", "ok": failures == 0, "float32_mismatching_runs": failures})
    return 1 if failures else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide Llama instead of 13B's shape")
    p.add_argument("--small", action="store_true", help="also run the HFBackend identity check (after the timings)")
    p.add_argument("--only-small", action="store_true", help="only the HFBackend identity check")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch-sizes", default="1,16", help="comma-separated; the first always runs")
    p.add_argument("--modes", default="plain,compiled", help="comma-separated: plain first, then static, compiled")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="timed calls per set-up (plain: 1)")
    p.add_argument("--copy-gib", type=float, default=4.0, help="size of the bandwidth copy")
    p.add_argument("--budget", type=float, default=400, help="seconds: later batch sizes only within it")
    p.add_argument("--need-per-batch", type=float, default=150, help="seconds a further batch size is expected to take")
    p.add_argument("--json", type=Path, help="JSON lines out")
    args = p.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    args.modes = [m for m in args.modes.split(",") if m]
    import torch

    if args.modes[0] != "plain" or not set(args.modes) <= {"plain", "static", "compiled"}:
        print(f"decode_bench: --modes {','.join(args.modes)}: plain first, then any of static, compiled",
              file=sys.stderr)
        return 2
    if args.new_tokens < 2 or not args.batch_sizes or min(args.batch_sizes) < 1:
        print("decode_bench: --new-tokens must be >= 2 and --batch-sizes positive integers", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("decode_bench: --device cuda but torch sees no CUDA device (use --device cpu --tiny)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    out = open(args.json, "a") if args.json else None
    rc = 0
    if not args.only_small:  # the 13B figures first: they are what the time is for
        rc |= bench_model(args, out, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.small or args.only_small:
        rc |= small_check(args, out, device)
    return rc


if __name__ == "__main__":
    sys.exit(main())
