"""MergeBench's multilingual tasks (lm-eval's okapi tasks) scored by log-likelihood multiple choice
(`mergeflow loglik-mc`, rule loglik_mc), end to end on the tiny Llama, against log-likelihoods
computed here with plain transformers from prompts written out by hand from the okapi task files;
then through the aggregate (scores.csv, intervals, tables, expert-normalised columns); and bad
inputs: one-line errors with exit status 2, nothing already computed lost."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mergeflow import benchmarks
from mergeflow import config as mfconfig
from mergeflow.cli import main
from mergeflow.errors import MergeflowError
from mergeflow.scoring import lm_eval_replay  # noqa: F401 - a model registered first, as in a worker that scored a replay

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = json.dumps({"backend": "hf", "dtype": "float32", "batch_size": 4})

# Rows in the datasets' shapes (alexandrainst/m_arc, m_mmlu, m_hellaswag: the fields the okapi
# tasks read), written for this test: a 5-option and a 3-option ARC question, Cyrillic text, a
# HellaSwag label with okapi's leading space, and a repeated MMLU row (the translated MMLU has some).
ROWS = {
    "arc_fr": [
        {"id": "Mercury_7175875", "instruction": "Quelle planète est la plus proche du Soleil ?", "option_a": "Mercure",
         "option_b": "Vénus", "option_c": "la Terre", "option_d": "Mars", "option_e": None, "answer": "A"},
        {"id": "ARC_fr_2", "instruction": "Combien de pattes a une araignée ?", "option_a": "six", "option_b": "huit",
         "option_c": "dix", "option_d": "quatre", "option_e": "", "answer": "B"},
        {"id": "ARC_fr_3", "instruction": "Quel état de la matière a une forme propre ?", "option_a": "le gaz",
         "option_b": "le liquide", "option_c": "le plasma", "option_d": "la vapeur", "option_e": "le solide",
         "answer": "E"},
    ],
    "arc_ru": [
        {"id": "Mercury_1", "instruction": "Какая планета ближе всего к Солнцу?", "option_a": "Венера",
         "option_b": "Меркурий", "option_c": "Земля", "option_d": "Марс", "option_e": None, "answer": "B"},
        # on the tiny model the most likely choice, the one per character and the one per byte all differ
        {"id": "ARC_ru_2", "instruction": "Что нужно растениям для фотосинтеза?", "option_a": "свет",
         "option_b": "light", "option_c": "вода и свет", "option_d": "CO2", "option_e": None, "answer": "B"},
        {"id": "ARC_ru_3", "instruction": "Что нужно растениям для фотосинтеза?", "option_a": "темнота",
         "option_b": "шум", "option_c": "свет", "option_d": "", "option_e": "", "answer": "C"},
    ],
    "m_mmlu_de": [
        {"id": "de_1", "instruction": "Was ist die Hauptstadt von Frankreich? ", "option_a": "Berlin", "option_b": "Paris",
         "option_c": "Rom", "option_d": "Madrid", "answer": "B"},
        {"id": "de_2", "instruction": "Wie viel ist 2 + 2?", "option_a": "3", "option_b": "5", "option_c": "4",
         "option_d": "22", "answer": "C"},
        {"id": "de_2", "instruction": "Wie viel ist 2 + 2?", "option_a": "3", "option_b": "5", "option_c": "4",
         "option_d": "22", "answer": "C"},
    ],
    "hellaswag_fr": [
        {"id": "hellaswag/validation/10", "activity_label": "Cuisine", "ctx_a": "Un homme coupe des oignons.",
         "ctx_b": "il", "endings": ["vole dans le ciel.", "chante à la lune.", "pleure un peu.", "dort sur la table."],
         "label": " 2"},
        {"id": "hellaswag/validation/11", "activity_label": "Jardinage", "ctx_a": "Une femme arrose les plantes.",
         "ctx_b": "ensuite, elle", "endings": ["range l'arrosoir.", "mange le tuyau.", "lit sous l'eau.", "court."],
         "label": "0"},
    ],
}
LETTERS = "ABCDE"


def expected_requests(bench: str, row: dict) -> tuple[str, list[str], list[str], int]:
    """(context, continuations, choice strings, gold index) as the okapi task files define them,
    written out by hand (target delimiter " " before each choice)."""
    if bench.startswith("arc_"):
        options = [row[f"option_{c.lower()}"] for c in LETTERS if row.get(f"option_{c.lower()}")]
        return (f"Question: {row['instruction']}\nAnswer:", [f" {o}" for o in options], options,
                LETTERS.index(row["answer"]))
    if bench.startswith("m_mmlu_"):
        context = (f"{row['instruction'].strip()}\nA. {row['option_a']}\nB. {row['option_b']}\nC. {row['option_c']}"
                   f"\nD. {row['option_d']}\nAnswer:")
        return context, [f" {c}" for c in "ABCD"], list("ABCD"), LETTERS.index(row["answer"])
    context = f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}"
    return context, [f" {e}" for e in row["endings"]], list(row["endings"]), int(row["label"])


class Reference:
    """Sum of the continuation tokens' log-probabilities given the context, with plain
    transformers, tokenized as lm-eval's causal models do: the whole string, split at the
    context's token count."""

    def __init__(self, model_dir: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def loglikelihood(self, context: str, continuation: str) -> float:
        n_context = len(self.tok(context).input_ids)
        whole = self.tok(context + continuation).input_ids
        with self.torch.inference_mode():
            logp = self.model(self.torch.tensor([whole])).logits[0].float().log_softmax(-1)
        return float(sum(logp[i - 1, whole[i]] for i in range(n_context, len(whole))))


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def task_args(root: Path, model: str, names) -> list[str]:
    args = []
    for name in names:
        data = root / "data" / f"{name}.jsonl"
        if not data.exists():
            write_rows(data, ROWS[name])
        args += ["--task", name, str(data), str(root / "cache" / model / f"{name}.jsonl"),
                 str(root / "scores" / model / f"{name}.json")]
    return args


def run_loglik(model_dir: Path, args: list[str]) -> int:
    return main(["loglik-mc", "--model", str(model_dir), *args, "--settings", SETTINGS])


@pytest.fixture(scope="module")
def scored(tiny_model_dir, tmp_path_factory):
    """Every task of ROWS scored once on the tiny model: (root, the CLI's exit status)."""
    root = tmp_path_factory.mktemp("loglik")
    return root, run_loglik(tiny_model_dir, task_args(root, "base", ROWS))


def test_scores_equal_an_independent_transformers_reference(scored, tiny_model_dir):
    root, status = scored
    assert status == 0
    ref = Reference(tiny_model_dir)
    per_byte_differs = False
    for name, rows in ROWS.items():
        bench = benchmarks.get(name)
        score = json.loads((root / "scores" / "base" / f"{name}.json").read_text())
        samples = [json.loads(line) for line in (root / "scores" / "base" / f"{name}.samples.jsonl").open()]
        assert score["benchmark"] == name and score["scorer"] == "lm_eval"
        assert score["details"]["lm_eval_task"] == bench.lm_eval_task and score["details"]["num_fewshot"] == 0
        assert [s["doc_id"] for s in samples] == bench.doc_ids(rows)
        acc, acc_norm = [], []
        for row, sample in zip(rows, samples):
            context, continuations, choices, gold = expected_requests(name, row)
            assert sample["context"] == context and sample["continuations"] == continuations
            lls = np.array([ref.loglikelihood(context, c) for c in continuations])
            np.testing.assert_allclose(sample["loglikelihoods"], lls, rtol=1e-4, atol=1e-3)
            # lm-eval 0.4.13: acc = the most likely choice; acc_norm divides by the choice's length in characters
            acc.append(float(np.argmax(lls) == gold))
            acc_norm.append(float(np.argmax(lls / np.array([len(c) for c in choices])) == gold))
            per_byte = float(np.argmax(lls / np.array([len(c.encode()) for c in choices])) == gold)
            per_byte_differs |= per_byte != acc_norm[-1]
            assert sample["filters"]["none"]["acc"] == acc[-1]
            if not name.startswith("m_mmlu_"):  # m_mmlu's task defines acc only
                assert sample["filters"]["none"]["acc_norm"] == acc_norm[-1]
        rows_by_metric = {r["metric"]: r for r in score["rows"]}
        wanted = {"acc,none": acc} if name.startswith("m_mmlu_") else {"acc,none": acc, "acc_norm,none": acc_norm}
        assert set(rows_by_metric) == set(wanted)
        for metric, values in wanted.items():
            assert rows_by_metric[metric]["value"] == pytest.approx(np.mean(values))
            assert rows_by_metric[metric]["n"] == len(rows)
    assert per_byte_differs  # the rows tell lm-eval's per-character acc_norm from a per-byte one


def test_identical_rows_are_scored_once_each(scored):
    root, _ = scored
    ids = [json.loads(line)["doc_id"] for line in (root / "scores" / "base" / "m_mmlu_de.samples.jsonl").open()]
    assert len(ids) == 3 and len(set(ids)) == 3 and ids[2] == ids[1] + "#2"


def test_aggregate_picks_the_scores_up(scored, tmp_path, monkeypatch):
    root, _ = scored
    cfg = mfconfig.load(ROOT / "config" / "mergebench.yaml")
    merge_id = next(m for m, spec in mfconfig.merge_specs(cfg).items() if spec.tag == "task_arithmetic")
    files = []
    for model in ("base", "multilingual", merge_id):  # the same scores: the merge keeps 100 % of the expert's
        for name in ROWS:
            for suffix in (".json", ".samples.jsonl"):
                dest = tmp_path / "scores" / model / f"{name}{suffix}"
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(root / "scores" / "base" / f"{name}{suffix}", dest)
            files.append(str(tmp_path / "scores" / model / f"{name}.json"))
    monkeypatch.chdir(ROOT)  # the config's published figures are repository paths
    assert main(["aggregate", "--scores", *files, "--config", "config/mergebench.yaml",
                 "--out", str(tmp_path / "scores.csv"), "--tables", str(tmp_path / "tables")]) == 0
    frame = pd.read_csv(tmp_path / "scores.csv")
    arc = frame[(frame.model == "base") & (frame.benchmark == "arc_fr")].set_index("metric")
    assert set(arc.index) == {"acc,none", "acc_norm,none"} and bool(arc.loc["acc_norm,none", "headline"])
    k = round(arc.loc["acc,none", "value"] * 3)
    assert arc.loc["acc,none", "ci_method"] == "clopper_pearson" and arc.loc["acc,none", "ci_note"] == f"k={k} of n=3"
    assert set(frame.loc[frame.model == merge_id, "role"]) == {"merge"}
    header = next(line for line in next((tmp_path / "tables").glob("merges_*.md")).read_text().splitlines()
                  if line.startswith("| method"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    for name in ROWS:  # the score and its expert-normalised value (multilingual owns the task)
        assert name in columns and f"{name} norm." in columns
    assert "arc_fr" in (tmp_path / "tables" / "scores.md").read_text()


def test_a_failure_midway_keeps_what_was_computed(tiny_model_dir, tmp_path, monkeypatch, caplog):
    from mergeflow.scoring import loglik_mc

    monkeypatch.setattr(loglik_mc, "CHUNK", 4)
    real_load = loglik_mc.load_lm

    class FailingFifthCall:  # arc_ru's 10 distinct requests take calls 1-3, arc_fr's 13 calls 4-7
        def __init__(self, lm):
            self.lm, self.calls = lm, 0

        def loglikelihood(self, requests, disable_tqdm=False):
            self.calls += 1
            if self.calls == 5:
                raise MergeflowError("the GPU fell off the bus")
            return self.lm.loglikelihood(requests, disable_tqdm=disable_tqdm)

    monkeypatch.setattr(loglik_mc, "load_lm", lambda *a: FailingFifthCall(real_load(*a)))
    args = task_args(tmp_path, "base", ["arc_ru", "arc_fr"])
    assert run_loglik(tiny_model_dir, args) == 2
    # arc_ru finished and was written; arc_fr's first chunk of 4 is in its cache, no score file
    assert (tmp_path / "scores" / "base" / "arc_ru.json").is_file()
    assert not (tmp_path / "scores" / "base" / "arc_fr.json").exists()
    assert len((tmp_path / "cache" / "base" / "arc_fr.jsonl").read_text().splitlines()) == 4
    monkeypatch.setattr(loglik_mc, "load_lm", real_load)
    caplog.set_level("INFO", logger="mergeflow.scoring.loglik_mc_cli")
    assert run_loglik(tiny_model_dir, args) == 0
    done = {r.getMessage().split(":")[0]: r.getMessage() for r in caplog.records if "computed" in r.getMessage()}
    assert "0 log-likelihoods computed, 10 from the cache" in done["arc_ru"]  # its two "свет" requests are one
    assert "9 log-likelihoods computed, 4 from the cache" in done["arc_fr"]


def test_a_row_missing_a_field_fails_before_anything_runs(scored, tiny_model_dir, tmp_path, capsys):
    root, _ = scored
    before = {p: p.read_bytes() for p in (root / "scores" / "base").iterdir()}
    cache = (root / "cache" / "base" / "arc_fr.jsonl").read_bytes()
    bad = [dict(r) for r in ROWS["m_mmlu_de"]]
    del bad[1]["option_c"]
    data = write_rows(tmp_path / "m_mmlu_de.jsonl", bad)
    args = task_args(root, "base", ["arc_fr"]) + ["--task", "m_mmlu_de", str(data), str(tmp_path / "c.jsonl"),
                                                 str(tmp_path / "m_mmlu_de.json")]
    capsys.readouterr()
    assert run_loglik(tiny_model_dir, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mergeflow loglik-mc: error: ")
    assert f"{data}:2" in err[0] and "'option_c'" in err[0]
    assert {p: p.read_bytes() for p in (root / "scores" / "base").iterdir()} == before
    assert (root / "cache" / "base" / "arc_fr.jsonl").read_bytes() == cache
    assert not (tmp_path / "m_mmlu_de.json").exists() and not (tmp_path / "c.jsonl").exists()


@pytest.mark.parametrize("change, culprit", [
    (lambda r: r.update(answer="D", option_d=""), "answer D on an empty option"),
    (lambda r: r.update(option_b=""), "empty option before a filled one"),
    (lambda r: r.update(answer="F"), "answer 'F'"),
])
def test_a_row_okapi_would_misread_is_named(tmp_path, change, culprit):
    rows = [dict(r) for r in ROWS["arc_fr"]]
    change(rows[0])
    with pytest.raises(MergeflowError, match=rf"arc_fr.jsonl:1: arc_fr row .*{culprit}"):
        benchmarks.get("arc_fr").load(write_rows(tmp_path / "arc_fr.jsonl", rows))


def test_an_unknown_language_exits_2_naming_it(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "arc_it.jsonl", ROWS["arc_fr"])
    res = subprocess.run([sys.executable, "-m", "mergeflow", "loglik-mc", "--model", str(tiny_model_dir),
                          "--task", "arc_it", str(data), "-", str(tmp_path / "arc_it.json")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "mergeflow loglik-mc: error: unknown benchmark 'arc_it': language 'it' of okapi's arc is not declared "
        "(mergeflow.benchmarks.okapi.LANGUAGES: fr, es, de, ru)"]
    assert not (tmp_path / "arc_it.json").exists()


def test_every_okapi_benchmark_is_its_lm_eval_task_on_its_fetched_split(tmp_path):
    from mergeflow.scoring.loglik_mc import task_config

    for name in benchmarks.loglik_benchmarks():
        bench = benchmarks.get(name)
        config = task_config(bench, tmp_path / "docs.jsonl", tmp_path / "cache")
        assert config["task"] == name and config["num_fewshot"] == 0
        assert config["dataset_kwargs"]["data_files"] == {bench.hub.split: str(tmp_path / "docs.jsonl")}
        assert [k for k in ("training_split", "validation_split", "test_split", "fewshot_split")
                if config.get(k)] == [k for k in ("validation_split", "test_split") if config.get(k) == bench.hub.split]
        assert bench.hub.subsets == (name.rsplit("_", 1)[1],)


def test_a_selecting_sweep_on_a_loglik_benchmark_is_refused():
    import yaml

    cfg = yaml.safe_load((ROOT / "config" / "mergebench.yaml").read_text())
    cfg["merges"][1] = {**cfg["merges"][1], "params": {}, "grid": {"lambda": [0.3, 0.4]}, "select": {}}
    with pytest.raises(MergeflowError, match=r"merges\[1\]\.select': benchmark 'm_mmlu_fr'"):
        mfconfig.prepare(cfg)
