"""`mergeflow judge agreement`: Cohen's kappa against hand-computed values, and the command end
to end against a loopback OpenAI-compatible judge giving known verdicts, for recorded
alpaca_eval annotations (the schema alpaca_eval publishes) and labelled GSM8K judgments."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from mergeflow.aggregate.agreement import write_agreement_table
from mergeflow.cli import main
from mergeflow.judge import agreement
from mergeflow.judge.agreement import cohen_kappa, compare
from test_judge import SECRET, fault_server  # noqa: F401 (the loopback server fixture)
from test_scoring_alpaca import _install_judge, tool_capable  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
ANNOTATIONS = ROOT / "tests" / "data" / "alpaca_eval_annotations_gpt4.json"


# --------------------------------------------------------------------------- the statistic
def test_cohen_kappa_hand_computed():
    # 50 items: both "yes" 20, rater 1 yes / rater 2 no 5, no / yes 10, both "no" 15.
    # p_o = 35/50 = 0.7; p_e = (25*30 + 25*20) / 50**2 = 0.5; kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
    assert cohen_kappa({("yes", "yes"): 20, ("yes", "no"): 5, ("no", "yes"): 10, ("no", "no"): 15}) == \
        pytest.approx(0.4)
    # three labels, 10 items: rater 1 gives a 4, b 4, c 2 times; rater 2 a 3, b 5, c 2 times.
    # p_o = (2 + 3 + 1) / 10 = 0.6; p_e = (4*3 + 4*5 + 2*2) / 100 = 0.36; kappa = 0.24 / 0.64 = 0.375
    confusion = {("a", "a"): 2, ("a", "b"): 1, ("a", "c"): 1, ("b", "b"): 3, ("b", "a"): 1, ("c", "c"): 1,
                 ("c", "b"): 1}
    assert cohen_kappa(confusion) == pytest.approx(0.375)
    assert math.isnan(cohen_kappa({("x", "x"): 4}))  # chance agreement is 1: undefined
    assert math.isnan(cohen_kappa({}))


def test_compare_leaves_unparsed_out_and_matches_scikit_learn():
    recorded = ["c", "c", "c", "c", "i", "i", "i", "i", "c", "i"]
    ours = ["c", "c", "c", "i", "i", "i", "i", "c", None, "i"]
    stats = compare(recorded, ours)
    assert (stats["n"], stats["n_unparsed"], stats["n_total"]) == (9, 1, 10)
    assert stats["agreement"] == pytest.approx(7 / 9)
    assert stats["cohen_kappa"] == pytest.approx((7 / 9 - 41 / 81) / (1 - 41 / 81))  # = 0.55
    assert stats["confusion"] == {"c": {"c": 3, "i": 1}, "i": {"c": 1, "i": 4}}
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    kept = [(a, b) for a, b in zip(recorded, ours) if b is not None]
    assert stats["cohen_kappa"] == pytest.approx(sklearn_metrics.cohen_kappa_score(*zip(*kept)))
    three = (["1", "2", "tie", "2", "1", "1", "tie", "2"], ["1", "2", "2", "2", "tie", "1", "tie", "1"])
    assert compare(*three)["cohen_kappa"] == pytest.approx(sklearn_metrics.cohen_kappa_score(*three))


def test_preference_labels():
    assert [agreement.preference_label(p) for p in (1, 2, 1.0, 2.0, 1.5, 0, 1.2, 1.8, None, math.nan)] == [
        "output_1", "output_2", "output_1", "output_2", "tie", "tie", "output_1", "output_2", None, None]


# --------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("annotator", ["demo_annotator", "alpaca_eval_gpt4"])
def test_alpaca_eval_agreement_against_recorded_annotations(tool_capable, tmp_path, monkeypatch,  # noqa: F811
                                                            annotator):
    srv = tool_capable
    _install_judge(srv)  # prefers the output that says GOOD; no verdict for GARBLE
    monkeypatch.setenv("MF_TEST_AGREE_KEY", SECRET)
    monkeypatch.delenv("OPENAI_CLIENT_CONFIG_PATH", raising=False)
    out = tmp_path / "results/judge_agreement/alpaca_eval.json"
    settings = json.dumps({"base_url": srv.base_url, "model": "gpt-4.1", "api_key_env": "MF_TEST_AGREE_KEY",
                           "annotator": annotator, "max_concurrency": 2, "timeout": 10,
                           "prices": {"input_per_1k": 0.01}})
    argv = ["judge", "agreement", "--source", "alpaca_eval", "--recorded", str(ANNOTATIONS), "--settings", settings,
            "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    # Recorded (GPT-4) vs ours on the 6 records with a preference: agree on 4, disagree on
    # one (recorded output_1, the GOOD output_2), one re-judgment unparsed (GARBLE).
    assert (result["n"], result["n_unparsed"], result["n_total"]) == (5, 1, 6)
    assert result["agreement"] == pytest.approx(4 / 5)
    assert result["cohen_kappa"] == pytest.approx((4 / 5 - 12 / 25) / (1 - 12 / 25))  # 8/13
    assert result["confusion"] == {"output_1": {"output_1": 2, "output_2": 1},
                                   "output_2": {"output_1": 0, "output_2": 2}}
    assert result["recorded"]["judge"] == "alpaca_eval_gpt4" and result["recorded"]["n_skipped_without_verdict"] == 1
    assert result["judge"]["model"] == "gpt-4.1" and result["judge"]["annotator"] == annotator
    assert result["price_usd"] > 0
    samples = [json.loads(line) for line in out.with_name("alpaca_eval.samples.jsonl").read_text().splitlines()]
    assert [s["ours"] for s in samples] == ["output_1", "output_2", "output_2", "output_1", "output_2", None]
    assert all(s["reply"] for s in samples[:5])

    sent = len(srv.requests)
    assert main(argv) == 0  # a rerun is answered from the cache
    assert len(srv.requests) == sent
    assert main([*argv[:-2], "--limit", "3", "--out", str(out.with_name("limited.json"))]) == 0
    limited = json.loads(out.with_name("limited.json").read_text())
    assert limited["n_total"] == 3 and limited["agreement"] == pytest.approx(2 / 3)
    assert len(srv.requests) == sent
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path

    tables = tmp_path / "tables"
    assert write_agreement_table([out], tables) == [tables / "judge_agreement.md"]
    table = (tables / "judge_agreement.md").read_text()
    assert f"| alpaca_eval | gpt-4.1 ({annotator}) | alpaca_eval_gpt4 |   5 |          1 |         0.8 |" in table
    assert "0.615" in table


def _gsm8k_recorded(tmp_path: Path) -> Path:
    # (response, recorded verdict); the loopback judge answers RIGHT -> correct, WRONG ->
    # incorrect, BOTH -> both tags (unparsed).
    items = [("RIGHT", "correct")] * 3 + [("WRONG", "correct")] + [("WRONG", "incorrect")] * 3 + [
        ("RIGHT", "incorrect"), ("BOTH", "correct"), ("WRONG", "incorrect")]
    path = tmp_path / "gsm8k_labelled.jsonl"
    path.write_text("".join(json.dumps({"question": f"Question {i}?", "answer": f"Work.\n#### {i}",
                                        "response": f"{r} answer {i}", "verdict": v, "judge": "demo labels"}) + "\n"
                            for i, (r, v) in enumerate(items)))
    return path


def test_gsm8k_agreement_against_labelled_judgments(fault_server, tmp_path, monkeypatch):  # noqa: F811
    from test_judge import _verdict_by_response

    _verdict_by_response(fault_server)
    recorded = _gsm8k_recorded(tmp_path)
    out = tmp_path / "results/judge_agreement/gsm8k.json"
    settings = json.dumps({"base_url": fault_server.base_url, "model": "judge-x", "max_concurrency": 2,
                           "timeout": 10, "prompt": "gsm8k_judge_demo.yaml"})
    argv = ["judge", "agreement", "--source", "gsm8k", "--recorded", str(recorded), "--settings", settings,
            "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert (result["n"], result["n_unparsed"]) == (9, 1)
    assert result["agreement"] == pytest.approx(7 / 9)
    assert result["cohen_kappa"] == pytest.approx(0.55)
    assert result["confusion"] == {"correct": {"correct": 3, "incorrect": 1},
                                   "incorrect": {"correct": 1, "incorrect": 4}}
    assert result["recorded"]["judge"] == "demo labels" and result["judge"]["protocol"] == "della_gsm8k"
    assert len(fault_server.requests) == 10  # one ask each (the demo prompt re-asks never)
    first = fault_server.requests[0]["body"]["messages"][1]["content"]
    assert first.startswith("Question: Question ") and "Response: " in first
    assert result["usage"]["answered"] == 10
    assert main(argv) == 0 and len(fault_server.requests) == 10  # cached
    assert json.loads(out.read_text())["usage"]["cache_hits"] == 10

    # the aggregate puts it in the tables
    score = tmp_path / "results/scores/base/gsm8k.json"
    score.parent.mkdir(parents=True)
    score.write_text(json.dumps({"benchmark": "gsm8k", "scorer": "lm_eval", "details": {},
                                 "rows": [{"metric": "exact_match,strict-match", "value": 0.5, "n": 4}]}))
    tables = tmp_path / "results/tables"
    assert main(["aggregate", "--scores", str(score), "--config", str(ROOT / "config/config.yaml"), "--agreement",
                 str(out), "--out", str(tmp_path / "results/scores.csv"), "--tables", str(tables)]) == 0
    row = (tables / "judge_agreement.md").read_text().splitlines()[4]
    assert [c.strip() for c in row.strip("|").split("|")] == [
        "gsm8k", "judge-x (gsm8k_judge_demo)", "demo labels", "9", "1", "0.778", "0.55"]


def test_bad_recorded_files_are_clear_errors(tmp_path, capsys):
    settings = json.dumps({"base_url": "http://127.0.0.1:9/v1", "model": "m", "annotator": "demo_annotator"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a", "response": "r", "verdict": "maybe"}) + "\n")
    assert main(["judge", "agreement", "--source", "gsm8k", "--recorded", str(bad), "--settings", settings,
                 "--out", str(tmp_path / "x.json")]) == 2
    assert "bad.jsonl:1: verdict must be one of" in capsys.readouterr().err
    not_alpaca = tmp_path / "annotations.json"
    not_alpaca.write_text(json.dumps([{"instruction": "i", "output_1": "a"}]))
    assert main(["judge", "agreement", "--source", "alpaca_eval", "--recorded", str(not_alpaca), "--settings",
                 settings, "--out", str(tmp_path / "x.json")]) == 2
    assert "record 0 lacks ['output_2', 'preference']" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_dry_run_lists_the_agreement_job():
    res = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--quiet", "rules"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    for rule in ("demo_judge_labels", "judge_agreement"):
        assert any(line.split()[:2] == [rule, "1"] for line in out.splitlines()), f"{rule} missing:\n{out}"


def test_demo_judge_labels_are_the_judging_requests_with_their_true_verdicts(tmp_path):
    from mergeflow.demo import data as families
    from mergeflow.demo import judging
    from mergeflow.judge.gsm8k import JudgePrompt

    rows, _ = families.split_rows("gsm8k", 0, 5, 4)
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "judging/gsm8k_labelled.jsonl"
    assert main(["demo", "judge-labels", "--data", str(data), "--rows", "4", "--seed", "0", "--out", str(out)]) == 0
    labelled = [json.loads(line) for line in out.read_text().splitlines()]
    items = judging.gsm8k_items(rows[:4], seed=0)  # what the judge is trained on, for these rows
    prompt = JudgePrompt.load(ROOT / "workflow/judges/gsm8k_judge_demo.yaml")
    assert len(labelled) == len(items) > 4 * 5
    assert [prompt.messages(r["question"], r["answer"], r["response"]) for r in labelled] == [i.messages for i in items]
    assert [r["verdict"] for r in labelled] == [i.truth for i in items]
    assert {"correct", "incorrect"} == {r["verdict"] for r in labelled}
