"""MergeBench's multilingual tasks: lm-eval's okapi tasks (lm_eval/tasks/okapi/), the ARC,
HellaSwag and MMLU that Okapi (Lai et al., 2023) machine-translated, in the four languages
MergeBench's scripts/evaluate.sh evaluates (`m_mmlu`, `arc`, `hellaswag` in fr, es, de, ru).

One benchmark per task and language (`arc_fr`, ...), scored by log-likelihood multiple choice
(`mergeflow loglik-mc`, scorer `loglik_mc`): lm-eval's own task YAML builds the prompt, the
choices and acc / acc_norm; declared here are only the rows' schema (the fields the task
reads), their source, their size and the checks that keep okapi's answer index honest.
"""

from __future__ import annotations

from mergeflow.benchmarks.base import Benchmark, HubSource

LANGUAGES = ("fr", "es", "de", "ru")  # MergeBench's; okapi has more: a new one needs its sizes below

# Docs of each task's evaluation split per language, as MergeBench's own lm-eval run counted them
# (uiuctml/MergeBench merged_models/Llama-3.2-3B_merged/RegMeanPlusPlus_*/lm_eval.json, "n-samples")
SIZES = {
    "m_mmlu": {"fr": 13091, "es": 13334, "de": 13258, "ru": 13007},
    "arc": {"fr": 1169, "es": 1170, "de": 1169, "ru": 1169},
    "hellaswag": {"fr": 9338, "es": 9374, "de": 9368, "ru": 9272},
}
LETTERS = ("A", "B", "C", "D", "E")


def check_arc(row: dict) -> str | None:
    # okapi keeps the filled options in order and takes the answer letter's position as the gold
    # index: an answer on an empty option, or a gap before a filled one, would score the wrong choice
    filled = [bool(row.get(f"option_{letter.lower()}")) for letter in LETTERS]
    if row["answer"] not in LETTERS:
        return f"has answer {row['answer']!r}, not one of {', '.join(LETTERS)}"
    if not filled[LETTERS.index(row["answer"])]:
        return f"has answer {row['answer']} on an empty option"
    if any(not here and later for here, later in zip(filled, filled[1:])):
        return "has an empty option before a filled one (okapi would shift the answer's index)"
    return None


def check_hellaswag(row: dict) -> str | None:
    endings = row["endings"]
    if len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        return f"has endings {endings!r}: expected a list of at least two strings"
    label = row["label"].strip()
    if not label.isdigit() or int(label) >= len(endings):
        return f"has label {row['label']!r}: not the index of one of its {len(endings)} endings"
    return None


def check_mmlu(row: dict) -> str | None:
    if row["answer"] not in LETTERS[:4]:
        return f"has answer {row['answer']!r}, not one of A, B, C, D"
    return None


def _arc(lang: str) -> Benchmark:
    return Benchmark(
        name=f"arc_{lang}",
        scorer="loglik_mc",
        headline=("acc_norm,none", "acc,none"),
        schema={"id": str, "instruction": str, "option_a": str, "option_b": str, "option_c": str, "option_d": str,
                "answer": str},
        optional={"option_e": str},  # okapi reads it; null or "" on four-option questions
        id_field="id",
        hub=HubSource("alexandrainst/m_arc", (lang,), "test"),
        sizes={"": SIZES["arc"][lang], lang: SIZES["arc"][lang]},
        lm_eval_task=f"okapi/arc_multilingual/arc_{lang}.yaml",
        check_row=check_arc,
    )


def _hellaswag(lang: str) -> Benchmark:
    return Benchmark(
        name=f"hellaswag_{lang}",
        scorer="loglik_mc",
        headline=("acc_norm,none", "acc,none"),
        schema={"activity_label": str, "ctx_a": str, "ctx_b": str, "endings": list, "label": str},
        hub=HubSource("alexandrainst/m_hellaswag", (lang,), "val"),  # okapi evaluates its `val` split
        sizes={"": SIZES["hellaswag"][lang], lang: SIZES["hellaswag"][lang]},
        lm_eval_task=f"okapi/hellaswag_multilingual/hellaswag_{lang}.yaml",
        check_row=check_hellaswag,
        unique_rows=False,
    )


def _mmlu(lang: str) -> Benchmark:
    return Benchmark(
        name=f"m_mmlu_{lang}",
        scorer="loglik_mc",
        headline=("acc,none",),
        schema={"instruction": str, "option_a": str, "option_b": str, "option_c": str, "option_d": str, "answer": str},
        hub=HubSource("alexandrainst/m_mmlu", (lang,), "test"),
        sizes={"": SIZES["m_mmlu"][lang], lang: SIZES["m_mmlu"][lang]},
        lm_eval_task=f"okapi/mmlu_multilingual/m_mmlu_{lang}.yaml",
        check_row=check_mmlu,
        unique_rows=False,
    )


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b for make in (_mmlu, _arc, _hellaswag) for b in (make(lang) for lang in LANGUAGES)
}
