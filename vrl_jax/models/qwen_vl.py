"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL: the vision tower, the decoder, and the merge of image features into text.

The module holds parameters; the forward is a pure function of them once the module is split with
`nnx.split` (the train step and the sampler merge it back inside `jax.jit`). Image features replace the embeddings of image
placeholder tokens in reading order (batch row, then position), which is the order the processor
packs images in, so the merge is a static gather.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vrl_jax.models import lora
from vrl_jax.models.config import ModelConfig
from vrl_jax.models.qwen2 import KVCache, Qwen2Decoder
from vrl_jax.models.qwen3_vl import DeepStack
from vrl_jax.models.vision import VisionTower


class VisionInputs(NamedTuple):
    """The device-side part of `image_processing.VisionBatch` (all arrays, no host metadata).

    feature_index: int [U], optional: for the u-th image placeholder of the batch (reading order), the
    merged unit of the packed buffer that fills it. Rows that share an image (a GRPO group's samples)
    then share one encoding of it; None = the buffer's units in placeholder order.
    feature_weight: float [U, K], with feature_index int [U, K]: each placeholder is a weighted sum of K
    units (LLaVA-OneVision's AnyRes layout, `anyres.feature_map`); None for Qwen-VL.

    Packed per row shard, every field has a leading axis S ([S, P, patch_dim], ...): the batch's rows
    fall in S contiguous blocks (the rows each data-parallel device holds) and block s reads buffer s
    only (`QwenVL.embed_rows`).
    """

    pixel_values: jax.Array  # [P, patch_dim]
    hw_pos: jax.Array  # int [P, 2]
    segment_ids: jax.Array  # int [P]
    window_ids: jax.Array  # int [P]
    feature_index: jax.Array | None = None  # int [U]
    feature_weight: jax.Array | None = None  # float [U, K]

    @classmethod
    def from_batch(cls, batch) -> "VisionInputs":
        """From a packed batch (`VisionBatch`, or a family's batch that also carries the feature map)."""
        return cls(batch.pixel_values, batch.hw_pos, batch.segment_ids, batch.window_ids,
                   getattr(batch, "feature_index", None), getattr(batch, "feature_weight", None))


def placeholder_units(input_ids, image_token_id: int, num_units: int, feature_index=None):
    """Which positions are image placeholders and the merged unit each one reads.

    input_ids: int [B, T]; num_units: U, the units of the feature buffer; feature_index: see
    `merge_image_features` -> is_image bool [B*T], index int [B*T] (clipped into range everywhere).
    """
    is_image = (input_ids == image_token_id).reshape(-1)
    order = jnp.cumsum(is_image) - 1
    if feature_index is None:
        index = jnp.clip(order, 0, num_units - 1)
    else:
        index = jnp.take(feature_index, jnp.clip(order, 0, feature_index.shape[0] - 1))
    return is_image, index


def merge_image_features(embeds, input_ids, features, image_token_id: int, feature_index=None):
    """Puts image features at image placeholder positions.

    embeds: [B, T, H]; input_ids: int [B, T]; features: [U, H] merged image units in reading order
    (U >= number of placeholders; extra units are padding), or in any order with `feature_index`
    (int [U'], the unit for each placeholder in reading order) -> [B, T, H].
    """
    is_image, index = placeholder_units(input_ids, image_token_id, features.shape[0], feature_index)
    gathered = jnp.take(features, index, axis=0).astype(embeds.dtype)
    flat = jnp.where(is_image[:, None], gathered, embeds.reshape(-1, embeds.shape[-1]))
    return flat.reshape(embeds.shape)


VISION_KEY = 1  # `lora.sub_key` of the images' adapter dropout (the decoder's is the forward's key itself)


class QwenVL(nnx.Module):
    """A Qwen2-VL, Qwen2.5-VL or dense Qwen3-VL model, parameters in `param_dtype`, compute in `dtype`."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.dtype = dtype
        self.visual = VisionTower(config.vision, param_dtype=param_dtype, rngs=rngs)
        self.language = Qwen2Decoder(config.text, tie_word_embeddings=config.tie_word_embeddings,
                                     param_dtype=param_dtype, rngs=rngs)

    def embed(self, input_ids, vision: VisionInputs | None = None, remat: bool = False):
        """input_ids: int [B, T] -> [B, T, H] with image features merged in."""
        return self.embed_with_deepstack(input_ids, vision, remat)[0]

    def embed_with_deepstack(self, input_ids, vision: VisionInputs | None = None, remat: bool = False,
                             lora_scale=1.0, lora_dropout=None):
        """input_ids: int [B, T] -> ([B, T, H] with image features merged in, the `qwen3_vl.DeepStack`
        the decoder adds at image positions, or None when the model has none or there is no vision).
        lora_scale, lora_dropout: for the vision tower's and connector's adapters (`hidden_states`)."""
        x = self.language.embed_tokens(input_ids, self.dtype)
        if vision is None:
            return x, None
        feats, deepstack = self.visual.encode(vision.pixel_values, vision.hw_pos, vision.segment_ids,
                                              vision.window_ids, dtype=self.dtype, remat=remat,
                                              lora_scale=lora_scale, lora_dropout=lora_dropout)
        x = merge_image_features(x, input_ids, feats, self.config.image_token_id, vision.feature_index)
        if deepstack is not None:  # kept per unit ([D, U, H]), gathered to positions layer by layer
            is_image, index = placeholder_units(input_ids, self.config.image_token_id, feats.shape[0],
                                                vision.feature_index)
            deepstack = DeepStack(deepstack, is_image.reshape(input_ids.shape), index.reshape(input_ids.shape))
        return x, deepstack

    def embed_rows(self, input_ids, vision: VisionInputs | None = None, remat: bool = False, lora_scale=1.0,
                   lora_dropout=None):
        """`embed_with_deepstack`, for vision packed per row shard too: with buffers [S, P, ...] the rows
        [B, T] are S contiguous blocks, each embedded with its own buffer (a vmap over S that the batch
        sharding splits over the devices, so no device encodes, or attends over, another's images; each
        block's adapters drop their inputs with its own key)."""
        if vision is None or vision.pixel_values.ndim == 2:
            return self.embed_with_deepstack(input_ids, vision, remat, lora_scale, lora_dropout)
        s = vision.pixel_values.shape[0]
        x, ds = jax.vmap(lambda ids, v, i: self.embed_with_deepstack(ids, v, remat, lora_scale,
                                                                     lora.sub_key(lora_dropout, i)))(
            input_ids.reshape(s, -1, input_ids.shape[-1]), vision, jnp.arange(s))
        x = x.reshape(*input_ids.shape, x.shape[-1])
        if ds is not None:  # one unit table [D, S * U, H]; each block's indices offset into its part
            d, u = ds.features.shape[1], ds.features.shape[2]
            index = ds.index + (jnp.arange(s) * u)[:, None, None]
            ds = DeepStack(jnp.moveaxis(ds.features, 0, 1).reshape(d, s * u, -1),
                           ds.is_image.reshape(input_ids.shape), index.reshape(input_ids.shape))
        return x, ds

    def hidden_states(self, input_ids, positions, attention_mask, vision: VisionInputs | None = None,
                      cache: KVCache | None = None, write_index=0, kv_valid=None, remat: bool = False,
                      lora_scale=1.0, lora_dropout=None, prefix: KVCache | None = None, prefix_valid=None):
        """Final-norm hidden states [B, T, H] and the updated cache.

        input_ids: int [B, T]; positions: int [3, B, T]; attention_mask: [B, T] (1 = real token).
        With a cache, `kv_valid` [B, S] says which cache slots are real once this call's tokens are
        written at `write_index`; without one it is `attention_mask`. lora_scale: 1.0 the adapted model,
        0.0 the base model; lora_dropout: a key for the adapters' input dropout, or None (`Qwen2Decoder.__call__`;
        the vision tower and connector draw from `lora.sub_key(lora_dropout, VISION_KEY)`). prefix,
        prefix_valid: keys and values shared by groups of rows, attended to before the cache (the sampler's
        prompt cache, held once per GRPO group; `Qwen2Decoder.__call__`), or None.
        """
        x, deepstack = self.embed_rows(input_ids, vision, remat, lora_scale, lora.sub_key(lora_dropout, VISION_KEY))
        if kv_valid is None:
            kv_valid = attention_mask.astype(bool)
        return self.language(x, positions, kv_valid, cache=cache, write_index=write_index, remat=remat,
                             deepstack=deepstack, lora_scale=lora_scale, lora_dropout=lora_dropout, prefix=prefix,
                             prefix_valid=prefix_valid)

    def shared_prompt_hidden_states(self, input_ids, positions, attention_mask, prompt_mask,
                                    vision: VisionInputs | None = None, remat: bool = False, lora_scale=1.0,
                                    lora_dropout=None):
        """`hidden_states` for rows that come in groups sharing their first L columns (a GRPO group's
        prompt), the prompt computed once per group.

        input_ids, attention_mask: int [B, T]; positions: int [3, B, T]; prompt_mask: [G, L], the
        groups' prompt masks (B = G * n, rows of a group consecutive, L < T); vision: the G prompts'
        images, placeholders in the order of the groups' first rows. Returns the final-norm hidden
        states [B, T - L + 1, H] of positions L - 1 ... T - 1 (the ones that predict responses).
        """
        g, length = prompt_mask.shape
        n = input_ids.shape[0] // g
        first = slice(None, None, n)
        xp, deepstack = self.embed_rows(input_ids[first, :length], vision, remat, lora_scale,
                                        lora.sub_key(lora_dropout, VISION_KEY))
        xr = self.language.embed_tokens(input_ids[:, length:], self.dtype)
        hp, hr = self.language.shared_prompt(xp, positions[:, first, :length], prompt_mask.astype(bool), xr,
                                             positions[:, :, length:], attention_mask[:, length:].astype(bool),
                                             remat=remat, deepstack=deepstack, lora_scale=lora_scale,
                                             lora_dropout=lora_dropout)
        return jnp.concatenate([jnp.repeat(hp[:, -1:], n, axis=0), hr], axis=1)

    def logits(self, hidden):
        """hidden: [B, T, H] -> logits [B, T, V] float32 (computed in the model dtype, as transformers)."""
        return (hidden @ self.language.unembedding().astype(hidden.dtype)).astype(jnp.float32)

    def __call__(self, input_ids, positions, attention_mask, vision: VisionInputs | None = None, lora_scale=1.0):
        hidden, _ = self.hidden_states(input_ids, positions, attention_mask, vision, lora_scale=lora_scale)
        return self.logits(hidden)
