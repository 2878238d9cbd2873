"""Checker and refiner served by a local OpenAI-compatible chat server (vLLM, lmdeploy, SGLang...),
as DyME's LLM checker/refiner use Qwen2.5-14B behind lmdeploy (reference 3.2).

Each item is one ``POST {base_url}/v1/chat/completions`` with ``model``, ``messages``,
``temperature`` and ``max_tokens``, sent from a thread pool of ``max_concurrency`` workers. The
training loop must never wait on a sick server, so:

- every request has a timeout, ``min(timeout_s, time left in the batch budget)``;
- connection errors, 5xx and 429 are retried up to ``max_retries`` times with exponential backoff
  (``backoff_s``, doubled each time, never sleeping past the budget); a timeout is not retried (a
  slow server is overloaded, not flaky), nor is any other status;
- a batch call returns after at most ``batch_budget_s`` (plus thread-switch slack); items still
  in flight then get the fallback (reason ``budget``), and their threads stop by their own
  timeout, which never extends past the budget;
- a reply that is not the JSON or the text asked for gets the fallback (reason ``parse``).

Every fallback is counted in ``stats`` as ``fallback.<reason>``, with ``requests`` and ``retries``.
Proxy environment variables are ignored: the server is meant to be local, and a corporate proxy
must not see (or stall) these requests.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import http.client
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vrl_jax.rewards.visual.base import (BUDGET, CONNECTION, ERROR, HTTP_STATUS, NO_FACTS, PARSE,
                                         TIMEOUT, CheckResult, RefineResult, SupervisionStats,
                                         VisualExample, VisualSupervision, as_visual_example,
                                         check_answer_format, check_fallback_score,
                                         config_from_fields, fallback_value, reasoning_part,
                                         strip_final_answer, unchanged_reference, with_answer_line)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclasses.dataclass(frozen=True)
class HttpConfig:
    """Fields of ``{"kind": "http", ...}``.

    Attributes:
      base_url: server root, e.g. ``http://127.0.0.1:23333`` (a trailing ``/v1`` is accepted too).
      model: the served model name, e.g. ``Qwen/Qwen2.5-14B-Instruct-AWQ``.
      timeout_s: per-request timeout.
      max_retries: retries after the first attempt, on connection errors, 5xx and 429.
      backoff_s: sleep before the first retry; doubled for each further retry.
      max_concurrency: requests in flight at once (threads), shared by checker and refiner.
      batch_budget_s: wall-clock limit of one ``check`` / ``refine`` call.
      temperature: sampling temperature sent to the server (0: deterministic grading).
      check_max_tokens / refine_max_tokens: ``max_tokens`` of the two request kinds.
      max_text_chars: longer reasoning / hints are cut to this many characters in prompts.
      strip_answer: grade only the reasoning (drop the answer flag and unwrap boxes).
      api_key_env: name of an environment variable holding a bearer token, if the server wants one.
      answer_format: the refiner's answer line when an example does not name one.
      fallback_score: the checker's score for samples it cannot score (None: NaN).
    """

    base_url: str
    model: str
    timeout_s: float = 30.0
    max_retries: int = 2
    backoff_s: float = 0.5
    max_concurrency: int = 8
    batch_budget_s: float = 120.0
    temperature: float = 0.0
    check_max_tokens: int = 32
    refine_max_tokens: int = 512
    max_text_chars: int = 6000
    strip_answer: bool = True
    api_key_env: str | None = None
    answer_format: str = "flag"
    fallback_score: float | None = None

    def __post_init__(self):
        if not isinstance(self.base_url, str) or not re.match(r"https?://[^/]", self.base_url):
            raise ValueError(f"base_url must be an http(s) URL, got {self.base_url!r}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model must be a non-empty string, got {self.model!r}")
        for name in ("timeout_s", "batch_budget_s"):
            _check_number(name, getattr(self, name), minimum=0.0, strict=True)
        for name in ("backoff_s", "temperature"):
            _check_number(name, getattr(self, name), minimum=0.0)
        for name, minimum in (("max_retries", 0), ("max_concurrency", 1), ("check_max_tokens", 1),
                              ("refine_max_tokens", 1), ("max_text_chars", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if not isinstance(self.strip_answer, bool):
            raise ValueError(f"strip_answer must be a bool, got {self.strip_answer!r}")
        if self.api_key_env is not None and not isinstance(self.api_key_env, str):
            raise ValueError(f"api_key_env must be None or an environment variable name, "
                             f"got {self.api_key_env!r}")
        check_answer_format(self.answer_format)
        check_fallback_score(self.fallback_score)

    @property
    def url(self) -> str:
        root = self.base_url.rstrip("/")
        root = root[:-3] if root.endswith("/v1") else root
        return f"{root}/v1/chat/completions"


def _check_number(name: str, value: Any, minimum: float, strict: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and (
        value > minimum if strict else value >= minimum)
    if not ok:
        raise ValueError(f"{name} must be a number {'>' if strict else '>='} {minimum}, got {value!r}")


class ItemFailure(Exception):
    """One item could not be served; ``reason`` is the fallback reason counted in stats."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Transport: one chat completion, with timeout, retries and backoff


def _classify(err: BaseException) -> tuple[str, bool]:
    """``(reason, retryable)`` of an exception raised while talking to the server."""
    if isinstance(err, urllib.error.HTTPError):
        return HTTP_STATUS, err.code in RETRY_STATUSES
    if isinstance(err, urllib.error.URLError):
        err = err.reason if isinstance(err.reason, BaseException) else OSError(str(err.reason))
    if isinstance(err, (TimeoutError, socket.timeout)):
        return TIMEOUT, False
    if isinstance(err, (OSError, http.client.HTTPException)):  # refused, reset, closed mid-reply
        return CONNECTION, True
    return ERROR, False


class ChatClient:
    """``complete(messages, max_tokens, deadline) -> content``; raises ``ItemFailure`` only."""

    def __init__(self, config: HttpConfig, stats: SupervisionStats):
        self.config = config
        self.stats = stats
        # No ProxyHandler entries: ignore *_proxy variables (see the module docstring).
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.config.api_key_env) if self.config.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _post(self, body: bytes, timeout: float) -> bytes:
        request = urllib.request.Request(self.config.url, data=body, headers=self._headers(), method="POST")
        with self._opener.open(request, timeout=timeout) as response:
            return response.read()

    def complete(self, messages: list[dict], max_tokens: int, deadline: float) -> str:
        body = json.dumps({"model": self.config.model, "messages": messages, "max_tokens": max_tokens,
                           "temperature": self.config.temperature, "stream": False}).encode("utf-8")
        delay = self.config.backoff_s
        for attempt in range(self.config.max_retries + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                raise ItemFailure(BUDGET)
            self.stats.add("requests")
            timeout = min(self.config.timeout_s, left)
            try:
                raw = self._post(body, timeout)
            except Exception as err:  # noqa: BLE001 - classified; never propagates raw
                if isinstance(err, urllib.error.HTTPError):
                    err.close()
                reason, retryable = _classify(err)
                if reason == TIMEOUT and timeout < self.config.timeout_s:
                    reason = BUDGET  # cut by the batch's budget, not by the server's slowness
                if not retryable or attempt == self.config.max_retries:
                    raise ItemFailure(reason, repr(err)) from None
                if deadline - time.monotonic() <= delay:
                    raise ItemFailure(BUDGET, f"no time left to retry after {err!r}") from None
                self.stats.add("retries")
                time.sleep(delay)
                delay *= 2
                continue
            return parse_chat_reply(raw)
        raise AssertionError("unreachable")


def parse_chat_reply(raw: bytes) -> str:
    """``choices[0].message.content`` of a chat-completions reply; ``ItemFailure(parse)`` otherwise."""
    try:
        content = json.loads(raw.decode("utf-8"))["choices"][0]["message"]["content"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
        raise ItemFailure(PARSE, f"not a chat completion: {err!r}") from None
    if not isinstance(content, str):
        raise ItemFailure(PARSE, f"content is {type(content).__name__}, not text")
    return content


# ---------------------------------------------------------------------------------------------
# Batches: a shared pool, a wall-clock budget


class BatchRunner:
    """Runs ``fn(item, deadline)`` over items in a bounded pool; returns within the budget."""

    def __init__(self, config: HttpConfig):
        self.config = config
        self._pool = concurrent.futures.ThreadPoolExecutor(config.max_concurrency,
                                                           thread_name_prefix="visual-http")
        self._lock = threading.Lock()
        self._closed = False

    def run(self, items: Sequence[Any], fn: Callable[[Any, float], Any]) -> list[tuple[Any, str | None]]:
        """``(value, None)`` or ``(None, reason)`` per item, in order."""
        deadline = time.monotonic() + self.config.batch_budget_s
        out: list[tuple[Any, str | None]] = [(None, BUDGET)] * len(items)
        try:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the visual supervision client is closed")
                futures = [self._pool.submit(fn, item, deadline) for item in items]
        except RuntimeError:
            return [(None, ERROR)] * len(items)
        concurrent.futures.wait(futures, timeout=max(0.0, deadline - time.monotonic()))
        for i, future in enumerate(futures):
            if not future.done():
                future.cancel()  # not started yet: never will; running: ends by its own timeout
                continue
            err = future.exception()
            if err is None:
                out[i] = (future.result(), None)
            else:
                out[i] = (None, err.reason if isinstance(err, ItemFailure) else ERROR)
        return out

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# Prompts (own wording, in the spirit of DyME's prompt_thinking_reward / prompt_refine)

CHECK_SYSTEM = (
    "You grade how faithfully a student's reasoning describes an image. You cannot see the image; "
    "you are given its facts as text. Judge only the reasoning's account of the image: are the facts "
    "it states consistent with the given facts, and does it state the facts the question needs? Do "
    "not grade the arithmetic or the final answer.")
CHECK_USER = (
    "{facts}\n\nQuestion: {question}\nCorrect answer: {answer}\n\n"
    "Student reasoning:\n<<<\n{reasoning}\n>>>\n\n"
    "How well does the reasoning state the image facts? high = every fact it needs is stated correctly; "
    "medium = some needed facts are missing or vague, none are wrong; low = a fact is wrong or the "
    "reasoning ignores the image. Reply with one line: Score: high, Score: medium or Score: low.")
REFINE_SYSTEM = (
    "You rewrite reference solutions of questions about images so that a small model can learn them "
    "by heart. A good rewrite is grounded in the image: it first says what the image shows, using only "
    "the given facts, then reasons step by step to the correct answer. Never invent facts.")
REFINE_USER = (
    "{facts}\n\nQuestion: {question}\nCorrect answer: {answer}\n\nReference solution:\n<<<\n{hint}\n>>>\n\n"
    "Rewrite the reference solution with these four headings, one per line:\nGoal: ...\nObservation: ...\n"
    "Reasoning: ...\nConclusion: ...\nState the image facts the question needs in the Observation, keep "
    "the correct steps of the reference, correct anything that contradicts the facts, and end the "
    "Conclusion with the correct answer. Reply with the rewritten solution only.")

_LABELS = {"low": 0.0, "medium": 0.5, "high": 1.0}  # DyME's mapping
_SCORE_LINE = re.compile(r"score\s*\**\s*[:=]\s*\**\s*([a-z]+|\d+(?:\.\d+)?(?:\s*/\s*\d+)?)", re.IGNORECASE)
_FENCE = re.compile(r"^```[a-zA-Z]*\n(.*?)\n?```$", re.DOTALL)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + " [...]"


def render_facts(ex: VisualExample, limit: int) -> str | None:
    """The image content block of a prompt: the facts, else (as DyME derives its image content
    from the hint) the reference solution; None if there is neither."""
    if ex.facts:
        lines = [f"- {name}: {value}" for name, value in ex.facts.items()]
        head = f"Image description: {ex.description}\n" if ex.description else ""
        return _clip(f"{head}Image facts:\n" + "\n".join(lines), limit)
    if ex.hint.strip():
        return "Image content (as described by a reference solution):\n" + _clip(ex.hint.strip(), limit)
    return None


def parse_score(content: str) -> float:
    """A grade in [0, 1] from a reply: the last ``Score: ...`` line, else the whole reply; accepts
    low/medium/high, a number in [0, 1], or ``k/n``. ``ItemFailure(parse)`` otherwise."""
    matches = _SCORE_LINE.findall(content)
    token = matches[-1] if matches else content.strip().strip("*_.` \n").lower()
    token = token.strip().lower()
    if token in _LABELS:
        return _LABELS[token]
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(?:\s*/\s*(\d+))?", token)
    denominator = float(m.group(2)) if m and m.group(2) else 1.0
    if m and denominator > 0 and 0.0 <= float(m.group(1)) / denominator <= 1.0:
        return float(m.group(1)) / denominator
    raise ItemFailure(PARSE, f"no score in reply {content[:200]!r}")


def parse_rewrite(content: str, ex: VisualExample, fmt: str) -> str:
    """The rewritten rationale ending with our answer line (the server's own answer line, which
    may be wrong, is dropped); ``ItemFailure(parse)`` if nothing usable remains."""
    text = content.strip()
    fenced = _FENCE.match(text)
    body = strip_final_answer(fenced.group(1) if fenced else text)
    if len(body) < 8:
        raise ItemFailure(PARSE, f"empty rewrite {content[:200]!r}")
    return with_answer_line(body, ex.answer, fmt)


# ---------------------------------------------------------------------------------------------
# Checker and refiner


class _HttpBase:
    def __init__(self, config: HttpConfig, runner: BatchRunner, client: ChatClient, stats: SupervisionStats):
        self.config, self.stats = config, stats
        self._runner, self._client = runner, client

    def _messages(self, system: str, user: str) -> list[dict]:
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def _count(self, reasons: Sequence[str | None]) -> None:
        self.stats.add("items", len(reasons))
        for reason in reasons:
            if reason is not None:
                self.stats.add(f"fallback.{reason}")

    def close(self) -> None:
        self._runner.close()


class HttpChecker(_HttpBase):
    """Thinking reward from the served model's low / medium / high grade (0 / 0.5 / 1)."""

    def _grade(self, item: tuple[str, VisualExample], deadline: float) -> float:
        reasoning, ex = item
        facts = render_facts(ex, self.config.max_text_chars)
        if facts is None:
            raise ItemFailure(NO_FACTS)
        text = reasoning_part(reasoning) if self.config.strip_answer else reasoning
        user = CHECK_USER.format(facts=facts, question=ex.question, answer=ex.answer,
                                 reasoning=_clip(text, self.config.max_text_chars))
        reply = self._client.complete(self._messages(CHECK_SYSTEM, user), self.config.check_max_tokens,
                                      deadline)
        return parse_score(reply)

    def check(self, reasonings: Sequence[str], examples: Sequence[Any]) -> CheckResult:
        if len(reasonings) != len(examples):  # a caller bug, not a per-sample failure
            raise ValueError(f"check: {len(reasonings)} reasonings for {len(examples)} examples")
        items, reasons = [], [None] * len(examples)
        for i, (text, example) in enumerate(zip(reasonings, examples)):
            try:
                items.append((str(text), as_visual_example(example)))
            except Exception:  # noqa: BLE001 - an unreadable example is one fallback
                items.append(None)
                reasons[i] = ERROR
        results = self._runner.run(items, lambda item, deadline: (
            self._grade(item, deadline) if item is not None else None))
        scores = np.full(len(items), fallback_value(self.config.fallback_score), np.float32)
        for i, (value, reason) in enumerate(results):
            if reasons[i] is None and reason is None:
                scores[i] = value
            reasons[i] = reasons[i] or reason
        self._count(reasons)
        fallback = np.array([r is not None for r in reasons], bool)
        return CheckResult(scores, fallback, tuple(reasons), tuple(results))


class HttpRefiner(_HttpBase):
    """The served model's Goal / Observation / Reasoning / Conclusion rewrite, plus our answer line."""

    def _rewrite(self, item: tuple[Any, VisualExample], deadline: float) -> str:
        _, ex = item
        fmt = ex.answer_format if ex.answer_format else self.config.answer_format
        check_answer_format(fmt)
        facts = render_facts(ex, self.config.max_text_chars) or "Image facts: (none given)"
        user = REFINE_USER.format(facts=facts, question=ex.question, answer=ex.answer,
                                  hint=_clip(ex.hint.strip() or "(none)", self.config.max_text_chars))
        reply = self._client.complete(self._messages(REFINE_SYSTEM, user), self.config.refine_max_tokens,
                                      deadline)
        return parse_rewrite(reply, ex, fmt)

    def refine(self, examples: Sequence[Any]) -> RefineResult:
        items, reasons = [], [None] * len(examples)
        for i, example in enumerate(examples):
            try:
                items.append((example, as_visual_example(example)))
            except Exception:  # noqa: BLE001 - an unreadable example is one fallback
                items.append(None)
                reasons[i] = ERROR
        results = self._runner.run(items, lambda item, deadline: (
            self._rewrite(item, deadline) if item is not None else None))
        texts = []
        for i, (value, reason) in enumerate(results):
            reasons[i] = reasons[i] or reason
            texts.append(value if reasons[i] is None
                         else unchanged_reference(examples[i], self.config.answer_format))
        self._count(reasons)
        fallback = np.array([r is not None for r in reasons], bool)
        return RefineResult(tuple(texts), fallback, tuple(reasons))


def make_http(**fields: Any) -> VisualSupervision:
    """Factory entry for ``{"kind": "http", ...}``: one pool (so ``max_concurrency`` bounds both
    together) and one stats object per role."""
    config = config_from_fields(HttpConfig, fields, "http")
    runner = BatchRunner(config)
    checker_stats, refiner_stats = SupervisionStats(), SupervisionStats()
    checker = HttpChecker(config, runner, ChatClient(config, checker_stats), checker_stats)
    refiner = HttpRefiner(config, runner, ChatClient(config, refiner_stats), refiner_stats)
    return VisualSupervision(checker, refiner)
