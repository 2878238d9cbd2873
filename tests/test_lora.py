"""LoRA adapters on the language model's projections (`vrl_jax.models.lora`), on the tiny Qwen2.5-VL.

The reference for the adapted forward is the base model with merged weights W + A @ B * alpha / r;
the reference for the gradients is central finite differences in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from jax.sharding import PartitionSpec as P

from tests.rl_batches import make_model, make_rollouts, model_config
from vrl_jax.errors import UserError
from vrl_jax.models import lora

CONFIG = lora.LoraConfig(rank=4, alpha=8.0, targets_regex=r"^language\.layers\.(q|v|o|down)_w$")
TARGETS = ("q_w", "v_w", "o_w", "down_w")


@pytest.fixture(scope="module")
def config():
    return model_config()


@pytest.fixture(scope="module")
def rows(config):
    r = make_rollouts(config, 4, seed=1)
    return r["input_ids"], r["positions"], r["attention_mask"]


def logits(model, rows, lora_scale=1.0):
    """The text-only forward [B, T, V], jitted with lora_scale traced (a runtime value, not a constant)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, ids, pos, mask, scale: nnx.merge(graphdef, s)(ids, pos, mask, lora_scale=scale))
    return np.asarray(fn(state, *rows, jnp.float32(lora_scale)))


def randomise_adapters(model, seed=0):
    """Nonzero A and B (B large enough that the update moves the logits visibly)."""
    rs = np.random.RandomState(seed)
    for name in TARGETS:
        for suffix, std in ((lora.A_SUFFIX, 0.3), (lora.B_SUFFIX, 0.05)):
            p = getattr(model.language.layers, name + suffix)
            p.value = jnp.asarray(std * rs.randn(*p.value.shape), p.value.dtype)


def adapted_model(config, seed=0):
    model = make_model(config)
    names = lora.add_adapters(model, CONFIG, jax.random.key(seed))
    assert sorted(names) == sorted(lora.PATH_PREFIX + n for n in TARGETS)
    return model


def test_zero_b_forward_equals_base_model_exactly(config, rows):
    base = logits(make_model(config), rows)
    model = adapted_model(config)
    a = model.language.layers.q_w_lora_a.value
    assert a.shape == (config.text.num_layers, config.text.hidden_size, CONFIG.rank) and float(jnp.abs(a).max()) > 0
    assert model.language.layers.down_w_lora_b.value.shape == (config.text.num_layers, CONFIG.rank,
                                                              config.text.hidden_size)
    np.testing.assert_array_equal(logits(model, rows), base)  # max diff 0.0


def test_adapted_forward_equals_merged_weights(config, rows):
    model = adapted_model(config)
    randomise_adapters(model)
    merged = make_model(config)
    layers = model.language.layers
    for name in TARGETS:
        a, b = getattr(layers, name + lora.A_SUFFIX).value, getattr(layers, name + lora.B_SUFFIX).value
        w = getattr(merged.language.layers, name)
        w.value = w.value + jnp.einsum("lir,lro->lio", a, b, precision="highest") * CONFIG.scaling
    got, want = logits(model, rows), logits(merged, rows)
    assert np.abs(want - logits(make_model(config), rows)).max() > 1e-2  # the update matters
    assert np.abs(got - want).max() < 1e-5  # float32


def test_adapters_off_give_base_logits_with_nonzero_adapters(config, rows):
    model = adapted_model(config)
    randomise_adapters(model)
    base = logits(make_model(config), rows)
    assert np.abs(logits(model, rows) - base).max() > 1e-2
    np.testing.assert_array_equal(logits(model, rows, lora_scale=0.0), base)


def test_adapter_gradients_equal_finite_differences(config, rows):
    """d loss / d A and d loss / d B at two random entries of each adapter against central differences
    (Richardson-extrapolated from steps 1e-2 and 5e-3), parameters and matmuls in float64. The model
    casts to float32 where it always does (norms, attention scores, rotary tables, logits), so the loss
    carries ~1e-7 relative noise, ~1e-5 on the quotients: tolerance 1e-3 relative + 2e-5 absolute,
    for gradients from 1e-3 to 0.9."""
    with jax.enable_x64(True):
        model = adapted_model(config)
        randomise_adapters(model)
        model.dtype = jnp.float64
        nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.float64), nnx.state(model)))
        is_adapter = lambda path, _: str(path[-1]).endswith((lora.A_SUFFIX, lora.B_SUFFIX))  # noqa: E731
        graphdef, adapters, rest = nnx.split(model, is_adapter, ...)
        ids, pos, mask = rows
        weights = jnp.asarray(np.random.RandomState(3).randn(*ids.shape, config.text.vocab_size))

        def loss(adapters):
            out = nnx.merge(graphdef, adapters, rest)(ids, pos, mask)
            return jnp.sum(out * weights * mask[..., None]) / mask.sum()

        loss_fn = jax.jit(loss)
        grads = jax.jit(jax.grad(loss))(adapters)
        flat_a, flat_g = nnx.to_flat_state(adapters), dict(nnx.to_flat_state(grads))
        def central(path, value, idx, h):
            out = []
            for step in (h, -h):
                bumped = value.copy()
                bumped[idx] += step
                out.append(float(loss_fn(nnx.from_flat_state([(p, v.replace(jnp.asarray(bumped)) if p == path
                                                                 else v) for p, v in flat_a]))))
            return (out[0] - out[1]) / (2 * h)

        rs, h, checked = np.random.RandomState(4), 1e-2, 0
        for path, var in flat_a:
            value = np.asarray(var.value)
            for _ in range(2):
                idx = tuple(rs.randint(n) for n in value.shape)
                # Richardson: (4 D(h/2) - D(h)) / 3 cancels the h^2 term of the central difference
                numeric = (4 * central(path, value, idx, h / 2) - central(path, value, idx, h)) / 3
                analytic = float(np.asarray(flat_g[path].value)[idx])
                assert abs(analytic - numeric) <= 1e-3 * abs(numeric) + 2e-5, (path, idx, analytic, numeric)
                checked += abs(analytic) > 1e-4
        assert checked >= len(flat_a)  # at least half the checked entries have a sizeable gradient


def test_a_lora_train_step_trains_the_adapters_alone_by_the_chain_rule(config):
    """With adapters, the step's gradient holds the adapters (and the connector, which its flag trains) and no
    language-model weight; the adapters' gradients equal the chain rule through the merged weight
    W' = W + A B s (G = dL/dW' from the plain model: dL/dA = G (B s)^T, dL/dB = A^T G s), and the step moves
    the adapters while leaving every base weight bit for bit."""
    from tests.rl_batches import train_batch
    from vrl_jax.rl.train_state import OptimizerConfig, create_train_state
    from vrl_jax.rl.train_step import StepConfig, batch_gradients, make_train_step

    model = adapted_model(config)
    randomise_adapters(model)
    opt = OptimizerConfig(learning_rate=1e-2, train_vit=False, train_connector=True, clip_grad_norm=None)
    state, _, graphdef = create_train_state(model, opt)
    batch = train_batch(make_rollouts(config, 4, seed=2), config, num_micro=2)
    cfg = StepConfig(batch_size=4, num_micro=2, with_entropy=False)
    grads = batch_gradients(state.params, batch, graphdef=graphdef, opt_cfg=opt, cfg=cfg)[0]
    layers = grads["language"]["layers"]
    assert sorted(layers) == sorted(n + suffix for n in TARGETS for suffix in (lora.A_SUFFIX, lora.B_SUFFIX))
    assert set(grads) == {"language", "visual"} and all(k.startswith("merger") for k in grads["visual"])

    merged = make_model(config)  # W' as plain weights; its full gradient gives G
    params = state.params["language"]["layers"]
    for name in TARGETS:
        w = getattr(merged.language.layers, name)
        w.value = w.value + jnp.einsum("lir,lro->lio", params[name + lora.A_SUFFIX], params[name + lora.B_SUFFIX],
                                       precision="highest") * CONFIG.scaling
    m_state, _, m_graphdef = create_train_state(merged, opt)
    g = batch_gradients(m_state.params, batch, graphdef=m_graphdef, opt_cfg=OptimizerConfig(), cfg=cfg)[0]
    for name in TARGETS:
        a, b, gw = params[name + lora.A_SUFFIX], params[name + lora.B_SUFFIX], g["language"]["layers"][name]
        want_a = jnp.einsum("lio,lro->lir", gw, b, precision="highest") * CONFIG.scaling
        want_b = jnp.einsum("lir,lio->lro", a, gw, precision="highest") * CONFIG.scaling
        for got, want in ((layers[name + lora.A_SUFFIX], want_a), (layers[name + lora.B_SUFFIX], want_b)):
            scale = float(jnp.abs(want).max())
            assert scale > 0 and float(jnp.abs(got - want).max()) <= 1e-4 * scale, name

    before = jax.tree.map(np.asarray, state.params)
    step = make_train_step(graphdef, opt, cfg)
    new, metrics = step(state, batch)
    after = jax.tree.map(np.asarray, new.params)
    flat_before, flat_after = (traverse_util.flatten_dict(t, sep=".") for t in (before, after))
    for path, value in flat_before.items():
        trained = lora.is_adapter(path) or path.startswith("visual.merger")
        if trained:
            assert np.abs(flat_after[path] - value).max() > 0, path
        else:
            np.testing.assert_array_equal(flat_after[path], value, err_msg=path)
    moments = new.opt_state[0].mu  # Adam's first moment: a flat dict over the trained parameters
    assert moments and all(lora.is_adapter(k) or k.startswith("visual.merger") for k in moments)


def test_a_sharded_qlora_step_with_dropout_equals_the_single_device_one(config):
    """On a (data 2, fsdp 2, tensor 2) mesh, adapters and the NF4 codes and scales split by their sharding
    rules, and adapter dropout on, one step gives the single-device step's adapters, moments and metrics."""
    from vrl_jax import sharding as shd
    from vrl_jax.models import quantize
    from vrl_jax.rl.train_state import OptimizerConfig, create_train_state, train_state_shardings
    from vrl_jax.rl.train_step import StepConfig, batch_shardings, make_train_step
    from tests.rl_batches import train_batch

    def model():
        m = adapted_model(config)
        randomise_adapters(m)
        # Dropout too: the masks must not depend on the layout.
        m.language.lora = lora.LoraConfig(CONFIG.rank, CONFIG.alpha, CONFIG.targets_regex, dropout=0.2)
        quantize.quantize_layers(m.language.layers, lora.projection_names(m.language.layers), "nf4")
        return m

    opt = OptimizerConfig(learning_rate=1e-2, train_connector=False)
    cfg = StepConfig(batch_size=8, num_micro=2, with_entropy=False)
    batch = train_batch(make_rollouts(config, 8, seed=5), config, num_micro=2)
    state, _, graphdef = create_train_state(model(), opt)
    want, want_metrics = make_train_step(graphdef, opt, cfg)(state, batch)
    mesh = shd.make_mesh((2, 2, 2))
    state, _, _ = create_train_state(model(), opt, mesh=mesh)
    layers = state.params["language"]["layers"]
    assert layers["q_w_lora_a"].sharding.spec == P(None, "fsdp", None)
    assert layers["down_w_lora_a"].sharding.spec == P(None, ("fsdp", "tensor"), None)
    b_sh = batch_shardings(batch, mesh)
    step = make_train_step(graphdef, opt, cfg, mesh=mesh, state_shardings=train_state_shardings(state),
                           batch_shardings=b_sh)
    got, metrics = step(state, shd.put(batch, b_sh))
    for path, value in traverse_util.flatten_dict(jax.device_get(want.params), sep=".").items():
        np.testing.assert_allclose(np.asarray(traverse_util.flatten_dict(jax.device_get(got.params), sep=".")[path]),
                                   np.asarray(value), atol=1e-5, err_msg=path)
    for key, value in jax.device_get(want_metrics).items():
        np.testing.assert_allclose(float(metrics[key]), float(value), rtol=1e-5, atol=1e-6, err_msg=key)


def test_dropout_drops_the_share_asked_and_rescales_the_rest():
    """`lora.with_dropout` + `project`'s mask: about `rate` of the adapters' inputs are zeroed, the rest
    scaled by 1 / (1 - rate); each projection of a layer, and each layer, draws its own mask; no key, no
    dropout."""
    x = jnp.ones((64, 512), jnp.float32)
    stacked = lora.with_dropout({"q_w": jnp.zeros((3, 512, 2))}, 0.25, jax.random.key(7))
    assert stacked[lora.DROPOUT_KEY].shape == (3, 2) and stacked[lora.DROPOUT_RATE].shape == (3,)
    layer = lambda i: {k: v[i] for k, v in stacked.items()}  # noqa: E731 - what the scan hands a block
    masks = {(i, n): np.asarray(lora._dropped(x, layer(i), n)) for i in range(3) for n in ("q_w", "v_w")}
    for m in masks.values():
        assert set(np.unique(m)) == {0.0, np.float32(1 / 0.75)}
        assert abs((m == 0).mean() - 0.25) < 0.01
    firsts = [m.ravel()[:4096] for m in masks.values()]
    assert all(not np.array_equal(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1:])
    assert lora.with_dropout({"q_w": jnp.zeros((3, 512, 2))}, 0.25, None).keys() == {"q_w"}
    assert lora.with_dropout({"q_w": jnp.zeros((3, 512, 2))}, 0.0, jax.random.key(7)).keys() == {"q_w"}


def test_dropout_is_in_the_update_only_and_remat_redraws_the_same_masks(config):
    """With LoRA dropout the update's gradient depends on the state's key, is the same with and without remat
    (the recomputed forward draws the same masks), and log-prob forwards (sampler, old and reference
    log-probs) run without dropout."""
    import dataclasses as dc

    from tests.rl_batches import train_batch
    from vrl_jax.rl.logprobs import make_logprob_fn
    from vrl_jax.rl.train_state import OptimizerConfig, create_train_state
    from vrl_jax.rl.train_step import StepConfig, batch_gradients

    def state_of(dropout):
        model = adapted_model(config)
        randomise_adapters(model)
        model.language.lora = dc.replace(CONFIG, dropout=dropout)
        return create_train_state(model, OptimizerConfig(train_connector=False))

    batch = train_batch(make_rollouts(config, 4, seed=2), config, num_micro=2)
    cfg = StepConfig(batch_size=4, num_micro=2, with_entropy=False)
    (state, _, graphdef), (plain, _, plain_graphdef) = state_of(0.3), state_of(0.0)
    grads = lambda c, key, st=state, g=graphdef: batch_gradients(  # noqa: E731
        st.params, batch, graphdef=g, opt_cfg=OptimizerConfig(train_connector=False), cfg=c, key=key)[0]
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])  # noqa: E731
    g1, g1_remat = flat(grads(cfg, jax.random.key(1))), flat(grads(dc.replace(cfg, remat="full"), jax.random.key(1)))
    g2, g0 = flat(grads(cfg, jax.random.key(2))), flat(grads(cfg, jax.random.key(1), plain, plain_graphdef))
    np.testing.assert_allclose(g1_remat, g1, rtol=1e-5, atol=1e-7)
    assert np.abs(g1 - g2).max() > 1e-3 * np.abs(g1).max() and np.abs(g1 - g0).max() > 1e-3 * np.abs(g0).max()
    logprobs = make_logprob_fn(graphdef)(state.params, batch).logprobs
    np.testing.assert_array_equal(np.asarray(logprobs), np.asarray(make_logprob_fn(plain_graphdef)(
        plain.params, batch).logprobs))


def test_config_mistakes_are_user_errors(config):
    model = make_model(config)
    with pytest.raises(UserError, match=r"matches none of .*language\.layers\.q_w"):
        lora.add_adapters(model, lora.LoraConfig(4, 8.0, r"vision"), jax.random.key(0))
    with pytest.raises(UserError, match="targets_regex"):
        lora.LoraConfig(4, 8.0, "(q")
    with pytest.raises(UserError, match="rank"):
        lora.LoraConfig(0, 8.0, "q_w")
    with pytest.raises(UserError, match=r"dropout: expected a number in \[0, 1\)"):
        lora.LoraConfig(4, 8.0, "q_w", dropout=1.0)
