"""Difficulty knobs, one `DifficultyConfig` per item, recorded in the item's `meta`.

Levels 0-2 are the in-distribution curriculum (train, val, test_iid); level 3 is held out for
`test_ood`: larger numbers, off-grid angles, more objects and unseen question paraphrases. Which
split an item belongs to is decided by its semantic parameters (see `splits.py`), not by its level,
so the presets only steer sampling; the families' `is_ood` predicates are the source of truth.
"""
from __future__ import annotations

import dataclasses

IID_LEVELS = (0, 1, 2)
OOD_LEVEL = 3


@dataclasses.dataclass(frozen=True)
class DifficultyConfig:
    """Knobs a family reads when it samples and draws one item.

    Attributes:
      level: curriculum level the preset came from.
      image_size: side of the square image in pixels (112 = 8x8 patches of 14 = 16 merged tokens).
      number_max: scale of the numbers (rectangle sides, radii, bar values; hypotenuses up to 2.5x).
      count_max: most target objects in a counting item.
      distractor_max: most non-target objects in a counting item.
      angle_step: given angles are multiples of this (10, 5; 1 for off-grid angles).
      two_step: allow problems needing two steps (perimeter, missing leg, diameter, sums/differences,
        angles at the other intersection).
      irrational: allow answers with square roots or fractional coefficients (e.g. 9/4 pi).
      line_width: stroke width in pixels.
      label_jitter: largest random offset of a label from its anchor, in pixels.
      rotation_max: largest rotation of a geometric figure, in degrees.
      held_out_templates: use only the question paraphrase that levels 0-2 never see.
    """

    level: int
    image_size: int = 112
    number_max: int = 6
    count_max: int = 4
    distractor_max: int = 2
    angle_step: int = 10
    two_step: bool = False
    irrational: bool = False
    line_width: int = 2
    label_jitter: int = 0
    rotation_max: int = 0
    held_out_templates: bool = False

    def __post_init__(self):
        if self.image_size < 64:
            raise ValueError(f"DifficultyConfig.image_size must be >= 64 pixels, got {self.image_size}")
        for name in ("number_max", "count_max", "angle_step", "line_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"DifficultyConfig.{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


LEVELS: dict[int, DifficultyConfig] = {
    0: DifficultyConfig(level=0),
    1: DifficultyConfig(level=1, number_max=9, count_max=5, distractor_max=4, angle_step=5,
                        two_step=True, label_jitter=2, rotation_max=15),
    2: DifficultyConfig(level=2, number_max=12, count_max=6, distractor_max=6, angle_step=5,
                        two_step=True, irrational=True, label_jitter=3, rotation_max=30),
    OOD_LEVEL: DifficultyConfig(level=OOD_LEVEL, number_max=24, count_max=9, distractor_max=4,
                                angle_step=1, two_step=True, irrational=True, label_jitter=2,
                                rotation_max=15, held_out_templates=True),
}


def level_config(level: int, image_size: int | None = None) -> DifficultyConfig:
    """The preset for `level`, optionally drawn at another image size."""
    if level not in LEVELS:
        raise ValueError(f"unknown difficulty level {level!r}; expected one of {sorted(LEVELS)}")
    config = LEVELS[level]
    return config if image_size is None else dataclasses.replace(config, image_size=image_size)
