"""Frozen base weights stored quantized (QLoRA): the language model's projections in int8 or NF4.

Under LoRA the decoder's projection weights never change, so they can be held in fewer bits and widened
for each matmul (`dense`), while the adapters, norms, embeddings and everything that trains stay in the
parameter dtype. A quantized projection `P` ("q_w", "down_w", ...) of shape [L, in, out] is stored as

    int8:  P_codes int8 [L, in, out],       P_scale float32 [L, 1, out]        W = codes * scale
           (one absmax scale per output channel: scale = max_in |W| / 127)
    nf4:   P_codes uint8 [L, in / 2, out],  P_scale uint8 [L, in / 64, out],  W = NF4[code] * absmax
           P_scale_min, P_scale_step float32 [L, 1, out]                    absmax = min + scale * step
           (two 4-bit codes per byte along `in`; one absmax per block of 64 inputs, QLoRA's layout; one
           block of all inputs where `in` is not a multiple of 64, as in the tiny test models)

NF4 (Dettmers et al., QLoRA, 2023) is the 4-bit code whose 16 levels are the quantiles of a standard
normal scaled to [-1, 1], with an exact 0: the nearest level is chosen. The block absmaxes are
quantized again, as QLoRA's "double quantization" does: 8-bit codes between each output channel's
smallest and largest absmax, so they cost 8 / 64 bits per weight instead of float32's 32 / 64
(with the two float32 constants per channel, 4 + 1/8 + 64 / in bits per weight: 4.14 at Qwen2.5-7B's
widths; QLoRA's layout gives 4.127). QLoRA quantizes them with an 8-bit float code in
blocks of 256 after subtracting their mean; here the second-level constants run along the output
channels instead, so every array of a quantized weight splits over the mesh exactly as the weight
does (`sharding.PARAM_RULES`). The absmax error this adds is at most step / 2 = (max - min) / 510.

Dequantizing is elementwise and sits right before the dot, so XLA fuses it into the matmul's operand
where the backend can; at worst one layer's weight is widened at a time (the decoder scans its layers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

CODES, SCALE, SCALE_MIN, SCALE_STEP = "_codes", "_scale", "_scale_min", "_scale_step"
PARTS = (CODES, SCALE, SCALE_MIN, SCALE_STEP)  # the suffixes a quantized weight's arrays may carry
BLOCK = 64  # NF4: inputs per absmax block
SCHEMES = ("int8", "nf4")

# QLoRA's NF4 levels (the bitsandbytes table), ascending.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)


def quantize_int8(w: jax.Array) -> dict[str, jax.Array]:
    """w [L, in, out] -> {CODES: int8 [L, in, out], SCALE: float32 [L, 1, out]}."""
    w = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=1, keepdims=True) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    return {CODES: jnp.clip(jnp.round(w / safe), -127, 127).astype(jnp.int8), SCALE: scale}


def nf4_block(d_in: int) -> int:
    """Inputs per absmax block: 64, or all of them when `d_in` is not a multiple of 64 (tiny test models)."""
    return BLOCK if d_in % BLOCK == 0 else d_in


def quantize_absmax(absmax: jax.Array) -> dict[str, jax.Array]:
    """The second quantization: absmax float32 [L, blocks, out] -> {SCALE: uint8 [L, blocks, out],
    SCALE_MIN, SCALE_STEP: float32 [L, 1, out]}, absmax ~ min + code * step."""
    low = jnp.min(absmax, axis=1, keepdims=True)
    step = (jnp.max(absmax, axis=1, keepdims=True) - low) / 255.0
    codes = jnp.round((absmax - low) / jnp.where(step > 0, step, 1.0))
    return {SCALE: jnp.clip(codes, 0, 255).astype(jnp.uint8), SCALE_MIN: low, SCALE_STEP: step}


def quantize_nf4(w: jax.Array) -> dict[str, jax.Array]:
    """w [L, in, out] (in even) -> {CODES: uint8 [L, in / 2, out], and the block absmaxes [L, in / block, out]
    quantized again (`quantize_absmax`)}. The codes are chosen against the absmaxes as they will be widened
    (after the second quantization), so their rounding does not add to the codes' error."""
    n, d_in, d_out = w.shape
    block = nf4_block(d_in)
    blocks = w.astype(jnp.float32).reshape(n, d_in // block, block, d_out)
    second = quantize_absmax(jnp.max(jnp.abs(blocks), axis=2))
    scale = absmax_of(second)
    unit = blocks / jnp.where(scale > 0, scale, 1.0)[:, :, None]
    # The nearest level: the levels are ascending, so count the midpoints below each value.
    midpoints = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)
    codes = jnp.sum(unit[..., None] > midpoints, axis=-1).astype(jnp.uint8).reshape(n, d_in, d_out)
    return {CODES: codes[:, 0::2] | (codes[:, 1::2] << 4), **second}


def absmax_of(parts: dict) -> jax.Array:
    """The NF4 block absmaxes [..., blocks, out] float32 from their 8-bit codes."""
    return parts[SCALE_MIN] + parts[SCALE].astype(jnp.float32) * parts[SCALE_STEP]


def dequantize(parts: dict, dtype) -> jax.Array:
    """The weight [L, in, out] (or one layer's [in, out]) in `dtype` from its arrays {CODES: ..., SCALE: ...,
    ...} (stacked or one layer's); the scheme is read off the codes' dtype (int8 or packed NF4 uint8)."""
    codes = parts[CODES]
    if codes.dtype == jnp.int8:
        return (codes.astype(jnp.float32) * parts[SCALE]).astype(dtype)
    scale = absmax_of(parts)
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
    return dequantize(parts_of(w, name), dtype)


def parts_of(w: dict, name: str) -> dict:
    """{suffix: array} of quantized weight `name` in the dict `w` of a module's parameters."""
    return {suffix: w[name + suffix] for suffix in PARTS if name + suffix in w}


def is_quantized(path: str) -> bool:
    return path.endswith(PARTS)


def quantize_layers(layers: nnx.Module, names: tuple[str, ...], scheme: str) -> None:
    """Replaces each stacked weight `names` of a `DecoderLayers` by its codes and scales, in place."""
    for name in names:
        parts = QUANTIZERS[scheme](getattr(layers, name).value)
        delattr(layers, name)
        for suffix, array in parts.items():
            setattr(layers, name + suffix, nnx.Param(array))


def dequantize_layers(layers: nnx.Module, dtype) -> None:
    """The inverse of `quantize_layers` (in place): each quantized projection back as a `dtype` weight."""
    params = {n: getattr(layers, n).value for n in layers.names()}
    for name in [n[:-len(CODES)] for n in params if n.endswith(CODES)]:
        parts = parts_of(params, name)
        for suffix in parts:
            delattr(layers, name + suffix)
        setattr(layers, name, nnx.Param(dequantize(parts, dtype)))
