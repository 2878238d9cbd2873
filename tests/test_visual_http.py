"""DyME's visual checker and refiner served over HTTP (`rewards/visual/http_client.py`), against a stub
chat-completions server: replies, malformed replies, retries, timeouts and the batch budget, the
concurrency limit, and score parsing."""

from __future__ import annotations

import http.server
import json
import math
import socket
import threading
import time

import numpy as np
import pytest

from tests.test_visual_supervision import RECT
from vrl_jax.rewards.visual import make_visual_supervision
from vrl_jax.rewards.visual.base import SupervisionStats
from vrl_jax.rewards.visual.http_client import ChatClient, HttpConfig, ItemFailure, parse_score




class StubServer:
    """A threaded OpenAI-compatible stub on 127.0.0.1. ``behaviour(payload, n)`` -> ``(status,
    body, delay_s)`` where ``n`` counts this payload's earlier requests (for retry scenarios)."""

    def __init__(self, behaviour):
        self.behaviour, self.requests, self.paths = behaviour, [], []
        self.inflight = self.max_inflight = 0
        self.lock, self.stop = threading.Lock(), threading.Event()
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    key = json.dumps(payload["messages"])
                    n = sum(json.dumps(p["messages"]) == key for p in stub.requests)
                    stub.requests.append(payload)
                    stub.paths.append(self.path)
                    stub.inflight += 1
                    stub.max_inflight = max(stub.max_inflight, stub.inflight)
                try:
                    status, body, delay = stub.behaviour(payload, n)
                    stub.stop.wait(delay)
                finally:
                    # Leave the count before replying: once the client has read the reply it may
                    # send its next request, which must not overlap this finished one.
                    with stub.lock:
                        stub.inflight -= 1
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up (timeout): expected in those tests

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    def close(self):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def stub():
    servers = []

    def start(behaviour):
        servers.append(StubServer(behaviour))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def chat(content):
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()


def http_pair(url, **overrides):
    fields = {"kind": "http", "base_url": url, "model": "stub-model", "timeout_s": 0.5, "max_retries": 2,
              "backoff_s": 0.02, "max_concurrency": 4, "batch_budget_s": 3.0, **overrides}
    return make_visual_supervision(fields)


def _user(payload):
    return payload["messages"][-1]["content"]


def _quoted(payload):
    """The text the prompt quotes between <<< and >>> (the reasoning or the reference)."""
    return _user(payload).split("<<<\n", 1)[1].split("\n>>>", 1)[0]


def test_http_normal_replies(stub):
    def grade(payload, n):
        quoted = _quoted(payload)
        label = "high" if "width is 7" in quoted else "medium" if "width" in quoted else "low"
        return 200, chat(f"The facts match.\nScore: {label}"), 0.0
    server = stub(grade)
    vs = http_pair(server.url + "/v1/")
    out = vs.checker.check(["The width is 7.", "The width is unclear.", "No idea."], [RECT] * 3)
    vs.close()
    np.testing.assert_array_equal(out.scores, [1.0, 0.5, 0.0])
    assert not out.fallback.any() and out.reasons == (None, None, None)
    assert set(server.paths) == {"/v1/chat/completions"}
    payload = server.requests[0]
    assert payload["model"] == "stub-model" and payload["temperature"] == 0.0 and payload["max_tokens"] == 32
    assert [m["role"] for m in payload["messages"]] == ["system", "user"]
    assert "- width: 7" in _user(payload) and "- height: 4" in _user(payload)
    assert vs.checker.stats.snapshot() == {"requests": 3, "items": 3}


def test_http_refiner_keeps_the_rewrite_and_replaces_its_answer_line(stub):
    rewrite = ("Goal: area.\nObservation: width 7, height 4.\nReasoning: 7 * 4 = 28.\nConclusion: 28.\n"
               "Answer: 99")
    server = stub(lambda payload, n: (200, chat(f"```\n{rewrite}\n```"), 0.0))
    vs = http_pair(server.url)
    out = vs.refiner.refine([RECT, {**RECT, "answer_format": "boxed"}])
    vs.close()
    assert out.texts[0] == rewrite.replace("Answer: 99", "Answer: 28")
    assert out.texts[1].endswith("Conclusion: 28.\nThe answer is \\boxed{28}.")
    assert "Reference solution:\n<<<\n" + RECT["hint"] in _user(server.requests[0])
    assert server.requests[0]["max_tokens"] == 512 and not out.fallback.any()


def test_http_malformed_replies_fall_back_and_are_counted(stub):
    replies = {"The width is 7.": b"{not json", "w2": chat("Looks fine to me."), "w3": b'{"choices": []}'}
    server = stub(lambda payload, n: (200, next(v for k, v in replies.items() if k in _user(payload)), 0.0))
    vs = http_pair(server.url)
    out = vs.checker.check(list(replies), [RECT] * 3)
    refined = vs.refiner.refine([{**RECT, "hint": "Steps w3."}, {**RECT, "hint": "The width is 7."}])
    vs.close()
    assert out.fallback.all() and np.isnan(out.scores).all() and out.reasons == ("parse",) * 3
    assert vs.checker.stats.snapshot()["fallback.parse"] == 3
    assert refined.texts == ("Steps w3.\nAnswer: 28", "The width is 7.\nAnswer: 28")
    assert refined.reasons == ("parse", "parse") and refined.fallback.all()
    assert vs.refiner.stats.snapshot()["fallback.parse"] == 2
    assert len(server.requests) == 5  # a parse failure is not retried


def test_http_retries_5xx_then_succeeds_but_not_4xx(stub):
    def flaky(payload, n):
        if "bad request" in _user(payload):
            return 400, b"{}", 0.0
        if "always down" in _user(payload):
            return 503, b"{}", 0.0
        return (500, b"oops", 0.0) if n == 0 else (200, chat("Score: high"), 0.0)
    server = stub(flaky)
    vs = http_pair(server.url)
    out = vs.checker.check(["width 7", "bad request", "always down"], [RECT] * 3)
    vs.close()
    assert out.scores[0] == 1.0 and out.reasons == (None, "http_status", "http_status")
    stats = vs.checker.stats.snapshot()
    assert stats["requests"] == 2 + 1 + 3 and stats["retries"] == 1 + 2
    assert stats["fallback.http_status"] == 2


def test_http_timeout_returns_within_budget_with_fallbacks(stub):
    server = stub(lambda payload, n: (200, chat("Score: high"), 0.0 if "fast" in _quoted(payload) else 5.0))
    vs = http_pair(server.url, timeout_s=0.2, batch_budget_s=2.0, max_concurrency=4)
    start = time.monotonic()
    out = vs.checker.check(["a", "b", "c", "d"], [RECT] * 4)
    elapsed = time.monotonic() - start
    vs.close()
    # One 0.2 s timeout per item, in parallel, no retry; the server would answer after 5 s. The
    # bound is loose because CI runs this beside another busy test worker.
    assert elapsed < 2.5, elapsed
    assert out.reasons == ("timeout",) * 4 and np.isnan(out.scores).all()
    assert vs.checker.stats.snapshot()["fallback.timeout"] == 4
    # Budget shorter than the timeout: the call still returns on time; queued items never start.
    vs2 = http_pair(server.url, timeout_s=5.0, batch_budget_s=0.4, max_concurrency=2)
    try:
        start = time.monotonic()
        out = vs2.refiner.refine([RECT] * 5)
        elapsed = time.monotonic() - start
        assert 0.35 < elapsed < 2.5, elapsed  # the budget (0.4 s), not the 5 s timeout
        assert out.reasons == ("budget",) * 5 and out.texts == (RECT["hint"] + "\nAnswer: 28",) * 5
        assert vs2.refiner.stats.snapshot()["fallback.budget"] == 5
        # The two started requests were cut at the budget (not at timeout_s), so the pool is free
        # again for the next batch; the three queued items never reached the server.
        time.sleep(0.2)
        assert vs2.checker.check(["fast"], [RECT]).scores[0] == 1.0
        assert len(server.requests) == 4 + 2 + 1
    finally:
        vs2.close()


def test_a_request_cut_by_the_budget_fails_as_budget_not_timeout(stub):
    """A request's timeout is min(timeout_s, budget left); when the budget is what cut it, the item's
    reason is the budget, whichever of the socket's timeout and the batch's wait fires first."""
    server = stub(lambda payload, n: (200, chat("Score: high"), 5.0))
    message = [{"role": "user", "content": "x"}]
    for timeout_s, budget_s, reason in ((5.0, 0.2, "budget"), (0.2, 3.0, "timeout")):
        client = ChatClient(HttpConfig(base_url=server.url, model="stub-model", timeout_s=timeout_s, max_retries=0),
                            SupervisionStats())
        with pytest.raises(ItemFailure) as failure:
            client.complete(message, 8, time.monotonic() + budget_s)
        assert failure.value.reason == reason


def test_http_connection_refused_is_retried_then_counted():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed on exit: nothing listens there
    vs = http_pair(f"http://127.0.0.1:{port}", max_retries=2, backoff_s=0.01)
    start = time.monotonic()
    out = vs.checker.check(["a", "b"], [RECT] * 2)
    vs.close()
    assert time.monotonic() - start < 1.4  # 0.01 s backoffs; the default 0.5 s would take 1.5 s
    assert out.reasons == ("connection",) * 2 and out.fallback.all()
    assert vs.checker.stats.snapshot() == {"requests": 6, "retries": 4, "items": 2, "fallback.connection": 2}


def test_http_concurrency_limit_is_respected(stub):
    server = stub(lambda payload, n: (200, chat("Score: medium"), 0.1))
    vs = http_pair(server.url, max_concurrency=2)
    start = time.monotonic()
    out = vs.checker.check([f"text {i}" for i in range(8)], [RECT] * 8)
    elapsed = time.monotonic() - start
    vs.close()
    np.testing.assert_array_equal(out.scores, 0.5)
    assert server.max_inflight == 2
    assert elapsed >= 0.4 - 0.05  # 8 requests of 0.1 s, two at a time


def test_http_items_without_facts_use_the_hint_or_fall_back(stub):
    server = stub(lambda payload, n: (200, chat("score: 1"), 0.0))
    vs = http_pair(server.url)
    out = vs.checker.check(["a", "b"], [{"hint": "The width is 7.", "answer": "1"}, {"answer": "1"}])
    vs.close()
    assert out.scores[0] == 1.0 and out.reasons == (None, "no_facts")
    assert "reference solution" in _user(server.requests[0]) and len(server.requests) == 1


@pytest.mark.parametrize("reply,expected", [
    ("Score: high", 1.0), ("score = Medium", 0.5), ("**Score:** low", 0.0), ("HIGH.", 1.0),
    ("Score: 0.75", 0.75), ("Score: 7/10", 0.7), ("first Score: low, on reflection Score: high", 1.0),
])
def test_score_parsing(reply, expected):
    assert math.isclose(parse_score(reply), expected)


@pytest.mark.parametrize("reply", ["Score: 7", "Score: 3/0", "great", "", "Score: excellent"])
def test_score_parsing_rejects(reply):
    with pytest.raises(Exception, match="parse"):
        parse_score(reply)
