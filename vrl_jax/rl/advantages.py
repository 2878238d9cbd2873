"""Advantage estimators: GRPO / Dr.GRPO, RLOO, REINFORCE++ as MAYE runs it, and DyME's per-group rule.

Every function is pure and jit-able; shapes are static, options that change the program (strings,
booleans, shard counts) are Python values and must be static under `jax.jit`.

Group layout: sequence-level rewards are `[groups, n]`, the n rollouts of one prompt in one row.
Token layout (REINFORCE++): `[B, T]` response tokens with a response mask (1 = a generated token that
counts, including the stop token; 0 = padding after it).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from vrl_jax.rl.losses import kl_per_token

# DyME's modes, one per group.
MEMORIZE, EXPLORE, SKIP = 0, 1, 2


def _check_rank(name: str, x: jax.Array, rank: int, layout: str) -> None:
    if x.ndim != rank:
        raise ValueError(f"`{name}` must have shape {layout} (rank {rank}); got shape {tuple(x.shape)}")


def _check_groups(name: str, x: jax.Array, min_n: int) -> None:
    _check_rank(name, x, 2, "[groups, n]")
    if x.shape[1] < min_n:
        raise ValueError(
            f"`{name}` has n={x.shape[1]} rollouts per group; this estimator needs n >= {min_n} "
            "(a group of one has no baseline: use reinforce_pp_advantages for one sample per prompt)"
        )


def grpo_advantages(
    rewards: jax.Array, eps: float = 1e-6, normalize_std: bool = True, ddof: int = 1
) -> jax.Array:
    """Group-relative advantages `(r - mean_g) / (std_g + eps)`, or `r - mean_g` (Dr.GRPO).

    Args:
      rewards: float `[groups, n]`.
      eps: added to the std (TRL and DyME use 1e-4).
      normalize_std: False gives Dr.GRPO's mean-centred advantage.
      ddof: 1 = unbiased std as `torch.std` in TRL/DyME/EasyR1 and Tunix; 0 = population std.
    Returns:
      float32 `[groups, n]`; a group whose rewards are all equal gets exactly 0.
    """
    _check_groups("rewards", rewards, 2)
    rewards = rewards.astype(jnp.float32)
    centred = rewards - rewards.mean(axis=1, keepdims=True)
    if not normalize_std:
        return centred
    std = jnp.std(rewards, axis=1, keepdims=True, ddof=ddof)
    return centred / (std + eps)


def rloo_advantages(rewards: jax.Array) -> jax.Array:
    """Leave-one-out advantages `r_i - mean_{j != i} r_j`.

    Args:
      rewards: float `[groups, n]`, n >= 2.
    Returns:
      float32 `[groups, n]`.
    """
    _check_groups("rewards", rewards, 2)
    rewards = rewards.astype(jnp.float32)
    n = rewards.shape[1]
    others_mean = (rewards.sum(axis=1, keepdims=True) - rewards) / (n - 1)
    return rewards - others_mean


def group_stats(rewards: jax.Array, ddof: int = 1) -> dict[str, jax.Array]:
    """Per-group reward statistics and the share of zero-variance groups ("advantage collapse").

    Pass the binary accuracy (not a shaped total) to measure collapse: with shaped rewards a group
    that is all wrong can still have variance from the format term.

    Args:
      rewards: float `[groups, n]`.
    Returns:
      `mean` [groups], `std` [groups] (with `ddof`, 0 when n == 1), `zero_std` bool [groups]
      (all rewards of the group identical), `frac_zero_std` scalar.
    """
    _check_groups("rewards", rewards, 1)
    rewards = rewards.astype(jnp.float32)
    ddof = min(ddof, rewards.shape[1] - 1)
    zero_std = rewards.max(axis=1) == rewards.min(axis=1)
    return {
        "mean": rewards.mean(axis=1),
        "std": jnp.std(rewards, axis=1, ddof=ddof),
        "zero_std": zero_std,
        "frac_zero_std": zero_std.astype(jnp.float32).mean(),
    }


def dyme_modes(correct: jax.Array, threshold: float = 0.5) -> jax.Array:
    """DyME's per-group switch: 0 = memorize (none correct), 1 = explore (some), 2 = skip (all).

    DyME counts a rollout as correct when its accuracy reward is > 0.5
    (`has_correct[g] = sum(accuracy > 0.5)`, `trainer/DyMETrainer.py`); booleans work too.

    Args:
      correct: accuracy rewards or booleans `[groups, n]`.
      threshold: a rollout is correct when its value is strictly above it.
    Returns:
      int32 `[groups]`.
    """
    _check_groups("correct", correct, 1)
    num_correct = (correct.astype(jnp.float32) > threshold).sum(axis=1)
    n = correct.shape[1]
    return jnp.where(num_correct == 0, MEMORIZE, jnp.where(num_correct == n, SKIP, EXPLORE)).astype(jnp.int32)


class DymeAdvantages(NamedTuple):
    """DyME's per-sample outcome: advantages `[groups, n]`, `sft_rows` bool `[groups, n]`, `modes` int32 `[groups]`."""

    advantages: jax.Array
    sft_rows: jax.Array
    modes: jax.Array


def dyme_advantages(
    rewards: jax.Array, correct: jax.Array, threshold: float = 0.5, eps: float = 1e-4
) -> DymeAdvantages:
    """DyME's advantages: GRPO for explore groups, 0 for skipped groups, one SFT row for memorize groups.

    In a memorize group the first rollout is to be replaced by the SFT target (`sft_rows` True) and
    gets advantage +1 on every token; with ratio 1 this is the NLL gradient. The other rollouts get 0.
    Explore groups use TRL's `(r - mean) / (std_unbiased + 1e-4)`.

    Args:
      rewards: total rewards `[groups, n]`.
      correct: accuracy rewards or booleans `[groups, n]` deciding the mode.
    """
    _check_groups("rewards", rewards, 2)
    if correct.shape != rewards.shape:
        raise ValueError(f"`correct` must match `rewards` shape {tuple(rewards.shape)}; got {tuple(correct.shape)}")
    modes = dyme_modes(correct, threshold)
    grpo = grpo_advantages(rewards, eps=eps, normalize_std=True, ddof=1)
    first = jnp.arange(rewards.shape[1])[None, :] == 0
    sft_rows = (modes[:, None] == MEMORIZE) & first
    advantages = jnp.where(modes[:, None] == EXPLORE, grpo, 0.0)
    advantages = jnp.where(sft_rows, 1.0, advantages)
    return DymeAdvantages(advantages, sft_rows, modes)


# ----------------------------------------------------------------------------------------------
# REINFORCE++ (MAYE): KL folded into token rewards, discounted returns, batch whitening.
# ----------------------------------------------------------------------------------------------


def last_valid_index(mask: jax.Array) -> jax.Array:
    """Index of the last valid token of each row (0 for an empty row). mask `[B, T]` -> int32 `[B]`."""
    positions = jnp.arange(mask.shape[1], dtype=jnp.int32)[None, :]
    return jnp.max(jnp.where(mask.astype(bool), positions, 0), axis=1)


def token_rewards_with_kl(scores: jax.Array, kl: jax.Array, mask: jax.Array, kl_coef: float) -> jax.Array:
    """Token rewards `-kl_coef * kl` on valid tokens, plus the sequence score at the last valid token.

    Args:
      scores: float `[B]` outcome scores.
      kl: float `[B, T]` per-token KL estimate (already clamped if wanted).
      mask: `[B, T]` response mask.
    Returns:
      float32 `[B, T]`, zero on padding (MAYE sets padded log-probs to 1.0 so its KL there is 0).
    """
    mask = mask.astype(jnp.float32)
    rewards = -kl_coef * kl.astype(jnp.float32) * mask
    at_last = jax.nn.one_hot(last_valid_index(mask), mask.shape[1], dtype=jnp.float32)
    return rewards + at_last * scores.astype(jnp.float32)[:, None]


def discounted_returns(rewards: jax.Array, gamma: float) -> jax.Array:
    """Returns `G_t = r_t + gamma * G_{t+1}` along time. rewards `[B, T]` -> float32 `[B, T]`."""

    def step(running, r_t):
        running = r_t + gamma * running
        return running, running

    time_major = rewards.astype(jnp.float32).T
    _, returns = jax.lax.scan(step, jnp.zeros(rewards.shape[0], jnp.float32), time_major, reverse=True)
    return returns.T


def masked_whiten(
    values: jax.Array, mask: jax.Array, shift_mean: bool = True, unbiased: bool = True, eps: float = 1e-8
) -> jax.Array:
    """`(x - mean) * rsqrt(var + eps)` with mean/var over valid entries, then `+ mean` if `shift_mean`.

    Mirrors torchtune/TRL `whiten`, which MAYE calls with `shift_mean=True` (the mean is added back,
    so the advantages are not zero-mean) and an unbiased variance (Bessel `n / (n - 1)`). Divergence:
    with a single valid entry MAYE's Bessel factor is 1/0 (NaN advantages); here it is 1.

    Args:
      values: float `[..., T]`; mask: same shape, 1 = valid. All valid entries form one population.
    Returns:
      float32 of the same shape (entries outside the mask are transformed too; callers zero them).
    """
    values = values.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    count = mask.sum()
    mean = (values * mask).sum() / (count + 1e-8)
    var = (jnp.square(values - mean) * mask).sum() / (count + 1e-8)
    if unbiased:
        var = var * count / jnp.maximum(count - 1.0, 1.0)
    whitened = (values - mean) * jax.lax.rsqrt(var + eps)
    return whitened + mean if shift_mean else whitened


class ReinforcePPOutput(NamedTuple):
    """REINFORCE++ outputs, each float32 `[B, T]`, zero on padding."""

    advantages: jax.Array
    returns: jax.Array
    token_rewards: jax.Array
    kl: jax.Array


def reinforce_pp_advantages(
    scores: jax.Array,
    mask: jax.Array,
    logprobs: jax.Array | None = None,
    ref_logprobs: jax.Array | None = None,
    *,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    kl_estimator: str = "k3",
    kl_clamp: float | None = 10.0,
    whiten: bool = True,
    shift_mean: bool = True,
    unbiased: bool = True,
    num_whiten_shards: int = 1,
) -> ReinforcePPOutput:
    """REINFORCE++ as MAYE runs it (`get_rewards_from_ref` then `estimate_advantages`).

    1. Per-token KL of the rollout policy to the reference, k3 by default
       (`exp(ref - logp) - (ref - logp) - 1`), clamped to [-10, 10], zero on padding.
    2. Token rewards `-kl_coef * kl`, plus the score at the last valid token.
    3. Discounted returns with `gamma` (no critic: the advantage is the return).
    4. Whitening over all valid tokens of the batch, mean added back (`shift_mean`, MAYE's quirk),
       unbiased variance; padding set to 0. MAYE's `whiten_rewards` flag is never read, so it always
       whitens: `whiten=False` is an extension. Long responses weigh more in the statistics because
       they have more tokens.

    MAYE whitens per rank (each GPU's local 128 queries); `num_whiten_shards=k` reproduces that by
    whitening k contiguous row blocks separately; 1 whitens the global batch.

    Args:
      scores: float `[B]` outcome scores (penalties already applied).
      mask: `[B, T]` response mask.
      logprobs, ref_logprobs: float `[B, T]` rollout and reference log-probs; may be None when
        `kl_coef == 0` (MAYE's paper setting).
    Returns:
      ReinforcePPOutput (advantages, returns, token_rewards, kl), each float32 `[B, T]`.
    """
    _check_rank("mask", mask, 2, "[B, T]")
    _check_rank("scores", scores, 1, "[B]")
    if scores.shape[0] != mask.shape[0]:
        raise ValueError(f"`scores` has {scores.shape[0]} rows but `mask` has {mask.shape[0]}")
    if mask.shape[0] % num_whiten_shards:
        raise ValueError(f"`num_whiten_shards`={num_whiten_shards} must divide the batch size {mask.shape[0]}")
    fmask = mask.astype(jnp.float32)
    if logprobs is None or ref_logprobs is None:
        if kl_coef != 0.0:
            raise ValueError("`logprobs` and `ref_logprobs` are required when `kl_coef` != 0")
        kl = jnp.zeros_like(fmask)
    else:
        for name, x in (("logprobs", logprobs), ("ref_logprobs", ref_logprobs)):
            if x.shape != mask.shape:
                raise ValueError(f"`{name}` must have the mask's shape {tuple(mask.shape)}; got {tuple(x.shape)}")
        kl = kl_per_token(logprobs, ref_logprobs, kl_estimator, kl_clamp) * fmask

    token_rewards = token_rewards_with_kl(scores, kl, fmask, kl_coef)
    returns = discounted_returns(token_rewards, gamma)
    if whiten:
        shard = lambda x: x.reshape(num_whiten_shards, -1, x.shape[1])  # noqa: E731
        whitened = jax.vmap(lambda v, m: masked_whiten(v, m, shift_mean, unbiased))(shard(returns), shard(fmask))
        advantages = whitened.reshape(returns.shape)
    else:
        advantages = returns
    return ReinforcePPOutput(advantages * fmask, returns * fmask, token_rewards, kl)
