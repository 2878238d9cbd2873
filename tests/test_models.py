"""Qwen2-VL / Qwen2.5-VL parity with transformers (the oracle), float32, eager attention.

Tolerance: max |logit difference| <= 1e-4 over every real (non-padding) position, image
placeholder positions included.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests.tiny_models import IMAGE, build_hf_model, make_batch, random_image
from vrl_jax.models.config import ModelConfig
from vrl_jax.models.image_processing import ImageProcessor, pack_images
from vrl_jax.models.positions import rope_positions, text_positions
from vrl_jax.models.qwen_vl import VisionInputs
from vrl_jax.models.weights import load_hf_params

TOL = 1e-4
BF16_TOL = 0.05  # measured ~5e-3 on these models; bf16 has 8 mantissa bits
FAMILIES = [("qwen2_vl", False), ("qwen2_5_vl", True)]  # untied and tied embeddings


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    out = {}
    for family, tie in FAMILIES:
        d = str(tmp_path_factory.mktemp(family))
        out[family] = (d, build_hf_model(d, family, tie))
    return out


@pytest.fixture(scope="session")
def images():
    rs = np.random.RandomState(0)
    proc = ImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    pil = [random_image(rs, 90, 130), random_image(rs, 150, 70)]
    return pil, [proc(p) for p in pil]


def forward(model, batch, window_size, packed_bucket=256):
    graphdef, state = nnx.split(model)
    vision = None
    if batch["images"]:
        vb = pack_images(batch["images"], [packed_bucket], window_size)
        vision = VisionInputs(*(jnp.asarray(x) for x in (vb.pixel_values, vb.hw_pos, vb.segment_ids, vb.window_ids)))
    fn = jax.jit(lambda s, ids, pos, mask, vis: nnx.merge(graphdef, s)(ids, pos, mask, vis))
    return np.asarray(fn(state, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["positions"]),
                         jnp.asarray(batch["attention_mask"]), vision))


def hf_logits(hf, batch, pil_images=None):
    kwargs = dict(input_ids=torch.tensor(batch["input_ids"]).long(),
                  attention_mask=torch.tensor(batch["attention_mask"]).long(),
                  position_ids=torch.tensor(batch["positions"]).long())
    if batch["images"]:
        kwargs.update(pixel_values=torch.tensor(np.concatenate([p.patches for p in batch["images"]])),
                      image_grid_thw=torch.tensor(np.array([p.grid_thw for p in batch["images"]])),
                      mm_token_type_ids=torch.tensor(batch["types"]).long())
    with torch.no_grad():
        return hf(**kwargs).logits.numpy()


def max_diff(a, b, mask):
    return float(np.abs(a - b)[mask.astype(bool)].max())


def left_padded_text_batch():
    """Three text rows of 16, 11 and 5 real tokens, left-padded to 16."""
    rs = np.random.RandomState(1)
    ids = rs.randint(0, 999, (3, 16)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    pos, _ = text_positions(mask)
    return dict(input_ids=ids, attention_mask=mask, positions=pos, images=[])


@pytest.mark.parametrize("family,tie", FAMILIES)
def test_text_logits_with_left_padding(checkpoints, family, tie):
    d, hf = checkpoints[family]
    config = ModelConfig.from_pretrained(d)
    assert config.tie_word_embeddings == tie
    model = load_hf_params(d, config)
    assert (model.language.lm_head is None) == tie
    batch = left_padded_text_batch()
    assert max_diff(forward(model, batch, None), hf_logits(hf, batch), batch["attention_mask"]) <= TOL


@pytest.mark.parametrize("family,tie", FAMILIES)
def test_image_logits_one_image_and_two_sizes_in_a_batch(checkpoints, images, family, tie):
    d, hf = checkpoints[family]
    config = ModelConfig.from_pretrained(d)
    model = load_hf_params(d, config)
    _, processed = images
    assert processed[0].grid_thw != processed[1].grid_thw
    batch = make_batch([[5, 6, ("img", 0), 7, 8, 9], [11, ("img", 1), 12, 13, 14, 15, 16, 17, 18, 19]],
                       processed, config)
    assert batch["attention_mask"].min() == 0  # one row is left-padded
    ours = forward(model, batch, config.vision.window_size)
    ref = hf_logits(hf, batch)
    assert max_diff(ours, ref, batch["attention_mask"]) <= TOL
    single = make_batch([[3, ("img", 0), 4, 5]], processed, config)
    assert max_diff(forward(model, single, config.vision.window_size), hf_logits(hf, single),
                    single["attention_mask"]) <= TOL


def test_window_attention_is_exercised(checkpoints, images):
    """Qwen2.5-VL: the window/full split matters; treating every block as full attention breaks parity."""
    d, hf = checkpoints["qwen2_5_vl"]
    config = ModelConfig.from_pretrained(d)
    full = [config.vision.is_full_attention(i) for i in range(config.vision.depth)]
    assert any(full) and not all(full)
    model = load_hf_params(d, config)
    _, processed = images
    batch = make_batch([[5, ("img", 0), 6]], processed, config)
    vb = pack_images(batch["images"], [256], config.vision.window_size)
    n_windows = len(set(vb.window_ids[vb.window_ids >= 0].tolist()))
    assert n_windows > 1
    ref = hf_logits(hf, batch)
    assert max_diff(forward(model, batch, config.vision.window_size), ref, batch["attention_mask"]) <= TOL
    # window_size None makes window ids equal frame ids: every block attends to the whole frame.
    assert max_diff(forward(model, batch, None), ref, batch["attention_mask"]) > 1e-3


def assert_positions_equal_get_rope_index(hf, config, processed):
    """Our host M-RoPE positions and decode starts equal the HF model's `get_rope_index` (two rows, left
    padding, two images of different sizes)."""
    batch = make_batch([[1, ("img", 0), 2, ("img", 1), 3], [4, 5, ("img", 1), 6]], processed, config)
    with torch.no_grad():
        ref, deltas = hf.model.get_rope_index(
            torch.tensor(batch["input_ids"]).long(), torch.tensor(batch["types"]),
            torch.tensor(np.array([p.grid_thw for p in batch["images"]])),
            attention_mask=torch.tensor(batch["attention_mask"]))
    np.testing.assert_array_equal(ref.numpy() * batch["attention_mask"], batch["positions"])
    lengths = batch["attention_mask"].sum(1)
    np.testing.assert_array_equal(deltas.numpy().reshape(-1) + lengths, batch["next_position"])


def test_positions_equal_transformers_get_rope_index(checkpoints, images):
    d, hf = checkpoints["qwen2_5_vl"]
    assert_positions_equal_get_rope_index(hf, ModelConfig.from_pretrained(d), images[1])


def test_rope_positions_rejects_mismatched_grids(images):
    types = np.array([[0, 1, 1, 0]])
    with pytest.raises(ValueError, match="placeholder tokens but its grid"):
        rope_positions(types, np.ones_like(types), np.array([[1, 4, 4]]), 2)
    with pytest.raises(ValueError, match="more image placeholder groups"):
        rope_positions(types, np.ones_like(types), np.zeros((0, 3)), 2)


def test_bfloat16_logits_close_to_float32(checkpoints, images):
    d, _ = checkpoints["qwen2_5_vl"]
    config = ModelConfig.from_pretrained(d)
    _, processed = images
    batch = make_batch([[5, ("img", 0), 6, 7]], processed, config)
    f32 = forward(load_hf_params(d, config), batch, config.vision.window_size)
    bf16_model = load_hf_params(d, config, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    assert bf16_model.language.embed.value.dtype == jnp.bfloat16
    bf16 = forward(bf16_model, batch, config.vision.window_size)
    diff = max_diff(bf16, f32, batch["attention_mask"])
    assert 0 < diff <= BF16_TOL


def test_image_features_land_on_placeholders(checkpoints, images):
    """Changing the image changes logits at and after its placeholders, never before."""
    d, _ = checkpoints["qwen2_vl"]
    config = ModelConfig.from_pretrained(d)
    model = load_hf_params(d, config)
    proc = ImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    rs = np.random.RandomState(5)
    a, b = proc(random_image(rs, 90, 130)), proc(random_image(rs, 90, 130))
    la = forward(model, make_batch([[5, 6, ("img", 0), 7]], [a], config), None)
    lb = forward(model, make_batch([[5, 6, ("img", 0), 7]], [b], config), None)
    first_image = 3
    assert np.abs(la[0, :first_image] - lb[0, :first_image]).max() < 1e-6
    assert np.abs(la[0, first_image:] - lb[0, first_image:]).max() > 1e-3
    assert IMAGE == config.image_token_id


@pytest.mark.parametrize("family,tie", FAMILIES)
def test_banded_vision_attention_equals_transformers(checkpoints, images, family, tie):
    """With `max_segment` (the processor's most patches per image) the vision tower attends over chunks of
    the packed buffer within one image's reach instead of a [P, P] mask: the logits still equal
    transformers', with several images of different sizes (and Qwen2.5-VL's windows) in one buffer."""
    from vrl_jax.models.image_processing import ImageProcessor
    from vrl_jax.models.vision import band_shape
    d, hf = checkpoints[family]
    config = ModelConfig.from_pretrained(d)
    model = load_hf_params(d, config)
    _, processed = images
    rows = [[5, ("img", 0), 6], [7, 8, ("img", 1), 9], [10, ("img", 0), 11, ("img", 1)]]
    batch = make_batch(rows, [processed[0], processed[1], processed[0], processed[1]], config)
    longest = ImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 64).max_patches  # the processor's bound
    assert max(int(np.prod(p.grid_thw)) for p in processed) <= longest
    model.visual.max_segment = longest
    assert band_shape(1024, longest) is not None  # the banded path runs
    ref = hf_logits(hf, batch)
    banded = max_diff(forward(model, batch, config.vision.window_size, packed_bucket=1024), ref,
                      batch["attention_mask"])
    assert banded <= TOL
    # A band that cannot reach across an image breaks parity: the test sees the band.
    model.visual.max_segment = 16
    broken = max_diff(forward(model, batch, config.vision.window_size, packed_bucket=1024), ref,
                      batch["attention_mask"])
    assert broken > max(100 * banded, 1e-5), (broken, banded)


def test_unrolled_layers_equal_the_scan(checkpoints):
    """`Qwen2Decoder.unroll_layers` (config `model.unroll_layers`) runs the same stacked weights as straight-line
    code: logits equal transformers' and the scan's, the gradient (entries up to ~40) and a prefill's KV cache
    equal the scan's (float32; 1e-4 absolute for the gradient, 1e-5 otherwise: the sums associate differently),
    and the compiled program has no loop left (the setting is not ignored)."""
    from vrl_jax.models.qwen2 import KVCache
    d, hf = checkpoints["qwen2_5_vl"]
    config = ModelConfig.from_pretrained(d)
    batch = left_padded_text_batch()
    ids, pos, mask = (jnp.asarray(batch[k]) for k in ("input_ids", "positions", "attention_mask"))
    out = {}
    for unroll in (False, True):
        model = load_hf_params(d, config)
        model.language.unroll_layers = unroll
        graphdef, state = nnx.split(model)
        logits = forward(model, batch, None)
        loss = lambda s: jnp.sum(jnp.tanh(nnx.merge(graphdef, s)(ids, pos, mask, None)))  # noqa: E731
        grad = jax.jit(jax.grad(loss))
        assert (" while(" in grad.lower(state).as_text(dialect="hlo")) != unroll
        cache = KVCache.zeros(config.text, 3, 20)

        def prefill(s, cache):
            return nnx.merge(graphdef, s).hidden_states(ids, pos, mask, cache=cache, write_index=0,
                                                        kv_valid=jnp.pad(mask, ((0, 0), (0, 4))).astype(bool))
        out[unroll] = logits, jax.tree.leaves(grad(state)), jax.jit(prefill)(state, cache)
    assert max_diff(out[True][0], hf_logits(hf, batch), batch["attention_mask"]) <= TOL
    assert max_diff(out[True][0], out[False][0], batch["attention_mask"]) <= 1e-5
    for a, b in zip(out[True][1], out[False][1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out[True][2]), jax.tree.leaves(out[False][2])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
