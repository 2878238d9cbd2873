"""DyME visual supervision: the rule-based checker's rule, the refiner round trip on synthgeo, DyME's
released pair, and the factory's errors (the HTTP pair against a stub server: `test_visual_http.py`)."""
from __future__ import annotations

import importlib.util
import json

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
