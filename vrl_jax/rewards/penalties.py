"""Penalty terms on a response's language and length. Each returns float32 [B].

- ``language_penalty``: MAYE, ``-coefficient x`` (CJK characters / characters).
- ``maye_penalty``: MAYE's penalty *mask* (1 = penalise): no stop token, or too short. MAYE
  **replaces** the whole score by ``reward_penalty`` (-0.1) there, so compose it as an override.
- ``soft_overlong``: DAPO's soft overlong punishment, a linear ramp over the last
  ``buffer_length`` tokens before ``max_length``.

Lengths are counted in tokens, including the stop token when the response has one (as sampled).
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np

_CJK = re.compile(r"[\u4e00-\u9fff]")


def _batch_array(name: str, values, batch: int, dtype) -> np.ndarray:
    if values is None:
        raise ValueError(f"{name} is required: pass {name}=<array of shape [{batch}]> to compute_rewards")
    arr = np.asarray(values)
    if arr.shape != (batch,):
        raise ValueError(f"{name}: expected shape ({batch},) (one per completion), got {arr.shape}")
    return arr.astype(dtype)


def language_penalty(completions: Sequence[str], examples: Sequence[Mapping] | None = None, *,
                     coefficient: float = 0.1) -> np.ndarray:
    """float32 [B]: ``-coefficient * n_cjk / len(text)`` (0 for an empty text)."""
    return np.array([-coefficient * len(_CJK.findall(c)) / len(c) if c else 0.0 for c in completions],
                    np.float32)


def maye_penalty(completions: Sequence[str], examples: Sequence[Mapping] | None = None, *,
                 lengths=None, truncated=None, min_response_length: int = 1,
                 penalise_no_eos: bool = True) -> np.ndarray:
    """float32 [B]: 1 where MAYE overrides the score with its penalty, else 0.

    Args:
      lengths: int [B], response tokens including the stop token when present.
      truncated: bool [B], True where the response has no stop token (cut at max length).
      min_response_length: MAYE compares its ``seq_lens``, the index of the last valid token,
        i.e. ``lengths - 1``, against this (1 in the paper's script, 18 in its YAML).
      penalise_no_eos: penalise truncated responses.
    """
    batch = len(completions)
    lengths = _batch_array("lengths", lengths, batch, np.int64)
    mask = (lengths - 1) < min_response_length
    if penalise_no_eos:
        mask |= _batch_array("truncated", truncated, batch, bool)
    return mask.astype(np.float32)


def soft_overlong(completions: Sequence[str], examples: Sequence[Mapping] | None = None, *,
                  lengths=None, max_length: int, buffer_length: int,
                  penalty_factor: float = 1.0) -> np.ndarray:
    """float32 [B]: DAPO's ``R_length`` (Yu et al. 2025, eq. 13), scaled by ``penalty_factor``.

    0 up to ``max_length - buffer_length`` tokens, then ``((max_length - buffer_length) - L) /
    buffer_length`` down to -1 at ``max_length``, and -1 beyond.
    """
    if not (isinstance(max_length, int) and isinstance(buffer_length, int) and 0 < buffer_length <= max_length):
        raise ValueError(f"soft_overlong: need integers 0 < buffer_length <= max_length, "
                         f"got buffer_length={buffer_length!r}, max_length={max_length!r}")
    lengths = _batch_array("lengths", lengths, len(completions), np.float64)
    expected = max_length - buffer_length
    ramp = np.minimum(0.0, (expected - lengths) / buffer_length)
    return (penalty_factor * np.maximum(ramp, -1.0)).astype(np.float32)
