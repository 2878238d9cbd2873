"""The math shared by the Qwen-VL family, as pure functions.

Numerics follow the transformers implementation where parity depends on them: norms and softmax
in float32, RMSNorm casting back to the input dtype *before* the weight, rotary tables computed in
float32 (cast to the activation dtype for the language model, kept float32 for the vision tower).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Large and finite: a fully masked row (left padding) then gives a uniform softmax instead of NaN.
MASK_VALUE = -1e30

# What a rematerialised layer keeps from its forward pass for the backward pass (`model.remat`):
#   none     everything (no remat: the most memory, the least compute);
#   full     nothing but the layer's input: the whole layer runs again in the backward pass;
#   dots     the results of matmuls without batch dimensions (the projections): attention and
#            elementwise work run again, the big matmuls do not;
#   offload  as dots, but those results wait in pinned host memory instead of on the device.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


def remat_policy_name(remat: bool | str) -> str:
    """A `model.remat` value (a policy name, or a bool: True = "full", False = "none") -> its name."""
    name = {True: "full", False: "none"}.get(remat, remat) if isinstance(remat, bool) else remat
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)} (or a bool); got {remat!r}")
    return name


def checkpointed(body, remat: bool | str):
    """`body` (one layer, a scan body) rematerialised under the policy `remat` names (see REMAT_POLICIES)."""
    name = remat_policy_name(remat)
    return body if name == "none" else jax.checkpoint(body, policy=REMAT_POLICIES[name])


def rms_norm(x, weight, eps: float):
    """x: [..., D], weight: [D] -> [..., D] in x's dtype."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def layer_norm(x, weight, bias, eps: float):
    """x: [..., D], weight/bias: [D] -> [..., D]; statistics in float32."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def activation(name: str):
    """The activation transformers names `name` (ACT2FN)."""
    table = {
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    }
    if name not in table:
        raise ValueError(f"hidden_act {name!r} is not supported; expected one of {sorted(table)}")
    return table[name]


def rotate_half(x):
    """[..., D] -> [..., D]: halves (x1, x2) become (-x2, x1) (not the even/odd interleave)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x, cos, sin):
    """x: [B, T, N, D]; cos/sin: [B, T, D] -> [B, T, N, D]."""
    return x * cos[:, :, None, :] + rotate_half(x) * sin[:, :, None, :]


def inverse_frequencies(dim: int, theta: float):
    """[dim // 2] float32: 1 / theta^(2i / dim)."""
    return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def mrope_axes(half: int, mrope_section, interleaved: bool = False) -> np.ndarray:
    """int [half]: which position axis (0 temporal, 1 height, 2 width) each rotary frequency takes.

    Chunked (Qwen2/2.5-VL): consecutive chunks of `mrope_section`, chunk i from axis i % 3.
    Interleaved (Qwen3-VL): temporal everywhere, then frequencies 1, 4, 7, ... (the first
    `section[1]` of them) from height and 2, 5, 8, ... (`section[2]`) from width.
    """
    if interleaved:
        axes = np.zeros(half, np.int32)
        for axis in (1, 2):
            axes[axis:mrope_section[axis] * 3:3] = axis
        return axes
    return np.concatenate([np.full(size, i % 3, np.int32) for i, size in enumerate(mrope_section)])


def mrope_cos_sin(positions, head_dim: int, theta: float, mrope_section, dtype, interleaved: bool = False):
    """Multimodal rotary tables.

    positions: int [3, B, T] (temporal, height, width; equal rows for text) -> cos, sin: [B, T, head_dim].
    Each frequency takes its angle from the axis `mrope_axes` assigns it (a selection, no arithmetic).
    """
    inv = inverse_frequencies(head_dim, theta)  # [hd/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv  # [3, B, T, hd/2]
    axes = jnp.asarray(mrope_axes(head_dim // 2, mrope_section, interleaved))
    f = jnp.take_along_axis(freqs, axes[None, None, None, :], axis=0)[0]
    emb = jnp.concatenate([f, f], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def vision_cos_sin(hw_pos, head_dim: int, theta: float):
    """2-D axial rotary tables for vision patches, float32.

    hw_pos: int [P, 2] (row, column of each patch) -> cos, sin: [P, head_dim], laid out as
    [h-frequencies, w-frequencies] twice (hd/4 frequencies per axis).
    """
    inv = inverse_frequencies(head_dim // 2, theta)  # [hd/4]
    freqs = hw_pos.astype(jnp.float32)[..., None] * inv  # [P, 2, hd/4]
    f = jnp.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)
    emb = jnp.concatenate([f, f], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def attention(q, k, v, mask, scale: float):
    """Grouped-query attention with an explicit boolean mask, softmax in float32.

    q: [B, T, N, D]; k: [B, K, S, D] and v: [B, K, D, S] (the KV cache's layouts) with N % K == 0
    (kv head j serves query heads j*N/K ... (j+1)*N/K - 1, transformers' repeat_kv); mask: bool
    [B, T, S] (True = attend). Returns [B, T, N, D] in q's dtype.

    With (B, K) leading and values stored transposed, both contractions are plain GEMMs over the
    cache as it lies (keys times queries, values times probabilities): a decode step, with one or two
    query columns per kv head, would otherwise transpose the whole cache or fall back to a slow
    transposed-operand GEMM for every layer (measured on XLA:CPU: 2.4x slower for the value product).
    """
    b, t, n, d = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, t, kv, n // kv, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k).astype(jnp.float32) * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bkds->btkgd", probs, v)
    return out.reshape(b, t, n, d)


def attention_with_prefix(q, kp, vp, prefix_valid, k, v, mask, scale: float):
    """`attention` of rows that come in groups sharing a prefix (a GRPO group's prompt): every row's
    queries attend to its group's prefix keys, held once per group, and then to its own keys.

    q: [R, T, N, D] with R = G * n (the n rows of a group consecutive); kp: [G, K, L, D] and
    vp: [G, K, D, L] the groups' prefix keys and values; prefix_valid: bool [G, L] (the prefix comes
    before every query, so validity is the whole mask); k: [R, K, S, D], v: [R, K, D, S], mask:
    bool [R, T, S] the rows' own keys, as in `attention`. Returns [R, T, N, D] in q's dtype.

    One softmax over [prefix; own] keys, so it equals `attention` over the prefix repeated n times
    and concatenated with the rows' keys. The prefix product is one GEMM per (group, kv head) with the
    n rows' queries as its columns, reading the prefix once instead of n times.
    """
    r, t, n, d = q.shape
    g, kv, length = kp.shape[0], kp.shape[1], kp.shape[2]
    reps, h = r // g, n // kv
    qg = q.reshape(g, reps, t, kv, h, d)
    sp = jnp.einsum("gntkhd,gksd->gnkhts", qg, kp).astype(jnp.float32) * scale
    sp = jnp.where(prefix_valid[:, None, None, None, None, :], sp, MASK_VALUE)
    sr = jnp.einsum("btkhd,bksd->bkhts", q.reshape(r, t, kv, h, d), k).astype(jnp.float32) * scale
    sr = jnp.where(mask[:, None, None, :, :], sr, MASK_VALUE)
    probs = jax.nn.softmax(jnp.concatenate([sp.reshape(r, kv, h, t, length), sr], axis=-1), axis=-1)
    pp = probs[..., :length].reshape(g, reps, kv, h, t, length).astype(vp.dtype)
    out = (jnp.einsum("gnkhts,gkds->gntkhd", pp, vp).reshape(r, t, kv, h, d)
           + jnp.einsum("bkhts,bkds->btkhd", probs[..., length:].astype(v.dtype), v))
    return out.reshape(r, t, n, d).astype(q.dtype)


def causal_mask(kv_valid, query_slots):
    """Which key slots each query may attend to.

    kv_valid: bool [B, S] (slot holds a real token); query_slots: int [T] (the slot of each query)
    -> bool [B, T, S]: the key is valid and not after the query.
    """
    s = jnp.arange(kv_valid.shape[1])
    return kv_valid[:, None, :] & (s[None, None, :] <= query_slots[None, :, None])
