"""Credit assignment as the trainer calls it (`rl/algorithms.py`): REINFORCE++'s KL reward and per-process
whitening, the metrics built from it, and DAPO's dynamic-sampling filter and batch filling."""
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_advantages import _maye_reference, _token_batch
from vrl_jax.evaluation.metrics import step_metrics
from vrl_jax.rl import algorithms as A
from vrl_jax.rl.losses import aggregate


def _reinforce_pp(shards=1, coef=0.05):
    scores, logp, ref, mask = _token_batch(3)
    cfg = A.CreditConfig("reinforce_pp", "reinforce_pp", 1, kl_reward_coef=coef, gamma=0.9, num_whiten_shards=shards)
    return scores, logp, ref, mask, A.credit(cfg, scores, scores == 1.0, response_mask=mask, logprobs=logp,
                                             ref_logprobs=ref)


def test_reinforce_pp_kl_reward_is_logged_as_mayes_rews_kl_reward():
    scores, logp, ref, mask, cred = _reinforce_pp()
    _, _, kl = _maye_reference(scores.astype(np.float64), logp.astype(np.float64), ref.astype(np.float64), mask,
                               0.05, 0.9, True, 1)
    want = -0.05 * kl.sum(1)  # MAYE: kl_rewards.sum(1), kl_rewards = -coef * clamp(k3)
    np.testing.assert_allclose(cred.kl_reward, want, rtol=1e-5)
    assert "health/kl_reward" not in cred.stats  # the KL is not a reward
    m = step_metrics(rewards={"total": scores, "accuracy": scores}, response_lengths=mask.sum(1), max_tokens=7,
                     kl_reward=cred.kl_reward, kl_per_sequence=kl.sum(1))
    assert m["rews/kl_reward"] == pytest.approx(want.mean(), rel=1e-5) and m["rews/kl_reward"] < 0
    assert m["rews/rlhf_reward"] == pytest.approx(scores.mean() + want.mean(), rel=1e-5)
    assert m["training/kl"] == pytest.approx(kl.sum(1).mean(), rel=1e-6)
    # MAYE's paper setting, coefficient 0: the KL reward is exactly 0.
    np.testing.assert_array_equal(_reinforce_pp(coef=0.0)[-1].kl_reward, 0.0)


def test_reinforce_pp_whitening_per_process_block_is_reachable():
    scores, logp, ref, mask, two = _reinforce_pp(shards=2)
    want, _, _ = _maye_reference(scores.astype(np.float64), logp.astype(np.float64), ref.astype(np.float64), mask,
                                 0.05, 0.9, True, 2)
    np.testing.assert_allclose(two.advantages, want, rtol=1e-4, atol=1e-5)
    one = _reinforce_pp(shards=1)[-1]
    assert np.abs(np.asarray(one.advantages) - np.asarray(two.advantages)).max() > 1e-3
    with pytest.raises(ValueError, match="num_whiten_shards=4 .* 6 rows"):
        _reinforce_pp(shards=4)


def test_group_estimators_and_unknown_name():
    total = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    a = A.credit(A.CreditConfig("grpo", "drgrpo", 3), total, total).advantages
    np.testing.assert_allclose(a, [2 / 3, -1 / 3, -1 / 3, 0, 0, 0], rtol=1e-6)
    assert A.credit(A.CreditConfig("grpo", "rloo", 3), total, total).kl_reward is None
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        A.credit(A.CreditConfig("grpo", "ppo", 3), total, total)


# ---- DAPO's dynamic sampling -------------------------------------------------------------------------


def test_dynamic_sampling_filters_on_accuracy_not_the_shaped_total():
    acc = np.array([0, 0, 0,  1, 0, 1,  1, 1, 1,  0, 0, 0], np.float32)
    fmt = np.array([1, 0, 1,  1, 1, 1,  1, 1, 1,  1, 1, 1], np.float32)  # group 0: all wrong, formats vary
    rewards = {"accuracy": acc, "format": fmt, "total": acc + fmt}
    np.testing.assert_array_equal(A.dynamic_sampling_keep(rewards, 3), [False, True, False, False])
    np.testing.assert_array_equal(A.dynamic_sampling_keep(rewards, 3, on="total"), [True, True, False, False])
    np.testing.assert_array_equal(A.dynamic_sampling_keep(rewards, 3, valid=[True, False, True, True]),
                                  [False, False, False, False])
    with pytest.raises(ValueError, match="'thinking'.*available"):
        A.dynamic_sampling_keep(rewards, 3, on="thinking")


def test_filler_groups_count_in_no_denominator():
    kept, dropped = [("b0", 1), ("b1", 0)], [("b0", 0), ("b0", 2), ("b1", 3)]
    choice = A.choose_groups(kept, dropped, 4)
    assert choice.chosen == [("b0", 1), ("b1", 0), ("b0", 0), ("b0", 2)]
    np.testing.assert_array_equal(choice.filler, [False, False, True, True])
    assert A.choose_groups(kept + dropped, [], 2).chosen == kept  # enough informative groups: no filler
    # 4 groups x 2 rows; the two filler groups' rows have zero advantage. Refilled with live masks
    # they dilute the token-mean loss; masked with `filler_row_mask` the loss is that of the kept groups.
    rng = np.random.default_rng(0)
    per_token = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32) * jnp.repeat(jnp.array([1.0, 1, 0, 0]), 2)[:, None]
    mask = jnp.ones((8, 5))
    masked = mask * A.filler_row_mask(choice.filler, 2)[:, None]
    for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        kept_only = aggregate(per_token[:4], mask[:4], mode, max_len=5).value()
        np.testing.assert_allclose(aggregate(per_token, masked, mode, max_len=5).value(), kept_only, rtol=1e-6)
        np.testing.assert_allclose(aggregate(per_token, mask, mode, max_len=5).value(), kept_only / 2, rtol=1e-6)
