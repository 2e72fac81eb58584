"""benchmarks/gpu_path.py builds what the GPU path needs (Llama-shaped checkpoints around the real
Llama-2 tokenizer, the real GSM8K rows) and a config the workflow accepts; the GPU run itself is
benchmarks/gpu_path.sh on the device machine (benchmarks/README.md)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from real_assets import gsm8k_rows, llama2_tokenizer_dir

ROOT = Path(__file__).resolve().parents[1]
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2}


@pytest.mark.slow
def test_gpu_path_build_and_dry_run(tmp_path):
    gsm8k_rows(), llama2_tokenizer_dir()  # the assets, or a skip saying why
    out = tmp_path / "gpu_path"
    res = subprocess.run([sys.executable, "benchmarks/gpu_path.py", "build", "--out", str(out),
                          "--shape", json.dumps(TINY)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    config = yaml.safe_load((out / "config.yaml").read_text())
    from transformers import AutoConfig, AutoTokenizer

    for name, source in config["models"].items():
        cfg = AutoConfig.from_pretrained(source["path"])
        assert cfg.model_type == "llama" and cfg.vocab_size == 32000 and cfg.max_position_embeddings == 4096
        tok = AutoTokenizer.from_pretrained(source["path"])
        assert tok("x").input_ids[0] == tok.bos_token_id == cfg.bos_token_id == 1
    rows = [json.loads(line) for line in (out / "data" / "gsm8k.jsonl").read_text().splitlines()]
    assert len(rows) == 100 and all("####" in r["answer"] for r in rows)
    assert config["protocol"]["defaults"]["dtype"] == "bfloat16" and config["merge"]["device"] == "cuda"

    dry = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "4", "--quiet", "rules",
                          "--configfile", str(out / "config.yaml")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    text = dry.stdout + dry.stderr
    assert dry.returncode == 0, text[-3000:]
    jobs = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", text, re.M)}
    n_models = len(config["evaluate"]["models"])  # the base and the merges (the experts are merged, not scored)
    assert n_models == 1 + len(config["merges"])
    assert jobs.get("merge") == len(config["merges"]) and jobs.get("aggregate") == 1
    assert jobs.get("generate") == n_models and jobs.get("score") == 2 * n_models  # gsm8k and humaneval each
