"""The RL train step on tiny Qwen-VL models, against independent references.

References: a loss written out from full-vocabulary logits (`model(...)`, log_softmax, the PPO/KL/
entropy/NLL formulas and the seq-mean-token-mean aggregation spelled out here), central finite
differences of that loss, Adam's closed-form first update, and the same step run unsharded or as
successive single-update steps.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from jax.sharding import PartitionSpec as P

from tests.rl_batches import flat_rows, make_model, make_rollouts, model_config, take_rows, train_batch
from vrl_jax import sharding as shd
from vrl_jax.rl.logprobs import make_logprob_fn
from vrl_jax.rl.losses import PolicyLossConfig
from vrl_jax.rl.train_state import OptimizerConfig, create_train_state, lr_schedule, train_state_shardings
from vrl_jax.rl.train_step import (StepConfig, TrainBatch, batch_gradients, batch_shardings, make_train_step,
                                   micro_batch_order, recompute_old_logprobs)

CHUNK = 256  # vocabulary 1024 -> 4 chunks: the chunked log-softmax path is exercised
# No entropy bonus here so that an on-policy memorization row is pure NLL (the bonus is checked in
# the gradient test); KL is on. MAYE's freezing: ViT frozen, connector and LLM train.
LOSS = PolicyLossConfig(clip_low=0.1, clip_high=0.15, kl_coef=0.05, agg_mode="seq_mean_token_mean")
OPT = OptimizerConfig(learning_rate=1e-3, total_steps=4, clip_grad_norm=1.0, train_vit=False, train_connector=True)
ROWS = 16
_STEPS = {}


def get_step(graphdef, opt_cfg, cfg, **kwargs):
    """One jitted step per configuration for the whole module (each compile costs ~10 s on CPU)."""
    key = (opt_cfg, cfg, tuple(sorted((k, id(v)) for k, v in kwargs.items())))
    if key not in _STEPS:
        _STEPS[key] = make_train_step(graphdef, opt_cfg, cfg, **kwargs)
    return _STEPS[key]


def flat(tree):
    return traverse_util.flatten_dict(tree, sep=".")


def to_host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def fresh_state(graphdef, host_params, opt_cfg, mesh=None):
    """A new state (own buffers: the step donates them) from host parameters."""
    model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, host_params))
    return create_train_state(model, opt_cfg, seed=3, mesh=mesh)[0]


def reference_loss(graphdef, params, batch: TrainBatch, loss: PolicyLossConfig, temperature=1.0):
    """Loss of `batch` from full float32 logits, every formula written out (seq-mean-token-mean)."""
    model = nnx.merge(graphdef, params)
    total = count = 0.0
    for i in range(batch.input_ids.shape[0]):
        vision = None if batch.vision is None else jax.tree.map(lambda x: x[i], batch.vision)
        logits = model(batch.input_ids[i], batch.positions[i], batch.attention_mask[i], vision) / temperature
        logp_all = jax.nn.log_softmax(logits, axis=-1)
        lp = jnp.take_along_axis(logp_all, batch.targets[i][..., None], axis=-1)[..., 0]
        entropy = -(jnp.exp(logp_all) * logp_all).sum(-1)
        adv, old, m = batch.advantages[i], batch.old_logprobs[i], batch.loss_mask[i]
        ratio = jnp.exp(lp - old)
        pg = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1 - loss.clip_low, 1 + loss.clip_high))
        x = pg - loss.entropy_coef * entropy - loss.sft_coef * batch.sft_weights[i][:, None] * lp
        if batch.ref_logprobs is not None:
            d = batch.ref_logprobs[i] - lp
            x = x + loss.kl_coef * (jnp.exp(d) - d - 1)
        tokens = m.sum(1)
        total = total + jnp.where(tokens > 0, (x * m).sum(1) / jnp.maximum(tokens, 1), 0).sum()
        count = count + (tokens > 0).sum()
    return total / count


def with_noise(logprobs, mask, scale, seed):
    rs = np.random.RandomState(seed)
    return (np.asarray(logprobs) + scale * rs.randn(*np.shape(logprobs)) * np.asarray(mask)).astype(np.float32)


# ---- Fixtures: one model, 32 rollouts (two batches of 16 with the same length) ----------------------


@pytest.fixture(scope="module")
def setup():
    config = model_config("qwen2_5_vl", tie=False)
    model = make_model(config, seed=0)
    graphdef, _ = nnx.split(model, nnx.Param)
    host = to_host(nnx.state(model, nnx.Param).to_pure_dict())
    both = make_rollouts(config, 2 * ROWS, seed=1)
    logprob_fn = make_logprob_fn(graphdef, chunk_size=CHUNK)
    current = np.asarray(flat_rows(logprob_fn(host, train_batch(both, config, 2)).logprobs))
    old = with_noise(current, both["loss_mask"], 0.1, seed=2)  # off-policy: some ratios clip
    ref = with_noise(old, both["loss_mask"], 0.1, seed=3)
    rows = lambda x, half: x[half * ROWS:(half + 1) * ROWS]  # noqa: E731
    return dict(config=config, graphdef=graphdef, host=host, rollouts=take_rows(both, 0, ROWS),
                second=take_rows(both, ROWS, 2 * ROWS), old=rows(old, 0), ref=rows(ref, 0), current=rows(current, 0),
                old2=rows(old, 1), ref2=rows(ref, 1))


def main_step(setup, k=2, opt_cfg=OPT):
    cfg = StepConfig(batch_size=ROWS, num_micro=k, loss=LOSS, chunk_size=CHUNK, remat=(k == 4))
    return get_step(setup["graphdef"], opt_cfg, cfg)


@pytest.fixture(scope="module")
def single_device_steps(setup):
    """One step (one update) with k = 1, 2, 4 micro-batches, no mesh."""
    out = {}
    for k in (1, 2, 4):
        batch = train_batch(setup["rollouts"], setup["config"], k, setup["old"], setup["ref"])
        state = fresh_state(setup["graphdef"], setup["host"], OPT)
        new_state, metrics = main_step(setup, k)(state, batch)
        out[k] = (to_host(new_state), to_host(metrics))
    return out


def assert_trees_close(a, b, atol, rtol=0.0):
    fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, x), (_, y) in zip(fa, fb):
        np.testing.assert_allclose(x, y, atol=atol, rtol=rtol, err_msg=jax.tree_util.keystr(path))


def assert_metrics_close(a, b, rtol=1e-5, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=atol, err_msg=key)


# ---- Gradient correctness ----------------------------------------------------------------------


def test_gradient_matches_reference_and_finite_differences():
    """Step gradient == autodiff of the written-out loss; both == central differences (float32)."""
    config = model_config("qwen2_vl", tie=True)  # the other family, tied unembedding
    model = make_model(config, seed=5)
    graphdef, _ = nnx.split(model, nnx.Param)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    rollouts = make_rollouts(config, 6, seed=6)
    rollouts["sft_weights"][3] = 1.0  # a DyME memorization row on top of the RL rows
    logprob_fn = make_logprob_fn(graphdef, chunk_size=CHUNK)
    current = flat_rows(logprob_fn(params, train_batch(rollouts, config, 1)).logprobs)
    old = with_noise(current, rollouts["loss_mask"], 0.02, seed=7)  # ratios in ~[0.95, 1.05]: no clip edge
    ref = with_noise(old, rollouts["loss_mask"], 0.2, seed=8)
    batch = train_batch(rollouts, config, 2, old, ref)
    loss_cfg = dataclasses.replace(LOSS, entropy_coef=0.01)
    cfg = StepConfig(batch_size=6, num_micro=2, loss=loss_cfg, chunk_size=CHUNK)
    opt = dataclasses.replace(OPT, train_vit=True)

    grads, loss, metrics = jax.jit(lambda p, b: batch_gradients(p, b, graphdef=graphdef, opt_cfg=opt,
                                                                cfg=cfg))(params, batch)
    ref_fn = jax.jit(lambda p: reference_loss(graphdef, p, batch, loss_cfg))
    ref_value, ref_grads = jax.jit(jax.value_and_grad(lambda p: reference_loss(graphdef, p, batch, loss_cfg)))(params)
    np.testing.assert_allclose(loss, ref_value, rtol=1e-5, atol=1e-6)
    g, rg = flat(grads), flat(ref_grads)
    assert g.keys() == rg.keys()  # every parameter trains here
    for key in g:
        scale = np.abs(rg[key]).max() + 1e-12
        np.testing.assert_allclose(g[key], rg[key], atol=1e-4 * scale, err_msg=key)

    # Central differences of the reference loss along directions: per group along its gradient,
    # and one random direction over everything.
    rs = np.random.RandomState(9)
    groups = ["language.embed", "language.layers.q_w", "language.layers.v_b", "language.layers.down_w",
              "language.layers.input_norm", "language.norm", "visual.patch_embed", "visual.blocks.qkv_w",
              "visual.blocks.fc2_b", "visual.merger_fc1_w"]
    directions = [{k: np.asarray(g[k]) / np.linalg.norm(g[k])} for k in groups]
    rand = {k: rs.randn(*v.shape).astype(np.float32) for k, v in g.items()}
    norm = math.sqrt(sum(float((v ** 2).sum()) for v in rand.values()))
    directions.append({k: v / norm for k, v in rand.items()})
    eps = 1e-2
    fp = flat(params)
    for d in directions:
        shifted = lambda s: traverse_util.unflatten_dict(  # noqa: E731
            {k: fp[k] + s * d[k] if k in d else fp[k] for k in fp}, sep=".")
        fd = (float(ref_fn(shifted(eps))) - float(ref_fn(shifted(-eps)))) / (2 * eps)
        ad = sum(float((np.asarray(g[k]) * d[k]).sum()) for k in d)
        assert abs(fd - ad) <= 2e-3 * abs(ad) + 2e-5, (list(d)[:2], fd, ad)
    assert float(metrics["kl"]) > 0 and 0.9 < float(metrics["ratio"]) < 1.1


def test_logprobs_match_full_logits_without_building_them(setup):
    """`make_logprob_fn` == log_softmax of the full logits; its program has no [mb, T, V] float32 buffer."""
    config, graphdef, host = setup["config"], setup["graphdef"], setup["host"]
    batch = train_batch(setup["rollouts"], config, 2)
    fn = make_logprob_fn(graphdef, chunk_size=CHUNK, with_entropy=True)
    compiled = fn.lower(host, batch).compile()
    stats = compiled(host, batch)
    forward = jax.jit(nnx.merge(graphdef, host).__call__)
    for i in range(2):
        vision = jax.tree.map(lambda x: x[i], batch.vision)
        logits = forward(batch.input_ids[i], batch.positions[i], batch.attention_mask[i], vision)
        logp = jax.nn.log_softmax(logits, axis=-1)
        want = np.take_along_axis(np.asarray(logp), batch.targets[i][..., None], axis=-1)[..., 0]
        real = batch.attention_mask[i].astype(bool)
        np.testing.assert_allclose(np.asarray(stats.logprobs[i])[real], want[real], atol=2e-5)
        entropy = -(np.exp(np.asarray(logp)) * np.asarray(logp)).sum(-1)
        np.testing.assert_allclose(np.asarray(stats.entropy[i])[real], entropy[real], atol=2e-4)
    mb, t = batch.input_ids.shape[1:]
    hlo = compiled.as_text()
    assert f"f32[{mb},{t},{config.text.vocab_size}]" not in hlo
    assert f"f32[{mb},{t},{CHUNK}]" in hlo  # the chunked path is what runs


# ---- Micro-batches, meshes, mini-batches ----------------------------------------------------------


@pytest.mark.parametrize("k", [2, 4])
def test_micro_batches_equal_one_batch(setup, single_device_steps, k):
    """k micro-batches (k=4 with remat) make the same update and metrics as one batch of 16 rows."""
    (state1, m1), (state_k, mk) = single_device_steps[1], single_device_steps[k]
    assert_trees_close(state_k.params, state1.params, atol=1e-5)
    assert_trees_close(state_k.opt_state, state1.opt_state, atol=1e-6)
    assert_metrics_close(mk, m1)
    assert m1["clip_frac"] > 0 and m1["kl"] > 0 and m1["entropy"] > 0  # the terms are live
    assert int(state1.step) == 1 and int(state1.skipped) == 0
    assert m1["tokens"] == setup["rollouts"]["loss_mask"].sum()


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_step_equals_single_device(setup, single_device_steps, mesh_shape):
    mesh = shd.make_mesh(mesh_shape)
    batch = train_batch(setup["rollouts"], setup["config"], 2, setup["old"], setup["ref"])
    cfg = StepConfig(batch_size=ROWS, num_micro=2, loss=LOSS, chunk_size=CHUNK)
    state = fresh_state(setup["graphdef"], setup["host"], OPT, mesh)
    b_sh = batch_shardings(batch, mesh)
    step = make_train_step(setup["graphdef"], OPT, cfg, mesh=mesh, state_shardings=train_state_shardings(state),
                           batch_shardings=b_sh)
    new_state, metrics = step(state, shd.put(batch, b_sh))
    if mesh_shape[1] > 1:  # FSDP really splits the weights and their Adam moments
        assert new_state.params["language"]["layers"]["gate_w"].sharding.spec[1] == "fsdp"
    if mesh_shape[2] > 1:
        assert new_state.params["language"]["lm_head"].sharding.spec == P("fsdp", "tensor")
    ref_state, ref_metrics = single_device_steps[2]
    assert_trees_close(to_host(new_state.params), ref_state.params, atol=1e-5)
    assert_trees_close(to_host(new_state.opt_state), ref_state.opt_state, atol=1e-6)
    assert_metrics_close(to_host(metrics), ref_metrics)


@pytest.mark.parametrize("shuffle", [False, True])
def test_mini_batches_and_epochs_are_successive_updates(setup, shuffle):
    """ppo_epochs=2 x num_mini=2 over 32 rows == four one-update steps on 16-row mini-batches in order."""
    config, graphdef, host = setup["config"], setup["graphdef"], setup["host"]
    halves = [train_batch(setup["rollouts"], config, 2, setup["old"], setup["ref"]),
              train_batch(setup["second"], config, 2, setup["old2"], setup["ref2"])]
    batch = jax.tree.map(lambda a, b: np.concatenate([a, b]), *halves)  # [4, 8, ...]: mini-batch j = half j
    cfg = StepConfig(batch_size=2 * ROWS, num_micro=4, num_mini=2, ppo_epochs=2, loss=LOSS, chunk_size=CHUNK,
                     shuffle=shuffle)
    state = fresh_state(graphdef, host, OPT)
    orders = [np.arange(4)] * 2
    if shuffle:
        orders = [np.asarray(micro_batch_order(state.rng, e, 4)) for e in range(2)]
        assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
        assert any(list(o) != [0, 1, 2, 3] for o in orders), "identity orders: the test would not see shuffling"
    new_state, metrics = get_step(graphdef, OPT, cfg)(state, batch)

    ref, lrs = fresh_state(graphdef, host, OPT), []
    for e in range(2):
        for j in range(2):  # mini-batch j of epoch e = micro-batches orders[e][2j], orders[e][2j + 1]
            mini = jax.tree.map(lambda x: x[orders[e][2 * j:2 * j + 2]], batch)
            ref, m = main_step(setup, 2)(ref, mini)
            lrs.append(float(m["learning_rate"]))
    assert_trees_close(to_host(new_state.params), to_host(ref.params), atol=1e-5)
    assert_trees_close(to_host(new_state.opt_state), to_host(ref.opt_state), atol=1e-6)
    assert int(new_state.step) == 4 == int(ref.step)
    assert float(metrics["learning_rate"]) == pytest.approx(lrs[-1])
    assert lrs == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)])
    assert float(metrics["updates"]) == 4 and float(metrics["tokens"]) == batch.loss_mask.sum()


def test_lr_schedule_warmup_then_cosine():
    opt = OptimizerConfig(learning_rate=2.0, warmup_steps=4, total_steps=12, final_lr_ratio=0.1)
    schedule = lr_schedule(opt)
    want = [2.0 * i / 4 for i in range(4)] + [0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(9)]
    assert [float(schedule(i)) for i in range(13)] == pytest.approx(want)
    assert float(schedule(100)) == pytest.approx(0.2)


def test_step_reports_mayes_last_grad_norm_next_lr_and_the_first_update_gap(setup):
    """4 updates: grad_norm_last is the 4th update's norm, next_learning_rate the 5th update's rate (MAYE
    logs both), max_abs_ratio_minus_1_first_update the first mini-batch's gap, before anything moved."""
    config, graphdef, host = setup["config"], setup["graphdef"], setup["host"]
    halves = [train_batch(setup["rollouts"], config, 2, setup["old"], setup["ref"]),
              train_batch(setup["second"], config, 2, setup["old2"], setup["ref2"])]
    batch = jax.tree.map(lambda a, b: np.concatenate([a, b]), *halves)
    cfg = StepConfig(batch_size=2 * ROWS, num_micro=4, num_mini=2, ppo_epochs=2, loss=LOSS, chunk_size=CHUNK)
    _, metrics = get_step(graphdef, OPT, cfg)(fresh_state(graphdef, host, OPT), batch)
    ref, per_update = fresh_state(graphdef, host, OPT), []
    for half in halves + halves:
        ref, m = main_step(setup, 2)(ref, half)
        per_update.append(to_host(m))
    norms = [float(m["grad_norm"]) for m in per_update]
    assert float(metrics["grad_norm_last"]) == pytest.approx(norms[-1], rel=1e-4)
    assert float(metrics["grad_norm"]) == pytest.approx(np.mean(norms), rel=1e-4)
    assert float(metrics["next_learning_rate"]) == pytest.approx(float(lr_schedule(OPT)(4)), abs=1e-9)
    assert float(metrics["learning_rate"]) == pytest.approx(float(lr_schedule(OPT)(3)))
    gaps = [float(m["max_abs_ratio_minus_1_first_update"]) for m in per_update]
    assert float(metrics["max_abs_ratio_minus_1_first_update"]) == pytest.approx(gaps[0], rel=1e-4)
    assert abs(gaps[2] - gaps[0]) > 1e-3  # the same rows after two updates: a later update would differ


def test_first_update_gap_over_rl_tokens_and_recomputed_old_logprobs(setup):
    """The gap is max |exp(logp - old) - 1| over RL tokens (an SFT row's old log-probs 0 are left out);
    with old log-probs recomputed by the training forward it is numerics only."""
    config, graphdef, host, rollouts = setup["config"], setup["graphdef"], setup["host"], setup["rollouts"]
    step = main_step(setup, 2)
    sft = np.zeros(ROWS, np.float32)
    sft[5] = 1.0
    old = setup["old"].copy()
    old[5] = 0.0  # what the trainer writes for a replaced (SFT) row
    batch = train_batch({**rollouts, "sft_weights": sft}, config, 2, old, setup["ref"])
    _, m = step(fresh_state(graphdef, host, OPT), batch)
    rl = rollouts["loss_mask"].copy()
    rl[5] = 0.0
    want = np.abs(np.expm1(setup["current"] - old))[rl > 0].max()
    assert 0.05 < want < np.abs(np.expm1(setup["current"] - old))[rollouts["loss_mask"] > 0].max()
    assert float(m["max_abs_ratio_minus_1_first_update"]) == pytest.approx(want, rel=1e-3)

    logprob_fn = make_logprob_fn(graphdef, chunk_size=CHUNK)
    recomputed = recompute_old_logprobs(logprob_fn, host, batch)
    counted = rollouts["loss_mask"] > 0
    np.testing.assert_allclose(flat_rows(recomputed.old_logprobs)[counted], setup["current"][counted], atol=2e-5)
    _, m2 = step(fresh_state(graphdef, host, OPT), recomputed)
    assert float(m2["max_abs_ratio_minus_1_first_update"]) < 1e-4
    assert float(m2["ratio"]) == pytest.approx(1.0, abs=1e-5) and float(m2["clip_frac"]) == 0.0


def test_old_logprobs_from_the_forward_give_ratio_exactly_one(setup):
    """DyME/TRL: pi_old = the update's own forward (detached). The batch's (noisy) old log-probs only feed
    the gap metric; the update equals a batch-mode step fed the training forward's log-probs."""
    config, graphdef, host, rollouts = setup["config"], setup["graphdef"], setup["host"], setup["rollouts"]
    with pytest.raises(ValueError, match="StepConfig.old_logprobs='forward' needs one update per step"):
        StepConfig(batch_size=ROWS, num_micro=2, num_mini=2, old_logprobs="forward")
    with pytest.raises(ValueError, match="StepConfig.old_logprobs must be one of"):
        StepConfig(batch_size=ROWS, old_logprobs="sampler")
    cfg = StepConfig(batch_size=ROWS, num_micro=2, loss=LOSS, chunk_size=CHUNK, old_logprobs="forward")
    noisy = train_batch(rollouts, config, 2, setup["old"], setup["ref"])
    state, m = get_step(graphdef, OPT, cfg)(fresh_state(graphdef, host, OPT), noisy)
    assert float(m["ratio"]) == 1.0 and float(m["clip_frac"]) == 0.0 and float(m["approx_kl"]) == 0.0
    want = np.abs(np.expm1(setup["current"] - setup["old"]))[rollouts["loss_mask"] > 0].max()
    assert float(m["max_abs_ratio_minus_1_first_update"]) == pytest.approx(want, rel=1e-3)
    on_policy = train_batch(rollouts, config, 2, setup["current"], setup["ref"])
    ref_state, _ = main_step(setup, 2)(fresh_state(graphdef, host, OPT), on_policy)
    assert_trees_close(to_host(state.params), to_host(ref_state.params), atol=1e-5)


# ---- DyME, freezing, the non-finite guard ----------------------------------------------------------


def test_dyme_memorization_row_gives_nll_gradient(setup):
    """On-policy, a row with advantage 1 (others 0) updates like SFT on that row, at step level."""
    config, graphdef, host, rollouts = setup["config"], setup["graphdef"], setup["host"], setup["rollouts"]
    row = 6  # has an image
    step = main_step(setup, 2)
    adv = np.zeros_like(rollouts["advantages"])
    adv[row] = 1.0
    # old = ref = current: ratio 1 and a KL term with zero gradient, so only the row's PG term acts.
    memorize = train_batch({**rollouts, "advantages": adv}, config, 2, setup["current"], setup["current"])
    state, _ = step(fresh_state(graphdef, host, OPT), memorize)

    # Reference: the gradient of the row's mean NLL over the 16 counted rows, from full logits.
    b = train_batch(rollouts, config, 1)

    def nll(params):
        model = nnx.merge(graphdef, params)
        logits = model(b.input_ids[0], b.positions[0], b.attention_mask[0], jax.tree.map(lambda x: x[0], b.vision))
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits[row]), b.targets[0][row][..., None], -1)[..., 0]
        m = b.loss_mask[0][row]
        return -(lp * m).sum() / m.sum() / ROWS

    g = {k: np.asarray(v) for k, v in flat(jax.jit(jax.grad(nll))(host)).items()}
    trainable = [k for k in g if not k.startswith("visual.") or k.startswith("visual.merger_")]
    # AdamW's first update in closed form: clip to norm 1, m_hat = g, v_hat = g^2, decoupled decay.
    norm = math.sqrt(sum(float((g[k] ** 2).sum()) for k in trainable))
    new, old = flat(to_host(state.params)), flat(host)
    for key in trainable:
        gc = g[key] * min(1.0, OPT.clip_grad_norm / norm)
        want = -OPT.learning_rate * (gc / (np.abs(gc) + OPT.eps) + OPT.weight_decay * old[key])
        np.testing.assert_allclose(new[key] - old[key], want, atol=1e-6, err_msg=key)

    # The explicit NLL term (sft_weights) with zero advantages makes the same update.
    sft_rows = np.zeros(ROWS, np.float32)
    sft_rows[row] = 1.0
    sft = train_batch({**rollouts, "advantages": np.zeros_like(adv), "sft_weights": sft_rows}, config, 2,
                      setup["current"], setup["current"])
    state2, metrics = step(fresh_state(graphdef, host, OPT), sft)
    assert_trees_close(to_host(state2.params), to_host(state.params), atol=1e-7)
    assert float(metrics["sft_loss"]) > 0


def test_frozen_parts_and_non_finite_skip(setup):
    """train_vit=False: the ViT never moves and has no moments. A NaN batch is skipped and counted,
    leaving no trace: the next finite step equals a fresh state's first step."""
    config, graphdef, host, rollouts = setup["config"], setup["graphdef"], setup["host"], setup["rollouts"]
    step = main_step(setup, 2)
    good = train_batch(rollouts, config, 2, setup["old"], setup["ref"])
    bad_old = setup["old"].copy()
    bad_old[9, -3] = np.nan  # one counted token of the second micro-batch
    assert rollouts["loss_mask"][9, -3] == 1
    bad = good._replace(old_logprobs=bad_old.reshape(good.old_logprobs.shape))

    state = fresh_state(graphdef, host, OPT)
    opt_before = to_host(state.opt_state)
    state, m_bad = step(state, bad)
    assert int(state.skipped) == 1 and int(state.step) == 1 and float(m_bad["skipped_updates"]) == 1
    assert not np.isfinite(m_bad["loss"])
    assert_trees_close(to_host(state.params), host, atol=0)
    assert_trees_close(to_host(state.opt_state), opt_before, atol=0)

    state, m1 = step(state, good)
    ref, m_ref = step(fresh_state(graphdef, host, OPT), good)
    assert_trees_close(to_host(state.params), to_host(ref.params), atol=0)
    assert float(m1["learning_rate"]) == float(m_ref["learning_rate"]) == pytest.approx(1e-3)
    state, m2 = step(state, good)
    assert int(state.step) == 3 and int(state.skipped) == 1 and float(m2["skipped_updates"]) == 0
    assert float(m2["learning_rate"]) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 4)))

    new, old = flat(to_host(state.params)), flat(host)
    for key in new:
        moved = not np.array_equal(new[key], old[key])
        assert moved == (not key.startswith("visual.") or key.startswith("visual.merger_")), key
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)]
    assert not [p for p in paths if "visual." in p and "merger" not in p]  # frozen leaves: no moments
    assert len([p for p in paths if "merger_fc1_w" in p]) == 2  # Adam's mu and nu for a trainable leaf


# ---- Config errors before compiling ----------------------------------------------------------------


@pytest.mark.parametrize("kwargs,field", [
    (dict(batch_size=10, num_micro=4), "num_micro"),
    (dict(batch_size=8, num_micro=4, num_mini=3), "num_mini"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=8, ppo_epochs=0), "ppo_epochs"),
    (dict(batch_size=8, chunk_size=-1), "chunk_size"),
    (dict(batch_size=8, temperature=0.0), "temperature"),
    (dict(batch_size=8, with_entropy=False, loss=PolicyLossConfig(entropy_coef=0.1)), "with_entropy"),
])
def test_step_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"StepConfig.{field}"):
        StepConfig(**kwargs)


@pytest.mark.parametrize("kwargs,field", [
    (dict(warmup_steps=5, total_steps=2), "warmup_steps"),
    (dict(total_steps=0), "total_steps"),
    (dict(b2=1.0), "b2"),
    (dict(clip_grad_norm=0.0), "clip_grad_norm"),
    (dict(no_decay_regex="("), "no_decay_regex"),
    (dict(train_vit=False, train_connector=False, train_llm=False), "train_llm"),
])
def test_optimizer_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        OptimizerConfig(**kwargs)


def test_mesh_and_batch_errors_before_compiling(setup):
    config, graphdef, host = setup["config"], setup["graphdef"], setup["host"]
    mesh = shd.make_mesh((4, 2, 1))
    cfg = StepConfig(batch_size=8, num_micro=2)  # 4 rows per micro-batch on 8 data-parallel devices
    with pytest.raises(ValueError, match=r"batch_size / num_micro = 4 .* data\*fsdp = 8"):
        make_train_step(graphdef, OPT, cfg, mesh=mesh)
    with pytest.raises(ValueError, match="state_shardings"):
        make_train_step(graphdef, OPT, StepConfig(batch_size=16, num_micro=2), mesh=mesh)

    step = make_train_step(graphdef, OPT, StepConfig(batch_size=ROWS, num_micro=4, loss=LOSS))
    state = fresh_state(graphdef, host, OPT)
    good = train_batch(setup["rollouts"], config, 4, setup["old"], setup["ref"])
    with pytest.raises(ValueError, match=r"TrainBatch.input_ids must be \[num_micro=4"):
        step(state, train_batch(setup["rollouts"], config, 2, setup["old"], setup["ref"]))
    with pytest.raises(ValueError, match="TrainBatch.ref_logprobs is required"):
        step(state, good._replace(ref_logprobs=None))
    with pytest.raises(ValueError, match=r"TrainBatch.sft_weights must have shape \(4, 4\)"):
        step(state, good._replace(sft_weights=good.sft_weights[..., None]))
    with pytest.raises(ValueError, match="TrainBatch.vision.segment_ids"):
        step(state, good._replace(vision=good.vision._replace(segment_ids=good.vision.segment_ids[:2])))
    assert step.jitted._cache_size() == 0  # nothing was compiled


# ---- Memory for compute: remat policies, bfloat16 compute, bfloat16 Adam moments ------------------


@pytest.mark.parametrize("policy", ["dots", "offload"])
def test_remat_policies_make_the_step_without_remat(setup, single_device_steps, policy):
    """What each layer keeps for the backward pass trades memory for compute and changes nothing else:
    with `dots` or `offload` (`layers.REMAT_POLICIES`) the 2-micro-batch step's update and metrics equal
    the step without remat (float32, 1e-6). `full` is the 4-micro-batch step of `single_device_steps`."""
    batch = train_batch(setup["rollouts"], setup["config"], 2, setup["old"], setup["ref"])
    cfg = StepConfig(batch_size=ROWS, num_micro=2, loss=LOSS, chunk_size=CHUNK, remat=policy)
    state, metrics = get_step(setup["graphdef"], OPT, cfg)(fresh_state(setup["graphdef"], setup["host"], OPT), batch)
    want_state, want_metrics = single_device_steps[2]
    assert_trees_close(to_host(state).params, want_state.params, atol=1e-6)
    assert_trees_close(to_host(metrics), want_metrics, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"remat must be one of \('none', 'full', 'dots', 'offload'\)"):
        StepConfig(batch_size=ROWS, num_micro=2, loss=LOSS, remat="everything")


def test_bfloat16_compute_with_float32_master_weights_is_close_to_float32(setup, single_device_steps):
    """model.dtype bfloat16 over float32 parameters (the optimizer updates float32 master weights; the
    log-softmax runs in float32): the step's loss within 2% of the float32 step's, its parameters still
    float32 and each moved by at most the float32 step's largest move (Adam's first step is ~lr)."""
    from vrl_jax.models.weights import abstract_model
    graphdef, abstract = abstract_model(setup["config"], dtype=jnp.bfloat16)
    graphdef = nnx.split(nnx.merge(graphdef, abstract), nnx.Param)[0]  # the train state's (Param) graph
    batch = train_batch(setup["rollouts"], setup["config"], 2, setup["old"], setup["ref"])
    cfg = StepConfig(batch_size=ROWS, num_micro=2, loss=LOSS, chunk_size=CHUNK)
    state, metrics = get_step(graphdef, OPT, cfg)(fresh_state(graphdef, setup["host"], OPT), batch)
    want_state, want_metrics = single_device_steps[2]
    loss, want = float(metrics["loss"]), float(want_metrics["loss"])
    assert abs(loss - want) <= 0.02 * abs(want), (loss, want)
    params = to_host(state).params
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
    largest = max(float(np.abs(b - a).max()) for a, b in zip(jax.tree.leaves(setup["host"]),
                                                              jax.tree.leaves(want_state.params)))
    for a, b in zip(jax.tree.leaves(setup["host"]), jax.tree.leaves(params)):
        assert float(np.abs(b - a).max()) <= largest * 1.01


def test_bfloat16_adam_moments_track_float32_moments(setup):
    """optim.moments_dtype bfloat16: both moments stored in bfloat16 (half their memory), the update
    computed in float32. Two steps: the second step's loss equals the float32-moment run's within
    1e-4 (relative), and the parameters agree within 5e-5 (learning rate 1e-3)."""
    low = dataclasses.replace(OPT, moments_dtype="bfloat16")
    cfg = StepConfig(batch_size=ROWS, num_micro=2, loss=LOSS, chunk_size=CHUNK)
    first = train_batch(setup["rollouts"], setup["config"], 2, setup["old"], setup["ref"])
    second = train_batch(setup["second"], setup["config"], 2, setup["old2"], setup["ref2"])
    runs = {}
    for opt in (OPT, low):
        state = fresh_state(setup["graphdef"], setup["host"], opt)
        step = get_step(setup["graphdef"], opt, cfg)
        state, _ = step(state, first)
        state, metrics = step(state, second)
        runs[opt.moments_dtype] = (to_host(state), to_host(metrics))
    (s32, m32), (s16, m16) = runs["float32"], runs["bfloat16"]
    moments = [x for x in jax.tree.leaves(s16.opt_state) if x.ndim > 0]
    assert moments and all(x.dtype == jnp.bfloat16 for x in moments), {x.dtype for x in moments}
    assert abs(float(m16["loss"]) - float(m32["loss"])) <= 1e-4 * abs(float(m32["loss"]))
    assert_trees_close(s16.params, s32.params, atol=5e-5)
