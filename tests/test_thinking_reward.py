"""DyME's thinking reward (its released run's RewardCalculatorLocal): F1 between the content-word
lemma sets of the thinking part and of the hint, with spaCy's en_core_web_sm or the offline
approximation, and the edge cases as DyME's code defines them."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from vrl_jax.rewards.visual import make_visual_supervision
from vrl_jax.rewards.visual.keywords import (SPACY_STOP_WORDS, ApproxExtractor, SpacyExtractor, make_extractor,
                                             tokens)
from vrl_jax.rewards.visual.lexical import LexicalChecker, LexicalConfig, keyword_f1, thinking_part

needs_lemminflect = pytest.mark.skipif(importlib.util.find_spec("lemminflect") is None,
                                       reason="lemminflect (install_requires) is missing: pip install -e .")
# A genuine English spaCy pipeline, if one is installed (DyME's en_core_web_sm is not on PyPI).
SPACY_MODEL = os.environ.get("VRL_JAX_SPACY_MODEL", "en_core_web_sm")


def _spacy_available() -> bool:
    try:
        SpacyExtractor(SPACY_MODEL)
    except (ImportError, OSError):
        return False
    return True


needs_spacy = pytest.mark.skipif(not _spacy_available(), reason=f"spaCy pipeline {SPACY_MODEL!r} not installed "
                                 "(set VRL_JAX_SPACY_MODEL to another English pipeline)")

SENTENCE = ("The chart shows that sales increased from 45% in 2017 to $5.2 million in 2019, the highest value "
            "on the x-axis. Approximately 1,234 people voted.")
# en_core_web_sm 3.8's keywords of SENTENCE (lower-cased, NOUN/PROPN/VERB/ADJ/NUM, not stop, not punct):
# "%" is punctuation, "$" a symbol, "approximately" an adverb, "the/that/from/in/to/on" stop words.
SPACY_KEYWORDS = {"chart", "show", "sale", "increase", "45", "2017", "5.2", "million", "2019", "high", "value",
                  "x", "axis", "1,234", "people", "vote"}

CHART = {"question": "Which year had the highest sales?", "answer": "2017",
         "hint": "Goal: Find the year with the highest sales.\nObservation: The bar chart shows sales from 2015 to "
                 "2019; the 2017 bar is the tallest at 45 million units.\nReasoning: Comparing the bar heights, "
                 "2017 exceeds every other year.\nConclusion: The answer is 2017."}


def test_f1_is_dymes_formula_and_empty_sets_score_zero():
    t, h = frozenset({"a", "b", "c"}), frozenset({"b", "c", "d", "e"})
    p, r = 2 / (3 + 1e-6), 2 / (4 + 1e-6)
    assert keyword_f1(t, h) == pytest.approx(2 * p * r / (p + r), rel=1e-12)  # 1e-6 in both denominators
    assert keyword_f1(t, t) == pytest.approx(1.0, abs=1e-6) and keyword_f1(t, t) < 1.0
    assert keyword_f1(frozenset(), h) == keyword_f1(t, frozenset()) == keyword_f1(t, frozenset({"z"})) == 0.0


def test_the_thinking_part_ends_at_the_first_flag_and_is_lower_cased():
    """DyME: response.lower().split("answer:")[0].strip(); a response without a flag is all thinking."""
    assert thinking_part("Bars COMPARED.\nANSWER: 5. answer: 6") == "bars compared."
    assert thinking_part("no flag here") == "no flag here"
    assert thinking_part("Answer: 5") == ""


def test_tokens_split_like_spacys_english_tokenizer():
    assert tokens("The x-axis: 45% of $5.2m in 2019-2020, covid-19, 1,234.5 and -1.5; it's don't u.s. 3rd") == [
        "the", "x", "axis", "45", "of", "5.2", "m", "in", "2019", "2020", "covid-19", "1,234.5", "and", "-1.5",
        "it", "u.s.", "3rd"]


@needs_lemminflect
def test_the_approximation_keeps_what_en_core_web_sm_keeps_on_a_chart_rationale():
    approx = ApproxExtractor()
    assert approx.name.startswith("approx:lemminflect-")
    assert approx(SENTENCE) == SPACY_KEYWORDS
    # Comparatives to their adjective, verb forms to their verb, adverbs and spaCy's stop words ("show",
    # not "shown") out: the set en_core_web_sm gives.
    assert approx("Overall, exports rose and later fell; the lower bars show fewer units than the number "
                  "shown roughly") == {"export", "rise", "fall", "low", "bar", "few", "unit", "number", "show"}


@needs_lemminflect
def test_checker_scores_a_group_against_the_hint_without_visual_facts():
    """ChartQA examples carry no visual facts: the rule-based checker gives NaN (no_facts) there, the
    lexical checker scores every row, faithful reasoning above vague above off-topic."""
    checker = LexicalChecker(LexicalConfig(backend="approx"))
    group = ["The bar chart shows sales from 2015 to 2019. The 2017 bar is the tallest at 45 million units, "
             "so 2017 exceeds every other year.\nAnswer: 2017",
             "Looking at the chart, 2017 is the highest.\nAnswer: 2017",
             "A cat sits on a wooden table.\nAnswer: 2017",
             "Answer: 2017",
             None]
    result = checker.check(group, [CHART] * len(group))
    assert result.scores[0] > result.scores[1] > result.scores[2] == 0.0
    assert result.scores[3] == 0.0 and result.details[3] is None  # empty thinking part: 0, as DyME
    assert result.scores[4] == 0.0 and result.reasons[4] == "error" and result.fallback[4]  # DyME's except: 0
    assert result.details[1].common == {"chart", "2017", "high"}
    assert checker.impl.startswith("approx:") and checker.backend == "approx"
    assert checker.stats.snapshot() == {"items": 5, "backend.approx": 5, "fallback.error": 1}
    rule = make_visual_supervision({"kind": "rule_based"}).checker.check(group[:1], [CHART])
    assert np.isnan(rule.scores[0]) and rule.reasons == ("no_facts",)


@needs_lemminflect
def test_no_hint_scores_zero_and_nan_only_when_asked():
    checker = LexicalChecker(LexicalConfig(backend="approx", fallback_score=None))
    result = checker.check(["The chart shows sales.\nAnswer: 1", 3], [{"hint": "", "answer": "1"}] * 2)
    assert result.scores[0] == 0.0 and not result.fallback[0]
    assert np.isnan(result.scores[1]) and result.fallback[1]


def test_backends_say_what_is_missing():
    with pytest.raises((ImportError, OSError), match="no_such_pipeline"):
        make_extractor("spacy", "no_such_pipeline")
    with pytest.raises(ValueError, match="backend"):
        make_extractor("nltk")
    with pytest.raises(ValueError, match="backend"):
        make_visual_supervision({"kind": "lexical", "backend": "nltk"})


@needs_lemminflect
def test_auto_falls_back_to_the_approximation_when_the_model_is_missing():
    assert make_extractor("auto", "no_such_pipeline").name.startswith("approx:")


@needs_spacy
def test_spacy_backend_is_dymes_extractor_and_the_approximation_agrees():
    spacy_kw = SpacyExtractor(SPACY_MODEL)
    from spacy.lang.en.stop_words import STOP_WORDS
    assert SPACY_STOP_WORDS == STOP_WORDS  # the vendored list is spaCy's
    assert spacy_kw.name.startswith("spacy:en_") and spacy_kw(SENTENCE) == SPACY_KEYWORDS
    assert make_extractor("auto", SPACY_MODEL).name == spacy_kw.name
    if importlib.util.find_spec("lemminflect") is None:
        return
    approx = ApproxExtractor()
    thinkings = ["The chart shows sales by year. The 2017 bar is the tallest, reaching 45 million units.",
                 "Comparing the heights of the bars, 2017 exceeds the other years.",
                 "The image shows a cat.", CHART["hint"].lower()]
    for t in thinkings:
        assert abs(keyword_f1(spacy_kw(t), spacy_kw(CHART["hint"])) -
                   keyword_f1(approx(t), approx(CHART["hint"]))) <= 0.05
