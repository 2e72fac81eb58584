"""Generation throughput: vLLM vs hf (transformers) on the same model and prompts, side by side.

Each backend runs in its own environment, as the workflow runs it: hf with this Python (the
project's .venv), vLLM with vLLM's (.venv-vllm, scripts/setup_vllm.sh, or --vllm-python),
each as a child process running this file with --worker. Per backend: the import, the
engine start-up (building the backend: model load, and for vLLM its engine processes and
KV cache), the generation of every prompt (the backend's own generate call, as mergeflow's
backends make it; hf: padded batches of --batch-size; vLLM: one call, its scheduler
batches), prompts/s, generated tokens/s (token ids, up to and with EOS), and how many
prompts got the same token ids as hf.

    .venv/bin/python benchmarks/generation_bench.py                  # a random Llama (below)
    .venv/bin/python benchmarks/generation_bench.py --model DIR --prompts 64 --max-new-tokens 128

Without --model it writes a randomly initialised Llama (seeded; --hidden/--layers/--heads,
head size 64, the tokenizer of tests/conftest.py) under --work; random weights generate
until max_new_tokens (no stop strings), so both backends do the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_model(out: Path, hidden: int, layers: int, heads: int, seed: int) -> Path:
    """A random Llama with the tests' tokenizer (fp32, safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_llama

    tok_dir = build_tiny_llama(out / "tokenizer_source")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      head_dim=hidden // heads, max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    model_dir = out / "model"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir


def prompts(n: int) -> list[str]:
    """GSM8K-shaped questions in the DELLA GSM8K template (the protocol's prompt shape)."""
    from mergeflow.generation.templates import ALPACA, build_prompt

    return [build_prompt(ALPACA, "{question}", {"question": f"Tom has {i} apples and buys {2 * i + 3} more. "
                                                            f"He gives {i % 5} away. How many apples has he now?"})
            for i in range(n)]


def worker(args) -> None:
    """One backend in this process; writes its figures to --result (vLLM logs to stdout)."""
    t0 = time.perf_counter()
    import torch

    from mergeflow.generation.base import Decoding, load_backend

    backend_mod = __import__("vllm" if args.worker == "vllm" else "transformers")
    t_import = time.perf_counter() - t0
    decoding = Decoding(args.worker, "float32", args.max_new_tokens, (), 0,
                        backend_version=backend_mod.__version__, batch_size=args.batch_size)
    t1 = time.perf_counter()
    backend = load_backend(Path(args.model), decoding)
    t_start = time.perf_counter() - t1
    todo = prompts(args.prompts)
    # The backends' own generate calls, as mergeflow.generation.{hf,vllm} make them, keeping
    # the token ids: re-tokenizing a random model's text does not give them back.
    t2 = time.perf_counter()
    if args.worker == "vllm":
        tokens = [list(o.outputs[0].token_ids) for o in backend.llm.generate(todo, backend.params, use_tqdm=False)]
    else:
        tokens = []
        for i in range(0, len(todo), args.batch_size):
            enc = backend.tokenizer(todo[i:i + args.batch_size], return_tensors="pt", padding=True)
            with torch.inference_mode():
                out = backend.model.generate(**enc, generation_config=backend.generation_config)
            eos = backend.generation_config.eos_token_id
            for row in out[:, enc["input_ids"].shape[1]:].tolist():  # up to and with the first EOS
                tokens.append(row[: row.index(eos) + 1] if eos in row else row)
    t_gen = time.perf_counter() - t2
    n_tokens = sum(map(len, tokens))
    outputs = tokens
    Path(args.result).write_text(json.dumps({
        "backend": args.worker, "version": backend_mod.__version__, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "import_s": t_import, "startup_s": t_start, "generate_s": t_gen,
        "prompts": len(todo), "tokens": n_tokens, "outputs": outputs}))
    # a plain return: vLLM's exit handlers stop its engine processes (which hold our pipes)


def run_worker(python: str, backend: str, args) -> dict:
    result = args.work / f"{backend}.json"
    result.unlink(missing_ok=True)
    cmd = [python, __file__, "--worker", backend, "--model", str(args.model), "--prompts", str(args.prompts),
           "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size), "--result", str(result)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0 or not result.exists():
        sys.exit(f"generation_bench: the {backend} worker failed ({python}):\n{res.stderr[-3000:]}")
    out = json.loads(result.read_text())
    out["process_s"] = wall
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="model directory (default: a random Llama, written under --work)")
    p.add_argument("--work", type=Path, default=Path("/tmp/mergeflow-generation-bench"))
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16, help="hf's padded batch")
    p.add_argument("--vllm-python", default=os.environ.get("MERGEFLOW_VLLM_PYTHON") or str(ROOT / ".venv-vllm/bin/python"))
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--worker", choices=["hf", "vllm"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        sys.path.insert(0, str(ROOT / "src"))
        return worker(args)
    if args.prompts < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        print("generation_bench: --prompts, --max-new-tokens and --batch-size must be >= 1", file=sys.stderr)
        sys.exit(2)
    if not Path(args.vllm_python).exists():
        print(f"generation_bench: --vllm-python {args.vllm_python}: not found (scripts/setup_vllm.sh)", file=sys.stderr)
        sys.exit(2)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        args.model = build_model(args.work, args.hidden, args.layers, args.heads, seed=0)
    elif not (args.model / "config.json").is_file():
        print(f"generation_bench: --model {args.model}: no config.json", file=sys.stderr)
        sys.exit(2)
    # one after the other, never at once: each gets the machine's cores
    results = [run_worker(sys.executable, "hf", args), run_worker(args.vllm_python, "vllm", args)]
    hf_out = results[0]["outputs"]
    cfg = json.loads((args.model / "config.json").read_text())
    print(f"model {args.model} (hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
          f"{cfg['num_attention_heads']} heads, fp32); {args.prompts} prompts, {args.max_new_tokens} new tokens, "
          f"greedy; CPUs: {os.cpu_count()}")
    print("| backend | version | import s | engine start s | generate s | prompts/s | tokens/s | tokens | = hf |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        same = sum(a == b for a, b in zip(r["outputs"], hf_out))
        print(f"| {r['backend']} | {r['version']} (torch {r['torch']}, {r['threads']} threads) | {r['import_s']:.1f} "
              f"| {r['startup_s']:.1f} | {r['generate_s']:.2f} | {r['prompts'] / r['generate_s']:.1f} "
              f"| {r['tokens'] / r['generate_s']:.0f} | {r['tokens']} | {same}/{len(hf_out)} |")
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "outputs"} for r in results], indent=2))


if __name__ == "__main__":
    main()
