"""Our numbers next to the published ones, in the papers' layout (Markdown and LaTeX)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mergeflow.aggregate.tables import headline, table_benchmarks
from mergeflow.errors import MergeflowError

PUBLISHED_COLUMNS = ["paper", "experts", "method", "dare", "m3", "benchmark", "value", "source"]
KEY = ["experts_key", "family", "dare", "m3", "benchmark"]


def experts_key(experts: str) -> str:
    return "+".join(sorted(experts.split("+")))


def load_published(paths: list[Path]) -> pd.DataFrame:
    frames = []
    for path in paths:
        try:
            frame = pd.read_csv(path, dtype={"experts": str, "method": str, "benchmark": str, "source": str})
        except (OSError, pd.errors.ParserError) as err:
            raise MergeflowError(f"published figures {path} are unreadable: {err}") from err
        missing = set(PUBLISHED_COLUMNS) - set(frame.columns)
        if missing:
            raise MergeflowError(f"published figures {path} lack columns {sorted(missing)}")
        if frame["source"].isna().any():
            raise MergeflowError(f"published figures {path}: every value needs a source")
        frames.append(frame[PUBLISHED_COLUMNS])
    if not frames:
        return pd.DataFrame(columns=PUBLISHED_COLUMNS + ["experts_key", "family"])
    out = pd.concat(frames, ignore_index=True)
    out["experts_key"] = out["experts"].map(experts_key)
    out["family"] = out["method"]
    for col in ("dare", "m3"):
        out[col] = out[col].astype(str).str.lower().eq("true")
    return out


def comparison(frame: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    """One row per merge x benchmark: ours, published (if any), difference, source."""
    merges = frame[frame["role"] == "merge"]
    if merges.empty:
        return pd.DataFrame()
    ours = headline(merges)
    ours = ours.assign(experts_key=ours["experts"].map(experts_key))
    ours["dare"] = ours["dare"].astype(bool)
    ours["m3"] = ours["m3"].astype(bool)
    cols = ["model", "method", "family", "dare", "m3", "experts", "experts_key", "benchmark", "score"]
    merged = ours[cols].merge(
        published[KEY + ["value", "source", "paper"]].rename(columns={"value": "published"}), on=KEY, how="left"
    )
    merged["diff"] = merged["score"] - merged["published"]
    return merged


def _variant(row) -> str:
    parts = [row["family"]]
    if row["dare"]:
        parts.append("DARE")
    if row["m3"]:
        parts.append("M3")
    return " + ".join(parts)


def layout(comp: pd.DataFrame, experts: str) -> pd.DataFrame:
    """Rows: merge variants; columns: (benchmark, ours|published|diff)."""
    sub = comp[comp["experts_key"] == experts_key(experts)].copy()
    sub["variant"] = sub.apply(_variant, axis=1)
    sub = sub.drop_duplicates(["variant", "model", "benchmark"])
    wide = sub.pivot_table(index=["variant", "model"], columns="benchmark", values=["score", "published", "diff"], aggfunc="first")
    wide = wide.swaplevel(0, 1, axis=1)
    benches = table_benchmarks(sub["benchmark"])
    order = [(b, k) for b in benches for k in ("score", "published", "diff") if (b, k) in wide.columns]
    return wide[order]


def _fmt(value, bold=False, signed=False) -> str:
    if pd.isna(value):
        return "–"
    text = f"{value:+.1f}" if signed else f"{value:.1f}"
    return f"**{text}**" if bold else text


def _cells(table: pd.DataFrame, bold_fmt) -> tuple[list[str], list[list[str]]]:
    header = ["variant", "model"]
    for bench, kind in table.columns:
        header.append({"score": f"{bench} ours", "published": f"{bench} paper", "diff": f"{bench} Δ"}[kind])
    best = {col: table[col].max() for col in table.columns if col[1] == "score"}
    rows = []
    for (variant, model), values in table.iterrows():
        cells = [variant, model]
        for col in table.columns:
            value = values[col]
            is_best = col in best and not pd.isna(value) and value == best[col]
            text = _fmt(value, signed=col[1] == "diff")
            cells.append(bold_fmt(text) if is_best else text)
        rows.append(cells)
    return header, rows


def to_markdown(table: pd.DataFrame, title: str, sources: list[str]) -> str:
    header, rows = _cells(table, lambda t: f"**{t}**")
    lines = [f"# {title}", "", "Ours vs published (percent); Δ = ours − paper; best of ours per column in bold.", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if sources:
        lines += ["", "Sources:"] + [f"- {s}" for s in sources]
    return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#"), ("–", "--"), ("Δ", r"$\Delta$")):
        text = text.replace(a, b)
    return text


def to_latex(table: pd.DataFrame, caption: str) -> str:
    header, rows = _cells(table, lambda t: rf"\textbf{{{t}}}")
    spec = "ll" + "r" * (len(header) - 2)
    lines = [r"\begin{table}[t]", r"\centering", rf"\begin{{tabular}}{{{spec}}}", r"\toprule"]
    lines.append(" & ".join(_latex_escape(h) for h in header) + r" \\")
    lines.append(r"\midrule")
    for r in rows:
        lines.append(" & ".join(c if c.startswith(r"\textbf") else _latex_escape(c) for c in r) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{_latex_escape(caption)}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_comparisons(frame: pd.DataFrame, published: pd.DataFrame, out_dir: Path) -> list[Path]:
    if published.empty:  # nothing to compare with (the demo): no paper tables
        return []
    comp = comparison(frame, published)
    if comp.empty:
        return []
    out_dir = Path(out_dir)
    written = []
    for experts in sorted(set(comp["experts"])):
        table = layout(comp, experts)
        if table.empty:
            continue
        sub = comp[comp["experts_key"] == experts_key(experts)]
        sources = sorted(set(sub["source"].dropna()))
        stem = f"paper_{experts.replace('+', '_')}"
        title = f"{experts.replace('+', ' & ')}: ours vs published"
        md = out_dir / f"{stem}.md"
        md.write_text(to_markdown(table, title, sources))
        tex = out_dir / f"{stem}.tex"
        tex.write_text(to_latex(table, title))
        written += [md, tex]
    return written


def claims_table(frame: pd.DataFrame, claims_path: Path) -> pd.DataFrame:
    """DELLA's abstract-level claims (average gain over a baseline) next to ours."""
    claims = pd.read_csv(claims_path)
    merges = headline(frame[frame["role"] == "merge"])
    # average over the merging table: multi-expert merges only, all benchmarks
    multi = merges[merges["experts"].str.contains(r"\+", regex=True)]
    means = multi.groupby("method")["score"].mean()
    rows = []
    for _, claim in claims.iterrows():
        versus = ["ties", "dare_della"] if claim["versus"] == "pruning_baselines" else [claim["versus"]]
        ours = None
        if claim["method"] in means and all(v in means for v in versus):
            ours = means[claim["method"]] - sum(means[v] for v in versus) / len(versus)
        rows.append({"claim": claim["claim"], "ours": ours, "published": claim["value"], "source": claim["source"]})
    return pd.DataFrame(rows)
