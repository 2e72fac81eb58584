"""Paper-style tables from the tidy scores table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mergeflow import benchmarks
from mergeflow.aggregate.retention import retention_table

# The number each paper reports per benchmark (declared by each benchmark, plus the GSM8K
# judge's); the first metric present is used.
HEADLINE_METRICS: dict[str, list[str]] = {
    **{name: list(benchmarks.get(name).headline) for name in benchmarks.NAMES},
    "gsm8k_judge": ["judge_accuracy"],
}
BENCHMARK_ORDER = ["alpaca_eval", "gsm8k", "gsm8k_judge", "math", "humaneval", "mbpp"]


def table_benchmarks(names) -> list[str]:
    """The evaluation benchmarks among `names`, in the tables' order: the DELLA / M3 papers'
    (BENCHMARK_ORDER), then the registry's (MergeBench's, okapi's); robustness rows have their own table."""
    present = set(names)
    return [b for b in dict.fromkeys([*BENCHMARK_ORDER, *benchmarks.NAMES]) if b in present]
ROLE_ORDER = {"base": 0, "expert": 1, "merge": 2}


def headline_metric(benchmark: str, metrics: set[str], overrides: dict | None = None) -> str | None:
    """The metric a paper reports for a benchmark: the config's choice, else the first known."""
    wanted = ([overrides[benchmark]] if overrides and benchmark in overrides else []) + HEADLINE_METRICS.get(benchmark, [])
    return next((m for m in wanted if m in metrics), None)


def mark_headline(frame: pd.DataFrame, overrides: dict | None = None) -> pd.DataFrame:
    """Add a boolean `headline` column: the one metric per model x benchmark the tables show."""
    chosen = {}
    for bench, group in frame.groupby("benchmark"):
        chosen[bench] = headline_metric(bench, set(group["metric"]), overrides) or group["metric"].iloc[0]
    return frame.assign(headline=frame["metric"] == frame["benchmark"].map(chosen))


def headline(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per model x benchmark: the headline metric, in percent (column `score`)."""
    if "headline" not in frame.columns:
        frame = mark_headline(frame)
    top = frame[frame["headline"].astype(bool)].drop_duplicates(["model", "benchmark"]).copy()
    # Win rates are already percentages (alpaca_eval's convention); the rest are fractions.
    values = pd.to_numeric(top["value"], errors="coerce")
    percent = top["metric"].str.contains("win")
    top["score"] = values.where(percent, 100.0 * values)
    for col in ("ci_low", "ci_high"):  # the interval in the score's unit
        bound = pd.to_numeric(top[col], errors="coerce") if col in top.columns else pd.Series(float("nan"), top.index)
        top[col.replace("ci_", "score_")] = bound.where(percent, 100.0 * bound)
    top["headline_metric"] = top["metric"]
    return top


def cell(score, low=None, high=None, mark: str = "") -> str | None:
    """A table cell: `41.7 [22.1, 63.4]` (the interval where there is one), then its mark."""
    if score is None or pd.isna(score):
        return None
    text = f"{score:.1f}"
    if low is not None and high is not None and not (pd.isna(low) or pd.isna(high)):
        text += f" [{low:.1f}, {high:.1f}]"
    return text + mark


def _cells(top: pd.DataFrame, marks: dict | None = None) -> pd.Series:
    marks = marks or {}
    return pd.Series([cell(r.score, r.score_low, r.score_high, marks.get((r.model, r.benchmark), ""))
                      for r in top.itertuples()], index=top.index, dtype=object)


def replicate_cell(values) -> str | None:
    """A pooled cell of seed replicates: `41.7 ± 2.1 (n=3)`, mean and sample std (ddof 1)."""
    values = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").dropna()
    if values.empty:
        return None
    if len(values) == 1:
        return f"{values.iloc[0]:.1f} (n=1)"
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f} (n={len(values)})"


def _replicated(top: pd.DataFrame) -> set:
    """config ids with more than one merge (seed replicates, merges[].seeds)."""
    if "config_id" not in top.columns:
        return set()
    merges = top[(top["role"] == "merge") & top["config_id"].notna()]
    counts = merges.groupby("config_id")["model"].nunique()
    return set(counts[counts > 1].index)


def pool_replicates(top: pd.DataFrame) -> pd.DataFrame:
    """Headline rows with the seed replicates of a configuration pooled into one row per
    benchmark: model = the config id, score = the mean, cell = mean ± std (n=k), no interval
    (the per-seed rows keep theirs in scores.csv). Single-seed rows are left as they are."""
    pooled = _replicated(top)
    if not pooled:
        return top
    mine = top["config_id"].isin(pooled) & (top["role"] == "merge")
    rows = []
    for (config_id, _bench), group in top[mine].groupby(["config_id", "benchmark"], sort=False):
        row = group.iloc[0].copy()
        row["model"] = config_id
        row["score"] = pd.to_numeric(group["score"], errors="coerce").mean()
        row["score_low"] = row["score_high"] = float("nan")
        row["cell"] = replicate_cell(group["score"])
        rows.append(row)
    return pd.concat([top[~mine], pd.DataFrame(rows)], ignore_index=True)


def pooled_pivot(rows: pd.DataFrame, column: str, cells: bool = False) -> pd.DataFrame:
    """(label, model) x `column` of `rows`' scores (percent) with the seed replicates of a
    configuration pooled into one row (model: its config id): the mean, or with `cells` the
    text `mean ± std (n=k)`, every cell then text (`.1f`). No replicates: the scores as they are."""
    pooled = _replicated(rows)
    if pooled:
        rows = rows.assign(cell=[None if pd.isna(v) else f"{v:.1f}" for v in rows["score"]])
        mine = rows["config_id"].isin(pooled) & (rows["role"] == "merge")
        out = []
        for (config_id, _column), group in rows[mine].groupby(["config_id", column], sort=False):
            row = group.iloc[0].copy()
            row["model"] = config_id
            row["score"] = group["score"].mean()
            row["cell"] = replicate_cell(group["score"])
            out.append(row)
        rows = pd.concat([rows[~mine], pd.DataFrame(out)], ignore_index=True)
    values = "cell" if cells and pooled else "score"
    return rows.pivot_table(index=["label", "model"], columns=column, values=values, aggfunc="first", dropna=False)


def _replicate_note(frame: pd.DataFrame) -> str:
    if not _replicated(frame):
        return ""
    return (" `x ± s (n=k)`: mean and sample standard deviation (ddof 1) over k seed replicates of one merge "
            "configuration (merges[].seeds; model: its config_id), without interval or marks; scores.csv keeps "
            "each seed's row.")


def _label(row) -> str:
    if row["role"] == "merge":
        return f"{row['method']} ({row['experts']})"
    return f"{row['model']} ({row['role']})"


def scores_table(frame: pd.DataFrame, cells: bool = False) -> pd.DataFrame:
    """Models (base, experts, merges) x benchmarks, headline metric in percent (`cells`: as
    text with its confidence interval)."""
    top = headline(frame)
    top["label"] = top.apply(_label, axis=1)
    top["order"] = top["role"].map(ROLE_ORDER)
    if cells:
        top["cell"] = _cells(top)
    top = pool_replicates(top)
    # dropna=False: a benchmark whose score is missing (e.g. no judgment parsed) stays visible
    table = top.pivot_table(
        index=["order", "label", "model"], columns="benchmark", values="cell" if cells else "score",
        aggfunc="first", dropna=False
    )
    table = table.dropna(how="all", axis=0).sort_index().reset_index(level="order", drop=True)
    for bench in set(top["benchmark"]) - set(table.columns):
        table[bench] = float("nan")
    cols = [b for b in BENCHMARK_ORDER if b in table.columns] + [c for c in table.columns if c not in BENCHMARK_ORDER]
    return table[cols]


def method_table(frame: pd.DataFrame, experts: str, cells: bool = False, marks: dict | None = None,
                 own_tasks: dict | None = None, average: str = "benchmark") -> pd.DataFrame:
    """The papers' layout for one expert combination: merge methods x benchmarks (`cells`: as
    text with the interval and `marks[(model, benchmark)]`); with `own_tasks` (model -> its
    own benchmarks), also the expert-normalised and forgetting columns (aggregate.normalised)."""
    from mergeflow.aggregate import normalised

    top = headline(frame[(frame["role"] == "merge") & (frame["experts"] == experts)])
    if cells:
        top["cell"] = _cells(top, marks)
    benches = table_benchmarks(top["benchmark"])
    derived = []
    if own_tasks is not None and not top.empty:
        refs = headline(frame[frame["role"].isin(["base", "expert"])])
        rows = normalised.derived_rows(pd.concat([refs, top], ignore_index=True), own_tasks, benches, average)
        if not rows.empty:
            derived = list(dict.fromkeys(rows["benchmark"]))
            top = pd.concat([top, rows[top.columns]], ignore_index=True)
    top = pool_replicates(top)
    table = top.pivot_table(index=["method", "model"], columns="benchmark", values="cell" if cells else "score",
                            aggfunc="first", dropna=False)
    table = table.dropna(how="all", axis=0)
    for bench in set(top["benchmark"]) - set(table.columns):
        table[bench] = float("nan")
    cols = [b for b in benches if b in table.columns] + normalised.column_order(derived, benches)
    table = table[cols]
    if cells:  # undefined derived values (and pooled seeds that are all undefined) read as an em dash
        for col in normalised.column_order(derived, benches):
            table[col] = table[col].where(table[col].notna(), normalised.DASH)
    return table


def judge_note(frame: pd.DataFrame, paper: dict | None) -> str | None:
    """"judged by X; the paper used Y" for each judged benchmark of the table (the paper's
    judges, retired, are recorded under judge.paper); None when nothing was judged."""
    paper = paper or {}
    judged = frame[frame["judge"].notna()] if "judge" in frame.columns else frame.iloc[0:0]
    parts = []
    for bench in sorted(set(judged["benchmark"]), key=lambda b: (b not in BENCHMARK_ORDER, b)):
        used = ", ".join(sorted(set(judged.loc[judged["benchmark"] == bench, "judge"].astype(str))))
        theirs = paper.get(bench)
        if not paper:  # no paper to compare with (the demo)
            parts.append(f"{bench} judged by {used}")
        else:
            parts.append(f"{bench} judged by {used}; "
                         + (f"the paper used {theirs}" if theirs else "the paper's judge is not recorded (judge.paper)"))
    return "Judges: " + ". ".join(parts) + "." if parts else None


def add_judge_note(paths: list[Path], note: str | None) -> None:
    """Append the judge note to every written table (a comment in LaTeX)."""
    if not note:
        return
    for path in paths:
        if path.suffix == ".md":
            path.write_text(path.read_text().rstrip("\n") + f"\n\n{note}\n")
        elif path.suffix == ".tex":
            path.write_text(path.read_text() + f"% {note}\n")


def to_markdown(table: pd.DataFrame, title: str, note: str) -> str:
    flat = table.reset_index()
    flat.columns = [str(c) for c in flat.columns]
    flat = flat.round(1).astype(object)
    flat = flat.where(flat.notna(), None)  # tabulate prints None as missingval, NaN as "nan"
    body = flat.to_markdown(index=False, floatfmt=".1f", missingval="–")
    return f"# {title}\n\n{note} – marks a score that could not be computed (see results/scores.csv).\n\n{body}\n"


def _ci_note(frame: pd.DataFrame) -> str:
    levels = sorted(set(pd.to_numeric(frame.get("ci_level", pd.Series(dtype=float)), errors="coerce").dropna()))
    level = f"{100 * levels[0]:g} %" if len(levels) == 1 else "per row"
    return (f"[low, high]: {level} confidence interval over documents (exact Clopper–Pearson for 0/1 outcomes, "
            "seeded percentile bootstrap otherwise; method, seed and, where there is none, the reason: "
            "columns ci_* of results/scores.csv).")


def write_tables(frame: pd.DataFrame, out_dir: Path, per_doc: dict | None = None,
                 settings: dict | None = None) -> list[Path]:
    """scores.md, merges_<experts>.md (with intervals; with `per_doc`, the score files'
    per-doc values, merge cells not significantly different from the base or their best
    expert are marked and comparisons.md/.csv list every test) and retention.md."""
    from mergeflow import config as mfconfig
    from mergeflow.aggregate import normalised
    from mergeflow.aggregate.significance import FOOTNOTE, significance

    own = mfconfig.own_tasks(settings)
    average = (settings or {}).get("normalised_average", "benchmark")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metric_note = "; ".join(
        f"{b}: {frame[frame.benchmark == b].pipe(headline)['headline_metric'].iloc[0]}"
        for b in table_benchmarks(frame["benchmark"])
    )
    written = []
    path = out_dir / "scores.md"
    path.write_text(
        to_markdown(
            scores_table(frame, cells=True),
            "Scores: base, experts and merges",
            f"Headline metric per benchmark, in percent ({metric_note}). {_ci_note(frame)}{_replicate_note(frame)} "
            "Source: results/scores.csv.",
        )
    )
    written.append(path)
    merges = frame[frame["role"] == "merge"]
    tests = significance(frame, per_doc or {}, settings or {}) if per_doc is not None else None
    marks = {} if tests is None else tests.marks
    for experts in sorted(set(merges["experts"].dropna())):
        path = out_dir / f"merges_{experts.replace('+', '_')}.md"
        table = method_table(frame, experts, cells=True, marks=marks, own_tasks=own, average=average)
        text = to_markdown(
            table,
            f"Merge methods on {experts.replace('+', ' + ')}",
            f"Rows: merge method and merge id; columns: headline metric in percent. {_ci_note(frame)}"
            + _replicate_note(frame[frame["experts"] == experts]),
        )
        if tests is not None:
            text += "\n" + FOOTNOTE.format(alpha=tests.alpha) + "\n"
        if any(str(c).endswith((normalised.NORM, normalised.FORGET, normalised.AVG)) for c in table.columns):
            text += "\n" + normalised.FOOTNOTE + (normalised.EXPERT_FOOTNOTE if average == "expert" else "") + "\n"
        path.write_text(text)
        written.append(path)
    if tests is not None and not tests.table.empty:
        written += tests.write(out_dir)
    kept = retention_table(frame, cells=True)
    if not kept.empty:
        path = out_dir / "retention.md"
        path.write_text(
            to_markdown(
                kept,
                "Skill retention of each merge (reference likelihood)",
                "Share of its best expert's gain over the base, in percent: (nll_base - nll_merge) / "
                "(nll_base - nll_best_expert), nll = mean negative log-likelihood per token of the "
                "benchmark's reference responses (metric ref_nll). 100 keeps the whole gain, 0 is the base."
                + _replicate_note(frame),
            )
        )
        written.append(path)
    return written


def _robustness_label(row) -> str:
    """The M3 paper's rows: the combiner, "+M3" when M3 was applied ("task_arithmetic
    (lm+math)" next to "task_arithmetic (lm+math) +M3")."""
    if row.get("m3") is True and isinstance(row.get("family"), str):
        return f"{row['family']} ({row['experts']}) +M3"
    return _label(row)


def robustness_table(frame: pd.DataFrame, cells: bool = False) -> pd.DataFrame:
    """M3's robustness layout: merges x (LiveBench score, PDR per attack), in percent. Seed
    replicates of one configuration are pooled into one row (model: its config id): the mean,
    or with `cells` the text `mean ± std (n=k)` (every cell then text, `.1f`)."""
    rob = frame[frame["benchmark"].str.startswith(("livebench_", "adv_"))]
    rob = rob[(rob["benchmark"].str.startswith("livebench_")) | rob["metric"].str.startswith("pdr,")]
    if rob.empty:
        return pd.DataFrame()
    rob = rob.assign(
        column=rob["benchmark"].where(rob["benchmark"].str.startswith("livebench_"), rob["benchmark"] + " " + rob["metric"]),
        score=100.0 * pd.to_numeric(rob["value"], errors="coerce"),
        label=rob.apply(_robustness_label, axis=1),
    )
    table = pooled_pivot(rob, "column", cells)
    # the paper's order: out-of-distribution scores first, then the PDRs
    table = table[sorted(table.columns, key=lambda c: (not c.startswith("livebench_"), c))]
    return table.dropna(how="all", axis=0)


def write_robustness(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    table = robustness_table(frame, cells=True)
    if table.empty:
        return []
    path = Path(out_dir) / "robustness.md"
    path.write_text(
        to_markdown(
            table,
            "Robustness (M3 layout): LiveBench OOD score and PromptBench performance drop rate",
            "LiveBench columns: mean question score (percent, higher is better); `adv_* pdr,<attack>`: "
            "performance drop rate under that attack (percent, lower is better)." + _replicate_note(frame),
        )
    )
    return [path]
