"""From rewards to what the update needs: per-token advantages, SFT rows, and the group statistics.

One function per algorithm family, all host-side on small arrays (the math itself is in
`advantages.py`). Rows are prompt-major: rewards of prompt g are rows g*n .. g*n + n - 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from vrl_jax.rl import advantages as adv


class Credit(NamedTuple):
    """advantages: float [R] (sequence level) or [R, N] (token level, over the response);
    sft_rows: bool [R] rows whose response is replaced by the reference and trained with NLL;
    modes: int [G] DyME modes (0 memorize, 1 explore, 2 skip) or None; stats: logged scalars
    (group health and mode shares are derived from rewards and modes by `evaluation.metrics`);
    kl_reward: float [R] per-sequence sum of REINFORCE++'s token KL reward `-kl_reward_coef * k3`
    (MAYE's `rews/kl_reward` is its mean; zeros when the coefficient is 0), None for other estimators."""

    advantages: np.ndarray
    sft_rows: np.ndarray
    modes: np.ndarray | None
    stats: dict
    kl_reward: np.ndarray | None = None


# Group-relative estimators: float [G, n] rewards -> advantages [G, n].
GROUP_ESTIMATORS = {
    "grpo": lambda grouped, eps: adv.grpo_advantages(grouped, eps=eps),
    "drgrpo": lambda grouped, eps: adv.grpo_advantages(grouped, eps=eps, normalize_std=False),
    "rloo": lambda grouped, eps: adv.rloo_advantages(grouped),
}


@dataclasses.dataclass(frozen=True)
class CreditConfig:
    """How a run turns rewards into credit; fixed for the run (the trainer builds it from `advantage.*`).

    algorithm: "dyme" (per-group memorize/explore modes) or any other (an advantage estimator);
    estimator: a `GROUP_ESTIMATORS` name or "reinforce_pp"; num_samples: rollouts per prompt;
    eps: the group estimators' std epsilon. REINFORCE++ only: gamma (discount), kl_reward_coef (the KL
    folded into the token rewards), whiten and shift_mean (its advantage whitening), and num_whiten_shards:
    whiten k contiguous blocks of the rows separately (MAYE whitens per GPU, 128 prompts each:
    k = rows / 128); 1 whitens all of them together.
    """

    algorithm: str
    estimator: str
    num_samples: int
    eps: float = 1e-6
    gamma: float = 1.0
    kl_reward_coef: float = 0.0
    whiten: bool = True
    shift_mean: bool = True
    num_whiten_shards: int = 1


def credit(cfg: CreditConfig, total, correct, *, response_mask=None, logprobs=None, ref_logprobs=None) -> Credit:
    """total: float [R] summed rewards; correct: float [R] accuracy rewards (1 = right); R = G * num_samples,
    prompt-major. REINFORCE++ also takes response_mask, logprobs, ref_logprobs [R, N] (the KL folded into
    the reward)."""
    algorithm, estimator, num_samples = cfg.algorithm, cfg.estimator, cfg.num_samples
    num_whiten_shards, kl_reward_coef = cfg.num_whiten_shards, cfg.kl_reward_coef
    total = np.asarray(total, np.float32)
    correct = np.asarray(correct, np.float32)
    rows = len(total)
    stats: dict = {}
    no_sft = np.zeros(rows, bool)
    if algorithm == "dyme":
        d = adv.dyme_advantages(total.reshape(-1, num_samples), correct.reshape(-1, num_samples))
        modes = np.asarray(d.modes)
        sft_rows = np.asarray(d.sft_rows).reshape(-1)
        # The SFT rows train through the supervised term (weight 1), not the ratio: advantage 0.
        return Credit(np.where(sft_rows, 0.0, np.asarray(d.advantages).reshape(-1)), sft_rows, modes, stats)
    if estimator == "reinforce_pp":
        if response_mask is None:
            raise ValueError("reinforce_pp needs the response mask")
        if not isinstance(num_whiten_shards, int) or num_whiten_shards < 1 or rows % num_whiten_shards:
            raise ValueError(f"num_whiten_shards={num_whiten_shards!r} must be a positive int dividing the "
                             f"{rows} rows of this process")
        out = adv.reinforce_pp_advantages(
            total, np.asarray(response_mask, np.float32), logprobs, ref_logprobs, kl_coef=kl_reward_coef,
            gamma=cfg.gamma, whiten=cfg.whiten, shift_mean=cfg.shift_mean, num_whiten_shards=num_whiten_shards)
        kl_reward = -kl_reward_coef * np.asarray(out.kl, np.float32).sum(-1)
        return Credit(np.asarray(out.advantages), no_sft, None, stats, kl_reward)
    if estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; expected one of "
                         f"{tuple(GROUP_ESTIMATORS) + ('reinforce_pp',)}")
    a = GROUP_ESTIMATORS[estimator](total.reshape(-1, num_samples), cfg.eps)
    return Credit(np.asarray(a).reshape(-1), no_sft, None, stats)


def zero_variance_groups(total, num_samples: int) -> np.ndarray:
    """bool [G]: groups whose rewards are all equal (DAPO's dynamic sampling drops them)."""
    g = np.asarray(total, np.float32).reshape(-1, num_samples)
    return np.all(g == g[:, :1], axis=1)


# ---- DAPO's dynamic sampling ----------------------------------------------------------------------


def dynamic_sampling_keep(rewards: Mapping[str, Any], num_samples: int, on: str = "accuracy",
                          valid=None) -> np.ndarray:
    """bool [G]: the groups DAPO's dynamic sampling keeps, those whose `rewards[on]` are not all equal.

    DAPO filters on accuracy (`filter_groups.metric = "acc"`: keep a group whose accuracies have
    std > 0, i.e. neither all wrong nor all right); with shaped rewards a total can vary inside a
    group that is all wrong (e.g. a format term), which keeps groups that teach nothing about
    correctness. `on="total"` filters on the summed reward instead.

    rewards: component name -> float [G * n], prompt-major; valid: bool [G] (padding prompts are dropped).
    """
    if on not in rewards:
        raise ValueError(f"dynamic sampling filters on reward {on!r}, which this run does not compute; "
                         f"available: {sorted(rewards)}")
    keep = ~zero_variance_groups(rewards[on], num_samples)
    return keep if valid is None else keep & np.asarray(valid, bool)


class GroupChoice(NamedTuple):
    """chosen: the (round batch, group index) pairs that make up the step, in order, `size` of them
    when enough were sampled; filler: bool [len(chosen)], True where a dropped group fills a slot."""

    chosen: list
    filler: np.ndarray


def choose_groups(kept: Sequence, dropped: Sequence, size: int) -> GroupChoice:
    """The step's groups: kept ones first (up to `size`), then dropped ones to fill the batch's shape.

    Fillers must not train: give their rows an all-zero loss mask (`filler_row_mask`), so they
    count in no denominator. Zero-advantage fillers with live masks would dilute every mean (DAPO
    trains on full batches of informative groups; a token-mean over fewer real groups is the
    closest a fixed batch shape gets when sampling runs out).
    """
    chosen = list(kept[:size])
    fill = list(dropped[:max(size - len(chosen), 0)])
    return GroupChoice(chosen + fill, np.asarray([False] * len(chosen) + [True] * len(fill), bool))


def filler_row_mask(filler, num_samples: int) -> np.ndarray:
    """float [G * n]: 0 for the rows of filler groups, 1 elsewhere (multiply the response mask by it)."""
    return np.repeat(~np.asarray(filler, bool), num_samples).astype(np.float32)
