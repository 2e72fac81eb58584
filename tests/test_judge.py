"""The LLM judge: retries/backoff, cache, key hygiene (fault-injecting loopback server),
DELLA's GSM8K protocol with known verdicts, and a real local `transformers serve`."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mergeflow.cli import main
from mergeflow.errors import MergeflowError
from mergeflow.judge.client import Endpoint, JudgeClient, request_key
from mergeflow.judge.gsm8k import JudgePrompt

SECRET = "sk-mergeflow-test-SECRET-4242"


# --------------------------------------------------------------------------- loopback server
class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server API)
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.requests.append({"auth": self.headers.get("Authorization"), "body": body})
            fault = srv.faults.pop(0) if srv.faults else None
        if fault == 429:
            return self._send(429, {"error": {"message": "rate limited"}}, {"Retry-After": "0.05"})
        if fault == 500:
            return self._send(500, {"error": {"message": "internal"}})
        if fault == 400:
            return self._send(400, {"error": {"message": "bad request"}})
        if fault == "sleep":
            time.sleep(srv.sleep_s)  # longer than the client's timeout
        content = srv.answer(body)
        self._send(200, {
            "id": "cmpl", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
        })

    def _send(self, status, payload, headers=None):
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left

    def log_message(self, *args):
        pass


@pytest.fixture
def fault_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.lock = threading.Lock()
    srv.requests, srv.faults, srv.sleep_s = [], [], 1.5
    srv.answer = lambda body: "ok: " + body["messages"][-1]["content"][:20]
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.base_url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    yield srv
    srv.shutdown()
    srv.server_close()


def _client(srv, tmp_path, **kw) -> JudgeClient:
    opts = dict(max_concurrency=2, max_retries=6, timeout=0.5, cache_path=tmp_path / "cache.sqlite",
                backoff_base=0.01, backoff_max=0.1, prices={"input_per_1k": 0.03, "output_per_1k": 0.06})
    opts.update(kw)
    return JudgeClient(srv.base_url, "judge-model", SECRET, **opts)


def test_retries_on_429_500_and_timeouts_then_cache_makes_rerun_free(fault_server, tmp_path):
    fault_server.faults = [429, 500, "sleep", 429, 500]
    requests = [([{"role": "user", "content": f"question {i}"}], {"temperature": 0}) for i in range(4)]
    with _client(fault_server, tmp_path) as client:
        answers = client.complete_many(requests)
        usage = client.usage()
    assert [a.text for a in answers] == [f"ok: question {i}" for i in range(4)]
    assert not any(a.cached for a in answers)
    assert usage["retries"] == 5
    assert usage["http_requests"] == len(fault_server.requests) == 4 + 5
    assert usage["answered"] == 4 and usage["cache_hits"] == 0
    assert usage["prompt_tokens"] == 400 and usage["completion_tokens"] == 40
    assert usage["cost_usd"] == pytest.approx((400 * 0.03 + 40 * 0.06) / 1000)

    sent = len(fault_server.requests)
    with _client(fault_server, tmp_path) as client:  # a rerun (new process, same cache)
        again = client.complete_many(requests)
        usage = client.usage()
    assert len(fault_server.requests) == sent  # zero HTTP requests
    assert [a.text for a in again] == [a.text for a in answers] and all(a.cached for a in again)
    assert usage["cache_hits"] == 4 and usage["cost_usd"] == 0 and usage["cost_saved_by_cache_usd"] > 0


def test_cache_key_distinguishes_model_messages_params_and_attempt():
    msgs = [{"role": "user", "content": "x"}]
    keys = {
        request_key("m", msgs, {}),
        request_key("m2", msgs, {}),
        request_key("m", [{"role": "user", "content": "y"}], {}),
        request_key("m", msgs, {"temperature": 0}),
        request_key("m", msgs, {}, attempt=1),
    }
    assert len(keys) == 5
    assert request_key("m", msgs, {"a": 1, "b": 2}) == request_key("m", msgs, {"b": 2, "a": 1})


def test_non_retryable_error_and_exhausted_retries_are_clear_errors(fault_server, tmp_path):
    fault_server.faults = [400]
    with _client(fault_server, tmp_path) as client, pytest.raises(MergeflowError, match="HTTP 400.*not retryable"):
        client.complete([{"role": "user", "content": "q"}])
    fault_server.faults = [500] * 3
    with _client(fault_server, tmp_path, max_retries=2) as client, pytest.raises(MergeflowError, match="3 attempt"):
        client.complete([{"role": "user", "content": "q2"}])


def test_endpoint_settings_validation(monkeypatch):
    with pytest.raises(MergeflowError, match="base_url"):
        Endpoint.from_settings({"model": "gpt-4"})
    with pytest.raises(MergeflowError, match="max_concurrency"):
        Endpoint.from_settings({"model": "gpt-4", "base_url": "http://x", "max_concurrency": 0})
    with pytest.raises(MergeflowError, match="unknown judge setting"):
        Endpoint.from_settings({"model": "gpt-4", "base_url": "http://x", "api_key": SECRET})
    endpoint = Endpoint.from_settings({"model": "gpt-4", "base_url": "http://x", "api_key_env": "MF_NO_SUCH_KEY"})
    monkeypatch.delenv("MF_NO_SUCH_KEY", raising=False)
    with pytest.raises(MergeflowError, match="MF_NO_SUCH_KEY"):
        endpoint.api_key(local=False)


# --------------------------------------------------------------------------- GSM8K protocol
def _gsm8k_files(tmp_path: Path, responses: list[str]) -> tuple[Path, Path]:
    docs = [{"question": f"Question number {i}?", "answer": f"Work {i}.\n#### {i}"} for i in range(len(responses))]
    from mergeflow import benchmarks

    bench = benchmarks.get("gsm8k")
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    gens = tmp_path / "generations.jsonl"
    gens.write_text("".join(
        json.dumps({"doc_id": bench.doc_id(d), "prompt": "P " + d["question"], "output": r, "completion": r}) + "\n"
        for d, r in zip(docs, responses)
    ))
    return data, gens


def _verdict_by_response(srv):
    """A judge that reads the response under judgment: RIGHT -> [[A]], WRONG -> [[B]],
    BOTH -> both tags (never parseable), FLAKY -> no tag at first, [[A]] when re-asked."""
    seen: dict[str, int] = {}

    def answer(body):
        user = body["messages"][-1]["content"]
        response = user.split("Response: ", 1)[1]
        seen[response] = seen.get(response, 0) + 1
        if response.startswith("RIGHT"):
            return "The response is right. [[A]]"
        if response.startswith("WRONG"):
            return "It is wrong. [[B]]"
        if response.startswith("BOTH"):
            return "[[A]] or maybe [[B]]"
        return "hmm" if seen[response] == 1 else "Now sure: [[A]]"

    srv.answer = answer


def test_gsm8k_judge_cli_known_verdicts_retries_cache_and_no_key_leak(fault_server, tmp_path, monkeypatch, caplog,
                                                                      capsys):
    _verdict_by_response(fault_server)
    fault_server.faults = [429, 500]
    monkeypatch.setenv("MF_TEST_JUDGE_KEY", SECRET)
    responses = ["RIGHT 1", "WRONG 2", "BOTH 3", "FLAKY 4", "I cannot [[N]] answer"]
    data, gens = _gsm8k_files(tmp_path, responses)
    prompt = tmp_path / "judge.yaml"
    prompt.write_text(
        "extends: " + str(Path(__file__).resolve().parents[1] / "workflow/judges/gsm8k_judge.yaml") + "\n"
        "max_attempts: 3\nparams: {temperature: 0}\n"
    )
    settings = json.dumps({
        "base_url": fault_server.base_url, "model": "gpt-4", "api_key_env": "MF_TEST_JUDGE_KEY",
        "max_concurrency": 2, "max_retries": 4, "timeout": 10, "prompt": str(prompt),
        "cache": str(tmp_path / "results/cache/judge.sqlite"),
        "prices": {"input_per_1k": 0.03, "output_per_1k": 0.06},
    })
    out = tmp_path / "results/scores/m/gsm8k_judge.json"
    caplog.set_level(logging.DEBUG)
    argv = ["-v", "judge", "gsm8k", "--data", str(data), "--generations", str(gens), "--settings", settings,
            "--out", str(out)]
    assert main(argv) == 0

    score = json.loads(out.read_text())
    rows = {r["metric"]: r for r in score["rows"]}
    # correct: RIGHT, FLAKY (second ask); incorrect: WRONG; unparsed: BOTH (3 asks); NA: not sent.
    assert rows["judge_accuracy"]["value"] == pytest.approx(2 / 3)
    assert rows["judge_accuracy"]["n"] == 3
    assert rows["judge_accuracy"]["n_unparsed"] == 2 and rows["judge_accuracy"]["n_total"] == 5
    assert rows["judge_accuracy_unparsed_as_wrong"]["value"] == pytest.approx(2 / 5)
    assert score["details"]["counts"] == {"correct": 2, "incorrect": 1, "unparsed": 1, "response_na": 1}
    paid = 1 + 1 + 3 + 2
    assert len(fault_server.requests) == paid + 2  # plus the 429 and the 500
    assert score["details"]["usage"]["answered"] == paid and score["details"]["usage"]["retries"] == 2
    assert score["details"]["usage"]["cost_usd"] == pytest.approx(paid * (100 * 0.03 + 10 * 0.06) / 1000)
    # The request is DELLA's: system prompt, then question / reference solution / response.
    first_user = fault_server.requests[-1]["body"]["messages"][1]["content"]
    assert first_user.startswith("Question: Question number") and "\nReference Solution: Work " in first_user
    assert fault_server.requests[-1]["body"]["messages"][0]["content"].startswith("You are a helpful assistant, that")
    # The key reached the server (so it was really used)...
    assert all(r["auth"] == f"Bearer {SECRET}" for r in fault_server.requests)

    sent = len(fault_server.requests)
    first_rows = score["rows"]
    assert main(argv) == 0  # rerun: everything from the cache
    assert len(fault_server.requests) == sent
    again = json.loads(out.read_text())
    assert again["rows"] == first_rows and again["details"]["usage"]["cache_hits"] == paid

    # ...and nowhere else: not in files, logs, or console output.
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    captured = capsys.readouterr()
    assert SECRET not in caplog.text and SECRET not in captured.out and SECRET not in captured.err
    assert "MF_TEST_JUDGE_KEY" in out.read_text()  # the variable's name is recorded, its value is not
    rows_in_cache = sqlite3.connect(tmp_path / "results/cache/judge.sqlite").execute(
        "SELECT COUNT(*) FROM judgments").fetchone()[0]
    assert rows_in_cache == paid


def test_judge_prompt_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("system: s\nuser: 'no placeholders'\nverdicts: {correct: A, incorrect: B}\n")
    with pytest.raises(MergeflowError, match="placeholder"):
        JudgePrompt.load(bad)
    prompt = JudgePrompt.load(Path(__file__).resolve().parents[1] / "workflow/judges/gsm8k_judge.yaml")
    assert prompt.verdict("so [[A]]") == "correct" and prompt.verdict("[[B]].") == "incorrect"
    assert prompt.verdict("[[A]] [[B]]") is None and prompt.verdict("[[A]] [[A]]") is None
    assert prompt.verdict("no tag") is None


# --------------------------------------------------------------------------- real local server
@pytest.mark.slow
def test_real_local_server_answers_and_garbage_is_counted_unparsed(judge_server, tmp_path):
    base_url, served = judge_server
    data, gens = _gsm8k_files(tmp_path, ["The answer is: 0", "The answer is: 7"])
    settings = json.dumps({
        "base_url": base_url, "model": served, "max_concurrency": 2, "timeout": 60,
        "prompt": "gsm8k_judge_demo.yaml", "cache": str(tmp_path / "cache.sqlite"),
    })
    out = tmp_path / "judge.json"
    assert main(["judge", "gsm8k", "--data", str(data), "--generations", str(gens), "--settings", settings,
                 "--out", str(out)]) == 0
    score = json.loads(out.read_text())
    usage = score["details"]["usage"]
    assert usage["answered"] == 2 and usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    counts = score["details"]["counts"]
    assert sum(counts.values()) == 2
    row = score["rows"][0]
    assert row["n"] + row["n_unparsed"] == 2  # a random model's replies are counted, not dropped
    samples = [json.loads(line) for line in out.with_name("judge.samples.jsonl").read_text().splitlines()]
    assert all(len(s["replies"]) == 1 for s in samples)
