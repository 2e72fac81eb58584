"""`mergeflow robustness` end to end on the tiny model: score files the aggregate reads."""

from __future__ import annotations

import json

import pytest

from mergeflow.aggregate.tidy import read_score_file
from mergeflow.cli import main


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("robustness") / "demo"
    assert main(["robustness", "demo-data", "--out", str(out), "--seed", "0"]) == 0
    return out


def test_attack_writes_accuracy_and_pdr_rows(demo_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "scores" / "merged" / "adv_sst2.json"
    # a short prompt and few candidates keep the number of victim queries small
    settings = {"limit": 4, "max_candidates": 3, "seed": 0,
                "prompt": "Classify the tone as 'positive' or 'negative':"}
    rc = main(["robustness", "attack", "--task", "sst2", "--model", str(tiny_model_dir), "--data",
               str(demo_dir / "sst2.jsonl"), "--mlm", str(demo_dir / "mlm"), "--encoder", str(demo_dir / "mlm"),
               "--settings", json.dumps(settings), "--out", str(out)])
    assert rc == 0
    rows = {r["metric"]: r for r in read_score_file(out)}
    assert {r["benchmark"] for r in rows.values()} == {"adv_sst2"}
    assert {r["model"] for r in rows.values()} == {"merged"}
    clean = rows["accuracy,clean"]["value"]
    for attack in ("deepwordbug", "bertattack", "stresstest"):
        adv = rows[f"accuracy,{attack}"]["value"]
        assert rows[f"accuracy,{attack}"]["n"] == 4
        pdr = rows[f"pdr,{attack}"]["value"]
        assert pdr is None if clean == 0 else pdr == pytest.approx(1 - adv / clean)
    samples = [json.loads(line) for line in out.with_name("adv_sst2.samples.jsonl").read_text().splitlines()]
    stress = next(s for s in samples if s["attack"] == "stresstest")
    assert "true is true" in stress["prompt"]
    bert = next(s for s in samples if s["attack"] == "bertattack")
    assert bert["rejected"] >= 0 and bert["queries"] >= 1
    details = json.loads(out.read_text())["details"]
    assert details["settings"]["min_sentence_cos_sim"] == 0.8 and details["sentence_encoder"] == str(demo_dir / "mlm")


def test_bertattack_without_a_sentence_encoder_is_an_error(demo_dir, tiny_model_dir, tmp_path, capsys):
    rc = main(["robustness", "attack", "--task", "sst2", "--model", str(tiny_model_dir), "--data",
               str(demo_dir / "sst2.jsonl"), "--mlm", str(demo_dir / "mlm"), "--out", str(tmp_path / "x.json")])
    assert rc == 2 and "--encoder" in capsys.readouterr().err


def test_livebench_typos_generates_and_scores(demo_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "scores" / "merged" / "livebench_typos.json"
    gens = tmp_path / "generations" / "merged" / "livebench_typos.jsonl"
    settings = {"template": "USER: {instruction} ASSISTANT:", "instruction": "{prompt}", "max_new_tokens": 4,
                "backend": "hf", "dtype": "float32"}
    rc = main(["robustness", "livebench", "--category", "typos", "--model", str(tiny_model_dir), "--data",
               str(demo_dir / "livebench_typos.jsonl"), "--settings", json.dumps(settings), "--generations",
               str(gens), "--out", str(out)])
    assert rc == 0
    records = [json.loads(line) for line in gens.read_text().splitlines()]
    assert [r["doc_id"] for r in records] == ["typo-demo-1", "typo-demo-2"]
    assert records[0]["prompt"].startswith("USER: Please output this exact text")
    (row,) = read_score_file(out)
    assert (row["benchmark"], row["metric"], row["n"]) == ("livebench_typos", "score", 2)
    # a random tiny model does not reproduce the corrected sentence within 4 tokens
    assert row["value"] == 0.0


def test_bad_attack_settings_name_the_key(demo_dir, tiny_model_dir, tmp_path, capsys):
    rc = main(["robustness", "attack", "--task", "cola", "--model", str(tiny_model_dir), "--data",
               str(demo_dir / "cola.jsonl"), "--settings", '{"attacks": ["textfooler"]}', "--out",
               str(tmp_path / "x.json")])
    assert rc == 2 and "textfooler" in capsys.readouterr().err
