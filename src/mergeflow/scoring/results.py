"""Reading generation records and writing score files (formats of docs/architecture.md)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

from mergeflow import atomic
from mergeflow.errors import MergeflowError

GENERATION_FIELDS = ("doc_id", "prompt", "output", "completion")


def jsonl_objects(path: str | Path, what: str):
    """(line number, object) of each non-blank line of a JSONL file; a one-line error naming
    the file and line for a missing file, invalid JSON or a line that is not an object."""
    path = Path(path)
    if not path.is_file():
        raise MergeflowError(f"{what} not found: {path}")
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise MergeflowError(f"{path}:{lineno}: not valid JSON ({err})") from None
            if not isinstance(rec, dict):
                raise MergeflowError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, rec


def read_generations(path: str | Path) -> list[dict]:
    """Generation records (`doc_id`, `prompt`, `output`, `completion`), in file order."""
    path = Path(path)
    records, seen = [], {}
    for lineno, rec in jsonl_objects(path, "generations file"):
        missing = [k for k in GENERATION_FIELDS if k not in rec]
        if missing:
            raise MergeflowError(f"{path}:{lineno}: generation record lacks {missing}")
        for key in GENERATION_FIELDS:
            if not isinstance(rec[key], str):
                raise MergeflowError(f"{path}:{lineno}: field {key!r} must be a string")
        if rec["doc_id"] in seen:
            raise MergeflowError(
                f"{path}: lines {seen[rec['doc_id']]} and {lineno} both hold doc_id {rec['doc_id']!r}"
            )
        seen[rec["doc_id"]] = lineno
        records.append(rec)
    if not records:
        raise MergeflowError(f"generations file is empty: {path}")
    return records


def generation_setup(generations: list[dict]):
    """The generation set-up(s) recorded in generation records (`setup`, generation/run.py):
    one set-up, a list of the distinct ones, or None for records written before it was recorded."""
    setups = []
    for rec in generations:
        setup = rec.get("setup")
        if setup is not None and setup not in setups:
            setups.append(setup)
    if not setups:
        return None
    return setups[0] if len(setups) == 1 else setups


def pair_with_docs(docs: list[dict], doc_ids: list[str], generations: list[dict], data_path) -> list[tuple[dict, dict]]:
    """(doc, generation) for every generation, in data-file order.

    The generations decide what is scored (generation applied `limit`); a generation
    whose doc is absent from the data file is an error naming it.
    """
    by_id = {rec["doc_id"]: rec for rec in generations}
    pairs = [(doc, by_id.pop(did)) for doc, did in zip(docs, doc_ids) if did in by_id]
    if by_id:
        some = ", ".join(repr(k) for k in list(by_id)[:5])
        raise MergeflowError(
            f"{len(by_id)} generation(s) have no document in {data_path} (doc_id {some}): "
            "were they generated from another data file?"
        )
    return pairs


def mean_stderr(values: list[float]) -> float | None:
    """Standard error of a mean (sample std / sqrt(n)), as lm-eval reports it."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


def row(metric: str, values: list[float] | None = None, *, value=None, stderr=None, n=None, **extra) -> dict:
    """A score row; from per-doc values (mean, its stderr, n) or given directly."""
    if values is not None:
        n = len(values)
        value = sum(values) / n if n else None
        stderr = mean_stderr(values)
    out = {"metric": metric, "value": _plain(value), "stderr": _plain(stderr), "n": n}
    out.update({k: _plain(v) for k, v in extra.items()})
    return out


def _plain(x):
    """numpy scalars and NaN to JSON-friendly values."""
    if x is None:
        return None
    if hasattr(x, "item"):
        x = x.item()
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    return x


def samples_path(out: str | Path) -> Path:
    out = Path(out)
    stem = out.name[: -len(".json")] if out.name.endswith(".json") else out.name
    return out.with_name(stem + ".samples.jsonl")


def write_score(out: str | Path, benchmark: str, scorer: str, rows: list[dict], details: dict,
                samples: Iterable[dict] | None = None, generations: list[dict] | None = None) -> Path:
    """Write the score JSON (and `<out>.samples.jsonl`), each atomically; with the scored
    `generations`, `details.generation` records the generation set-up that produced them."""
    out = Path(out)
    if not out.name.endswith(".json"):
        raise MergeflowError(f"--out must name a .json file, got {out}")
    if samples is not None:
        lines = (json.dumps(s, ensure_ascii=False, default=_plain) + "\n" for s in samples)
        atomic.write_text(samples_path(out), "".join(lines))
    from mergeflow.provenance import versions

    # the software that produced the number travels with it into scores.csv
    details = {**details, "versions": details.get("versions") or versions()}
    if generations is not None:
        details["generation"] = generation_setup(generations)
    score = {"benchmark": benchmark, "scorer": scorer, "rows": rows, "details": details}
    atomic.write_text(out, json.dumps(score, indent=2, ensure_ascii=False, default=_plain) + "\n")
    return out


def lm_eval_rows(task_results: dict, n: int) -> list[dict]:
    """Score rows from lm-eval's results of one task: each `metric,filter` with its stderr."""
    rows = []
    for key, value in task_results.items():
        if "," not in key or "_stderr," in key:
            continue
        metric, filter_name = key.split(",", 1)
        stderr = task_results.get(f"{metric}_stderr,{filter_name}")
        rows.append(row(key, value=value, stderr=stderr if isinstance(stderr, float) else None, n=n))
    return rows
