"""Judge agreement: re-judge recorded judgments with the configured judge and report how
often the two agree (raw agreement and Cohen's kappa), so that a substitute judge's distance
from the paper's judge is a number.

Recorded judgments:

* `alpaca_eval`: an alpaca_eval annotations file (a JSON list of records with `instruction`,
  `output_1`, `output_2`, `preference`, `annotator`, ...), e.g. the GPT-4 annotations the
  alpaca_eval repository publishes under `results/<model>/`
  (`results/gpt4/annotation_alpaca_eval_gpt4.json`). Re-judged through alpaca_eval with the
  configured annotator, as `mergeflow score --benchmark alpaca_eval` judges.
* `gsm8k`: JSON lines `{question, answer, response, verdict: correct|incorrect, judge}` (the
  demo writes its judge's labelled requests in this form: `mergeflow demo judge-labels`).
  Re-judged with DELLA's GSM8K protocol (judge/gsm8k.py), as `mergeflow judge gsm8k` judges.

A verdict is a label: alpaca_eval preferences become `output_1`, `output_2` or `tie` (1.5,
or 0 for identical outputs); GSM8K verdicts stay `correct` / `incorrect`. A re-judgment that
does not parse is counted (`n_unparsed`) and left out of agreement and kappa.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path

from mergeflow import atomic
from mergeflow.errors import MergeflowError

log = logging.getLogger(__name__)

SOURCES = ("alpaca_eval", "gsm8k")
GSM8K_FIELDS = ("question", "answer", "response", "verdict")
GSM8K_VERDICTS = ("correct", "incorrect")


# --------------------------------------------------------------------------- statistics
def cohen_kappa(confusion: dict[tuple[str, str], int]) -> float:
    """Cohen's kappa of a confusion table {(label of rater 1, label of rater 2): count}:
    (p_o - p_e) / (1 - p_e), p_o the observed agreement, p_e the agreement expected from
    each rater's label frequencies. NaN when p_e is 1 (both raters use one same label)."""
    n = sum(confusion.values())
    if n == 0:
        return math.nan
    first, second = Counter(), Counter()
    for (a, b), count in confusion.items():
        first[a] += count
        second[b] += count
    p_o = sum(count for (a, b), count in confusion.items() if a == b) / n
    p_e = sum(first[label] * second[label] for label in first) / n**2
    return math.nan if p_e == 1 else (p_o - p_e) / (1 - p_e)


def compare(recorded: list[str], ours: list[str | None]) -> dict:
    """n, n_unparsed, agreement, Cohen's kappa and the confusion counts of two judges'
    labels on the same items (ours None: unparsed, left out)."""
    if len(recorded) != len(ours):
        raise MergeflowError(f"{len(recorded)} recorded verdicts but {len(ours)} re-judged ones")
    confusion = Counter((a, b) for a, b in zip(recorded, ours) if b is not None)
    n = sum(confusion.values())
    labels = sorted({a for a, _ in confusion} | {b for _, b in confusion})
    return {
        "n": n,
        "n_unparsed": len(ours) - n,
        "n_total": len(ours),
        "agreement": sum(c for (a, b), c in confusion.items() if a == b) / n if n else None,
        "cohen_kappa": _finite(cohen_kappa(confusion)),
        "labels": labels,
        # rows: the recorded judge's label, columns: ours
        "confusion": {a: {b: confusion.get((a, b), 0) for b in labels} for a in labels},
    }


def preference_label(preference) -> str | None:
    """An alpaca_eval preference (1: output_1, 2: output_2, 1.5 tie, 0 identical outputs,
    weighted annotators in between) as a verdict; None when missing."""
    if preference is None or (isinstance(preference, float) and math.isnan(preference)):
        return None
    value = float(preference)
    if value == 0 or value == 1.5:
        return "tie"
    return "output_1" if value < 1.5 else "output_2"


def _finite(x: float) -> float | None:
    return None if x is None or math.isnan(x) else x


# --------------------------------------------------------------------------- recorded judgments
def load_alpaca_recorded(path: str | Path, limit: int | None = None) -> tuple[list[dict], int]:
    """(records with a recorded preference, first `limit` of them; number skipped for having none)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise MergeflowError(f"recorded alpaca_eval annotations {path}: {err}") from None
    if not isinstance(data, list):
        raise MergeflowError(f"recorded alpaca_eval annotations {path}: expected a JSON list of annotation records")
    records, skipped = [], 0
    for i, rec in enumerate(data):
        missing = [k for k in ("instruction", "output_1", "output_2", "preference")
                   if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise MergeflowError(f"recorded alpaca_eval annotations {path}: record {i} lacks {missing}")
        if preference_label(rec["preference"]) is None:
            skipped += 1
            continue
        records.append(rec)
    return _limited(records, limit, path), skipped


def load_gsm8k_recorded(path: str | Path, limit: int | None = None) -> tuple[list[dict], int]:
    """(labelled GSM8K judging records, first `limit` of them; 0 skipped)."""
    from mergeflow.scoring.results import jsonl_objects

    path = Path(path)
    records = []
    for lineno, rec in jsonl_objects(path, "recorded GSM8K judgments"):
        missing = [k for k in GSM8K_FIELDS if not isinstance(rec.get(k), str)]
        if missing:
            raise MergeflowError(f"{path}:{lineno}: recorded GSM8K judgment lacks string field(s) {missing}")
        if rec["verdict"] not in GSM8K_VERDICTS:
            raise MergeflowError(f"{path}:{lineno}: verdict must be one of {GSM8K_VERDICTS}, got {rec['verdict']!r}")
        records.append(rec)
    return _limited(records, limit, path), 0


def _limited(records: list[dict], limit: int | None, path: Path) -> list[dict]:
    if not records:
        raise MergeflowError(f"no recorded judgments with a verdict in {path}")
    return records[:limit] if limit else records


def recorded_judges(records: list[dict], key: str) -> str:
    """The recorded judge(s) as the records name them."""
    names = sorted({str(r[key]) for r in records if r.get(key)})
    return ", ".join(names) if names else "recorded"


# --------------------------------------------------------------------------- re-judging
def rejudge_alpaca(records: list[dict], settings: dict, out: Path) -> tuple[list[dict], dict]:
    """Our judge's annotation of each recorded pair (alpaca_eval, the configured annotator);
    (per-item {label, reply}, judge description)."""
    from mergeflow.judge.client import Endpoint, default_cache_path, describe
    from mergeflow.scoring import alpaca

    endpoint = Endpoint.from_settings(settings)
    if not settings.get("annotator"):
        raise MergeflowError("judge setting 'annotator' (an alpaca_eval annotator config) is required for alpaca_eval")
    annotator_config = alpaca.resolve_annotator(settings["annotator"])
    caching_path = Path(endpoint.cache) if endpoint.cache else default_cache_path(
        out, f"alpaca_eval/agreement/{alpaca._slug(annotator_config.parent.name)}__{alpaca._slug(endpoint.model)}.json")
    caching_path.parent.mkdir(parents=True, exist_ok=True)
    pairs = [{"instruction": r["instruction"], "output_1": r["output_1"], "output_2": r["output_2"]} for r in records]
    with alpaca.annotator_for(endpoint, annotator_config) as config:
        annotator = alpaca._annotator_class()(annotators_config=str(config), caching_path=str(caching_path))
        annotated = annotator.annotate_pairs(pairs)
    by_pair = {(a["instruction"], a["output_1"], a["output_2"]): a for a in annotated}
    items = []
    for pair in pairs:
        ann = by_pair.get((pair["instruction"], pair["output_1"], pair["output_2"]), {})
        items.append({"label": preference_label(ann.get(alpaca.ANNOTATION_KEY)),
                      "reply": alpaca._plain(ann.get(alpaca.REPLY_FIELD)),
                      "price": alpaca._number(ann.get(alpaca.PRICE_FIELD))})
    judge = {**describe(endpoint), "annotator": annotator_config.parent.name,
             "annotator_config": str(annotator_config), "caching_path": str(caching_path)}
    price = sum(i.pop("price") for i in items) if endpoint.prices.get("input_per_1k") is not None else None
    return items, {"judge": judge, "price_usd": price}


def rejudge_gsm8k(records: list[dict], settings: dict, out: Path) -> tuple[list[dict], dict]:
    """Our judge's verdict on each recorded response (DELLA's GSM8K protocol);
    (per-item {label, reply}, judge description and usage)."""
    from mergeflow.judge import gsm8k
    from mergeflow.judge.client import Endpoint, JudgeClient, default_cache_path, describe, reach
    from mergeflow.scoring.paths import resolve_file

    endpoint = Endpoint.from_settings(settings)
    prompt = gsm8k.JudgePrompt.load(resolve_file(settings.get("prompt") or gsm8k.DEFAULT_PROMPT_FILE, "judges"))
    pairs = [({"question": r["question"], "answer": r["answer"], "index": i}, {"output": r["response"]})
             for i, r in enumerate(records)]
    cache = endpoint.cache or default_cache_path(out)  # the GSM8K judge's cache: the same requests are free
    with reach(endpoint) as where:
        with JudgeClient.from_endpoint(endpoint, where.base_url, request_model=where.request_model,
                                       cache_path=cache, local=where.local) as client:
            _rows, _details, samples = gsm8k.score(pairs, lambda doc: doc["index"], client, prompt)
            usage = client.usage()
    items = [{"label": s["verdict"] if s["verdict"] in GSM8K_VERDICTS else None,
              "reply": s["replies"][-1] if s["replies"] else None} for s in samples]
    judge = {**describe(endpoint), "protocol": "della_gsm8k", "prompt_file": prompt.source}
    return items, {"judge": judge, "usage": usage, "price_usd": usage.get("cost_usd")}


def run(source: str, recorded: str | Path, settings: dict, out: str | Path, limit: int | None = None) -> dict:
    """Re-judge the recorded judgments and write the agreement JSON (and its samples beside it)."""
    out = Path(out)
    if source not in SOURCES:
        raise MergeflowError(f"--source must be one of {SOURCES}, got {source!r}")
    if not out.name.endswith(".json"):
        raise MergeflowError(f"--out must name a .json file, got {out}")
    if source == "alpaca_eval":
        records, skipped = load_alpaca_recorded(recorded, limit)
        theirs = [preference_label(r["preference"]) for r in records]
        recorded_judge = recorded_judges(records, "annotator")
        items, info = rejudge_alpaca(records, settings, out)
    else:
        records, skipped = load_gsm8k_recorded(recorded, limit)
        theirs = [r["verdict"] for r in records]
        recorded_judge = recorded_judges(records, "judge")
        items, info = rejudge_gsm8k(records, settings, out)
    from mergeflow.provenance import versions

    stats = compare(theirs, [i["label"] for i in items])
    info["judge"]["name"] = judge_name(info["judge"])
    result = {"source": source, **stats,
              "recorded": {"path": str(recorded), "judge": recorded_judge, "n_records": len(records),
                           "n_skipped_without_verdict": skipped, "limit": limit},
              **info, "versions": versions()}
    samples = [{"item": i, "recorded": t, "ours": it["label"], "reply": it["reply"]}
               for i, (t, it) in enumerate(zip(theirs, items))]
    atomic.write_text(out.with_name(out.name[: -len(".json")] + ".samples.jsonl"),
                      "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    atomic.write_text(out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def judge_name(judge: dict) -> str:
    """How tables name our judge: model (annotator or prompt file)."""
    what = judge.get("annotator") or Path(judge.get("prompt_file") or "").stem
    return f"{judge.get('model')} ({what})" if what else str(judge.get("model"))
