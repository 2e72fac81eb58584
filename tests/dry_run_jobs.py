"""The jobs of Snakemake dry runs, many configs in one process (Snakemake's Python API).

    python tests/dry_run_jobs.py RUNS.json OUT.json

RUNS.json lists runs, each {"configfiles": [...], "config": {...}} (the latter as
--config would give it); OUT.json gets, per run, {job: {"rule", "command", "resources"}}
(a job is its rule and outputs; config file names read <configfile> in commands), or
{"error": last lines of the log} for a config the workflow refuses. One process keeps
Snakemake imported: a dry run of the demo then takes about a second. job_counts reads
the job stats table of a printed dry run (the session's shared ones: conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOB_HEAD = re.compile(r"^\s*(?:local)?(?:rule|checkpoint) (\w+):$")
FIELD = re.compile(r"^\s+(output|resources|wildcards): (.*)$")


def parse(log: str) -> dict[str, dict]:
    """Job blocks of a dry run printed with printshellcmds: rule, outputs, resources, command."""
    jobs, current = {}, None
    for line in log.splitlines():
        head = JOB_HEAD.match(line)
        if head:
            current = {"rule": head.group(1), "output": "", "wildcards": "", "resources": "", "command": ""}
            continue
        if current is None:
            continue
        field = FIELD.match(line)
        if field:
            current[field.group(1)] = field.group(2)
        elif line.startswith("Shell command: ") or line.strip() == "" or line.startswith("["):
            if line.startswith("Shell command: "):
                current["command"] = line.removeprefix("Shell command: ")
            if line.startswith("Shell command: ") or line.strip() == "":
                # tmpdir is the machine's, not the config's
                resources = re.sub(r"tmpdir=[^,]*, ?", "", current["resources"])
                key = f"{current['rule']} {current['output'] or current['wildcards']}".strip()
                jobs[key] = {"rule": current["rule"], "command": current["command"], "resources": resources}
                if line.startswith("Shell command: "):
                    current = None
    return jobs


def dry_run_env() -> dict[str, str]:
    """The environment of a Snakemake dry run or lint: the slurm executor plugin runs
    `scontrol show config` when Snakemake imports it, which waits ~10 s where SLURM is
    installed but no controller runs; an empty SLURM_CONF makes it fail at once (neither a
    dry run nor lint asks the controller)."""
    return {**os.environ, "SLURM_CONF": "/dev/null"}


def job_counts(output: str) -> dict[str, int]:
    """rule -> jobs, from the first `Job stats` table of a dry run's printed output."""
    table = re.search(r"job\s+count\n[-\s]+\n(.*?)\ntotal", output, re.S)
    assert table, output[-3000:]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\S+)\s+(\d+)$", table.group(1), re.M)}


def dry_run(api, configfiles: list[Path], overrides: dict) -> dict:
    from snakemake.settings.types import ConfigSettings, DAGSettings, ResourceSettings

    with tempfile.TemporaryFile("w+") as log:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)  # Snakemake's logger writes to the process's stderr
        try:
            workflow = api.workflow(resource_settings=ResourceSettings(cores=2),
                                    config_settings=ConfigSettings(configfiles=configfiles, config=overrides),
                                    snakefile=ROOT / "Snakefile", workdir=ROOT)
            workflow.dag(DAGSettings()).execute_workflow(executor="dryrun")
            error = None
        except Exception as err:  # noqa: BLE001 - reported per config
            error = f"{type(err).__name__}: {err}"
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        text = log.read()
    if error is not None:
        return {"error": error + "\n" + text[-3000:]}
    jobs = parse(text)
    for job in jobs.values():
        for path in configfiles:
            job["command"] = job["command"].replace(str(path), "<configfile>")
    return jobs


def main(argv: list[str]) -> int:
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import OutputSettings

    runs, out = json.loads(Path(argv[0]).read_text()), Path(argv[1])
    results = []
    for run in runs:
        with SnakemakeApi(OutputSettings(printshellcmds=True, dryrun=True)) as api:
            results.append(dry_run(api, [Path(f) for f in run["configfiles"]], run.get("config") or {}))
    out.write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
