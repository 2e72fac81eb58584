"""Expert-normalised scores and forgetting of each merge (MergeBench's normalised performance).

Which benchmark is whose comes from one map, the config's `aggregate.own_tasks` (default
`mergeflow.config.OWN_TASKS`): model -> its own benchmarks; a benchmark `t_x` (gsm8k_judge)
belongs to whoever owns `t`. For a merge m with experts E and a benchmark b that m was scored on:

- some expert of E owns b: norm(m, b) = 100 · s_m(b) / s_e(b), e the best-scoring of E's experts
  that own b and have a score on b. Undefined (an em dash in the tables, with a footnote) when
  none of them has a score on b, when s_e(b) = 0 (no ratio), or when m has no score on b.
- no expert of E owns b (the base's task, from m's point of view): forgetting(m, b) =
  s_base(b) − s_m(b), in points (positive: m lost what the base could do). Undefined when the
  base or m has no score on b.
- `norm. avg` / `forg. avg`: the mean over m's benchmarks of that kind, undefined (em dash) as
  soon as one of them is, so that an average never silently skips a task. With
  `aggregate.normalised_average: expert` `norm. avg` is the mean over m's experts of the mean of
  each one's own benchmarks (MergeBench averages per task category, so that an expert with twelve
  benchmarks does not outweigh one with one).

Scores are the tables' headline scores in percent (mergeflow.aggregate.tables.headline).
"""

from __future__ import annotations

import math

import pandas as pd

NORM = "norm."
FORGET = "forg."
AVG = "avg"
DASH = "—"  # undefined: the footnote says why; "–" (en dash) stays "no score at all"
FOOTNOTE = (
    "`<benchmark> norm.`: the merge's score as a percentage of its expert's score on that expert's own task "
    "(aggregate.own_tasks; the best of the merge's experts that own it), MergeBench's normalised performance; "
    "`<benchmark> forg.`: forgetting on a task none of the merge's experts owns, the base's score minus the "
    "merge's, in points (positive: the merge lost what the base could do); `avg`: their mean over the merge's "
    "benchmarks of that kind. " + DASH + ": not defined, because the expert's score is 0 (no ratio) or a score "
    "it needs (the merge's, the expert's, the base's) is missing; an average with one undefined part is "
    "undefined. Seed replicates: mean ± std (n=k) of each seed's value."
)
EXPERT_FOOTNOTE = " `norm. avg` here: the mean over the merge's experts of each one's mean over its own benchmarks."


def owner_tasks(benchmark: str, tasks: list[str]) -> bool:
    """Whether a benchmark is one of `tasks` (gsm8k_judge is gsm8k's)."""
    return any(benchmark == t or benchmark.startswith(f"{t}_") for t in tasks)


def owners(benchmark: str, experts: list[str], own: dict[str, list[str]]) -> list[str]:
    """The merge's experts whose own tasks include the benchmark."""
    return [e for e in experts if owner_tasks(benchmark, own.get(e, []))]


def _finite(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def normalised(merge: float | None, references: list[float | None]) -> float | None:
    """100 · merge / the best reference; None where no reference, the best is 0, or no merge score."""
    refs = [r for r in map(_finite, references) if r is not None]
    merge = _finite(merge)
    if merge is None or not refs or max(refs) == 0:
        return None
    return 100.0 * merge / max(refs)


def forgetting(merge: float | None, base: float | None) -> float | None:
    """base − merge in points; None where either is missing."""
    merge, base = _finite(merge), _finite(base)
    return None if merge is None or base is None else base - merge


def _average(values: list[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def expert_average(norms: dict[str, float | None], owner: dict[str, str]) -> float | None:
    """The mean over owners of the mean of each owner's benchmarks (`owner`: benchmark -> owner)."""
    groups: dict[str, list[float | None]] = {}
    for bench, value in norms.items():
        groups.setdefault(owner[bench], []).append(value)
    return _average([_average(v) for v in groups.values()])


def derived_rows(top: pd.DataFrame, own: dict[str, list[str]], benchmarks: list[str] | None = None,
                 average: str = "benchmark") -> pd.DataFrame:
    """Per merge of `top` (headline rows, all roles): one row per derived column, a copy of one
    of the merge's rows with `benchmark` = the column (`gsm8k norm.`, `norm. avg`, `mbpp forg.`,
    `forg. avg`), `score` = the value (NaN where undefined) and `cell` its text (`—` where
    undefined). `benchmarks`: the ones to consider (default: all in `top`). `average`: `norm. avg`
    over benchmarks (`benchmark`), or per expert first (`expert`; aggregate.normalised_average)."""
    score = {(r.model, r.benchmark): r.score for r in top.itertuples()}
    base = {r.benchmark: r.score for r in top[top["role"] == "base"].itertuples()}
    rows = []
    merges = top[top["role"] == "merge"]
    for model, group in merges.groupby("model", sort=False):
        first = group.iloc[0]
        experts = str(first["experts"]).split("+")
        benches = [b for b in (benchmarks or list(dict.fromkeys(top["benchmark"]))) if b in set(group["benchmark"])]
        norms, forgets, owner = {}, {}, {}
        for bench in benches:
            mine = owners(bench, experts, own)
            if mine:
                norms[bench] = normalised(score.get((model, bench)), [score.get((e, bench)) for e in mine])
                owner[bench] = "+".join(mine)  # (two experts owning one benchmark: one group)
            else:
                forgets[bench] = forgetting(score.get((model, bench)), base.get(bench))
        columns = {**{f"{b} {NORM}": v for b, v in norms.items()}}
        if norms:
            columns[f"{NORM} {AVG}"] = (expert_average(norms, owner) if average == "expert"
                                        else _average(list(norms.values())))
        columns.update({f"{b} {FORGET}": v for b, v in forgets.items()})
        if forgets:
            columns[f"{FORGET} {AVG}"] = _average(list(forgets.values()))
        for column, value in columns.items():
            row = first.copy()
            row["benchmark"] = column
            row["score"] = float("nan") if value is None else value
            row["score_low"] = row["score_high"] = float("nan")
            row["cell"] = DASH if value is None else f"{value:.1f}"
            rows.append(row)
    return pd.DataFrame(rows, columns=list(top.columns) + (["cell"] if "cell" not in top.columns else []))


def column_order(columns: list[str], benchmarks: list[str]) -> list[str]:
    """Derived columns in the tables' order: each benchmark's norm., norm. avg, each forg., forg. avg."""
    wanted = ([f"{b} {NORM}" for b in benchmarks] + [f"{NORM} {AVG}"]
              + [f"{b} {FORGET}" for b in benchmarks] + [f"{FORGET} {AVG}"])
    return [c for c in wanted if c in columns]
