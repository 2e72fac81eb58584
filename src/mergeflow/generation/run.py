"""Generating a benchmark's records: prompts, cached outputs, batches, post-processing."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from mergeflow.benchmarks import Benchmark
from mergeflow.generation.base import Backend, Decoding, load_backend
from mergeflow.generation.cache import PromptCache, cache_key, model_fingerprint
from mergeflow.generation.postprocess import postprocess
from mergeflow.generation.settings import GenerationSettings
from mergeflow.generation.templates import build_prompt

log = logging.getLogger(__name__)


class SharedBackends:
    """One model load serving several benchmarks: a `backend_factory` for `generate_records`
    that builds a backend on first use and hands every later decoding with the same
    `Decoding.load_key()` (same backend, dtype, ...) the same one, decoding per call.

    A decoding that needs another load replaces the held backend (one model in memory at a
    time); `loads` counts the loads (what a job per benchmark repeats)."""

    def __init__(self, factory: Callable[[Path, Decoding], Backend] | None = None):
        self.factory = factory or load_backend
        self.loads = 0
        self._key: tuple | None = None
        self._backend: Backend | None = None

    def __call__(self, model_dir: Path, decoding: Decoding) -> Backend:
        key = (str(Path(model_dir).resolve()), decoding.load_key())
        if key != self._key:
            self._backend = None  # drop the old model before loading the next
            self._backend = self.factory(model_dir, decoding)
            self._key = key
            self.loads += 1
        return _Bound(self._backend, decoding)


class _Bound:
    """A shared backend with one benchmark's decoding (max_new_tokens, stops, batch, seed)."""

    def __init__(self, backend: Backend, decoding: Decoding):
        self.backend, self.decoding = backend, decoding

    def generate(self, prompts: list[str]) -> list[str]:
        return self.backend.generate(prompts, self.decoding)


def generate_records(
    docs: list[dict],
    benchmark: Benchmark,
    settings: GenerationSettings,
    model_dir: Path,
    decoding: Decoding,
    cache: PromptCache,
    backend_factory: Callable[[Path, Decoding], Backend] = load_backend,
    on_batch_done: Callable[[int], None] | None = None,
    progress: bool = True,
) -> list[dict]:
    """One record per doc: doc_id, prompt, output (cut at stops), completion (post-processed),
    and setup (`decoding.setup()`: the generation set-up that made the output; a cached
    output was made under the same set-up, since the set-up is part of its key).

    Prompts already in `cache` are not generated again; the backend is built only if some
    prompt is missing. The backend gets `decoding.batch_size` prompts per call (hf: one padded
    batch; vLLM: a chunk its scheduler batches); each call's outputs are in the cache before
    the next call. `on_batch_done(n_done)` runs after each call is cached.
    """
    from tqdm import tqdm

    prompts = [build_prompt(settings.template, settings.instruction, benchmark.fields(d)) for d in docs]
    fingerprint = model_fingerprint(model_dir)
    keys = [cache_key(fingerprint, p, decoding) for p in prompts]

    todo: dict[str, str] = {}  # key -> prompt, unique prompts still to generate
    for key, prompt in zip(keys, prompts):
        if cache.get(key) is None:
            todo.setdefault(key, prompt)
    n_unique = len(set(keys))
    # Longest prompts first: similar lengths share a batch (less padding), memory errors show early.
    pending = sorted(todo.items(), key=lambda kv: -len(kv[1]))

    setup = decoding.setup()
    if pending:
        per_call = decoding.batch_size
        log.info("generation set-up: %s", setup)
        backend = backend_factory(model_dir, decoding)
        bar = tqdm(
            total=n_unique, initial=n_unique - len(pending), unit="prompt",
            desc=f"generate {benchmark.name}", disable=not progress, dynamic_ncols=True,
        )
        done = 0
        for start in range(0, len(pending), per_call):
            batch = pending[start : start + per_call]
            outputs = backend.generate([p for _, p in batch])
            # The set-up beside each output: the key hash alone does not say what made it.
            cache.add([{"key": k, "prompt": p, "output": o, "setup": setup} for (k, p), o in zip(batch, outputs)])
            done += len(batch)
            bar.update(len(batch))
            if on_batch_done is not None:
                on_batch_done(done)
        bar.close()
        log.info("%s: generated %d prompts, %d from the cache", benchmark.name, len(pending), n_unique - len(pending))
    else:
        log.info("all %d %s prompts found in the cache", n_unique, benchmark.name)

    records = []
    for doc, prompt, key in zip(docs, prompts, keys):
        output = cache.get(key)
        records.append(
            {
                "doc_id": benchmark.doc_id(doc),
                "prompt": prompt,
                "output": output,
                "completion": postprocess(settings.postprocess, output),
                "setup": setup,
            }
        )
    return records


def write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    """Generations are model time: written atomically and fsynced."""
    from mergeflow import atomic

    atomic.write_jsonl(path, records, fsync=True)
