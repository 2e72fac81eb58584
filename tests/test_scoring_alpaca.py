"""alpaca_eval scoring: exact win rates with a scripted judge for the papers' annotators
(text, ranking and function-calling replies), unparsed judgments counted, cache reuse, key
hygiene; and the demo annotator against a real launched `transformers serve`."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

import pytest

from mergeflow.cli import main
from test_judge import SECRET, fault_server  # noqa: F401 (the loopback server fixture)

# Model outputs: GOOD beats the reference, BAD loses to it, GARBLE gets an unreadable verdict.
MODEL_OUTPUTS = ["GOOD answer 0", "GOOD answer 1", "BAD answer 2", "GOOD answer 3", "GARBLE answer 4"]


def _files(tmp_path: Path) -> tuple[Path, Path]:
    from mergeflow import benchmarks

    bench = benchmarks.get("alpaca_eval")
    docs = [{"instruction": f"Describe item {i}.", "output": f"REF answer {i}", "generator": "text_davinci_003",
             "dataset": "demo"} for i in range(len(MODEL_OUTPUTS))]
    data = tmp_path / "alpaca_eval.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    gens = tmp_path / "generations.jsonl"
    gens.write_text("".join(
        json.dumps({"doc_id": bench.doc_id(d), "prompt": "P", "output": o, "completion": o}) + "\n"
        for d, o in zip(docs, MODEL_OUTPUTS)
    ))
    return data, gens


def _scripted_judge(body: dict):
    """Prefer the output containing GOOD, else the reference; answer in the annotator's format."""
    prompt = "\n".join(m["content"] for m in body["messages"])
    if "GARBLE" in prompt:
        return "I am not sure what to say."
    if "model_1" in prompt:  # alpaca_eval_gpt4: rank the models in a Python list
        first = prompt.split('"model": "model_1"', 1)[1].split('"model": "model_2"', 1)[0]
        best_is_1 = "GOOD" in first or ("REF" in first and "GOOD" not in prompt)
        ranks = (1, 2) if best_is_1 else (2, 1)
        return f"[{{'model': 'model_1', 'rank': {ranks[0]}}}, {{'model': 'model_2', 'rank': {ranks[1]}}}]"
    output_a = re.split(r"## Output \(b\)", re.split(r"## Output \(a\):", prompt)[-1])[0]
    best = "a" if ("GOOD" in output_a or ("REF" in output_a and "GOOD" not in prompt)) else "b"
    return f"Output ({best})"


def _install_judge(srv):
    def answer(body):
        text = _scripted_judge(body)
        if body.get("tools"):  # chatgpt_fn: the verdict arrives as a function call
            return {"tool": json.dumps({"best_output": text})}
        return text

    srv.answer = answer


@pytest.fixture
def tool_capable(fault_server):  # noqa: F811
    """The loopback server, answering function calls when asked for them."""
    handler_send = fault_server.RequestHandlerClass._send

    def _send(self, status, payload, headers=None):
        choice = (payload.get("choices") or [{}])[0]
        content = choice.get("message", {}).get("content")
        if isinstance(content, dict):  # a tool call
            choice["message"] = {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call0", "type": "function",
                 "function": {"name": "print_best_model", "arguments": content["tool"]}}]}
            choice["finish_reason"] = "tool_calls"
        return handler_send(self, status, payload, headers)

    fault_server.RequestHandlerClass._send = _send
    yield fault_server
    fault_server.RequestHandlerClass._send = handler_send


@pytest.mark.slow
@pytest.mark.parametrize("annotator", ["demo_annotator", "alpaca_eval_gpt4", "chatgpt_fn"])
def test_win_rate_is_exact_unparsed_counted_cache_reused_key_kept(tool_capable, tmp_path, monkeypatch, annotator,
                                                                  caplog, capsys):
    caplog.set_level(logging.DEBUG)
    srv = tool_capable
    _install_judge(srv)
    srv.faults = [429]
    monkeypatch.setenv("MF_TEST_ALPACA_KEY", SECRET)
    monkeypatch.delenv("OPENAI_CLIENT_CONFIG_PATH", raising=False)
    data, gens = _files(tmp_path)
    out = tmp_path / "results/scores/merged_x/alpaca_eval.json"
    settings = json.dumps({"base_url": srv.base_url, "model": "gpt-4", "api_key_env": "MF_TEST_ALPACA_KEY",
                           "annotator": annotator, "max_concurrency": 2, "max_retries": 3, "timeout": 10,
                           "length_controlled": annotator == "demo_annotator"})
    argv = ["score", "--benchmark", "alpaca_eval", "--data", str(data), "--generations", str(gens),
            "--settings", settings, "--out", str(out)]
    assert main(argv) == 0

    score = json.loads(out.read_text())
    rows = {r["metric"]: r for r in score["rows"]}
    # Parsed: GOOD, GOOD, BAD, GOOD -> the model wins 3 of 4; GARBLE is unparsed.
    prefs = [1.0, 1.0, 0.0, 1.0]
    mean = sum(prefs) / 4
    sem = math.sqrt(sum((p - mean) ** 2 for p in prefs) / 3) / math.sqrt(4)
    assert rows["win_rate"]["value"] == pytest.approx(100 * mean)
    assert rows["win_rate"]["stderr"] == pytest.approx(100 * sem)
    assert rows["win_rate"]["n"] == 4 and rows["win_rate"]["n_unparsed"] == 1 and rows["win_rate"]["n_total"] == 5
    assert score["details"]["judge"]["annotator"] == annotator
    # The length-controlled win rate needs Hub files: offline it is reported as not computed.
    assert "length_controlled_winrate" not in rows
    assert score["details"]["length_controlled"].startswith("not computed")
    samples = [json.loads(line) for line in out.with_name("alpaca_eval.samples.jsonl").read_text().splitlines()]
    assert [s["parsed"] for s in samples] == [True, True, True, True, False]
    assert [s["preference"] for s in samples[:4]] == [2.0, 2.0, 1.0, 2.0]
    if annotator == "chatgpt_fn":
        assert any(r["body"].get("tools") for r in srv.requests)
    assert all(r["body"]["model"] == "gpt-4" for r in srv.requests)
    assert all(r["auth"] == f"Bearer {SECRET}" for r in srv.requests)
    cache = Path(score["details"]["caching_path"])
    assert cache.is_file() and tmp_path / "results" / "cache" in cache.parents

    sent = len(srv.requests)
    assert main(argv) == 0  # rerun: all five judgments (the unparsed one too) come from the cache
    assert len(srv.requests) == sent
    assert json.loads(out.read_text())["rows"] == score["rows"]

    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert "OPENAI_CLIENT_CONFIG_PATH" not in os.environ
    captured = capsys.readouterr()
    assert SECRET not in caplog.text and SECRET not in captured.out + captured.err


def test_unknown_annotator_is_a_clear_error(tmp_path):
    data, gens = _files(tmp_path)
    settings = json.dumps({"base_url": "http://127.0.0.1:9/v1", "model": "m", "annotator": "no_such_annotator"})
    assert main(["score", "--benchmark", "alpaca_eval", "--data", str(data), "--generations", str(gens),
                 "--settings", settings, "--out", str(tmp_path / "x.json")]) == 2


@pytest.mark.slow
def test_demo_annotator_against_launched_local_server(tiny_model_dir, tmp_path):
    from mergeflow.judge.server import served_model_name

    data, gens = _files(tmp_path)
    before = set(_processes_serving(tiny_model_dir))  # e.g. the session's judge_server
    out = tmp_path / "results/scores/demo/alpaca_eval.json"
    settings = json.dumps({"base_url": None, "model": served_model_name(tiny_model_dir),
                           "api_key_env": "MF_UNSET_DEMO_KEY", "launch": {"model": str(tiny_model_dir)},
                           "annotator": "demo_annotator", "max_concurrency": 2, "timeout": 60})
    assert main(["score", "--benchmark", "alpaca_eval", "--data", str(data), "--generations", str(gens),
                 "--settings", settings, "--out", str(out)]) == 0
    score = json.loads(out.read_text())
    row = score["rows"][0]
    assert row["metric"] == "win_rate" and row["n"] + row["n_unparsed"] == row["n_total"] == 5
    assert score["details"]["judge"]["endpoint"] == "local transformers serve"
    # The launched server is gone (only servers that ran before are left).
    assert set(_processes_serving(tiny_model_dir)) == before


def _processes_serving(model_dir: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if " serve " in cmd and str(Path(model_dir).resolve()) in cmd:
                pids.append(int(entry.name))
    return pids


def test_price_and_judge_reply_are_read_from_alpaca_evals_prefixed_fields(fault_server, tmp_path,  # noqa: F811
                                                                           monkeypatch):
    """alpaca_eval names per-sample fields `preference_price_per_example` and
    `preference_raw_completion`: the score file carries a non-zero cost and the judge's reply."""
    replies = []

    def answer(body):
        replies.append(_scripted_judge(body))
        return replies[-1]

    fault_server.answer = answer
    monkeypatch.delenv("OPENAI_CLIENT_CONFIG_PATH", raising=False)
    data, gens = _files(tmp_path)
    out = tmp_path / "results/scores/merged_x/alpaca_eval.json"
    settings = json.dumps({"base_url": fault_server.base_url, "model": "gpt-4", "annotator": "demo_annotator",
                           "max_concurrency": 2, "timeout": 10, "prices": {"input_per_1k": 0.03}})
    assert main(["score", "--benchmark", "alpaca_eval", "--data", str(data), "--generations", str(gens),
                 "--settings", settings, "--out", str(out)]) == 0
    score = json.loads(out.read_text())
    # alpaca_eval prices total tokens (the server reports 100 + 10) at input_per_1k / 1000 per
    # token, for each of the 4 parsed annotations it returns.
    assert score["details"]["price_usd"] == pytest.approx(4 * 110 * 0.03 / 1000)
    samples = [json.loads(line) for line in out.with_name("alpaca_eval.samples.jsonl").read_text().splitlines()]
    parsed = [s for s in samples if s["parsed"]]
    assert len(parsed) == 4
    assert all(s["judge_reply"] in replies and s["judge_reply"].startswith("Output (") for s in parsed)


def _stub_glm_files(monkeypatch, tmp_path, difficulty):
    """alpaca_eval's length-controlled GLM downloads `df_gamed.csv` (the instruction
    difficulty of each AlpacaEval row and two gamed baselines' annotations) from the Hub:
    serve a stub from disk with one difficulty per data-file row."""
    import numpy as np
    import pandas as pd
    from alpaca_eval.metrics import glm_winrate

    rng = np.random.default_rng(0)
    # the gamed baselines' preferences follow the difficulty: the GLM learns a non-zero weight for it
    rows = [{"model": model, "index": i, "preference": float(1 / (1 + np.exp(-2 * d))),
             "std_delta_len": float(rng.normal()),
             "instruction_difficulty": d, "not_gamed_baseline": False}
            for model in ("gamed_concise", "gamed_verbose") for i, d in enumerate(difficulty)]
    path = tmp_path / "df_gamed.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    monkeypatch.setattr(glm_winrate, "hf_hub_download", lambda **kw: str(path))


def test_length_controlled_win_rate_rows_line_up_with_instruction_difficulty(fault_server, tmp_path,  # noqa: F811
                                                                             monkeypatch):
    """Every generated instruction reaches the GLM at its data-file row (unparsed ones with a
    NaN preference): a subset of the rows that is not a prefix, with one judgment unparsed,
    gives the value of the rows lined up, not of the parsed rows renumbered 0, 1, ..."""
    import pandas as pd
    from alpaca_eval import metrics

    from mergeflow import benchmarks

    difficulty = [-3.0, 2.5, -1.0, 3.0, -2.5, 1.5, 0.5, -0.5]
    _stub_glm_files(monkeypatch, tmp_path, difficulty)
    _install_judge(fault_server)
    monkeypatch.delenv("OPENAI_CLIENT_CONFIG_PATH", raising=False)
    bench = benchmarks.get("alpaca_eval")
    outputs = {1: "GOOD answer one, a long one " * 3, 2: "BAD 2", 3: "GARBLE 3", 5: "GOOD 5", 6: "BAD answer six " * 4,
               7: "GOOD 7"}
    docs = [{"instruction": f"Describe item {i}.", "output": f"REF answer {i}" + " more" * i,
             "generator": "text_davinci_003"} for i in range(len(difficulty))]
    data = tmp_path / "alpaca_eval.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    gens = tmp_path / "generations.jsonl"
    gens.write_text("".join(  # written in another order than the data file's
        json.dumps({"doc_id": bench.doc_id(docs[i]), "prompt": "P", "output": o, "completion": o}) + "\n"
        for i, o in sorted(outputs.items(), reverse=True)))
    out = tmp_path / "results/scores/merged_x/alpaca_eval.json"
    settings = json.dumps({"base_url": fault_server.base_url, "model": "gpt-4", "annotator": "demo_annotator",
                           "max_concurrency": 2, "timeout": 10, "length_controlled": True})
    assert main(["score", "--benchmark", "alpaca_eval", "--data", str(data), "--generations", str(gens),
                 "--settings", settings, "--out", str(out)]) == 0
    score = json.loads(out.read_text())
    assert score["details"]["length_controlled"] == "computed"
    lc = {r["metric"]: r for r in score["rows"]}["length_controlled_winrate"]

    preference = {1: 2.0, 2: 1.0, 3: math.nan, 5: 2.0, 6: 1.0, 7: 2.0}  # GOOD wins, BAD loses, GARBLE unparsed
    frame = pd.DataFrame([{"instruction": docs[i]["instruction"], "output_1": docs[i]["output"],
                           "output_2": outputs[i], "generator_1": "text_davinci_003", "generator_2": "merged_x",
                           "preference": preference[i]} for i in sorted(outputs)], index=sorted(outputs))
    lined_up = metrics.get_length_controlled_winrate(frame, save_weights_dir=None)
    renumbered = metrics.get_length_controlled_winrate(
        frame[frame["preference"].notna()].reset_index(drop=True), save_weights_dir=None)
    assert abs(lined_up["length_controlled_winrate"] - renumbered["length_controlled_winrate"]) > 5  # the test bites
    assert lc["value"] == pytest.approx(lined_up["length_controlled_winrate"])
    assert lc["stderr"] == pytest.approx(lined_up["lc_standard_error"])
    assert lc["n"] == 5
