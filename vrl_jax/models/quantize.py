"""Frozen base weights stored quantized (QLoRA): the language model's projections in int8 or NF4.

Under LoRA the decoder's projection weights never change, so they can be held in fewer bits and widened
for each matmul (`dense`), while the adapters, norms, embeddings and everything that trains stay in the
parameter dtype. A quantized projection `P` ("q_w", "down_w", ...) of shape [L, in, out] is stored as

    int8:  P_codes int8 [L, in, out],       P_scale [L, 1, out]       W = codes * scale
           (one absmax scale per output channel: scale = max_in |W| / 127)
    nf4:   P_codes uint8 [L, in / 2, out],  P_scale [L, in / 64, out] W = NF4[code] * scale
           (two 4-bit codes per byte along `in`; one absmax scale per block of 64 inputs, QLoRA's layout;
           one block of all inputs where `in` is not a multiple of 64, as in the tiny test models)

with scales in float32. NF4 (Dettmers et al., QLoRA, 2023) is the 4-bit code whose 16 levels are the
quantiles of a standard normal scaled to [-1, 1], with an exact 0: the nearest level is chosen. QLoRA's
second quantization of the scales (8-bit, ~0.37 bit per weight) is not done: float32 scales cost
0.5 bit per weight.

Dequantizing is elementwise and sits right before the dot, so XLA fuses it into the matmul's operand
where the backend can; at worst one layer's weight is widened at a time (the decoder scans its layers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

CODES, SCALE = "_codes", "_scale"
BLOCK = 64  # NF4: inputs per absmax block
SCHEMES = ("int8", "nf4")

# QLoRA's NF4 levels (the bitsandbytes table), ascending.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)


def quantize_int8(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """w [L, in, out] -> (codes int8 [L, in, out], scale float32 [L, 1, out])."""
    w = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=1, keepdims=True) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(w / safe), -127, 127).astype(jnp.int8), scale


def nf4_block(d_in: int) -> int:
    """Inputs per absmax block: 64, or all of them when `d_in` is not a multiple of 64 (tiny test models)."""
    return BLOCK if d_in % BLOCK == 0 else d_in


def quantize_nf4(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """w [L, in, out] (in even) -> (codes uint8 [L, in / 2, out], scale float32 [L, in / block, out])."""
    n, d_in, d_out = w.shape
    block = nf4_block(d_in)
    blocks = w.astype(jnp.float32).reshape(n, d_in // block, block, d_out)
    scale = jnp.max(jnp.abs(blocks), axis=2)
    unit = blocks / jnp.where(scale > 0, scale, 1.0)[:, :, None]
    # The nearest level: the levels are ascending, so count the midpoints below each value.
    midpoints = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)
    codes = jnp.sum(unit[..., None] > midpoints, axis=-1).astype(jnp.uint8).reshape(n, d_in, d_out)
    return codes[:, 0::2] | (codes[:, 1::2] << 4), scale


def dequantize(codes: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """The weight [L, in, out] (or one layer's [in, out]) in `dtype`; the scheme is read off the codes' dtype
    (int8 or packed NF4 uint8)."""
    if codes.dtype == jnp.int8:
        return (codes.astype(jnp.float32) * scale).astype(dtype)
    low, high = codes & 0xF, codes >> 4
    unpacked = jnp.stack([low, high], axis=-2)  # [..., in / 2, 2, out]
    unpacked = unpacked.reshape(*codes.shape[:-2], 2 * codes.shape[-2], codes.shape[-1])
    levels = jnp.asarray(NF4)[unpacked.astype(jnp.int32)]
    block = unpacked.shape[-2] // scale.shape[-2]
    blocks = levels.reshape(*codes.shape[:-2], scale.shape[-2], block, codes.shape[-1]) * scale[..., None, :]
    return blocks.reshape(unpacked.shape).astype(dtype)


QUANTIZERS = {"int8": quantize_int8, "nf4": quantize_nf4}


def weight(w: dict, name: str, dtype):
    """Projection `name` of the per-layer dict `w` in `dtype`: stored as is, or widened from its codes."""
    if name in w:
        return w[name].astype(dtype)
    return dequantize(w[name + CODES], w[name + SCALE], dtype)


def is_quantized(path: str) -> bool:
    return path.endswith((CODES, SCALE))


def quantize_layers(layers: nnx.Module, names: tuple[str, ...], scheme: str) -> None:
    """Replaces each stacked weight `names` of a `DecoderLayers` by its codes and scales, in place."""
    for name in names:
        codes, scale = QUANTIZERS[scheme](getattr(layers, name).value)
        delattr(layers, name)
        setattr(layers, name + CODES, nnx.Param(codes))
        setattr(layers, name + SCALE, nnx.Param(scale))


def dequantize_layers(layers: nnx.Module, dtype) -> None:
    """The inverse of `quantize_layers` (in place): each quantized projection back as a `dtype` weight."""
    for name in [n[:-len(CODES)] for n in layers.names() if n.endswith(CODES)]:
        w = dequantize(getattr(layers, name + CODES).value, getattr(layers, name + SCALE).value, dtype)
        delattr(layers, name + CODES)
        delattr(layers, name + SCALE)
        setattr(layers, name, nnx.Param(w))
