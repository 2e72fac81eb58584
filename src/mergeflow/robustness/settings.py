"""Attack settings of `mergeflow robustness attack` and their check: light (no torch), so
that `mergeflow.config` runs the same check on a config before any job."""

from __future__ import annotations

from mergeflow.errors import MergeflowError

ATTACKS = ("deepwordbug", "bertattack", "stresstest")
# PromptBench's input format and label words (promptbench/prompt_attack/__init__.py LABEL_SET);
# the default prompts are from PromptBench's task-oriented prompt sets.
TASK_DEFAULTS = {
    "sst2": {"labels": ["negative", "positive"],
             "prompt": "Analyze the tone of this statement and respond with either 'positive' or 'negative':"},
    "cola": {"labels": ["unacceptable", "acceptable"],
             "prompt": "Assess the following sentence and determine if it is grammatically correct. "
                       "Respond with 'acceptable' or 'unacceptable':"},
}
ATTACK_SETTINGS = {
    "prompt": str, "template": str, "labels": list, "attacks": list, "limit": (int, type(None)), "seed": int,
    "max_candidates": int, "max_edit_distance": int, "max_words_perturbed": (int, float), "batch_size": int,
    "device": str, "dtype": str, "min_sentence_cos_sim": (int, float, type(None)),
    "sentence_window": (int, type(None)),
}


def attack_settings(task: str, raw: dict) -> dict:
    unknown = sorted(set(raw) - set(ATTACK_SETTINGS))
    if unknown:
        raise MergeflowError(f"unknown attack setting(s) {unknown}; known: {sorted(ATTACK_SETTINGS)}")
    for key, typ in ATTACK_SETTINGS.items():
        if key in raw and (not isinstance(raw[key], typ) or isinstance(raw[key], bool)):
            raise MergeflowError(f"attack setting {key!r} has the wrong type: {raw[key]!r}")
    s = {
        "template": "{prompt}\nSentence: {content}\nAnswer:", "attacks": ["deepwordbug", "bertattack", "stresstest"],
        "limit": None, "seed": 0, "max_candidates": 48, "max_edit_distance": 30, "max_words_perturbed": 1.0,
        "batch_size": 16, "device": "cpu", "dtype": "float32",
        # PromptBench's BERTAttack: USE cosine >= 0.8 against the original prompt, no window
        "min_sentence_cos_sim": 0.8, "sentence_window": None,
        **TASK_DEFAULTS[task], **raw,
    }
    bad = [a for a in s["attacks"] if a not in ATTACKS]
    if bad or not s["attacks"]:
        raise MergeflowError(f"attack setting 'attacks': unknown {bad}; known: {list(ATTACKS)}")
    if "{prompt}" not in s["template"] or "{content}" not in s["template"]:
        raise MergeflowError("attack setting 'template' needs both {prompt} and {content}")
    if s["sentence_window"] is not None and s["sentence_window"] < 1:
        raise MergeflowError(f"attack setting 'sentence_window': a number of words >= 1 or null, "
                             f"got {s['sentence_window']}")
    return s
