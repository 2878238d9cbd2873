"""ChartQA relaxed accuracy (Masry et al. 2022, §5.1), and DyME's own reading of it.

Two scorers, chosen by name (``SCORERS``, the judge's ``chartqa_parser``):

- ``chartqa``: the answer is the first line after the last flag, markdown removed (ChartQA's
  explicit-prompt parser). A numeric answer is correct within ``tolerance`` relative change of the
  target (5% in the ChartQA protocol); percent answers also match their decimal form; thousands
  commas and ``$`` are dropped; a one-letter target is a multiple-choice letter; anything else must
  match the target exactly, case-insensitively, after trailing punctuation is dropped.
- ``dyme``: what DyME's chart reward computes (``split_initial_context`` then ``eval_one_chart``,
  which ends in ``relaxed_correctness``). The answer is *everything* after the last ``answer:``,
  lower-cased, stripped of spaces and of ``.`` at both ends (the whole text without a flag). Both
  sides are read by ``float()`` (a trailing ``%`` divides by 100; ``1,000`` or ``**5**`` is not a
  number); two numbers match within ``tolerance`` relative change *of the prediction* (DyME passes
  prediction and target in swapped order) unless the prediction is 0; anything else must be equal,
  case-insensitively. DyME trains with tolerance 0 (exact) and evaluates
  (``eval/eval_chartqa.py``) with 0.05.
"""
from __future__ import annotations

import dataclasses
import re
import string
from typing import Callable, Sequence

from vrl_jax.rewards.extract import after_flag, last_boxed

_MARKDOWN = re.compile(r"[*_\[\]()]")


@dataclasses.dataclass(frozen=True)
class RelaxedValue:
    """An answer prepared for relaxed comparison: its text and, when numeric, its value."""

    text: str
    number: float | None
    percent: bool


def _strip_end_punctuation(text: str) -> str:
    """Drop trailing punctuation and spaces, but keep a final ``%``."""
    while text and (text[-1] in string.punctuation or text[-1].isspace()) and text[-1] != "%":
        text = text[:-1]
    return text


def prepare(text: str) -> RelaxedValue:
    """Strip quotes (text answers) or thousands commas and ``$`` (numeric answers), then read a float."""
    text = text.strip()
    if not any(ch.isdigit() for ch in text):
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
            text = text[1:-1]
        return RelaxedValue(text, None, False)
    text = _strip_end_punctuation(text).replace(",", "").replace("$", "")
    percent = text.endswith("%")
    try:
        number = float(text.rstrip("%"))
    except ValueError:
        return RelaxedValue(text, None, False)
    return RelaxedValue(text, number if number == number and abs(number) != float("inf") else None, percent)


def _within(pred: float, target: float, tolerance: float) -> bool:
    return abs(pred - target) / max(abs(target), 1e-10) <= tolerance


def relaxed_match(prediction: str, target: str, tolerance: float = 0.05) -> bool:
    """Relaxed correctness of one prediction against one target."""
    pred, gold = prepare(prediction), prepare(target)
    if pred.number is not None and gold.number is not None:
        if _within(pred.number, gold.number, tolerance):
            return True
        if pred.percent or gold.percent:  # 25% against 0.25, either way round
            p = pred.number / 100 if pred.percent else pred.number
            g = gold.number / 100 if gold.percent else gold.number
            return _within(p, gold.number, tolerance) or _within(pred.number, g, tolerance)
        return False
    if len(gold.text) == 1 and gold.text.isalpha() and pred.text:
        return pred.text[0].lower() == gold.text.lower()
    text = pred.text
    while text and text[-1] in string.punctuation:
        text = text[:-1]
    return text.lower() == gold.text.lower()


def chart_answer(response: str, flag: str = "Answer:") -> str:
    """The answer DyME reads: first line after the last flag, markdown removed; else the last box,
    else the whole response."""
    flagged = after_flag(response, flag) if flag else None
    if flagged is not None:
        return _MARKDOWN.sub("", flagged).strip()
    boxed = last_boxed(response)
    return boxed if boxed is not None else response.strip()


def chart_gold(gold: str, flag: str = "Answer:") -> str:
    """DyME stores targets as ``"Answer: 2017"``; the flag is removed."""
    return re.sub(re.escape(flag.strip()), "", gold.strip(), flags=re.IGNORECASE).strip()


def relaxed_correct(prediction: str, targets: Sequence[str], tolerance: float = 0.05) -> bool:
    """True if the prediction matches any target."""
    return any(relaxed_match(prediction, t, tolerance) for t in targets)


# ---------------------------------------------------------------------------------------------
# DyME's reading (module docstring)


def dyme_answer(response: str, flag: str = "Answer:") -> str:
    """DyME's ``split_initial_context`` answer: the lower-cased text after the last flag, stripped of
    spaces and then of dots at both ends; the whole lower-cased response, stripped, if no flag."""
    text, key = response.lower(), flag.lower()
    if key not in text:
        return text.strip()
    return text.split(key)[-1].strip().strip(".")


def dyme_gold(gold: str, flag: str = "Answer:") -> str:
    """DyME's reference: lower-cased, every flag removed, stripped (``"Answer: 2017"`` -> ``"2017"``)."""
    return gold.lower().replace(flag.lower(), "").strip()


def _dyme_float(text: str) -> float | None:
    try:
        return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def dyme_match(prediction: str, target: str, tolerance: float = 0.0) -> bool:
    """DyME's ``relaxed_correctness`` as its chart reward calls it: the prediction in the target's
    place, so the relative change is measured against the prediction, and a prediction of 0 falls
    through to text equality."""
    pred, gold = _dyme_float(prediction), _dyme_float(target)
    if gold is not None and pred:
        return abs(gold - pred) / abs(pred) <= tolerance
    return prediction.lower() == target.lower()


@dataclasses.dataclass(frozen=True)
class ChartVerdict:
    """One chart judgement: ``answer`` as read from the response, ``normalized`` as compared, and the
    ``targets`` as read from the golds."""

    correct: bool
    answer: str
    normalized: str
    targets: tuple[str, ...]


def score_chartqa(response: str, golds: Sequence[str], flag: str, tolerance: float) -> ChartVerdict:
    """ChartQA's parser and relaxed accuracy (module docstring)."""
    answer = chart_answer(response, flag)
    targets = tuple(chart_gold(g, flag) for g in golds)
    return ChartVerdict(relaxed_correct(answer, targets, tolerance), answer, prepare(answer).text, targets)


def score_dyme(response: str, golds: Sequence[str], flag: str, tolerance: float) -> ChartVerdict:
    """DyME's parser and comparison (module docstring)."""
    answer = dyme_answer(response, flag)
    targets = tuple(dyme_gold(g, flag) for g in golds)
    return ChartVerdict(any(dyme_match(answer, t, tolerance) for t in targets), answer, answer, targets)


SCORERS: dict[str, Callable[[str, Sequence[str], str, float], ChartVerdict]] = {
    "chartqa": score_chartqa,
    "dyme": score_dyme,
}
