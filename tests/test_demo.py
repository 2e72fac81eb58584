"""The demo zoo: benchmark-exact data, correct reference code, loadable models with the
math expert's extra vocabulary row, and byte-identical output for the same seed."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mergeflow import benchmarks
from mergeflow.demo import data as families

# The Hub datasets' own columns (openai/gsm8k main, EleutherAI/hendrycks_math,
# google-research-datasets/mbpp full, tatsu-lab/alpaca_eval).
SCHEMAS = {
    "gsm8k": {"question": str, "answer": str},
    "math": {"problem": str, "level": str, "type": str, "solution": str},
    "mbpp": {"task_id": int, "text": str, "code": str, "test_list": list, "test_setup_code": str,
             "challenge_test_list": list},
    "alpaca_eval": {"instruction": str, "output": str, "generator": str, "dataset": str},
}


def _build(out: Path, seed: int = 0) -> Path:
    from mergeflow.demo import cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["demo", "--out", str(out), "--seed", str(seed), "--small"])
    assert args.func(args) == 0
    return out


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("demo") / "demo")


@pytest.mark.slow
def test_same_seed_same_bytes(demo_dir, tmp_path):
    again = _digest(_build(tmp_path / "again"))
    first = _digest(demo_dir)
    assert again == first
    assert {"data/gsm8k.jsonl", "data/mbpp.jsonl", "data/alpaca_eval.jsonl", "data/math.jsonl", "demo.json",
            "models/base/model.safetensors", "models/math/tokenizer.json", "models/code/config.json"} <= set(first)


RECORDED = Path(__file__).parent / "data" / "demo_zoo_sha256.json"


def recorded_hashes(zoo: str) -> dict[str, str]:
    """The sha256 of each model.safetensors of the seed-0 zoo (`small` or `full`), as built
    with the pinned torch and transformers (tests/data/demo_zoo_sha256.json)."""
    return json.loads(RECORDED.read_text())[zoo]


def model_hashes(root: Path) -> dict[str, str]:
    return {p.parent.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("models/*/model.safetensors"))}


def test_zoo_has_the_recorded_bytes(demo_dir):
    """The kernels `mergeflow demo` pins give these bytes on every x86-64 CPU: a change here
    means the training, the pinned versions or the kernel pinning changed (docs/demo.md)."""
    import torch
    import transformers

    record = json.loads(RECORDED.read_text())
    assert model_hashes(demo_dir) == record["small"], (
        f"demo zoo bytes drifted (torch {torch.__version__}, transformers {transformers.__version__}; "
        f"recorded with torch {record['torch']}, transformers {record['transformers']})")
    assert json.loads((demo_dir / "demo.json").read_text())["cpu_kernels"] == "pinned"


@pytest.mark.slow
def test_a_one_cpu_machine_builds_the_same_zoo(tmp_path):
    """The zoo trains with a fixed thread count whatever the CPUs: results depend on it
    (benchmarks/README.md), so one CPU gives the bytes of two."""
    if not shutil.which("taskset"):
        pytest.skip("needs taskset (util-linux)")
    subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "mergeflow", "demo", "--out", str(tmp_path / "one"),
                    "--small"], check=True, timeout=600, capture_output=True)
    assert model_hashes(tmp_path / "one") == recorded_hashes("small")


def test_other_seed_other_data():
    assert families.make_rows("gsm8k", 0, 5) != families.make_rows("gsm8k", 1, 5)
    assert families.make_rows("mbpp", 3, 5, first_id=11) == families.make_rows("mbpp", 3, 5, first_id=11)


def test_data_files_have_the_hub_schemas(demo_dir):
    for name, schema in SCHEMAS.items():
        rows = [json.loads(line) for line in (demo_dir / "data" / f"{name}.jsonl").read_text().splitlines()]
        assert rows, name
        for row in rows:
            assert list(row) == list(schema), (name, row)
            assert all(isinstance(row[k], t) for k, t in schema.items()), (name, row)
        benchmarks.get(name).load(demo_dir / "data" / f"{name}.jsonl")  # validates, unique ids


@pytest.mark.parametrize("seed", [0, 7])
def test_full_size_rows_are_consistent(seed):
    test, train = families.split_rows("gsm8k", seed, 20, 100)
    gsm8k = benchmarks.get("gsm8k")
    for row in test:
        # The final answer is what the last calculator annotation computes.
        last_calc = row["answer"].rsplit("<<", 1)[1].split(">>")[0]
        a, op, b, value = re.fullmatch(r"(\d+)([-+*])(\d+)=(\d+)", last_calc).groups()
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert expected == int(value) == int(gsm8k.reference_answer(row))
    assert not {r["question"] for r in test} & {r["question"] for r in train}

    math = benchmarks.get("math")
    for row in families.make_rows("math", seed, 20):
        assert row["level"].startswith("Level ") and math.reference_answer(row).lstrip("-").isdigit()

    mbpp_rows = families.make_rows("mbpp", seed, 20, first_id=11)
    assert [r["task_id"] for r in mbpp_rows] == list(range(11, 31))
    mbpp = benchmarks.get("mbpp")
    for row in mbpp_rows:
        assert len(set(row["test_list"])) == 3
        program = mbpp.program(row, row["code"])  # reference code against its own asserts
        assert subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=30).returncode == 0, row
        broken = row["code"].replace("return ", "return None and ", 1)
        assert subprocess.run([sys.executable, "-c", mbpp.program(row, broken)], capture_output=True,
                              timeout=30).returncode != 0, row


def test_validation_files_are_apart_from_test_and_training_rows(demo_dir):
    """Each family's own validation split (what the demo's selecting sweep tunes on,
    benchmarks.<b>.validation): its own rows, none of them a test or a training row, in the
    benchmark's schema; the small zoo's here, the full demo's sizes below."""
    from mergeflow.demo.models import FULL, SMALL

    assert json.loads((demo_dir / "demo.json").read_text())["validation"] == {n: SMALL.n_validation
                                                                              for n in families.FAMILIES}
    for name in families.FAMILIES:
        spec = benchmarks.get(name)
        val = spec.load(demo_dir / families.validation_file(name))  # validates the schema, unique ids
        assert [list(r) for r in val] == [list(SCHEMAS[name])] * SMALL.n_validation, name
        test, train = families.split_rows(name, 0, SMALL.n_test, SMALL.n_train)
        assert spec.load(demo_dir / "data" / f"{name}.jsonl") == test  # the test rows stay what they were
        assert val == families.validation_rows(name, 0, SMALL.n_validation, test, train)
        for seed, (n_test, n_train, n_val) in {0: (SMALL.n_test, SMALL.n_train, SMALL.n_validation),
                                               7: (FULL.n_test, FULL.n_train, FULL.n_validation)}.items():
            test, train = families.split_rows(name, seed, n_test, n_train)
            val = families.validation_rows(name, seed, n_val, test, train)
            keys = lambda rows: {families._key(name, r) for r in rows}  # noqa: E731
            assert len(keys(val)) == n_val and not keys(val) & (keys(test) | keys(train)), (name, seed)
            assert not set(spec.doc_ids(val)) & set(spec.doc_ids(test)), (name, seed)
            if name == "mbpp":  # MBPP's validation ids, apart from test (11-) and train (601-)
                assert [r["task_id"] for r in val] == list(range(511, 511 + n_val))


def test_training_pairs_use_the_papers_templates():
    from mergeflow.generation import templates

    row = families.make_rows("gsm8k", 0, 1)[0]
    prompt, response = families.gsm8k_pair(row)
    # The demo protocol's alpaca_cot (config/config.yaml) is MergeLM's, with the final period.
    assert prompt == templates.ALPACA_COT_MERGELM.replace("{instruction}", row["question"])
    assert prompt.endswith("\n\n### Response: Let's think step by step.")
    assert response.endswith(f"The answer is: {benchmarks.get('gsm8k').reference_answer(row)}")
    assert "<<" not in response
    prompt, _ = families.alpaca_eval_pair(families.make_rows("alpaca_eval", 0, 1)[0])
    assert prompt.startswith("A chat between a curious user") and prompt.endswith(" ASSISTANT:")


def test_models_load_and_math_has_one_extra_row(demo_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = {n: AutoModelForCausalLM.from_pretrained(demo_dir / "models" / n) for n in ("base", "lm", "math", "code")}
    toks = {n: AutoTokenizer.from_pretrained(demo_dir / "models" / n) for n in models}
    rows = {n: m.get_input_embeddings().weight.shape[0] for n, m in models.items()}
    assert rows["math"] == rows["base"] + 1 == rows["lm"] + 1 == rows["code"] + 1
    assert models["math"].get_output_embeddings().weight.shape[0] == rows["base"] + 1
    assert toks["math"].pad_token == "<pad>" and toks["math"].pad_token_id == rows["base"]
    assert toks["base"].convert_ids_to_tokens(toks["base"]("x").input_ids)[0] == "<s>"
    assert "<pad>" not in toks["base"].get_vocab()
    # Digits are split one by one.
    ids = toks["base"]("12345", add_special_tokens=False).input_ids
    assert len(ids) == 5
    assert toks["base"].chat_template and "ASSISTANT:" in toks["base"].apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    # Experts differ from the base (they were fine-tuned), and share its architecture.
    base_sd = models["base"].state_dict()
    for name in ("lm", "code"):
        sd = models[name].state_dict()
        assert sd.keys() == base_sd.keys()
        assert any(not torch.equal(sd[k], base_sd[k]) for k in sd)
    assert json.loads((demo_dir / "training" / "math.json").read_text())["vocab_rows"] == rows["math"]


@pytest.mark.slow
def test_a_finetune_needs_the_base_step_and_its_seed(demo_dir, tmp_path):
    """`mergeflow demo --model NAME` trains from OUT's base: without it, or with another
    seed, one line and exit status 2, and nothing of OUT is touched."""
    cmd = [sys.executable, "-m", "mergeflow", "demo", "--model", "lm"]
    res = subprocess.run([*cmd, "--out", str(tmp_path / "empty")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "build the base first" in res.stderr, res.stderr
    before = _digest(demo_dir)
    res = subprocess.run([*cmd, "--out", str(demo_dir), "--seed", "5"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "holds the zoo of seed 0" in res.stderr, res.stderr
    assert _digest(demo_dir) == before


def test_balanced_accuracy_counts_each_truth_once():
    from mergeflow.demo.judging import balanced_accuracy

    assert balanced_accuracy({"correct": [6, 6], "incorrect": [0, 6]}) == 0.5  # always "correct"
    assert balanced_accuracy({"correct": [3, 4], "incorrect": [1, 2]}) == pytest.approx((0.75 + 0.5) / 2)
    assert balanced_accuracy({"correct": [2, 4], "incorrect": [0, 0]}) == 0.5  # a truth with no request is left out


def test_judge_hits_judges_every_request_of_the_rows(demo_dir):
    import json

    from mergeflow.demo import judging

    rows = [json.loads(line) for line in (demo_dir / "data" / "gsm8k.jsonl").read_text().splitlines()][:2]
    hits = judging.judge_hits(demo_dir / "models" / "judge", rows, seed=0, max_new_tokens=4)
    items = judging.gsm8k_items(rows, seed=0)
    assert {t: n for t, (_, n) in hits.items()} == {t: sum(i.truth == t for i in items) for t in hits}
    assert all(0 <= k <= n for k, n in hits.values())
