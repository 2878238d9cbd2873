"""From rewards to what the update needs: per-token advantages, SFT rows, and the group statistics.

One function per algorithm family, all host-side on small arrays (the math itself is in
`advantages.py`). Rows are prompt-major: rewards of prompt g are rows g*n .. g*n + n - 1.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from vrl_jax.rl import advantages as adv


class Credit(NamedTuple):
    """advantages: float [R] (sequence level) or [R, N] (token level, over the response);
    sft_rows: bool [R] rows whose response is replaced by the reference and trained with NLL;
    modes: int [G] DyME modes (0 memorize, 1 explore, 2 skip) or None; stats: logged scalars
    (group health and mode shares are derived from rewards and modes by `evaluation.metrics`)."""

    advantages: np.ndarray
    sft_rows: np.ndarray
    modes: np.ndarray | None
    stats: dict


def credit(algorithm: str, estimator: str, total, correct, num_samples: int, *, eps: float = 1e-6,
           response_mask=None, logprobs=None, ref_logprobs=None, gamma: float = 1.0, kl_reward_coef: float = 0.0,
           whiten: bool = True, shift_mean: bool = True) -> Credit:
    """total: float [R] summed rewards; correct: float [R] accuracy rewards (1 = right).
    REINFORCE++ also takes response_mask, logprobs, ref_logprobs [R, N] (the KL folded into the reward)."""
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
        out = adv.reinforce_pp_advantages(
            total, np.asarray(response_mask, np.float32), logprobs, ref_logprobs, kl_coef=kl_reward_coef,
            gamma=gamma, whiten=whiten, shift_mean=shift_mean)
        if kl_reward_coef:
            stats["health/kl_reward"] = float(np.asarray(out.kl).sum(-1).mean())
        return Credit(np.asarray(out.advantages), no_sft, None, stats)
    grouped = total.reshape(-1, num_samples)
    if estimator == "grpo":
        a = adv.grpo_advantages(grouped, eps=eps)
    elif estimator == "drgrpo":
        a = adv.grpo_advantages(grouped, eps=eps, normalize_std=False)
    elif estimator == "rloo":
        a = adv.rloo_advantages(grouped)
    else:
        raise ValueError(f"unknown advantage estimator {estimator!r}")
    return Credit(np.asarray(a).reshape(-1), no_sft, None, stats)


def zero_variance_groups(total, num_samples: int) -> np.ndarray:
    """bool [G]: groups whose rewards are all equal (DAPO's dynamic sampling drops them)."""
    g = np.asarray(total, np.float32).reshape(-1, num_samples)
    return np.all(g == g[:, :1], axis=1)
