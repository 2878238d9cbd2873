"""The accuracy judge: extract, normalise, decide numbers exactly, fall back to math-verify.

Layers, cheapest first, so that most answers never reach the slow and hang-prone symbolic layer:

1. Extract the last ``\\boxed{}`` or the line after the answer flag (``extract.py``).
2. Normalise units, degrees, ``x =``, thousands separators, ``\\text{}``, ``\\dfrac``, percent
   (``normalize.py``).
3. Integers, decimals and fractions are decided exactly with rationals.
4. Anything else goes to math-verify, gold first and wrapped in ``$...$``, in a server process with
   a wall clock (``symbolic.py``), after known hang patterns are rejected.

Modes: ``"default"`` (the above), ``"maye_compat"`` (MAYE's judge, see ``maye.py``) and
``"chartqa"`` (relaxed accuracy, see ``chartqa.py``). ``AnswerJudge.judge`` never raises and
never waits longer than about 1.25 x ``timeout_s`` per distinct symbolic check.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
from fractions import Fraction
from typing import Any, Mapping, Sequence

from vrl_jax.rewards import chartqa, maye
from vrl_jax.rewards.extract import extract_answer
from vrl_jax.rewards.normalize import (NormalizedAnswer, Number, normalize_answer, numbers_match, parse_number,
                                       percent_candidates)
from vrl_jax.rewards.symbolic import EXTRACTION_TARGETS, Check, CheckResult, SymbolicChecker, pathological_reason

MODES = ("default", "maye_compat", "chartqa")
PERCENT_POLICIES = ("either", "fraction", "strip")
UNANCHORED_POLICIES = ("reject", "math_verify")
_CACHE_SIZE = 4096


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """Options of ``AnswerJudge`` (all plain values, so an ``ml_collections.ConfigDict`` maps onto it).

    Attributes:
      mode: "default", "maye_compat" or "chartqa".
      timeout_s: wall-clock limit of one symbolic check, in seconds.
      workers: math-verify worker processes.
      answer_flag: the flag whose following line is the answer when there is no box.
      unanchored: what to do with a response with neither box nor flag: "reject" (incorrect, as
        MAYE) or "math_verify" (let math-verify find an answer in the whole text).
      percent: "either" (25% is 25 or 0.25, as math-verify), "fraction" (0.25) or "strip" (25).
      rel_tol, abs_tol: tolerance ``max(abs_tol, rel_tol*|gold|)`` applied when a decimal is involved;
        integers and fractions are compared exactly.
      relaxed_tol: relative tolerance of the chartqa mode (0.05 in the ChartQA protocol and in DyME's
        evaluation; DyME's training reward uses 0).
      chartqa_parser: how the chartqa mode reads and compares answers, a name in
        ``chartqa.SCORERS``: "chartqa" (ChartQA's parser) or "dyme" (DyME's: all the text after the
        last flag, compared with ``float()`` or as text).
      symbolic: whether to call math-verify at all (False: undecided answers are incorrect).
      float_rounding: math-verify's decimal places.
      math_verify_targets: math-verify's extraction configs, a subset of ("latex", "expr").
      max_answer_chars: longer extracted answers are judged incorrect without a symbolic check.
      max_response_chars: in "math_verify" unanchored mode, only this many final characters are searched.
    """

    mode: str = "default"
    timeout_s: float = 2.0
    workers: int = 1
    answer_flag: str = "Answer:"
    unanchored: str = "reject"
    percent: str = "either"
    rel_tol: float = 0.0
    abs_tol: float = 1e-6
    relaxed_tol: float = 0.05
    chartqa_parser: str = "chartqa"
    symbolic: bool = True
    float_rounding: int = 6
    math_verify_targets: tuple[str, ...] = EXTRACTION_TARGETS
    max_answer_chars: int = 300
    max_response_chars: int = 4000

    def __post_init__(self):
        def bad(field: str, expected: str):
            raise ValueError(f"JudgeConfig.{field}: expected {expected}, got {getattr(self, field)!r}")

        for field, choices in (("mode", MODES), ("percent", PERCENT_POLICIES), ("unanchored", UNANCHORED_POLICIES),
                               ("chartqa_parser", tuple(chartqa.SCORERS))):
            if getattr(self, field) not in choices:
                bad(field, "one of " + ", ".join(repr(c) for c in choices))
        for field in ("timeout_s", "relaxed_tol", "rel_tol", "abs_tol"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and value >= 0 and (value > 0 or field != "timeout_s")):
                bad(field, "a finite number >= 0" + (" (> 0)" if field == "timeout_s" else ""))
        for field in ("workers", "float_rounding", "max_answer_chars", "max_response_chars"):
            value = getattr(self, field)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                bad(field, "an integer >= 1")
        if not isinstance(self.answer_flag, str):
            bad("answer_flag", "a string such as 'Answer:'")
        if not isinstance(self.symbolic, bool):
            bad("symbolic", "True or False")
        targets = self.math_verify_targets
        if isinstance(targets, str) or not targets or any(t not in EXTRACTION_TARGETS for t in targets):
            bad("math_verify_targets", f"a non-empty sequence drawn from {EXTRACTION_TARGETS}")
        object.__setattr__(self, "math_verify_targets", tuple(targets))

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> "JudgeConfig":
        """Build from a dict or ConfigDict; unknown keys are an error naming them."""
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"JudgeConfig: unknown option(s) {unknown}; known options are {sorted(known)}")
        return cls(**options)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One judgement. ``method`` says which layer decided: "numeric", "string", "math_verify",
    "relaxed", "maye", "no_answer", "rejected", "timeout" or "error"."""

    correct: bool
    method: str
    extracted: str | None = None
    normalized: str | None = None
    gold_normalized: str | None = None
    detail: str = ""


def _golds(gold: Any) -> list[str]:
    if isinstance(gold, (list, tuple)):
        return [str(g) for g in gold if g is not None]
    return [] if gold is None else [str(gold)]


_SENTENCE_END = re.compile(r"(?<!\d)\.(?:\s|$)")
_MATH_DELIMITERS = ("$", "\\(", "\\[")


def _answer_part(text: str, flag: str, max_chars: int) -> tuple[str | None, str]:
    """``extract_answer``, with an over-long flag line cut at its first sentence end."""
    answer, source = extract_answer(text, flag)
    if source == "flag" and len(answer) > max_chars:
        end = _SENTENCE_END.search(answer)
        answer = answer[:end.start()] if end else answer
    return answer, source


def _gold_answer(gold: str, flag: str, max_chars: int) -> tuple[str, str]:
    """A gold may itself be a solution (``\\boxed{20}``, ``Answer: 20``): take its answer part."""
    answer, source = _answer_part(gold, flag, max_chars)
    return (answer, source) if answer is not None else (gold.strip(), "whole")


def _mv_input(answer: str, source: str, norm: NormalizedAnswer, policy: str) -> str:
    """What math-verify reads: a flag line holding ``$...$`` as is (math-verify finds the math in
    "the answer is $34$"), anything else normalised and wrapped."""
    if source == "flag" and any(d in answer for d in _MATH_DELIMITERS):
        return answer
    return _for_math_verify(norm.text, norm.percent, policy)


def _for_math_verify(text: str, percent: bool, policy: str) -> str:
    """Wrap in ``$...$`` (math-verify misreads bare ``2\\sqrt{3}`` as 2), keeping percent meaning."""
    if percent and policy == "either":
        text = text + "\\%"
    elif percent and policy == "fraction":
        text = "\\frac{" + text + "}{100}"
    return "$" + text + "$"


class AnswerJudge:
    """Judges predictions against gold answers; holds the math-verify server (``close()`` it).

    Usage::

        with AnswerJudge(JudgeConfig(timeout_s=2.0)) as judge:
            verdict = judge.judge(r"... so the area is \\boxed{12\\text{ cm}^2}.", "12")
    """

    def __init__(self, config: JudgeConfig | Mapping[str, Any] | None = None, *,
                 checker: SymbolicChecker | None = None, **overrides: Any):
        if config is None or isinstance(config, Mapping) or hasattr(config, "to_dict"):
            raw = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
            config = JudgeConfig.from_mapping({**raw, **overrides})
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self._rel_tol = Fraction(str(config.rel_tol))
        self._abs_tol = Fraction(str(config.abs_tol))
        # A shared checker (one server for several judges) stays open when this judge closes.
        self._owns_checker = checker is None
        self._checker = checker if checker is not None else SymbolicChecker(config.timeout_s, config.workers)
        self._cache: collections.OrderedDict[Check, CheckResult] = collections.OrderedDict()

    def start(self) -> None:
        """Start the math-verify server now rather than on the first symbolic check (which would
        otherwise pay its one-off start-up, about a second); a no-op where it is never needed."""
        if self.config.symbolic and self.config.mode != "chartqa":
            self._checker.start()

    def close(self) -> None:
        if self._owns_checker:
            self._checker.close()

    def __enter__(self) -> "AnswerJudge":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def judge(self, prediction: Any, gold: Any) -> Verdict:
        """Judge one prediction against a gold answer (or a list of acceptable golds)."""
        return self.judge_batch([prediction], [gold])[0]

    def judge_batch(self, predictions: Sequence[Any], golds: Sequence[Any]) -> list[Verdict]:
        """Judge many at once: symbolic checks are de-duplicated and spread over the workers."""
        n = len(predictions)
        if len(golds) != n:
            return [Verdict(False, "error", detail=f"{n} predictions but {len(golds)} golds")] * n
        verdicts: list[Verdict | None] = [None] * n
        # Each undecided item lists (check, partial verdict) options; any equal check makes it correct.
        pending: dict[int, list[tuple[Check, Verdict]]] = {}
        for i, (pred, gold) in enumerate(zip(predictions, golds)):
            try:
                decided, options = self._prepare(pred, gold)
            except Exception as exc:  # noqa: BLE001 - the judge never raises
                decided, options = Verdict(False, "error", detail=f"{type(exc).__name__}: {exc}"), []
            if decided is not None:
                verdicts[i] = decided
            else:
                pending[i] = options
        results = self._check_pairs([pair for opts in pending.values() for pair, _ in opts])
        for i, options in pending.items():
            verdicts[i] = self._finish(options, results)
        return verdicts  # type: ignore[return-value]

    # ----------------------------------------------------------------------------------------
    def _prepare(self, prediction: Any, gold: Any) -> tuple[Verdict | None, list]:
        prediction = "" if prediction is None else str(prediction)
        golds = _golds(gold)
        if not golds:
            return Verdict(False, "error", detail="no gold answer given"), []
        mode = self.config.mode
        if mode == "chartqa":
            return self._prepare_chartqa(prediction, golds), []
        if mode == "maye_compat":
            return self._prepare_maye(prediction, golds)
        return self._prepare_default(prediction, golds)

    def _prepare_chartqa(self, prediction: str, golds: list[str]) -> Verdict:
        cfg = self.config
        v = chartqa.SCORERS[cfg.chartqa_parser](prediction[-cfg.max_response_chars:], golds, cfg.answer_flag,
                                                cfg.relaxed_tol)
        return Verdict(v.correct, "relaxed", v.answer, v.normalized, " | ".join(v.targets))

    def _prepare_maye(self, prediction: str, golds: list[str]) -> tuple[Verdict | None, list]:
        pred = maye.maye_preprocess(prediction)
        options = []
        for gold in golds:
            sol = maye.maye_preprocess(maye.maye_solution(gold))
            if maye.asj_equal(pred, sol) or maye.number_judge(pred, sol):
                return Verdict(True, "maye", pred, pred, sol, "string match"), []
            if pred and self.config.symbolic:
                # MAYE's argument order: prediction first (math-verify's contract is gold first).
                options.append((self._check(pred, sol), Verdict(False, "math_verify", pred, pred, sol)))
        if not options:
            return Verdict(False, "no_answer" if not pred else "maye", pred, pred, None), []
        return None, options

    def _prepare_default(self, prediction: str, golds: list[str]) -> tuple[Verdict | None, list]:
        cfg = self.config
        answer, source = _answer_part(prediction, cfg.answer_flag, cfg.max_answer_chars)
        whole_text = None
        if answer is None:
            if cfg.unanchored == "reject":
                gold_answer = _gold_answer(golds[0], cfg.answer_flag, cfg.max_answer_chars)[0]
                gold_text = normalize_answer(gold_answer).text
                return Verdict(False, "no_answer", gold_normalized=gold_text,
                               detail="no \\boxed{} and no answer flag"), []
            whole_text = prediction[-cfg.max_response_chars:]
            if len(prediction.strip()) <= cfg.max_answer_chars:
                answer = prediction.strip()  # a bare short response is its own answer
        if answer is not None and len(answer) > cfg.max_answer_chars:
            return Verdict(False, "rejected", answer[:80] + "...",
                           detail=f"answer longer than {cfg.max_answer_chars} chars"), []
        pred_norm = normalize_answer(answer) if answer is not None else None
        pred_num = parse_number(pred_norm.text) if pred_norm is not None else None
        pred_text = pred_norm.text if pred_norm is not None else None
        # A whole response goes to math-verify raw, so that its own extraction can search it.
        if source == "none":
            candidate = whole_text or ""
        else:
            candidate = _mv_input(answer, source, pred_norm, cfg.percent)
        options, failure = [], None
        for gold in golds:
            gold_answer, gold_source = _gold_answer(gold, cfg.answer_flag, cfg.max_answer_chars)
            gold_norm = normalize_answer(gold_answer)
            gold_num = parse_number(gold_norm.text)
            base = Verdict(False, "numeric", answer, pred_text, gold_norm.text)
            if pred_num is not None and gold_num is not None:
                if self._numbers_equal(pred_num, pred_norm.percent, gold_num, gold_norm.percent):
                    return dataclasses.replace(base, correct=True), []
                failure = base
                continue
            if pred_text is not None and pred_text == gold_norm.text and pred_norm.percent == gold_norm.percent:
                return dataclasses.replace(base, correct=True, method="string"), []
            failure = failure or dataclasses.replace(base, method="string")
            if not cfg.symbolic:
                continue
            gold_mv = _mv_input(gold_answer, gold_source, gold_norm, cfg.percent)
            reason = pathological_reason(candidate) or pathological_reason(gold_mv)
            if reason:
                failure = dataclasses.replace(base, method="rejected", detail=f"pathological input: {reason}")
                continue
            options.append((self._check(gold_mv, candidate), dataclasses.replace(base, method="math_verify")))
        if options:
            return None, options
        return failure, []

    def _numbers_equal(self, pred: Number, pred_pct: bool, gold: Number, gold_pct: bool) -> bool:
        policy = self.config.percent
        for p in percent_candidates(pred.value, pred_pct, policy):
            for g in percent_candidates(gold.value, gold_pct, policy):
                if numbers_match(Number(p, pred.kind), Number(g, gold.kind), self._rel_tol, self._abs_tol):
                    return True
        return False

    def _check(self, first: str, second: str) -> Check:
        cfg = self.config
        return Check(first, second, cfg.float_rounding, cfg.math_verify_targets)

    def _check_pairs(self, pairs: list[Check]) -> dict[Check, CheckResult]:
        """Results for each distinct check, from the LRU cache or one batched server call."""
        results = {}
        todo = []
        for pair in dict.fromkeys(pairs):
            if pair in self._cache:
                self._cache.move_to_end(pair)
                results[pair] = self._cache[pair]
            else:
                todo.append(pair)
        for pair, res in zip(todo, self._checker.check_many(todo)):
            results[pair] = res
            if res.status == "ok":  # a timeout may be load, not the input: do not remember it
                self._cache[pair] = res
                if len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
        return results

    @staticmethod
    def _finish(options: list, results: dict[Check, CheckResult]) -> Verdict:
        first_failure = None
        for pair, partial in options:
            res = results[pair]
            if res.status == "ok" and res.equal:
                return dataclasses.replace(partial, correct=True)
            if first_failure is None or (first_failure.method == "math_verify" and res.status != "ok"):
                method = partial.method if res.status == "ok" else res.status
                first_failure = dataclasses.replace(partial, method=method, detail=res.detail)
        return first_failure
