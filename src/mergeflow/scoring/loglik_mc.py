"""Log-likelihood multiple choice: lm-eval's own task YAMLs (the okapi tasks) run on one model.

Per benchmark, lm-eval loads the task YAML the benchmark names (`Benchmark.lm_eval_task`, under
lm_eval/tasks/) with its process_docs, prompt, choices and metrics as shipped. Only where the
rows come from changes: the split the task evaluates reads a JSONL of the benchmark's validated
rows (what `mergeflow fetch data` wrote, after `limit`), and the splits it would draw few-shot
examples from are unset (0-shot, as MergeBench runs these tasks). lm-eval's model class (`hf`,
or `vllm`) answers the log-likelihood requests through `CachedLoglikelihoods`, which keeps each
chunk's answers in an append-only cache before asking for the next: a killed or failed job
loses at most one chunk, and a rerun loads no model when every answer is cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lm_eval.api.model import LM

from mergeflow.benchmarks import Benchmark
from mergeflow.errors import MergeflowError
from mergeflow.generation.cache import PromptCache
from mergeflow.scoring import results

log = logging.getLogger(__name__)

SCORER = "lm_eval"  # the score file's scorer: lm-eval computed every number (aggregate reads its samples)
CHUNK = 2048  # requests per call to the model: each call's answers are cached before the next
# split keys of an lm-eval task config besides the evaluated one: none is fetched (0-shot)
OTHER_SPLITS = ("training_split", "validation_split", "test_split", "fewshot_split")


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class LoglikSettings:
    """protocol.loglik_mc (config/README.md): one block for every loglik_mc benchmark of a job."""

    backend: str
    dtype: str
    batch_size: int
    limit: int | None
    gpu_memory_utilization: float | None

    @classmethod
    def from_dict(cls, raw: dict) -> LoglikSettings:
        from mergeflow.config import LOGLIK_MC_DEFAULTS
        from mergeflow.generation.settings import BACKENDS, DTYPES

        unknown = sorted(set(raw) - set(LOGLIK_MC_DEFAULTS))
        if unknown:
            raise MergeflowError(f"unknown loglik_mc setting(s) {unknown}; known: {sorted(LOGLIK_MC_DEFAULTS)}")
        s = {**LOGLIK_MC_DEFAULTS, **raw}
        for key, allowed in (("backend", BACKENDS), ("dtype", DTYPES)):
            if s[key] not in allowed:
                raise MergeflowError(f"loglik_mc setting {key!r} is {s[key]!r}; allowed: {', '.join(allowed)}")
        for key, minimum, optional in (("batch_size", 1, False), ("limit", 1, True)):
            v = s[key]
            if not (optional and v is None) and (not isinstance(v, int) or isinstance(v, bool) or v < minimum):
                raise MergeflowError(f"loglik_mc setting {key!r} must be an integer >= {minimum}, got {v!r}")
        gmu = s["gpu_memory_utilization"]
        if gmu is not None and (isinstance(gmu, bool) or not isinstance(gmu, (int, float)) or not 0 < gmu <= 1):
            raise MergeflowError(f"loglik_mc setting 'gpu_memory_utilization' must be in (0, 1], got {gmu!r}")
        return cls(**s)


def resolve_setup(settings: LoglikSettings, model_dir: Path) -> dict:
    """The set-up that decides the log-likelihoods besides the model and the request: lm-eval's
    model class and versions, dtype, batching (hf pads per batch), tensor-parallel size."""
    import importlib

    import torch

    from mergeflow.generation.base import resolve_backend, resolve_dtype, vllm_available

    if settings.backend == "vllm" and not vllm_available():
        raise MergeflowError("loglik_mc setting backend 'vllm', but vllm is not importable here; install it beside "
                             "lm-eval (envs/vllm.yaml) or use backend 'hf'")
    backend = resolve_backend(settings.backend)  # auto: vllm where importable and a GPU is visible (as generation)
    tp = 1
    if backend == "vllm":
        from mergeflow.generation.vllm import tensor_parallel_size

        heads = json.loads((Path(model_dir) / "config.json").read_text()).get("num_attention_heads")
        tp = tensor_parallel_size(torch.cuda.device_count(), heads)
    return {
        "backend": backend,
        # the module's own __version__, as generation records it (a vLLM build may lack dist metadata)
        "backend_version": str(importlib.import_module("vllm" if backend == "vllm" else "transformers").__version__),
        "lm_eval_version": _version("lm_eval"),
        "dtype": resolve_dtype(settings.dtype, backend),
        "batch_size": settings.batch_size if backend == "hf" else "auto",  # vLLM's scheduler batches a chunk
        "tensor_parallel_size": tp,
    }


def load_lm(model_dir: Path, setup: dict, settings: LoglikSettings) -> LM:
    """lm-eval's own model class of the set-up's backend, on the job's device."""
    import os

    import lm_eval.models  # noqa: F401 - lm-eval registers hf/vllm itself only while no model is registered
    import torch
    from lm_eval.api.registry import get_model

    if setup["backend"] == "hf":
        return get_model("hf")(pretrained=str(model_dir), dtype=setup["dtype"], batch_size=setup["batch_size"],
                               device="cuda" if torch.cuda.is_available() else "cpu")
    from mergeflow.generation.vllm import memory_args

    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # as the vLLM generation backend: a clean engine core
    cuda = torch.cuda.is_available()
    return get_model("vllm")(pretrained=str(model_dir), dtype=setup["dtype"], batch_size="auto",
                             tensor_parallel_size=setup["tensor_parallel_size"],
                             **memory_args(settings.gpu_memory_utilization, cuda),
                             **({} if cuda else {"enforce_eager": True}))  # as generation: no inductor compile on a CPU


# --------------------------------------------------------------------------- the cached LM
class CachedLoglikelihoods(LM):
    """An lm-eval LM answering loglikelihood requests from `cache`, asking the model (built by
    `load` on first need) for the missing ones in chunks of `chunk`, each cached before the next.
    The key hashes the model's identity, the set-up and the request (context, continuation)."""

    def __init__(self, load: Callable[[], LM], cache: PromptCache, fingerprint: str, setup: dict,
                 chunk: int | None = None) -> None:
        super().__init__()
        self.load, self.cache, self.chunk, self.setup = load, cache, chunk or CHUNK, setup
        self.prefix = json.dumps({"model": fingerprint, "setup": setup}, sort_keys=True)
        self.computed = self.reused = 0

    def key(self, args: tuple) -> str:
        return hashlib.sha256((self.prefix + json.dumps(list(args), ensure_ascii=False)).encode()).hexdigest()

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        keys = [self.key(r.args) for r in requests]
        todo: dict[str, int] = {}  # key -> its first request
        for i, key in enumerate(keys):
            if self.cache.get(key) is None:
                todo.setdefault(key, i)
        pending = list(todo.items())
        if pending:
            model = self.load()
            for start in range(0, len(pending), self.chunk):
                part = pending[start : start + self.chunk]
                answers = model.loglikelihood([requests[i] for _, i in part], disable_tqdm=disable_tqdm)
                self.cache.add([{"key": k, "output": [float(ll), bool(greedy)]} for (k, _), (ll, greedy)
                                in zip(part, answers)])
        self.computed += len(pending)
        self.reused += len(set(keys)) - len(pending)
        return [tuple(self.cache.get(k)) for k in keys]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise MergeflowError("loglik_mc answers loglikelihood requests only (multiple-choice tasks)")

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise MergeflowError("loglik_mc answers loglikelihood requests only (multiple-choice tasks)")


class SharedModel:
    """One model load for every benchmark of a job, made only when some answer is not cached."""

    def __init__(self, model_dir: Path, setup: dict, settings: LoglikSettings) -> None:
        self.args = (model_dir, setup, settings)
        self.lm: LM | None = None

    def __call__(self) -> LM:
        if self.lm is None:
            log.info("loading %s with lm-eval's %s model (%s)", self.args[0], self.args[1]["backend"],
                     self.args[1]["dtype"])
            self.lm = load_lm(*self.args)
        return self.lm


# --------------------------------------------------------------------------- one benchmark
def task_file(bench: Benchmark) -> Path:
    """lm-eval's task YAML the benchmark runs (lm_eval/tasks/<lm_eval_task>)."""
    import lm_eval.tasks

    path = Path(lm_eval.tasks.__file__).parent / str(bench.lm_eval_task)
    if not path.is_file():
        raise MergeflowError(f"benchmark {bench.name}: lm-eval {_version('lm_eval')} has no task file "
                             f"lm_eval/tasks/{bench.lm_eval_task}")
    return path


def task_config(bench: Benchmark, docs_file: Path, cache_dir: Path) -> dict:
    """The task's own config (includes and !function resolved) reading `docs_file` for the split
    it evaluates, with no other split and 0 few-shot examples."""
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(task_file(bench))
    if config.get("task") != bench.name:
        raise MergeflowError(f"benchmark {bench.name}: lm_eval/tasks/{bench.lm_eval_task} is task "
                             f"{config.get('task')!r}, not {bench.name!r}")
    split = config.get("test_split") or config.get("validation_split")  # the one lm-eval evaluates
    for key in OTHER_SPLITS:
        if config.get(key) != split:
            config[key] = None
    config.update(dataset_path="json", dataset_name=None, num_fewshot=0, dataset_kwargs={
        "data_files": {split: str(docs_file)},
        "cache_dir": str(cache_dir),  # the job's own: nothing left in ~/.cache
    })
    return config


def write_docs(bench: Benchmark, docs: list[dict], path: Path) -> None:
    """The rows as the Hub's columns hold them: every declared field, an absent optional one null
    (okapi's process_docs reads option_e on every row)."""
    fields = [*bench.schema, *bench.optional]
    with open(path, "w", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(json.dumps({k: doc.get(k) for k in fields}, ensure_ascii=False) + "\n")


def score(bench: Benchmark, docs: list[dict], ids: list[str], lm: CachedLoglikelihoods,
          workdir: Path) -> tuple[list[dict], dict, list[dict]]:
    """(rows, details, samples) of one benchmark: lm-eval's evaluation of its task on `docs`."""
    import lm_eval
    import numpy
    from lm_eval.tasks import TaskManager

    docs_file = workdir / f"{bench.name}.jsonl"
    write_docs(bench, docs, docs_file)
    config = task_config(bench, docs_file, workdir / "datasets_cache")
    random.seed(0)  # simple_evaluate's seeds (nothing here draws: 0-shot, no sampling)
    numpy.random.seed(1234)
    loaded = TaskManager(include_defaults=False).load([config])
    for task in loaded["tasks"].values():
        task.set_fewshot_seed(seed=1234)
    # lm_eval.evaluate, not simple_evaluate: the model is ours (cached) and no environment report is wanted
    out = lm_eval.evaluate(lm=lm, task_dict=loaded, log_samples=True, bootstrap_iters=1000)
    rows = results.lm_eval_rows(out["results"][bench.name], len(docs))
    samples = _samples(out["samples"][bench.name], ids)
    if len(samples) != len(docs):
        raise MergeflowError(f"{bench.name}: lm-eval scored {len(samples)} of {len(docs)} docs")
    details = {"task": bench.name, "lm_eval_task": bench.lm_eval_task, "lm_eval_version": _version("lm_eval"),
               "num_fewshot": 0, "n_docs": len(docs), "loglikelihood": lm.setup}
    return rows, details, samples


def _samples(lm_samples: list[dict], ids: list[str]) -> list[dict]:
    """One record per doc: the context, each choice's continuation and log-likelihood, lm-eval's
    target, and per filter the doc's metrics (what the aggregate's intervals read)."""
    per_doc: dict[int, dict] = {}
    for s in lm_samples:
        entry = per_doc.setdefault(s["doc_id"], {
            "doc_id": ids[s["doc_id"]],
            "target": s["target"],
            "context": s["arguments"][0][0],
            "continuations": [args[1] for args in s["arguments"]],
            "loglikelihoods": [float(resp[0][0]) for resp in s["resps"]],
            "filters": {},
        })
        entry["filters"][s["filter"]] = {m: s[m] for m in s.get("metrics", []) if m in s}
    return [per_doc[i] for i in sorted(per_doc)]


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
