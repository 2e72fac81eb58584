"""The judge client against a loopback server that misbehaves: empty replies are retried
and never cached, malformed JSON and unusable Retry-After headers are retried with a
bounded delay, and the API key is redacted from errors, logs, replies and the cache."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mergeflow.errors import MergeflowError
from mergeflow.judge.client import JudgeClient

SECRET = "sk-mergeflow-faults-SECRET-9876"
MESSAGES = [{"role": "user", "content": "Is 2 + 2 = 4?"}]


def completion(content) -> dict:
    return {"id": "c", "object": "chat.completion", "created": 0, "model": "judge",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server API)
        self.rfile.read(int(self.headers["Content-Length"]))
        srv = self.server
        with srv.lock:
            srv.hits += 1
            step = srv.script.pop(0) if srv.script else srv.default
        status, body, headers = step(self.headers.get("Authorization", ""))
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def ok(text="verdict: yes"):
    return lambda auth: (200, completion(text), {})


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.lock, srv.hits, srv.script, srv.default = threading.Lock(), 0, [], ok()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    srv.base_url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    yield srv
    srv.shutdown()
    srv.server_close()


def client(srv, tmp_path, **kw) -> JudgeClient:
    opts = dict(max_retries=3, timeout=5.0, cache_path=tmp_path / "cache.sqlite", backoff_base=0.01,
                backoff_max=0.2)
    opts.update(kw)
    return JudgeClient(srv.base_url, "judge", SECRET, **opts)


def cached_texts(tmp_path) -> list[str]:
    with sqlite3.connect(tmp_path / "cache.sqlite") as db:
        return [row[0] for row in db.execute("SELECT text FROM judgments")]


@pytest.mark.parametrize("empty", [None, "", "  \n"])
def test_empty_reply_is_retried_and_never_cached(server, tmp_path, empty):
    server.script = [lambda auth: (200, completion(empty), {})]
    with client(server, tmp_path) as c:
        j = c.complete(MESSAGES)
    assert j.text == "verdict: yes" and server.hits == 2
    assert cached_texts(tmp_path) == ["verdict: yes"]


def test_only_empty_replies_give_an_uncached_empty_text_and_a_rerun_asks_again(server, tmp_path):
    server.default = lambda auth: (200, completion(None), {})
    with client(server, tmp_path, max_retries=2) as c:
        j = c.complete(MESSAGES)
    assert j.text == "" and server.hits == 3  # bounded: 1 + max_retries
    assert cached_texts(tmp_path) == []
    server.default = ok()  # the judge is healthy again: the rerun asks it
    with client(server, tmp_path) as c:
        j = c.complete(MESSAGES)
    assert (j.text, j.cached) == ("verdict: yes", False)


@pytest.mark.parametrize("body", [b'{"choices": [', b"<html>502 Bad Gateway</html>", b"[1, 2]", b'{"id": "x"}'])
def test_malformed_reply_is_retried(server, tmp_path, body):
    server.script = [lambda auth: (200, body, {})]
    with client(server, tmp_path) as c:
        assert c.complete(MESSAGES).text == "verdict: yes"
        assert c.accounting.retries == 1


def test_malformed_replies_past_the_bound_are_one_clear_error(server, tmp_path):
    server.default = lambda auth: (200, b'{"choices": [', {})
    with client(server, tmp_path, max_retries=2) as c, pytest.raises(MergeflowError) as err:
        c.complete(MESSAGES)
    assert "not valid JSON" in str(err.value) and "after 3 attempt(s)" in str(err.value)
    assert server.hits == 3


def test_unusable_retry_after_is_retried_with_a_bounded_delay(server, tmp_path):
    values = ["-5", "nan", "soon", "1e12", "inf", ""]
    server.script = [(lambda v: lambda auth: (429, {"error": {"message": "slow down"}}, {"Retry-After": v}))(v)
                     for v in values]
    t0 = time.monotonic()
    with client(server, tmp_path, max_retries=len(values)) as c:
        assert c.complete(MESSAGES).text == "verdict: yes"
        assert c.accounting.retries == len(values)
    assert time.monotonic() - t0 < 0.2 * len(values) + 2  # each wait capped at backoff_max


def test_api_key_is_redacted_from_errors_logs_replies_and_cache(server, tmp_path, caplog):
    echo = lambda auth: (500, {"error": {"message": "x" * 200 + f" bad key {auth}"}}, {})  # noqa: E731
    server.script = [echo, echo]
    caplog.set_level(logging.DEBUG)
    with client(server, tmp_path, max_retries=1) as c, pytest.raises(MergeflowError) as err:
        c.complete(MESSAGES)
    message = str(err.value)
    assert "HTTP 500" in message and SECRET[:12] not in message, message
    server.script = [lambda auth: (200, completion(f"I saw your key: {auth}"), {})]
    with client(server, tmp_path) as c:
        j = c.complete(MESSAGES)
    assert "[redacted]" in j.text and SECRET not in j.text
    assert SECRET not in caplog.text
    assert SECRET.encode() not in b"".join(p.read_bytes() for p in tmp_path.glob("cache.sqlite*"))


def test_an_empty_reply_cached_by_an_older_version_is_asked_again(server, tmp_path):
    from mergeflow.judge.client import JudgmentCache, request_key

    cache = JudgmentCache(tmp_path / "cache.sqlite")
    cache.put(request_key("judge", MESSAGES, {}), "judge", {}, "", 7, 3)
    cache.close()
    with client(server, tmp_path) as c:
        j = c.complete(MESSAGES)
    assert (j.text, j.cached, server.hits) == ("verdict: yes", False, 1)
