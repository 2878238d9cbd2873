"""Deterministic item generation: (seed, split, index) -> one `SynthItem`, independent of all others.

Each item draws from its own RNG stream `default_rng([seed, split_id, index])`, so item i of a
split is the same whether 10 or 10,000 items are generated (evaluation sets are prefix-stable) and
generation could be parallel. Within the item, the problem is re-sampled until its semantic hash
lands in the requested split (rejection), which is what makes the splits disjoint by construction.

Bump `GENERATOR_VERSION` on any change to sampling, wording, rationales or drawing: the frozen
evaluation sets are defined as (GENERATOR_VERSION, seed, split, index).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from vrl_jax.data.synthgeo.difficulty import IID_LEVELS, OOD_LEVEL, level_config
from vrl_jax.data.synthgeo.families import FAMILIES, get_family
from vrl_jax.data.synthgeo.family import pick
from vrl_jax.data.synthgeo.splits import SPLITS, check_split, semantic_key, split_of

GENERATOR_VERSION = "1"
SPLIT_IDS = {split: i for i, split in enumerate(SPLITS)}
IMAGE_TOKEN = "<image>"
MAX_ATTEMPTS = 5000  # a split that a family cannot reach in this many draws is a config error
# Sizes of the frozen evaluation sets (geometry3k's val/test sizes), generated with seed 0.
FROZEN_SIZES = {"val": 300, "test_iid": 600, "test_ood": 600}


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """What, besides (split, index), decides the items.

    Attributes:
      seed: master seed (>= 0).
      families: family names, assigned round-robin by index so every family gets a fair share.
      text_fraction: share of items that are text twins (numbers stated in the question).
      levels: difficulty levels drawn for train/val/test_iid; test_ood always uses level 3.
      image_size: image side in pixels.
    """

    seed: int = 0
    families: tuple[str, ...] = tuple(FAMILIES)
    text_fraction: float = 0.25
    levels: tuple[int, ...] = IID_LEVELS
    image_size: int = 112

    def __post_init__(self):
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"GeneratorConfig.seed must be an integer >= 0, got {self.seed!r}")
        if not self.families:
            raise ValueError("GeneratorConfig.families must name at least one family")
        for name in self.families:
            get_family(name)
        if not 0.0 <= self.text_fraction <= 1.0:
            raise ValueError(f"GeneratorConfig.text_fraction must be in [0, 1], got {self.text_fraction}")
        bad = [lv for lv in self.levels if lv not in IID_LEVELS]
        if not self.levels or bad:
            raise ValueError(f"GeneratorConfig.levels must be a non-empty subset of {IID_LEVELS} "
                             f"(level {OOD_LEVEL} is reserved for test_ood), got {self.levels}")
        level_config(0, self.image_size)  # validates image_size

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True, eq=False)
class SynthItem:
    """One generated problem. `question` starts with '<image>'; `image` is an RGB PIL image."""

    id: str
    split: str
    index: int
    family: str
    modality: str  # 'vision' (numbers only in the image) or 'text' (numbers in the question)
    level: int
    question: str
    answer: str
    solution: str
    hint: str
    visual_facts: dict
    meta: dict
    image: Image.Image

    @property
    def image_name(self) -> str:
        return f"{self.split}/{self.index:06d}-{self.family}.png"

    def record(self, image_path: str) -> dict:
        """The JSON record (MAYE's keys plus extras); DyME's hint and facts sit in `meta`, so a
        loader that sniffs keys still recognises the MAYE schema."""
        return {"id": self.id, "question": self.question, "answer": self.answer, "solution": self.solution,
                "image": image_path, "split": self.split, "family": self.family, "modality": self.modality,
                "level": self.level,
                "meta": {"hint": self.hint, "visual_facts": self.visual_facts, **self.meta}}


def png_bytes(image: Image.Image) -> bytes:
    """PNG encoding with fixed settings (deterministic for a given Pillow/zlib). zlib's fastest level: a
    diagram of a few flat colours encodes in about half the time of level 6 for files 1.3x larger (1.1 kB)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=1)
    return buffer.getvalue()


def generate_item(split: str, index: int, config: GeneratorConfig = GeneratorConfig()) -> SynthItem:
    """Item `index` of `split`; raises RuntimeError if the family cannot reach the split."""
    check_split(split)
    if index < 0:
        raise ValueError(f"item index must be >= 0, got {index}")
    seed = [config.seed, SPLIT_IDS[split], index]
    rng = np.random.default_rng(seed)
    family = get_family(config.families[index % len(config.families)])
    text = bool(rng.random() < config.text_fraction)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        level = OOD_LEVEL if split == "test_ood" else pick(rng, config.levels)
        difficulty = level_config(level, config.image_size)
        params, layout = family.sample(rng, difficulty)
        if split_of(family, params) == split:
            break
    else:
        raise RuntimeError(f"family {family.name!r} produced no {split} problem in {MAX_ATTEMPTS} draws "
                           f"at levels {config.levels}; its parameter space is too small for this split")
    paraphrases = family.questions(params, layout, text)
    # The last paraphrase is only ever used out of distribution.
    template = len(paraphrases) - 1 if difficulty.held_out_templates else int(rng.integers(len(paraphrases) - 1))
    answer = family.solve(params)
    rationale = family.rationale(params, layout, text)
    meta = {
        "params": params, "layout": layout, "semantic_key": semantic_key(family.name, params),
        "difficulty": difficulty.to_dict(), "generator_version": GENERATOR_VERSION, "seed": seed,
        "template": template, "attempts": attempt, "answer_kind": answer.kind,
        "answer_float": round(answer.as_float(), 9),
    }
    return SynthItem(
        id=f"synthgeo-v{GENERATOR_VERSION}-{split}-{index:06d}", split=split, index=index,
        family=family.name, modality="text" if text else "vision", level=level,
        question=IMAGE_TOKEN + paraphrases[template], answer=answer.latex(),
        solution=rationale.solution(answer.latex()), hint=rationale.hint(),
        visual_facts=family.visual_facts(params, layout), meta=meta,
        image=family.render(params, layout, difficulty, not text))


def generate_split(split: str, n: int, config: GeneratorConfig = GeneratorConfig(),
                   start: int = 0) -> Iterator[SynthItem]:
    """Items start .. start+n-1 of `split`, lazily."""
    check_split(split)
    if n < 0 or start < 0:
        raise ValueError(f"need n >= 0 and start >= 0, got n={n}, start={start}")
    for index in range(start, start + n):
        yield generate_item(split, index, config)


def frozen_split(split: str, n: int | None = None) -> Iterator[SynthItem]:
    """The frozen evaluation set of this GENERATOR_VERSION (default config, seed 0)."""
    if split not in FROZEN_SIZES:
        raise ValueError(f"no frozen set for split {split!r}; frozen splits are {sorted(FROZEN_SIZES)}")
    return generate_split(split, FROZEN_SIZES[split] if n is None else n)


def fingerprint(items: Iterable[SynthItem]) -> str:
    """sha256 over the items' JSON records (text, answers, params and layout; not pixel bytes,
    which depend on the Pillow/zlib build). Pins the generator's output for a version."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps(item.record(item.image_name), sort_keys=True).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def corpus_texts(items: Iterable[SynthItem]) -> Sequence[str]:
    """The strings a tokenizer for this data should compress well: questions, solutions, hints."""
    texts = []
    for item in items:
        texts += [item.question[len(IMAGE_TOKEN):], item.solution, item.hint, f"Answer: {item.answer}"]
    return texts
