"""Demo zoo budget search (issue 21): train ZooSpec variants side by side, time each training
step as the demo runs it, and check the demo's quality gates on each variant's zoo.

Each variant is FULL (or SMALL with --small) with some fields replaced. Per variant, in its own
directory OUT/NAME/ and on its own CPUs (--cores-per-job, default 2: the demo's 2-core box):

1. the demo's own commands, timed (wall and CPU seconds of the process): `mergeflow demo
   --model base --spec-json ...` (spec.threads torch threads), then `mergeflow demo --model
   lm|math|code[|judge]` (spec.finetune_threads each, as many at a time as the cores hold,
   longest first), all with the pinned CPU kernels the demo uses;
2. the gates, through the package's code paths (in-process `mergeflow generate / score /
   likelihood / merge`, with config/config.yaml's generation settings and limits): GSM8K exact
   match (lm-eval replay) and MBPP pass@1 (sandboxed execution) of base, math, code and one
   task-arithmetic merge of lm+math+code (lambda 1.0, the demo's first merge); reference
   likelihood on gsm8k, mbpp and alpaca_eval of every model and the merge's skill retention
   (mergeflow.aggregate.retention); the judge's balanced accuracy (with --judge).

Gates, as tests/test_demo_e2e.py defines them (thresholds mirrored below, named by test):
  math_gsm8k      math >= base + 0.15 on GSM8K           (test_demo_experts_beat_the_base_on_their_own_tasks)
  code_mbpp       code >= base + 0.5 on MBPP             (same test)
  own_skills      code < math on GSM8K, math < code on MBPP (same test)
  lm_alpaca*      lm's alpaca_eval reference NLL below the base's: a PROXY for the test's judged
                  win rate (lm >= base + 25 points), which needs the judge server
  retention       TA(lm+math+code) keeps >= 0.4 of each skill's likelihood gain on gsm8k, mbpp,
                  alpaca_eval (test_demo_three_expert_merges_keep_a_measurable_share_of_every_skill)
  merge_gsm8k*    skill_kept(TA merge, base, math) on GSM8K exact match: the test applies it to the
                  M3 merge of lm+math (test_demo_m3_merge_keeps_the_math_skill...): indicative
  judge           balanced accuracy >= 0.65 on requests from 12 held-out GSM8K rows
                  (test_demo_judge_tells_right_from_wrong_gsm8k_answers_above_chance), with --judge

Output: one JSON line per variant (--json) and a Markdown table (stdout, and --markdown).
Example (16 cores): python benchmarks/zoo_budget.py --jobs 8 --variants benchmarks/zoo_variants.jsonl --judge
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mergeflow.demo.cli import override_spec  # noqa: E402  (light: no torch)
from mergeflow.demo.models import FULL, SMALL  # noqa: E402
from mergeflow.errors import MergeflowError  # noqa: E402

# tests/test_demo_e2e.py's thresholds (see the module docstring for which test holds each)
MATH_GSM8K_MARGIN = 0.15
CODE_MBPP_MARGIN = 0.5
RETENTION_MIN = 0.4
SKILL_SHARE = 1 / 3
JUDGE_MIN = 0.65
JUDGE_ROWS = 12
EVAL_BENCHES = ("gsm8k", "mbpp")
LIKELIHOOD_BENCHES = ("gsm8k", "mbpp", "alpaca_eval")
MERGE = {"method": "task_arithmetic", "experts": ("lm", "math", "code"), "params": {"lambda": 1.0}}
GATES = ("math_gsm8k", "code_mbpp", "own_skills", "lm_alpaca*", "retention", "merge_gsm8k*", "judge")


def parse_variant(text: str) -> dict:
    """'name=x,pretrain_steps=200,lr_finetune=0.1' -> a dict (values parsed as JSON where they can be)."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MergeflowError(f"--variant {text!r}: {item!r} is not key=value")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value.strip()
    return out


def load_variants(path: Path | None, given: list[str]) -> list[dict]:
    variants = []
    if path is not None:
        try:
            lines = path.read_text().splitlines()
        except OSError as err:
            raise MergeflowError(f"--variants {path}: {err.strerror}") from None
        for n, line in enumerate(lines, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                try:
                    v = json.loads(line)
                except ValueError as err:
                    raise MergeflowError(f"--variants {path}:{n}: not JSON ({err})") from None
                if not isinstance(v, dict):
                    raise MergeflowError(f"--variants {path}:{n}: a JSON object per line, got {line.strip()!r}")
                variants.append(v)
    variants += [parse_variant(t) for t in given]
    return variants


def resolve(variants: list[dict], small: bool) -> list[tuple[str, dict, object]]:
    """(name, overrides, spec) per variant; bad fields fail here, before any training."""
    out, names = [], set()
    for i, v in enumerate(variants):
        v = dict(v)
        name = str(v.pop("name", f"v{i}"))
        if name in names or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise MergeflowError(f"variant name {name!r}: duplicate or not a plain file name")
        names.add(name)
        spec = override_spec(SMALL if small else FULL, json.dumps(v), f"variant {name}")
        out.append((name, v, spec))
    return out


# ----------------------------------------------------------------------------- one variant
def _pinned_env(threads: int) -> dict:
    from mergeflow.demo import cpu

    return {**os.environ, **cpu.PINNED_ENV, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)}


def _spawn(argv: list[str], log: Path, threads: int) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        return subprocess.Popen([sys.executable, "-m", "mergeflow", *argv], stdout=fh, stderr=subprocess.STDOUT,
                                env=_pinned_env(threads), cwd=ROOT)


def _wait(proc: subprocess.Popen, started: float, log: Path) -> dict:
    _, status, usage = os.wait4(proc.pid, 0)  # the child's own CPU time, whatever else runs
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(proc.args[3:6])} failed (exit {proc.returncode}); log {log}:\n"
                           + log.read_text()[-2000:])
    return {"wall_s": round(time.monotonic() - started, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2)}


def train_zoo(out: Path, spec, overrides: dict, small: bool, cores: int, judge: bool, seed: int) -> dict:
    """The demo's training steps, timed: base, then the fine-tunes side by side on `cores`."""
    zoo, logs = out / "zoo", out / "logs"
    t0 = time.monotonic()
    argv = ["demo", "--out", str(zoo), "--seed", str(seed), "--model", "base", "--spec-json", json.dumps(overrides)]
    if small:
        argv.insert(1, "--small")
    steps = {"base": _wait(_spawn(argv, logs / "base.log", spec.threads), t0, logs / "base.log")}
    names = ["lm", "math", "code"] + (["judge"] if judge else [])
    # longest first (the judge's 512-token batches, math's two families): the shortest makespan
    cost = {"judge": spec.judge_steps * spec.judge_max_length, "math": 2 * spec.finetune_steps * spec.max_length,
            "lm": spec.finetune_steps * spec.max_length, "code": spec.finetune_steps * spec.max_length}
    queue = sorted(names, key=lambda n: -cost[n])
    slots = max(1, cores // spec.finetune_threads)
    running: dict[int, tuple[str, subprocess.Popen, float]] = {}
    t1 = time.monotonic()
    while queue or running:
        while queue and len(running) < slots:
            name = queue.pop(0)
            proc = _spawn(["demo", "--out", str(zoo), "--seed", str(seed), "--model", name],
                          logs / f"{name}.log", spec.finetune_threads)
            running[proc.pid] = (name, proc, time.monotonic())
        pid, status, usage = os.wait4(-1, 0)  # whichever fine-tune finishes first
        if pid not in running:
            continue
        name, proc, started = running.pop(pid)
        if os.waitstatus_to_exitcode(status) != 0:
            for _, other, _ in running.values():
                other.kill()
            raise RuntimeError(f"demo --model {name} failed; log {logs / (name + '.log')}:\n"
                               + (logs / f"{name}.log").read_text()[-2000:])
        proc.returncode = 0
        steps[name] = {"wall_s": round(time.monotonic() - started, 2),
                       "cpu_s": round(usage.ru_utime + usage.ru_stime, 2)}
    return {"steps": steps, "finetune_wall_s": round(time.monotonic() - t1, 2),
            "zoo_wall_s": round(time.monotonic() - t0, 2),
            "zoo_cpu_s": round(sum(s["cpu_s"] for s in steps.values()), 2)}


def train_zoo_in_process(out: Path, spec, judge: bool, seed: int) -> dict:
    """The same steps in this process, one after another: no start-up cost, no side by side
    (a quick self-check; the budget numbers come from train_zoo)."""
    from mergeflow.demo import build

    zoo, steps = out / "zoo", {}
    t0 = time.monotonic()
    for name in ["base", "lm", "math", "code"] + (["judge"] if judge else []):
        w, c = time.monotonic(), time.process_time()
        build.build_base(zoo, seed, spec) if name == "base" else build.build_finetuned(zoo, name)
        steps[name] = {"wall_s": round(time.monotonic() - w, 2), "cpu_s": round(time.process_time() - c, 2)}
    return {"steps": steps, "finetune_wall_s": round(sum(v["wall_s"] for k, v in steps.items() if k != "base"), 2),
            "zoo_wall_s": round(time.monotonic() - t0, 2),
            "zoo_cpu_s": round(sum(s["cpu_s"] for s in steps.values()), 2), "in_process": True}


def _mf(*argv: str) -> None:
    from mergeflow.cli import main

    rc = main([str(a) for a in argv])
    if rc != 0:
        raise RuntimeError(f"mergeflow {' '.join(map(str, argv[:3]))} ... exited {rc}")


def _headline(path: Path, bench: str) -> float:
    from mergeflow.aggregate.tables import HEADLINE_METRICS

    rows = {r["metric"]: r["value"] for r in json.loads(path.read_text())["rows"]}
    metric = next(m for m in HEADLINE_METRICS[bench] if m in rows)
    return float(rows[metric])


def judge_accuracy(model_dir: Path, data: Path, seed: int) -> float:
    """tests/test_demo_e2e.py's judge check: balanced accuracy of the verdict tags."""
    from mergeflow.demo import judging

    rows = [json.loads(line) for line in data.read_text().splitlines()][:JUDGE_ROWS]
    return judging.balanced_accuracy(judging.judge_hits(model_dir, rows, seed))


def evaluate(out: Path, config: Path, judge: bool, seed: int) -> dict:
    """The gate metrics of the zoo in out/zoo, through mergeflow's own CLIs (in-process)."""
    import pandas as pd
    import yaml

    from mergeflow import config as mfconfig
    from mergeflow.aggregate.retention import retention_rows

    cfg = mfconfig.prepare(yaml.safe_load(config.read_text()))
    zoo, ev = out / "zoo", out / "eval"
    data = {b: zoo / "data" / f"{b}.jsonl" for b in LIKELIHOOD_BENCHES}
    settings = {b: mfconfig.canonical_json(mfconfig.generation_settings(cfg, b)) for b in LIKELIHOOD_BENCHES}
    score_settings = {"gsm8k": "{}", "mbpp": mfconfig.canonical_json(cfg["scoring"]["code"])}
    models = {m: zoo / "models" / m for m in ("base", "lm", "math", "code")}
    merged = ev / "merge"
    _mf("merge", "--method", MERGE["method"], "--base", models["base"],
        *[f"--expert={e}={models[e]}" for e in MERGE["experts"]], "--params", json.dumps(MERGE["params"]),
        "--vocab-policy", cfg["merge"]["vocab_policy"], "--device", "cpu", "--seed", cfg["seed"], "--out", merged)
    models["merge"] = merged
    scores, nll = {}, {}
    for name, path in models.items():
        gen = [a for b in EVAL_BENCHES for a in ("--task", b, data[b], settings[b], "-", ev / "gen" / name / f"{b}.jsonl")]
        if name != "lm":  # the gates read no exact match of the lm expert
            _mf("generate", "--model", path, *gen, "--no-progress")
            for b in EVAL_BENCHES:
                out_json = ev / "scores" / name / f"{b}.json"
                _mf("score", "--benchmark", b, "--data", data[b], "--generations", ev / "gen" / name / f"{b}.jsonl",
                    "--settings", score_settings[b], "--out", out_json)
                scores[(name, b)] = _headline(out_json, b)
        lik = ev / "scores" / name / "reference_likelihood.json"
        _mf("likelihood", "--model", path, *[a for b in LIKELIHOOD_BENCHES for a in ("--task", b, data[b], settings[b])],
            "--out", lik)
        for row in json.loads(lik.read_text())["rows"]:
            nll[(name, row["benchmark"])] = float(row["value"])
    frame = pd.DataFrame([{"model": m, "role": "merge" if m == "merge" else ("base" if m == "base" else "expert"),
                           "benchmark": b, "metric": "ref_nll", "value": v,
                           "experts": "+".join(MERGE["experts"]) if m == "merge" else m, "method": MERGE["method"]}
                          for (m, b), v in nll.items()])
    kept = {r["benchmark"]: float(r["value"]) for _, r in retention_rows(frame).iterrows()}
    metrics = {f"{m}_{b}": round(v, 4) for (m, b), v in scores.items()}
    metrics.update({f"nll_{m}_{b}": round(v, 4) for (m, b), v in nll.items()})
    metrics.update({f"retention_{b}": round(kept[b], 4) if b in kept else None for b in LIKELIHOOD_BENCHES})
    if judge:
        metrics["judge_balanced_accuracy"] = round(judge_accuracy(zoo / "models" / "judge", data["gsm8k"], seed), 4)
    return metrics


def gates(m: dict, judge: bool) -> dict[str, bool | None]:
    def skill_kept(merged, base, expert):  # tests/test_demo_e2e.py's skill_kept
        return expert > base and merged - base >= SKILL_SHARE * (expert - base)

    ret = [m.get(f"retention_{b}") for b in LIKELIHOOD_BENCHES]
    return {
        "math_gsm8k": m["math_gsm8k"] >= m["base_gsm8k"] + MATH_GSM8K_MARGIN,
        "code_mbpp": m["code_mbpp"] >= m["base_mbpp"] + CODE_MBPP_MARGIN,
        "own_skills": m["code_gsm8k"] < m["math_gsm8k"] and m["math_mbpp"] < m["code_mbpp"],
        "lm_alpaca*": m["nll_lm_alpaca_eval"] < m["nll_base_alpaca_eval"],
        "retention": all(r is not None and r >= RETENTION_MIN for r in ret),
        "merge_gsm8k*": skill_kept(m["merge_gsm8k"], m["base_gsm8k"], m["math_gsm8k"]),
        "judge": m["judge_balanced_accuracy"] >= JUDGE_MIN if judge else None,
    }


_CORES: list[int] = []


def _pin(slots) -> None:
    """Pool initializer: this worker takes one slot of CPUs for all its variants."""
    cores = slots.get()
    _CORES[:] = cores
    os.sched_setaffinity(0, cores)


def run_variant(name: str, overrides: dict, spec, small: bool, out: Path, cores: int, judge: bool, seed: int,
                config: Path, in_process: bool = False) -> dict:
    import torch

    torch.set_num_threads(cores)  # evaluation on the variant's own CPUs
    record = {"name": name, "overrides": overrides, "cpus": list(_CORES) or None, "cores": cores}
    try:
        if in_process:
            record.update(train_zoo_in_process(out / name, spec, judge, seed))
        else:
            record.update(train_zoo(out / name, spec, overrides, small, cores, judge, seed))
        t0, c0 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
        metrics = evaluate(out / name, config, judge, seed)
        c1 = resource.getrusage(resource.RUSAGE_SELF)
        record["eval_wall_s"] = round(time.monotonic() - t0, 2)
        record["eval_cpu_s"] = round(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime, 2)
        record["metrics"] = metrics
        record["gates"] = gates(metrics, judge)
        record["pass"] = all(v for v in record["gates"].values() if v is not None)
    except Exception as err:  # one variant's failure is its row, not the search's end
        record["error"] = f"{type(err).__name__}: {err}"[-3000:]
        record["pass"] = False
    return record


# ----------------------------------------------------------------------------- report
def markdown(records: list[dict]) -> str:
    steps = ["base", "lm", "math", "code", "judge"]
    head = (["variant", *[f"{s} s" for s in steps], "fine-tunes s", "zoo s", "zoo CPU s",
             "base/math GSM8K", "base/code MBPP", "TA GSM8K", "retention g/m/a", "judge", *GATES, "pass"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        if "error" in r and "metrics" not in r:
            lines.append(f"| {r['name']} | error: {r['error'].splitlines()[0][:120]} |")
            continue
        m, st = r["metrics"], r["steps"]
        cells = [r["name"], *[str(st[s]["wall_s"]) if s in st else "-" for s in steps], str(r["finetune_wall_s"]),
                 str(r["zoo_wall_s"]), str(r["zoo_cpu_s"]), f"{m['base_gsm8k']:.2f}/{m['math_gsm8k']:.2f}",
                 f"{m['base_mbpp']:.2f}/{m['code_mbpp']:.2f}", f"{m['merge_gsm8k']:.2f}",
                 "/".join("-" if m[f"retention_{b}"] is None else f"{m[f'retention_{b}']:.2f}" for b in LIKELIHOOD_BENCHES),
                 "-" if "judge_balanced_accuracy" not in m else f"{m['judge_balanced_accuracy']:.2f}",
                 *["-" if r["gates"][g] is None else ("ok" if r["gates"][g] else "FAIL") for g in GATES],
                 "yes" if r["pass"] else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n* proxy or indicative gate (see benchmarks/zoo_budget.py's docstring)\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", type=Path, help="JSON lines: one object of ZooSpec fields (+ optional name) each")
    p.add_argument("--variant", action="append", default=[], help="'name=x,key=value,...' (repeatable)")
    p.add_argument("--small", action="store_true",
                   help="variants of SMALL (self-check; default variants: SMALL and SMALL with 3 fine-tune steps)")
    p.add_argument("--jobs", type=int, default=1, help="variants at once")
    p.add_argument("--cores-per-job", type=int, default=2, help="CPUs per variant (the demo's box has 2)")
    p.add_argument("--judge", action="store_true", help="train and check the judge too")
    p.add_argument("--in-process", action="store_true",
                   help="train in each variant's worker, steps in series (no per-step start-up: a quick "
                        "self-check, not the demo's timing; default with --small)")
    p.add_argument("--seed", type=int, default=0, help="the zoo's seed (the demo's: 0)")
    p.add_argument("--config", type=Path, default=ROOT / "config" / "config.yaml", help="generation settings from")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "zoo_budget", help="work directory")
    p.add_argument("--json", type=Path, help="write one JSON line per variant here")
    p.add_argument("--markdown", type=Path, help="write the table here too")
    args = p.parse_args(argv)
    try:
        if args.jobs < 1 or args.cores_per_job < 1:
            raise MergeflowError(f"--jobs and --cores-per-job must be >= 1, got {args.jobs}, {args.cores_per_job}")
        raw = load_variants(args.variants, args.variant)
        if not raw and args.small:
            raw = [{"name": "small"}, {"name": "small_ft3", "finetune_steps": 3}]
        if not raw:
            raise MergeflowError("no variants: give --variants FILE, --variant 'key=value,...' or --small")
        variants = resolve(raw, args.small)
        cpus = sorted(os.sched_getaffinity(0))
        jobs = min(args.jobs, len(variants))
        if jobs * args.cores_per_job > len(cpus):
            raise MergeflowError(f"--jobs {jobs} x --cores-per-job {args.cores_per_job} needs "
                                 f"{jobs * args.cores_per_job} CPUs, this process has {len(cpus)}")
    except MergeflowError as err:
        print(f"zoo_budget: error: {err}", file=sys.stderr)
        return 2
    import multiprocessing as mp

    from mergeflow.demo import cpu

    in_process = args.in_process or args.small
    if in_process:  # the workers train: pinned kernels from their start, as `mergeflow demo` has them
        os.environ.update(cpu.PINNED_ENV)
    ctx = mp.get_context("spawn")  # no fork after torch: each worker starts clean
    slots = ctx.Manager().Queue()
    for i in range(jobs):
        slots.put(cpus[i * args.cores_per_job:(i + 1) * args.cores_per_job])
    args.out.mkdir(parents=True, exist_ok=True)
    started, records = time.monotonic(), []
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_pin, initargs=(slots,)) as pool:
        futures = [pool.submit(run_variant, name, ov, spec, args.small, args.out.resolve(), args.cores_per_job, args.judge,
                               args.seed, args.config.resolve(), in_process) for name, ov, spec in variants]
        for fut in as_completed(futures):  # noqa: B007
            rec = fut.result()
            records.append(rec)
            print(f"{rec['name']}: zoo {rec.get('zoo_wall_s')} s, pass {rec['pass']}"
                  + (f" ({rec['error'].splitlines()[0]})" if "error" in rec else ""), file=sys.stderr, flush=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                with open(args.json, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
    order = [name for name, _, _ in variants]
    records.sort(key=lambda r: order.index(r["name"]))
    table = markdown(records)
    print(table + f"\n{len(records)} variants in {time.monotonic() - started:.0f} s wall, {jobs} at a time")
    if args.markdown:
        args.markdown.write_text(table)
    return 0 if all("error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
