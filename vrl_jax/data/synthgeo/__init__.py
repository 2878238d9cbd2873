"""synthgeo: a procedurally generated, offline, deterministic visual-math benchmark.

Eight families (counting, rectangles, right triangles, triangle angles, parallel-line angles,
circles with pi, bar charts, grid lengths), each with a text-only twin; exact answers; a
step-by-step hint and checkable visual facts per item; splits by semantic hash with a held-out
`test_ood` region; exporters to MAYE, EasyR1 and DyME files; a tiny tokenizer for the tiny model.
Run `python -m vrl_jax.data.synthgeo --help` for the CLI.
"""
from vrl_jax.data.synthgeo.answers import ExactAnswer, exact_sqrt
from vrl_jax.data.synthgeo.difficulty import IID_LEVELS, LEVELS, OOD_LEVEL, DifficultyConfig, level_config
from vrl_jax.data.synthgeo.export import FORMATS, export_dataset, write_split
from vrl_jax.data.synthgeo.families import FAMILIES, get_family
from vrl_jax.data.synthgeo.generator import (FROZEN_SIZES, GENERATOR_VERSION, GeneratorConfig, SynthItem,
                                             corpus_texts, fingerprint, frozen_split, generate_item,
                                             generate_split, png_bytes)
from vrl_jax.data.synthgeo.splits import SPLITS, semantic_key, split_of

__all__ = [
    "DifficultyConfig", "ExactAnswer", "FAMILIES", "FORMATS", "FROZEN_SIZES", "GENERATOR_VERSION",
    "GeneratorConfig", "IID_LEVELS", "LEVELS", "OOD_LEVEL", "SPLITS", "SynthItem", "corpus_texts",
    "exact_sqrt", "export_dataset", "fingerprint", "frozen_split", "generate_item", "generate_split",
    "get_family", "level_config", "png_bytes", "semantic_key", "split_of", "write_split",
]
