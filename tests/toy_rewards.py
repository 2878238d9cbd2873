"""A reward the tiny random model can learn in a few GRPO steps, loaded as a reward plugin
(`rewards.plugins`), to check that the training loop's RL moves a policy toward its reward."""

from __future__ import annotations

import numpy as np


def early_letters(completions, examples, **_) -> np.ndarray:
    """float32 [B]: the share of a completion's letters that come from the first half of the alphabet
    (a-m, either case; 0 for a completion without letters). About half at random, and every token counts."""
    def share(text: str) -> float:
        letters = [ch.lower() for ch in text if ch.isascii() and ch.isalpha()]
        return sum(ch <= "m" for ch in letters) / len(letters) if letters else 0.0
    return np.asarray([share(text) for text in completions], np.float32)
