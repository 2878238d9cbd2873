"""A tiny Qwen2.5-VL (or Qwen3-VL), created offline: the embedded default's model.

No weights can be downloaded, so the default experiment builds a small model of the Qwen2.5-VL
architecture (`model.tiny.family`: or of another family in `TINY_FAMILIES`) with random weights and a
tokenizer trained on the synthetic data, and saves them as an ordinary Hugging Face directory
(config.json, model.safetensors, tokenizer files, preprocessor_config.json). Training then loads it
through exactly the code a real checkpoint uses. Nothing here needs PyTorch.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vrl_jax.models.config import ModelConfig
from vrl_jax.models.loading import export_hf
from vrl_jax.models.qwen_vl import QwenVL

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def _sections(head_dim: int) -> list[int]:
    """M-RoPE sections in Qwen's 2:3:3 proportion ([16, 24, 24] for head_dim 128)."""
    half = head_dim // 2
    spatial = half * 3 // 8
    return [half - 2 * spatial, spatial, spatial]


def _special_ids(special: dict[str, int]) -> dict:
    return dict(image_token_id=special["<|image_pad|>"], video_token_id=special["<|video_pad|>"],
                vision_start_token_id=special["<|vision_start|>"], vision_end_token_id=special["<|vision_end|>"])


def tiny_hf_config(vocab_size: int, special: dict[str, int], *, family: str = "qwen2_5_vl", hidden: int = 128,
                   layers: int = 4, heads: int = 4, kv_heads: int = 2, intermediate: int = 384, vision_width: int = 64,
                   vision_depth: int = 2) -> dict:
    """A config.json dict of the tiny model of Qwen `family` (transformers 5.x nested layout)."""
    return QWEN_FAMILIES[family].hf_config(vocab_size, special, hidden=hidden, layers=layers, heads=heads,
                                           kv_heads=kv_heads, intermediate=intermediate, vision_width=vision_width,
                                           vision_depth=vision_depth)


def _qwen2_5_vl_config(vocab_size: int, special: dict[str, int], *, hidden, layers, heads, kv_heads, intermediate,
                       vision_width, vision_depth) -> dict:
    from transformers import Qwen2_5_VLConfig
    section = _sections(hidden // heads)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, rms_norm_eps=1e-6,
                         bos_token_id=special["<|endoftext|>"], eos_token_id=special["<|im_end|>"],
                         pad_token_id=special["<|endoftext|>"],
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}),
        vision_config=dict(depth=vision_depth, hidden_size=vision_width, out_hidden_size=hidden,
                           intermediate_size=2 * vision_width, num_heads=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=56, fullatt_block_indexes=[vision_depth - 1],
                           tokens_per_second=2),
        **_special_ids(special), eos_token_id=special["<|im_end|>"], pad_token_id=special["<|endoftext|>"],
        tie_word_embeddings=True)
    raw = cfg.to_dict()
    raw["model_type"] = "qwen2_5_vl"
    return raw


def _qwen3_vl_config(vocab_size: int, special: dict[str, int], *, hidden, layers, heads, kv_heads, intermediate,
                     vision_width, vision_depth) -> dict:
    """Qwen3-VL at toy size: tied embeddings (as the 2B/4B releases), q/k norms, interleaved M-RoPE, an 8 x 8
    learned position table and DeepStack taps after the first (at most two) vision blocks."""
    from transformers import Qwen3VLConfig
    head_dim = hidden // heads
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, max_position_embeddings=4096, rms_norm_eps=1e-6,
                         bos_token_id=special["<|endoftext|>"], eos_token_id=special["<|im_end|>"],
                         pad_token_id=special["<|endoftext|>"],
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": _sections(head_dim), "mrope_interleaved": True}),
        vision_config=dict(depth=vision_depth, hidden_size=vision_width, out_hidden_size=hidden,
                           intermediate_size=2 * vision_width, num_heads=2, patch_size=16, spatial_merge_size=2,
                           temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=list(range(min(max(vision_depth - 1, 1), 2)))),
        **_special_ids(special), eos_token_id=special["<|im_end|>"], pad_token_id=special["<|endoftext|>"],
        tie_word_embeddings=True)
    raw = cfg.to_dict()
    raw["model_type"] = "qwen3_vl"
    return raw


class TinyFamily(NamedTuple):
    """How to build one family's tiny model: its config and its image processor's patch and normalisation."""

    hf_config: Callable[..., dict]
    patch_size: int
    image_mean: list[float]
    image_std: list[float]


QWEN_FAMILIES = {
    "qwen2_5_vl": TinyFamily(_qwen2_5_vl_config, 14, CLIP_MEAN, CLIP_STD),
    "qwen3_vl": TinyFamily(_qwen3_vl_config, 16, [0.5] * 3, [0.5] * 3),  # the released preprocessor's 0.5
}

# model.tiny.family -> "module:function" writing that family's tiny model (the signature of build_tiny_model).
TINY_FAMILIES = {"qwen2_5_vl": "vrl_jax.models.tiny:build_tiny_qwen2_5_vl",
                 "qwen3_vl": "vrl_jax.models.tiny:build_tiny_qwen3_vl",
                 "llava_onevision": "vrl_jax.models.llava_tiny:build_tiny_llava"}


def init_random(make: Callable[[], nnx.Module]) -> nnx.Module:
    """`make()`'s randomly initialised module, its initialisers compiled as one program (built eagerly,
    every initialiser op compiles on its own: seconds for a tiny model, paid by every fresh run)."""
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    return nnx.merge(graphdef, jax.jit(lambda: nnx.split(make())[1])())


def build_tiny_model(out_dir: str, texts: Iterable[str], *, family: str = "qwen2_5_vl", **kwargs) -> str:
    """Writes the tiny random model of `family` (a key of TINY_FAMILIES) to `out_dir`; returns it."""
    import importlib
    if family not in TINY_FAMILIES:
        raise ValueError(f"tiny model family {family!r} is not one of {tuple(TINY_FAMILIES)}")
    module, name = TINY_FAMILIES[family].split(":")
    return getattr(importlib.import_module(module), name)(out_dir, texts, **kwargs)


TINY_IMAGE_SIZE = 112  # pixels a side of the tiny processor's images (min = max pixels)


def tiny_image_patches(family: str = "qwen2_5_vl", image_size: int = TINY_IMAGE_SIZE) -> int:
    """Patches of one image of the tiny model of `family` (its processor resizes every image to this)."""
    patch = QWEN_FAMILIES[family].patch_size
    side = image_size - image_size % (patch * 2)
    return (side // patch) ** 2


def build_tiny_qwen(out_dir: str, texts: Iterable[str], *, seed: int = 0, image_size: int = TINY_IMAGE_SIZE,
                    vocab_size: int = 1024, family: str = "qwen2_5_vl", **sizes) -> str:
    """Writes a tiny random model of `family` with a tokenizer trained on `texts` to `out_dir`; returns it.

    Images of `image_size` pixels a side come out of the processor at the nearest multiple of
    patch_size * 2 below (min = max pixels).
    """
    from vrl_jax.data.synthgeo.tokenizer import build_tokenizer, special_token_ids
    tiny = QWEN_FAMILIES[family]
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = build_tokenizer(texts, out_dir, vocab_size=vocab_size)
    special = special_token_ids(tokenizer)
    vocab = -(-len(tokenizer) // 64) * 64  # a multiple of 64 keeps matmuls aligned
    raw = tiny_hf_config(vocab, special, family=family, **sizes)
    config = ModelConfig.from_dict(raw)
    export_hf(init_random(lambda: QwenVL(config, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))), out_dir)
    side = image_size - image_size % (tiny.patch_size * 2)
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": side * side,
                   "max_pixels": side * side, "patch_size": tiny.patch_size, "temporal_patch_size": 2,
                   "merge_size": 2, "image_mean": tiny.image_mean, "image_std": tiny.image_std}, f, indent=2)
    return out_dir


build_tiny_qwen2_5_vl = functools.partial(build_tiny_qwen, family="qwen2_5_vl")
build_tiny_qwen3_vl = functools.partial(build_tiny_qwen, family="qwen3_vl")
