"""Which merge scores differ significantly from the base and from their best expert.

For each merge x benchmark of the tables (headline metric), a paired test on the documents
both models scored (aggregate/uncertainty.py: exact McNemar for 0/1 outcomes, paired
bootstrap otherwise) against the base model, and against the merge's expert that scores
highest on that benchmark. A difference with p >= alpha is marked in the merge tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mergeflow.aggregate import uncertainty

NOT_VS_BASE, NOT_VS_EXPERT = "†", "‡"
FOOTNOTE = (f"{NOT_VS_BASE}: not significantly different from the base model, {NOT_VS_EXPERT}: not significantly "
            "different from the merge's best expert on that benchmark (paired over the documents both scored: exact "
            "McNemar for 0/1 outcomes, paired bootstrap otherwise; two-sided, p >= {alpha:g}). An unmarked cell "
            "differs significantly or could not be tested (no per-doc results): see comparisons.md.")
COLUMNS = ["model", "benchmark", "metric", "versus", "versus_role", "test", "diff", "p", "significant", "n_common",
           "note"]


@dataclass
class Tests:
    table: pd.DataFrame
    alpha: float
    marks: dict = field(default_factory=dict)  # (model, benchmark) -> "†", "‡", "†‡" or ""

    def write(self, out_dir: Path) -> list[Path]:
        md, csv = Path(out_dir) / "comparisons.md", Path(out_dir) / "comparisons.csv"
        self.table.to_csv(csv, index=False)
        # untested rows hold None: an object column, which pandas cannot round
        shown = self.table.assign(diff=pd.to_numeric(self.table["diff"]).round(2),
                                  p=pd.to_numeric(self.table["p"]).round(4))
        shown = shown.astype(object).where(shown.notna(), None)
        md.write_text(
            "# Paired comparisons: each merge vs the base and its best expert\n\n"
            f"Headline metric per benchmark; diff = merge − other (points, the table's unit); two-sided, significant "
            f"at p < {self.alpha:g}. Exact McNemar for 0/1 outcomes, paired bootstrap of the difference otherwise; "
            "only documents both models scored. `mergeflow compare` runs one such test.\n\n"
            + shown.to_markdown(index=False, missingval="–") + "\n"
        )
        return [md, csv]


def significance(frame: pd.DataFrame, per_doc: dict, settings: dict) -> Tests:
    """Paired tests of every merge's headline score against the base and its best expert."""
    from mergeflow.aggregate.tables import headline

    alpha = float(settings.get("alpha", uncertainty.DEFAULTS["alpha"]))
    top = headline(frame)
    score = {(m, b): s for m, b, s in zip(top["model"], top["benchmark"], top["score"])}
    bases = sorted(set(top.loc[top["role"] == "base", "model"]))
    rows, marks = [], {}
    for merge in top[top["role"] == "merge"].itertuples():
        bench, metric = merge.benchmark, merge.headline_metric
        experts = [e for e in str(merge.experts).split("+") if pd.notna(score.get((e, bench)))]
        best = max(experts, key=lambda e: score[(e, bench)]) if experts else None
        mark = ""
        for other, role, symbol in [(b, "base", NOT_VS_BASE) for b in bases] + (
                [(best, "best expert", NOT_VS_EXPERT)] if best else []):
            a, b = per_doc.get((merge.model, bench, metric)), per_doc.get((other, bench, metric))
            if a is None or b is None:
                res = {"test": None, "diff": None, "p": None, "n_common": None, "note": "no per-doc results"}
            else:
                res = uncertainty.compare(a, b, settings)
            significant = None if res["p"] is None else bool(res["p"] < alpha)
            if significant is False:
                mark += symbol
            rows.append({"model": merge.model, "benchmark": bench, "metric": metric, "versus": other,
                         "versus_role": role, **{k: res.get(k) for k in COLUMNS[5:] if k != "significant"},
                         "significant": significant})
        marks[(merge.model, bench)] = mark
    return Tests(pd.DataFrame(rows, columns=COLUMNS), alpha, marks)
