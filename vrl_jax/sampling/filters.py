"""Logit filters and token choice for sampling, as pure functions.

The order is transformers': temperature, then top-k, then top-p. Filtered-out logits become -inf,
so `jax.random.categorical` can never pick them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def top_k_filter(logits, k: int):
    """logits: [B, V]; keeps the k largest per row (k static, 0 = off) -> [B, V]."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def top_p_filter(logits, p):
    """logits: [B, V]; keeps the smallest set of most likely tokens whose probability reaches p
    (p a traced scalar; p >= 1 keeps everything). The most likely token is always kept -> [B, V]."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    keep_sorted = (before < p) | (jnp.arange(logits.shape[-1]) == 0)
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep | (p >= 1.0), logits, NEG_INF)


def sample_inverse_cdf(key, logits):
    """One token per row drawn from softmax(logits) (filtered-out logits are -inf): the first token whose
    cumulative probability exceeds one uniform draw per row. The same distribution as
    `jax.random.categorical`'s Gumbel-max, from B random numbers instead of B x V (3x faster per decode
    step on XLA:CPU at V = 1024, measured). logits: [B, V] -> int32 [B]."""
    cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
    threshold = jax.random.uniform(key, (logits.shape[0], 1)) * cdf[:, -1:]
    index = jnp.sum(cdf <= threshold, axis=-1)  # a token of probability 0 never holds the first step above
    return jnp.where(index < logits.shape[-1], index, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def choose_tokens(key, logits, temperature, top_k: int, top_p):
    """Picks one token per row and its log-probability under the sampling distribution.

    logits: float32 [B, V]; temperature, top_p: traced scalars (temperature 0 = greedy).
    Returns tokens int32 [B] and logprobs float32 [B] = log softmax(logits / T)[token] (T = 1 when
    greedy): the full-vocabulary tempered distribution the trainer recomputes, not the filtered one.
    """
    greedy = temperature <= 0.0
    t = jnp.where(greedy, 1.0, temperature)
    scaled = logits / t
    filtered = top_k_filter(scaled, top_k)
    # The sort behind top-p costs O(V log V) per token: skip it when top_p is off.
    filtered = jax.lax.cond(top_p < 1.0, lambda x: top_p_filter(x, top_p), lambda x: x, filtered)
    tokens = jax.lax.cond(greedy, lambda: jnp.argmax(logits, axis=-1),
                          lambda: sample_inverse_cdf(key, filtered)).astype(jnp.int32)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs
