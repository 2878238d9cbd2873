"""Losses: hand-checked clipping, NumPy references, exact micro-batch accumulation, chunked vocab math."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vrl_jax.rl import losses as L

MODES = L.AGG_MODES
MAX_LEN = 9


def _batch(seed=0, b=6, t=7):
    """Random log-probs and advantages; row 4 is an all-padding row, lengths otherwise vary."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, t + 1, size=b)
    lengths[4] = 0
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
    old = -rng.uniform(0.1, 2.0, size=(b, t)).astype(np.float32)
    logp = (old + rng.normal(scale=0.3, size=(b, t))).astype(np.float32)
    ref = (old + rng.normal(scale=0.3, size=(b, t))).astype(np.float32)
    advantages = rng.normal(size=(b,)).astype(np.float32)
    return logp, old, ref, advantages, mask


def _np_aggregate(x, mask, mode):
    rows = [i for i in range(mask.shape[0]) if mask[i].sum() > 0]
    if mode == "token_mean":
        return (x * mask).sum() / mask.sum()
    if mode == "seq_mean_token_mean":
        return np.mean([(x[i] * mask[i]).sum() / mask[i].sum() for i in rows])
    return (x * mask).sum() / (len(rows) * MAX_LEN)


# ---------------------------------------------------------------- aggregation


def test_aggregate_hand_case():
    x = jnp.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    m = jnp.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert L.aggregate(x, m, "token_mean").value() == pytest.approx(10 / 4)
    assert L.aggregate(x, m, "seq_mean_token_mean").value() == pytest.approx((2 + 4) / 2)
    parts = L.aggregate(x, m, "seq_mean_token_sum_norm", max_len=5)
    assert (float(parts.total), float(parts.count)) == (10.0, 10.0)
    assert float(L.SumCount(jnp.float32(3.0), jnp.float32(0.0)).value()) == 0.0


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_sum_to_full_batch_value_and_gradient(mode):
    logp, old, ref, advantages, mask = _batch(1)
    cfg = L.PolicyLossConfig(clip_low=0.2, clip_high=0.28, agg_mode=mode, max_len=MAX_LEN, kl_coef=0.1)

    def total(lp, old_, adv_, mask_, ref_):
        loss, _ = L.policy_objective(cfg, lp, old_, adv_, mask_, ref_logprobs=ref_)
        return loss.total, loss

    step = jax.jit(jax.value_and_grad(total, has_aux=True))
    rows = lambda sl: tuple(jnp.asarray(x[sl]) for x in (logp, old, advantages, mask, ref))  # noqa: E731
    (_, full_loss), full_grad = step(*rows(slice(0, 6)))
    grad_full_value = jax.jit(jax.grad(lambda *a: total(*a)[1].value()))(*rows(slice(0, 6)))

    acc, grads = L.SumCount(jnp.float32(0.0), jnp.float32(0.0)), []
    for sl in (slice(0, 2), slice(2, 3), slice(3, 6)):
        (_, part), g = step(*rows(sl))
        acc, grads = acc.plus(part), grads + [g]
    np.testing.assert_allclose(acc.value(), full_loss.value(), rtol=1e-6)
    np.testing.assert_allclose(np.concatenate(grads) / acc.count, grad_full_value, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(full_grad / full_loss.count, grad_full_value, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("mode", MODES)
def test_policy_objective_matches_numpy(mode):
    logp, old, ref, advantages, mask = _batch(2)
    cfg = L.PolicyLossConfig(clip_low=0.2, clip_high=0.28, clip_c=3.0, agg_mode=mode, max_len=MAX_LEN, kl_coef=0.05)
    loss, metrics = jax.jit(L.policy_objective, static_argnums=0)(cfg, logp, old, advantages, mask, ref_logprobs=ref)
    ratio = np.exp(logp - old)
    a = np.broadcast_to(advantages[:, None], ratio.shape)
    pg = np.maximum(-a * ratio, -a * np.clip(ratio, 0.8, 1.28))
    pg = np.where(a < 0, np.minimum(pg, -a * 3.0), pg)
    d = ref - logp
    k3 = np.exp(d) - d - 1
    np.testing.assert_allclose(loss.value(), _np_aggregate(pg + 0.05 * k3, mask, mode), rtol=1e-5)
    np.testing.assert_allclose(metrics["pg_loss"].value(), _np_aggregate(pg, mask, mode), rtol=1e-5)
    np.testing.assert_allclose(metrics["ratio"].value(), (ratio * mask).sum() / mask.sum(), rtol=1e-5)
    approx = (0.5 * (logp - old) ** 2 * mask).sum() / mask.sum()
    np.testing.assert_allclose(metrics["approx_kl"].value(), approx, rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"].value(), (k3 * mask).sum() / mask.sum(), rtol=1e-5)


# ---------------------------------------------------------------- clipping


def test_clip_boundaries_and_gradients():
    # ratios exactly at 0.8 and 1.28 are not clipped; just beyond they are, and lose their gradient.
    ratios = jnp.array([0.8, 1.28, 0.79, 1.29, 0.79, 1.29, 1.25, 0.75])
    adv_ = jnp.array([-1.0, 1.0, -1.0, 1.0, 1.0, -1.0, 1.0, -1.0])
    s = L.clipped_surrogate(jnp.log(ratios), adv_, clip_low=0.2, clip_high=0.28)
    np.testing.assert_allclose(s.loss, [0.8, -1.28, 0.8, -1.28, -0.79, 1.29, -1.25, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(s.clipped_low, [0, 0, 1, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(s.clipped_high, [0, 0, 0, 1, 0, 0, 0, 0])
    grad = jax.grad(lambda lr: L.clipped_surrogate(lr, adv_, 0.2, 0.28).loss[2:].sum())(jnp.log(ratios))
    # d(-A r)/dlog r = -A r where unclipped; 0 where clipped (tokens 2, 3, 7)
    np.testing.assert_allclose(grad[2:], [0.0, 0.0, -0.79, 1.29, -1.25, 0.0], rtol=1e-6, atol=1e-8)


def test_dual_clip_only_for_negative_advantages():
    ratios = jnp.array([5.0, 0.01, 2.0])
    adv_ = jnp.array([-1.0, 1.0, -1.0])
    plain = L.clipped_surrogate(jnp.log(ratios), adv_)
    dual = L.clipped_surrogate(jnp.log(ratios), adv_, clip_c=3.0)
    np.testing.assert_allclose(plain.loss, [5.0, -0.01, 2.0], rtol=1e-6)
    np.testing.assert_allclose(dual.loss, [3.0, -0.01, 2.0], rtol=1e-6)  # only A<0 with r > 3 is capped
    np.testing.assert_array_equal(dual.dual_clipped, [1, 0, 0])
    grad = jax.jit(jax.grad(lambda lr: L.clipped_surrogate(lr, adv_, clip_c=3.0).loss.sum()))(jnp.log(ratios))
    np.testing.assert_allclose(grad, [0.0, -0.01, 2.0], rtol=1e-5)


def test_sequence_level_ratio_is_length_normalised_and_clipped_per_row():
    logp = jnp.array([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    old = jnp.array([[-1.3, -2.3, -9.0], [-1.0, -1.2, 0.0]])
    mask = jnp.array([[1, 1, 0], [1, 1, 0]])
    log_ratio = L.importance_log_ratio(logp, old, mask, "sequence")
    np.testing.assert_allclose(log_ratio, [[0.3, 0.3, 0.0], [0.1, 0.1, 0.0]], rtol=1e-5)
    s = L.clipped_surrogate(log_ratio, jnp.array([1.0, 1.0]), clip_low=3e-4, clip_high=0.2)
    np.testing.assert_allclose(s.loss[:, :2], [[-1.2, -1.2], [-np.exp(0.1)] * 2], rtol=1e-5)
    np.testing.assert_array_equal(s.clipped_high[:, :2], [[1, 1], [0, 0]])


def test_clip_metrics_count_regions():
    logp = jnp.log(jnp.array([[0.5, 1.5, 1.0, 1.5]]))
    mask = jnp.ones((1, 4))
    _, m = L.policy_objective(L.PolicyLossConfig(), logp, jnp.zeros((1, 4)), jnp.array([[-1.0, 1.0, 1.0, -1.0]]), mask)
    assert float(m["clip_frac_low"].value()) == pytest.approx(0.25)
    assert float(m["clip_frac_high"].value()) == pytest.approx(0.25)
    assert float(m["clip_frac"].value()) == pytest.approx(0.5)


# ---------------------------------------------------------------- KL, NLL


def test_kl_estimators_and_k3_expectation_is_exact_kl():
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(11))
    q = rng.dirichlet(np.ones(11))
    logp, logq = jnp.log(jnp.asarray(p, jnp.float32)), jnp.log(jnp.asarray(q, jnp.float32))
    true_kl = np.sum(p * np.log(p / q))
    for name in ("k1", "k3"):  # unbiased: E_{x~p}[k(x)] = KL(p || q)
        est = L.kl_per_token(logp[None], logq[None], name)[0]
        np.testing.assert_allclose(np.sum(p * np.asarray(est)), true_kl, rtol=1e-4)
    k2 = L.kl_per_token(logp[None], logq[None], "k2")[0]
    np.testing.assert_allclose(k2, 0.5 * np.log(q / p) ** 2, rtol=1e-4)
    assert np.all(np.asarray(L.kl_per_token(logp[None], logq[None], "k3")) >= 0)
    np.testing.assert_allclose(L.kl_per_token(jnp.array([[-30.0]]), jnp.array([[0.0]]), "k3", clamp=10.0), [[10.0]])


def test_memorization_row_gives_the_nll_gradient():
    """DyME: SFT row with advantage +1 at ratio 1, others 0, gives d(-mean_t log p)/d theta / #rows."""
    rng = np.random.default_rng(4)
    hidden = jnp.asarray(rng.normal(size=(3, 5, 8)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 13, size=(3, 5)))
    mask = jnp.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], jnp.float32)
    w0 = jnp.asarray(rng.normal(size=(8, 13)), jnp.float32)
    cfg = L.PolicyLossConfig(agg_mode="seq_mean_token_mean")

    def logprobs(w):
        return L.chunked_token_logprobs(hidden, w, targets, chunk_size=4)

    def dyme_way(w):
        lp = logprobs(w)
        loss, _ = L.policy_objective(cfg, lp, jax.lax.stop_gradient(lp), jnp.array([1.0, 0.0, 0.0]), mask)
        return loss.value()

    def weighted_nll_way(w):
        lp = logprobs(w)
        sft_weights = jnp.array([1.0, 0.0, 0.0])
        loss, _ = L.policy_objective(cfg, lp, jax.lax.stop_gradient(lp), jnp.zeros(3), mask, sft_weights=sft_weights)
        return loss.value()

    def reference(w):  # plain NLL of row 0, direct log-softmax, divided by the 3 rows
        lp = jax.nn.log_softmax(hidden[0] @ w)[jnp.arange(5), targets[0]]
        return -(lp * mask[0]).sum() / mask[0].sum() / 3

    want = jax.jit(jax.grad(reference))(w0)
    np.testing.assert_allclose(jax.jit(jax.grad(dyme_way))(w0), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.grad(weighted_nll_way))(w0), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- chunked vocabulary


def _direct_stats(hidden, w, targets, temperature=1.0):
    logits = jnp.einsum("bth,hv->btv", hidden, w) / temperature
    logp = jax.nn.log_softmax(logits)
    entropy = -(jnp.exp(logp) * logp).sum(-1)
    return jnp.take_along_axis(logp, targets[..., None], -1)[..., 0], entropy


@pytest.mark.parametrize("chunk_size", [1, 8, 37, 64])
def test_chunked_logprobs_and_entropy_equal_direct(chunk_size):
    rng = np.random.default_rng(5)
    hidden = jnp.asarray(rng.normal(size=(2, 6, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(scale=0.8, size=(16, 37)), jnp.float32)  # logits of order +-10
    targets = jnp.asarray(rng.integers(0, 37, size=(2, 6)))
    want_lp, want_h = _direct_stats(hidden, w, targets, 0.7)
    got = L.chunked_token_stats(hidden, w, targets, chunk_size=chunk_size, temperature=0.7)
    np.testing.assert_allclose(got.logprobs, want_lp, atol=1e-5)
    np.testing.assert_allclose(got.entropy, want_h, atol=1e-5)
    tied = L.chunked_token_stats(hidden, w.T, targets, chunk_size=chunk_size, temperature=0.7, vocab_axis=0)
    np.testing.assert_allclose(tied.logprobs, want_lp, atol=1e-5)
    logits = jnp.einsum("bth,hv->btv", hidden, w)
    from_logits = L.entropy_from_logits(logits, chunk_size=chunk_size, temperature=0.7)
    np.testing.assert_allclose(from_logits, want_h, atol=1e-5)


def test_chunked_gradients_equal_direct():
    rng = np.random.default_rng(6)
    hidden = jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 21)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 21, size=(2, 4)))

    def objective(stats_fn):
        def f(h, w_):
            lp, ent = stats_fn(h, w_)
            return lp.sum() + 0.3 * ent.sum()
        return jax.grad(f, argnums=(0, 1))(hidden, w)

    chunked = objective(jax.jit(lambda h, w_: tuple(L.chunked_token_stats(h, w_, targets, chunk_size=5))))
    direct = objective(lambda h, w_: _direct_stats(h, w_, targets))
    for got, want in zip(chunked, direct):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_chunked_bf16_hidden_is_computed_in_float32():
    rng = np.random.default_rng(7)
    hidden = jnp.asarray(rng.normal(size=(1, 3, 8)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(8, 10)), jnp.bfloat16)
    targets = jnp.array([[0, 5, 9]])
    got = L.chunked_token_logprobs(hidden, w, targets, chunk_size=4)
    logits = jnp.einsum("bth,hv->btv", hidden, w, preferred_element_type=jnp.float32)
    want = L.token_logprobs_from_logits(logits, targets)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=1e-5)


# ---------------------------------------------------------------- validation


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="clip_c"):
        L.PolicyLossConfig(clip_c=0.5)
    with pytest.raises(ValueError, match="agg_mode"):
        L.PolicyLossConfig(agg_mode="mean")
    with pytest.raises(ValueError, match="max_len"):
        L.PolicyLossConfig(agg_mode="seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="estimator"):
        L.kl_per_token(jnp.zeros((1, 1)), jnp.zeros((1, 1)), "k4")
    with pytest.raises(ValueError, match="old_logprobs"):
        L.policy_objective(L.PolicyLossConfig(), jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.zeros(2), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="ref_logprobs"):
        zeros = jnp.zeros((2, 3))
        L.policy_objective(L.PolicyLossConfig(kl_coef=0.1), zeros, zeros, jnp.zeros(2), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="targets"):
        L.chunked_token_stats(jnp.zeros((1, 2, 4)), jnp.zeros((4, 5)), jnp.zeros((1, 3), jnp.int32))


# ---------------------------------------------------------------- MAYE's KL term and metrics


def _kl_case():
    """Token-mean batch of 2 rows x 4 tokens; one token has k3 = 30 (mean of k3 over 7 tokens ~4.4)."""
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]], jnp.float32)
    logp = jnp.full((2, 4), -1.0)
    d = np.zeros((2, 4), np.float32)
    d[0, 1] = 3.46  # exp(d) - d - 1 = 27.4: clamped per token it would count as 10
    d[1, 0] = -0.5
    ref = logp + jnp.asarray(d)
    return logp, ref, mask, d


def test_kl_loss_clamps_the_mean_and_is_logged_raw():
    """MAYE: loss = pg + coef * clamp(masked_mean(k3), -10, 10); loss/kl_loss is the clamped mean, unscaled."""
    logp, ref, mask, d = _kl_case()
    k3 = np.exp(d) - d - 1
    assert k3.max() > 10 > (k3 * mask).sum() / mask.sum()
    cfg = L.PolicyLossConfig(kl_coef=0.1, kl_clamp=10.0)  # kl_clamp_mode "mean" is the default
    adv_ = jnp.array([1.0, -1.0])
    loss, parts = L.policy_objective(cfg, logp, logp, adv_, mask, ref_logprobs=ref)
    kl_mean = (k3 * mask).sum() / mask.sum()
    pg = (np.array([[-1.0] * 4, [1.0] * 4]) * mask).sum() / mask.sum()
    np.testing.assert_allclose(parts["kl_loss"].value(), kl_mean, rtol=1e-6)  # raw: not x 0.1
    np.testing.assert_allclose(loss.value(), pg + 0.1 * kl_mean, rtol=1e-6)

    # The big token keeps its gradient (d k3 / d logp = 1 - exp(d)) under a clamped mean...
    def kl_term(lp, cfg_):
        return L.policy_objective(cfg_, lp, jax.lax.stop_gradient(lp), jnp.zeros(2), mask, ref_logprobs=ref)[
            1]["kl_loss"].value()
    grad = jax.grad(kl_term)(logp, cfg)
    np.testing.assert_allclose(grad, (1 - np.exp(d)) * mask / mask.sum(), rtol=1e-5, atol=1e-7)
    # ...and loses it under a per-token clamp, which also counts it as 10.
    per_token = L.PolicyLossConfig(kl_coef=0.1, kl_clamp=10.0, kl_clamp_mode="token")
    assert float(jax.grad(kl_term)(logp, per_token)[0, 1]) == 0.0
    np.testing.assert_allclose(kl_term(logp, per_token), (np.minimum(k3, 10) * mask).sum() / mask.sum(), rtol=1e-6)
    # A mean above the clamp passes no gradient at all.
    assert np.all(np.asarray(jax.grad(kl_term)(logp, L.PolicyLossConfig(kl_coef=0.1, kl_clamp=1.0))) == 0.0)
    np.testing.assert_allclose(kl_term(logp, L.PolicyLossConfig(kl_coef=0.1, kl_clamp=1.0)), 1.0)


def test_sequence_kl_is_the_clamped_k3_sum_and_never_negative():
    logp, ref, mask, d = _kl_case()
    got = np.asarray(L.sequence_kl(logp, ref, mask))
    np.testing.assert_allclose(got, (np.minimum(np.exp(d) - d - 1, 10) * mask).sum(1), rtol=1e-6)
    # The k1 sum of a sequence can be negative; the k3 sum cannot.
    rng = np.random.default_rng(11)
    old = jnp.asarray(-rng.uniform(0.1, 2.0, size=(64, 5)), jnp.float32)
    ref2 = old + jnp.asarray(rng.normal(scale=0.5, size=(64, 5)), jnp.float32)
    m = jnp.ones((64, 5))
    assert np.asarray(((old - ref2) * m).sum(-1)).min() < 0
    assert np.asarray(L.sequence_kl(old, ref2, m)).min() >= 0


def test_ratio_metrics_leave_out_sft_rows():
    """DyME's SFT rows carry old log-probs 0: their ratio is not a policy ratio and must not be averaged in."""
    logp, old, _, advantages, mask = _batch(12)
    old = old.copy()
    old[2] = 0.0
    sft = jnp.asarray(np.eye(6, dtype=np.float32)[2])
    _, m = L.policy_objective(L.PolicyLossConfig(), logp, old, advantages * (1 - np.asarray(sft)), mask,
                              sft_weights=sft)
    rl = mask.copy()
    rl[2] = 0.0
    ratio = np.exp(logp - old)
    np.testing.assert_allclose(m["ratio"].value(), (ratio * rl).sum() / rl.sum(), rtol=1e-5)
    np.testing.assert_allclose(m["approx_kl"].value(), (0.5 * (logp - old) ** 2 * rl).sum() / rl.sum(), rtol=1e-5)
    # The entropy of what the policy produced still covers every token.
    np.testing.assert_allclose(m["sampled_token_entropy"].value(),
                               (-np.exp(logp) * logp * mask).sum() / mask.sum(), rtol=1e-5)


def test_max_abs_ratio_minus_one():
    logp = jnp.log(jnp.array([[1.0, 0.5, 0.9], [0.2, 1.0, 1.0]]))
    old = jnp.log(jnp.array([[1.0, 0.25, 1.0], [1.0, 1.0, 1.0]]))
    mask = jnp.array([[1, 1, 1], [0, 1, 1]])
    assert float(L.max_abs_ratio_minus_one(logp, old, mask)) == pytest.approx(1.0)  # 0.5 / 0.25 - 1
    assert float(L.max_abs_ratio_minus_one(logp, old, mask.at[0, 1].set(0))) == pytest.approx(0.1)
    assert float(L.max_abs_ratio_minus_one(logp, old, jnp.zeros((2, 3)))) == 0.0


@pytest.mark.parametrize("estimator, ratio_level, agg_mode, keys", [
    ("grpo", "sequence", "token_mean", ("loss.ratio_level", "loss.agg_mode")),
    ("grpo", "sequence", "seq_mean_token_sum_norm", ("loss.ratio_level", "loss.agg_mode")),
    ("drgrpo", "token", "token_mean", ("advantage.estimator", "loss.agg_mode")),
    ("drgrpo", "token", "seq_mean_token_mean", ("advantage.estimator", "loss.agg_mode")),
])
def test_check_combination_rejects_and_names_both_keys(estimator, ratio_level, agg_mode, keys):
    with pytest.raises(ValueError) as err:
        L.check_combination(estimator, ratio_level, agg_mode)
    assert all(k in str(err.value) for k in keys) and repr(agg_mode) in str(err.value)


@pytest.mark.parametrize("estimator, ratio_level, agg_mode", [
    ("grpo", "sequence", "seq_mean_token_mean"), ("drgrpo", "token", "seq_mean_token_sum_norm"),
    ("grpo", "token", "token_mean"), ("reinforce_pp", "token", "token_mean"),
    (None, "token", "seq_mean_token_sum_norm"), ("rloo", "token", "seq_mean_token_sum_norm"),
])
def test_check_combination_accepts(estimator, ratio_level, agg_mode):
    L.check_combination(estimator, ratio_level, agg_mode)
