"""Skill retention: the share of its best expert's likelihood gain that a merge keeps.

For a merge m and a benchmark b with reference likelihoods (metric `ref_nll`, mean negative
log-likelihood per reference token): (nll_base - nll_m) / (nll_base - min over m's experts
of nll_expert). 1 keeps the best expert's whole gain over the base, 0 is no better than the
base, below 0 is worse. Undefined where none of m's experts improves on the base (e.g. MBPP
for a merge of lm + math): no row, rather than a number that would look like a result.
"""

from __future__ import annotations

import math

import pandas as pd

METRIC = "skill_retention"
SOURCE = "ref_nll"


def retention_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """One `skill_retention` row per merge x benchmark that has reference likelihoods."""
    nll = frame[frame["metric"] == SOURCE]
    if nll.empty:
        return nll.iloc[0:0]
    value = {(m, b): float(v) for m, b, v in zip(nll["model"], nll["benchmark"], nll["value"])}
    base = {b: float(v) for r, b, v in zip(nll["role"], nll["benchmark"], nll["value"]) if r == "base"}
    rows = []
    for _, row in nll[nll["role"] == "merge"].iterrows():
        bench = row["benchmark"]
        experts = [value.get((e, bench)) for e in str(row["experts"]).split("+")]
        experts = [v for v in experts if v is not None and math.isfinite(v)]
        if bench not in base or not experts or not base[bench] > min(experts):
            continue
        kept = (base[bench] - float(row["value"])) / (base[bench] - min(experts))
        rows.append({**row.to_dict(), "metric": METRIC, "value": kept, "stderr": None,
                     "scorer": "mergeflow.aggregate (from ref_nll)",
                     # a ratio of three models' likelihoods: their per-doc intervals do not carry over
                     **{c: None for c in ("ci_low", "ci_high", "ci_method", "ci_resamples", "ci_seed")},
                     "ci_note": "derived from three models' ref_nll: no interval"})
    return pd.DataFrame(rows, columns=frame.columns)


def retention_table(frame: pd.DataFrame, cells: bool = False) -> pd.DataFrame:
    """Merges x benchmarks: skill retention in percent; seed replicates pooled into one row
    (model: the config id), the mean or with `cells` `mean ± std (n=k)`."""
    from mergeflow.aggregate.tables import pooled_pivot

    kept = frame[frame["metric"] == METRIC]
    if kept.empty:
        return pd.DataFrame()
    kept = kept.assign(score=100.0 * pd.to_numeric(kept["value"], errors="coerce"),
                       label=kept["method"].astype(str) + " (" + kept["experts"].astype(str) + ")")
    return pooled_pivot(kept, "benchmark", cells).dropna(how="all", axis=0)
