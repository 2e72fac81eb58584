#!/usr/bin/env python
"""One `mergeflow generate` process per model vs one per model x benchmark (issue 21).

    python benchmarks/generate_per_model.py --work /tmp/gpm [--repeats 2]

Builds a demo-shaped Llama (mergeflow.demo.models.FULL, random weights: the load and decode
cost of the demo zoo, not its outputs) and the demo's rows of gsm8k, math, mbpp and
alpaca_eval (the demo config's limits and generation settings, backend hf), then times, each
in fresh processes with empty caches: one process per benchmark (the old rule `generate`)
and one process with a --task per benchmark (the per-model rule). Also times the rerun after
one benchmark's max_new_tokens changes: one process, counting the prompts it generated.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = ("gsm8k", "math", "mbpp", "alpaca_eval")
ROOT = Path(__file__).resolve().parents[1]


def build(work: Path) -> tuple[Path, dict]:
    from mergeflow import config as mfconfig
    from mergeflow.demo import data as demo_data
    from mergeflow.demo.models import FULL, new_base
    from mergeflow.demo.tokenizer import train_tokenizer

    cfg = mfconfig.load(ROOT / "config" / "config.yaml")
    tasks = {}
    texts = []
    for b in BENCHMARKS:
        settings = {**mfconfig.generation_settings(cfg, b), "backend": "hf"}
        rows = demo_data.make_rows(b, seed=0, n=settings["limit"] or 8)
        path = work / "data" / f"{b}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        texts += [demo_data.pretraining_text(b, r) for r in rows]
        tasks[b] = (path, settings)
    model = work / "model"
    if not (model / "config.json").exists():
        tokenizer = train_tokenizer(texts, FULL.vocab_size)
        base = new_base(FULL, tokenizer, seed=0)
        base.save_pretrained(model)
        tokenizer.save_pretrained(model)
    return model, tasks


def task_args(tasks: dict, run: Path, names=BENCHMARKS) -> list[str]:
    return [a for b in names for a in ("--task", b, str(tasks[b][0]), json.dumps(tasks[b][1]),
                                       str(run / "cache" / f"{b}.jsonl"), str(run / "gen" / f"{b}.jsonl"))]


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mergeflow", "generate", *argv, "--no-progress"], check=True,
                   capture_output=True, text=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    model, tasks = build(args.work)
    separate, together, rerun, regenerated = [], [], [], {}
    for i in range(args.repeats):
        run = args.work / f"separate{i}"
        shutil.rmtree(run, ignore_errors=True)
        separate.append(sum(timed(["--model", str(model), *task_args(tasks, run, [b])]) for b in BENCHMARKS))
        run = args.work / f"together{i}"
        shutil.rmtree(run, ignore_errors=True)
        together.append(timed(["--model", str(model), *task_args(tasks, run)]))
        before = {b: len((run / "cache" / f"{b}.jsonl").read_text().splitlines()) for b in BENCHMARKS}
        edited = {**tasks, "gsm8k": (tasks["gsm8k"][0], {**tasks["gsm8k"][1],
                                                          "max_new_tokens": tasks["gsm8k"][1]["max_new_tokens"] + 1})}
        rerun.append(timed(["--model", str(model), *task_args(edited, run)]))
        regenerated = {b: len((run / "cache" / f"{b}.jsonl").read_text().splitlines()) - before[b]
                       for b in BENCHMARKS}
    print(json.dumps({
        "benchmarks": list(BENCHMARKS), "prompts": {b: len(tasks[b][0].read_text().splitlines()) for b in BENCHMARKS},
        "one_process_per_benchmark_s": [round(t, 1) for t in separate],
        "one_process_per_model_s": [round(t, 1) for t in together],
        "rerun_after_one_edit_s": [round(t, 1) for t in rerun],
        "prompts_generated_by_the_rerun": regenerated,
        "median_saving_s": round(statistics.median(separate) - statistics.median(together), 1),
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
