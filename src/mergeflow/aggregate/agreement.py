"""results/tables/judge_agreement.md: our judge against recorded judgments, from the files
`mergeflow judge agreement` writes (mergeflow/judge/agreement.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

COLUMNS = ["benchmark", "judge", "recorded judge", "n", "unparsed", "agreement", "Cohen's kappa"]


def agreement_table(paths: list[str | Path]) -> pd.DataFrame:
    """One row per agreement file."""
    rows = []
    for path in paths:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
        rows.append(dict(zip(COLUMNS, (result["source"], result["judge"]["name"], result["recorded"]["judge"],
                                       result["n"], result["n_unparsed"], result["agreement"],
                                       result["cohen_kappa"]))))
    return pd.DataFrame(rows, columns=COLUMNS)


def write_agreement_table(paths: list[str | Path], out_dir: str | Path) -> list[Path]:
    """The table (none without agreement files)."""
    if not paths:
        return []
    path = Path(out_dir) / "judge_agreement.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# Judge agreement: our judge vs recorded judgments\n\n"
        + agreement_table(paths).round(3).to_markdown(index=False)
        + "\n\nagreement: share of items given the same verdict; Cohen's kappa corrects it for chance "
        "(1: perfect, 0: chance level). Re-judgments that do not parse are left out of both.\n",
        encoding="utf-8",
    )
    return [path]
