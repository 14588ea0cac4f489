"""Judges answer yes/no for (criterion, response) pairs; CaT's rubric reward is built on them.

`HTTPJudge` talks to any OpenAI-compatible ``/v1/chat/completions`` server (vLLM, hosted
models) with the standard library only. A judge failure must never stop a training run: every
pair yields a `Verdict`, with ``met=None`` (scored as not met) when the judge stayed down or its
reply held no verdict, counted in ``stats`` and reported as one warning line per batch.

Only the judge's own reply is parsed for a verdict, never the rollout; the rollout reaches the
judge fenced inside `prompts.judge`, so text in it cannot pose as a verdict or close its block.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import http.client
import json
import logging
import math
import os
import random
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from catjax.cat import prompts
from catjax.cat.rubrics import parse_verdict, rubric_reward

_log = logging.getLogger(__name__)

# Reply bodies beyond this are not a judge's verdict; reading stops there (memory bound).
MAX_REPLY_BYTES = 1 << 20
RAW_KEEP_CHARS = 2000  # how much of a reply a Verdict keeps for debugging
_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


@dataclasses.dataclass(frozen=True)
class Verdict:
    met: bool | None  # None: no usable verdict (judge down or unparsable); scored as not met
    raw: str = ""
    prob_yes: float | None = None


@dataclasses.dataclass
class JudgeStats:
    pairs: int = 0
    calls: int = 0  # requests sent (every attempt)
    retries: int = 0  # re-sends: transport retries and verdict re-asks
    unparsable: int = 0  # pairs left without a verdict because replies held none
    errors: int = 0  # pairs left without a verdict because the judge was unreachable/failed

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        out = {f"{prefix}{f.name}": float(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out[f"{prefix}none_rate"] = (self.unparsable + self.errors) / max(self.pairs, 1)
        return out


class Judge(abc.ABC):
    """Answers yes/no for (criterion, response) pairs."""

    def __init__(self) -> None:
        self.stats = JudgeStats()
        self._stats_lock = threading.Lock()  # judges may count from worker threads

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, d in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + d)

    @abc.abstractmethod
    def judge(self, pairs: Sequence[tuple[str, str]]) -> list[Verdict]:
        """One Verdict per (criterion, response) pair, in order; never raises for judge failures."""

    def rewards(self, items: Sequence[tuple[Sequence[str], str]]) -> list[float]:
        """`rubric_reward` for each (rubric, response), judging all pairs in one batch."""
        pairs = [(c, resp) for rubric, resp in items for c in rubric]
        verdicts = self.judge(pairs)
        out, pos = [], 0
        for rubric, _ in items:
            out.append(rubric_reward([v.met for v in verdicts[pos : pos + len(rubric)]]))
            pos += len(rubric)
        return out


class _Down(Exception):
    """The request failed for good (retries spent, or a non-retryable status)."""


class _BadReply(Exception):
    """The server answered, but not with a chat completion we can read."""

    def __init__(self, why: str, raw: str) -> None:
        super().__init__(why)
        self.raw = raw


def _endpoint(base_url: str) -> str:
    url = base_url.rstrip("/")
    if not url.lower().startswith(("http://", "https://")):
        raise ValueError(f"judge base_url must be http(s), got {base_url!r}")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def _prob_yes(logprobs: Any) -> float | None:
    """P(yes) / (P(yes) + P(no)) at the first answer token, from OpenAI-style top_logprobs."""
    try:
        for pos in logprobs["content"]:
            if pos["token"].strip().lower() not in ("yes", "no"):
                continue
            mass = {"yes": 0.0, "no": 0.0}
            for cand in pos.get("top_logprobs") or [pos]:
                key = cand["token"].strip().lower()
                if key in mass:
                    mass[key] += math.exp(float(cand["logprob"]))
            total = mass["yes"] + mass["no"]
            return mass["yes"] / total if total > 0 else None
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
        pass
    return None


class HTTPJudge(Judge):
    """A judge behind an OpenAI-compatible chat-completions endpoint.

    ``base_url``: e.g. ``http://127.0.0.1:8000`` or ``https://host/v1`` (``/v1/chat/completions``
    is appended as needed). The API key is read once, at construction, from the environment
    variable named ``api_key_env``; if it is unset no Authorization header is sent (local vLLM).

    Per request: ``timeout_s`` bounds each socket operation (urllib semantics). Timeouts,
    connection errors, 408/409/425/429 and 5xx are retried up to ``max_retries`` times with
    exponential back-off and jitter (``backoff_base_s * 2**n``, capped at ``backoff_max_s``,
    ``Retry-After`` honoured within that cap), and never past ``max_total_s`` per request. Other
    statuses (401, 404, ...) fail at once. A reply that is not JSON, has no
    ``choices[0].message.content`` or no parsable verdict is re-asked up to ``verdict_retries``
    times (at ``reask_temperature``; the first ask is at ``temperature``, 0 by default).

    ``logprobs=True`` asks for top-5 logprobs and fills ``Verdict.prob_yes`` where available.
    ``trust_env=False`` ignores ``http(s)_proxy`` variables (urllib honours them by default).
    Redirects are not followed and only http(s) is spoken.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 30.0,
        max_retries: int = 4,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 8.0,
        max_total_s: float = 300.0,
        max_concurrency: int = 8,
        max_tokens: int = 16,
        temperature: float = 0.0,
        verdict_retries: int = 1,
        reask_temperature: float = 0.0,
        logprobs: bool = False,
        trust_env: bool = True,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.url = _endpoint(base_url)
        self.model = model
        self.timeout_s = timeout_s
        self.max_retries = max(max_retries, 0)
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_total_s = max_total_s
        self.max_concurrency = max_concurrency
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.verdict_retries = max(verdict_retries, 0)
        self.reask_temperature = reask_temperature
        self.logprobs = logprobs
        self.extra_body = dict(extra_body or {})
        key = os.environ.get(api_key_env, "").strip()
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        # Only HTTP(S) handlers: no file:// or ftp://, no redirects, proxies only if asked.
        self._opener = urllib.request.OpenerDirector()
        handlers: list[urllib.request.BaseHandler] = [
            urllib.request.ProxyHandler(None if trust_env else {}),
            urllib.request.HTTPHandler(),
            urllib.request.HTTPSHandler(context=ssl.create_default_context()),
            urllib.request.HTTPDefaultErrorHandler(),
            urllib.request.HTTPErrorProcessor(),
        ]
        for h in handlers:
            self._opener.add_handler(h)
        self._rng = random.Random()

    def __repr__(self) -> str:  # never shows the key
        return f"HTTPJudge(url={self.url!r}, model={self.model!r})"

    # -- transport --------------------------------------------------------------------------

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        cap = min(self.backoff_max_s, self.backoff_base_s * 2**attempt)
        delay = cap / 2 + self._rng.uniform(0, cap / 2)  # "equal jitter": spread, never ~0
        if retry_after:
            with contextlib.suppress(ValueError):  # HTTP-date form: keep our own back-off
                delay = max(delay, min(float(retry_after), self.backoff_max_s))
        return delay

    def _send_once(self, body: bytes, deadline: float) -> bytes:
        """One POST. `timeout_s` bounds each socket wait; `deadline` (monotonic) the whole reply,
        which a server could otherwise trickle in a byte at a time for ever."""
        req = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
        with self._opener.open(req, timeout=self.timeout_s) as resp:
            chunks, size = [], 0
            while size < MAX_REPLY_BYTES:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"reply not complete within max_total_s={self.max_total_s}")
                chunk = resp.read1(min(1 << 16, MAX_REPLY_BYTES - size))  # what has arrived
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks)

    def _post(self, payload: dict[str, Any]) -> bytes:
        """POST with bounded retries; raises _Down once the judge is given up on."""
        body = json.dumps(payload).encode()
        start = time.monotonic()
        for attempt in range(self.max_retries + 1):
            self._count(calls=1)
            retry_after = None
            try:
                return self._send_once(body, start + self.max_total_s)
            except urllib.error.HTTPError as e:
                why = f"HTTP {e.code}"
                retry_after = e.headers.get("Retry-After") if e.headers else None
                e.close()
                if e.code not in _RETRY_STATUS:
                    raise _Down(why) from None
            except urllib.error.URLError as e:
                why = f"connection error: {e.reason}"
            except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as e:
                why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if attempt == self.max_retries:
                break
            delay = self._backoff(attempt, retry_after)
            if time.monotonic() - start + delay + self.timeout_s > self.max_total_s:
                why += " (total time budget spent)"
                break
            self._count(retries=1)
            time.sleep(delay)
        raise _Down(f"{why} after {attempt + 1} attempt(s)")

    def _ask(self, messages: prompts.Messages, temperature: float) -> tuple[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model, "messages": messages, "temperature": temperature,
            "max_tokens": self.max_tokens, "n": 1, **self.extra_body,
        }
        if self.logprobs:
            payload.update(logprobs=True, top_logprobs=5)
        raw = self._post(payload)
        text = raw.decode("utf-8", errors="replace")
        try:
            choice = json.loads(text)["choices"][0]
            content = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _BadReply("reply is not a chat completion", text[:RAW_KEEP_CHARS]) from None
        if not isinstance(content, str):
            raise _BadReply("reply content is not text", text[:RAW_KEEP_CHARS])
        return content, choice.get("logprobs") if isinstance(choice, dict) else None

    # -- judging ----------------------------------------------------------------------------

    def _judge_one(self, pair: tuple[str, str]) -> tuple[Verdict, str | None]:
        """(verdict, error) for one pair; error is set when the judge was unreachable."""
        criterion, response = pair
        messages = prompts.judge(criterion, response)
        raw = ""
        for ask in range(self.verdict_retries + 1):
            if ask:
                self._count(retries=1)
            try:
                temperature = self.reask_temperature if ask else self.temperature
                content, logprobs = self._ask(messages, temperature)
            except _Down as e:
                self._count(errors=1)
                return Verdict(None, raw=raw), str(e)
            except _BadReply as e:
                raw = e.raw
                continue
            met = parse_verdict(content)  # the judge's own reply only, never the rollout
            if met is not None:
                prob = _prob_yes(logprobs) if self.logprobs else None
                return Verdict(met, raw=content[:RAW_KEEP_CHARS], prob_yes=prob), None
            raw = content[:RAW_KEEP_CHARS]
        self._count(unparsable=1)
        return Verdict(None, raw=raw), None

    def _judge_safe(self, pair: tuple[str, str]) -> tuple[Verdict, str | None]:
        try:
            return self._judge_one(pair)
        except Exception as e:  # a bug or oddity here must cost one reward, not the run
            self._count(errors=1)
            return Verdict(None), f"unexpected {type(e).__name__}: {e}"

    def judge(self, pairs: Sequence[tuple[str, str]]) -> list[Verdict]:
        pairs = list(pairs)
        if not pairs:
            return []
        self._count(pairs=len(pairs))
        workers = min(self.max_concurrency, len(pairs))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge") as pool:
            results = list(pool.map(self._judge_safe, pairs))
        errors = [err for _, err in results if err is not None]
        if errors:  # one line per batch, not per pair: a down judge must not flood the log
            _log.warning("judge %s unreachable for %d/%d pairs (last: %s); scored as not met",
                         self.url, len(errors), len(pairs), errors[-1])
        no_verdict = [v for v, err in results if err is None and v.met is None]
        if no_verdict:  # replies that were not chat completions or held no verdict, re-asked
            _log.warning("judge %s gave no verdict for %d/%d pairs after %d ask(s) (last reply: %r); "
                         "scored as not met", self.url, len(no_verdict), len(pairs),
                         self.verdict_retries + 1, " ".join(no_verdict[-1].raw.split())[:200])
        return [v for v, _ in results]
