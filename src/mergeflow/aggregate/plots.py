"""Figures from the tidy table: pruning curves, method comparison, M3 with/without.

Every bar carries an error bar: the score's confidence interval (scores.csv ci_low/ci_high)
for one model, ± the sample standard deviation when the bar pools several models (the seed
replicates of a configuration). Each merge panel draws the base and each of its experts as
labelled horizontal reference lines over every benchmark's group of bars. The figure width
follows the number of bars and the tick labels are wrapped to their group's width, so that
benchmark names do not overlap. Pruning curves plot the mean over seeds with ± std bars.
docs/aggregate.md shows how to read them.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters or CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from mergeflow.aggregate.tables import BENCHMARK_ORDER, headline  # noqa: E402

BAR_IN = 0.32  # inches per bar
GAP_IN = 0.5  # inches between benchmark groups
CHAR_IN = 0.075  # inches per character of an 8 pt tick label (DejaVu Sans, a little generous)
REF_STYLES = ["--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 1))]


def drop_rate_of(row) -> float | None:
    """The x axis of the pruning figures: DARE/DELLA drop rate, or 1 − TIES density."""
    drop = row.get("param_drop_rate")
    if drop is not None and not pd.isna(drop):
        return float(drop)
    density = row.get("param_density")
    if density is not None and not pd.isna(density):
        return 1.0 - float(density)
    return None


def bar_stats(group: pd.DataFrame) -> tuple[float, float, float, int]:
    """(height, error below, error above, models) of a bar over headline rows: one model, its
    score and interval (NaN errors where it has none); several (the seed replicates of a
    configuration, or a variant's grid points), their mean ± sample std."""
    scores = pd.to_numeric(group["score"], errors="coerce")
    if group["model"].nunique() <= 1:
        score = float(scores.iloc[0])
        low = pd.to_numeric(group["score_low"], errors="coerce").iloc[0] if "score_low" in group else math.nan
        high = pd.to_numeric(group["score_high"], errors="coerce").iloc[0] if "score_high" in group else math.nan
        return score, score - float(low), float(high) - score, 1
    mean, std = float(scores.mean()), float(scores.std(ddof=1))
    return mean, std, std, int(scores.notna().sum())


def _order(benches) -> list[str]:
    benches = list(dict.fromkeys(benches))
    return [b for b in BENCHMARK_ORDER if b in benches] + sorted(b for b in benches if b not in BENCHMARK_ORDER)


def group_width(n_bars: int, labels: list[str]) -> float:
    """Inches per benchmark group: its bars plus a gap, and at least its longest label word."""
    longest = max((len(w) for label in labels for w in str(label).split()), default=0)
    return max(n_bars * BAR_IN + GAP_IN, longest * CHAR_IN + 0.2)


def wrap(label: str, inches: float) -> str:
    """A tick label wrapped to the width of its group."""
    return textwrap.fill(str(label), width=max(6, int(inches / CHAR_IN)), break_long_words=False)


def reference_lines(ax, refs: pd.DataFrame, groups: list[str], half: float) -> None:
    """The base and each expert as horizontal lines across each benchmark group, one labelled
    LineCollection per model ("base (base)", "math (expert)")."""
    models = sorted(set(refs["model"]), key=lambda m: (refs.loc[refs["model"] == m, "role"].iloc[0] != "base", m))
    for model in models:
        mine = refs[refs["model"] == model]
        role = mine["role"].iloc[0]
        ys, xs = [], []
        for g, bench in enumerate(groups):
            score = pd.to_numeric(mine.loc[mine["benchmark"] == bench, "score"], errors="coerce").dropna()
            if not score.empty:
                ys.append(float(score.iloc[0]))
                xs.append(g)
        if not ys:
            continue
        key = int(mine["ref_index"].iloc[0]) if "ref_index" in mine else models.index(model)
        color = "black" if role == "base" else plt.get_cmap("Dark2")(key % 8)
        style = "--" if role == "base" else REF_STYLES[1 + (key // 8 + key) % (len(REF_STYLES) - 1)]
        ax.hlines(ys, [x - half for x in xs], [x + half for x in xs], colors=[color], linewidth=1.4,
                  linestyles=[style], label=f"{model} ({role})", zorder=3)


def grouped_bars(ax, rows: pd.DataFrame, series_col: str, refs: pd.DataFrame | None, title: str) -> int:
    """Bars of `rows` (headline rows): one group per benchmark, one bar per value of
    `series_col`, each with its error bar; the reference lines over them. Returns the bars."""
    groups = _order(rows["benchmark"])
    series = sorted(set(rows[series_col]))
    width = 0.8 / max(len(series), 1)
    bars = 0
    for i, name in enumerate(series):
        xs, ys, lows, highs = [], [], [], []
        for g, bench in enumerate(groups):
            group = rows[(rows[series_col] == name) & (rows["benchmark"] == bench)]
            if group.empty:
                continue
            y, low, high, _ = bar_stats(group)
            xs.append(g - 0.4 + width * (i + 0.5))
            ys.append(y)
            lows.append(low)
            highs.append(high)
        ax.bar(xs, ys, width * 0.95, label=name)
        ax.errorbar(xs, ys, yerr=[lows, highs], fmt="none", ecolor="black", elinewidth=0.8, capsize=2, zorder=4)
        bars += len(xs)
    if refs is not None and not refs.empty:
        reference_lines(ax, refs[refs["benchmark"].isin(groups)], groups, 0.45)
    inches = group_width(len(series), groups)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([wrap(g, inches) for g in groups], fontsize=8, rotation=0)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_xlabel("benchmark (headline metric)")
    ax.set_ylabel("score (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, title="error bars: interval (scores.csv ci_*);\nseveral models (seeds, grid): mean ± std", title_fontsize=7,
              loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return bars


def _figure(panels: int, groups: int, series: int, labels: list[str]):
    width = max(6.0, groups * group_width(series, labels) + 1.5)
    return plt.subplots(panels, 1, figsize=(width, 3.4 * panels), squeeze=False)


def _references(frame: pd.DataFrame) -> pd.DataFrame:
    refs = frame[frame["role"].isin(["base", "expert"])] if "role" in frame.columns else frame.iloc[0:0]
    if refs.empty:
        return refs
    order = {m: i for i, m in enumerate(sorted(set(refs["model"])))}  # one model, one colour and style everywhere
    return headline(refs).assign(ref_index=lambda t: t["model"].map(order))


def _refs_of(refs: pd.DataFrame, experts: str) -> pd.DataFrame:
    if refs.empty:
        return refs
    names = set(str(experts).split("+"))
    return refs[(refs["role"] == "base") | refs["model"].isin(names)]


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=120, bbox_inches="tight")  # tight: the legends sit beside the axes
    plt.close(fig)
    return out


def _curve_key(row) -> str:
    """The params of a pruning point other than its x (a λ grid gives one curve per λ)."""
    try:
        params = json.loads(row.get("params") or "{}")
    except (TypeError, json.JSONDecodeError):
        params = {}
    rest = {k: v for k, v in params.items() if k not in ("drop_rate", "density", "mask_rate")}
    return ", ".join(f"{k}={v}" for k, v in sorted(rest.items()))


def pruning_frame(frame: pd.DataFrame) -> pd.DataFrame:
    merges = frame[(frame["role"] == "merge") & ~frame["experts"].fillna("").str.contains(r"\+", regex=True)]
    if merges.empty:
        return merges
    top = headline(merges)
    top["drop_rate"] = top.apply(drop_rate_of, axis=1)
    return top.dropna(subset=["drop_rate"])


def pruning_points(top: pd.DataFrame) -> pd.DataFrame:
    """One point per curve (method, benchmark, other params) and drop rate: the mean over its
    seed replicates, their sample std (NaN for one seed) and n."""
    top = top.assign(curve=top.apply(_curve_key, axis=1) if "params" in top.columns else "")
    stats = (top.groupby(["experts", "method", "benchmark", "curve", "drop_rate"])["score"]
             .agg(mean="mean", std=lambda s: s.std(ddof=1) if len(s) > 1 else math.nan, n="count"))
    return stats.reset_index()


def pruning_figure(frame: pd.DataFrame):
    top = pruning_frame(frame)
    if top.empty:
        return None
    points = pruning_points(top)
    refs = _references(frame)
    experts = sorted(set(points["experts"]))
    fig, axes = plt.subplots(1, len(experts), figsize=(5.5 * len(experts), 3.6), squeeze=False)
    for ax, expert in zip(axes[0], experts):
        sub = points[points["experts"] == expert]
        for (method, bench, curve), group in sub.groupby(["method", "benchmark", "curve"]):
            group = group.sort_values("drop_rate")
            n = int(group["n"].max())
            label = f"{method} ({bench}{', ' + curve if curve else ''})" + (f", ± std, n={n} seeds" if n > 1 else "")
            ax.errorbar(group["drop_rate"], group["mean"], yerr=group["std"], marker="o", capsize=3, label=label)
        mine = _refs_of(refs, expert)
        for i, (model, bench) in enumerate(sorted(set(zip(mine["model"], mine["benchmark"])) if not mine.empty else [])):
            if bench not in set(sub["benchmark"]):
                continue
            row = mine[(mine["model"] == model) & (mine["benchmark"] == bench)].iloc[0]
            ax.axhline(float(row["score"]), color="black" if row["role"] == "base" else "gray",
                       linestyle=REF_STYLES[i % len(REF_STYLES)], linewidth=1.0, label=f"{model} ({row['role']}, {bench})")
        ax.set_title(f"{expert}: score vs drop rate", fontsize=9)
        ax.set_xlabel("drop rate (TIES: 1 − density)")
        ax.set_ylabel("score (%)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return fig


def plot_pruning(frame: pd.DataFrame, out: Path) -> Path | None:
    fig = pruning_figure(frame)
    return None if fig is None else _save(fig, out)


def _label(row) -> str:
    parts = [str(row["family"] or row["method"])]
    if row.get("dare"):
        parts.append("DARE")
    if row.get("m3"):
        parts.append("M3")
    return "+".join(parts)


def methods_figure(frame: pd.DataFrame):
    merges = frame[(frame["role"] == "merge") & frame["experts"].fillna("").str.contains(r"\+", regex=True)]
    if merges.empty:
        return None
    top = headline(merges)
    top["variant"] = top.apply(_label, axis=1) + " [" + top["method"] + "]"
    combos = sorted(set(top["experts"]))
    series = max(top[top["experts"] == c]["variant"].nunique() for c in combos)
    groups = max(top[top["experts"] == c]["benchmark"].nunique() for c in combos)
    fig, axes = _figure(len(combos), groups, series, list(set(top["benchmark"])))
    refs = _references(frame)
    for ax, combo in zip(axes[:, 0], combos):
        grouped_bars(ax, top[top["experts"] == combo], "variant", _refs_of(refs, combo), f"{combo}: merge methods")
    return fig


def plot_methods(frame: pd.DataFrame, out: Path) -> Path | None:
    fig = methods_figure(frame)
    return None if fig is None else _save(fig, out)


def m3_figure(frame: pd.DataFrame):
    merges = frame[frame["role"] == "merge"]
    if merges.empty or not merges["m3"].fillna(False).astype(bool).any():
        return None
    top = headline(merges)
    top["m3"] = top["m3"].fillna(False).astype(bool)
    top["base_variant"] = (top["experts"] + " " + top["family"]
                           + top["dare"].fillna(False).astype(bool).map({True: "+DARE", False: ""}))
    top["with"] = top["m3"].map({False: "without M3", True: "with M3"})
    # a panel per merge that has both variants, on the benchmarks both were scored on
    keep = top.groupby(["base_variant", "benchmark"])["m3"].transform("nunique") == 2
    top = top[keep]
    if top.empty:
        return None
    variants = sorted(set(top["base_variant"]))
    groups = max(top[top["base_variant"] == v]["benchmark"].nunique() for v in variants)
    fig, axes = _figure(len(variants), groups, 2, list(set(top["benchmark"])))
    refs = _references(frame)
    for ax, variant in zip(axes[:, 0], variants):
        sub = top[top["base_variant"] == variant]
        grouped_bars(ax, sub, "with", _refs_of(refs, sub["experts"].iloc[0]),
                     f"Mixup Model Merge: {variant} with vs without M3")
    return fig


def plot_m3(frame: pd.DataFrame, out: Path) -> Path | None:
    fig = m3_figure(frame)
    return None if fig is None else _save(fig, out)


def write_plots(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = [
        plot_pruning(frame, out_dir / "pruning.png"),
        plot_methods(frame, out_dir / "methods.png"),
        plot_m3(frame, out_dir / "m3.png"),
    ]
    return [p for p in made if p is not None]
