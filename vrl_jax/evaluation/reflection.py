"""MAYE's reflection analysis: 15 reflection words, per-word counts and the five ratios of paper Table 2.

MAYE (`recipes/full_ppo_vllm_distributed.py::log_reflection_analysis`) lower-cases each response,
calls it reflective when any word occurs as a substring, counts words with `text.count(word)`, computes
the ratios per rank and then *averages the ratios* across ranks. Two things differ here, on purpose:

- Matching is by whole word by default (case-insensitive regex `\\bword\\b`): MAYE's substring rule
  counts "wait" in "awaiting", "verify" in "verifying", "check again" in "recheck again".
  `match="substring"` reproduces MAYE exactly (lower-case, non-overlapping `str.count`).
- Everything is kept as integer counts (`ReflectionCounts`), which add across processes. Ratios are
  taken only after pooling (sum the counts, then divide); a mean of per-process ratios weights a
  process with few correct answers as much as one with many.

Counts layout for all-gathers: `ReflectionCounts.to_array()` is int64 `[4 + W]`
(n, n_correct, n_reflective, n_reflective_correct, then one count per word).
"""
from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple, Sequence

import numpy as np

REFLECTION_WORDS: tuple[str, ...] = (
    "re-check", "re-evaluate", "re-examine", "re-think", "recheck", "reevaluate", "reexamine",
    "reevaluation", "rethink", "check again", "think again", "try again", "verify", "wait", "yet",
)

# Paper Table 2, in MAYE's logging order.
RATIO_NAMES: tuple[str, ...] = (
    "reflection_ratio",                       # N_ref / N
    "reflection_ratio_in_correct_answers",    # N_ref+ / N+
    "reflection_ratio_in_incorrect_answers",  # (N_ref - N_ref+) / (N - N+)
    "correct_ratio_in_reflection_texts",      # N_ref+ / N_ref
    "correct_ratio_in_no_reflection_texts",   # (N+ - N_ref+) / (N - N_ref)
)
RATIO_PREFIX = "reflection_analysis/"
WORD_PREFIX = "reflection_words/"
MATCH_MODES = ("word", "substring")
_HEADER = 4  # n, n_correct, n_reflective, n_reflective_correct


@dataclasses.dataclass(frozen=True)
class ReflectionCounts:
    """Integer counts of one batch (or a pool of batches); `a + b` pools them.

    Attributes:
      n: responses (N).
      n_correct: correct responses (N+).
      n_reflective: responses with at least one reflection word (N_ref).
      n_reflective_correct: correct responses with a reflection word (N_ref+).
      word_counts: total occurrences of each word over all responses, aligned with `words`.
      words: the word list the counts refer to.
    """

    n: int = 0
    n_correct: int = 0
    n_reflective: int = 0
    n_reflective_correct: int = 0
    word_counts: tuple[int, ...] = (0,) * len(REFLECTION_WORDS)
    words: tuple[str, ...] = REFLECTION_WORDS

    def __post_init__(self):
        if len(self.word_counts) != len(self.words):
            raise ValueError(f"word_counts has {len(self.word_counts)} entries for {len(self.words)} words")
        if not (0 <= self.n_reflective_correct <= min(self.n_correct, self.n_reflective)
                and max(self.n_correct, self.n_reflective) <= self.n):
            raise ValueError(f"inconsistent reflection counts: {self}")

    @classmethod
    def zeros(cls, words: Sequence[str] = REFLECTION_WORDS) -> "ReflectionCounts":
        return cls(word_counts=(0,) * len(words), words=tuple(words))

    def __add__(self, other: "ReflectionCounts") -> "ReflectionCounts":
        if not isinstance(other, ReflectionCounts):
            return NotImplemented
        if self.words != other.words:
            raise ValueError("cannot pool ReflectionCounts over different word lists")
        return ReflectionCounts(
            self.n + other.n, self.n_correct + other.n_correct, self.n_reflective + other.n_reflective,
            self.n_reflective_correct + other.n_reflective_correct,
            tuple(a + b for a, b in zip(self.word_counts, other.word_counts)), self.words)

    def __radd__(self, other):
        # Lets `sum(list_of_counts)` start from 0.
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    def to_array(self) -> np.ndarray:
        """int64 `[4 + W]`, the layout to all-gather and sum over processes."""
        header = [self.n, self.n_correct, self.n_reflective, self.n_reflective_correct]
        return np.asarray(header + list(self.word_counts), dtype=np.int64)

    @classmethod
    def from_array(cls, array, words: Sequence[str] = REFLECTION_WORDS) -> "ReflectionCounts":
        """Inverse of `to_array`; a `[P, 4 + W]` stack (one row per process) is summed first."""
        arr = np.asarray(array, dtype=np.int64)
        if arr.ndim == 2:
            arr = arr.sum(axis=0)
        if arr.shape != (_HEADER + len(words),):
            raise ValueError(f"expected shape ({_HEADER + len(words)},) or [P, {_HEADER + len(words)}]; "
                             f"got {np.shape(array)}")
        values = [int(v) for v in arr]
        return cls(*values[:_HEADER], word_counts=tuple(values[_HEADER:]), words=tuple(words))


def _div(num: int, den: int) -> float:
    # MAYE's convention: a ratio with an empty denominator is 0.
    return num / den if den else 0.0


def ratios(counts: ReflectionCounts) -> dict[str, float]:
    """The five Table-2 ratios of (pooled) counts, keyed by `RATIO_NAMES`; 0 where a denominator is 0."""
    n, npos, nref, nrefpos = counts.n, counts.n_correct, counts.n_reflective, counts.n_reflective_correct
    return {
        "reflection_ratio": _div(nref, n),
        "reflection_ratio_in_correct_answers": _div(nrefpos, npos),
        "reflection_ratio_in_incorrect_answers": _div(nref - nrefpos, n - npos),
        "correct_ratio_in_reflection_texts": _div(nrefpos, nref),
        "correct_ratio_in_no_reflection_texts": _div(npos - nrefpos, n - nref),
    }


def reflection_metrics(counts: ReflectionCounts) -> dict[str, float]:
    """MAYE's logged keys: `reflection_analysis/<ratio>` (5) and `reflection_words/<word>` (one per word)."""
    out = {RATIO_PREFIX + k: v for k, v in ratios(counts).items()}
    out.update({WORD_PREFIX + w: float(c) for w, c in zip(counts.words, counts.word_counts)})
    return out


def _patterns(words: Sequence[str]) -> list[re.Pattern]:
    return [re.compile(r"\b" + re.escape(w) + r"\b", re.IGNORECASE) for w in words]


def word_counts_per_response(responses: Sequence[str], words: Sequence[str] = REFLECTION_WORDS,
                             match: str = "word") -> np.ndarray:
    """int64 `[N, W]`: occurrences of each word in each response (non-overlapping).

    match: "word" = case-insensitive whole-word regex; "substring" = MAYE's `text.lower().count(word)`.
    """
    if match not in MATCH_MODES:
        raise ValueError(f"match must be one of {MATCH_MODES}; got {match!r}")
    out = np.zeros((len(responses), len(words)), dtype=np.int64)
    if match == "substring":
        lowered = [w.lower() for w in words]
        for i, text in enumerate(responses):
            low = text.lower()
            out[i] = [low.count(w) for w in lowered]
    else:
        pats = _patterns(words)
        for i, text in enumerate(responses):
            out[i] = [len(p.findall(text)) for p in pats]
    return out


def _as_correct(correct, n: int) -> np.ndarray:
    arr = np.asarray(correct)
    if arr.shape != (n,):
        raise ValueError(f"`correct` must have shape ({n},), one per response; got {arr.shape}")
    # MAYE passes `acc_rewards == 1.0`; a float accuracy array is read the same way.
    return arr.astype(bool) if arr.dtype == bool else arr == 1


class ReflectionAnalysis(NamedTuple):
    """`counts` (poolable), `reflective` bool `[N]`, `example`: index of the first reflective correct
    response (MAYE's `reflection_outputs/Reflection-Correct` table) or None."""

    counts: ReflectionCounts
    reflective: np.ndarray
    example: int | None


def analyze_reflection(responses: Sequence[str], correct, *, words: Sequence[str] = REFLECTION_WORDS,
                       match: str = "word") -> ReflectionAnalysis:
    """Reflection counts of one process's rollouts of one step.

    Args:
      responses: N decoded responses.
      correct: bool `[N]`, or accuracy rewards `[N]` (correct where == 1, as MAYE).
      words: the reflection vocabulary (default: MAYE's 15 words).
      match: "word" (default) or "substring" (MAYE's exact rule).
    Returns:
      ReflectionAnalysis; pool `counts` over processes before calling `ratios`.
    """
    words = tuple(words)
    per_word = word_counts_per_response(responses, words, match)
    ok = _as_correct(correct, len(responses))
    reflective = per_word.sum(axis=1) > 0
    both = np.flatnonzero(reflective & ok)
    counts = ReflectionCounts(
        n=len(responses), n_correct=int(ok.sum()), n_reflective=int(reflective.sum()),
        n_reflective_correct=int(both.size), word_counts=tuple(int(c) for c in per_word.sum(axis=0)),
        words=words)
    return ReflectionAnalysis(counts, reflective, int(both[0]) if both.size else None)


def reflection_counts(responses: Sequence[str], correct, *, words: Sequence[str] = REFLECTION_WORDS,
                      match: str = "word") -> ReflectionCounts:
    """Shorthand for `analyze_reflection(...).counts`."""
    return analyze_reflection(responses, correct, words=words, match=match).counts
