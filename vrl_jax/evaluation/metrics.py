"""Per-step training metrics under MAYE's names, GRPO health metrics, and checkpointable epoch sums.

`step_metrics` takes one process's raw per-sample arrays and the update's scalars and returns a flat
`{key: float}`. Keys (N = rollouts, G = groups):

MAYE's keys (`recipes/full_ppo_vllm_distributed.py::log_metrics`, verbatim so curves overlay the paper's):
  rews/scores              mean total reward (after overrides/penalties), `rewards["total"]`
  rews/acc_rewards         mean `rewards["accuracy"]`; other components: rews/format_rewards
                           (`maye_format`), rews/language_rewards (`language`), else rews/<name>_rewards
  rews/kl_reward           mean over sequences of sum_t kl_reward, REINFORCE++'s token KL reward
                           `-kl_reward_coef * clamp(k3, 10)` (`algorithms.Credit.kl_reward`; 0 when not given)
  rews/rlhf_reward         rews/scores + rews/kl_reward
  loss/loss, loss/policy_loss   update's `loss`, `pg_loss`
  loss/kl_loss             update's `kl_loss`: the raw KL term (clamped as the loss clamps it), *not*
                           multiplied by the coefficient, as MAYE logs it
  training/kl              mean over sequences of sum_t clamp(k3(ref || old), 10) (`kl_per_sequence`,
                           `losses.sequence_kl`); never negative
  training/clipfrac, training/ratios, training/approx_policy_kl   update's clip_frac, ratio, approx_kl,
                           over the RL tokens (DyME's SFT rows excluded)
  training/entropy         -p log p of the sampled token (update's `sampled_token_entropy`), as MAYE
  training/num_stop_tokens number of sequences that emitted a stop token (a count, as MAYE)
  response/response_lengths  MAYE's `seq_lens`: mean index of the last valid token, i.e. response
                           tokens - 1 (0 for an empty response); response/tokens_mean is the plain mean
  response/length_clip_ratio share with tokens >= max_tokens (= MAYE's seq_lens >= max_tokens - 1)
  training/lr              update's `next_learning_rate`: MAYE reads the rate after the scheduler has
                           stepped past the last update; training/lr_last_update is the rate it used
  training/grad_norm       update's `grad_norm_last`: the pre-clip norm of the step's last update (MAYE
                           keeps the last mini-batch's); training/grad_norm_mean is the mean over updates
  training/temperature
  speed/tokens_per_second_per_gpu_trajectory, speed/tokens_per_second_per_gpu_ppo
                           tokens / phase seconds / devices (MAYE counted prompt tokens only; pass
                           whatever the phase processed, prompt + response)
  generation_steps, gradient_steps
Where MAYE's numbers still differ by construction (not reproduced, they depend on its padding and ranks):
  MAYE's training/ratios and training/approx_policy_kl are plain means over the padded response
  block (padding counts as ratio 1 and approx-kl 0), ours masked means; its loss/* are means of
  per-backward-batch means, ours pooled over the step's micro-batches; its num_stop_tokens misses a
  stopped response exactly as long as its batch's padded width; its per-rank values are averaged,
  ours pooled.
Additions:
  training/full_entropy, training/kl_token_mean, training/clipfrac_low|_high, training/dual_clipfrac,
  training/max_abs_ratio_minus_1_first_update (sampler-trainer gap), loss/sft_loss,
  loss/entropy_bonus          from the update when present; unknown update keys: update/<k>
  response/tokens_mean, response/response_length_max, response/no_stop_ratio
  health/accuracy          mean of `correct`
  health/reward_std        mean over groups of the within-group std (ddof 1) of the total reward
  health/zero_variance_groups  share of groups whose correctness is all equal (advantage collapse)
  health/zero_std_reward_groups share of groups whose total reward is all equal (zero GRPO advantage)
  health/all_correct_groups, health/all_wrong_groups
  dyme/memorize_share, dyme/explore_share, dyme/skip_share   shares of DyME modes over groups
  speed/sample_tokens_per_second, speed/update_tokens_per_second   totals over devices
  time/<phase>             seconds per phase (`timings`): sample, score, reference, credit, update; time/step
                           their sum (compiling inside a phase is also logged apart, as time/compile)
  epoch

Everything here is host-side numpy; call it on the arrays of one step after `jax.device_get`.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from vrl_jax.evaluation.passk import TRAIN_ACCURACY_KEY
from vrl_jax.rl.advantages import EXPLORE, MEMORIZE, SKIP

REWARD_ALIASES = {"total": "scores", "accuracy": "acc", "maye_format": "format", "language": "language"}

UPDATE_KEYS = {
    "loss": "loss/loss",
    "pg_loss": "loss/policy_loss",
    "kl_loss": "loss/kl_loss",
    "sft_loss": "loss/sft_loss",
    "entropy_bonus": "loss/entropy_bonus",
    "ratio": "training/ratios",
    "clip_frac": "training/clipfrac",
    "clip_frac_low": "training/clipfrac_low",
    "clip_frac_high": "training/clipfrac_high",
    "dual_clip_frac": "training/dual_clipfrac",
    "approx_kl": "training/approx_policy_kl",
    "sampled_token_entropy": "training/entropy",
    "entropy": "training/full_entropy",
    "kl": "training/kl_token_mean",
    "max_abs_ratio_minus_1_first_update": "training/max_abs_ratio_minus_1_first_update",
    "next_learning_rate": "training/lr",
    "learning_rate": "training/lr_last_update",
    "grad_norm_last": "training/grad_norm",
    "grad_norm": "training/grad_norm_mean",
}
DYME_MODE_NAMES = {MEMORIZE: "memorize", EXPLORE: "explore", SKIP: "skip"}


def to_float(value: Any) -> float:
    """A float from a Python/numpy/jax scalar, a `SumCount`-like (`total`/`count`, 0 when count is 0),
    or an array of per-minibatch values (their mean; SumCounts stacked over minibatches are pooled)."""
    if hasattr(value, "total") and hasattr(value, "count"):
        total = float(np.sum(np.asarray(value.total, dtype=np.float64)))
        count = float(np.sum(np.asarray(value.count, dtype=np.float64)))
        return total / count if count > 0 else 0.0
    arr = np.asarray(value, dtype=np.float64)
    return float(arr) if arr.ndim == 0 else float(arr.mean())


def _vector(name: str, x: Any, n: int | None = None) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"`{name}` must be a 1-D per-sample array; got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"`{name}` has {arr.shape[0]} entries; expected {n}, one per rollout")
    return arr


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x, dtype=np.float64)) if x.size else 0.0


def _group_metrics(total: np.ndarray, correct: np.ndarray, group_size: int) -> dict[str, float]:
    if total.size % group_size:
        raise ValueError(f"{total.size} rollouts do not split into groups of {group_size}")
    tot = total.reshape(-1, group_size).astype(np.float64)
    ok = correct.reshape(-1, group_size)
    n_ok = ok.sum(axis=1)
    return {
        "health/reward_std": _mean(tot.std(axis=1, ddof=1)),
        "health/zero_variance_groups": _mean((n_ok == 0) | (n_ok == group_size)),
        "health/zero_std_reward_groups": _mean(tot.max(axis=1) == tot.min(axis=1)),
        "health/all_correct_groups": _mean(n_ok == group_size),
        "health/all_wrong_groups": _mean(n_ok == 0),
    }


def step_metrics(
    *,
    rewards: Mapping[str, Any],
    response_lengths: Any,
    max_tokens: int,
    correct: Any | None = None,
    stopped: Any | None = None,
    group_size: int | None = None,
    modes: Any | None = None,
    kl_per_sequence: Any | None = None,
    kl_reward: Any | None = None,
    update: Mapping[str, Any] | None = None,
    lr: Any | None = None,
    grad_norm: Any | None = None,
    temperature: float | None = None,
    timings: Mapping[str, float] | None = None,
    rollout_tokens: int | None = None,
    update_tokens: int | None = None,
    num_devices: int = 1,
    generation_step: int | None = None,
    gradient_step: int | None = None,
    epoch: int | None = None,
) -> dict[str, float]:
    """Metrics of one generation step (see the module docstring for every key).

    Args:
      rewards: component name -> float `[N]` (a `RewardSet` output); must hold "total".
      response_lengths: int `[N]` response tokens per rollout (including the stop token); MAYE's
        response/response_lengths is computed from it (tokens - 1).
      max_tokens: the rollout's generation limit.
      correct: bool `[N]`; default `rewards["accuracy"] == 1` (MAYE's rule).
      stopped: bool `[N]`, True where the rollout emitted a stop token.
      group_size: rollouts per prompt, laid out contiguously (`[G * n]` = row-major `[G, n]`);
        None or 1 skips the group metrics.
      modes: int `[G]` DyME modes (`vrl_jax.rl.advantages.MEMORIZE/EXPLORE/SKIP`).
      kl_per_sequence: float `[N]`, sum over tokens of clamp(k3(ref || old), 10) (MAYE's training/kl;
        `losses.sequence_kl`).
      kl_reward: float `[N]`, sum over tokens of the KL reward (`algorithms.Credit.kl_reward`).
      update: policy-update scalars by `policy_objective`'s and `train_step`'s names (floats, arrays
        stacked over minibatches, or SumCounts).
      lr, grad_norm: override training/lr and training/grad_norm (else taken from `update`).
      timings: phase name -> seconds; "rollout" and "update" feed the tokens/s keys.
      rollout_tokens, update_tokens: tokens processed in those phases on all devices.
      num_devices: devices the tokens were spread over (for the per-GPU keys).
    Returns:
      dict of floats.
    """
    if "total" not in rewards:
        raise KeyError(f"`rewards` must include 'total' (got {sorted(rewards)})")
    total = _vector("rewards['total']", rewards["total"]).astype(np.float64)
    n = total.shape[0]
    out: dict[str, float] = {}
    for name, values in rewards.items():
        out[f"rews/{REWARD_ALIASES.get(name, name)}" + ("" if name == "total" else "_rewards")] = _mean(
            _vector(f"rewards[{name!r}]", values, n).astype(np.float64))
    kl_rew = 0.0 if kl_reward is None else _mean(_vector("kl_reward", kl_reward, n).astype(np.float64))
    out["rews/kl_reward"] = kl_rew
    out["rews/rlhf_reward"] = out["rews/scores"] + kl_rew

    if correct is None:
        if "accuracy" not in rewards:
            raise KeyError("pass `correct` or include an 'accuracy' reward")
        correct = np.asarray(rewards["accuracy"]) == 1
    ok = _vector("correct", correct, n).astype(bool)
    out["health/accuracy"] = _mean(ok)

    lengths = _vector("response_lengths", response_lengths, n).astype(np.float64)
    out["response/response_lengths"] = _mean(np.maximum(lengths - 1, 0))  # MAYE: last valid index
    out["response/tokens_mean"] = _mean(lengths)
    out["response/response_length_max"] = float(lengths.max()) if n else 0.0
    out["response/length_clip_ratio"] = _mean(lengths >= max_tokens)
    if stopped is not None:
        stop = _vector("stopped", stopped, n).astype(bool)
        out["training/num_stop_tokens"] = float(stop.sum())
        out["response/no_stop_ratio"] = _mean(~stop)
    if kl_per_sequence is not None:
        out["training/kl"] = _mean(_vector("kl_per_sequence", kl_per_sequence, n).astype(np.float64))

    if group_size is not None and group_size > 1:
        out.update(_group_metrics(total, ok, group_size))
    if modes is not None:
        m = _vector("modes", modes)
        for code, mode in DYME_MODE_NAMES.items():
            out[f"dyme/{mode}_share"] = _mean(m == code)

    for name, value in (update or {}).items():
        out[UPDATE_KEYS.get(name, f"update/{name}")] = to_float(value)
    for key, value in (("training/lr", lr), ("training/grad_norm", grad_norm),
                       ("training/temperature", temperature)):
        if value is not None:
            out[key] = to_float(value)

    if timings:
        for phase, seconds in timings.items():
            out[f"time/{phase}"] = float(seconds)
        out["time/step"] = float(sum(timings.values()))
    for phase, tokens, maye_key in (("sample", rollout_tokens, "trajectory"), ("update", update_tokens, "ppo")):
        seconds = (timings or {}).get(phase)
        if tokens is not None and seconds:
            out[f"speed/{phase}_tokens_per_second"] = tokens / seconds
            out[f"speed/tokens_per_second_per_gpu_{maye_key}"] = tokens / seconds / num_devices
    for key, value in (("generation_steps", generation_step), ("gradient_steps", gradient_step),
                       ("epoch", epoch)):
        if value is not None:
            out[key] = float(value)
    return out


# ---- Epoch accumulators ---------------------------------------------------------------------------


class EpochAccumulator(NamedTuple):
    """Running sums of one epoch, as a pytree of numpy scalars (int64 counts, float64 sums).

    MAYE keeps its train-accuracy counters in local variables, so a preempted epoch loses them; this
    is meant to live in the checkpointed train state (`to_dict` / `from_dict`). The key set is fixed
    at `create` so a freshly created accumulator is a valid restore target. To pool processes, sum
    the leaves of their gathered dicts (`jax.tree.map(lambda x: x.sum(0), gathered)`) or `merge`.

    Fields:
      correct: int64 scalar, rollouts with a correct answer this epoch.
      samples: int64 scalar, rollouts this epoch.
      sums: {key: float64 scalar}, running sums of per-step values.
      counts: {key: float64 scalar}, their weights (samples or steps).
    """

    correct: np.ndarray
    samples: np.ndarray
    sums: dict
    counts: dict

    @classmethod
    def create(cls, keys: Sequence[str] = ()) -> "EpochAccumulator":
        return cls(np.int64(0), np.int64(0), {k: np.float64(0.0) for k in keys},
                   {k: np.float64(0.0) for k in keys})

    def update(self, correct: Any | None = None, values: Mapping[str, Any] | None = None,
               weight: float = 1.0) -> "EpochAccumulator":
        """New accumulator with one step added.

        Args:
          correct: bool `[N]` (or accuracy rewards, correct where == 1) of this step's rollouts.
          values: key -> scalar (added with `weight`) or per-sample array `[N]` (each element weight 1).
        """
        acc, seen = self.correct, self.samples
        if correct is not None:
            arr = np.asarray(correct).reshape(-1)
            ok = arr if arr.dtype == bool else arr == 1
            acc, seen = np.int64(acc + ok.sum()), np.int64(seen + ok.size)
        sums, counts = dict(self.sums), dict(self.counts)
        for key, value in (values or {}).items():
            if key not in sums:
                raise KeyError(f"EpochAccumulator has no key {key!r}; declare it in create() (keys: {sorted(sums)})")
            arr = np.asarray(value, dtype=np.float64)
            if arr.ndim == 0:
                sums[key] = np.float64(sums[key] + weight * arr)
                counts[key] = np.float64(counts[key] + weight)
            else:
                sums[key] = np.float64(sums[key] + arr.sum())
                counts[key] = np.float64(counts[key] + arr.size)
        return EpochAccumulator(acc, seen, sums, counts)

    def merge(self, other: "EpochAccumulator") -> "EpochAccumulator":
        """Pool two accumulators (e.g. two processes): counts and sums add."""
        if set(self.sums) != set(other.sums):
            raise ValueError("cannot merge EpochAccumulators with different keys")
        return EpochAccumulator(np.int64(self.correct + other.correct), np.int64(self.samples + other.samples),
                                {k: np.float64(v + other.sums[k]) for k, v in self.sums.items()},
                                {k: np.float64(v + other.counts[k]) for k, v in self.counts.items()})

    def result(self) -> dict[str, float]:
        """`acc/Training Set Epoch Accuracy` (correct / samples), `epoch_mean/<key>` per key, and
        `epoch/samples`; 0 for anything with nothing counted."""
        out = {TRAIN_ACCURACY_KEY: float(self.correct) / float(self.samples) if self.samples else 0.0,
               "epoch/samples": float(self.samples)}
        for key, total in self.sums.items():
            count = float(self.counts[key])
            out[f"epoch_mean/{key}"] = float(total) / count if count else 0.0
        return out

    def reset(self) -> "EpochAccumulator":
        """Zeros with the same keys (call at the start of every epoch)."""
        return EpochAccumulator.create(tuple(self.sums))

    def to_dict(self) -> dict:
        """A plain nested dict of numpy scalars, for checkpoints."""
        return {"correct": np.int64(self.correct), "samples": np.int64(self.samples),
                "sums": dict(self.sums), "counts": dict(self.counts)}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> "EpochAccumulator":
        """Inverse of `to_dict` (also accepts what a checkpointer restores: 0-d arrays, jax arrays)."""
        if set(state.get("sums", {})) != set(state.get("counts", {})):
            raise ValueError("EpochAccumulator state: `sums` and `counts` must have the same keys")
        return cls(np.int64(np.asarray(state["correct"])), np.int64(np.asarray(state["samples"])),
                   {k: np.float64(np.asarray(v)) for k, v in state["sums"].items()},
                   {k: np.float64(np.asarray(v)) for k, v in state["counts"].items()})
