"""Time the demo end to end, with a per-rule breakdown.

    python benchmarks/demo_timing.py --run /tmp/demo-copy     # copy this checkout there, run the demo, report
    python benchmarks/demo_timing.py --log .snakemake/log/X.snakemake.log   # report on a finished run

The report (Markdown, and one JSON line with --json) gives the wall time of the run and, per
rule, the number of jobs and the sum and maximum of their durations, read from the job
start and "Finished job" lines of Snakemake's log (one-second resolution).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ [\d:]+ \d{4})\]$", re.M)


def per_rule(log_text: str) -> dict:
    """{"wall_s", "rules": {rule: {"jobs", "sum_s", "max_s"}}} from a Snakemake log."""
    stamps = list(STAMP.finditer(log_text))
    started, rule_of, rules = {}, {}, defaultdict(lambda: {"jobs": 0, "sum_s": 0.0, "max_s": 0.0})
    first = last = None
    for i, m in enumerate(stamps):
        t = datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y")
        first, last = first or t, t
        block = log_text[m.end(): stamps[i + 1].start() if i + 1 < len(stamps) else len(log_text)]
        head, job = re.search(r"^(?:local)?rule (\w+):", block, re.M), re.search(r"jobid: (\d+)", block)
        if head and job:
            started[job.group(1)], rule_of[job.group(1)] = t, head.group(1)
        for done in re.findall(r"Finished jobid: (\d+)|Finished job (\d+)\.", block):
            jid = done[0] or done[1]
            if jid in started:
                seconds = (t - started[jid]).total_seconds()
                r = rules[rule_of[jid]]
                r["jobs"] += 1
                r["sum_s"] += seconds
                r["max_s"] = max(r["max_s"], seconds)
    if first is None:
        raise SystemExit("no timestamps in the log: is it a Snakemake log?")
    return {"wall_s": (last - first).total_seconds(), "rules": dict(rules)}


def markdown(report: dict) -> str:
    lines = [f"wall {report['wall_s']:.0f} s", "", "| rule | jobs | sum of job times s | longest job s |", "|---|---|---|---|"]
    for rule, r in sorted(report["rules"].items(), key=lambda kv: -kv[1]["sum_s"]):
        lines.append(f"| {rule} | {r['jobs']} | {r['sum_s']:.0f} | {r['max_s']:.0f} |")
    return "\n".join(lines)


def run_demo(work: Path, cores: int) -> Path:
    """Copy the checkout's tracked files to `work`, run the demo there; its Snakemake log."""
    if work.exists():
        raise SystemExit(f"{work} exists: give a new directory")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        src = ROOT / name.decode()
        if src.is_file():
            (work / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, work / name.decode())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "snakemake", "--cores", str(cores)], cwd=work, env=env)
    print(f"snakemake exit {res.returncode} after {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return max((work / ".snakemake" / "log").glob("*.snakemake.log"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="a new directory: copy the checkout there and run the demo")
    src.add_argument("--log", type=Path, help="a finished run's .snakemake/log/*.snakemake.log")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--json", action="store_true", help="also print the report as one JSON line")
    args = p.parse_args()
    log = run_demo(args.run, args.cores) if args.run else args.log
    report = per_rule(log.read_text())
    print(markdown(report))
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
