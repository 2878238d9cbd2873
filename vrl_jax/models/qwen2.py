"""The Qwen2 decoder shared by Qwen2-VL and Qwen2.5-VL (and later LLaVA-OneVision's language model),
with the Qwen3 variant (q/k norms, no q/k/v bias, DeepStack injections) for Qwen3-VL.

Parameters of all layers are stacked on a leading layer axis and the layers run under `lax.scan`,
so compile time does not grow with depth and a KV cache is one array per K and V. With
`Qwen2Decoder.unroll_layers` the scan is unrolled into straight-line code over the same stacked
weights: the backward pass then keeps each layer's residuals as separate buffers instead of writing
them into [layers, ...] stacks (zero-filled, updated in place and sliced again), which made the train
step 4-10% faster on a 2-core CPU at 4 layers, at a compile time that grows with depth. Weights are
kept in `x @ W` layout ([in, out]); the converter transposes PyTorch's [out, in].
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vrl_jax.models import layers, lora
from vrl_jax.models.config import TextConfig


class KVCache(NamedTuple):
    """A preallocated cache: k [layers, B, kv_heads, S, head_dim], v [layers, B, kv_heads, head_dim, S];
    slot s holds token s of the row. These are the layouts `layers.attention` contracts as plain GEMMs
    (keys times queries, values times probabilities) without transposing the cache."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, config: TextConfig, batch: int, length: int, dtype=jnp.float32) -> "KVCache":
        shape = (config.num_layers, batch, config.num_kv_heads, length, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape[:3] + shape[4:] + shape[3:4], dtype))


def _param(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32).astype(dtype))


def _ones(shape, dtype):
    return nnx.Param(jnp.ones(shape, dtype))


def _zeros(shape, dtype):
    return nnx.Param(jnp.zeros(shape, dtype))


class DecoderLayers(nnx.Module):
    """The stack of pre-norm decoder blocks; every parameter has a leading [layers] axis.

    Qwen2: q/k/v biases. Qwen3 (`cfg.qk_norm`): no biases, RMSNorm weights q_norm/k_norm [layers, head_dim].
    """

    def __init__(self, cfg: TextConfig, *, param_dtype, rngs: nnx.Rngs):
        n, h, i = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        p = lambda *shape: _param(rngs, (n, *shape), param_dtype)  # noqa: E731
        self.input_norm = _ones((n, h), param_dtype)
        self.q_w, self.k_w, self.v_w = p(h, q), p(h, kv), p(h, kv)
        if cfg.attention_bias:
            self.q_b, self.k_b, self.v_b = _zeros((n, q), param_dtype), _zeros((n, kv), param_dtype), \
                _zeros((n, kv), param_dtype)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = _ones((n, cfg.head_dim), param_dtype), _ones((n, cfg.head_dim), param_dtype)
        self.o_w = p(q, h)
        self.post_norm = _ones((n, h), param_dtype)
        self.gate_w, self.up_w, self.down_w = p(h, i), p(h, i), p(i, h)

    def names(self) -> tuple[str, ...]:
        return tuple(k for k, v in vars(self).items() if isinstance(v, nnx.Param))


def _project(y, w: dict, name: str, heads: int, cfg: TextConfig):
    """y: [B, T, H] -> [B, T, heads, head_dim]: the q/k/v projection, its bias and (q, k) its norm if present."""
    b, t, _ = y.shape
    dt = y.dtype
    x = lora.project(y, w, name + "_w")
    if name + "_b" in w:
        x = x + w[name + "_b"].astype(dt)
    x = x.reshape(b, t, heads, cfg.head_dim)
    if name + "_norm" in w:  # Qwen3: RMSNorm over each head, before the rotary embedding
        x = layers.rms_norm(x, w[name + "_norm"].astype(dt), cfg.rms_norm_eps)
    return x


def _queries_keys_values(w: dict, x, cos, sin, *, cfg: TextConfig):
    """The attention inputs of one block: x [B, T, H] -> q [B, T, N, hd], k [B, K, T, hd], v [B, K, hd, T]
    (rotated; keys and values in the KV cache's layouts)."""
    y = layers.rms_norm(x, w["input_norm"].astype(x.dtype), cfg.rms_norm_eps)
    q = _project(y, w, "q", cfg.num_heads, cfg)
    k = _project(y, w, "k", cfg.num_kv_heads, cfg)
    v = _project(y, w, "v", cfg.num_kv_heads, cfg)
    q, k = layers.apply_rotary(q, cos, sin), layers.apply_rotary(k, cos, sin)
    return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 3, 1)


def _attend_and_mlp(w: dict, x, q, k, v, mask, *, cfg: TextConfig, prefix=None):
    """The rest of the block: attention of q over k/v (mask bool [B, T, S]), after the groups' shared
    prefix keys when `prefix` = (kp [G, K, L, hd], vp [G, K, hd, L], valid bool [G, L]) is given
    (`layers.attention_with_prefix`), then the output projection and the MLP."""
    b, t, _ = x.shape
    dt = x.dtype
    scale = cfg.head_dim**-0.5
    attn = (layers.attention(q, k, v, mask, scale) if prefix is None else
            layers.attention_with_prefix(q, prefix[0], prefix[1], prefix[2], k, v, mask, scale)).reshape(b, t, -1)
    x = x + lora.project(attn, w, "o_w")
    y = layers.rms_norm(x, w["post_norm"].astype(dt), cfg.rms_norm_eps)
    mlp = jax.nn.silu(lora.project(y, w, "gate_w")) * lora.project(y, w, "up_w")
    return x + lora.project(mlp, w, "down_w")


def decoder_block(w: dict, x, cos, sin, mask, cache: KVCache | None, layer, write_index, *, cfg: TextConfig,
                  prefix: KVCache | None = None, prefix_valid=None):
    """One decoder block.

    w: this layer's parameters (unstacked); x: [B, T, H]; cos/sin: [B, T, hd]; mask: bool [B, T, S'];
    cache: the whole stack's KVCache (k [layers, B, K, S, hd], v [layers, B, K, hd, S]) or None (then
    S' == T and the block attends to its own keys); with a cache the block reads its first S' <= S slots
    only (a decode segment's, `sampler.generate`); layer: int scalar, this block's index; write_index:
    int scalar slot where this call's T tokens go. Only those T slots of this layer are written, so a decode step moves one token's keys,
    not the cache. prefix: a read-only stack of the row groups' shared keys and values (k [layers, G, K,
    L, hd], v [layers, G, K, hd, L], the B = G * n rows of a group consecutive), which every query attends
    to before the cache, where prefix_valid bool [G, L] says; or None. Returns x [B, T, H] and the updated
    cache.
    """
    dt = x.dtype
    q, k, v = _queries_keys_values(w, x, cos, sin, cfg=cfg)
    if cache is not None:
        cache = KVCache(jax.lax.dynamic_update_slice(cache.k, k[None].astype(cache.k.dtype),
                                                     (layer, 0, 0, write_index, 0)),
                        jax.lax.dynamic_update_slice(cache.v, v[None].astype(cache.v.dtype),
                                                     (layer, 0, 0, 0, write_index)))
        _, b, kv, _, hd = cache.k.shape
        read = mask.shape[-1]  # static: this layer's slots [0, read) are copied out and attended over
        k = jax.lax.dynamic_slice(cache.k, (layer, 0, 0, 0, 0), (1, b, kv, read, hd))[0].astype(dt)
        v = jax.lax.dynamic_slice(cache.v, (layer, 0, 0, 0, 0), (1, b, kv, hd, read))[0].astype(dt)
    shared = None if prefix is None else (
        jax.lax.dynamic_index_in_dim(prefix.k, layer, keepdims=False).astype(dt),
        jax.lax.dynamic_index_in_dim(prefix.v, layer, keepdims=False).astype(dt), prefix_valid)
    return _attend_and_mlp(w, x, q, k, v, mask, cfg=cfg, prefix=shared), cache


def shared_prompt_block(w: dict, xp, xr, rope_p, rope_r, mask_p, mask_r, *, cfg: TextConfig):
    """One decoder block over G prompts and their n responses each, the prompt computed once per group.

    xp: [G, L, H] the prompts; xr: [G*n, N, H] the responses (group-major); rope_p/rope_r: (cos, sin)
    of [G, L, hd] / [G*n, N, hd]; mask_p: bool [G, L, L]; mask_r: bool [G*n, N, L + N] over the
    group's prompt keys, then the row's own. Equals `decoder_block` on the G*n rows [prompt, response]
    (the same keys in the same slots); the prompt's keys and values are repeated for the n rows, so
    their gradient sums over the group. Returns (xp [G, L, H], xr [G*n, N, H]).
    """
    qp, kp, vp = _queries_keys_values(w, xp, *rope_p, cfg=cfg)
    qr, kr, vr = _queries_keys_values(w, xr, *rope_r, cfg=cfg)
    n = xr.shape[0] // xp.shape[0]
    k = jnp.concatenate([jnp.repeat(kp, n, axis=0), kr], axis=2)
    v = jnp.concatenate([jnp.repeat(vp, n, axis=0), vr], axis=3)
    return _attend_and_mlp(w, xp, qp, kp, vp, mask_p, cfg=cfg), _attend_and_mlp(w, xr, qr, k, v, mask_r, cfg=cfg)


def _scan_layers(body, carry, stacked: dict, remat: bool | str, unroll: bool = False):
    """`lax.scan` of `body(carry, (layer weights, layer index))` over the stacked layers (each layer
    rematerialised in the backward pass under the policy `remat` names, `layers.REMAT_POLICIES`),
    fully unrolled when `unroll`; returns the final carry."""
    body = layers.checkpointed(body, remat)
    layers_count = next(iter(stacked.values())).shape[0]
    carry, _ = jax.lax.scan(body, carry, (stacked, jnp.arange(layers_count)), unroll=bool(unroll))
    return carry


class Qwen2Decoder(nnx.Module):
    """Token embedding, the decoder stack, the final norm and the (possibly tied) unembedding."""

    def __init__(self, cfg: TextConfig, *, tie_word_embeddings: bool, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.config = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), param_dtype)
        self.layers = DecoderLayers(cfg, param_dtype=param_dtype, rngs=rngs)
        self.norm = _ones((cfg.hidden_size,), param_dtype)
        self.lm_head = None if tie_word_embeddings else _param(rngs, (cfg.hidden_size, cfg.vocab_size), param_dtype)
        self.lora: lora.LoraConfig | None = None  # set by `lora.add_adapters`
        self.unroll_layers = False  # straight-line layers (`model.unroll_layers`; the sampler sets its own)

    def layer_weights(self, lora_scale=1.0, lora_dropout=None) -> dict:
        """The stacked layer weights {name: [layers, ...]} the scan slices, adapters' B scaled by
        alpha / r * lora_scale (`lora.scale_adapters`; lora_scale 0.0 = the base model), and with a key
        `lora_dropout`, what drops the adapters' inputs at the config's rate (`lora.with_dropout`)."""
        return lora.weights(self.layers, self.lora, lora_scale, lora_dropout)

    def embed_tokens(self, input_ids, dtype):
        """input_ids: int [B, T] -> [B, T, H]."""
        return jnp.take(self.embed.value, input_ids, axis=0).astype(dtype)

    def unembedding(self):
        """[H, V]: the output projection (the embedding's transpose when tied)."""
        return self.embed.value.T if self.lm_head is None else self.lm_head.value

    def __call__(self, x, positions, kv_valid, cache: KVCache | None = None, write_index=0,
                 remat: bool | str = False, deepstack=None, lora_scale=1.0, lora_dropout=None,
                 prefix: KVCache | None = None, prefix_valid=None):
        """Runs the decoder stack.

        x: [B, T, H] input embeddings; positions: int [3, B, T] rotary positions (M-RoPE axes);
        kv_valid: bool [B, S] which key slots hold real tokens (S = T without a cache, the cache
        length with one); cache: KVCache or None; write_index: int scalar, the slot of x's first token;
        deepstack: a `qwen3_vl.DeepStack` or None: Qwen3-VL's image features added to the hidden states
        at image positions after each of the first D layers; lora_scale: multiplies the adapters'
        update (1.0 = the adapted model, 0.0 = the base model; ignored without adapters); lora_dropout: a
        key to drop the adapters' inputs with (training forwards), or None; prefix, prefix_valid: the row
        groups' shared keys and values, attended to before `kv_valid`'s slots (`decoder_block`), or None.
        Returns (hidden [B, T, H] after the final norm, updated cache or None).
        """
        cfg = self.config
        t = x.shape[1]
        cos, sin = layers.mrope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, x.dtype,
                                        cfg.mrope_interleaved)
        mask = layers.causal_mask(kv_valid, write_index + jnp.arange(t))
        stacked = self.layer_weights(lora_scale, lora_dropout)

        def body(carry, xs):
            h, c = carry
            w, layer = xs
            h, c = decoder_block(w, h, cos, sin, mask, c, layer, write_index, cfg=cfg, prefix=prefix,
                                 prefix_valid=prefix_valid)
            if deepstack is not None:
                h = deepstack.add(h, layer)
            return (h, c), None

        # The cache rides in the carry (updated in place), not in the scan's stacked outputs.
        x, cache = _scan_layers(body, (x, cache), stacked, remat, self.unroll_layers)
        return layers.rms_norm(x, self.norm.value.astype(x.dtype), cfg.rms_norm_eps), cache

    def shared_prompt(self, xp, positions_p, valid_p, xr, positions_r, valid_r, remat: bool | str = False,
                      deepstack=None, lora_scale=1.0, lora_dropout=None):
        """The decoder stack over G prompts shared by n responses each (`shared_prompt_block`).

        xp: [G, L, H], positions_p: int [3, G, L], valid_p: bool [G, L] (the prompts, left-padded);
        xr: [G*n, N, H], positions_r: int [3, G*n, N], valid_r: bool [G*n, N] (the responses, rows of
        a group consecutive); deepstack: the prompts' `qwen3_vl.DeepStack` or None (images are in the
        prompts only); lora_scale, lora_dropout: as in `__call__`. Returns final-norm hidden states ([G, L, H], [G*n, N, H]).
        """
        cfg = self.config
        length, n = valid_p.shape[1], xr.shape[0] // xp.shape[0]
        rope = lambda pos, x: layers.mrope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, cfg.mrope_section,  # noqa
                                                   x.dtype, cfg.mrope_interleaved)
        rope_p, rope_r = rope(positions_p, xp), rope(positions_r, xr)
        mask_p = layers.causal_mask(valid_p, jnp.arange(length))
        kv_valid = jnp.concatenate([jnp.repeat(valid_p, n, axis=0), valid_r], axis=1)
        mask_r = layers.causal_mask(kv_valid, length + jnp.arange(xr.shape[1]))
        stacked = self.layer_weights(lora_scale, lora_dropout)

        def body(carry, xs):
            w, layer = xs
            hp, hr = shared_prompt_block(w, *carry, rope_p, rope_r, mask_p, mask_r, cfg=cfg)
            if deepstack is not None:
                hp = deepstack.add(hp, layer)
            return (hp, hr), None

        xp, xr = _scan_layers(body, (xp, xr), stacked, remat, self.unroll_layers)
        norm = lambda x: layers.rms_norm(x, self.norm.value.astype(x.dtype), cfg.rms_norm_eps)  # noqa: E731
        return norm(xp), norm(xr)
