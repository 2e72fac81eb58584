"""notebooks/results.ipynb runs top to bottom on a tidy table and redraws the figures."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_notebook_executes_and_draws(tmp_path, monkeypatch):
    rows = []
    for model, method, experts, drop, value in [
        ("a", "della", "math", 0.1, 0.5), ("b", "della", "math", 0.5, 0.3),
        ("c", "ties", "lm+math", None, 0.2), ("d", "m3", "lm+math", None, 0.25),
    ]:
        rows.append({"model": model, "role": "merge", "method": method, "family": "ties" if method == "m3" else method,
                     "dare": False, "m3": method == "m3", "experts": experts, "benchmark": "gsm8k",
                     "metric": "exact_match,strict-match", "value": value, "param_drop_rate": drop})
    rows.append({"model": "base", "role": "base", "benchmark": "gsm8k", "metric": "exact_match,strict-match", "value": 0.1})
    scores = tmp_path / "scores.csv"
    pd.DataFrame(rows).to_csv(scores, index=False)
    monkeypatch.setenv("MERGEFLOW_SCORES", str(scores))
    monkeypatch.setenv("MERGEFLOW_PLOTS", str(tmp_path / "figs"))
    nb = nbformat.read(ROOT / "notebooks" / "results.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 3
    assert sorted(p.name for p in (tmp_path / "figs").glob("*.png")) == ["m3.png", "methods.png", "pruning.png"]
