"""Policy-gradient losses as sums with denominators, KL estimators, and vocabulary-chunked log-probs/entropy.

Exact micro-batch accumulation. Every loss or metric is a `SumCount(total, count)`: `total` is a sum
over this micro-batch (differentiable), `count` its share of the denominator (never depends on
parameters). Summing the parts of k micro-batches and dividing once gives exactly the full-batch
value, and `sum_k grad(total_k) / sum_k count_k` is exactly the full-batch gradient. So the trainer
differentiates `total` only and divides the accumulated gradient by the accumulated `count`.

Aggregation modes (`aggregate`), for per-token values x and mask m over rows i and tokens t:
  token_mean:               sum_it x m / sum_it m                   (DAPO, EasyR1 `token`, MAYE per batch)
  seq_mean_token_mean:      sum_i (sum_t x m / sum_t m) / #rows      (GRPO, TRL `grpo`, DyME)
  seq_mean_token_sum_norm:  sum_it x m / (#rows * max_len)           (Dr.GRPO, `max_len` a constant)
A row with no valid token is padding: it counts in no denominator.

All functions are pure; strings, booleans and the config are static under `jax.jit`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
KL_CLAMP_MODES = ("mean", "token")
RATIO_LEVELS = ("token", "sequence")


class SumCount(NamedTuple):
    """A mean kept as its parts: float32 scalars `total` (sum) and `count` (denominator)."""

    total: jax.Array
    count: jax.Array

    def value(self) -> jax.Array:
        """`total / count`, 0 when nothing was counted."""
        safe = jnp.where(self.count > 0, self.count, 1.0)
        return jnp.where(self.count > 0, self.total / safe, 0.0)

    def plus(self, other: "SumCount") -> "SumCount":
        return SumCount(self.total + other.total, self.count + other.count)


def _check_tokens(name: str, x: jax.Array, like: jax.Array) -> None:
    if x.shape != like.shape:
        raise ValueError(f"`{name}` must have the mask's shape {tuple(like.shape)} ([B, T]); got {tuple(x.shape)}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}; got {value!r}")


# ---- Aggregation ---------------------------------------------------------------------------------


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str = "token_mean", max_len: int | None = None) -> SumCount:
    """Reduce per-token values to a SumCount of float32 scalars under `mode` (see module docstring).

    per_token: float `[B, T]`; mask: `[B, T]`, 1 = valid; max_len: the constant of
    `seq_mean_token_sum_norm` (the generation length limit).
    """
    _check_choice("mode", mode, AGG_MODES)
    _check_tokens("per_token", per_token, mask)
    mask = mask.astype(jnp.float32)
    masked = per_token.astype(jnp.float32) * mask
    tokens_per_row = mask.sum(axis=1)
    num_rows = (tokens_per_row > 0).astype(jnp.float32).sum()
    if mode == "token_mean":
        return SumCount(masked.sum(), tokens_per_row.sum())
    if mode == "seq_mean_token_mean":
        row_means = masked.sum(axis=1) / jnp.maximum(tokens_per_row, 1.0)
        return SumCount(row_means.sum(), num_rows)
    if max_len is None or max_len <= 0:
        raise ValueError(f"`max_len` must be a positive int for mode 'seq_mean_token_sum_norm'; got {max_len!r}")
    return SumCount(masked.sum(), num_rows * float(max_len))


def clamp_mean(part: SumCount, clamp: float) -> SumCount:
    """`part` with its mean clipped to [-clamp, clamp]: `(count * clip(total / count), count)`.

    MAYE clamps the *mean* KL of a backward batch (`torch.clamp(masked_mean(k3), -10, 10)`), so a
    clamped mean passes no gradient, and a single huge token still counts in an unclamped mean.
    Applied to one micro-batch's part, exactly as MAYE does per backward batch.
    """
    return SumCount(part.count * jnp.clip(part.value(), -clamp, clamp), part.count)


# ---- Importance ratio and the clipped surrogate --------------------------------------------------


def importance_log_ratio(
    logprobs: jax.Array, old_logprobs: jax.Array, mask: jax.Array, level: str = "token"
) -> jax.Array:
    """log(pi / pi_old) per token, or GSPO's length-normalised sequence log-ratio broadcast to tokens.

    logprobs, old_logprobs, mask: `[B, T]`; level "sequence" gives `sum_t m (logp - old) / sum_t m`
    per row. Returns float32 `[B, T]`, 0 on padding.
    """
    _check_choice("level", level, RATIO_LEVELS)
    mask = mask.astype(jnp.float32)
    log_ratio = (logprobs.astype(jnp.float32) - old_logprobs.astype(jnp.float32)) * mask
    if level == "token":
        return log_ratio
    seq = log_ratio.sum(axis=1, keepdims=True) / jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)
    return seq * mask


class ClippedSurrogate(NamedTuple):
    """Per-token PPO terms, float32 `[B, T]`: the loss, the ratio, 0/1 indicators of which clip acted."""

    loss: jax.Array
    ratio: jax.Array
    clipped_low: jax.Array
    clipped_high: jax.Array
    dual_clipped: jax.Array


def clipped_surrogate(
    log_ratio: jax.Array,
    advantages: jax.Array,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_c: float | None = None,
) -> ClippedSurrogate:
    """PPO loss `max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))`, with the dual clip for A < 0.

    Dual clip (Ye et al. 2020, verl's `clip_ratio_c`): for negative advantages the loss is capped at
    `-A * clip_c`, so a huge ratio on a bad token cannot dominate. Positive advantages are unchanged.
    `clipped_low` marks r < 1 - clip_low with A < 0, `clipped_high` r > 1 + clip_high with A > 0:
    exactly the tokens whose clipped loss exceeds the unclipped one (no gradient flows there).

    log_ratio: float `[B, T]` (`importance_log_ratio`); advantages: `[B, T]`, or `[B]` broadcast over
    tokens. Returns a ClippedSurrogate of float32 `[B, T]` arrays, not masked (aggregate with the mask).
    """
    if advantages.ndim == log_ratio.ndim - 1:
        advantages = advantages[..., None]
    advantages = jnp.broadcast_to(advantages.astype(jnp.float32), log_ratio.shape)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = jnp.maximum(unclipped, clipped)
    dual = jnp.zeros_like(loss, dtype=bool)
    if clip_c is not None:
        dual = (advantages < 0) & (loss > -advantages * clip_c)
        loss = jnp.where(dual, -advantages * clip_c, loss)
    low = (ratio < 1.0 - clip_low) & (advantages < 0)
    high = (ratio > 1.0 + clip_high) & (advantages > 0)
    as_float = lambda b: b.astype(jnp.float32)  # noqa: E731
    return ClippedSurrogate(loss, ratio, as_float(low), as_float(high), as_float(dual))


def max_abs_ratio_minus_one(logprobs: jax.Array, old_logprobs: jax.Array, mask: jax.Array) -> jax.Array:
    """`max |pi / pi_old - 1|` over tokens where `mask` > 0 (0 when there are none); no gradient.

    On the first update of a step pi is the policy that sampled, so this is the sampler-trainer
    gap (numerics of two programs); DyME/TRL take pi_old from the training forward, where it is 0.
    logprobs, old_logprobs, mask: `[B, T]` -> float32 scalar.
    """
    _check_tokens("old_logprobs", old_logprobs, mask)
    gap = jnp.abs(jnp.expm1(logprobs.astype(jnp.float32) - old_logprobs.astype(jnp.float32)))
    return jax.lax.stop_gradient(jnp.max(jnp.where(mask > 0, gap, 0.0), initial=0.0))


# ---- KL to the reference policy, supervised NLL --------------------------------------------------


def kl_per_token(
    logprobs: jax.Array, ref_logprobs: jax.Array, estimator: str = "k3", clamp: float | None = None
) -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1, k2, k3).

    With d = ref_logprobs - logprobs: k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1 (unbiased, >= 0;
    MAYE's and GRPO's choice). `clamp` clips to [-clamp, clamp] as MAYE (10) and verl do.
    logprobs, ref_logprobs: float `[B, T]` -> float32 `[B, T]` (not masked).
    """
    _check_choice("estimator", estimator, KL_ESTIMATORS)
    d = ref_logprobs.astype(jnp.float32) - logprobs.astype(jnp.float32)
    if estimator == "k1":
        kl = -d
    elif estimator == "k2":
        kl = 0.5 * jnp.square(d)
    else:
        kl = jnp.expm1(d) - d
    return kl if clamp is None else jnp.clip(kl, -clamp, clamp)


def sequence_kl(logprobs: jax.Array, ref_logprobs: jax.Array, mask: jax.Array, estimator: str = "k3",
                clamp: float | None = 10.0) -> jax.Array:
    """Per-sequence sum over valid tokens of the per-token KL estimate (clamped per token).

    MAYE's `training/kl` is the mean over sequences of this sum with k3 clamped to [-10, 10]
    (`get_rewards_from_ref`); k3 >= 0, so it is never negative (a k1 sum can be).
    logprobs (rollout policy), ref_logprobs, mask: `[B, T]` -> float32 `[B]`.
    """
    _check_tokens("logprobs", logprobs, mask)
    _check_tokens("ref_logprobs", ref_logprobs, mask)
    kl = kl_per_token(logprobs, ref_logprobs, estimator, clamp)
    return (kl * mask.astype(jnp.float32)).sum(axis=-1)


def sft_nll_per_token(logprobs: jax.Array, row_weights: jax.Array) -> jax.Array:
    """Weighted NLL `-w_i * logp_it` (DyME memorization rows: w = 1).

    logprobs: float `[B, T]` of the target tokens; row_weights: float `[B]` -> float32 `[B, T]` (not masked).
    """
    if row_weights.shape != logprobs.shape[:1]:
        raise ValueError(f"`row_weights` must have shape [B]=({logprobs.shape[0]},); got {tuple(row_weights.shape)}")
    return -row_weights.astype(jnp.float32)[:, None] * logprobs.astype(jnp.float32)


def sampled_token_entropy(logprobs: jax.Array) -> jax.Array:
    """MAYE's logged "entropy": `-p log p` of the sampled token only. `[B, T]` -> float32 `[B, T]`."""
    logprobs = logprobs.astype(jnp.float32)
    return -jnp.exp(logprobs) * logprobs


# ---- Vocabulary-chunked log-softmax and entropy --------------------------------------------------
# One pass over the vocabulary in chunks of C columns keeps, per token, a running max m,
# s = sum exp(z - m) and w = sum exp(z - m) (z - m); when m grows to m' both are rescaled by
# exp(m - m') (w also gains (m - m') s). At the end logZ = m + log s, entropy = log s - w / s and
# logp(target) = z_target - logZ. The chunk body is rematerialised (`jax.checkpoint`), so neither
# the forward nor the backward pass holds more than one `[..., C]` chunk of logits; only the
# `[...]`-sized carries are saved per chunk. The unembedding is sliced in place (no padding copy):
# the last chunk is shifted left to end at V and its already-seen columns are masked out.

_NEG_INIT = -1e30  # finite start for the running max: exp(-1e30 - m) = 0 without inf * 0 = NaN


def _online_vocab_stats(
    chunk_logits: Callable[[jax.Array], jax.Array],
    vocab_size: int,
    chunk_size: int,
    lead_shape: tuple[int, ...],
    targets: jax.Array | None,
    with_entropy: bool,
) -> tuple[jax.Array | None, jax.Array | None]:
    """Returns (target log-probs, entropy), float32 `lead_shape`; `chunk_logits(start)` -> `[*lead, C]`."""
    if chunk_size <= 0:
        raise ValueError(f"`chunk_size` must be positive; got {chunk_size}")
    width = min(chunk_size, vocab_size)
    num_chunks = math.ceil(vocab_size / width)

    @jax.checkpoint
    def body(carry, index):
        m, s, w, z_target = carry
        nominal = index * width
        start = jnp.minimum(nominal, vocab_size - width)
        columns = start + jnp.arange(width)
        fresh = columns >= nominal
        z = jnp.where(fresh, chunk_logits(start), -jnp.inf)
        m_new = jnp.maximum(m, z.max(axis=-1))
        scale = jnp.exp(m - m_new)
        p = jnp.exp(z - m_new[..., None])
        s_new = s * scale + p.sum(axis=-1)
        if with_entropy:
            centred = jnp.where(fresh, z - m_new[..., None], 0.0)
            w = scale * (w + (m - m_new) * s) + (p * centred).sum(axis=-1)
        if targets is not None:
            hit = fresh & (columns == targets[..., None])
            z_target = z_target + jnp.where(hit, z, 0.0).sum(axis=-1)
        return (m_new, s_new, w, z_target), None

    zeros = jnp.zeros(lead_shape, jnp.float32)
    init = (jnp.full(lead_shape, _NEG_INIT, jnp.float32), zeros, zeros, zeros)
    (m, s, w, z_target), _ = jax.lax.scan(body, init, jnp.arange(num_chunks))
    log_s = jnp.log(s)
    target_logprobs = z_target - (m + log_s) if targets is not None else None
    entropy = log_s - w / s if with_entropy else None
    return target_logprobs, entropy


class TokenStats(NamedTuple):
    """Per-token log-prob of the target and full-vocabulary entropy, float32 `[B, T]`."""

    logprobs: jax.Array
    entropy: jax.Array


def chunked_token_stats(
    hidden: jax.Array,
    unembed: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int = 8192,
    temperature: float = 1.0,
    vocab_axis: int = 1,
    with_entropy: bool = True,
) -> TokenStats:
    """Target log-probs (and entropy) of `softmax(hidden @ unembed / temperature)` without `[B, T, V]` logits.

    Chunk logits are computed in float32 (`preferred_element_type`) whatever the input dtype.
    Target ids outside [0, V) give meaningless values (not checkable under jit).

    hidden: `[B, T, H]` final hidden states at the positions that predict `targets` (int `[B, T]`);
    unembed: `[H, V]` (vocab_axis=1, an lm_head kernel) or `[V, H]` (vocab_axis=0, tied embeddings).
    Returns TokenStats(logprobs, entropy), float32 `[B, T]`; entropy is None if `with_entropy` is False.
    """
    if hidden.ndim != 3 or unembed.ndim != 2 or vocab_axis not in (0, 1) or (
        unembed.shape[1 - vocab_axis] != hidden.shape[-1]
    ):
        raise ValueError(
            f"`hidden` must be [B, T, H] and `unembed` [H, V] (vocab_axis=1) or [V, H] (vocab_axis=0) with the "
            f"same H; got {tuple(hidden.shape)}, {tuple(unembed.shape)}, vocab_axis={vocab_axis}"
        )
    if targets.shape != hidden.shape[:2]:
        raise ValueError(f"`targets` must have shape [B, T]={tuple(hidden.shape[:2])}; got {tuple(targets.shape)}")
    vocab_size = unembed.shape[vocab_axis]
    width = min(chunk_size, vocab_size)
    spec = "bth,hc->btc" if vocab_axis == 1 else "bth,ch->btc"

    def chunk_logits(start):
        block = jax.lax.dynamic_slice_in_dim(unembed, start, width, axis=vocab_axis)
        return jnp.einsum(spec, hidden, block, preferred_element_type=jnp.float32) / temperature

    logprobs, entropy = _online_vocab_stats(chunk_logits, vocab_size, chunk_size, targets.shape, targets, with_entropy)
    return TokenStats(logprobs, entropy)


def chunked_token_logprobs(hidden: jax.Array, unembed: jax.Array, targets: jax.Array, **kwargs) -> jax.Array:
    """`chunked_token_stats(...).logprobs` without the entropy work. Returns float32 `[B, T]`."""
    return chunked_token_stats(hidden, unembed, targets, with_entropy=False, **kwargs).logprobs


def entropy_from_logits(logits: jax.Array, *, chunk_size: int = 8192, temperature: float = 1.0) -> jax.Array:
    """Full-vocabulary entropy of `softmax(logits / temperature)`: logits `[..., V]` -> float32 `[...]`.

    The logits already exist; going chunk by chunk avoids a second float32 `[..., V]` softmax buffer.
    """
    vocab_size = logits.shape[-1]
    width = min(chunk_size, vocab_size)

    def chunk_logits(start):
        block = jax.lax.dynamic_slice_in_dim(logits, start, width, axis=-1)
        return block.astype(jnp.float32) / temperature

    _, entropy = _online_vocab_stats(chunk_logits, vocab_size, chunk_size, logits.shape[:-1], None, True)
    return entropy


def token_logprobs_from_logits(logits: jax.Array, targets: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Direct `log_softmax(logits / temperature)[target]`: logits `[..., V]`, targets int `[...]` -> float32 `[...]`."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


# ---- The full objective --------------------------------------------------------------------------

# Settings whose objective is right under one aggregation mode only:
# (config key, value, what it is, the agg_mode it needs, why).
_NEEDS_AGG_MODE = (
    ("loss.ratio_level", "sequence", "GSPO", "seq_mean_token_mean",
     "GSPO averages one clipped sequence-level term per response; a token mean weights responses by length"),
    ("advantage.estimator", "drgrpo", "Dr.GRPO", "seq_mean_token_sum_norm",
     "Dr.GRPO divides the token sum by a constant (rows x max_len), not by each response's length"),
)


def check_combination(estimator: str | None, ratio_level: str, agg_mode: str) -> None:
    """Raises ValueError naming both config keys when the aggregation mode breaks the objective.

    estimator: `advantage.estimator` (None when the algorithm ignores it, e.g. DyME);
    ratio_level: `loss.ratio_level`; agg_mode: `loss.agg_mode`.
    """
    values = {"advantage.estimator": estimator, "loss.ratio_level": ratio_level}
    for key, value, name, needed, why in _NEEDS_AGG_MODE:
        if values[key] == value and agg_mode != needed:
            raise ValueError(f"{key}={value!r} ({name}) needs loss.agg_mode={needed!r}, got loss.agg_mode="
                             f"{agg_mode!r}: {why}. Set the two keys together.")


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """Static settings of `policy_objective` (hashable: pass it as a static argument to jit).

    clip_low/clip_high: PPO clip range [1 - clip_low, 1 + clip_high] (clip-higher when unequal).
    clip_c: dual-clip cap for negative advantages (> 1), None = off.
    ratio_level: "token" (PPO/GRPO) or "sequence" (GSPO: length-normalised sequence ratio).
    agg_mode, max_len: see `aggregate`.
    kl_coef, kl_estimator, kl_clamp: KL-to-reference term in the loss (0 = off; MAYE k3, clamp 10).
    kl_clamp_mode: "mean" clips the micro-batch's aggregated KL (MAYE: `clamp(masked_mean(k3))`,
      per backward batch); "token" clips each token's KL before aggregating (verl).
    entropy_coef: entropy bonus (subtracted from the loss; needs `entropy`).
    sft_coef: scale of the weighted NLL term (needs `sft_weights`).
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_c: float | None = None
    ratio_level: str = "token"
    agg_mode: str = "token_mean"
    max_len: int | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_clamp: float | None = None
    kl_clamp_mode: str = "mean"
    entropy_coef: float = 0.0
    sft_coef: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"PolicyLossConfig.clip_low must be in [0, 1); got {self.clip_low}")
        if self.clip_high < 0.0:
            raise ValueError(f"PolicyLossConfig.clip_high must be >= 0; got {self.clip_high}")
        if self.clip_c is not None and self.clip_c <= 1.0:
            raise ValueError(f"PolicyLossConfig.clip_c must be > 1 (or None); got {self.clip_c}")
        if self.kl_clamp is not None and not self.kl_clamp > 0:
            raise ValueError(f"PolicyLossConfig.kl_clamp must be > 0 (or None); got {self.kl_clamp}")
        _check_choice("PolicyLossConfig.ratio_level", self.ratio_level, RATIO_LEVELS)
        _check_choice("PolicyLossConfig.agg_mode", self.agg_mode, AGG_MODES)
        _check_choice("PolicyLossConfig.kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _check_choice("PolicyLossConfig.kl_clamp_mode", self.kl_clamp_mode, KL_CLAMP_MODES)
        if self.agg_mode == "seq_mean_token_sum_norm" and (self.max_len is None or self.max_len <= 0):
            raise ValueError("PolicyLossConfig.max_len must be a positive int with agg_mode 'seq_mean_token_sum_norm'")


def policy_objective(
    cfg: PolicyLossConfig,
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    ref_logprobs: jax.Array | None = None,
    entropy: jax.Array | None = None,
    sft_weights: jax.Array | None = None,
) -> tuple[SumCount, dict[str, SumCount]]:
    """`pg + kl_coef * KL - entropy_coef * H + sft_coef * w * NLL`, aggregated by `cfg.agg_mode`.

    Args:
      logprobs: float `[B, T]` current policy log-probs of the response tokens (differentiable).
      old_logprobs: `[B, T]` rollout-policy log-probs (for on-policy, `stop_gradient(logprobs)`).
      advantages: `[B, T]` or `[B]`.
      mask: `[B, T]` response mask.
      ref_logprobs: `[B, T]`, required when `cfg.kl_coef` != 0 (also logged as `kl` when given).
      entropy: `[B, T]` full-vocabulary entropy, required when `cfg.entropy_coef` != 0.
      sft_weights: `[B]` NLL row weights (DyME memorization rows 1, others 0).
    Returns:
      (loss, metrics). Parts in the aggregation mode, sharing `loss.count`: `pg_loss`, `kl_loss`
      (the raw KL, clamped as `cfg.kl_clamp_mode` says and *not* multiplied by `kl_coef`, as MAYE
      logs it; present whenever `ref_logprobs` is given), `entropy_bonus`, `sft_loss`; so
      `loss = pg_loss + kl_coef * kl_loss + entropy_bonus + sft_loss`. Token means: ratio,
      clip_frac_low, clip_frac_high, clip_frac (either), dual_clip_frac, approx_kl
      (`0.5 (logp - old)^2`, MAYE) over RL tokens only (rows with `sft_weights` == 0: an SFT row's
      old log-probs are not a policy's), and kl, entropy, sampled_token_entropy over all tokens.
    """
    for name, x in (("logprobs", logprobs), ("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs),
                    ("entropy", entropy)):
        if x is not None:
            _check_tokens(name, x, mask)
    if advantages.shape not in (mask.shape, mask.shape[:1]):
        raise ValueError(f"`advantages` must be [B, T] or [B] for mask {tuple(mask.shape)}; got {advantages.shape}")
    for coef, name, x in ((cfg.kl_coef, "ref_logprobs", ref_logprobs), (cfg.entropy_coef, "entropy", entropy)):
        if coef != 0.0 and x is None:
            raise ValueError(f"`{name}` is required when PolicyLossConfig's coefficient for it is {coef} (not 0)")
    rl_mask = mask if sft_weights is None else mask * (sft_weights == 0).astype(mask.dtype)[:, None]
    mean = lambda x, m=mask: aggregate(jax.lax.stop_gradient(x), m, "token_mean")  # noqa: E731
    agg = lambda x: aggregate(x, mask, cfg.agg_mode, cfg.max_len)  # noqa: E731

    log_ratio = importance_log_ratio(logprobs, old_logprobs, mask, cfg.ratio_level)
    surrogate = clipped_surrogate(log_ratio, advantages, cfg.clip_low, cfg.clip_high, cfg.clip_c)
    terms = {"pg_loss": surrogate.loss}
    metrics = {
        "ratio": mean(surrogate.ratio, rl_mask),
        "clip_frac_low": mean(surrogate.clipped_low, rl_mask),
        "clip_frac_high": mean(surrogate.clipped_high, rl_mask),
        "clip_frac": mean(surrogate.clipped_low + surrogate.clipped_high, rl_mask),
        "dual_clip_frac": mean(surrogate.dual_clipped, rl_mask),
        "approx_kl": mean(0.5 * jnp.square(logprobs.astype(jnp.float32) - old_logprobs.astype(jnp.float32)),
                          rl_mask),
        "sampled_token_entropy": mean(sampled_token_entropy(logprobs)),
    }
    if entropy is not None:
        metrics["entropy"] = mean(entropy)
        if cfg.entropy_coef != 0.0:
            terms["entropy_bonus"] = -cfg.entropy_coef * entropy
    if sft_weights is not None:
        terms["sft_loss"] = cfg.sft_coef * sft_nll_per_token(logprobs, sft_weights)
    parts = {name: agg(x) for name, x in terms.items()}
    loss = agg(sum(terms.values()))
    if ref_logprobs is not None:
        per_token_clamp = cfg.kl_clamp if cfg.kl_clamp_mode == "token" else None
        kl = kl_per_token(logprobs, ref_logprobs, cfg.kl_estimator, per_token_clamp)
        metrics["kl"] = mean(kl)
        kl_part = agg(kl)
        if cfg.kl_clamp is not None and cfg.kl_clamp_mode == "mean":
            kl_part = clamp_mean(kl_part, cfg.kl_clamp)
        parts["kl_loss"] = kl_part
        if cfg.kl_coef != 0.0:
            loss = SumCount(loss.total + cfg.kl_coef * kl_part.total, loss.count)
    return loss, {**parts, **metrics}
