"""OpenAI-compatible judge client: bounded concurrency, retries with backoff, a persistent
cache so that a rerun never pays twice, token and cost accounting.

The API key is read from the environment variable the settings name (`api_key_env`); it
is handed to the `openai` client and nowhere else: never logged, never written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import sqlite3
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mergeflow.errors import MergeflowError

log = logging.getLogger(__name__)

LOCAL_DUMMY_KEY = "mergeflow-local-judge"  # a launched local server checks no key
_ENDPOINT_KEYS = {"base_url", "model", "api_key_env", "launch", "max_concurrency", "max_retries", "timeout", "cache",
                  "prices"}
_OTHER_JUDGE_KEYS = {"annotator", "prompt", "length_controlled"}  # read by the judging commands


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Endpoint:
    """Judge endpoint settings (docs/architecture.md, "Judge settings")."""

    model: str
    base_url: str | None = None
    api_key_env: str | None = None
    launch: dict | None = None
    max_concurrency: int = 4
    max_retries: int = 6
    timeout: float = 120.0
    cache: str | None = None
    prices: dict = field(default_factory=dict)  # input_per_1k, output_per_1k (USD)

    @classmethod
    def from_settings(cls, settings: dict) -> Endpoint:
        unknown = set(settings) - _ENDPOINT_KEYS - _OTHER_JUDGE_KEYS
        if unknown:
            raise MergeflowError(f"unknown judge setting(s) {sorted(unknown)}; known: {sorted(_ENDPOINT_KEYS)}")
        if not isinstance(settings.get("model"), str) or not settings["model"]:
            raise MergeflowError("judge setting 'model' (the judge model's name) is required")
        launch = settings.get("launch")
        if launch is not None:
            from mergeflow.judge.server import Launch

            Launch.from_settings(launch)  # validated here, before anything starts
        if not settings.get("base_url") and launch is None:
            raise MergeflowError("judge settings need 'base_url' or 'launch' (a local server to start)")
        for key, kind in (("max_concurrency", int), ("max_retries", int), ("timeout", (int, float))):
            value = settings.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kind) or value < 0
                                      or (key != "max_retries" and value == 0)):
                raise MergeflowError(f"judge setting {key!r} must be a positive number, got {value!r}")
        prices = settings.get("prices") or {}
        for key, value in prices.items():
            if key not in ("input_per_1k", "output_per_1k") or not isinstance(value, (int, float)) or value < 0:
                raise MergeflowError(f"judge setting prices.{key} must be input_per_1k/output_per_1k >= 0")
        kwargs = {k: settings[k] for k in _ENDPOINT_KEYS if settings.get(k) is not None}
        return cls(**kwargs)

    def api_key(self, local: bool) -> str:
        """The key from `api_key_env`; a dummy one for a server we launched or one on this
        machine (vLLM / transformers serve check none)."""
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            return key
        if local or _is_loopback(self.base_url):
            return LOCAL_DUMMY_KEY
        raise MergeflowError(
            f"judge API key missing: set the environment variable {self.api_key_env!r}"
            if self.api_key_env
            else "judge setting 'api_key_env' (the variable holding the key) is required for a remote endpoint"
        )


def _is_loopback(url: str | None) -> bool:
    from urllib.parse import urlparse

    return bool(url) and urlparse(url).hostname in ("127.0.0.1", "localhost", "::1")


def default_cache_path(out: str | Path, name: str = "judge.sqlite") -> Path:
    """results/cache/<name> for an output under results/, else beside the output."""
    out = Path(out).resolve()
    for parent in out.parents:
        if parent.name == "results":
            return parent / "cache" / name
    return out.parent / name


# --------------------------------------------------------------------------- cache
class JudgmentCache:
    """sqlite: request key -> response; written after every answer, so a killed job
    resumes without paying again. Safe across threads and concurrent processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS judgments (key TEXT PRIMARY KEY, model TEXT, request TEXT, "
                "text TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, created REAL)"
            )

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute(
                "SELECT text, prompt_tokens, completion_tokens FROM judgments WHERE key = ?", (key,)
            ).fetchone()
        if row is None:
            return None
        return {"text": row[0], "prompt_tokens": row[1], "completion_tokens": row[2]}

    def put(self, key: str, model: str, request: dict, text: str, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO judgments VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, model, json.dumps(request, ensure_ascii=False), text, prompt_tokens, completion_tokens,
                 time.time()),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()


def request_key(model: str, messages: Sequence[dict], params: dict, attempt: int = 0) -> str:
    """hash(judge model, messages, params[, attempt]): the identity of a paid request."""
    payload = {"model": model, "messages": list(messages), "params": params}
    if attempt:
        payload["attempt"] = attempt  # a deliberate re-ask (e.g. unparseable verdict) is a new request
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- client
@dataclass(frozen=True)
class Judgment:
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool


@dataclass
class Accounting:
    http_requests: int = 0  # every attempt that reached the wire, retries included
    retries: int = 0
    answered: int = 0  # paid answers (not from cache)
    cache_hits: int = 0
    prompt_tokens: int = 0  # paid tokens
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0

    def as_dict(self, prices: dict) -> dict:
        pin, pout = prices.get("input_per_1k"), prices.get("output_per_1k")
        out = dict(self.__dict__)
        if pin is not None or pout is not None:
            out["cost_usd"] = round((self.prompt_tokens * (pin or 0) + self.completion_tokens * (pout or 0)) / 1000, 6)
            out["cost_saved_by_cache_usd"] = round(
                (self.cached_prompt_tokens * (pin or 0) + self.cached_completion_tokens * (pout or 0)) / 1000, 6
            )
            out["prices"] = dict(prices)
        else:
            out["cost_usd"] = None  # no prices configured
        return out


class JudgeClient:
    """Chat completions against one OpenAI-compatible endpoint."""

    RETRY_STATUSES = {408, 409, 429, 500, 502, 503, 504}

    def __init__(self, base_url: str, model: str, api_key: str, *, request_model: str | None = None,
                 max_concurrency: int = 4, max_retries: int = 6, timeout: float = 120.0,
                 cache_path: str | Path | None = None, prices: dict | None = None,
                 backoff_base: float = 1.0, backoff_max: float = 60.0, seed: int = 0) -> None:
        import openai

        self.model = model  # the judge's identity (cache key, results)
        self.request_model = request_model or model  # what the endpoint calls it
        self.base_url = base_url
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self.prices = dict(prices or {})
        self._secret = api_key if api_key and api_key != LOCAL_DUMMY_KEY else None  # redacted wherever seen
        # Retries are ours (counted, logged, with backoff): the openai client must not retry too.
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout)
        self._cache = JudgmentCache(cache_path) if cache_path else None
        self._rng = random.Random(seed)  # backoff jitter
        self._lock = threading.Lock()
        self.accounting = Accounting()

    @classmethod
    def from_endpoint(cls, endpoint: Endpoint, base_url: str, *, request_model: str | None = None,
                      cache_path: str | Path | None = None, local: bool = False) -> JudgeClient:
        return cls(base_url, endpoint.model, endpoint.api_key(local), request_model=request_model,
                   max_concurrency=endpoint.max_concurrency, max_retries=endpoint.max_retries,
                   timeout=endpoint.timeout, cache_path=endpoint.cache or cache_path, prices=endpoint.prices)

    # ------------------------------------------------------------------ public
    def complete(self, messages: Sequence[dict], params: dict | None = None, attempt: int = 0) -> Judgment:
        params = dict(params or {})
        key = request_key(self.model, messages, params, attempt)
        if self._cache is not None:
            hit = self._cache.get(key)
            # (an empty reply, cached by an older version, is asked again)
            if hit is not None and (hit["text"] or "").strip():
                with self._lock:
                    self.accounting.cache_hits += 1
                    self.accounting.cached_prompt_tokens += hit["prompt_tokens"] or 0
                    self.accounting.cached_completion_tokens += hit["completion_tokens"] or 0
                return Judgment(hit["text"], hit["prompt_tokens"] or 0, hit["completion_tokens"] or 0, True)
        text, usage = self._call_with_retries(messages, params)
        text = self.redact(text)  # a reply that echoes the key never reaches a score file
        ptok, ctok = _tokens(usage)
        with self._lock:
            self.accounting.answered += 1
            self.accounting.prompt_tokens += ptok
            self.accounting.completion_tokens += ctok
        if self._cache is not None and text.strip():  # an empty reply is a failure, never remembered
            self._cache.put(key, self.model, {"messages": list(messages), "params": params, "attempt": attempt},
                            text, ptok, ctok)
        return Judgment(text, ptok, ctok, False)

    def complete_many(self, requests: Sequence[tuple[Sequence[dict], dict]], progress=None) -> list[Judgment]:
        """Many requests with at most `max_concurrency` in flight; results in input order."""

        def one(req):
            try:
                return self.complete(*req)
            finally:
                if progress is not None:
                    progress()

        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return list(pool.map(one, requests))

    def usage(self) -> dict:
        return self.accounting.as_dict(self.prices)

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
        self._client.close()

    def __enter__(self) -> JudgeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def redact(self, text: str) -> str:
        """`text` with the API key replaced: for every message, log line and reply kept."""
        return text.replace(self._secret, "[redacted]") if self._secret and text else text

    # ------------------------------------------------------------------ internals
    def _call_with_retries(self, messages, params):
        """(reply text, usage). HTTP errors that may pass, timeouts, malformed replies
        (not JSON, no choices) and empty replies are retried up to `max_retries` times;
        an empty reply after the last retry is returned as "" (the caller counts it
        unparsed, nothing caches it), anything else raises a one-line MergeflowError."""
        import openai

        for attempt in range(self.max_retries + 1):
            with self._lock:
                self.accounting.http_requests += 1
            err = None
            try:
                resp = self._client.chat.completions.create(
                    model=self.request_model, messages=list(messages), **params
                )
            except (openai.APITimeoutError, openai.APIConnectionError, openai.APIStatusError) as exc:
                status = getattr(exc, "status_code", None)
                retryable = status is None or status in self.RETRY_STATUSES
                what, err = f"HTTP {status}" if status else type(exc).__name__, exc
            except (ValueError, openai.APIResponseValidationError) as exc:  # (JSONDecodeError is a ValueError)
                retryable, what, err = True, "a reply that is not valid JSON", exc
            else:
                choices = getattr(resp, "choices", None)
                message = getattr(choices[0], "message", None) if isinstance(choices, list) and choices else None
                if message is None:
                    retryable, what = True, "a reply without choices"
                else:
                    text = message.content or ""
                    if text.strip():
                        return text, resp.usage
                    retryable, what = True, "an empty reply"
                    if attempt == self.max_retries:
                        return "", resp.usage
                    ptok, ctok = _tokens(resp.usage)  # paid for, although discarded
                    with self._lock:
                        self.accounting.prompt_tokens += ptok
                        self.accounting.completion_tokens += ctok
            if not retryable or attempt == self.max_retries:
                raise MergeflowError(self.redact(
                    f"judge request to {self.base_url} (model {self.request_model!r}) failed: {what}"
                    f"{'' if retryable else ' (not retryable)'} after {attempt + 1} attempt(s)"
                    + (f": {_brief(self.redact(str(err)))}" if err is not None else "")  # redact, then cut
                )) from None
            delay = self._delay(attempt, err)
            with self._lock:
                self.accounting.retries += 1
            log.warning("judge request: %s; retry %d/%d in %.2f s", self.redact(what), attempt + 1,
                        self.max_retries, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _delay(self, attempt: int, err) -> float:
        """Exponential backoff with jitter; a server's usable Retry-After wins, capped at
        `backoff_max`."""
        response = getattr(err, "response", None)
        wait = _retry_after(response.headers.get("retry-after") if response is not None else None)
        if wait is not None:
            return min(wait, self.backoff_max)
        base = min(self.backoff_max, self.backoff_base * 2**attempt)
        with self._lock:
            return base * (0.5 + 0.5 * self._rng.random())


def _retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header asks for (delay-seconds or an HTTP date, RFC 9110);
    None when absent or unusable (negative, not finite, not a number or date)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _tokens(usage) -> tuple[int, int]:
    return (getattr(usage, "prompt_tokens", 0) or 0, getattr(usage, "completion_tokens", 0) or 0) if usage else (0, 0)


def _brief(err: Exception | str, chars: int = 300) -> str:
    return str(err).replace("\n", " ")[:chars]


# --------------------------------------------------------------------------- reaching it
@dataclass(frozen=True)
class Reached:
    base_url: str
    request_model: str  # the model name the endpoint expects
    local: bool  # a server we launched (no key needed)


def reach(endpoint: Endpoint):
    """Context manager: the endpoint's URL, launching a local server first if configured."""
    import contextlib

    from mergeflow.judge.server import Launch, launched_server

    @contextlib.contextmanager
    def _reach():
        if endpoint.launch is not None:
            launch = Launch.from_settings(endpoint.launch)
            with launched_server(launch, endpoint.model) as base_url:
                yield Reached(base_url, launch.request_model(endpoint.model), True)
        else:
            yield Reached(endpoint.base_url, endpoint.model, False)

    return _reach()


def describe(endpoint: Endpoint) -> dict:
    """What the results say about the judge (never the key, not even its variable's value)."""
    return {
        "model": endpoint.model,
        "endpoint": f"local {endpoint.launch.get('server') or 'transformers'} serve" if endpoint.launch
        else endpoint.base_url,
        "api_key_env": endpoint.api_key_env,
    }
