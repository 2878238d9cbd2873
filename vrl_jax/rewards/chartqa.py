"""ChartQA relaxed accuracy (Masry et al. 2022, §5.1), as DyME scores chart and GSM8K answers.

A numeric answer is correct within ``tolerance`` relative change of the target (5% in the
ChartQA protocol; DyME's *training* reward calls it with 0); percent answers also match their
decimal form; a one-letter target is a multiple-choice letter; anything else must match the target
exactly, case-insensitively, after trailing punctuation is dropped.
"""
from __future__ import annotations

import dataclasses
import re
import string
from typing import Sequence

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
