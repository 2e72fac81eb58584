"""The papers' prompt templates, byte for byte, and building a prompt from settings.

The one copy of each: configs name them (`template: vicuna`, `instruction: mbpp_repos`,
TEMPLATES and INSTRUCTIONS below), tests compare them with the reference repos' strings,
and the demo trains on them.
"""

from __future__ import annotations

from mergeflow.errors import MergeflowError

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
)
# GSM8K/MATH chain of thought: DELLA's lm-eval task omits the final period, MergeLM keeps it.
ALPACA_COT_DELLA = ALPACA + " Let's think step by step"
ALPACA_COT_MERGELM = ALPACA + " Let's think step by step."
# Code prompt of both reference repos' scripts: three newlines before `### Instruction:`.
ALPACA_CODE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n\n### Instruction:\n{instruction}\n\n### Response:"
)
VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions. USER: {instruction} "
    "ASSISTANT:"
)
MERGELM_NON_CHAT = "{instruction}\n\n### Response:\n"

# Instructions (str.format over a doc's fields and derived fields).
MBPP_INSTRUCTION = "Create a Python script for this problem:\n{text}\nTest examples:\n{tests}"
# As the reference scripts build it: a blank line before the text, 4 spaces turned into tabs.
MBPP_INSTRUCTION_REPOS = "Create a Python script for this problem:\n\n{text_tabs}\nTest examples:\n{tests_tabs}"
HUMANEVAL_INSTRUCTION = "Create a Python script for this problem:\n{prompt}"
HUMANEVAL_INSTRUCTION_REPOS = "Create a Python script for this problem:\n{prompt_tabs}"

# The names a config gives (protocol.*.template, protocol.*.instruction; config/README.md).
TEMPLATES = {
    "vicuna": VICUNA,
    "alpaca": ALPACA,
    "alpaca_cot_della": ALPACA_COT_DELLA,
    "alpaca_cot_mergelm": ALPACA_COT_MERGELM,
    "alpaca_code": ALPACA_CODE,
    "mergelm_non_chat": MERGELM_NON_CHAT,
}
INSTRUCTIONS = {
    "mbpp": MBPP_INSTRUCTION,
    "mbpp_repos": MBPP_INSTRUCTION_REPOS,
    "humaneval": HUMANEVAL_INSTRUCTION,
    "humaneval_repos": HUMANEVAL_INSTRUCTION_REPOS,
}


def build_prompt(template: str, instruction: str, fields: dict) -> str:
    """`template` with `{instruction}` replaced by `instruction.format(**fields)`.

    The template is filled by plain replacement so literal braces in it need no escaping.
    """
    if template.count("{instruction}") != 1:
        raise MergeflowError(
            "generation setting 'template' must contain '{instruction}' exactly once, "
            f"got {template!r}"
        )
    try:
        text = instruction.format(**fields)
    except KeyError as err:
        raise MergeflowError(
            f"generation setting 'instruction' uses field {err.args[0]!r}, not a field of this "
            f"benchmark's docs (available: {', '.join(sorted(fields))})"
        ) from None
    except (IndexError, ValueError) as err:
        raise MergeflowError(f"generation setting 'instruction' is not a valid format string: {err}") from None
    return template.replace("{instruction}", text)
