"""Synthetic task families in the exact schemas of the Hub datasets, from templates and a seed.

Each family yields rows shaped like its benchmark (GSM8K, MATH, MBPP, AlpacaEval) and, for
training, (prompt, response) pairs in the papers' prompt templates, so the demo experts see
the very prompts that `mergeflow generate` will give them.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from mergeflow.generation import templates

# The prompts of the demo protocol (config/config.yaml): the experts train on what they are tested on.
DEMO_COT_TEMPLATE = templates.ALPACA_COT_MERGELM
DEMO_CODE_TEMPLATE = templates.ALPACA

NAMES = ["Tom", "Ana", "Raj", "Mia", "Leo", "Sara", "Ken", "Lily", "Omar", "Eva", "Ben", "Zoe"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "cards", "shells"]


# ----------------------------------------------------------------------------- GSM8K
# Small numbers on purpose: a tiny model can learn one-digit arithmetic facts in CPU minutes,
# so the math expert's skill (and how much of it a merge keeps) is measurable.
def gsm8k_row(rng: random.Random) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        c = a + b
        q = f"{name} has {a} {item}. {name} buys {b} more {item}. How many {item} does {name} have now?"
        steps = [f"{name} has {a} + {b} = <<{a}+{b}={c}>>{c} {item} now."]
    elif kind == 1:
        c, b = rng.randint(1, 9), rng.randint(1, 9)
        a = c + b
        q = f"{name} had {a} {item} and gave {b} of them to a friend. How many {item} does {name} have left?"
        steps = [f"{name} has {a} - {b} = <<{a}-{b}={c}>>{c} {item} left."]
    elif kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        c = a * b
        q = f"{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} buy in total?"
        steps = [f"{name} buys {a} * {b} = <<{a}*{b}={c}>>{c} {item}."]
    elif kind == 3:
        a, b, c = rng.randint(1, 9), rng.randint(2, 4), rng.randint(2, 4)
        d = b * c
        e = a + d
        q = (f"{name} has {a} {item}. Then {name} buys {b} boxes with {c} {item} in each box. "
             f"How many {item} does {name} have now?")
        steps = [f"The boxes hold {b} * {c} = <<{b}*{c}={d}>>{d} {item}.",
                 f"{name} has {a} + {d} = <<{a}+{d}={e}>>{e} {item} now."]
        c = e
    else:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        c = a * b
        q = f"{name} earns ${a} per hour and works {b} hours. How many dollars does {name} earn?"
        steps = [f"{name} earns {a} * {b} = <<{a}*{b}={c}>>{c} dollars."]
    return {"question": q, "answer": "\n".join(steps) + f"\n#### {c}"}


def gsm8k_pair(row: dict) -> tuple[str, str]:
    """WizardMath-style chain of thought ending `The answer is: N` (calculator marks dropped):
    the benchmark's reference response, which `mergeflow likelihood` scores."""
    from mergeflow.benchmarks import gsm8k

    return templates.build_prompt(DEMO_COT_TEMPLATE, "{question}", row), gsm8k.reference_response(row)


# ----------------------------------------------------------------------------- MATH
def math_row(rng: random.Random) -> dict:
    kind = rng.randrange(4)
    if kind == 0:
        a, b, c = rng.randint(1, 20), rng.randint(2, 9), rng.randint(2, 9)
        ans = a + b * c
        problem = f"What is ${a} + {b} \\cdot {c}$?"
        solution = f"Multiplication comes first: ${b} \\cdot {c} = {b * c}$, so the value is ${a} + {b * c} = \\boxed{{{ans}}}$."
        typ, level = "Prealgebra", "Level 1"
    elif kind == 1:
        x, a = rng.randint(1, 12), rng.randint(2, 9)
        b = rng.randint(1, 20)
        c = a * x + b
        problem = f"Solve for $x$: ${a}x + {b} = {c}$."
        solution = f"Subtract {b} from both sides: ${a}x = {c - b}$. Divide by {a}: $x = \\boxed{{{x}}}$."
        typ, level = "Algebra", "Level 2"
    elif kind == 2:
        a, b = rng.randint(10, 99), rng.randint(2, 9)
        problem = f"What is the remainder when ${a}$ is divided by ${b}$?"
        solution = f"We have ${a} = {b} \\cdot {a // b} + {a % b}$, so the remainder is $\\boxed{{{a % b}}}$."
        typ, level = "Number Theory", "Level 1"
    else:
        a = rng.randint(3, 15)
        b = rng.randint(1, a - 1)
        problem = f"Compute ${a}^2 - {b}^2$."
        solution = (f"Factor as a difference of squares: $({a} - {b})({a} + {b}) = {a - b} \\cdot {a + b} "
                    f"= \\boxed{{{a * a - b * b}}}$.")
        typ, level = "Algebra", "Level 2"
    return {"problem": problem, "level": level, "type": typ, "solution": solution}


def math_pair(row: dict) -> tuple[str, str]:
    from mergeflow.benchmarks import math

    return templates.build_prompt(DEMO_COT_TEMPLATE, "{problem}", row), math.reference_response(row)


# ----------------------------------------------------------------------------- MBPP
# (text, function name, argument names, body, inputs generator); the expected values of the
# asserts are computed by running the reference body here, so the asserts always hold.
def _mbpp_tasks(rng: random.Random) -> tuple[str, str, str, str, Callable[[], tuple]]:
    # Short lists of small numbers: the asserts are in the prompt, and short prompts train fast.
    k = rng.randint(2, 9)
    ints = lambda n: [rng.randint(-3, 12) for _ in range(n)]  # noqa: E731
    words = ["apple", "banana", "cherry", "melon", "grape", "lemon", "mango", "peach"]
    tasks = [
        (f"Write a function to add {k} to every element of a list.", "add_to_all", "nums",
         f"return [x + {k} for x in nums]", lambda: (ints(rng.randint(2, 3)),)),
        (f"Write a function to multiply every element of a list by {k}.", "multiply_all", "nums",
         f"return [x * {k} for x in nums]", lambda: (ints(rng.randint(2, 3)),)),
        (f"Write a function to count the elements of a list that are greater than {k}.", "count_greater", "nums",
         f"return sum(1 for x in nums if x > {k})", lambda: (ints(rng.randint(3, 4)),)),
        (f"Write a function to check whether a number is divisible by {k}.", "is_divisible", "n",
         f"return n % {k} == 0", lambda: (rng.randint(1, 60),)),
        (f"Write a function to return the last {k % 3 + 1} elements of a list.", "last_elements", "items",
         f"return items[-{k % 3 + 1}:]", lambda: (ints(rng.randint(k % 3 + 2, k % 3 + 3)),)),
        (f"Write a function to repeat a string {k % 3 + 2} times.", "repeat_string", "s",
         f"return s * {k % 3 + 2}", lambda: (rng.choice(words)[: rng.randint(1, 3)],)),
        ("Write a function to reverse a string.", "reverse_string", "s",
         "return s[::-1]", lambda: (rng.choice(words),)),
        ("Write a function to find the sum of the digits of a non-negative integer.", "digit_sum", "n",
         "return sum(int(d) for d in str(n))", lambda: (rng.randint(0, 999),)),
        ("Write a function to find the maximum of three numbers.", "max_of_three", "a, b, c",
         "return max(a, b, c)", lambda: tuple(ints(3))),
        ("Write a function to compute the sum of the even numbers in a list.", "sum_even", "nums",
         "return sum(x for x in nums if x % 2 == 0)", lambda: (ints(rng.randint(3, 4)),)),
        ("Write a function to count the vowels in a string.", "count_vowels", "s",
         "return sum(1 for ch in s if ch in 'aeiou')", lambda: (rng.choice(words),)),
        (f"Write a function to return the {('2nd', '3rd', '4th')[k % 3]} power of a number.", "power_of", "n",
         f"return n ** {k % 3 + 2}", lambda: (rng.randint(-4, 6),)),
    ]
    return rng.choice(tasks)


def mbpp_row(rng: random.Random, task_id: int) -> dict:
    text, fn, args, body, draw = _mbpp_tasks(rng)
    code = f"def {fn}({args}):\n    {body}"
    namespace: dict = {}
    exec(code, namespace)  # project-authored reference code, not model output
    tests: list[str] = []
    for _ in range(30):  # three distinct asserts
        inputs = draw()
        test = f"assert {fn}({', '.join(repr(x) for x in inputs)}) == {namespace[fn](*inputs)!r}"
        if test not in tests:
            tests.append(test)
        if len(tests) == 3:
            break
    return {"task_id": task_id, "text": text, "code": code, "test_list": tests,
            "test_setup_code": "", "challenge_test_list": []}


def mbpp_pair(row: dict) -> tuple[str, str]:
    from mergeflow import benchmarks

    fields = benchmarks.get("mbpp").fields(row)
    prompt = templates.build_prompt(DEMO_CODE_TEMPLATE, templates.MBPP_INSTRUCTION, fields)
    return prompt, benchmarks.get("mbpp").reference_response(row)


# ----------------------------------------------------------------------------- AlpacaEval
# Instructions with one checkable answer, built from a fixed word list: every held-out item
# is a new combination of parts the training rows use (copying, counting, ordering, number
# words), so a tiny model can generalise to it. `output` (the AlpacaEval reference) is the
# correct answer; a model that gives it exactly ties with the reference.
_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
          "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
WORDS = ["river", "garden", "window", "music", "planet", "candle", "forest", "bridge", "pencil", "rocket",
         "castle", "meadow", "silver", "thunder", "harbor", "lantern", "pepper", "violin", "desert", "island",
         "mirror", "orange", "tiger", "rabbit", "spoon", "ladder", "jacket", "pillow", "button", "basket",
         "cloud", "stone", "honey", "tunnel", "comet", "paper", "garlic", "saddle", "marble", "anchor"]
_SOURCES = ["helpful_base", "koala", "oasst", "selfinstruct", "vicuna"]
LM_KINDS = ("repeat", "first", "last", "hyphen", "reverse", "count", "number")


def number_words(n: int) -> str:
    if n < 20:
        return _UNITS[n]
    tens, unit = divmod(n, 10)
    return _TENS[tens] + ("" if unit == 0 else "-" + _UNITS[unit])


def lm_task(kind: str, rng: random.Random) -> tuple[str, str]:
    """(instruction, correct answer) of one instruction kind."""
    if kind == "repeat":
        w, k = rng.choice(WORDS), rng.randint(2, 4)
        return f"Repeat the word '{w}' {k} times, separated by spaces.", " ".join([w] * k)
    if kind in ("first", "last"):
        ws = rng.sample(WORDS, rng.randint(3, 4))
        pick = ws[0] if kind == "first" else ws[-1]
        return f"What is the {kind} word of this list: {', '.join(ws)}?", f"The {kind} word is '{pick}'."
    if kind == "hyphen":
        a, b = rng.sample(WORDS, 2)
        return f"Join the words '{a}' and '{b}' with a hyphen.", f"{a}-{b}"
    if kind == "reverse":
        ws = rng.sample(WORDS, 3)
        return f"Write these words in reverse order: {', '.join(ws)}.", ", ".join(reversed(ws))
    if kind == "count":
        ws = rng.sample(WORDS, rng.randint(2, 6))
        return f"How many words are in this list: {', '.join(ws)}?", f"There are {len(ws)} words in the list."
    n = rng.randint(0, 99)
    return f"Write the number {n} in words.", f"The number {n} in words is {number_words(n)}."


def alpaca_eval_row(rng: random.Random) -> dict:
    inst, out = lm_task(rng.choice(LM_KINDS), rng)
    return {"instruction": inst, "output": out, "generator": "demo_reference", "dataset": rng.choice(_SOURCES)}


def alpaca_eval_pair(row: dict) -> tuple[str, str]:
    from mergeflow import benchmarks

    return templates.build_prompt(templates.VICUNA, "{instruction}", row), benchmarks.get("alpaca_eval").reference_response(row)


# ----------------------------------------------------------------------------- families
FAMILIES = {  # data file -> (row maker, training pair); the expert that masters it is EXPERT_OF
    "gsm8k": (gsm8k_row, gsm8k_pair),
    "math": (math_row, math_pair),
    "mbpp": (mbpp_row, mbpp_pair),
    "alpaca_eval": (alpaca_eval_row, alpaca_eval_pair),
}
EXPERT_OF = {"gsm8k": "math", "math": "math", "mbpp": "code", "alpaca_eval": "lm"}
MBPP_FIRST_TEST_ID = 11  # the test split's task ids start here, as in MBPP
MBPP_FIRST_TRAIN_ID = 601  # MBPP's train split ids, so training and test never share one
MBPP_FIRST_VALIDATION_ID = 511  # MBPP's validation split ids (511-600), apart from both
# Seed offsets of the row streams: test rows from the seed itself, training and validation
# rows from streams of their own, so that adding validation rows leaves the others unchanged.
TRAIN_STREAM = 1_000_003
VALIDATION_STREAM = 2_000_006


def _key(name: str, row: dict) -> str:
    return row["text"] + "|" + "|".join(row["test_list"]) if name == "mbpp" else next(iter(row.values()))


def make_rows(name: str, seed: int, n: int, exclude: set[str] = frozenset(), first_id: int = 0) -> list[dict]:
    """`n` distinct rows of family `name`, none whose key is in `exclude`; deterministic in seed."""
    make = FAMILIES[name][0]
    rng = random.Random(f"{name}:{seed}")
    rows, seen, attempts = [], set(exclude), 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"demo family {name}: cannot draw {n} distinct rows")
        row = make(rng, first_id + len(rows)) if name == "mbpp" else make(rng)
        key = _key(name, row)
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def split_rows(name: str, seed: int, n_test: int, n_train: int) -> tuple[list[dict], list[dict]]:
    """Held-out test rows (the benchmark file) and disjoint training rows."""
    test = make_rows(name, seed, n_test, first_id=MBPP_FIRST_TEST_ID)
    train = make_rows(name, seed + TRAIN_STREAM, n_train, exclude={_key(name, r) for r in test},
                      first_id=MBPP_FIRST_TRAIN_ID)
    return test, train


def validation_rows(name: str, seed: int, n: int, test: list[dict], train: list[dict]) -> list[dict]:
    """The benchmark's own validation split (what a selecting sweep tunes on, docs/selection.md):
    `n` rows from a stream of their own, sharing no key with the test or the training rows
    (MBPP task ids from 511, MBPP's validation ids). Drawn after the other two, from another
    stream: the test rows, the training rows and everything trained on them are unchanged."""
    exclude = {_key(name, r) for r in test} | {_key(name, r) for r in train}
    return make_rows(name, seed + VALIDATION_STREAM, n, exclude=exclude, first_id=MBPP_FIRST_VALIDATION_ID)


def validation_file(name: str) -> str:
    """Where the demo writes a family's validation rows, relative to the demo's output directory
    (beside the benchmark file data/NAME.jsonl)."""
    return f"data/validation/{name}.jsonl"


def pretraining_text(name: str, row: dict) -> str:
    """Plain text of a row for the base model's corpus (no prompt template)."""
    if name == "gsm8k":
        return f"{row['question']}\n{row['answer']}"
    if name == "math":
        return f"{row['problem']}\n{row['solution']}"
    if name == "mbpp":
        return f"{row['text']}\n{row['code']}\n" + "\n".join(row["test_list"])
    return f"{row['instruction']}\n{row['output']}"
