"""config/published/della.csv against the cell-by-cell transcription of DELLA's Tables 1-7
(shared/reference/della_published.md, beside the repository): every transcribed cell is in
the file once, with the printed value, its source, and the flags the transcription asks for."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
TRANSCRIPTION = ROOT.parent / "shared" / "reference" / "della_published.md"
PUBLISHED = ROOT / "config" / "published" / "della.csv"
KEY = ["table", "experts", "row", "p", "benchmark"]

EXPERT = {"LM": "lm", "Math": "math", "Code": "code"}
BENCH = {"AlpacaEval": "alpaca_eval", "GSM8K": "gsm8k", "MBPP": "mbpp", "Avg": "avg", "Average": "avg"}
SECTION = re.compile(r"^## \d+\. Table (\d)\b")


def _experts(text):
    return "+".join(EXPERT[e.strip()] for e in text.replace("(single)", "").split("+"))


def _num(text):
    m = re.match(r"\s*(-?\d+(?:\.\d+)?)", text)
    return m.group(1) if m else None  # "/" (not evaluated) is no cell


def transcribed_cells(md: str) -> list[tuple]:
    """(table, experts, row, p, benchmark, printed) for every number of the Markdown tables."""
    tables, current = {}, None
    for line in md.splitlines():
        m = SECTION.match(line)
        if m:
            current = int(m.group(1))
            tables[current] = []
        elif line.startswith("## "):
            current = None
        elif current and line.startswith("|") and not line.startswith("|---"):
            tables[current].append([c.strip() for c in line.strip().strip("|").split("|")])
    out = []
    for table, (header, *body) in tables.items():
        for r in body:
            if table in (1, 4, 5):  # Experts | Method | AlpacaEval | GSM8K | MBPP | Avg
                row = "expert" if r[1] == "–" else r[1]
                out += [(table, _experts(r[0]), row, "", BENCH[h], _num(v)) for h, v in zip(header[2:], r[2:])
                        if _num(v) is not None]
            elif table == 2:  # Method | GSM8K | MBPP | Avg, on Math+Code
                out += [(table, "math+code", r[0], "", BENCH[h], _num(v)) for h, v in zip(header[1:], r[1:])]
            elif table == 3:  # Sparsity p | one column per method: expert and benchmark unstated
                out += [(table, "", h, r[0], "unstated", _num(v)) for h, v in zip(header[1:], r[1:])]
            elif table == 6:  # p | one column per pruning variant, WizardMath
                out += [(table, "math", h, r[0], "gsm8k", _num(v)) for h, v in zip(header[1:], r[1:])]
            elif table == 7:  # Experts | p list | "a / b / c / d / e" per benchmark
                ps = ["0.1", "0.3", "0.5", "0.7", "0.9"] if r[1] == "same" else [x.strip() for x in r[1].split("/")]
                for h, v in zip(header[2:], r[2:]):
                    if v != "/":
                        out += [(table, _experts(r[0]), "drop-rate search", p, BENCH[h], x.strip())
                                for p, x in zip(ps, v.split("/"))]
    return out


@pytest.fixture(scope="module")
def published():
    return pd.read_csv(PUBLISHED, dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def cells():
    if not TRANSCRIPTION.is_file():
        pytest.skip(f"the transcription {TRANSCRIPTION} is not beside the repository")
    return transcribed_cells(TRANSCRIPTION.read_text())


def test_every_transcribed_cell_is_published_once_with_its_printed_value(published, cells):
    assert {int(t) for t, *_ in cells} == {1, 2, 3, 4, 5, 6, 7}
    assert len(cells) == len(set(c[:5] for c in cells))  # the parser saw each cell once
    ours = published.assign(table=published["table"].astype(int))
    dupes = ours[ours.duplicated(KEY, keep=False)]
    assert dupes.empty, dupes[KEY].to_string()
    got = {tuple(r[k] for k in KEY): r["printed"] for _, r in ours.iterrows()}
    want = {c[:5]: c[5] for c in cells}
    assert set(want) - set(got) == set(), "cells missing from della.csv"
    assert set(got) - set(want) == set(), "cells in della.csv that the transcription lacks"
    wrong = {k: (got[k], v) for k, v in want.items() if float(got[k]) != float(v)}
    assert not wrong


def test_values_are_percent_and_fractions_are_converted_consistently(published):
    frac = published["table"].isin(["6", "7"])
    value, printed = published["value"].astype(float), published["printed"].astype(float)
    assert (value[frac] - 100 * printed[frac]).abs().max() < 1e-9
    assert (value[~frac] == printed[~frac]).all()
    assert published.loc[frac, "note"].str.contains("published as the fraction").all()


def test_sources_are_filled_and_the_flagged_cells_are_unverified(published):
    assert published["source"].str.match(r"arXiv 2406\.11617v1, Table [1-7]$").all()
    assert (published["source"].str[-1] == published["table"]).all()
    flagged = (published["table"] == "6") | (
        (published["table"] == "1") & (published["experts"] == "lm") & published["benchmark"].isin(["gsm8k", "mbpp"]))
    assert set(published.loc[flagged, "verified"]) == {"false"}
    assert set(published.loc[~flagged, "verified"]) == {"true"}
    assert published.loc[flagged, "note"].str.contains("check against the PDF").all()
    erratum = published[(published["table"] == "4") & (published["experts"] == "lm+math+code")
                        & (published["row"] == "TA") & (published["benchmark"] == "avg")]
    assert erratum["printed"].tolist() == ["40.1"] and "39.3" in erratum["note"].iloc[0]
