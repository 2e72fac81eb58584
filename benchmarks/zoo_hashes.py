"""Build the demo zoo (or a few-step version of it) in this process, with the CPU kernels the
environment chooses, and print one JSON line: torch version, kernels, threads, seconds and
the sha256 of each model.safetensors. Compare machines and settings with it:

    ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE,STRICT python benchmarks/zoo_hashes.py OUT --threads 1
    python benchmarks/zoo_hashes.py OUT --few-steps          # the CPU's native kernels
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--few-steps", action="store_true", help="12 pre-training steps, 4 per expert family, 3 for the judge")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch

    from mergeflow.demo.build import build_demo
    from mergeflow.demo.models import FULL

    spec = dataclasses.replace(FULL, threads=args.threads)
    if args.few_steps:
        spec = dataclasses.replace(spec, n_train=100, pretrain_steps=12, finetune_steps=4, judge_steps=3, n_judge_rows=20)
    started = time.monotonic()
    build_demo(args.out, args.seed, spec)
    seconds = time.monotonic() - started
    hashes = {p.parent.name: hashlib.sha256(p.read_bytes()).hexdigest()
              for p in sorted(args.out.glob("models/*/model.safetensors"))}
    # the inputs of training: were they the same, when the models differ?
    inputs = {str(p.relative_to(args.out)): hashlib.sha256(p.read_bytes()).hexdigest()[:12]
              for p in [*sorted(args.out.glob("data/*.jsonl")), args.out / "models/base/tokenizer.json"]}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(json.dumps({"torch": torch.__version__, "cpu": cpu, "capability": torch.backends.cpu.get_cpu_capability(),
                      "MKL_CBWR": os.environ.get("MKL_CBWR"), "threads": args.threads, "few_steps": args.few_steps,
                      "seconds": round(seconds, 1), "sha256": hashes, "inputs": inputs}))


if __name__ == "__main__":
    main()
