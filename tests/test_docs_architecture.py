"""docs/architecture.md is the map: every module of the package and every CLI sub-command is on it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "architecture.md").read_text()


def _module_rows() -> list[str]:
    section = DOC.split("## Package modules", 1)[1].split("\n## ", 1)[0]
    return [line.split("|")[1] for line in section.splitlines() if line.startswith("| `mergeflow")]


def _listed(package: str, name: str | None, rows: list[str]) -> bool:
    """`mergeflow.pkg.name`, or `.name` / `name` in a row that names `mergeflow.pkg`."""
    for cell in rows:
        if name is None:
            if re.search(rf"`{re.escape(package)}[`.]", cell):
                return True
        elif f"`{package}.{name}`" in cell or (f"`{package}." in cell or f"`{package}`" in cell) and \
                re.search(rf"`\.?{re.escape(name)}`", cell):
            return True
    return False


def test_every_module_is_listed():
    rows = _module_rows()
    missing = []
    for path in sorted((ROOT / "src" / "mergeflow").rglob("*.py")):
        parts = list(path.relative_to(ROOT / "src").with_suffix("").parts)
        if parts[-1] == "__init__":
            package, name = ".".join(parts[:-1]), None
        else:
            package, name = ".".join(parts[:-1]), parts[-1]
        if not _listed(package, name, rows):
            missing.append(".".join(parts))
    assert not missing, f"docs/architecture.md lists no row for: {', '.join(missing)}"


def test_every_cli_subcommand_is_listed():
    from mergeflow.cli import STAGES

    commands = [name for name, _ in STAGES]
    missing = [c for c in commands if f"mergeflow {c}" not in DOC]
    assert not missing, f"docs/architecture.md does not show: {', '.join('mergeflow ' + c for c in missing)}"
