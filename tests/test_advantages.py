"""Advantage estimators against hand-worked cases and independent NumPy loops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vrl_jax.rl import advantages as adv


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- GRPO / Dr.GRPO / RLOO


def test_grpo_hand_case_and_all_correct_group_is_zero():
    rewards = jnp.array([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    a = np.asarray(adv.grpo_advantages(rewards, eps=0.0 + 1e-12))
    # group 2: mean 1/4, unbiased std sqrt((9/16 + 3/16) / 3) = 1/2
    np.testing.assert_allclose(a[1], [1.5, -0.5, -0.5, -0.5], rtol=1e-6)
    assert np.all(a[0] == 0.0) and np.all(a[2] == 0.0)


@pytest.mark.parametrize("normalize_std, ddof", [(True, 1), (True, 0), (False, 1)])
def test_grpo_matches_numpy(normalize_std, ddof):
    r = _rng().normal(size=(5, 8)).astype(np.float32)
    got = adv.grpo_advantages(jnp.asarray(r), eps=1e-4, normalize_std=normalize_std, ddof=ddof)
    want = np.empty_like(r)
    for g in range(r.shape[0]):
        centred = r[g] - r[g].mean()
        want[g] = centred / (r[g].std(ddof=ddof) + 1e-4) if normalize_std else centred
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_rloo_hand_case_and_numpy():
    a = np.asarray(adv.rloo_advantages(jnp.array([[1.0, 0.0, 0.0, 1.0]])))
    np.testing.assert_allclose(a[0], [2 / 3, -2 / 3, -2 / 3, 2 / 3], rtol=1e-6)
    r = _rng(1).normal(size=(3, 5)).astype(np.float32)
    want = np.array([[r[g, i] - np.delete(r[g], i).mean() for i in range(5)] for g in range(3)])
    np.testing.assert_allclose(adv.rloo_advantages(jnp.asarray(r)), want, rtol=1e-5, atol=1e-6)


def test_single_rollout_groups_are_rejected():
    with pytest.raises(ValueError, match="n>=|n >= 2"):
        adv.grpo_advantages(jnp.ones((4, 1)))
    with pytest.raises(ValueError, match=r"\[groups, n\]"):
        adv.rloo_advantages(jnp.ones((4,)))


def test_group_stats():
    rewards = jnp.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0]])
    stats = adv.group_stats(rewards)
    np.testing.assert_array_equal(stats["zero_std"], [True, True, False])
    np.testing.assert_allclose(stats["frac_zero_std"], 2 / 3, rtol=1e-6)
    np.testing.assert_allclose(stats["mean"], [1.0, 0.0, 2 / 3], rtol=1e-6)
    np.testing.assert_allclose(stats["std"], [0.0, 0.0, np.std([1, 0, 1], ddof=1)], rtol=1e-6)


# ---------------------------------------------------------------- DyME


def test_dyme_modes_use_strict_half_threshold():
    correct = jnp.array(
        [[0.0, 0.0, 0.0], [1.0, 0.0, 0.4], [1.0, 1.0, 1.0], [0.6, 0.9, 0.51], [0.5, 0.5, 0.5]]
    )
    np.testing.assert_array_equal(adv.dyme_modes(correct), [0, 1, 2, 2, 0])
    assert adv.dyme_modes(correct).dtype == jnp.int32
    np.testing.assert_array_equal(adv.dyme_modes(jnp.array([[True, False], [False, False]])), [1, 0])


def test_dyme_advantages_per_mode():
    rewards = jnp.array([[0.5, 0.2, 0.1, 0.0], [2.0, 1.0, 1.0, 0.0], [3.0, 2.0, 2.5, 3.0]])
    correct = jnp.array([[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], jnp.float32)
    out = adv.dyme_advantages(rewards, correct)
    np.testing.assert_array_equal(out.modes, [0, 1, 2])
    np.testing.assert_array_equal(out.advantages[0], [1.0, 0.0, 0.0, 0.0])  # memorize: SFT row gets +1
    np.testing.assert_array_equal(out.sft_rows, [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    r = np.array([2.0, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(out.advantages[1], (r - r.mean()) / (r.std(ddof=1) + 1e-4), rtol=1e-5)
    np.testing.assert_array_equal(out.advantages[2], 0.0)  # skip, though the rewards differ


# ---------------------------------------------------------------- REINFORCE++ (MAYE)


def _maye_reference(scores, logp, ref, mask, kl_coef, gamma, shift_mean, shards, clamp=10.0):
    """Loop-by-loop NumPy transcription of MAYE's documented steps (float64)."""
    b, t = mask.shape
    valid = mask.astype(bool)
    kl = np.where(valid, np.clip(np.exp(ref - logp) - (ref - logp) - 1.0, -clamp, clamp), 0.0)
    rewards = -kl_coef * kl
    for i in range(b):
        last = np.nonzero(valid[i])[0].max() if valid[i].any() else 0
        rewards[i, last] += scores[i]
    returns = np.zeros((b, t))
    for i in range(b):
        running = 0.0
        for j in reversed(range(t)):
            running = rewards[i, j] + gamma * running
            returns[i, j] = running
    out = np.zeros((b, t))
    rows = b // shards
    for s in range(shards):
        sl = slice(s * rows, (s + 1) * rows)
        vals = returns[sl][valid[sl]]
        mean, var = vals.mean(), vals.var(ddof=1)
        w = (returns[sl] - mean) / np.sqrt(var + 1e-8) + (mean if shift_mean else 0.0)
        out[sl] = np.where(valid[sl], w, 0.0)
    return out, returns, kl


def _token_batch(seed, b=6, t=7):
    rng = _rng(seed)
    lengths = rng.integers(1, t + 1, size=b)
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
    logp = -rng.uniform(0.05, 3.0, size=(b, t)).astype(np.float32)
    ref = (logp + rng.normal(scale=0.5, size=(b, t))).astype(np.float32)
    scores = rng.choice([1.0, 0.0, -0.1], size=b).astype(np.float32)
    return scores, logp, ref, mask


def test_reinforce_pp_hand_case():
    # gamma 1, no KL: every valid token's return is its score; whitening over 4 tokens [1, 0, 0, 0]
    # gives mean 1/4, unbiased std 1/2, so (1 - 1/4)/(1/2) + 1/4 = 1.75 and -1/2 + 1/4 = -0.25.
    out = adv.reinforce_pp_advantages(jnp.array([1.0, 0.0]), jnp.array([[1, 0, 0], [1, 1, 1]]))
    np.testing.assert_allclose(out.advantages, [[1.75, 0, 0], [-0.25, -0.25, -0.25]], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out.returns, [[1, 0, 0], [0, 0, 0]])
    no_shift = adv.reinforce_pp_advantages(jnp.array([1.0, 0.0]), jnp.array([[1, 0, 0], [1, 1, 1]]), shift_mean=False)
    np.testing.assert_allclose(no_shift.advantages, [[1.5, 0, 0], [-0.5, -0.5, -0.5]], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shift_mean, shards", [(True, 1), (False, 1), (True, 2)])
def test_reinforce_pp_matches_numpy(shift_mean, shards):
    scores, logp, ref, mask = _token_batch(3)
    fn = jax.jit(
        adv.reinforce_pp_advantages,
        static_argnames=("kl_coef", "gamma", "shift_mean", "num_whiten_shards"),
    )
    out = fn(scores, mask, logp, ref, kl_coef=0.05, gamma=0.9, shift_mean=shift_mean, num_whiten_shards=shards)
    want, returns, kl = _maye_reference(
        scores.astype(np.float64), logp.astype(np.float64), ref.astype(np.float64), mask, 0.05, 0.9, shift_mean, shards
    )
    np.testing.assert_allclose(out.kl, kl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.returns, returns, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.advantages, want, rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(out.advantages)[mask == 0] == 0)


def test_reinforce_pp_kl_clamp_and_no_whiten():
    mask = jnp.ones((1, 2))
    logp, ref = jnp.array([[-20.0, -1.0]]), jnp.array([[-1.0, -1.0]])  # k3 at token 0 is ~e^19: clamped
    out = adv.reinforce_pp_advantages(jnp.array([1.0]), mask, logp, ref, kl_coef=0.5, whiten=False)
    np.testing.assert_allclose(out.kl, [[10.0, 0.0]])
    np.testing.assert_allclose(out.token_rewards, [[-5.0, 1.0]])
    np.testing.assert_allclose(out.advantages, [[-4.0, 1.0]])  # gamma 1: return-to-go


def test_reinforce_pp_errors():
    with pytest.raises(ValueError, match="kl_coef"):
        adv.reinforce_pp_advantages(jnp.ones(2), jnp.ones((2, 3)), kl_coef=0.1)
    with pytest.raises(ValueError, match="num_whiten_shards"):
        adv.reinforce_pp_advantages(jnp.ones(3), jnp.ones((3, 3)), num_whiten_shards=2)
    with pytest.raises(ValueError, match="logprobs"):
        adv.reinforce_pp_advantages(jnp.ones(2), jnp.ones((2, 3)), jnp.ones((2, 4)), jnp.ones((2, 4)), kl_coef=0.1)
