"""A local OpenAI-compatible judge server on 127.0.0.1: `transformers serve` (the demo)
or `vllm serve` (an open-weights judge on a GPU node), started and stopped by the judging job.

What it offers (transformers 5.23, checked): `/health`, `/v1/chat/completions` (also
streaming) and `/v1/completions`, with the model pinned to the served directory (requests
must name it). It ignores `logprobs`/`top_logprobs` (so logprob-weighted alpaca_eval
annotators cannot work against it) and only emits tool calls for models whose chat
template defines them (so function-calling annotators such as `chatgpt_fn` do not work
with the demo models): the demo annotator parses plain text instead.

`vllm serve` offers `/health`, `/v1/models` and `/v1/chat/completions` with logprobs, so
both AlpacaEval protocols work against it (workflow/judges/*_open_weights); requests name
`--served-model-name` (judge.endpoint.model unless launch.served_model_name says otherwise).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mergeflow.errors import MergeflowError

log = logging.getLogger(__name__)


def served_model_name(model_dir: str | Path) -> str:
    """The name requests must give: the server is pinned to exactly this string."""
    return str(Path(model_dir).resolve())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_executable(name: str) -> str | None:
    """A server's executable: the job's PATH first (a rule's conda env), else beside this
    Python (a virtualenv not on PATH); None if neither has it."""
    found = shutil.which(name)
    sibling = Path(sys.executable).with_name(name)
    return found or (str(sibling) if sibling.exists() else None)


def serve_command(model_dir: str | Path, port: int, device: str = "auto") -> list[str]:
    return [server_executable("transformers") or "transformers", "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
            "--device", device, "--log-level", "warning"]


def server_env(hf_home: Path) -> dict[str, str]:
    """Offline, with an HF_HOME whose hub/ exists (needed by /v1/models)."""
    (hf_home / "hub").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(hf_home), TOKENIZERS_PARALLELISM="false")
    return env


@contextlib.contextmanager
def local_server(model_dir: str | Path, port: int | None = None, device: str = "auto",
                 startup_timeout: float = 180.0) -> Iterator[str]:
    """Serve `model_dir` with `transformers serve` for the duration of the block; yields the
    base URL (".../v1"). Requests must name the model `served_model_name(model_dir)`."""
    model_dir = _model_dir(model_dir)
    port = port or free_port()
    with tempfile.TemporaryDirectory(prefix="mergeflow-judge-server-") as tmp:
        cmd = serve_command(served_model_name(model_dir), port, device)
        with _running(cmd, server_env(Path(tmp) / "hf_home"), port, startup_timeout, Path(tmp)) as base_url:
            yield base_url


# --------------------------------------------------------------------------- launch settings
SERVERS = ("transformers", "vllm")
_LAUNCH_KEYS = {"server", "model", "served_model_name", "tensor_parallel_size", "extra_args", "startup_timeout",
                "device"}
# vLLM loads (and, with tensor parallelism, shards) a 70B judge in minutes, not seconds.
DEFAULT_STARTUP_TIMEOUT = {"transformers": 180.0, "vllm": 1800.0}


@dataclass(frozen=True)
class Launch:
    """`judge.endpoint.launch`: the local judge server a judging job starts and stops."""

    model: str  # model directory
    server: str = "transformers"
    served_model_name: str | None = None  # vllm: the name requests give (default: judge.endpoint.model)
    tensor_parallel_size: int = 1  # vllm
    extra_args: tuple[str, ...] = ()  # vllm: appended to `vllm serve` as given
    startup_timeout: float | None = None
    device: str = "auto"  # transformers

    @classmethod
    def from_settings(cls, launch: dict) -> Launch:
        if not isinstance(launch, dict) or not isinstance(launch.get("model"), str) or not launch["model"]:
            raise MergeflowError("judge setting 'launch' must be {\"model\": DIR, ...} or null")
        unknown = set(launch) - _LAUNCH_KEYS
        if unknown:
            raise MergeflowError(f"unknown judge setting(s) launch.{sorted(unknown)}; known: {sorted(_LAUNCH_KEYS)}")
        server = launch.get("server") or "transformers"
        if server not in SERVERS:
            raise MergeflowError(f"judge setting launch.server must be one of {list(SERVERS)}, got {server!r}")
        tp = launch.get("tensor_parallel_size", 1)
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise MergeflowError(f"judge setting launch.tensor_parallel_size must be an integer >= 1, got {tp!r}")
        extra = launch.get("extra_args") or []
        if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
            raise MergeflowError("judge setting launch.extra_args must be a list of strings")
        timeout = launch.get("startup_timeout")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
            raise MergeflowError(f"judge setting launch.startup_timeout must be a positive number, got {timeout!r}")
        return cls(model=launch["model"], server=server, served_model_name=launch.get("served_model_name"),
                   tensor_parallel_size=tp, extra_args=tuple(extra),
                   startup_timeout=float(timeout) if timeout is not None else None,
                   device=launch.get("device") or "auto")

    def request_model(self, judge_model: str) -> str:
        """The model name requests must give to this server."""
        if self.server == "vllm":
            return self.served_model_name or judge_model
        return served_model_name(self.model)

    def executable(self) -> str | None:
        return server_executable(self.server)

    def command(self, judge_model: str, port: int) -> list[str]:
        if self.server == "transformers":
            return serve_command(served_model_name(self.model), port, self.device)
        exe = self.executable()
        if exe is None:
            raise MergeflowError("judge setting launch.server is 'vllm' but no `vllm` executable is on PATH "
                                 "(the judging rule runs in envs/vllm.yaml under --sdm conda)")
        return [exe, "serve", str(Path(self.model).resolve()), "--host", "127.0.0.1", "--port", str(port),
                "--served-model-name", self.request_model(judge_model),
                "--tensor-parallel-size", str(self.tensor_parallel_size), *self.extra_args]


@contextlib.contextmanager
def launched_server(launch: Launch, judge_model: str, port: int | None = None) -> Iterator[str]:
    """Start the configured server, wait for /health, yield the base URL, stop it."""
    _model_dir(launch.model)
    port = port or free_port()
    timeout = launch.startup_timeout or DEFAULT_STARTUP_TIMEOUT[launch.server]
    with tempfile.TemporaryDirectory(prefix=f"mergeflow-judge-{launch.server}-") as tmp:
        if launch.server == "transformers":
            env = server_env(Path(tmp) / "hf_home")
        else:  # the weights are local: vLLM must not reach for the Hub
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        with _running(launch.command(judge_model, port), env, port, timeout, Path(tmp)) as base_url:
            log.info("judge server (%s) for %s up on 127.0.0.1:%d", launch.server, launch.model, port)
            yield base_url


def _model_dir(model_dir: str | Path) -> Path:
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise MergeflowError(f"judge launch.model is not a model directory (no config.json): {model_dir}")
    return model_dir


@contextlib.contextmanager
def _running(cmd: list[str], env: dict, port: int, startup_timeout: float, tmp: Path) -> Iterator[str]:
    log_path = tmp / "server.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as a whole
            preexec_fn=parent_death_signal(),  # and stopped if this job is killed outright
        )
    try:
        _wait_healthy(proc, port, startup_timeout, log_path)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(proc)


def parent_death_signal(sig: int = signal.SIGTERM):
    """A preexec function asking Linux to send `sig` to the child when its parent dies
    (a SIGKILLed job must not leave a server behind); a no-op where prctl is unavailable."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)  # loaded here, in the parent, not after fork
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def _set() -> None:
        prctl(pr_set_pdeathsig, int(sig), 0, 0, 0)

    return _set


def _wait_healthy(proc: subprocess.Popen, port: int, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{port}/health"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise MergeflowError(f"judge server exited with status {proc.returncode}:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    stop(proc)
    raise MergeflowError(f"judge server not healthy after {timeout:.0f} s:\n{_tail(log_path)}")


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the server's process group, SIGKILL after `grace` seconds."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no server log)"
