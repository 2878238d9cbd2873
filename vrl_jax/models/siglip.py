"""The SigLIP vision tower of LLaVA-OneVision.

Tiles have a fixed size, so a packed buffer of P patch rows is P / (g*g) whole tiles and attention
runs per tile on a static reshape (no mask; padding tiles are computed and never read). Features are
the output of the last layer run (`vision_feature_layer`), *before* `post_layernorm`: transformers
takes `hidden_states[-1]`, not `last_hidden_state`. `post_layernorm` is kept as parameters only so a
checkpoint round-trips.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vrl_jax.models import layers, lora
from vrl_jax.models.llava_config import LlavaVisionConfig
from vrl_jax.models.qwen2 import _ones, _param, _zeros


class SiglipLayers(nnx.Module):
    """All encoder layers, parameters stacked on a leading [layers] axis."""

    def __init__(self, cfg: LlavaVisionConfig, *, param_dtype, rngs: nnx.Rngs):
        n, c, m = cfg.num_layers, cfg.width, cfg.mlp_dim
        p = lambda *shape: _param(rngs, (n, *shape), param_dtype)  # noqa: E731
        z = lambda *shape: _zeros((n, *shape), param_dtype)  # noqa: E731
        self.norm1_w, self.norm1_b = _ones((n, c), param_dtype), z(c)
        self.q_w, self.q_b, self.k_w, self.k_b = p(c, c), z(c), p(c, c), z(c)
        self.v_w, self.v_b, self.o_w, self.o_b = p(c, c), z(c), p(c, c), z(c)
        self.norm2_w, self.norm2_b = _ones((n, c), param_dtype), z(c)
        self.fc1_w, self.fc1_b, self.fc2_w, self.fc2_b = p(c, m), z(m), p(m, c), z(c)

    def names(self) -> tuple[str, ...]:
        return tuple(k for k, v in vars(self).items() if isinstance(v, nnx.Param))


def siglip_layer(w: dict, x, *, cfg: LlavaVisionConfig):
    """One pre-norm encoder layer over whole tiles. x: [tiles, T, C] -> [tiles, T, C]."""
    dt = x.dtype
    n, t, c = x.shape
    w = lora.cast(w, dt)
    y = layers.layer_norm(x, w["norm1_w"], w["norm1_b"], cfg.eps)
    heads = lambda name: (lora.project(y, w, name + "_w") + w[name + "_b"]).reshape(  # noqa: E731
        n, t, cfg.num_heads, cfg.head_dim)
    q = heads("q")
    k = heads("k").transpose(0, 2, 1, 3)  # [tiles, heads, T, hd]
    v = heads("v").transpose(0, 2, 3, 1)  # [tiles, heads, hd, T]
    everywhere = jnp.ones((1, t, t), bool)  # bidirectional within the tile
    attn = layers.attention(q, k, v, everywhere, cfg.head_dim ** -0.5).reshape(n, t, c)
    x = x + lora.project(attn, w, "o_w") + w["o_b"]
    y = layers.layer_norm(x, w["norm2_w"], w["norm2_b"], cfg.eps)
    act = layers.activation(cfg.hidden_act)
    return x + lora.project(act(lora.project(y, w, "fc1_w") + w["fc1_b"]), w, "fc2_w") + w["fc2_b"]


class SiglipTower(nnx.Module):
    """Patch embedding (a Conv2d as a matmul on flattened patches), learned positions, encoder layers."""

    def __init__(self, cfg: LlavaVisionConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.patch_w = _param(rngs, (cfg.patch_dim, cfg.width), param_dtype)
        self.patch_b = _zeros((cfg.width,), param_dtype)
        self.pos_embed = _param(rngs, (cfg.tile_tokens, cfg.width), param_dtype)
        self.layers = SiglipLayers(cfg, param_dtype=param_dtype, rngs=rngs)
        self.post_norm_w, self.post_norm_b = _ones((cfg.width,), param_dtype), _zeros((cfg.width,), param_dtype)
        self.max_segment: int | None = None  # tiles are attended to as whole blocks; kept for the shared API
        self.lora: lora.LoraConfig | None = None  # set by `lora.add_adapters`

    def __call__(self, pixel_values, hw_pos, dtype=jnp.float32, remat: bool | str = False, lora_scale=1.0,
                 lora_dropout=None):
        """pixel_values: [P, C*p*p] whole tiles of g*g rows each; hw_pos: int [P, 2] (row, col in the tile);
        lora_scale, lora_dropout: for the layers' adapters (`Qwen2Decoder.__call__`).
        Returns the features of layer `cfg.depth` (pre post_layernorm), [P, width]."""
        cfg = self.config
        t = cfg.tile_tokens
        x = pixel_values.astype(dtype) @ self.patch_w.value.astype(dtype) + self.patch_b.value.astype(dtype)
        x = x + jnp.take(self.pos_embed.value, hw_pos[:, 0] * cfg.grid + hw_pos[:, 1], axis=0).astype(dtype)
        x = x.reshape(-1, t, cfg.width)
        stacked = {k: v[:cfg.depth] for k, v in lora.weights(self.layers, self.lora, lora_scale, lora_dropout).items()}

        def body(h, w):
            return siglip_layer(w, h, cfg=cfg), None

        body = layers.checkpointed(body, remat)
        if cfg.depth:
            x, _ = jax.lax.scan(body, x, stacked)
        return x.reshape(-1, cfg.width)
