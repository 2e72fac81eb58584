"""Append-only cache of finished prompts, so a killed generation resumes where it stopped.

One JSON line per prompt, written (flush + fsync) as soon as its batch finishes. The key
hashes the model directory's identity, the prompt and the generation set-up, so a changed
model, prompt, decoding, backend (version), dtype or batching never reuses a stale output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from mergeflow.generation.base import Decoding

log = logging.getLogger(__name__)


# The fields of a merge's metadata (mergeflow_merge.json) that determine its bytes; the rest
# (device, timings, memory) describes one run of it.
MERGE_IDENTITY_FIELDS = ("method", "params", "seed", "base_used", "donor", "vocab_policy", "vocab_resized",
                         "compute_dtype", "mergeflow_version", "engine")


def _merge_identity(model_dir: Path) -> dict | None:
    """Content identity of a mergeflow merge output, or None for any other model dir."""
    meta_path = model_dir / "mergeflow_merge.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or "method" not in meta or "inputs" not in meta:
        return None
    inputs = meta["inputs"]
    sources = {"base": inputs.get("base"), **(inputs.get("experts") or {})}
    return {
        **{key: meta.get(key) for key in MERGE_IDENTITY_FIELDS},
        "output": {key: (meta.get("output") or {}).get(key) for key in ("dtype", "tensors", "bytes", "files")},
        "sources": {name: _source_identity(src) for name, src in sources.items()},
    }


def _source_identity(source: dict | None) -> dict | None:
    """A pinned revision names a merge source; a local source without one is named by its files."""
    if source is None:
        return None
    path, revision = source.get("path"), source.get("revision")
    if not revision and path and Path(path).is_dir():
        revision = model_fingerprint(Path(path))
    return {"path": path, "revision": revision, "format": source.get("format"), "dtypes": source.get("dtypes")}


def model_fingerprint(model_dir: Path) -> str:
    """Identity of a model directory.

    A mergeflow merge output is named by its content identity (its metadata: method, params,
    seed, sources, engine version), so a temporary checkpoint merged again after being
    removed, bit-identical, reuses its cached generations. Any other directory: its path and
    each file's name, size and mtime (cheap, no hashing of tens of GB; changes whenever a
    fetch rewrites a file).
    """
    model_dir = Path(model_dir).resolve()
    identity = _merge_identity(model_dir)
    if identity is not None:
        return "merge-" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    h = hashlib.sha256(str(model_dir).encode())
    for p in sorted(model_dir.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"\0{p.name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def cache_key(fingerprint: str, prompt: str, decoding: Decoding) -> str:
    """Model, prompt and generation set-up (backend and version, dtype, tensor-parallel size,
    batch size, decoding): an output made under another set-up is never reused."""
    payload = {"model": fingerprint, "prompt": prompt, "decoding": decoding.setup()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class PromptCache:
    """Outputs by key; `path=None` keeps them in memory only."""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path else None
        self.outputs: dict[str, str] = {}
        if self.path and self.path.exists():
            self._read()

    def _read(self) -> None:
        with open(self.path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                try:
                    rec = json.loads(line)
                    self.outputs[rec["key"]] = rec["output"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    # A kill mid-write leaves a partial last line: that prompt is simply redone.
                    log.warning("%s:%d: skipping an unreadable cache line", self.path, lineno)

    def get(self, key: str) -> str | None:
        return self.outputs.get(key)

    def add(self, records: list[dict]) -> None:
        """Store records with keys `key`, `output` (and anything else worth reading later)."""
        for rec in records:
            self.outputs[rec["key"]] = rec["output"]
        if not self.path:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as fh:
            # Start on a fresh line if a previous run died in the middle of one.
            if fh.tell() > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
            for rec in records:
                fh.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
