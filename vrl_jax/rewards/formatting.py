"""Format rewards: does a response have the shape the prompt asked for? Each returns float [B] of 0/1.

- ``r1_format``: R1 style, ``<think>...</think>`` exactly once, then a ``\\boxed{}`` answer.
- ``answer_flag_format``: DyME, the answer flag (``Answer:``) exactly once, case-insensitive.
- ``maye_format``: MAYE, ``re.findall(r"<think>.*?</think>")`` finds exactly one block.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np

from vrl_jax.rewards.extract import boxed_spans

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_MAYE_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


def is_r1_formatted(text: str, prefilled_think: bool = False) -> bool:
    """One ``<think>`` block at the start, then a complete ``\\boxed{}`` after ``</think>``.

    With ``prefilled_think`` the prompt already ends in ``<think>``, so the response must contain
    no opening tag and exactly one closing tag.
    """
    body = text.strip()
    opens = body.count(_THINK_OPEN)
    if body.count(_THINK_CLOSE) != 1:
        return False
    if prefilled_think:
        if opens != 0:
            return False
    elif opens != 1 or not body.startswith(_THINK_OPEN):
        return False
    after = body.split(_THINK_CLOSE, 1)[1]
    return any(content is not None for _, _, content in boxed_spans(after))


def r1_format(completions: Sequence[str], examples: Sequence[Mapping] | None = None, *,
              prefilled_think: bool = False) -> np.ndarray:
    """float32 [B]: 1 where ``is_r1_formatted``."""
    return np.array([is_r1_formatted(c, prefilled_think) for c in completions], np.float32)


def answer_flag_format(completions: Sequence[str], examples: Sequence[Mapping] | None = None, *,
                       flag: str = "Answer:", min_thinking_length: int = 0) -> np.ndarray:
    """float32 [B]: DyME's format reward, the flag exactly once (literal, any case) and at least
    ``min_thinking_length`` characters of reasoning (stripped) before it."""
    out = np.zeros(len(completions), np.float32)
    for i, text in enumerate(completions):
        if len(re.findall(re.escape(flag), text, re.IGNORECASE)) != 1:
            continue
        thinking = text.lower().split(flag.lower())[0]
        out[i] = float(len(thinking.strip()) >= min_thinking_length)
    return out


def maye_format(completions: Sequence[str], examples: Sequence[Mapping] | None = None) -> np.ndarray:
    """float32 [B]: MAYE's format reward, exactly one non-greedy ``<think>...</think>`` match."""
    return np.array([len(_MAYE_THINK.findall(c)) == 1 for c in completions], np.float32)
