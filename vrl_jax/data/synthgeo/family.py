"""What a task family provides: sampling, exact solving, wording, rationale, facts and drawing.

A problem is a pair `(params, layout)` of JSON-able dicts:
- `params` are the *semantic* parameters, already canonical (e.g. rectangle sides sorted), and
  nothing else: two items with equal params are the same problem, so the split is a hash of them.
- `layout` holds everything that changes the picture but not the problem (positions, colours,
  orientation, which side carries which label).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from PIL import Image

from vrl_jax.data.synthgeo.answers import ExactAnswer
from vrl_jax.data.synthgeo.difficulty import DifficultyConfig

Params = Mapping[str, Any]
Layout = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Rationale:
    """A step-by-step solution in DyME's Goal / Observation / Reasoning / Conclusion shape."""

    goal: str
    observation: str
    steps: tuple[str, ...]
    conclusion: str

    def hint(self) -> str:
        return (f"Goal: {self.goal}\nObservation: {self.observation}\n"
                f"Reasoning: {' '.join(self.steps)}\nConclusion: {self.conclusion}")

    def solution(self, answer: str) -> str:
        """MAYE's `solution`: the reasoning, then the final answer boxed."""
        return f"{self.observation} {' '.join(self.steps)} The answer is \\boxed{{{answer}}}."


@dataclasses.dataclass(frozen=True)
class Family:
    """The functions that define one task family (all pure; randomness only through `rng`).

    Attributes:
      name: short id used in records and keys.
      sample: `(rng, config) -> (params, layout)`; samples within the level's knobs.
      solve: `params -> ExactAnswer`.
      is_ood: `params -> bool`; True for the held-out parameter region that only `test_ood` holds.
      questions: `(params, layout, text) -> paraphrases`; the last one is held out for level 3.
        Vision wordings contain no digits: the numbers are only in the image. Text twins
        (`text=True`) state every number the problem needs.
      rationale: `(params, layout, text) -> Rationale`.
      visual_facts: `(params, layout) -> dict` with `description`, `objects` (name, attributes,
        position) and `quantities`: what a checker can hold the reasoning to.
      render: `(params, layout, config, show_labels) -> PIL RGB image`; text twins are drawn with
        `show_labels=False`, so the picture matches but carries no numbers.
    """

    name: str
    sample: Callable[[np.random.Generator, DifficultyConfig], tuple[dict, dict]]
    solve: Callable[[Params], ExactAnswer]
    is_ood: Callable[[Params], bool]
    questions: Callable[[Params, Layout, bool], tuple[str, ...]]
    rationale: Callable[[Params, Layout, bool], Rationale]
    visual_facts: Callable[[Params, Layout], dict]
    render: Callable[[Params, Layout, DifficultyConfig, bool], Image.Image]


def pick(rng: np.random.Generator, options):
    """One element of a sequence, as a plain Python value (not a NumPy scalar)."""
    value = options[int(rng.integers(len(options)))]
    return value.item() if hasattr(value, "item") else value


def randint(rng: np.random.Generator, low: int, high: int) -> int:
    """A uniform integer in [low, high], both ends included."""
    return int(rng.integers(low, high + 1))
