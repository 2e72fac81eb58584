"""Each paper config pins its paper's protocol byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mergeflow import config as mfconfig
from mergeflow.generation import templates as T

ROOT = Path(__file__).resolve().parents[1]

# Strings copied from the reference (../shared/reference/evaluation.md and the DELLA /
# MergeLM generation scripts), written out here rather than imported.
VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions. USER: {instruction} ASSISTANT:")
ALPACA_HEAD = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def settings(paper, bench):
    return mfconfig.generation_settings(mfconfig.load(ROOT / "config" / f"{paper}.yaml"), bench)


@pytest.mark.slow
def test_della_protocol():
    assert settings("della", "alpaca_eval")["template"] == VICUNA
    gsm = settings("della", "gsm8k")
    assert gsm["template"] == ALPACA_HEAD + "\n\n### Instruction:\n{instruction}\n\n### Response: Let's think step by step"
    assert gsm["max_new_tokens"] == 1000 and gsm["stop"] == ["Q:", "</s>", "<|im_end|>"]
    mbpp = settings("della", "mbpp")
    assert mbpp["template"] == ALPACA_HEAD + "\n\n\n### Instruction:\n{instruction}\n\n### Response:"
    assert mbpp["max_new_tokens"] == 512 and mbpp["postprocess"] == "code"
    assert settings("della", "alpaca_eval")["max_new_tokens"] == 512
    assert {s["backend"] for s in (gsm, mbpp)} == {"hf"} and gsm["batch_size"] == 1


@pytest.mark.slow
def test_m3_protocol():
    gsm = settings("m3", "gsm8k")
    assert gsm["template"].endswith("### Response: Let's think step by step.")  # MergeLM keeps the period
    assert gsm["max_new_tokens"] == 1024
    for bench, tokens in (("alpaca_eval", 2048), ("mbpp", 2048), ("humaneval", 2048), ("math", 2048)):
        s = settings("m3", bench)
        assert s["max_new_tokens"] == tokens, bench
        assert s["stop"] == ["### Instruction", "### Response"], bench
    assert settings("m3", "mbpp")["postprocess"] == "code_mergelm"


@pytest.mark.slow
@pytest.mark.parametrize("paper", ["della", "m3", "config"])
def test_configs_name_the_package_templates_and_keep_no_copy(paper):
    """One copy of each prompt string: the package's, which configs name."""
    raw = yaml.safe_load((ROOT / "config" / f"{paper}.yaml").read_text())
    copies = set(T.TEMPLATES.values()) | set(T.INSTRUCTIONS.values())
    written = [*(raw["protocol"].get("templates") or {}).values(),
               *(v for b in raw["protocol"]["benchmarks"].values() for k, v in b.items() if k in ("template", "instruction"))]
    assert copies.isdisjoint(written)
    if paper == "config":
        return
    assert settings(paper, "alpaca_eval")["template"] == T.VICUNA
    assert settings(paper, "mbpp")["template"] == T.ALPACA_CODE
    assert settings(paper, "mbpp")["instruction"] == T.MBPP_INSTRUCTION_REPOS
    assert settings(paper, "humaneval")["instruction"] == T.HUMANEVAL_INSTRUCTION_REPOS
    expected = T.ALPACA_COT_DELLA if paper == "della" else T.ALPACA_COT_MERGELM
    assert settings(paper, "gsm8k")["template"] == expected


@pytest.mark.slow
def test_judges_are_the_papers():
    della = mfconfig.load(ROOT / "config" / "della.yaml")
    m3 = mfconfig.load(ROOT / "config" / "m3.yaml")
    # the papers' annotators are recorded; the substitutes run the same protocol with a judge that exists
    assert della["judge"]["paper"]["alpaca_eval"].startswith("alpaca_eval_gpt4 ") and della["evaluate"]["gsm8k_judge"]
    assert della["judge"]["paper"]["gsm8k_judge"] == "gpt-4-0613"
    assert m3["judge"]["paper"]["alpaca_eval"].startswith("weighted_alpaca_eval_gpt4_turbo ")
    from alpaca_eval import constants

    for cfg in (della, m3):
        paper = yaml.safe_load((Path(constants.EVALUATORS_CONFIG_DIR) / cfg["judge"]["paper"]["alpaca_eval"].split()[0]
                                / "configs.yaml").read_text())
        ours = yaml.safe_load((ROOT / "workflow" / "judges" / cfg["judge"]["alpaca_eval"]["annotator"]
                               / "configs.yaml").read_text())
        (paper,), (ours,) = paper.values(), ours.values()
        assert ours["completions_kwargs"]["model_name"] == cfg["judge"]["endpoint"]["model"] != \
            paper["completions_kwargs"]["model_name"]
        for key in ("prompt_template", "fn_completion_parser", "completion_parser_kwargs", "batch_size"):
            assert ours.get(key) == paper.get(key), key
        strip = lambda kw: {k: v for k, v in kw.items() if k != "model_name"}  # noqa: E731
        assert strip(ours["completions_kwargs"]) == strip(paper["completions_kwargs"])
    assert della["merge"]["vocab_policy"] == "truncate" and m3["merge"]["vocab_policy"] == "pad_mean"
