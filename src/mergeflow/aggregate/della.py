"""DELLA's Tables 1-7 (arXiv 2406.11617v1) in the paper's layout: ours / paper / Δ per cell.

The published cells come from a file in `config/published/della.csv`'s layout (one row per
cell: table, experts, row, p, benchmark, value in percent, printed, verified, note,
source); which of our merges stand behind a paper row is `ROWS` below: the merges' config
`tag` (one block per table in config/della.yaml), the method and the params that must
match. The paper searched p and λ and reports the grid's best: each of our cells is the
best over the matching merges, selected on the test set as the paper did (docs/della.md).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from mergeflow import config as mfconfig
from mergeflow.aggregate.compare import _latex_escape
from mergeflow.errors import MergeflowError

COLUMNS = ["paper", "table", "experts", "row", "p", "benchmark", "value", "printed", "verified", "note", "source"]
SOURCE = "arXiv 2406.11617v1"

# Our score behind each paper column: AlpacaEval 1's win rate, GSM8K as the judge scores it
# (the paper's GPT-4 judge; ours is the config's substitute), MBPP pass@1.
COLUMN_SCORE = {"alpaca_eval": ("alpaca_eval", "win_rate"), "gsm8k": ("gsm8k_judge", "judge_accuracy"),
                "mbpp": ("mbpp", "pass@1")}
COLUMN_TITLE = {"alpaca_eval": "AlpacaEval", "gsm8k": "GSM8K", "mbpp": "MBPP", "avg": "Avg"}
# Table 3 names neither expert nor benchmark: ours is the mean of each expert on its own task
# (the first of the DELLA experts' own tasks, mergeflow.config.OWN_TASKS: the one map).
OWN_TASK = {expert: tasks[0] for expert, tasks in mfconfig.OWN_TASKS.items()}

# (table, the paper's row) -> (config tags, our method, resolved params that must match)
ROWS: dict[tuple[int, str], tuple[set, str, dict]] = {
    (1, "TA"): ({"table1"}, "nodrop", {}),
    (1, "DARE"): ({"table1"}, "dare_della", {}),
    (1, "TIES"): ({"table1"}, "ties", {}),
    (1, "DELLA"): ({"table1"}, "della", {}),
    (2, "DELLA (w/o scaling)"): ({"table2"}, "della", {"lambda": 1.0, "rescale": "none"}),
    (2, "DELLA (w/ scaling)"): ({"table1"}, "della", {"lambda": 1.0, "rescale": "inverse"}),
    (3, "DARE w/o scaling"): ({"table3"}, "dare_della", {"rescale": "none"}),
    (3, "DARE w/ scaling"): ({"pruning"}, "dare_della", {"rescale": "inverse"}),
    (3, "DELLA w/o scaling"): ({"table3"}, "della", {"rescale": "none"}),
    (3, "DELLA w/ scaling"): ({"pruning"}, "della", {"rescale": "inverse"}),
    (4, "TA"): ({"table4"}, "nodrop_noelect", {}),
    (4, "DARE"): ({"table4"}, "dare_noelect", {}),
    (4, "TIES"): ({"table4"}, "ties_noelect", {}),
    (4, "DELLA"): ({"table4"}, "della_noelect", {}),
    (5, "DELLA p∝r"): ({"table1"}, "della", {}),
    (6, "DARE"): ({"pruning", "table6"}, "dare_della", {"lambda": 1.0, "rescale": "inverse"}),
    (6, "MAGPRUNE row"): ({"table6"}, "della", {}),
    (6, "MAGPRUNE layer"): ({"table6"}, "della_layer", {}),
    (6, "rand-rank row"): ({"table6"}, "della_randrank", {}),
    (6, "rand-rank layer"): ({"table6"}, "della_randrank_layer", {}),
    (7, "drop-rate search"): ({"table1"}, "della", {}),
}
# Rows of ours the paper does not have, shown under its rows (no paper cell, no Δ).
EXTRA_ROWS = {1: [("task arithmetic (plain sum; not the paper's TA)", {"table1"}, "task_arithmetic", {})]}

TITLES = {
    1: "Table 1: DELLA against the baselines, Drop-Elect-Fuse",
    2: "Table 2: effect of rescaling on a merge (Math + Code, λ = 1)",
    3: "Table 3: effect of rescaling on pruned single experts",
    4: "Table 4: DELLA against the baselines without Elect",
    5: "Table 5: DELLA against WANDA ranking (Drop-Elect-Fuse)",
    6: "Table 6: WizardMath-13B pruned alone, row-wise against layer-wise and random ranking",
    7: "Table 7: drop rate against task performance (DELLA)",
}
NOTES = {
    1: "TA, DARE, TIES and DELLA all elect signs and fuse disjointly; only the drop differs (docs/della.md).",
    2: "Best over p at λ = 1; 'w/ scaling' is Table 1's DELLA Math + Code at λ = 1.",
    3: "The paper does not say which expert or benchmark: ours is the mean of LM on AlpacaEval, Math on "
       "GSM8K and Code on MBPP at λ = 1.",
    5: "WANDA rows are not run (WANDA needs calibration activations); the DELLA rows are Table 1's.",
    6: "GSM8K of WizardMath-13B alone at λ = 1 (the paper's metric is presumed GSM8K; its fractions are shown in "
       "percent). The published layout is a reading of a flattened grid: every paper cell is unverified.",
    7: "Table 1's DELLA merges; per p, the λ with the best average (the paper states neither method nor λ; its "
       "fractions are shown in percent).",
}


def is_della_layout(path: Path) -> bool:
    """Whether a published file is in della.csv's per-table layout (not the merge-label one)."""
    try:
        header = Path(path).open().readline()
    except OSError as err:
        raise MergeflowError(f"published figures {path} are unreadable: {err}") from err
    return "table" in header.strip().split(",")


def load(paths: list[Path]) -> pd.DataFrame:
    frames = []
    for path in paths:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        missing = set(COLUMNS) - set(frame.columns)
        if missing:
            raise MergeflowError(f"published figures {path} lack columns {sorted(missing)}")
        if (frame["source"].str.strip() == "").any():
            raise MergeflowError(f"published figures {path}: every value needs a source")
        frames.append(frame[COLUMNS])
    out = pd.concat(frames, ignore_index=True)
    out["table"] = out["table"].astype(int)
    out["value"] = out["value"].astype(float)
    return out


def _merges(config: dict) -> pd.DataFrame:
    """Every configured merge: id, tag, method, sorted experts, resolved params, drop rate."""
    from mergeflow.merging.methods import check_params

    rows = []
    for merge_id, spec in mfconfig.merge_specs(config).items():
        resolved = check_params(spec.method, spec.params, list(spec.experts), spec.seed)
        drop = resolved.get("drop_rate", 1 - resolved["density"] if "density" in resolved else 0.0)
        rows.append({"model": merge_id, "tag": spec.tag, "method": spec.method, "experts": "+".join(sorted(spec.experts)),
                     "params": resolved, "drop": drop, "lambda": resolved.get("lambda")})
    return pd.DataFrame(rows, columns=["model", "tag", "method", "experts", "params", "drop", "lambda"])


def _scores(frame: pd.DataFrame) -> dict[tuple[str, str], float]:
    """(model, paper column) -> our score in percent."""
    out = {}
    for column, (bench, metric) in COLUMN_SCORE.items():
        sub = frame[(frame["benchmark"] == bench) & (frame["metric"] == metric)]
        for model, value in zip(sub["model"], pd.to_numeric(sub["value"], errors="coerce")):
            if not pd.isna(value):
                out[(model, column)] = float(value) if "win" in metric else 100.0 * float(value)
    return out


def _select(merges: pd.DataFrame, tags: set, method: str, params: dict, experts: str | None = None,
            p: float | None = None) -> pd.DataFrame:
    sub = merges[merges["tag"].isin(tags) & (merges["method"] == method)]
    if experts is not None:
        sub = sub[sub["experts"] == "+".join(sorted(experts.split("+")))]
    if p is not None:
        sub = sub[(sub["drop"] - p).abs() < 1e-9]
    keep = [all(_same(got.get(k), v) for k, v in params.items()) for got in sub["params"]]
    return sub[keep] if len(sub) else sub


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) < 1e-9
    return a == b


def _best(models, column: str, scores: dict) -> float:
    values = [scores[(m, column)] for m in models if (m, column) in scores]
    return max(values) if values else math.nan


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values and not any(math.isnan(v) for v in values) else math.nan


def cells(frame: pd.DataFrame, config: dict, published: pd.DataFrame, table: int) -> pd.DataFrame:
    """One row per cell of the table: index labels, column, ours, paper, flags, merges tried."""
    merges = _merges(config)
    scores = _scores(frame)
    pub = published[published["table"] == table]
    out = []

    def add(index, column, ours, paper_row=None, tried=None, extra=None):
        out.append({"index": index, "column": column, "ours": ours,
                    "paper": paper_row["value"] if paper_row is not None else math.nan,
                    "verified": paper_row is None or paper_row["verified"] == "true",
                    "note": paper_row["note"] if paper_row is not None else "", "tried": tried, **(extra or {})})

    if table in (1, 2, 4, 5):
        groups = pub.groupby(["experts", "row"], sort=False)
        for (experts, row), group in groups:
            paper = {r["benchmark"]: r for _, r in group.iterrows()}
            columns = [c for c in paper if c != "avg"]
            if row == "expert":  # a single expert: its own score, no merge
                models = [experts]
            elif (table, row) in ROWS:
                tags, method, params = ROWS[(table, row)]
                models = list(_select(merges, tags, method, params, experts)["model"])
            else:  # a row we do not run (WANDA)
                models = []
            ours = {c: _best(models, c, scores) for c in columns}
            ours["avg"] = _mean(ours[c] for c in columns)
            label = (_experts_title(experts), "– (the expert)" if row == "expert" else row)
            for column in columns + ([] if row == "expert" else ["avg"]):
                add(label, column, ours[column], paper.get(column), len(models) if row != "expert" else None)
        for title, tags, method, params in EXTRA_ROWS.get(table, []):
            for experts in dict.fromkeys(pub.loc[pub["row"] != "expert", "experts"]):
                models = list(_select(merges, tags, method, params, experts)["model"])
                columns = [c for c in pub.loc[pub["experts"] == experts, "benchmark"].unique() if c != "avg"]
                ours = {c: _best(models, c, scores) for c in columns}
                for column in columns:
                    add((_experts_title(experts), title), column, ours[column], None, len(models))
                add((_experts_title(experts), title), "avg", _mean(ours.values()), None, len(models))
    elif table in (3, 6):
        for _, r in pub.iterrows():
            tags, method, params = ROWS[(table, r["row"])]
            p = float(r["p"])
            if table == 3:
                per_expert = [_best(_select(merges, tags, method, params, e, p)["model"], task, scores)
                              for e, task in OWN_TASK.items()]
                ours, tried = _mean(per_expert), None
            else:
                models = list(_select(merges, tags, method, params, r["experts"], p)["model"])
                ours, tried = _best(models, "gsm8k", scores), len(models)
            add((r["p"],), r["row"], ours, r, tried)
    elif table == 7:
        for (experts, p), group in pub.groupby(["experts", "p"], sort=False):
            paper = {r["benchmark"]: r for _, r in group.iterrows()}
            columns = [c for c in paper if c != "avg"]
            tags, method, params = ROWS[(7, "drop-rate search")]
            chosen, best_avg, lam = {}, -math.inf, math.nan
            for _, m in _select(merges, tags, method, params, experts, float(p)).iterrows():
                row_scores = {c: scores.get((m["model"], c), math.nan) for c in columns}
                avg = _mean(row_scores.values())
                if not math.isnan(avg) and avg > best_avg:
                    chosen, best_avg, lam = row_scores, avg, m["lambda"]
            for column in columns:
                add((_experts_title(experts), p), column, chosen.get(column, math.nan), paper[column], None, {"lambda": lam})
            add((_experts_title(experts), p), "avg", best_avg if chosen else math.nan, paper["avg"], None, {"lambda": lam})
    return pd.DataFrame(out)


def _experts_title(experts: str) -> str:
    return "+".join({"lm": "LM", "math": "Math", "code": "Code"}.get(e, e) for e in experts.split("+"))


INDEX = {1: ["experts", "method"], 2: ["experts", "method"], 4: ["experts", "method"], 5: ["experts", "method"],
         3: ["p"], 6: ["p"], 7: ["experts", "p"]}


def _fmt(value, signed=False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def grid(table: int, c: pd.DataFrame) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """Header, rows of text cells and which cells to bold (best of ours per column, within
    each merge for the tables grouped by experts)."""
    columns = list(dict.fromkeys(c["column"]))
    order = [*COLUMN_TITLE, *columns]  # the paper's column order; Tables 3 and 6: as published
    columns.sort(key=order.index)
    titles = [COLUMN_TITLE.get(col, col) for col in columns]
    header = list(INDEX[table])
    if table == 7:
        header.append("λ chosen")
    elif table not in (3, 6):
        header.append("merges tried")
    for t in titles:
        header += [f"{t} ours", f"{t} paper", f"{t} Δ"]
    index = list(dict.fromkeys(c["index"]))
    grouped = table in (1, 2, 4, 5, 7)
    best = {}
    for col in columns:
        sub = c[c["column"] == col]
        for key, part in (sub.groupby(sub["index"].map(lambda i: i[0])) if grouped else [(None, sub)]):
            vals = part["ours"].dropna()
            if len(vals):
                best[(key, col)] = vals.max()
    rows, bold = [], []
    for idx in index:
        sub = c[c["index"] == idx].set_index("column")
        cells_, marks = list(idx), [False] * len(idx)
        first = sub.iloc[0]
        if table == 7:
            cells_.append(_fmt(first.get("lambda")) if not pd.isna(first.get("lambda")) else "–")
            marks.append(False)
        elif table not in (3, 6):
            tried = first["tried"]
            cells_.append("–" if tried is None or pd.isna(tried) else str(int(tried)))
            marks.append(False)
        for col in columns:
            if col not in sub.index:  # "/" as the paper prints it: not evaluated
                cells_ += ["/", "/", "/"]
                marks += [False] * 3
                continue
            r = sub.loc[col]
            ours, paper = r["ours"], r["paper"]
            is_best = not pd.isna(ours) and best.get((idx[0] if grouped else None, col)) == ours
            paper_text = _fmt(paper) + ("†" if not r["verified"] and not pd.isna(paper) else "")
            cells_ += [_fmt(ours), paper_text, _fmt(ours - paper if not (pd.isna(ours) or pd.isna(paper)) else math.nan, True)]
            marks += [is_best, False, False]
        rows.append(cells_)
        bold.append(marks)
    return header, rows, bold


def _intro(table: int, c: pd.DataFrame) -> list[str]:
    lines = [
        "Ours against the paper (percent); Δ = ours − paper; best of ours per column"
        + (" within each merge" if table in (1, 2, 4, 5, 7) else "") + " in bold; – = not run or not scored.",
        "Each of our cells is the best over its config block's grid (p, λ), selected on the test set as the "
        "paper did; validation-selected scores are not available yet (no validation split is evaluated)."
        if table in (1, 2, 4, 5) else "Each of our cells is one configuration (its p, λ as stated): no selection.",
        "The paper's AlpacaEval and GSM8K cells were judged by GPT-4; ours by the config's substitute judge "
        "(the Judges line below). Our AlpacaEval is the win rate (AlpacaEval 1), our GSM8K the judge's "
        "accuracy (gsm8k_judge), MBPP pass@1.",
    ]
    if table in NOTES:
        lines.append(NOTES[table])
    if (~c["verified"]).any():
        lines.append("† unverified published cell: check it against the PDF (config/published/della.csv).")
    errata = sorted({n for n in c["note"] if "erratum" in n or "rounding" in n})
    lines += [f"Published cell note: {n}." for n in errata]
    return lines


def to_markdown(table: int, c: pd.DataFrame) -> str:
    header, rows, bold = grid(table, c)
    lines = [f"# {TITLES[table]}: ours vs published", ""] + _intro(table, c) + [""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for r, b in zip(rows, bold):
        lines.append("| " + " | ".join(f"**{t}**" if m else t for t, m in zip(r, b)) + " |")
    lines += ["", f"Source: {SOURCE}, Table {table} (transcription: config/published/della.csv)."]
    return "\n".join(lines) + "\n"


def to_latex(table: int, c: pd.DataFrame) -> str:
    header, rows, bold = grid(table, c)
    n_index = len(INDEX[table]) + (0 if table in (3, 6) else 1)
    spec = "l" * n_index + "r" * (len(header) - n_index)
    lines = [r"\begin{table}[t]", r"\centering", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(_latex_escape(h).replace("λ", r"$\lambda$") for h in header) + r" \\", r"\midrule"]
    for r, b in zip(rows, bold):
        texts = [_latex_escape(t).replace("†", r"$^\dagger$").replace("∝", r"$\propto$") for t in r]
        lines.append(" & ".join(rf"\textbf{{{t}}}" if m else t for t, m in zip(texts, b)) + r" \\")
    caption = (f"{TITLES[table]}: ours vs {SOURCE}."
               + (" Our cells: best of the grid, selected on test." if table in (1, 2, 4, 5) else "")
               + " The paper judged AlpacaEval and GSM8K with GPT-4, we with a substitute judge.")
    lines += [r"\bottomrule", r"\end{tabular}",
              rf"\caption{{{_latex_escape(caption).replace('λ', chr(36) + chr(92) + 'lambda' + chr(36))}}}",
              r"\end{table}"]
    return "\n".join(lines) + "\n"


def table1_claims(claims: pd.DataFrame, claims_path: Path, frame: pd.DataFrame, config: dict,
                  paths: list[Path]) -> pd.DataFrame:
    """`claims` (compare.claims_table's rows of `claims_path`, della_claims.csv) with ours
    from our Table 1 as the paper computed them: DELLA's Avg minus the baseline's, per
    merge, averaged over the four merges."""
    if not paths:
        return claims
    c = cells(frame, config, load(paths), 1)
    avg = {idx: v for idx, col, v in zip(c["index"], c["column"], c["ours"]) if col == "avg"}
    row_of = {method: row for (table, row), (_, method, _) in ROWS.items() if table == 1}

    def gain(versus: str) -> float:
        merges = sorted({experts for experts, row in avg if row == "DELLA"})
        return _mean(avg[(e, "DELLA")] - avg.get((e, row_of[versus]), math.nan) for e in merges)

    ours = []
    for versus in pd.read_csv(claims_path)["versus"]:
        parts = ["ties", "dare_della"] if versus == "pruning_baselines" else [versus]
        ours.append(_mean(gain(v) for v in parts) if all(v in row_of for v in parts) else math.nan)
    return claims.assign(ours=ours)


def write_della_tables(frame: pd.DataFrame, config: dict, paths: list[Path], out_dir: Path) -> list[Path]:
    """paper_della_table{1..7}.md / .tex for the tables the published files have."""
    if not paths:
        return []
    published = load(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for table in sorted(set(published["table"])):
        c = cells(frame, config, published, table)
        if c.empty:
            continue
        md, tex = out_dir / f"paper_della_table{table}.md", out_dir / f"paper_della_table{table}.tex"
        md.write_text(to_markdown(table, c))
        tex.write_text(to_latex(table, c))
        written += [md, tex]
    return written

