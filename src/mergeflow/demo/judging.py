"""Synthetic judging data for the demo judge, in the exact requests the pipeline sends it.

Two judging tasks, both built from the demo's task families:

* GSM8K (DELLA's protocol, `mergeflow judge gsm8k`): question + reference solution +
  a response -> a short explanation ending in exactly one verdict tag. The ground truth is
  whether the response's final answer (`final_answer`) equals the reference's.
* AlpacaEval pairwise (`workflow/judges/demo_annotator`): instruction + two outputs ->
  `Output (a)` or `Output (b)`, preferring the output that is the correct answer.

Requests are the chat messages the judging code builds (the GSM8K prompt file through
`JudgePrompt`; the annotator's prompt template filled and split as alpaca_eval does), so the
judge is trained on what `transformers serve` will give it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from mergeflow.demo import data as families

GSM8K_JUDGE_PROMPT = "gsm8k_judge_demo.yaml"  # under workflow/judges/
ALPACA_ANNOTATOR = "demo_annotator"  # under workflow/judges/
VERDICT_A, VERDICT_B = "Output (a)", "Output (b)"
_ANSWER_MARK = "The answer is: "
_INT = re.compile(r"-?\d+")


@dataclass(frozen=True)
class JudgeItem:
    """One judging request, its ideal reply and the ground truth the reply encodes."""

    task: str  # "gsm8k" or "alpaca_eval"
    messages: list[dict]
    reply: str
    truth: str  # gsm8k: "correct"/"incorrect"; alpaca_eval: "a"/"b" (the better output)


# ----------------------------------------------------------------------------- GSM8K
def final_answer(response: str) -> int | None:
    """The response's final answer: the first integer after the last `The answer is: `,
    else the last integer of the response (what a reader takes as its answer)."""
    if _ANSWER_MARK in response:
        found = _INT.search(response.rsplit(_ANSWER_MARK, 1)[1])
        if found:
            return int(found.group())
    numbers = _INT.findall(response)
    return int(numbers[-1]) if numbers else None


def gsm8k_reply(response: str, reference: int, correct: str, incorrect: str) -> tuple[str, str]:
    """(reply, truth): the two answers side by side, then the verdict tag (the explanation
    lets a tiny judge copy both numbers before comparing them)."""
    got = final_answer(response)
    truth = "correct" if got == reference else "incorrect"
    tag = correct if truth == "correct" else incorrect
    return f"Response: {'none' if got is None else got}. Reference: {reference}. {tag}", truth


def _reference(row: dict) -> int:
    return int(row["answer"].split("####")[-1].strip())


def gsm8k_responses(row: dict, others: list[dict], rng: random.Random) -> list[str]:
    """Responses to judge for one question: right and wrong ones, as models write them."""
    _, good = families.gsm8k_pair(row)
    ref = _reference(row)
    reasoning = good.rsplit("\n", 1)[0]
    wrong = ref + rng.choice([-3, -2, -1, 1, 2, 3, 10, -10])
    other = families.gsm8k_pair(rng.choice(others))[1]
    off_task = rng.choice([
        " " + families.alpaca_eval_row(rng)["output"],
        "\n" + families.mbpp_row(rng, 0)["code"],
        "",
    ])
    numbers = _INT.findall(row["question"])
    return [
        good,
        good,  # the correct form twice: it is what a skilled model writes
        f"{reasoning.replace(str(ref), str(wrong))}\n{_ANSWER_MARK}{wrong}",  # an arithmetic slip
        f"{reasoning}\n{_ANSWER_MARK}{wrong}",  # right steps, wrong final answer
        "\n" + re.sub(r"<<[^>]*>>", "", row["answer"]),  # plain-text style: `#### N`
        reasoning[: rng.randint(1, max(1, len(reasoning) - 1))],  # cut off early
        other,  # another question's solution
        off_task,
        f"\n{_ANSWER_MARK}{rng.choice(numbers) if numbers else wrong}",  # a number from the question
    ]


def _gsm8k_judged(rows: list[dict], seed: int, prompt) -> list[tuple[dict, str, str, str]]:
    """(row, response, ideal reply, truth) of every response the judge is sent."""
    rng = random.Random(f"judge-gsm8k:{seed}")
    judged = []
    for row in rows:
        for response in gsm8k_responses(row, rows, rng):
            if prompt.not_applicable and prompt.not_applicable in response:
                continue  # never sent to the judge
            judged.append((row, response, *gsm8k_reply(response, _reference(row), prompt.correct, prompt.incorrect)))
    return judged


def _gsm8k_prompt(prompt_file: str | Path | None):
    from mergeflow.judge.gsm8k import JudgePrompt
    from mergeflow.scoring.paths import resolve_file

    return JudgePrompt.load(resolve_file(str(prompt_file or GSM8K_JUDGE_PROMPT), "judges"))


def gsm8k_items(rows: list[dict], seed: int, prompt_file: str | Path | None = None) -> list[JudgeItem]:
    prompt = _gsm8k_prompt(prompt_file)
    return [JudgeItem("gsm8k", prompt.messages(row["question"], row["answer"], response), reply, truth)
            for row, response, reply, truth in _gsm8k_judged(rows, seed, prompt)]


LABELS_JUDGE = "demo labels (final answer vs reference)"


def gsm8k_labelled(rows: list[dict], seed: int, prompt_file: str | Path | None = None) -> list[dict]:
    """The same judging requests as recorded judgments for `mergeflow judge agreement`:
    {question, answer, response, verdict, judge}, the verdict being the ground truth."""
    judged = _gsm8k_judged(rows, seed, _gsm8k_prompt(prompt_file))
    return [{"question": row["question"], "answer": row["answer"], "response": response, "verdict": truth,
             "judge": LABELS_JUDGE} for row, response, _reply, truth in judged]


# ----------------------------------------------------------------------------- AlpacaEval
def judge_hits(model_dir: str | Path, rows: list[dict], seed: int, max_new_tokens: int = 24) -> dict[str, list[int]]:
    """The demo judge on GSM8K judging requests built from `rows`, greedy: per truth
    ("correct", "incorrect"), [requests whose verdict tag the reply holds, requests]."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()
    hits = {"correct": [0, 0], "incorrect": [0, 0]}
    for item in gsm8k_items(rows, seed=seed):
        ids = tok.apply_chat_template(item.messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        reply = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        hits[item.truth][0] += item.reply.rsplit(". ", 1)[-1] in reply  # the verdict tag
        hits[item.truth][1] += 1
    return hits


def balanced_accuracy(hits: dict[str, list[int]]) -> float:
    """Mean over truths with requests of the share judged right: 0.5 for a judge that always
    gives one verdict."""
    shares = [k / n for k, n in hits.values() if n]
    return sum(shares) / max(1, len(shares))


def wrong_lm_answers(row: dict, others: list[dict], rng: random.Random) -> list[str]:
    """Plausible wrong outputs for an lm instruction: near misses of its own kind, another
    instruction's answer, text of another task family, a truncated answer."""
    inst, good = row["instruction"], row["output"]
    near: list[str] = []
    if m := re.fullmatch(r"Repeat the word '(\w+)' (\d) times, separated by spaces\.", inst):
        w, k = m.group(1), int(m.group(2))
        near = [" ".join([w] * (k + 1)), " ".join([w] * max(1, k - 1)), " ".join([rng.choice(families.WORDS)] * k)]
    elif m := re.fullmatch(r"What is the (first|last) word of this list: (.*)\?", inst):
        ws = m.group(2).split(", ")
        near = [f"The {m.group(1)} word is '{w}'." for w in ws if f"'{w}'" not in good]
    elif m := re.fullmatch(r"Join the words '(\w+)' and '(\w+)' with a hyphen\.", inst):
        a, b = m.groups()
        near = [f"{b}-{a}", f"{a} {b}", f"{a}-{rng.choice(families.WORDS)}"]
    elif m := re.fullmatch(r"Write these words in reverse order: (.*)\.", inst):
        ws = m.group(1).split(", ")
        near = [", ".join(ws), ", ".join([ws[2], ws[0], ws[1]]), ", ".join([ws[1], ws[2], ws[0]])]
    elif m := re.fullmatch(r"How many words are in this list: (.*)\?", inst):
        n = len(m.group(1).split(", "))
        near = [f"There are {k} words in the list." for k in (n - 1, n + 1, n + 2) if k > 0]
    elif m := re.fullmatch(r"Write the number (\d+) in words\.", inst):
        n = int(m.group(1))
        near = [f"The number {n} in words is {families.number_words(k)}." for k in (n + 1, n - 1, n + 10, n - 10)
                if 0 <= k <= 99]
    near = [x for x in near if x != good]
    other = rng.choice([r for r in others if r["output"] != good])["output"]
    off_task = rng.choice([families.gsm8k_pair(families.gsm8k_row(rng))[1].strip(), families.mbpp_row(rng, 0)["code"]])
    cut = good[: rng.randint(1, max(1, len(good) - 2))]
    return [*near[:2], other, off_task, cut]


def annotator_messages(template: str, instruction: str, output_1: str, output_2: str) -> list[dict]:
    """The chat messages alpaca_eval sends for one pair: the template's placeholders filled
    (first occurrence each, as `alpaca_eval.utils.make_prompts`), the prompt stripped and
    split at `<|im_start|>` roles (as `alpaca_eval.utils.prompt_to_chatml`)."""
    prompt = template
    for key, value in (("instruction", instruction), ("output_1", output_1), ("output_2", output_2)):
        prompt = prompt.replace("{" + key + "}", str(value), 1)
    messages = []
    for part in prompt.strip().split("<|im_start|>")[1:]:
        role, content = part.split("\n", 1)
        messages.append({"role": role.strip(), "content": content.split("<|im_end|>", 1)[0].strip()})
    return messages


def annotator_template(annotator: str | Path | None = None) -> str:
    import yaml

    from mergeflow.scoring.paths import resolve_file

    config_dir = resolve_file(str(annotator or ALPACA_ANNOTATOR), "judges")
    config_file = config_dir / "configs.yaml" if config_dir.is_dir() else config_dir
    (cfg,) = yaml.safe_load(config_file.read_text(encoding="utf-8")).values()
    return (config_file.parent.parent / cfg["prompt_template"]).read_text(encoding="utf-8")


def alpaca_items(rows: list[dict], seed: int, annotator: str | Path | None = None) -> list[JudgeItem]:
    template = annotator_template(annotator)
    rng = random.Random(f"judge-alpaca:{seed}")
    items = []
    for row in rows:
        for wrong in wrong_lm_answers(row, rows, rng):
            good_first = rng.random() < 0.5  # both positions equally often: no position bias to learn
            pair = (row["output"], wrong) if good_first else (wrong, row["output"])
            messages = annotator_messages(template, row["instruction"], *pair)
            items.append(JudgeItem("alpaca_eval", messages, VERDICT_A if good_first else VERDICT_B,
                                   "a" if good_first else "b"))
    return items


def parse_alpaca_reply(reply: str) -> str | None:
    """'a'/'b' as the demo annotator's regex parser reads the reply, else None."""
    if re.match(r"^\s*(?i:output \(a\))", reply):
        return "a"
    if re.match(r"^\s*(?i:output \(b\))", reply):
        return "b"
    return None
