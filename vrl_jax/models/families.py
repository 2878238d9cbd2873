"""Model families by `model_type`: the module, the checkpoint name table and the processor of each.

Entries are "module:attribute" strings resolved on first use, so reading a config never imports a
family's model code, and the shared loading, conversion and sampling code never names a family.
"""

from __future__ import annotations

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class Family:
    model: str  # the nnx.Module class: cls(config, dtype=, param_dtype=, rngs=)
    weights: str  # the `weights.WeightTable` of its HF checkpoint names
    processor: str  # the `processor.VLProcessor` (sub)class
    check_inputs: str  # fn(config, rng) -> the inputs of `convert check` (see convert._build_check_inputs)


_QWEN = Family(model="vrl_jax.models.qwen_vl:QwenVL", weights="vrl_jax.models.weights:QWEN_VL_WEIGHTS",
               processor="vrl_jax.models.processor:VLProcessor", check_inputs="vrl_jax.convert:_build_check_inputs")

FAMILIES: dict[str, Family] = {
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "qwen3_vl": dataclasses.replace(_QWEN, weights="vrl_jax.models.weights:QWEN3_VL_WEIGHTS"),
    "llava_onevision": Family(
        model="vrl_jax.models.llava_onevision:LlavaOnevision",
        weights="vrl_jax.models.llava_onevision:LLAVA_WEIGHTS",
        processor="vrl_jax.models.llava_onevision:LlavaProcessor",
        check_inputs="vrl_jax.models.llava_onevision:check_inputs"),
}


def resolve(model_type: str, part: str):
    """The object `FAMILIES[model_type].<part>` names."""
    module, name = getattr(FAMILIES[model_type], part).split(":")
    return getattr(importlib.import_module(module), name)


def hf_names() -> dict[str, str]:
    """vrl_jax parameter path -> its HF key template, over every family (a path means one thing in all)."""
    names: dict[str, str] = {}
    for model_type in FAMILIES:
        for template, path, _ in resolve(model_type, "weights").rules:
            names.setdefault(path, template)
    return names
