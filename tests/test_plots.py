"""The figures a reader uses (issue 18): checked on matplotlib's objects, not on pixels.

Error bars on every bar (the score's interval; ± sample std over seed replicates), the base
and each expert as labelled reference lines in each merge's panel, tick labels that do not
overlap, a figure as wide as its bars, pruning curves with ± std over seeds.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import LineCollection
from matplotlib.container import ErrorbarContainer

from mergeflow.aggregate import plots

BENCHES = ["alpaca_eval", "gsm8k", "math", "humaneval", "mbpp"]


def row(model, role, bench, value, low=None, high=None, method=None, experts=None, family=None, m3=False,
        config_id=None, **params):
    metric = "win_rate" if bench == "alpaca_eval" else "exact_match"
    return {"model": model, "role": role, "method": method, "family": family or method, "dare": False, "m3": m3,
            "experts": experts, "benchmark": bench, "metric": metric, "value": value,
            "ci_low": low, "ci_high": high, "config_id": config_id or (model if role == "merge" else None),
            "params": json.dumps(params) if role == "merge" else None,
            **{f"param_{k}": v for k, v in params.items()}}


def fractions(value):  # a fraction and its interval; alpaca_eval rows are in percent already
    return value, max(value - 0.1, 0.0), min(value + 0.1, 1.0)


@pytest.fixture()
def frame():
    rows = []
    refs = {"base": 0.1, "lm": 0.2, "math": 0.4, "code": 0.3}
    for model, score in refs.items():
        for bench in BENCHES:
            v = score * (100 if bench == "alpaca_eval" else 1)
            rows.append(row(model, "base" if model == "base" else "expert", bench, v, 0.8 * v, 1.2 * v))
    three = "lm+math+code"
    for bench in BENCHES:
        k = 100 if bench == "alpaca_eval" else 1
        rows.append(row("ta3", "merge", bench, 0.25 * k, 0.15 * k, 0.35 * k, "task_arithmetic", three, **{"lambda": 1.0}))
        rows.append(row("ties3", "merge", bench, 0.3 * k, 0.2 * k, 0.4 * k, "ties", three, density=0.5))
        for seed, v in zip((1, 2, 3), (0.2, 0.3, 0.7)):  # DARE: three seed replicates of one configuration
            rows.append(row(f"dare3-s{seed}", "merge", bench, v * k, None, None, "dare", three,
                            config_id="dare3", drop_rate=0.3))
    for bench in ("gsm8k", "math"):
        rows.append(row("ta2", "merge", bench, 0.3, 0.2, 0.4, "task_arithmetic", "lm+math", **{"lambda": 1.0}))
        rows.append(row("m32", "merge", bench, 0.35, 0.25, 0.45, "m3", "lm+math", family="task_arithmetic", m3=True))
    for drop, seed in itertools.product((0.1, 0.5), (1, 2, 3)):  # pruning curve of the math expert
        rows.append(row(f"della-math-{drop}-s{seed}", "merge", "gsm8k", 0.4 - drop / 2 + 0.01 * seed, None, None,
                        "della", "math", config_id=f"della-math-{drop}", drop_rate=drop))
    rows.append(row("ties-math", "merge", "gsm8k", 0.38, 0.3, 0.46, "ties", "math", density=0.7))
    return pd.DataFrame(rows)


def errorbars(ax) -> list[ErrorbarContainer]:
    return [c for c in ax.containers if isinstance(c, ErrorbarContainer)]


def segments(container) -> list[np.ndarray]:
    (cols,) = container.lines[2]
    return [s for s in cols.get_segments() if len(s) and np.isfinite(s).all()]


def reference_labels(ax) -> set[str]:
    return {c.get_label() for c in ax.collections if isinstance(c, LineCollection) and not c.get_label().startswith("_")}


def assert_ticks_apart(fig):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]
        assert len(boxes) >= 2
        for a, b in itertools.combinations(boxes, 2):
            assert not a.overlaps(b), (a, b)


def test_methods_bars_have_error_bars_and_reference_lines(frame):
    fig = plots.methods_figure(frame)
    by_title = {ax.get_title(): ax for ax in fig.axes}
    three = by_title["lm+math+code: merge methods"]
    # one bar series and one error-bar series per variant; an error bar on each of the 3 x 5 bars
    assert len(errorbars(three)) == 3 and sum(len(segments(c)) for c in errorbars(three)) == 15
    assert reference_labels(three) == {"base (base)", "lm (expert)", "math (expert)", "code (expert)"}
    pair = by_title["lm+math: merge methods"]
    assert reference_labels(pair) == {"base (base)", "lm (expert)", "math (expert)"}  # its own experts only
    # task arithmetic's gsm8k bar: 25 % with its interval [15, 35]; DARE's: mean 40 ± sample std 26.46
    spans = sorted(round(float(s[1][1] - s[0][1]), 2) for c in errorbars(three) for s in segments(c))
    assert 20.0 in spans  # 35 - 15
    assert round(2 * float(np.std([20, 30, 70], ddof=1)), 2) in spans
    # a reference segment per benchmark group, at the model's score
    base = next(c for c in three.collections if c.get_label() == "base (base)")
    assert sorted(round(float(s[0][1]), 6) for s in base.get_segments()) == sorted([10.0] * 5)
    assert_ticks_apart(fig)


def test_m3_panel_pairs_with_and_without(frame):
    fig = plots.m3_figure(frame)
    (ax,) = fig.axes
    assert len(errorbars(ax)) == 2 and sum(len(segments(c)) for c in errorbars(ax)) == 4
    assert reference_labels(ax) == {"base (base)", "lm (expert)", "math (expert)"}
    assert [t.get_text() for t in ax.get_xticklabels()] == ["gsm8k", "math"]
    assert ax.get_xlabel() and ax.get_ylabel() == "score (%)"
    assert_ticks_apart(fig)


def test_long_labels_and_many_bars_stay_readable(frame):
    long = frame[frame["benchmark"] == "gsm8k"].assign(benchmark="a_benchmark_with_a_long_name version 2")
    more = pd.concat([frame, long] + [frame[(frame["model"] == "ta3")].assign(model=f"x{i}", method=f"method_{i}")
                                      for i in range(6)], ignore_index=True)
    fig = plots.methods_figure(more)
    assert_ticks_apart(fig)
    narrow = plots.methods_figure(frame)
    assert fig.get_figwidth() > narrow.get_figwidth()  # sized to its bars


def test_pruning_curves_show_std_over_seeds(frame):
    fig = plots.pruning_figure(frame)
    (ax,) = fig.axes
    della = next(c for c in errorbars(ax) if "della" in c.get_label())
    assert "n=3 seeds" in della.get_label()
    # score 40 - 100 * drop / 2 + seed: at drop rate 0.1 the seeds score 36, 37, 38 (sample std 1.0), at 0.5: 16, 17, 18
    assert sorted(round(float(s[1][1] - s[0][1]), 6) for s in segments(della)) == [2.0, 2.0]
    x, y = della.lines[0].get_data()
    assert list(x) == [0.1, 0.5] and list(np.round(np.asarray(y, float), 6)) == [37.0, 17.0]
    ties = next(c for c in errorbars(ax) if c.get_label().startswith("ties"))
    assert "seeds" not in ties.get_label() and segments(ties) == []  # one seed: no bar
    lines = {line.get_label() for line in ax.get_lines()}
    assert {"base (base, gsm8k)", "math (expert, gsm8k)"} <= lines


def test_files_are_written(frame, tmp_path):
    made = plots.write_plots(frame, tmp_path)
    assert sorted(p.name for p in made) == ["m3.png", "methods.png", "pruning.png"]
