"""A loopback OpenAI-compatible judge for tests: /health, /v1/models, /v1/chat/completions.

Imported, `start(models)` serves in a thread (a hosted endpoint listing `models`). Run as a
program it stands in for vLLM's CLI: `vllm serve MODEL --host H --port P
--served-model-name NAME --tensor-parallel-size N [...]`, parsed with vLLM's option names
(an option vLLM does not have is an argparse error, exit status 2), and appends its pid and
argv to $FAKE_VLLM_RECORD.

Its verdicts are scripted: the output containing GOOD (else the reference, REF) is better;
a prompt containing GARBLE gets an unparseable reply. AlpacaEval 1 (ranking) prompts get a
ranking, AlpacaEval 2 (m/M) prompts the token with logprobs (P(better) = 0.8), DELLA's GSM8K
prompt "[[A]]" for a response containing GOOD, else "[[B]]".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

P_BETTER = 0.8


def _between(text: str, start: str, end: str = '"""') -> str:
    return text.split(start, 1)[1].split(end, 1)[0] if start in text else ""


def _better_is_first(first: str, second: str) -> bool:
    return "GOOD" in first or ("REF" in first and "GOOD" not in second)


def verdict(body: dict) -> tuple[str, list[dict] | None]:
    """(reply text, top_logprobs of its first token or None)."""
    prompt = "\n".join(str(m.get("content")) for m in body["messages"])
    if "GARBLE" in prompt:
        return "I", ([{"token": "I", "logprob": -0.01, "bytes": [73]}] if body.get("logprobs") else None)
    if '"model_identifier": "m"' in prompt:  # AlpacaEval 2: one token, weighted by its logprobs
        first = _between(prompt, '"model_identifier": "m",\n        "output": """')
        second = _between(prompt, '"model_identifier": "M",\n        "output": """')
        best, other = ("m", "M") if _better_is_first(first, second) else ("M", "m")
        top = [{"token": best, "logprob": math.log(P_BETTER), "bytes": list(best.encode())},
               {"token": other, "logprob": math.log(1 - P_BETTER), "bytes": list(other.encode())}]
        return best, top
    if '"model": "model_1"' in prompt:  # AlpacaEval 1: a ranking
        first = _between(prompt, '"model": "model_1",\n        "answer": """')
        second = _between(prompt, '"model": "model_2",\n        "answer": """')
        ranks = (1, 2) if _better_is_first(first, second) else (2, 1)
        return f"[{{'model': 'model_1', 'rank': {ranks[0]}}}, {{'model': 'model_2', 'rank': {ranks[1]}}}]", None
    if "Final Verdict" in prompt:  # DELLA's GSM8K judge
        return ("[[A]]" if "GOOD" in _between(prompt, "Response:", "Final Verdict") else "[[B]]"), None
    return "ok", None


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server API)
        self.server.record("GET", self.path, None, self.headers.get("Authorization"))
        if self.path == "/health":
            return self._send(200, {})
        if self.path.rstrip("/") == "/v1/models":
            return self._send(200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.server.models]})
        self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.record("POST", self.path, body, self.headers.get("Authorization"))
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        if body.get("model") not in self.server.models:
            return self._send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
        text, top = verdict(body)
        choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
        if top is not None:
            choice["logprobs"] = {"content": [{"token": text, "logprob": top[0]["logprob"], "bytes": list(text.encode()),
                                               "top_logprobs": top[: body.get("top_logprobs") or 1]}]}
        self._send(200, {"id": "cmpl", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [choice],
                         "usage": {"prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101}})

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, models: list[str]) -> None:
        super().__init__((host, port), Handler)
        self.models = list(models)
        self.requests: list[dict] = []
        self._lock = threading.Lock()

    def record(self, method, path, body, auth) -> None:
        with self._lock:
            self.requests.append({"method": method, "path": path, "body": body, "auth": auth})

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


def start(models: list[str]) -> FakeServer:
    """A hosted endpoint in a thread (stop it with .shutdown(); .server_close())."""
    srv = FakeServer("127.0.0.1", 0, models)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def vllm_parser() -> argparse.ArgumentParser:
    """The subset of `vllm serve`'s options the launcher may use, spelt as vLLM spells them."""
    parser = argparse.ArgumentParser(prog="vllm", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", allow_abbrev=False)
    serve.add_argument("model_tag")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", nargs="+", default=None)
    serve.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    serve.add_argument("--max-model-len", type=int)
    serve.add_argument("--dtype")
    serve.add_argument("--gpu-memory-utilization", type=float)
    serve.add_argument("--max-logprobs", type=int)
    return parser


def main(argv: list[str]) -> int:
    args = vllm_parser().parse_args(argv)
    record = os.environ.get("FAKE_VLLM_RECORD")
    if record:
        with open(record, "a") as fh:
            fh.write(json.dumps({"pid": os.getpid(), "argv": argv}) + "\n")
    if not os.path.isfile(os.path.join(args.model_tag, "config.json")):
        print(f"no model at {args.model_tag}", file=sys.stderr)
        return 1
    names = args.served_model_name or [args.model_tag]
    srv = FakeServer(args.host or "0.0.0.0", args.port, names)
    srv.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

