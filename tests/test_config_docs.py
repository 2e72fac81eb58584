"""config/README.md documents every key of the config schema (two levels under each
top-level key), each in the section of its top-level key."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def undocumented(schema: dict, readme: str) -> list[str]:
    defs = schema.get("$defs", {})
    sections: dict[str, str] = {}
    for part in re.split(r"^## ", readme, flags=re.M)[1:]:
        for name in re.findall(r"`([\w.]+)", part.splitlines()[0]):
            sections.setdefault(name.split(".")[0], part)

    def resolve(node):
        while isinstance(node, dict) and "$ref" in node:
            node = defs[node["$ref"].split("/")[-1]]
        if isinstance(node, dict) and node.get("type") == "array" and isinstance(node.get("items"), dict):
            node = resolve(node["items"])
        return node if isinstance(node, dict) else {}

    def walk(node, path):
        for key, sub in (resolve(node).get("properties") or {}).items():
            yield [*path, key]
            if len(path) < 2:
                yield from walk(sub, [*path, key])

    return [".".join(path) for path in walk(schema, [])
            if not re.search(r"`(?:[\w.<>]+\.)?" + re.escape(path[-1]) + r"\b", sections.get(path[0], readme))]


def test_every_schema_key_is_documented():
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    assert undocumented(schema, (ROOT / "config" / "README.md").read_text()) == []
