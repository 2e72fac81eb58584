"""The tidy scores table: one row per model x benchmark x metric.

It knows only the score files (`results/scores/{model}/{benchmark}.json`), the merge
metadata written next to each merge, and the config (for roles and parameters).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from mergeflow import config as mfconfig
from mergeflow.aggregate import uncertainty
from mergeflow.aggregate.retention import retention_rows
from mergeflow.aggregate.tables import mark_headline
from mergeflow.errors import MergeflowError
from mergeflow.provenance import TRACKED, versions

COLUMNS = [
    "model", "role", "merge_id", "config_id", "method", "family", "dare", "m3", "experts", "benchmark", "metric",
    "value", "stderr", "n", *uncertainty.CI_COLUMNS, "headline", "scorer", "judge", "protocol", "seed", "random",
    "params",
    "model_revision", "data_revision",
]
VERSION_COLUMNS = [f"version_{name}" for name in TRACKED.values()]


def row_benchmark(path: Path, payload: dict, row: dict) -> str:
    """The benchmark a score row is about: a file may score several (reference_likelihood.json)
    and rows name theirs; the file name tells evaluations of one benchmark apart (gsm8k.json:
    lm-eval, gsm8k_judge.json: the LLM judge of the same generations)."""
    evaluation = Path(path).stem
    return row.get("benchmark") or (evaluation if evaluation.startswith(payload["benchmark"]) else payload["benchmark"])


def read_score_file(path: Path, settings: dict | None = None) -> list[dict]:
    """The rows of one score file, each with its confidence interval (`settings`: the
    config's `aggregate` slice, for ci_level and bootstrap)."""
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise MergeflowError(f"score file {path} is unreadable: {err}") from err
    for key in ("benchmark", "rows"):
        if key not in payload:
            raise MergeflowError(f"score file {path} lacks '{key}'")
    model = Path(path).parent.name
    samples = uncertainty.read_samples(Path(path))
    details = payload.get("details") or {}
    judge = details.get("judge")
    judge_name = None
    if isinstance(judge, dict):
        annotator, judge_model = judge.get("annotator"), judge.get("model")
        judge_name = f"{annotator} ({judge_model})" if annotator and judge_model else (annotator or judge_model)
    elif judge:
        judge_name = str(judge)
    # Versions the scoring job recorded; the aggregate's own environment where it did not.
    recorded = details.get("versions") or {}
    fallback = versions()
    stamp = {f"version_{k}": recorded.get(k, fallback.get(k)) for k in TRACKED.values()}
    rows = []
    for row in payload["rows"]:
        bench = row_benchmark(path, payload, row)
        docs, why = uncertainty.per_doc(payload, {**row, "benchmark": bench}, samples)
        rows.append(
            {
                "model": model,
                "benchmark": bench,
                "metric": row["metric"],
                "value": row["value"],
                "stderr": row.get("stderr"),
                "n": row.get("n"),
                **uncertainty.interval(row, docs, why, settings or {}),
                "scorer": payload.get("scorer"),
                "judge": judge_name,
                **stamp,
            }
        )
    return rows


def read_merge_metadata(path: Path) -> dict:
    path = Path(path)
    meta_path = path / "mergeflow_merge.json" if path.is_dir() else path
    try:
        return json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise MergeflowError(f"merge metadata {meta_path} is unreadable: {err}") from err


def merge_family(method: str, params: dict) -> dict:
    """How the papers label a merge: the combiner, and whether DARE / M3 were applied."""
    combine = params.get("combine", "task_arithmetic") if method in ("m3", "dare") else method
    return {
        "family": combine,
        "dare": method == "dare" or "dare" in params,
        "m3": method == "m3",
    }


def model_revision(model: str, specs: dict, metadata: dict, pinned: dict) -> str | None:
    """The Hub revision a model came from: its pinned revision (base, experts), or for a merge
    `label=commit` of each input that had one, from what `mergeflow fetch` recorded in the model
    directory (the merge metadata's inputs)."""
    if model not in specs:
        return pinned.get(model)
    inputs = (metadata.get(model) or {}).get("inputs") or {}
    named = {"base": inputs.get("base"), **(inputs.get("experts") or {})}
    revs = [f"{label}={entry['revision']}" for label, entry in named.items() if entry and entry.get("revision")]
    return ";".join(revs) or None


def data_revision(benchmark: str, pinned: dict) -> str | None:
    """The pinned revision of the benchmark's data (gsm8k_judge scores gsm8k's data)."""
    names = [name for name in pinned if benchmark == name or benchmark.startswith(f"{name}_")]
    return pinned[max(names, key=len)] if names else None


def tidy_table(score_files: list[Path], merge_dirs: list[Path], config: dict) -> pd.DataFrame:
    specs = mfconfig.merge_specs(config)
    metadata = {Path(p).name.removesuffix(".json"): read_merge_metadata(p) for p in merge_dirs}
    revisions = config.get("revisions") or {}
    randoms: dict[str, bool] = {}
    rows = []
    for path in score_files:
        for row in read_score_file(Path(path), config.get("aggregate") or {}):
            model = row["model"]
            if model in specs:
                spec = specs[model]
                meta = metadata.get(model, {})
                row.update(
                    role="merge",
                    merge_id=model,
                    config_id=spec.config_id,  # shared by the seed replicates of one configuration
                    method=spec.method,
                    experts="+".join(spec.experts),
                    seed=spec.seed,
                    random=randoms.setdefault(model, spec.random),  # false: the seed changes nothing
                    params=mfconfig.canonical_json(spec.params),
                )
                row.update(merge_family(spec.method, spec.params))
                for key, value in spec.params.items():
                    row[f"param_{key}"] = value if not isinstance(value, (dict, list)) else json.dumps(value)
                if "mixup_ratio" in meta or "lambda_m" in meta:
                    row["lambda_m"] = json.dumps(meta.get("mixup_ratio", meta.get("lambda_m")))
            else:
                row.update(
                    role="base" if model == config["base_model"] else "expert",
                    merge_id=None,
                    config_id=None,
                    method=None,
                    experts=None,
                    seed=None,
                    random=None,
                    params=None,
                    family=None,
                    dare=None,
                    m3=None,
                )
            row["protocol"] = config["protocol"].get("name")
            row["model_revision"] = model_revision(model, specs, metadata, revisions.get("models") or {})
            row["data_revision"] = data_revision(row["benchmark"], revisions.get("benchmarks") or {})
            rows.append(row)
    if not rows:
        raise MergeflowError("no score rows found: nothing to aggregate")
    frame = pd.DataFrame(rows)
    for col in frame.columns:
        # a parameter can be bool in one merge and a string in another (rescale: true | l1):
        # one type per column keeps CSV and Parquet readers honest
        kinds = {type(v) for v in frame[col].dropna()}
        if len(kinds) > 1 and not kinds <= {int, float}:
            frame[col] = frame[col].map(lambda v: v if v is None or (isinstance(v, float) and pd.isna(v)) else str(v))
    kept = retention_rows(frame)
    if not kept.empty:
        frame = pd.concat([frame, kept], ignore_index=True)
    frame = mark_headline(frame, config.get("aggregate", {}).get("headline"))
    extra = sorted(c for c in frame.columns if c not in COLUMNS + VERSION_COLUMNS)
    return frame[COLUMNS + extra + VERSION_COLUMNS]
