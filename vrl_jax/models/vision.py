"""The Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision tower and patch merger.

One module serves all three: Qwen2-VL uses LayerNorm and an fc1/fc2 quick-GELU MLP with attention
inside each frame; Qwen2.5-VL uses RMSNorm, a biased SwiGLU MLP and window attention except in
its full-attention blocks; Qwen3-VL is Qwen2-VL's block with tanh-GELU, plus a biased patch
embedding, a learned position table and DeepStack mergers (`qwen3_vl.py`). Patches of all images
of a batch are packed into one static buffer [P, patch_dim]; frame and window attention are boolean
masks from per-patch segment and window ids, in the processor's own patch order. That equals
transformers' window permutation + cu_seqlens without any data-dependent shape, so a new image size
never recompiles.

A packed buffer of many images (a training micro-batch, an evaluation batch) would make that mask
[P, P] while each patch only attends inside its own image: with `VisionTower.max_segment` set (the
most patches one image frame can have, from the processor's max_pixels), attention runs over
chunks of the buffer, each against its neighbours within one image's reach (`banded_attention`):
P x ~3 x max_segment scores instead of P x P, the same result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vrl_jax.models import layers, lora, qwen3_vl
from vrl_jax.models.config import VisionConfig
from vrl_jax.models.qwen2 import _ones, _param, _zeros

VISION_EPS = 1e-6  # hard-coded in transformers for every vision norm


class VisionBlocks(nnx.Module):
    """All vision blocks, parameters stacked on a leading [depth] axis."""

    def __init__(self, cfg: VisionConfig, *, param_dtype, rngs: nnx.Rngs):
        n, c, m = cfg.depth, cfg.width, cfg.mlp_dim
        p = lambda *shape: _param(rngs, (n, *shape), param_dtype)  # noqa: E731
        z = lambda *shape: _zeros((n, *shape), param_dtype)  # noqa: E731
        self.norm1_w, self.norm2_w = _ones((n, c), param_dtype), _ones((n, c), param_dtype)
        if cfg.norm_type == "layernorm":
            self.norm1_b, self.norm2_b = z(c), z(c)
        self.qkv_w, self.qkv_b = p(c, 3 * c), z(3 * c)
        self.proj_w, self.proj_b = p(c, c), z(c)
        if cfg.mlp_type == "fc":
            self.fc1_w, self.fc1_b, self.fc2_w, self.fc2_b = p(c, m), z(m), p(m, c), z(c)
        else:
            self.gate_w, self.gate_b, self.up_w, self.up_b = p(c, m), z(m), p(c, m), z(m)
            self.down_w, self.down_b = p(m, c), z(c)

    def names(self) -> tuple[str, ...]:
        return tuple(k for k, v in vars(self).items() if isinstance(v, nnx.Param))


def _norm(x, w, prefix, cfg: VisionConfig):
    if cfg.norm_type == "layernorm":
        return layers.layer_norm(x, w[prefix + "_w"], w[prefix + "_b"], VISION_EPS)
    return layers.rms_norm(x, w[prefix + "_w"].astype(x.dtype), VISION_EPS)


def band_shape(num_patches: int, max_segment: int | None) -> tuple[int, int] | None:
    """(chunk, band) of `banded_attention` for a buffer of `num_patches` whose segments have at most
    `max_segment` patches, or None when dense attention is as cheap (small buffers, huge images)."""
    if not max_segment:
        return None
    # Chunks of about a quarter of the longest segment: each query chunk reads (2 band + 1) chunks,
    # ~2.25 segment lengths, against 3 for chunks of a whole segment (powers of two, 16 to 256).
    chunk = min(256, max(16, 1 << (max(max_segment // 4, 1).bit_length() - 1)))
    band = -(-(max_segment - 1) // chunk)  # chunks either side that a segment can reach into
    return None if (2 * band + 1) * chunk >= num_patches else (chunk, band)


def banded_attention(q, k, v, ids, scale: float, chunk: int, band: int):
    """Attention within contiguous segments of a packed buffer, each at most `band * chunk + 1` long.

    q, k, v: [P, N, D]; ids: int [P], equal ids attend to each other (-1 = padding, attends to nothing).
    The buffer is cut into chunks of `chunk` patches; chunk i attends to chunks i - band .. i + band,
    which hold every patch of every segment it touches. Softmax in float32. Returns [P, N, D] (rows of
    padding are a harmless average, as in the dense masked form).
    """
    p, n, d = q.shape
    total = -(-p // chunk) * chunk
    pad = lambda x, fill, front=0, back=0: jnp.pad(  # noqa: E731
        x, ((front, back),) + ((0, 0),) * (x.ndim - 1), constant_values=fill)
    qc = pad(q, 0, back=total - p).reshape(total // chunk, chunk, n, d)
    ids_q = pad(ids, -1, back=total - p).reshape(total // chunk, chunk)
    halo = band * chunk
    kp, vp, ids_k = (pad(x, f, halo, halo + total - p) for x, f in ((k, 0), (v, 0), (ids, -1)))
    window = jnp.arange(total // chunk)[:, None] * chunk + jnp.arange((2 * band + 1) * chunk)[None, :]
    kw, vw, idw = kp[window], vp[window], ids_k[window]  # [chunks, width, N, D], [chunks, width]
    scores = jnp.einsum("icnd,iwnd->incw", qc, kw).astype(jnp.float32) * scale
    allowed = (ids_q[:, :, None] == idw[:, None, :]) & (idw[:, None, :] >= 0)
    scores = jnp.where(allowed[:, None], scores, layers.MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("incw,iwnd->icnd", probs, vw).reshape(total, n, d)[:p]


def vision_block(w: dict, x, cos, sin, mask, *, cfg: VisionConfig, ids=None, band=None):
    """x: [P, C]; cos/sin: [P, hd] float32; mask: bool [P, P] (dense), or with `band` = (chunk, band)
    the per-patch attention ids [P] of `banded_attention` -> [P, C]."""
    dt = x.dtype
    p, c = x.shape
    w = lora.cast(w, dt)
    y = _norm(x, w, "norm1", cfg)
    qkv = (lora.project(y, w, "qkv_w") + w["qkv_b"]).reshape(p, 3, cfg.num_heads, cfg.head_dim)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    # Vision rotary runs in float32 whatever the activation dtype, as transformers does.
    q = layers.apply_rotary(q.astype(jnp.float32)[None], cos[None], sin[None]).astype(dt)
    k = layers.apply_rotary(k.astype(jnp.float32)[None], cos[None], sin[None]).astype(dt)
    if band is None:
        attn = layers.attention(q, k.transpose(0, 2, 1, 3), v.transpose(1, 2, 0)[None], mask[None],
                                cfg.head_dim**-0.5)[0].reshape(p, c)
    else:
        attn = banded_attention(q[0], k[0], v, ids, cfg.head_dim**-0.5, *band).reshape(p, c)
    x = x + lora.project(attn, w, "proj_w") + w["proj_b"]
    y = _norm(x, w, "norm2", cfg)
    act = layers.activation(cfg.hidden_act)
    if cfg.mlp_type == "fc":
        mlp = lora.project(act(lora.project(y, w, "fc1_w") + w["fc1_b"]), w, "fc2_w") + w["fc2_b"]
    else:
        mlp = act(lora.project(y, w, "gate_w") + w["gate_b"]) * (lora.project(y, w, "up_w") + w["up_b"])
        mlp = lora.project(mlp, w, "down_w") + w["down_b"]
    return x + mlp


class VisionTower(nnx.Module):
    """Patch embedding, vision blocks, and the 2x2 patch merger projecting to the LM width."""

    def __init__(self, cfg: VisionConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        c4 = cfg.width * cfg.merge_size**2
        self.patch_embed = _param(rngs, (cfg.patch_dim, cfg.width), param_dtype)
        if cfg.patch_bias:
            self.patch_embed_b = _zeros((cfg.width,), param_dtype)
        if cfg.num_position_embeddings:
            self.pos_embed = _param(rngs, (cfg.num_position_embeddings, cfg.width), param_dtype)
        n_ds = len(cfg.deepstack_visual_indexes)
        if n_ds:  # DeepStack mergers, stacked on a leading axis in deepstack_visual_indexes order
            self.deepstack_norm_w = _ones((n_ds, c4), param_dtype)
            self.deepstack_norm_b = _zeros((n_ds, c4), param_dtype)
            self.deepstack_fc1_w = _param(rngs, (n_ds, c4, c4), param_dtype)
            self.deepstack_fc1_b = _zeros((n_ds, c4), param_dtype)
            self.deepstack_fc2_w = _param(rngs, (n_ds, c4, cfg.out_dim), param_dtype)
            self.deepstack_fc2_b = _zeros((n_ds, cfg.out_dim), param_dtype)
        self.blocks = VisionBlocks(cfg, param_dtype=param_dtype, rngs=rngs)
        self.merger_norm_w = _ones((cfg.width,), param_dtype)
        if cfg.norm_type == "layernorm":
            self.merger_norm_b = _zeros((cfg.width,), param_dtype)
        self.merger_fc1_w, self.merger_fc1_b = _param(rngs, (c4, c4), param_dtype), _zeros((c4,), param_dtype)
        self.merger_fc2_w = _param(rngs, (c4, cfg.out_dim), param_dtype)
        self.merger_fc2_b = _zeros((cfg.out_dim,), param_dtype)
        # The most patches one image frame has (set from the processor's max_pixels): None = dense masks.
        self.max_segment: int | None = None
        self.lora: lora.LoraConfig | None = None  # set by `lora.add_adapters` (blocks, merger, DeepStack)

    def __call__(self, pixel_values, hw_pos, segment_ids, window_ids, dtype=jnp.float32, remat: bool | str = False):
        """Encodes a packed patch buffer.

        pixel_values: [P, patch_dim]; hw_pos: int [P, 2]; segment_ids, window_ids: int [P] (-1 = padding).
        P must be a multiple of merge_size**2. Returns merged features [P / merge_size**2, out_dim],
        in patch order (padding units at their own positions, never read by the language model).
        """
        return self.encode(pixel_values, hw_pos, segment_ids, window_ids, dtype, remat)[0]

    def encode(self, pixel_values, hw_pos, segment_ids, window_ids, dtype=jnp.float32, remat: bool | str = False,
               lora_scale=1.0, lora_dropout=None):
        """As `__call__`, and the DeepStack features: (merged [U, out_dim], deepstack [D, U, out_dim] or None).
        lora_scale, lora_dropout: the adapters' scale (0.0 = the base tower) and dropout key or None
        (`Qwen2Decoder.__call__`); each of blocks, merger and DeepStack mergers draws from its own `lora.sub_key`."""
        cfg = self.config
        x = pixel_values.astype(dtype) @ self.patch_embed.value.astype(dtype)
        if cfg.patch_bias:
            x = x + self.patch_embed_b.value.astype(dtype)
        if cfg.num_position_embeddings:
            grid = qwen3_vl.frame_grid_sizes(hw_pos, segment_ids)
            x = x + qwen3_vl.interpolated_positions(self.pos_embed.value, hw_pos, grid).astype(dtype)
        cos, sin = layers.vision_cos_sin(hw_pos, cfg.head_dim, cfg.rope_theta)
        full = jnp.array([cfg.is_full_attention(i) for i in range(cfg.depth)])
        stacked = lora.weights(self.blocks, self.lora, lora_scale, lora.sub_key(lora_dropout, 0))
        band = band_shape(pixel_values.shape[0], self.max_segment)
        if band is None:
            frame_mask = (segment_ids[:, None] == segment_ids[None, :]) & (segment_ids[None, :] >= 0)
            window_mask = (window_ids[:, None] == window_ids[None, :]) & (window_ids[None, :] >= 0)

        def body(h, xs):
            w, is_full = xs
            if band is not None:  # windows lie inside their frame, so a frame's band holds them
                ids = jnp.where(is_full, segment_ids, window_ids)
                return vision_block(w, h, cos, sin, None, cfg=cfg, ids=ids, band=band), None
            mask = jnp.where(is_full, frame_mask, window_mask)
            return vision_block(w, h, cos, sin, mask, cfg=cfg), None

        body = layers.checkpointed(body, remat)
        # One scan per run of blocks between DeepStack taps (no taps: one scan over all blocks), so the
        # tapped hidden states are plain values rather than a [depth, P, C] stack of every block's output.
        taps = []
        start = 0
        for stop in [*sorted(cfg.deepstack_visual_indexes), cfg.depth - 1]:
            if stop >= start:
                x, _ = jax.lax.scan(body, x, jax.tree.map(lambda a: a[start:stop + 1], (stacked, full)))
                start = stop + 1
            taps.append(x)
        deepstack = None
        if cfg.deepstack_visual_indexes:
            # Feature j (added after decoder layer j) is the j-th tap in block order, through the merger
            # listed at that block's place in deepstack_visual_indexes, as transformers pairs them.
            mergers = lora.weights(self, self.lora, lora_scale, lora.sub_key(lora_dropout, 2), prefix="deepstack_")
            mergers = {k.removeprefix("deepstack_"): v for k, v in mergers.items()}
            order = sorted(cfg.deepstack_visual_indexes)
            deepstack = jnp.stack([
                qwen3_vl.postshuffle_merger(
                    tap, lora.cast({n: v[cfg.deepstack_visual_indexes.index(layer)] for n, v in mergers.items()},
                                   dtype), cfg.merge_size**2)
                for layer, tap in zip(order, taps)])
        m = lora.cast(lora.weights(self, self.lora, lora_scale, lora.sub_key(lora_dropout, 1), prefix="merger_",
                                   stacked=False), dtype)
        x = _norm(x, m, "merger_norm", cfg).reshape(-1, cfg.width * cfg.merge_size**2)
        x = jax.nn.gelu(lora.project(x, m, "merger_fc1_w") + m["merger_fc1_b"], approximate=False)
        return lora.project(x, m, "merger_fc2_w") + m["merger_fc2_b"], deepstack
