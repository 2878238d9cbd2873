"""DyME's released visual supervision (``main.py``): the lexical thinking reward of
``RewardCalculatorLocal`` and the no-op refiner ``ContextRefinerLocal``.

Thinking reward of a response against its example's reference rationale (``hint``), as DyME
computes it (``get_thinking_reward_prompt``):

- the thinking part is ``response.lower().split("answer:")[0].strip()``: the lower-cased text before
  the *first* answer flag (a well-formatted response has exactly one), the whole response if
  there is none;
- an empty thinking part scores 0;
- ``T`` and ``H`` are the keyword sets (``keywords.py``) of the thinking part and of the hint;
- ``precision = |T & H| / (|T| + 1e-6)``, ``recall = |T & H| / (|H| + 1e-6)``, and the score is
  their harmonic mean, 0 when both are 0 (so an empty ``T`` or ``H``, e.g. an example with no
  hint, scores 0, not NaN);
- an exception while scoring gives 0 in DyME; here it is the configured ``fallback_score`` (0 by
  default) and is counted as ``fallback.error``.

The checker reads no visual facts, so it scores ChartQA, whose examples carry only a hint. Its
``impl`` names the keyword extractor that ran (``spacy:en_core_web_sm-3.8.0`` or
``approx:lemminflect-0.2.3``), and ``stats`` counts items per backend (``backend.spacy`` /
``backend.approx``) for the run's metrics.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from vrl_jax.rewards.visual.base import (ANSWER_FLAG, ERROR, CheckResult, IdentityRefiner,
                                         SupervisionStats, VisualSupervision, as_visual_example,
                                         check_answer_format, check_fallback_score,
                                         config_from_fields, fallback_value)
from vrl_jax.rewards.visual.keywords import BACKENDS, KeywordExtractor, make_extractor

EPS = 1e-6  # DyME's smoothing in both denominators


def thinking_part(response: str, flag: str = ANSWER_FLAG) -> str:
    """DyME's thinking part: the lower-cased response before the first (case-insensitive) flag."""
    return response.lower().split(flag.lower())[0].strip()


def keyword_f1(thinking: frozenset[str], reference: frozenset[str]) -> float:
    """DyME's F1 of two keyword sets, with ``1e-6`` added to both denominators; 0 when they share
    nothing (including when either is empty)."""
    common = len(thinking & reference)
    precision = common / (len(thinking) + EPS)
    recall = common / (len(reference) + EPS)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


@dataclasses.dataclass(frozen=True)
class LexicalConfig:
    """Fields of ``{"kind": "lexical", ...}``.

    Attributes:
      backend: ``"auto"`` (spaCy if ``spacy_model`` loads, else the approximation), ``"spacy"``
        (fail at construction without it) or ``"approx"`` (always the approximation).
      spacy_model: the spaCy pipeline DyME loads, a package name or a path.
      answer_flag: the thinking part ends at its first occurrence (DyME's ``answer_flag``).
      answer_format: the identity refiner's answer line (``"flag"``: ``Answer: X``, DyME's).
      fallback_score: the score of a sample whose scoring raised (DyME: 0; None: NaN).
      cache_size: keyword sets kept per text (a group's G rows share one hint).
    """

    backend: str = "auto"
    spacy_model: str = "en_core_web_sm"
    answer_flag: str = ANSWER_FLAG
    answer_format: str = "flag"
    fallback_score: float | None = 0.0
    cache_size: int = 4096

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("spacy_model", "answer_flag"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if isinstance(self.cache_size, bool) or not isinstance(self.cache_size, int) or self.cache_size < 0:
            raise ValueError(f"cache_size must be an integer >= 0, got {self.cache_size!r}")
        check_answer_format(self.answer_format)
        check_fallback_score(self.fallback_score)


@dataclasses.dataclass(frozen=True)
class LexicalReport:
    """Per-sample detail: the two keyword sets (for logs and tests)."""

    thinking: frozenset[str]
    reference: frozenset[str]

    @property
    def common(self) -> frozenset[str]:
        return self.thinking & self.reference


class LexicalChecker:
    """Thinking reward = DyME's lexical F1 (module docstring); never raises per sample.

    Keyword sets are cached per text (a group's rows share one hint) and the texts a batch still
    needs go through the extractor together (``many``: spaCy's ``nlp.pipe``)."""

    def __init__(self, config: LexicalConfig = LexicalConfig(), extractor: KeywordExtractor | None = None):
        self.config = config
        self.extractor = extractor if extractor is not None else make_extractor(config.backend, config.spacy_model)
        self.impl = self.extractor.name
        self.backend = self.impl.split(":", 1)[0]
        self.stats = SupervisionStats()
        self._cache: collections.OrderedDict[str, frozenset[str]] = collections.OrderedDict()

    def keywords(self, texts: Sequence[str]) -> list[frozenset[str]]:
        """The keyword set of each text, from the cache or one extractor batch."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        many = getattr(self.extractor, "many", None)
        for text, found in zip(todo, many(todo) if many else map(self.extractor, todo)):
            self._cache[text] = found
        out = []
        for text in texts:
            self._cache.move_to_end(text)
            out.append(self._cache[text])
        while len(self._cache) > max(self.config.cache_size, len(set(texts))):
            self._cache.popitem(last=False)
        return out

    def score_one(self, response: str, hint: str) -> tuple[float, LexicalReport | None]:
        """``(score, report)``; the report is None when the thinking part is empty (score 0)."""
        return self._score(thinking_part(response, self.config.answer_flag), hint)

    def _score(self, thinking: str, hint: str) -> tuple[float, LexicalReport | None]:
        if not thinking:
            return 0.0, None
        report = LexicalReport(*self.keywords([thinking, hint]))
        return keyword_f1(report.thinking, report.reference), report

    def check(self, reasonings: Sequence[str], examples: Sequence[Any]) -> CheckResult:
        if len(reasonings) != len(examples):  # a caller bug, not a per-sample failure
            raise ValueError(f"check: {len(reasonings)} reasonings for {len(examples)} examples")
        n = len(reasonings)
        scores = np.zeros(n, np.float32)
        fallback = np.zeros(n, bool)
        reasons: list[str | None] = [None] * n
        details: list[Any] = [None] * n
        pairs: list[tuple[str, str] | None] = []
        for i, (text, example) in enumerate(zip(reasonings, examples)):
            try:
                pairs.append((thinking_part(text, self.config.answer_flag), as_visual_example(example).hint))
            except Exception as err:  # noqa: BLE001 - a bad sample must not stop training
                pairs.append(None)
                self._fail(i, err, scores, fallback, reasons, details)
        try:  # one extractor batch for the whole check; the loop below then reads the cache
            self.keywords([t for pair in pairs if pair and pair[0] for t in pair])
        except Exception:  # noqa: BLE001 - the loop retries item by item and records the failure
            pass
        for i, pair in enumerate(pairs):
            if pair is None:
                continue
            try:
                scores[i], details[i] = self._score(*pair)
            except Exception as err:  # noqa: BLE001
                self._fail(i, err, scores, fallback, reasons, details)
        self.stats.add("items", n)
        self.stats.add(f"backend.{self.backend}", n)
        return CheckResult(scores, fallback, tuple(reasons), tuple(details))

    def _fail(self, i, err, scores, fallback, reasons, details) -> None:
        scores[i], fallback[i] = fallback_value(self.config.fallback_score), True
        reasons[i], details[i] = ERROR, f"{type(err).__name__}: {err}"
        self.stats.add(f"fallback.{ERROR}")

    def close(self) -> None:
        self._cache.clear()


def make_lexical(**fields: Any) -> VisualSupervision:
    """Factory entry for ``{"kind": "lexical", ...}``: DyME's released pair, the lexical checker and
    the identity refiner; fields are ``LexicalConfig``'s."""
    config = config_from_fields(LexicalConfig, fields, "lexical")
    return VisualSupervision(LexicalChecker(config), IdentityRefiner(config.answer_format))
