"""LiveBench (White et al., arXiv 2406.19314): questions and ground-truth scorers for the three
categories the M3 paper uses out of distribution.

LiveBench is not on PyPI; the scorers follow its published rules (repository LiveBench/LiveBench):

* instruction_following -- `livebench/process_results/instruction_following/utils.py` and
  `livebench/if_runner/instruction_following_eval/evaluation_main.py`: the IFEval checks
  (strict), per question `(all_followed + fraction_followed) / 2`. The checks themselves are
  IFEval's (Google Research), the same 25 instruction ids LiveBench registers; we use the copy
  that ships with lm-eval (`lm_eval.tasks.ifeval`) rather than re-writing them.
* coding -- `livebench/process_results/coding/utils.py` (`LCB_generation_process_results`,
  from LiveCodeBench): the last fenced code block of the answer, prefixed with the question's
  `partial_solution` for completion tasks, must pass every public and private test
  (stdin/stdout or functional `Solution().<func_name>`); executed in our sandbox.
* typos -- `livebench/process_results/writing/typos/utils.py`: the answer's non-empty lines
  joined by single spaces must contain the ground truth verbatim (1 or 0).
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

from mergeflow.benchmarks.base import Benchmark
from mergeflow.errors import MergeflowError


@dataclass(frozen=True)
class LiveBenchSource:
    dataset: str  # Hub dataset id
    task: str | None = None  # a task inside the dataset (typos is one task of `language`)
    split: str = "test"


CATEGORIES = {
    "instruction_following": LiveBenchSource("livebench/instruction_following"),
    "coding": LiveBenchSource("livebench/coding"),
    "typos": LiveBenchSource("livebench/language", task="typos"),
}
# The merges the M3 paper evaluates on each category (expert pairs).
PAPER_PAIRS = {"instruction_following": ("math", "code"), "coding": ("lm", "math"), "typos": ("lm", "code")}

_COMMON = {"question_id": str, "turns": list}
_SCHEMAS = {
    "instruction_following": {**_COMMON, "instruction_id_list": list, "kwargs": list},
    "coding": {**_COMMON, "public_test_cases": str, "private_test_cases": str, "original_json": dict},
    "typos": {**_COMMON, "ground_truth": str},
}
_OPTIONAL = {
    "instruction_following": {"task": str, "category": str},
    "coding": {"task": str, "category": str, "partial_solution": str, "question_title": str},
    "typos": {"task": str, "category": str},
}


def check_category(category: str) -> str:
    if category not in CATEGORIES:
        raise MergeflowError(f"unknown LiveBench category {category!r}; known: {', '.join(CATEGORIES)}")
    return category


def benchmark(category: str) -> Benchmark:
    """The category as a `Benchmark`, so the generation stage can build its prompts:
    the instruction template sees `{prompt}` (the question's first turn)."""
    check_category(category)
    return Benchmark(
        name=f"livebench_{category}",
        schema=_SCHEMAS[category],
        optional=_OPTIONAL[category],
        id_field="question_id",
        derive=lambda doc: {"prompt": doc["turns"][0]},
    )


# ----------------------------------------------------------------------------- data
def select_release(rows: list[dict], release_date: str) -> list[dict]:
    """Questions of the LiveBench release `release_date` (YYYY-MM-DD): released on or before
    it and not removed by then, as LiveBench's own question selection does."""
    out = []
    for row in rows:
        released = _date(row.get("livebench_release_date"))
        removed = _date(row.get("livebench_removal_date"))
        if released is None:
            raise MergeflowError(f"LiveBench question {row.get('question_id')!r} has no livebench_release_date")
        if released <= release_date and (removed is None or removed > release_date):
            out.append(row)
    return out


def _date(value) -> str | None:
    if value is None or value == "":
        return None
    return str(value)[:10]  # datetime or "YYYY-MM-DD..." -> "YYYY-MM-DD"


def fetch(category: str, release_date: str, revision: str | None = None) -> list[dict]:
    """The category's questions from the Hub, pinned by dataset revision and release date."""
    source = CATEGORIES[check_category(category)]
    try:
        import datasets

        rows = list(datasets.load_dataset(source.dataset, split=source.split, revision=revision))
    except Exception as err:  # offline, missing, gated: name the dataset and the way out
        raise MergeflowError(
            f"cannot load LiveBench dataset {source.dataset} (revision {revision}) from the Hugging Face Hub: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. Fetch it where the Hub is "
            "reachable, or give a local JSONL in the same schema as the category's `path`"
        ) from err
    if source.task is not None:
        rows = [r for r in rows if r.get("task") == source.task]
    rows = select_release(rows, release_date)
    if not rows:
        raise MergeflowError(f"{source.dataset}: no {category} questions for release date {release_date}")
    return [json.loads(json.dumps(r, default=str)) for r in rows]  # dates -> strings


# ----------------------------------------------------------------------------- instruction following
def score_instruction_following(doc: dict, response: str) -> dict:
    """LiveBench's strict IFEval check: score = (all followed + fraction followed) / 2."""
    from mergeflow.scoring.nltk_data import ensure_punkt_tab

    ensure_punkt_tab()  # before lm-eval's ifeval module tries to download it
    from lm_eval.tasks.ifeval import instructions_registry

    ids, kwargs_list = doc["instruction_id_list"], doc["kwargs"]
    if len(ids) != len(kwargs_list):
        raise MergeflowError(
            f"LiveBench question {doc['question_id']}: {len(ids)} instruction ids but {len(kwargs_list)} kwargs"
        )
    followed = []
    for instruction_id, kwargs in zip(ids, kwargs_list):
        cls = instructions_registry.INSTRUCTION_DICT.get(instruction_id)
        if cls is None:
            raise MergeflowError(f"LiveBench question {doc['question_id']}: unknown instruction id {instruction_id!r}")
        checker = cls(instruction_id)
        # The Hub rows carry every kwarg of every instruction, unset ones as null.
        checker.build_description(**{k: v for k, v in (kwargs or {}).items() if v is not None})
        args = checker.get_instruction_args()
        if args and "prompt" in args:
            checker.build_description(prompt=doc["turns"][0])
        try:
            ok = bool(response.strip()) and bool(checker.check_following(response))
        except LookupError as err:  # nltk's punkt sentence model is not installed
            raise MergeflowError(
                f"instruction {instruction_id!r} needs nltk data that is not installed ({str(err).split()[0]}...): "
                "run `python -m nltk.downloader punkt_tab` where the internet is reachable"
            ) from err
        followed.append(ok)
    score = ((1.0 if all(followed) else 0.0) + sum(followed) / len(followed)) / 2 if followed else 0.0
    return {"score": score, "follow_all": all(followed), "followed": followed}


# ----------------------------------------------------------------------------- typos
def score_typos(doc: dict, response: str) -> dict:
    """1 if the ground truth appears verbatim in the answer with its line breaks joined by spaces."""
    joined = " ".join(line for line in response.split("\n") if line)
    return {"score": float(doc["ground_truth"] in joined)}


# ----------------------------------------------------------------------------- coding
def extract_code(output: str) -> str:
    """LiveCodeBench's rule: the text between the last two lines containing ``` ('' if none)."""
    lines = output.split("\n")
    fences = [i for i, line in enumerate(lines) if "```" in line]
    if len(fences) < 2:
        return ""
    return "\n".join(lines[fences[-2] + 1 : fences[-1]])


def full_solution(doc: dict, output: str) -> str:
    code = extract_code(output)
    partial = doc.get("partial_solution") or ""
    if partial and not code.startswith(partial):
        code = partial + "\n" + code
    return code


class _StringsOnly(pickle.Unpickler):
    """The private tests are a pickled JSON string; refuse anything that needs a class."""

    def find_class(self, module, name):
        raise MergeflowError(f"LiveBench private_test_cases pickle refers to {module}.{name}: refusing to load it")


def decode_tests(doc: dict) -> list[dict]:
    """Public + private test cases: [{'input', 'output', 'testtype'}], private ones decoded
    from base64(zlib(pickle(json))) when they are not plain JSON."""
    qid = doc["question_id"]
    try:
        public = json.loads(doc["public_test_cases"])
    except json.JSONDecodeError as err:
        raise MergeflowError(f"LiveBench question {qid}: public_test_cases is not JSON ({err})") from None
    raw = doc["private_test_cases"]
    try:
        private = json.loads(raw) if raw else []
    except json.JSONDecodeError:
        try:
            text = _StringsOnly(io.BytesIO(zlib.decompress(base64.b64decode(raw.encode("utf-8"))))).load()
            private = json.loads(text)
        except MergeflowError:
            raise
        except (ValueError, TypeError, EOFError, zlib.error, pickle.UnpicklingError) as err:
            raise MergeflowError(f"LiveBench question {qid}: cannot decode private_test_cases ({err})") from None
    tests = list(public) + list(private)
    for t in tests:
        if not isinstance(t, dict) or t.get("testtype") not in ("stdin", "functional"):
            raise MergeflowError(f"LiveBench question {qid}: a test case lacks testtype stdin|functional: {t!r:.200}")
    return tests


def func_name(doc: dict) -> str | None:
    meta = doc["original_json"].get("metadata") or "{}"
    meta = json.loads(meta) if isinstance(meta, str) else meta
    return meta.get("func_name")


# The harness runs inside the sandbox: it reads the solution and the tests from literals,
# runs each test and exits 0 only if all pass (LiveCodeBench's comparison: stdout lines
# stripped, numbers compared as decimals; functional outputs compared as JSON values).
_HARNESS = r'''
import contextlib, decimal, io, json, sys
SOLUTION = {solution!r}
TESTS = {tests!r}
FUNC = {func!r}

def same_lines(got, want):
    g = [l.strip() for l in got.strip().split("\n")]
    w = [l.strip() for l in want.strip().split("\n")]
    if g == w:
        return True
    if len(g) != len(w):
        return False
    for a, b in zip(g, w):
        if a == b:
            continue
        ta, tb = a.split(), b.split()
        try:
            if len(ta) != len(tb) or any(decimal.Decimal(x) != decimal.Decimal(y) for x, y in zip(ta, tb)):
                return False
        except decimal.InvalidOperation:
            return False
    return True

def run_stdin(test):
    out = io.StringIO()
    sys.stdin = io.StringIO(test["input"])
    with contextlib.redirect_stdout(out):
        try:
            exec(compile(SOLUTION, "solution.py", "exec"), {{"__name__": "__main__"}})
        except SystemExit:
            pass
    sys.stdin = sys.__stdin__
    return same_lines(out.getvalue(), test["output"])

def run_functional(test, env):
    args = [json.loads(line) for line in test["input"].split("\n") if line.strip()]
    target = env["Solution"]() if "Solution" in env else None
    fn = getattr(target, FUNC) if target is not None else env[FUNC]
    with contextlib.redirect_stdout(io.StringIO()):
        got = fn(*args)
    return json.loads(json.dumps(got)) == json.loads(test["output"])

env = None
for i, test in enumerate(TESTS):
    if test["testtype"] == "functional":
        if env is None:
            env = {{"__name__": "solution"}}
            exec(compile("from typing import *\nfrom collections import *\nimport math, heapq, bisect, itertools, functools\n" + SOLUTION, "solution.py", "exec"), env)
        ok = run_functional(test, env)
    else:
        ok = run_stdin(test)
    if not ok:
        print(f"test {{i}} failed", file=sys.stderr)
        sys.exit(1)
'''


def coding_program(doc: dict, output: str) -> str:
    """The program the sandbox runs for one answer (exits 0 iff every test passes)."""
    solution = full_solution(doc, output)
    tests = decode_tests(doc)
    func = func_name(doc)
    if any(t["testtype"] == "functional" for t in tests) and not func:
        raise MergeflowError(f"LiveBench question {doc['question_id']}: functional tests but no metadata.func_name")
    if not solution.strip():
        return "import sys\nsys.exit('no fenced code block in the answer')\n"
    return _HARNESS.format(solution=solution, tests=tests, func=func)


# ----------------------------------------------------------------------------- scoring
def score(category: str, pairs: list[tuple[dict, dict]], sandbox_settings: dict | None = None):
    """(rows, details, samples) for (doc, generation record) pairs; the row's metric `score`
    is LiveBench's mean per-question score in [0, 1]."""
    from mergeflow.scoring import results

    check_category(category)
    samples: list[dict] = []
    details: dict = {"release_rules": "LiveBench/LiveBench process_results", "category": category}
    if category == "coding":
        from mergeflow.scoring.sandbox import Limits, detect_isolation

        settings = dict(sandbox_settings or {})
        box = detect_isolation(settings.pop("isolation", "auto"), settings.pop("python", None),
                               Limits.from_settings(settings))
        workers = int(settings.get("max_workers", 2))
        runs = box.run_many([coding_program(doc, gen["output"]) for doc, gen in pairs], max_workers=workers)
        for (doc, _gen), run in zip(pairs, runs):
            samples.append({"doc_id": doc["question_id"], "score": 1.0 if run.passed else 0.0,
                            "status": run.status, "stderr": run.stderr[-400:]})
        details["isolation"] = box.isolation
    else:
        scorer = score_instruction_following if category == "instruction_following" else score_typos
        for doc, gen in pairs:
            samples.append({"doc_id": doc["question_id"], **scorer(doc, gen["output"])})
    rows = [results.row("score", [s["score"] for s in samples])]
    return rows, details, samples


def load(category: str, path: str | Path, limit: int | None = None) -> list[dict]:
    return benchmark(category).load(path, limit)
