"""What Qwen3-VL adds to the Qwen-VL stack, as pure functions.

- A learned absolute position table for the vision tower ([side*side, C]), bilinearly resampled
  (align_corners=True) to each image's patch grid and added after the patch embedding. The grid of
  each patch is found on the device from the packed buffer itself (the largest row and column of its
  frame), so the device inputs stay those of Qwen2/2.5-VL and nothing recompiles per image size.
- DeepStack: the hidden states after chosen vision blocks go through their own 2x2 mergers (LayerNorm
  over the 4C concatenation) and are added to the language model's hidden states at the image
  positions after its first decoder layers (`Qwen2Decoder(deepstack=...)`).

The decoder differences (q/k RMSNorm, no q/k/v bias, interleaved M-RoPE) are flags of `qwen2.py` and
`layers.mrope_cos_sin`; the checkpoint's key layout is a table in `weights.py`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from vrl_jax.models import layers, lora

VISION_EPS = 1e-6


def frame_grid_sizes(hw_pos, segment_ids):
    """The (height, width) in patches of the frame each patch belongs to.

    hw_pos: int [P, 2] (row, column of each patch in its frame); segment_ids: int [P], one id per
    frame, -1 for padding (ids are below P) -> int32 [P, 2] (padding rows get (1, 1)).
    """
    p = segment_ids.shape[0]
    ids = jnp.where(segment_ids >= 0, segment_ids, p)  # padding into a segment of its own
    largest = jax.ops.segment_max(hw_pos, ids, num_segments=p + 1)  # [P + 1, 2]
    return (jnp.take(largest, ids, axis=0) + 1).astype(jnp.int32)


def _bilinear_taps(index, size, side: int):
    """Two taps per target and their weights along one axis (align_corners=True).

    index, size: int [P] (target coordinate, target axis length) -> taps int [P, 2], weights f32 [P, 2].
    """
    src = index.astype(jnp.float32) * (side - 1) / jnp.maximum(size - 1, 1).astype(jnp.float32)
    floor = jnp.floor(src)
    offsets = jnp.arange(2)
    taps = jnp.clip(floor.astype(jnp.int32)[:, None] + offsets, 0, side - 1)
    weights = jnp.maximum(1.0 - jnp.abs(src[:, None] - floor[:, None] - offsets), 0.0)
    return taps, weights


def interpolated_positions(table, hw_pos, grid_hw):
    """The learned position table resampled to each patch's frame grid.

    table: [side*side, C]; hw_pos: int [P, 2]; grid_hw: int [P, 2] (from `frame_grid_sizes`)
    -> float32 [P, C]: the bilinear mix of the 4 nearest table entries.
    """
    side = int(round(table.shape[0] ** 0.5))
    h_taps, h_w = _bilinear_taps(hw_pos[:, 0], grid_hw[:, 0], side)
    w_taps, w_w = _bilinear_taps(hw_pos[:, 1], grid_hw[:, 1], side)
    index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weight = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
    return (jnp.take(table.astype(jnp.float32), index, axis=0) * weight[:, :, None]).sum(1)


def postshuffle_merger(x, w: dict, merge_units: int):
    """A DeepStack merger: x [P, C] -> [P / merge_units, out]; the LayerNorm runs over the concatenation
    of each merge unit's patches (width merge_units*C), then fc1 -> exact GELU -> fc2 (`lora.project`: with
    their adapters where w holds them)."""
    x = x.reshape(-1, x.shape[-1] * merge_units)
    x = layers.layer_norm(x, w["norm_w"], w["norm_b"], VISION_EPS)
    x = jax.nn.gelu(lora.project(x, w, "fc1_w") + w["fc1_b"], approximate=False)
    return lora.project(x, w, "fc2_w") + w["fc2_b"]


class DeepStack(NamedTuple):
    """DeepStack features for one batch, kept per merged unit (not per position) until each decoder layer.

    features: [D, U, H] (feature j is added after decoder layer j); is_image: bool [B, T] (image
    placeholder positions); index: int [B, T] (the unit each position reads; meaningless off images).
    """

    features: jax.Array
    is_image: jax.Array
    index: jax.Array

    def add(self, h, layer):
        """h: [B, T, H] after decoder layer `layer` (int scalar) -> h plus that layer's features at the
        image positions; unchanged for layers >= D."""
        n = self.features.shape[0]
        feats = jax.lax.dynamic_index_in_dim(self.features, jnp.minimum(layer, n - 1), keepdims=False)
        extra = jnp.take(feats, self.index, axis=0).astype(h.dtype)  # [B, T, H]
        return jnp.where(self.is_image[..., None] & (layer < n), h + extra, h)
