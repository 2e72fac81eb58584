"""Score stored generations with lm-eval: a replay LM answers each request from the file.

The task YAMLs (workflow/tasks/{gsm8k,math}.yaml) read a temporary JSONL of the scored
docs, each carrying the exact prompt the model was given (`mergeflow_prompt`), so
lm-eval's request for a doc is that prompt; `ReplayLM.generate_until` returns the stored
output for it. lm-eval's filters and metrics then apply unchanged.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

from lm_eval.api.filter import Filter
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from mergeflow import benchmarks
from mergeflow.errors import MergeflowError
from mergeflow.scoring import answers, results
from mergeflow.scoring.paths import resolve_file

log = logging.getLogger(__name__)

# workflow/tasks/<name>.yaml of each benchmark that declares the lm_eval scorer
TASK_FILES = {name: f"{name}.yaml" for name in benchmarks.NAMES if benchmarks.get(name).scorer == "lm_eval"}
INVALID = "[invalid]"  # lm-eval's fallback for "no answer found"


# --------------------------------------------------------------------------- the replay LM
@register_model("mergeflow_replay")
class ReplayLM(LM):
    """An lm-eval LM whose generations are the stored ones, looked up per doc and checked
    against the prompt lm-eval built (a mismatch means the task and the generation
    disagree about the prompt: an error naming the doc)."""

    def __init__(self, records: dict[str, dict]) -> None:
        super().__init__()
        self.records = records  # doc_id -> generation record
        self.served = 0

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for request in requests:
            doc_id = request.doc.get("mergeflow_doc_id")
            record = self.records.get(doc_id)
            if record is None:
                raise MergeflowError(f"replay: no stored generation for doc {doc_id!r}")
            context = request.args[0]
            if context != record["prompt"]:
                raise MergeflowError(
                    f"replay: lm-eval's prompt for doc {doc_id!r} differs from the prompt it was "
                    f"generated with ({context[:60]!r}... vs {record['prompt'][:60]!r}...)"
                )
            outputs.append(record["output"])
            self.served += 1
        return outputs

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise MergeflowError("replay LM only answers generate_until requests (stored generations)")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise MergeflowError("replay LM only answers generate_until requests (stored generations)")


# --------------------------------------------------------------------------- task functions
class _MapFilter(Filter):
    """Apply a per-response extraction; None becomes lm-eval's "[invalid]"."""

    extract: Callable[[str], object] = staticmethod(lambda text: text)

    def apply(self, resps, docs):
        def one(text):
            value = self.extract(text if isinstance(text, str) else "")
            return INVALID if value is None else str(value)

        return [[one(r) for r in inst] for inst in resps]


class MergeLMNumberFilter(_MapFilter):
    """GSM8K answer as MergeLM/M3 read it (see answers.mergelm_gsm8k_answer)."""

    extract = staticmethod(answers.mergelm_gsm8k_answer)


class MergeLMMathAnswerFilter(_MapFilter):
    """MATH answer as MergeLM/M3 read it (see answers.mergelm_math_answer)."""

    extract = staticmethod(answers.mergelm_math_answer)


class LastBoxedFilter(_MapFilter):
    """The last \\boxed{...} of the output."""

    extract = staticmethod(answers.last_boxed_answer)


def math_process_results(doc: dict, results_: list[str]) -> dict[str, int]:
    """exact_match of a filtered MATH answer against the solution's boxed answer."""
    prediction = results_[0]
    reference = answers.last_boxed_answer(doc["solution"])
    matched = prediction != INVALID and answers.math_equivalent(prediction, reference)
    return {"exact_match": int(matched)}


# The task file names these two, not lm-eval's own functions: loading the YAML imports what it
# names, and lm-eval's ifeval module tries to download nltk data at import.
def ifeval_process_results(doc: dict, results_: list[str]) -> dict:
    """lm-eval's IFEval checks of one response (strict and loose, prompt and instruction level)."""
    from mergeflow.scoring.nltk_data import ensure_punkt_tab

    ensure_punkt_tab()  # before lm-eval's ifeval module tries to download it
    from lm_eval.tasks.ifeval import utils

    return utils.process_results(doc, results_)


def ifeval_agg_inst_level_acc(items: list[list[bool]]) -> float:
    """lm-eval's instruction-level accuracy: every instruction of every doc counts once."""
    from lm_eval.tasks.ifeval import utils

    return utils.agg_inst_level_acc(items)


# --------------------------------------------------------------------------- scoring
def load_task_config(benchmark: str, data_file: Path, task_file: str | None = None) -> dict:
    """The benchmark's task YAML with its data file (and a private datasets cache) filled in."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError as err:  # the module appeared in lm-eval 0.4.12
        raise MergeflowError(f"lm-eval {_version('lm_eval')} has no lm_eval.tasks._yaml_loader: "
                             "mergeflow needs lm-eval>=0.4.12") from err

    path = resolve_file(task_file or TASK_FILES[benchmark], "tasks")
    config = load_yaml(path)  # resolves the !function references
    config["dataset_kwargs"] = {
        **(config.get("dataset_kwargs") or {}),
        "data_files": {"test": str(data_file)},
        "cache_dir": str(data_file.parent / "datasets_cache"),  # not ~/.cache: nothing left behind
    }
    return config


def score(benchmark: str, pairs: list[tuple[dict, dict]], doc_id: Callable[[dict], str],
          reference: Callable[[dict], str], settings: dict) -> tuple[list[dict], dict, list[dict]]:
    """(rows, details, samples) for (doc, generation) pairs of a benchmark with a replay task file."""
    import lm_eval
    import numpy
    from lm_eval.tasks import TaskManager

    if benchmark not in TASK_FILES:
        raise MergeflowError(f"no lm-eval replay task for benchmark {benchmark!r}")
    records, ids = {}, []
    schema = benchmarks.get(benchmark).schema
    typed_fields = {k for k, t in schema.items() if t in (int, list)}
    # a list of objects (IFEval's per-instruction kwargs) needs one struct type per column: every
    # key in every object, unset ones None, as the Hub rows hold them (lm-eval's checks drop those)
    struct_keys = {k: sorted({key for doc, _ in pairs for item in doc.get(k) or [] if isinstance(item, dict)
                              for key in item}) for k, t in schema.items() if t is list}
    with tempfile.TemporaryDirectory(prefix="mergeflow-lmeval-") as tmp:
        docs_file = Path(tmp) / "docs.jsonl"
        with open(docs_file, "w", encoding="utf-8") as fh:
            for doc, gen in pairs:
                did = doc_id(doc)
                reference(doc)  # a doc without a readable reference answer is an error naming it
                ids.append(did)
                records[did] = gen
                # String fields, and the int and list fields the benchmark's schema declares (IFEval's
                # key and instructions; validated, so one type per column, as the json loader needs)
                row = {k: v for k, v in doc.items() if not k.startswith("mergeflow_") and (
                    isinstance(v, str) or k in typed_fields)}
                for k, keys in struct_keys.items():
                    if keys and k in row:
                        row[k] = [{key: item.get(key) for key in keys} if isinstance(item, dict) else item
                                  for item in row[k]]
                row.update(mergeflow_prompt=gen["prompt"], mergeflow_doc_id=did)
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        config = load_task_config(benchmark, docs_file, settings.get("task_file"))
        task_name = config["task"]
        lm = ReplayLM(records)
        # lm_eval.evaluate with simple_evaluate's seeds and task set-up, not simple_evaluate:
        # that one also imports torch and collects environment info (pip, git): most of a job's time
        # (benchmarks/README.md, "Scoring start-up")
        random.seed(0)
        numpy.random.seed(0)
        loaded = TaskManager(include_defaults=False).load([config])
        for task in loaded["tasks"].values():
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=0)
        out = lm_eval.evaluate(
            lm=lm,
            task_dict=loaded,
            log_samples=True,
            bootstrap_iters=1000,  # means get their analytic stderr; only other aggregations bootstrap
        )
    if lm.served != len(pairs):
        raise MergeflowError(f"replay served {lm.served} of {len(pairs)} generations")
    n = len(pairs)
    rows = results.lm_eval_rows(out["results"][task_name], n)
    samples = _samples(out["samples"][task_name], ids)
    details = {"task": task_name, "lm_eval_version": _version("lm_eval"), "n_docs": n}
    return rows, details, samples


def _samples(lm_samples: list[dict], ids: list[str]) -> list[dict]:
    """One record per doc: its stored output, target, and per filter the answer and score."""
    per_doc: dict[int, dict] = {}
    for s in lm_samples:
        entry = per_doc.setdefault(
            s["doc_id"], {"doc_id": ids[s["doc_id"]], "target": s["target"], "output": s["resps"][0][0], "filters": {}}
        )
        metrics = {m: s[m] for m in s.get("metrics", []) if m in s}
        entry["filters"][s["filter"]] = {"answer": s["filtered_resps"][0], **metrics}
    return [per_doc[i] for i in sorted(per_doc)]


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
