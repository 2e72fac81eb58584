"""Confidence intervals and paired tests over documents, from the per-doc results of score files.

Per-doc results: `<score>.samples.jsonl` beside each score file (scoring/results.py) or, for
reference likelihoods, the score file's `details.per_doc`. Each score row gets an interval:

- `clopper_pearson`: exact binomial, for metrics that are a share of 0/1 outcomes (exact_match,
  pass@1, judge accuracy, 0/1 LiveBench scores);
- `bootstrap`: percentile bootstrap over documents (seeded), for everything else that has per-doc
  values (win rates with ties, graded LiveBench scores, likelihoods as sum nll / sum tokens).

A row whose per-doc values are absent, or do not reproduce the reported value, gets no interval and
a `ci_note` saying why. Paired comparisons of two models on the documents both scored: exact
McNemar for 0/1 outcomes, paired bootstrap of the difference otherwise.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergeflow.config import DEFAULTS as CONFIG_DEFAULTS
from mergeflow.errors import MergeflowError

CI_COLUMNS = ["ci_low", "ci_high", "ci_level", "ci_method", "ci_resamples", "ci_seed", "ci_note"]
DEFAULTS = {k: CONFIG_DEFAULTS["aggregate"][k] for k in ("ci_level", "alpha", "bootstrap")}  # config.py owns them
# a per-doc reconstruction must match the reported value to this (relative) tolerance
_MATCH = 1e-6


# --------------------------------------------------------------------------- the statistics
def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper–Pearson) interval of a binomial proportion k/n, from beta quantiles."""
    from scipy.stats import beta

    if n <= 0 or not 0 <= k <= n:
        raise MergeflowError(f"clopper_pearson: need 0 <= k <= n and n > 0, got k={k}, n={n}")
    tail = (1.0 - level) / 2.0
    low = 0.0 if k == 0 else float(beta.ppf(tail, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1.0 - tail, k + 1, n - k))
    return low, high


def _statistic(values: np.ndarray) -> np.ndarray:
    """Mean of 1-d values; sum(col 0) / sum(col 1) of 2-d ones (a ratio estimator), along the last resample."""
    if values.ndim == 2:
        return values[..., 0].sum(axis=-1) / values[..., 1].sum(axis=-1)
    return values.mean(axis=-1)


def _resample_stats(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(resamples, len(values)))
    picked = values[idx]  # (resamples, n) or (resamples, n, 2)
    if values.ndim == 2:
        return picked[..., 0].sum(axis=1) / picked[..., 1].sum(axis=1)
    return picked.mean(axis=1)


def bootstrap_ci(values, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval over documents of the mean (1-d values) or of
    sum(col 0) / sum(col 1) (n x 2 values), with numpy's seeded default generator."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        raise MergeflowError(f"bootstrap_ci: need at least 2 documents, got {len(values)}")
    stats = _resample_stats(values, resamples, seed)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    return float(low), float(high)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: b, c = the discordant pairs (A right & B wrong, A wrong & B right)."""
    from scipy.stats import binom

    n = b + c
    if n == 0:
        return 1.0
    return float(min(1.0, 2.0 * binom.cdf(min(b, c), n, 0.5)))


def paired_bootstrap(a, b, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> dict:
    """Difference statistic(a) - statistic(b) over the same documents (rows aligned), its
    percentile interval and a two-sided p-value (twice the smaller share of resampled
    differences on either side of 0)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or len(a) < 2:
        raise MergeflowError(f"paired_bootstrap: need two aligned samples of >= 2 documents, got {a.shape} and {b.shape}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    diffs = _statistic(a[idx]) - _statistic(b[idx])
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(diffs, [tail, 1.0 - tail])
    p = min(1.0, 2.0 * min(float(np.mean(diffs <= 0)), float(np.mean(diffs >= 0))))
    return {"diff": float(_statistic(a) - _statistic(b)), "low": float(low), "high": float(high), "p": p}


# --------------------------------------------------------------------------- per-doc values
@dataclass
class PerDoc:
    """One metric's per-doc results: `values` by doc id (floats, or (nll, tokens) pairs), their
    `kind` (binary | mean | ratio) and `scale` (what the reported value is in: 1 or 100)."""

    values: dict
    kind: str
    scale: float = 1.0

    def estimate(self) -> float:
        return float(_statistic(np.asarray(list(self.values.values()), dtype=float))) * self.scale


def read_samples(score_path: Path) -> list[dict] | None:
    """The `<score>.samples.jsonl` beside a score file, or None where there is none."""
    from mergeflow.scoring.results import jsonl_objects, samples_path

    path = samples_path(score_path)
    if not path.is_file():
        return None
    return [rec for _, rec in jsonl_objects(path, "samples file")]


def _alpaca_value(preference, discrete: bool) -> float | None:
    """alpaca_eval's per-doc win (preference 1: reference wins, 2: model wins, 1.5 or 0: draw)."""
    if preference is None or (isinstance(preference, float) and math.isnan(preference)):
        return None
    p = 1.5 if float(preference) == 0.0 else float(preference)
    if discrete:
        return 1.0 if p > 1.5 else (0.5 if p == 1.5 else 0.0)
    return p - 1.0


def per_doc(payload: dict, row: dict, samples: list[dict] | None) -> tuple[PerDoc | None, str | None]:
    """(per-doc values of this score row, None) or (None, why there are none)."""
    scorer, metric = payload.get("scorer"), row["metric"]
    if scorer == "mergeflow.likelihood":
        docs = ((payload.get("details") or {}).get("per_doc") or {}).get(row.get("benchmark"))
        if not docs:
            return None, "no per-doc likelihoods in the score file"
        return PerDoc({d["doc_id"]: (d["nll"], d["tokens"]) for d in docs}, "ratio"), None
    if samples is None:
        return None, "no per-doc results (<score>.samples.jsonl) beside the score file"
    if scorer == "lm_eval" and "," in metric:
        name, filt = metric.split(",", 1)
        got = {s["doc_id"]: s["filters"][filt][name] for s in samples if name in (s.get("filters") or {}).get(filt, {})}
        if not got:
            return None, f"samples hold no {metric} per doc"
        if any(isinstance(v, list) for v in got.values()):  # a list per doc (IFEval's instructions): a ratio
            return PerDoc({d: (float(sum(v)), float(len(v))) for d, v in got.items()}, "ratio"), None
        return PerDoc({d: float(v) for d, v in got.items()}, "binary"), None
    if scorer == "execution" and metric == "pass@1":
        return PerDoc({s["doc_id"]: float(bool(s["passed"])) for s in samples}, "binary"), None
    if scorer == "llm_judge" and metric in ("judge_accuracy", "judge_accuracy_unparsed_as_wrong"):
        kept = [s for s in samples if metric.endswith("_as_wrong") or s["verdict"] in ("correct", "incorrect")]
        return PerDoc({s["doc_id"]: float(s["verdict"] == "correct") for s in kept}, "binary"), None
    if scorer == "alpaca_eval" and metric in ("win_rate", "discrete_win_rate"):
        vals = {s["doc_id"]: _alpaca_value(s.get("preference"), metric == "discrete_win_rate") for s in samples}
        vals = {k: v for k, v in vals.items() if v is not None}
        return PerDoc(vals, "mean", scale=100.0), None
    if scorer == "livebench" and metric == "score":
        vals = {s["doc_id"]: float(s["score"]) for s in samples}
        kind = "binary" if set(vals.values()) <= {0.0, 1.0} else "mean"
        return PerDoc(vals, kind), None
    return None, f"no per-doc values for {scorer} metric {metric}"


def interval(row: dict, docs: PerDoc | None, why: str | None, settings: dict) -> dict:
    """The CI columns of one score row."""
    level = float(settings.get("ci_level", DEFAULTS["ci_level"]))
    boot = {**DEFAULTS["bootstrap"], **(settings.get("bootstrap") or {})}
    out = dict.fromkeys(CI_COLUMNS)
    out["ci_level"] = level
    if docs is None:
        out["ci_note"] = why
        return out
    value = row.get("value")
    n = len(docs.values)
    if value is None or n == 0:
        out["ci_note"] = "no value or no documents"
        return out
    if not math.isclose(docs.estimate(), float(value), rel_tol=_MATCH, abs_tol=_MATCH * docs.scale):
        out["ci_note"] = f"per-doc values give {docs.estimate():.6g}, the row reports {float(value):.6g}: not used"
        return out
    if docs.kind == "binary":
        k = int(round(sum(docs.values.values())))
        low, high = clopper_pearson(k, n, level)
        out.update(ci_method="clopper_pearson", ci_note=f"k={k} of n={n}")
    elif n < 2:
        out["ci_note"] = "one document: no bootstrap"
        return out
    else:
        low, high = bootstrap_ci(list(docs.values.values()), level, int(boot["resamples"]), int(boot["seed"]))
        out.update(ci_method="bootstrap_percentile", ci_resamples=int(boot["resamples"]), ci_seed=int(boot["seed"]),
                   ci_note=f"n={n} documents")
    out["ci_low"], out["ci_high"] = low * docs.scale, high * docs.scale
    return out


def score_file_per_doc(path: Path) -> dict[tuple[str, str, str], PerDoc]:
    """(model, benchmark, metric) -> per-doc values, for every row of one score file that has them."""
    from mergeflow.aggregate.tidy import row_benchmark

    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise MergeflowError(f"score file {path} is unreadable: {err}") from err
    samples = read_samples(path)
    out = {}
    for row in payload.get("rows") or []:
        bench = row_benchmark(path, payload, row)
        docs, _ = per_doc(payload, {**row, "benchmark": bench}, samples)
        if docs is not None:
            out[(path.parent.name, bench, row["metric"])] = docs
    return out


# --------------------------------------------------------------------------- paired comparison
def compare(a: PerDoc, b: PerDoc, settings: dict | None = None) -> dict:
    """Model A vs model B on the documents both scored: difference (A - B, in the metric's
    unit), its test and two-sided p-value. Exact McNemar for 0/1 outcomes, paired bootstrap otherwise."""
    settings = settings or {}
    common = sorted(set(a.values) & set(b.values), key=str)
    out = {"n_common": len(common), "n_a": len(a.values), "n_b": len(b.values)}
    if len(common) < 2:
        return {**out, "test": None, "diff": None, "p": None, "note": "fewer than 2 documents scored by both"}
    va = np.array([a.values[d] for d in common], dtype=float)
    vb = np.array([b.values[d] for d in common], dtype=float)
    scale = a.scale
    if a.kind == b.kind == "binary":
        bb = int(np.sum((va == 1) & (vb == 0)))
        cc = int(np.sum((va == 0) & (vb == 1)))
        diff = float(va.mean() - vb.mean()) * scale
        return {**out, "test": "mcnemar_exact", "diff": diff, "a_only": bb, "b_only": cc, "p": mcnemar_exact(bb, cc),
                "note": f"discordant pairs: {bb} A only, {cc} B only"}
    boot = {**DEFAULTS["bootstrap"], **(settings.get("bootstrap") or {})}
    res = paired_bootstrap(va, vb, float(settings.get("ci_level", DEFAULTS["ci_level"])), int(boot["resamples"]),
                           int(boot["seed"]))
    return {**out, "test": "paired_bootstrap", "diff": res["diff"] * scale, "low": res["low"] * scale,
            "high": res["high"] * scale, "p": res["p"], "resamples": int(boot["resamples"]), "seed": int(boot["seed"]),
            "note": f"{int(boot['resamples'])} resamples, seed {int(boot['seed'])}"}
