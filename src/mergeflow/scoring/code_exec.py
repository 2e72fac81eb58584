"""pass@1 for code benchmarks (MBPP, HumanEval): execute each completion with its tests.

One greedy completion per task, as both papers: pass@1 = passed / n. The program to run
(completion + the benchmark's tests) is built by the benchmark module; execution happens
only inside `sandbox.Sandbox`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mergeflow.config import DEFAULTS
from mergeflow.errors import MergeflowError
from mergeflow.scoring import results
from mergeflow.scoring.sandbox import LIMIT_KEYS, Limits, detect_isolation

log = logging.getLogger(__name__)

# Settings understood here (all optional): sandbox limits, isolation, workers, interpreter.
SETTINGS_KEYS = (*LIMIT_KEYS, "isolation", "max_workers", "python")
_STDERR_IN_SAMPLES = 600  # characters of a failing program's stderr kept per sample


def score(
    pairs: list[tuple[dict, dict]],
    program: Callable[[dict, str], str],
    doc_id: Callable[[dict], str],
    settings: dict,
) -> tuple[list[dict], dict, list[dict]]:
    """(rows, details, samples) for (doc, generation) pairs."""
    limits = Limits.from_settings(settings)
    sandbox = detect_isolation(settings.get("isolation", "auto"), settings.get("python"), limits)
    workers = settings.get("max_workers", DEFAULTS["scoring"]["code"]["max_workers"])
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise MergeflowError(f"score setting 'max_workers' must be a positive integer, got {workers!r}")
    log.info("executing %d programs (isolation %s, %d workers)", len(pairs), sandbox.isolation, workers)
    programs = [program(doc, gen["completion"]) for doc, gen in pairs]
    runs = _run_with_progress(sandbox, programs, workers)
    passed = [1.0 if r.passed else 0.0 for r in runs]
    samples = [
        {
            "doc_id": doc_id(doc),
            "passed": r.passed,
            "status": r.status,
            "returncode": r.returncode,
            "duration": r.duration,
            "stderr": r.stderr[-_STDERR_IN_SAMPLES:],
        }
        for (doc, _gen), r in zip(pairs, runs)
    ]
    statuses = {s: sum(r.status == s for r in runs) for s in ("passed", "failed", "timeout")}
    rows = [results.row("pass@1", passed)]
    details = {"isolation": sandbox.isolation, "sandbox": sandbox.describe(), "statuses": statuses}
    return rows, details, samples


def _run_with_progress(sandbox, programs: list[str], workers: int):
    from tqdm import tqdm

    with tqdm(total=len(programs), desc="execute", unit="prog", mininterval=1.0) as bar:
        return sandbox.run_many(programs, max_workers=workers, progress=lambda: bar.update(1))
