"""DyME visual supervision: the rule-based checker's rule, the refiner round trip on synthgeo, the
HTTP pair against a stub OpenAI-compatible server on 127.0.0.1, and the factory's errors."""
from __future__ import annotations

import http.server
import importlib.util
import json
import math
import socket
import threading
import time

import ml_collections
import numpy as np
import pytest

from vrl_jax.data.formats import Example, load_examples
from vrl_jax.data.synthgeo.export import write_split
from vrl_jax.data.synthgeo.families import FAMILIES
from vrl_jax.data.synthgeo.generator import generate_item
from vrl_jax.rewards.formatting import answer_flag_format
from vrl_jax.rewards.visual import (DEFAULT_KIND, Checker, HttpConfig, IdentityRefiner, Refiner, RuleBasedChecker,
                                    RuleBasedConfig, RuleBasedRefiner, VisualSupervision, as_visual_example,
                                    assess, flatten_facts, make_visual_supervision, strip_final_answer)
from vrl_jax.rewards.visual.base import SupervisionStats
from vrl_jax.rewards.visual.http_client import ChatClient, ItemFailure, parse_score
from vrl_jax.rewards.visual.rule_based import find_mentions, normalize_text

needs_lemminflect = pytest.mark.skipif(importlib.util.find_spec("lemminflect") is None,
                                       reason="lemminflect (install_requires) is missing: pip install -e .")

RECT = {"question": "Find the area of the rectangle.", "answer": "28",
        "hint": "Observation: The sides are 7 and 4.\nReasoning: Area = 7 * 4 = 28.",
        "visual_facts": {"width": 7, "height": 4}}


def score(text, facts, **config):
    return RuleBasedChecker(RuleBasedConfig(**config)).check([text], [{"visual_facts": facts}])


# ---------------------------------------------------------------------------------------------
# Rule-based checker


def test_all_facts_stated_scores_one_missing_lowers_wrong_is_penalised():
    texts = ["The rectangle is 7 by 4, so the area is 28.",      # both, by value
             "The width is 7, so the area follows.",               # one missing
             "The width is 5 and the height is 4.",                # one wrong (named)
             "The width is 4 and the height is 7.",                # both swapped
             "I will just guess."]                                 # nothing
    out = RuleBasedChecker().check(texts, [RECT] * len(texts))
    np.testing.assert_allclose(out.scores, [1.0, 0.5, 0.0, 0.0, 0.0])
    assert not out.fallback.any()
    assert out.details[2].contradicted == (("width", "5", "7"),)
    assert out.details[3].correct == () and len(out.details[3].contradicted) == 2
    # With a gentler penalty a contradiction still costs more than an omission.
    gentle = RuleBasedChecker(RuleBasedConfig(contradiction_penalty=0.5)).check(texts[1:3], [RECT] * 2)
    assert gentle.scores[1] < gentle.scores[0] == 0.5


def test_a_wrong_value_contradicts_even_if_the_right_one_appears_elsewhere():
    report = assess("The height is 4. The width is 5, not 7.", {"width": 7, "height": 4})
    assert report.correct == ("height",) and report.contradicted[0][0] == "width"


@pytest.mark.parametrize("text,facts", [
    ("The side is 7 cm long and the other 4cm.", {"w": 7, "h": 4}),
    ("Angle A is 35°.", {"A": 35}),
    ("Angle A is 35^\\circ.", {"A": 35}),
    ("$\\angle A = 35^{\\circ}$", {"A": 35}),
    ("The radius is \\frac{9}{2}.", {"radius": "9/2"}),
    ("The radius is \\dfrac92 units.", {"radius": "9/2"}),
    ("The radius is 9/2.", {"radius": 4.5}),
    ("The radius is 4.5.", {"radius": "9/2"}),
    ("A quarter, 25%, is shaded.", {"shaded_share": "1/4"}),
    ("The shaded share is 25\\%.", {"shaded_share": "1/4"}),
    ("About 0.33 of it is shaded.", {"share": "1/3"}),
    ("There are six circles.", {"targets": 6}),
    ("A 7x4 rectangle.", {"width": 7, "height": 4}),
    ("$7 \\times 4$", {"width": 7, "height": 4}),
    ("The point is at x = -3.", {"x": -3}),
    ("These are alternate-interior angles.", {"relation": "alternate interior"}),
    ("The legs are 6 and 8.", {"given": [6, 8], "unknown": "hypotenuse", "note": None}),
])
def test_formatting_variants_are_read(text, facts):
    out = score(text, facts, exclude=["unknown"])
    assert out.scores[0] == 1.0, out.details[0]


@pytest.mark.parametrize("text,facts", [
    ("180 - 3 = 177", {"x": -3}),                  # binary minus is not a sign
    ("The share is 0.3.", {"share": "1/4"}),       # 0.3 does not round-trip 1/4
    ("There are 7 circles.", {"targets": 6}),
    ("They are corresponding angles.", {"relation": "alternate interior"}),
])
def test_near_misses_are_not_read_as_the_fact(text, facts):
    out = score(text, facts)
    assert out.scores[0] == 0.0, out.details[0]


def test_expressions_are_not_bindings_but_statements_are():
    bars = {"A": 4, "D": 1, "E": 5}
    assert assess("A = 4, D = 1 and E = 5. D + E = 1 + 5 = 6.", bars).contradicted == ()
    assert assess("E = 1 and A = 4.", bars).contradicted == (("E", "1", "5"),)
    assert assess("A 10 by 10 grid; bar A = 4.", {"A": 4}).correct == ("A",)  # the article is not bar A
    assert assess("The share is 25%.", {"share": "1/4"}).correct == ("share",)  # a percent binds as a share
    assert assess("r = 18/2", {"r": 9}).correct == ("r",)  # a fraction binds as its value


def test_aliases_name_facts_in_bindings():
    assert score("The base is 5 and the height is 4.", {"width": 7, "height": 4}).scores[0] == 0.5
    aliased = score("The base is 5 and the height is 4.", {"width": 7, "height": 4},
                    aliases={"width": ["base"]})
    assert aliased.scores[0] == 0.0 and aliased.details[0].contradicted == (("width", "5", "7"),)


def test_the_final_answer_earns_no_thinking_reward_unless_asked():
    facts = {"B": 4, "A": 1}
    assert score("Answer: 4", facts).scores[0] == 0.0
    assert score("So it is \\boxed{4}.", facts).scores[0] == 0.0
    assert score("Answer: 4", facts, strip_answer=False).scores[0] == 0.5


def test_unscorable_samples_get_the_fallback_and_are_counted():
    checker = RuleBasedChecker(RuleBasedConfig(exclude=["height"]))
    out = checker.check(["width 7", "anything", "anything"],
                        [RECT, {"visual_facts": {"description": "no numbers"}}, {"visual_facts": 12}])
    assert out.scores[0] == 1.0 and not out.fallback[0]
    assert list(out.fallback[1:]) == [True, True] and np.isnan(out.scores[1:]).all()
    assert out.reasons[1:] == ("no_facts", "error")
    assert checker.stats.snapshot() == {"items": 3, "fallback.no_facts": 1, "fallback.error": 1}
    neutral = RuleBasedChecker(RuleBasedConfig(fallback_score=0.5)).check(["x"], [{"hint": "h"}])
    assert neutral.scores[0] == 0.5 and neutral.fallback[0]
    with pytest.raises(ValueError, match="2 reasonings for 1 examples"):
        checker.check(["a", "b"], [RECT])


def test_mentions_and_normalisation():
    assert normalize_text("\\frac{9}{2}\\pi").split() == ["9/2", "pi"]
    mentions = find_mentions("x = -3, 180-50, 8 - 2, six")
    assert [m.text for m in mentions] == ["-3", "180", "50", "8", "2", "six"]


# ---------------------------------------------------------------------------------------------
# Facts from the data formats


def test_facts_from_every_place_the_data_puts_them():
    synth = {"description": "A rectangle.", "objects": [{"name": "rectangle"}],
             "quantities": {"width": 3, "given": [6, 8], "unknown": "leg", "pos": {"x": 1}}}
    facts, description = flatten_facts(synth)
    assert facts == {"width": 3, "given[0]": 6, "given[1]": 8, "unknown": "leg", "pos.x": 1}
    assert description == "A rectangle."
    assert flatten_facts(json.dumps(synth)) == (facts, description)        # DyME's visual_fact string
    assert flatten_facts({"a": 1, "b": True, "c": ""})[0] == {"a": 1}
    dyme = as_visual_example({"question": "<image>Find x.", "answer": "10", "hint": "h",
                              "visual_fact": json.dumps(synth)})
    assert dyme.question == "Find x." and dyme.facts == facts
    example = Example(id="1", question="q", images=(), answer="10", solution="Answer: 10", hint="h",
                      meta={"visual_facts": synth})
    assert as_visual_example(example).facts == facts and as_visual_example(example).hint == "h"


# ---------------------------------------------------------------------------------------------
# Rule-based refiner


def _synth_records(n_per_family=6):
    items = [generate_item("train", i) for i in range(n_per_family * len(FAMILIES))]
    items += [generate_item("test_ood", i) for i in range(2 * len(FAMILIES))]
    assert {it.family for it in items} == set(FAMILIES)
    return items, [it.record(it.image_name) for it in items]


def test_refined_rationale_is_grounded_and_scores_full_marks_round_trip():
    items, records = _synth_records()
    refiner, checker = RuleBasedRefiner(), RuleBasedChecker()
    refined = refiner.refine(records)
    assert not refined.fallback.any()
    for item, text in zip(items, refined.texts):
        assert text.endswith(f"\nAnswer: {item.answer}")
        assert text.lower().count("answer:") == 1, text
        for value in as_visual_example(item.record("x")).facts.values():
            assert str(value) in text
    refined_scores = checker.check(list(refined.texts), records).scores
    np.testing.assert_array_equal(refined_scores, 1.0)
    # The check is not vacuous: the original hints miss facts (count totals, unshaded shares).
    hint_scores = checker.check([it.hint for it in items], records).scores
    assert hint_scores.min() < 1.0
    # And DyME's format reward accepts every target (the flag exactly once).
    np.testing.assert_array_equal(answer_flag_format(list(refined.texts)), 1.0)


def test_examples_loaded_from_the_maye_and_dyme_exports_carry_their_facts(tmp_path):
    items = [generate_item("train", i) for i in range(len(FAMILIES))]
    write_split(str(tmp_path), "train", items, ["maye", "dyme"])
    for name in ("maye_train.jsonl", "dyme_train.json"):
        examples = load_examples(tmp_path / name)
        assert [as_visual_example(e).facts for e in examples] == [
            as_visual_example(it.record("x")).facts for it in items]
        refined = RuleBasedRefiner().refine(examples)
        assert not refined.fallback.any()
        np.testing.assert_array_equal(RuleBasedChecker().check(list(refined.texts), examples).scores, 1.0)


def test_refiner_boxed_format_drops_contradicting_sentences_and_old_answers():
    example = {**RECT, "hint": "Goal: Area.\nObservation: The width is 9. The height is 4.\n"
                                "Reasoning: Area is 7 * 4 = 28. Answer: 28", "answer_format": "boxed"}
    refiner = RuleBasedRefiner()
    text = refiner.refine([example]).texts[0]
    assert text.endswith("The answer is \\boxed{28}.") and text.count("\\boxed") == 1
    assert "width is 9" not in text and "The height is 4." in text and "Answer:" not in text
    assert refiner.stats.snapshot()["dropped_sentences"] == 1
    assert RuleBasedChecker().check([text], [example]).scores[0] == 1.0


def test_refiner_fallback_is_the_reference_with_its_answer_line():
    refiner = RuleBasedRefiner(RuleBasedConfig(answer_format="boxed"))
    out = refiner.refine([{"hint": "Some steps.", "answer": "5", "visual_facts": 3}])
    assert out.texts == ("Some steps.\nThe answer is \\boxed{5}.",) and out.fallback[0]
    assert refiner.stats.snapshot()["fallback.error"] == 1
    assert strip_final_answer("x\nAnswer: 5") == "x"


def test_a_flag_inside_the_hint_keeps_the_rest_of_its_rationale():
    """The rewriting refiner used to cut the hint at its first "answer:", so everything after a flag
    in the middle of the rationale was lost. Only the hint's own final answer (a flag on its last
    line) goes; an earlier flag is defused, so the target has exactly one flag, the one appended."""
    example = {"question": "Which year had the highest sales?", "answer": "2017",
               "hint": "Goal: Find the answer: the year with the highest sales.\n"
                       "Observation: The 2017 bar is the tallest, at 45 million.\n"
                       "Reasoning: Taller bars mean more sales. Answer: 2017"}
    text = RuleBasedRefiner().refine([example]).texts[0]
    assert "The 2017 bar is the tallest, at 45 million." in text and "Taller bars mean more sales." in text
    assert text.endswith("\nAnswer: 2017") and answer_flag_format([text])[0] == 1.0  # the flag exactly once
    assert strip_final_answer("Step one.\n**Answer:** 5") == "Step one."


# ---------------------------------------------------------------------------------------------
# DyME's released pair (lexical checker, identity refiner) and the run's answer format

CHART = {"question": "Which year had the highest sales?", "answer": "2017",
         "hint": "The 2017 bar is the tallest, at 45 million units.\nSo the answer is 2017."}


def test_identity_refiner_is_dymes_hint_then_answer_line():
    """DyME's released run never rewrites a hint (ContextRefinerLocal returns it): its target is
    hint + "\\n" + "Answer: X", here in the run's answer format."""
    out = IdentityRefiner("flag").refine([CHART, {**CHART, "hint": ""}])
    assert out.texts == (CHART["hint"] + "\nAnswer: 2017", "Answer: 2017") and not out.fallback.any()
    boxed = IdentityRefiner("boxed").refine([CHART]).texts[0]
    assert boxed == CHART["hint"] + "\nThe answer is \\boxed{2017}."


@needs_lemminflect
def test_the_default_kind_is_dymes_released_pair():
    assert DEFAULT_KIND == "lexical"
    pair = make_visual_supervision({"kind": DEFAULT_KIND, "backend": "approx"}, answer_format="boxed")
    assert type(pair.checker).__name__ == "LexicalChecker" and isinstance(pair.refiner, IdentityRefiner)
    assert pair.refiner.refine([CHART]).texts[0] == CHART["hint"] + "\nThe answer is \\boxed{2017}."


@pytest.mark.parametrize("kind", ["rule_based", pytest.param("lexical", marks=needs_lemminflect)])
def test_the_runs_answer_format_reaches_the_refiner(kind):
    """A boxed run (the ablation's DyME arm) must memorise \\boxed{X}, not Answer: X, whatever the kind
    (the examples carry no format of their own)."""
    config = {"kind": kind, **({"backend": "approx"} if kind == "lexical" else {})}
    text = make_visual_supervision(config, answer_format="boxed").refiner.refine([CHART]).texts[0]
    assert text.endswith("\\boxed{2017}.") and "Answer:" not in text
    with pytest.raises(ValueError, match="answer_format 'flag' contradicts the run's answer format 'boxed'"):
        make_visual_supervision({**config, "answer_format": "flag"}, answer_format="boxed")


def test_the_refiner_can_be_kept_as_is_or_must_be_named_correctly():
    kept = make_visual_supervision(ml_collections.ConfigDict({"kind": "rule_based", "refiner": "identity"}))
    assert isinstance(kept.checker, RuleBasedChecker) and isinstance(kept.refiner, IdentityRefiner)
    for bad in ("rewrite", {"kind": "rule_based", "refiner": "identity"}):
        with pytest.raises(ValueError, match="refiner"):
            make_visual_supervision({"kind": "rule_based", "refiner": bad})


@needs_lemminflect
def test_dymes_checker_can_take_the_rewriting_refiner():
    mixed = make_visual_supervision({"kind": "lexical", "backend": "approx", "refiner": {"kind": "rule_based"}},
                                    answer_format="boxed")
    assert type(mixed.checker).__name__ == "LexicalChecker" and isinstance(mixed.refiner, RuleBasedRefiner)
    assert mixed.refiner.refine([CHART]).texts[0].startswith("Goal: Which year had the highest sales?")
    assert mixed.refiner.config.answer_format == "boxed"


# ---------------------------------------------------------------------------------------------
# HTTP pair against a stub server


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


# ---------------------------------------------------------------------------------------------
# Factory


def test_factory_builds_both_kinds_from_plain_or_ml_collections_config():
    rule = make_visual_supervision(ml_collections.ConfigDict({"kind": "rule_based", "exclude": ["x"]}))
    assert isinstance(rule, VisualSupervision) and rule.checker.config.exclude == ["x"]
    assert isinstance(rule.checker, Checker) and isinstance(rule.refiner, Refiner)
    http = make_visual_supervision({"kind": "http", "base_url": "http://127.0.0.1:1/v1", "model": "m"})
    assert http.checker.config.url == "http://127.0.0.1:1/v1/chat/completions"
    assert isinstance(http.checker, Checker) and isinstance(http.refiner, Refiner)
    http.close()
    assert http.checker.check(["a"], [RECT]).reasons == ("error",)  # closed: fallback, not a raise


@pytest.mark.parametrize("config,field", [
    ({}, "kind"),
    ({"kind": "llm"}, "kind"),
    ({"kind": "rule_based", "penalty": 1}, "penalty"),
    ({"kind": "rule_based", "answer_format": "latex"}, "answer_format"),
    ({"kind": "rule_based", "contradiction_penalty": -1}, "contradiction_penalty"),
    ({"kind": "http", "model": "m"}, "base_url"),
    ({"kind": "http", "base_url": "127.0.0.1:8000", "model": "m"}, "base_url"),
    ({"kind": "http", "base_url": "http://h", "model": "m", "timeout_s": 0}, "timeout_s"),
    ({"kind": "http", "base_url": "http://h", "model": "m", "max_concurrency": 0}, "max_concurrency"),
    ({"kind": "http", "base_url": "http://h", "model": "m", "fallback_score": 2}, "fallback_score"),
    ({"kind": "no.such.module:make"}, "no.such.module"),
])
def test_factory_errors_name_the_bad_field(config, field):
    with pytest.raises(ValueError, match=field):
        make_visual_supervision(config)


def test_http_config_defaults_are_usable():
    config = HttpConfig(base_url="http://127.0.0.1:23333", model="Qwen/Qwen2.5-14B-Instruct-AWQ")
    assert config.url == "http://127.0.0.1:23333/v1/chat/completions" and config.fallback_score is None
