"""`mergeflow robustness ...`: M3's OOD (LiveBench) and adversarial (PromptBench PDR) evaluations.

  robustness fetch     --dataset livebench_<category>|sst2|cola [--source HUB_OR_FILE] ... --out FILE.jsonl
  robustness demo-data --out DIR [--seed N]
  robustness livebench --category C --model DIR --data FILE --settings GEN_JSON --generations OUT.jsonl
                       [--cache FILE] [--sandbox JSON] --out SCORE.json
  robustness attack    --task sst2|cola --model DIR --data FILE --mlm DIR --encoder DIR --settings JSON
                       --out SCORE.json
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mergeflow import gpus
from mergeflow.config import parse_settings
from mergeflow.errors import MergeflowError
from mergeflow.robustness.settings import attack_settings

log = logging.getLogger(__name__)

GLUE = {"sst2": ("stanfordnlp/sst2", None, "validation"), "cola": ("nyu-mll/glue", "cola", "validation")}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("robustness", help="M3 robustness: LiveBench OOD scores and prompt-attack PDR")
    sub = p.add_subparsers(dest="what", required=True, metavar="{fetch,demo-data,livebench,attack}")

    f = sub.add_parser("fetch", help="LiveBench category questions (pinned release) or SST-2/CoLA rows as JSONL")
    f.add_argument("--dataset", required=True,
                   help="livebench_instruction_following, livebench_coding, livebench_typos, sst2 or cola")
    f.add_argument("--source", default=None, help="Hub dataset id or a local .jsonl (default: the usual Hub id)")
    f.add_argument("--revision", default=None, help="dataset revision to pin")
    f.add_argument("--release-date", default=None, help="LiveBench release date YYYY-MM-DD (LiveBench only)")
    f.add_argument("--subset", default=None)
    f.add_argument("--split", default=None)
    f.add_argument("--out", required=True, type=Path)
    f.set_defaults(func=run_fetch)

    d = sub.add_parser("demo-data", help="hand-made LiveBench / SST-2 / CoLA files and a tiny masked LM")
    d.add_argument("--out", required=True, type=Path)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=run_demo)

    lb = sub.add_parser("livebench", help="generate answers to a LiveBench category and score them")
    lb.add_argument("--category", required=True, help="instruction_following, coding or typos")
    lb.add_argument("--model", required=True, type=Path)
    lb.add_argument("--data", required=True, type=Path)
    lb.add_argument("--settings", required=True, help="generation settings (JSON or file), as for `mergeflow generate`")
    lb.add_argument("--generations", required=True, type=Path, help="generation records to write (.jsonl)")
    lb.add_argument("--cache", type=Path, default=None, help="append-only prompt cache (resume after a kill)")
    lb.add_argument("--sandbox", default="{}", help="code sandbox settings (coding): timeout, isolation, ...")
    lb.add_argument("--out", required=True, type=Path, help="score file (.json)")
    gpus.add_argument(lb)
    lb.set_defaults(func=run_livebench)

    a = sub.add_parser("attack", help="PromptBench prompt attacks on SST-2 / CoLA, accuracy and PDR")
    a.add_argument("--task", required=True, choices=sorted(GLUE))
    a.add_argument("--model", required=True, type=Path)
    a.add_argument("--data", required=True, type=Path)
    a.add_argument("--mlm", type=Path, default=None, help="masked LM directory (BERTAttack's candidates)")
    a.add_argument("--encoder", type=Path, default=None,
                   help="sentence encoder directory (BERTAttack's sentence-similarity constraint)")
    a.add_argument("--settings", default="{}", help="attack settings (JSON or file), see docs/robustness.md")
    a.add_argument("--out", required=True, type=Path, help="score file (.json)")
    gpus.add_argument(a)
    a.set_defaults(func=run_attack)


# ----------------------------------------------------------------------------- fetch / demo
def run_fetch(args: argparse.Namespace) -> int:
    from mergeflow.generation.run import write_jsonl_atomic
    from mergeflow.robustness import livebench

    name = args.dataset
    if name.startswith("livebench_"):
        category = livebench.check_category(name.removeprefix("livebench_"))
        if args.source and Path(args.source).exists():
            rows = livebench.load(category, args.source)
            if args.release_date:
                rows = livebench.select_release(rows, args.release_date)
        else:
            if not args.release_date:
                raise MergeflowError(f"--release-date is required to fetch {name} from the Hub (pins the questions)")
            if args.source and args.source != livebench.CATEGORIES[category].dataset:
                raise MergeflowError(f"--source {args.source}: not a local file, and {name} lives in "
                                     f"{livebench.CATEGORIES[category].dataset}")
            rows = livebench.fetch(category, args.release_date, args.revision)
            for i, row in enumerate(rows):
                livebench.benchmark(category).validate(row, f"{livebench.CATEGORIES[category].dataset}[{i}]")
    elif name in GLUE:
        rows = _glue_rows(name, args)
    else:
        raise MergeflowError(f"--dataset {name!r}: expected livebench_<{'|'.join(livebench.CATEGORIES)}>, sst2 or cola")
    write_jsonl_atomic(args.out, rows)
    log.info("wrote %d %s rows to %s", len(rows), name, args.out)
    return 0


def _glue_rows(task: str, args) -> list[dict]:
    hub, subset, split = GLUE[task]
    source = args.source or hub
    if Path(source).exists():
        return _read_glue(task, Path(source))
    try:
        import datasets

        rows = list(datasets.load_dataset(source, args.subset or subset, split=args.split or split,
                                          revision=args.revision))
    except Exception as err:
        raise MergeflowError(f"cannot load {task} dataset {source} from the Hugging Face Hub ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}); pass --source FILE.jsonl") from err
    return [_check_glue_row(task, r, f"{source}[{i}]") for i, r in enumerate(rows)]


def _read_glue(task: str, path: Path) -> list[dict]:
    from mergeflow.benchmarks.base import read_rows

    return [_check_glue_row(task, row, where) for row, where in read_rows(path)]


def _check_glue_row(task: str, row, where: str) -> dict:
    if not isinstance(row, dict) or not isinstance(row.get("sentence"), str) or not isinstance(row.get("label"), int):
        raise MergeflowError(f"{where}: a {task} row needs 'sentence' (str) and 'label' (int), got {row!r:.200}")
    return row


def run_demo(args: argparse.Namespace) -> int:
    from mergeflow.robustness.demo import write_demo

    for path in write_demo(args.out, args.seed):
        print(path)
    return 0


# ----------------------------------------------------------------------------- livebench
def run_livebench(args: argparse.Namespace) -> int:
    from mergeflow.generation.base import resolve_decoding
    from mergeflow.generation.cache import PromptCache
    from mergeflow.generation.run import generate_records, write_jsonl_atomic
    from mergeflow.generation.settings import load_settings
    from mergeflow.robustness import livebench
    from mergeflow.scoring import results

    gpus.prepare(args.gpus)

    category = livebench.check_category(args.category)
    bench = livebench.benchmark(category)
    settings = load_settings(args.settings)
    if not (args.model / "config.json").is_file():
        raise MergeflowError(f"--model {args.model}: not a model directory (no config.json)")
    docs = bench.load(args.data, limit=settings.limit)
    decoding = resolve_decoding(settings, args.model)
    records = generate_records(docs, bench, settings, args.model, decoding, PromptCache(args.cache), progress=False)
    write_jsonl_atomic(args.generations, records)
    pairs = list(zip(docs, records))
    rows, details, samples = livebench.score(category, pairs, parse_settings(args.sandbox, "--sandbox"))
    details["data"] = str(args.data)
    results.write_score(args.out, bench.name, "livebench", rows, details, samples, generations=records)
    log.info("%s score = %s (n=%s)", bench.name, rows[0]["value"], rows[0]["n"])
    return 0


# ----------------------------------------------------------------------------- attacks
def run_attack(args: argparse.Namespace) -> int:
    from mergeflow.robustness import attacks
    from mergeflow.robustness.pdr import performance_drop_rate
    from mergeflow.robustness.victim import CausalLMVictim, Task
    from mergeflow.scoring import results

    gpus.prepare(args.gpus)
    s = attack_settings(args.task, parse_settings(args.settings))
    if "bertattack" in s["attacks"] and (args.mlm is None or not (args.mlm / "config.json").is_file()):
        raise MergeflowError(f"--mlm {args.mlm}: BERTAttack needs a masked-LM directory (config.json)")
    use_similarity = "bertattack" in s["attacks"] and s["min_sentence_cos_sim"] is not None
    if use_similarity and (args.encoder is None or not (args.encoder / "config.json").is_file()):
        raise MergeflowError(f"--encoder {args.encoder}: BERTAttack's sentence-similarity constraint needs a "
                             "sentence-encoder directory (config.json); set min_sentence_cos_sim: null to drop it")
    if not (args.model / "config.json").is_file():
        raise MergeflowError(f"--model {args.model}: not a model directory (no config.json)")
    docs = _read_glue(args.task, args.data)
    if s["limit"] is not None:
        docs = docs[: s["limit"]]
    if not docs:
        raise MergeflowError(f"{args.data}: no {args.task} rows")
    task = Task(args.task, s["template"], tuple(s["labels"]))
    victim = CausalLMVictim(args.model, task, s["device"], s["dtype"], s["batch_size"])

    def objective(prompt: str) -> tuple[float, float]:
        correct, p_gold = victim.evaluate(prompt, docs)
        return sum(correct) / len(correct), sum(p_gold) / len(p_gold)

    clean_correct, _ = victim.evaluate(s["prompt"], docs)
    protected = set(s["labels"])
    rows = [results.row("accuracy,clean", [float(c) for c in clean_correct])]
    samples = [{"attack": "clean", "prompt": s["prompt"], "accuracy": rows[0]["value"]}]
    for name in s["attacks"]:
        if name == "deepwordbug":
            res = attacks.deepwordbug(s["prompt"], objective, protected, s["seed"], s["max_edit_distance"])
        elif name == "bertattack":
            mlm = attacks.MaskedLMCandidates(args.mlm, s["max_candidates"], s["device"])
            similarity = None
            if use_similarity:
                similarity = attacks.SentenceSimilarity(attacks.SentenceEncoder(args.encoder, s["device"]),
                                                        s["min_sentence_cos_sim"], s["sentence_window"])
            res = attacks.bertattack(s["prompt"], objective, protected, s["seed"], mlm, s["max_words_perturbed"],
                                     similarity)
        else:
            res = attacks.stresstest(s["prompt"], objective)
        adv_correct, _ = victim.evaluate(res.prompt, docs)
        rows.append(results.row(f"accuracy,{name}", [float(c) for c in adv_correct]))
        rows.append(results.row(f"pdr,{name}", value=performance_drop_rate(clean_correct, adv_correct),
                                n=len(docs)))
        samples.append({"attack": name, "prompt": res.prompt, "edits": res.edits, "queries": res.queries,
                        "rejected": res.rejected, "accuracy": rows[-2]["value"], "pdr": rows[-1]["value"]})
        log.info("%s %s: accuracy %s -> %s, PDR %s", args.task, name, rows[0]["value"], rows[-2]["value"],
                 rows[-1]["value"])
    details = {"settings": {k: v for k, v in s.items()}, "mlm": str(args.mlm) if args.mlm else None,
               "sentence_encoder": str(args.encoder) if args.encoder else None,
               "victim": "label-word likelihood"}
    results.write_score(args.out, f"adv_{args.task}", "promptbench_pdr", rows, details, samples)
    return 0
