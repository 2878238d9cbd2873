"""QLoRA's quantized base weights (`vrl_jax.models.quantize`): int8 and NF4 against a NumPy reference written
here, the quantized forward against the same weights widened to float32, and a LoRA step over a quantized
base that leaves the codes untouched."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from tests.rl_batches import make_model, make_rollouts, model_config, train_batch
from vrl_jax import configs
from vrl_jax.models import lora, quantize



def nf4_levels() -> np.ndarray:
    """NF4 built as QLoRA defines it: quantiles of N(0, 1), 8 positive and 7 negative from probability
    0.5 up to offset 0.9677 (the midpoint of 1 - 1/32 and 1 - 1/30, so that the outermost levels are finite),
    an exact 0, all divided by the largest."""
    from scipy.stats import norm
    offset = 0.9677083
    positive = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    negative = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    levels = np.sort(np.concatenate([positive, [0.0], negative]))
    return levels / np.abs(levels).max()


def test_the_nf4_table_is_the_normal_quantile_construction():
    np.testing.assert_allclose(quantize.NF4, nf4_levels(), rtol=0, atol=1e-6)


def reference_int8(w):
    """Per output channel: scale = max |w| over the inputs / 127, codes = round(w / scale)."""
    scale = np.abs(w).max(axis=1, keepdims=True) / 127
    return np.round(w / scale) * scale


def reference_nf4(w, block):
    """Per block of `block` inputs and output channel: the nearest NF4 level of w / absmax, times absmax,
    where absmax is the block's |w| maximum quantized again: 256 levels from the channel's smallest block
    absmax to its largest."""
    n, d_in, d_out = w.shape
    blocks = w.reshape(n, d_in // block, block, d_out)
    exact = np.abs(blocks).max(axis=2, keepdims=True)  # [n, blocks, 1, out]
    low, high = exact.min(axis=1, keepdims=True), exact.max(axis=1, keepdims=True)
    step = (high - low) / 255
    absmax = low + np.round((exact - low) / np.where(step > 0, step, 1)) * step
    assert np.all(np.abs(absmax - exact) <= step / 2 + 1e-6)
    levels = nf4_levels()
    nearest = levels[np.abs((blocks / absmax)[..., None] - levels).argmin(-1)]
    return (nearest * absmax).reshape(w.shape)


@pytest.mark.parametrize("scheme,d_in", [("int8", 96), ("nf4", 128), ("nf4", 32)])
def test_quantized_weights_widen_to_the_reference(scheme, d_in):
    w = np.random.RandomState(0).randn(3, d_in, 10).astype(np.float32)
    parts = quantize.QUANTIZERS[scheme](jnp.asarray(w))
    codes, scale = parts["_codes"], parts["_scale"]
    got = np.asarray(quantize.dequantize(parts, jnp.float32))
    if scheme == "int8":
        assert set(parts) == {"_codes", "_scale"}
        assert codes.dtype == jnp.int8 and codes.shape == w.shape and scale.shape == (3, 1, 10)
        want = reference_int8(w)
    else:  # two codes per byte; one absmax per block of 64 inputs (all of them when 64 does not divide), in 8 bits
        block = 64 if d_in % 64 == 0 else d_in
        assert codes.dtype == jnp.uint8 and codes.shape == (3, d_in // 2, 10)
        assert scale.dtype == jnp.uint8 and scale.shape == (3, d_in // block, 10)
        assert parts["_scale_min"].shape == parts["_scale_step"].shape == (3, 1, 10)
        want = reference_nf4(w, block)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # One layer's slice (what the decoder's scan hands each block) widens to the same weight.
    one = {k: v[1] for k, v in parts.items()}
    np.testing.assert_array_equal(np.asarray(quantize.dequantize(one, jnp.float32)), got[1])


def test_nf4_storage_is_about_4_14_bits_per_weight_at_7b_widths():
    """QLoRA's double quantization: 4-bit codes, an 8-bit absmax per 64 inputs, two float32 constants per
    output channel (Qwen2.5-7B's q projection, 3584 x 3584: 4 + 1/8 + 64/3584 bits)."""
    shapes = jax.eval_shape(quantize.quantize_nf4, jax.ShapeDtypeStruct((1, 3584, 3584), jnp.float32))
    bits = 8 * sum(np.prod(x.shape) * x.dtype.itemsize for x in shapes.values()) / 3584**2
    assert abs(bits - (4 + 1 / 8 + 64 / 3584)) < 1e-9 and bits < 4.15


def logits(model, rows):
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, *r: nnx.merge(graphdef, s)(*r))(state, *rows))


def qlora_model(config, scheme):
    model = make_model(config)
    lora.add_adapters(model, lora.LoraConfig(4, 8.0, r"^language\.layers\.(q|down)_w$"), jax.random.key(0))
    rs = np.random.RandomState(1)
    for name in ("q_w", "down_w"):  # nonzero B: the adapters take part in the forward
        b = getattr(model.language.layers, name + lora.B_SUFFIX)
        b.value = jnp.asarray(0.05 * rs.randn(*b.value.shape), jnp.float32)
    quantize.quantize_layers(model.language.layers, lora.projection_names(model.language.layers), scheme)
    return model


@pytest.mark.parametrize("scheme", quantize.SCHEMES)
def test_quantized_forward_equals_the_widened_weights(scheme):
    """The forward over codes equals the forward over the same weights widened once (`dequantize_layers`,
    what the export writes), and stays near the unquantized model's."""
    config = model_config()
    r = make_rollouts(config, 2, seed=3)
    rows = (r["input_ids"], r["positions"], r["attention_mask"])
    model = qlora_model(config, scheme)
    assert not hasattr(model.language.layers, "q_w") and model.language.layers.q_w_codes.value.dtype in (
        jnp.int8, jnp.uint8)
    got = logits(model, rows)
    quantize.dequantize_layers(model.language.layers, jnp.float32)
    assert model.language.layers.q_w.value.dtype == jnp.float32
    np.testing.assert_allclose(got, logits(model, rows), rtol=0, atol=1e-5)
    unquantized = make_model(config)
    assert np.abs(logits(unquantized, rows) - got).max() > 0  # the codes are not the weights


def test_a_qlora_step_moves_the_adapters_and_keeps_the_codes():
    from vrl_jax.rl.train_state import OptimizerConfig, create_train_state
    from vrl_jax.rl.train_step import StepConfig, make_train_step
    config = model_config()
    state, _, graphdef = create_train_state(qlora_model(config, "nf4"),
                                            OptimizerConfig(learning_rate=1e-2, train_connector=False))
    before = traverse_util.flatten_dict(jax.tree.map(np.asarray, state.params), sep=".")
    step = make_train_step(graphdef, OptimizerConfig(learning_rate=1e-2, train_connector=False),
                           StepConfig(batch_size=4, num_micro=2, with_entropy=False))
    new, metrics = step(state, train_batch(make_rollouts(config, 4, seed=2), config, num_micro=2))
    after = traverse_util.flatten_dict(jax.tree.map(np.asarray, new.params), sep=".")
    assert np.isfinite(float(metrics["loss"]))
    for path, value in before.items():
        if lora.is_adapter(path):
            assert np.abs(after[path] - value).max() > 0, path
        else:
            np.testing.assert_array_equal(after[path], value, err_msg=path)


def test_quantize_without_lora_is_a_config_error():
    c = configs.base_config()
    c.eval.splits = ("val",)
    c.model.lora.quantize = "nf4"
    with pytest.raises(configs.ConfigValidationError, match=r"config\.model\.lora\.quantize: 'nf4' stores the frozen"):
        configs.validate(c)
    c.model.lora.rank, c.model.lora.quantize = 4, "int4"
    with pytest.raises(configs.ConfigValidationError, match=r"config\.model\.lora\.quantize: 'int4' is not one of"):
        configs.validate(c)
