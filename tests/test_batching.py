"""Trajectory layout: sampler output -> rows the train step consumes, checked against the training forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.tiny_models import build_hf_model, make_batch, random_image
from vrl_jax.models.config import ModelConfig
from vrl_jax.models.image_processing import ImageProcessor, pack_images
from vrl_jax.models.processor import ModelInputs
from vrl_jax.models.qwen_vl import VisionInputs
from vrl_jax.models.weights import load_hf_params
from vrl_jax.rl import batching
from vrl_jax.rl.logprobs import sequence_stats
from vrl_jax.sampling.sampler import Sampler, SamplerConfig

N_NEW, N_SAMPLES, TEMPERATURE = 10, 2, 0.8


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("rollout"))
    build_hf_model(d, "qwen2_5_vl", tie=False, seed=11, wide=True)
    config = ModelConfig.from_pretrained(d)
    model = load_hf_params(d, config)
    rs = np.random.RandomState(0)
    proc = ImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    images = [proc(random_image(rs, 90, 130)), proc(random_image(rs, 150, 70))]
    b = make_batch([[5, 6, ("img", 0), 7, 8, 9], [11, ("img", 1), 12, 13, 14, 15, 16, 17, 18, 19]], images, config)
    vb = pack_images(b["images"], [256], config.vision.window_size)
    inputs = ModelInputs(b["input_ids"], b["attention_mask"], b["positions"], b["next_position"], vb,
                         row_images=((images[0],), (images[1],)))
    sampler, params = Sampler.for_model(model, SamplerConfig(max_new_tokens=N_NEW, num_samples=N_SAMPLES,
                                                             stop_token_ids=(1023,)))
    out = jax.device_get(sampler(params, inputs, jax.random.key(0), temperature=TEMPERATURE))
    graphdef, state = nnx.split(model, nnx.Param)
    return config, graphdef, state.to_pure_dict(), inputs, out


def forward_logprobs(config, graphdef, params, seqs, row_images):
    """The training forward over the laid-out rows, images packed in row order."""
    flat = [im for b in seqs.prompt_index for im in row_images[b]]
    vb = pack_images(flat, [512], config.vision.window_size)
    vision = tuple(jnp.asarray(x) for x in (vb.pixel_values, vb.hw_pos, vb.segment_ids, vb.window_ids))
    from vrl_jax.models.qwen_vl import VisionInputs
    stats = sequence_stats(graphdef, params, jnp.asarray(seqs.input_ids), jnp.asarray(seqs.positions),
                           jnp.asarray(seqs.attention_mask), jnp.asarray(seqs.targets), VisionInputs(*vision),
                           chunk_size=256, temperature=TEMPERATURE)
    return np.asarray(stats.logprobs)


def test_sampled_rows_line_up_with_the_training_forward(sampled):
    config, graphdef, params, inputs, out = sampled
    seqs = batching.build_sequences(inputs, out.tokens, out.mask, out.logprobs, N_SAMPLES, pad_id=0)
    length = inputs.input_ids.shape[1]
    assert seqs.input_ids.shape == (4, length + N_NEW)
    np.testing.assert_array_equal(seqs.prompt_index, [0, 0, 1, 1])
    # Each loss position's target is the sampled token, and the loss covers exactly the response.
    mask = seqs.loss_mask > 0
    np.testing.assert_array_equal(seqs.targets[mask], np.asarray(out.tokens)[np.asarray(out.mask) > 0])
    np.testing.assert_array_equal(mask.sum(1), np.asarray(out.lengths))
    # Response positions continue each prompt's M-RoPE positions.
    np.testing.assert_array_equal(seqs.positions[0, :, length], np.repeat(inputs.next_position, N_SAMPLES))
    # The rollout policy's log-probs equal a fresh training forward's (on-policy ratio 1).
    fresh = forward_logprobs(config, graphdef, params, seqs, inputs.row_images)
    assert np.abs(fresh[mask] - seqs.old_logprobs[mask]).max() <= 1e-4
    # response_slice / response_to_row are inverse layouts.
    back = batching.response_slice(batching.response_to_row(np.asarray(out.logprobs), length), length, N_NEW)
    np.testing.assert_array_equal(back, np.asarray(out.logprobs))


def test_replaced_rows_train_on_the_reference_tokens(sampled):
    config, graphdef, params, inputs, out = sampled
    reference = [7, 8, 9, 1023]
    tokens, mask, logprobs = batching.replace_responses(out.tokens, out.mask, out.logprobs, [2], [reference])
    seqs = batching.build_sequences(inputs, tokens, mask, logprobs, N_SAMPLES, pad_id=0)
    row = seqs.loss_mask[2] > 0
    np.testing.assert_array_equal(seqs.targets[2][row], reference)
    assert (seqs.old_logprobs[2] == 0).all()
    np.testing.assert_array_equal(seqs.targets[0][seqs.loss_mask[0] > 0],
                                  np.asarray(out.tokens)[0][np.asarray(out.mask)[0] > 0])  # others untouched


def test_long_targets_widen_the_rows_instead_of_losing_their_end(sampled):
    """A DyME target longer than the N sampled columns used to be cut at N (answer line and end token
    lost, silently). insert_targets widens every row with masked columns to the next power of two
    (capped), keeps the sampled rows' training forward unchanged, and counts what still does not fit."""
    config, graphdef, params, inputs, out = sampled
    long_target = list(range(100, 113)) + [1023]  # 14 tokens > N_NEW = 10
    got = batching.insert_targets(out.tokens, out.mask, out.logprobs, [2], [long_target], max_width=64)
    assert got.tokens.shape == got.mask.shape == got.logprobs.shape == (4, 32) and got.truncated == 0
    seqs = batching.build_sequences(inputs, got.tokens, got.mask, got.logprobs, N_SAMPLES, pad_id=0)
    np.testing.assert_array_equal(seqs.targets[2][seqs.loss_mask[2] > 0], long_target)  # end token kept
    mask = seqs.loss_mask > 0
    sampled_rows = np.array([0, 1, 3])
    np.testing.assert_array_equal(mask[sampled_rows].sum(1), np.asarray(out.lengths)[sampled_rows])
    fresh = forward_logprobs(config, graphdef, params, seqs, inputs.row_images)
    on_policy = mask.copy()
    on_policy[2] = False
    assert np.abs(fresh[on_policy] - seqs.old_logprobs[on_policy]).max() <= 1e-4  # the padding changes nothing
    # The cap still binds: cut at the cap and counted; short targets keep the sampled width.
    capped = batching.insert_targets(out.tokens, out.mask, out.logprobs, [0, 2], [long_target, [5, 1023]],
                                    max_width=12)
    assert capped.tokens.shape == (4, 12) and capped.truncated == 1
    np.testing.assert_array_equal(capped.tokens[0], long_target[:12])
    short = batching.insert_targets(out.tokens, out.mask, out.logprobs, [2], [[5, 6, 1023]], max_width=64)
    assert short.tokens.shape == (4, N_NEW) and short.truncated == 0
    np.testing.assert_array_equal(short.mask[2], [1, 1, 1] + [0] * (N_NEW - 3))
    assert batching.truncated_targets([[1] * 5, [1] * 11, [1] * 10], 10) == 1


def test_groups_from_rounds_of_different_lengths_are_left_padded(sampled):
    config, graphdef, params, inputs, out = sampled
    texts = ["t"] * 4
    rewards = {"total": np.arange(4, dtype=np.float32)}
    first = batching.Rollouts(inputs, [{"id": 0}, {"id": 1}], np.array([True, True]), out.tokens, out.mask,
                             out.logprobs, out.lengths, out.stopped, texts, rewards)
    shorter = first._replace(inputs=inputs._replace(input_ids=inputs.input_ids[:, 3:],
                                                    attention_mask=inputs.attention_mask[:, 3:],
                                                    positions=inputs.positions[:, :, 3:]))
    picked = batching.select_groups([(shorter, 1), (first, 0)], N_SAMPLES, pad_id=0)
    assert picked.inputs.input_ids.shape == inputs.input_ids.shape
    np.testing.assert_array_equal(picked.inputs.input_ids[0, 3:], inputs.input_ids[1, 3:])
    assert (picked.inputs.attention_mask[0, :3] == 0).all()
    np.testing.assert_array_equal(picked.rewards["total"], [2, 3, 0, 1])
    assert [e["id"] for e in picked.examples] == [1, 0]


def test_target_width_is_the_next_power_of_two_capped():
    assert [batching.target_width(n, 224) for n in (1, 32, 33, 74, 104, 128, 129, 300)] == [
        32, 32, 64, 128, 128, 128, 224, 224]
    assert batching.target_width(5, 16) == 16  # the cap wins over the smallest width


class _Packer:
    """The processor surface `pack_micro_batches` uses, over a model config."""

    def __init__(self, config):
        self.config = config

    def pack(self, images, buckets, pixels=True):
        return pack_images(images, buckets, self.config.vision.window_size, pixels=pixels)


@pytest.mark.parametrize("num_micro", [1, 2])
def test_a_groups_image_is_encoded_once_and_feeds_every_sample(sampled, num_micro):
    """`pack_micro_batches` packs each prompt's image once per micro-batch (not once per sample): the
    training forward's log-probs and gradient equal those with every row's image packed and encoded."""
    config, graphdef, params, inputs, out = sampled
    seqs = batching.build_sequences(inputs, out.tokens, out.mask, out.logprobs, N_SAMPLES, pad_id=0)
    vision = batching.pack_micro_batches(inputs.row_images, seqs.prompt_index, num_micro, _Packer(config), [256, 512])
    per = len(seqs.prompt_index) // num_micro
    for m in range(num_micro):  # each micro-batch encodes its prompts' images once, not once per row
        prompts = set(seqs.prompt_index[m * per:(m + 1) * per])
        patches = sum(int(np.prod(im.grid_thw)) for b in prompts for im in inputs.row_images[b])
        assert (vision.segment_ids[m] >= 0).sum() == patches
    from vrl_jax.models.qwen_vl import VisionInputs

    def loss(p, m):
        rows = slice(m * per, (m + 1) * per)
        v = VisionInputs(*(None if x is None else jnp.asarray(x[m]) for x in vision))
        stats = sequence_stats(graphdef, p, jnp.asarray(seqs.input_ids[rows]), jnp.asarray(seqs.positions[:, rows]),
                               jnp.asarray(seqs.attention_mask[rows]), jnp.asarray(seqs.targets[rows]), v,
                               chunk_size=256, temperature=TEMPERATURE)
        return (stats.logprobs * jnp.asarray(seqs.loss_mask[rows])).sum(), stats.logprobs

    def reference_loss(p):
        v = forward_vision(config, seqs, inputs.row_images)
        stats = sequence_stats(graphdef, p, jnp.asarray(seqs.input_ids), jnp.asarray(seqs.positions),
                               jnp.asarray(seqs.attention_mask), jnp.asarray(seqs.targets), v,
                               chunk_size=256, temperature=TEMPERATURE)
        return (stats.logprobs * jnp.asarray(seqs.loss_mask)).sum(), stats.logprobs

    (ref_total, ref_lp), ref_grad = jax.value_and_grad(reference_loss, has_aux=True)(params)
    grads, lps = [], []
    for m in range(num_micro):
        (_, lp), g = jax.value_and_grad(lambda p: loss(p, m), has_aux=True)(params)
        grads.append(g)
        lps.append(np.asarray(lp))
    np.testing.assert_allclose(np.concatenate(lps), np.asarray(ref_lp), atol=1e-5)
    grad = jax.tree.map(lambda *g: sum(g), *grads)
    vit = grad["visual"]["blocks"]["qkv_w"]
    assert float(jnp.abs(vit).max()) > 0  # the vision tower does get a gradient
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def forward_vision(config, seqs, row_images):
    from vrl_jax.models.qwen_vl import VisionInputs
    flat = [im for b in seqs.prompt_index for im in row_images[b]]
    vb = pack_images(flat, [512], config.vision.window_size)
    return VisionInputs(*(jnp.asarray(x) for x in (vb.pixel_values, vb.hw_pos, vb.segment_ids, vb.window_ids)))


def test_a_groups_prompt_computed_once_gives_the_same_logprobs_and_gradient(sampled, num_micro=1):
    """With `TrainBatch.prompt_mask` the forward computes each group's prompt (and image) once and lets
    its n responses attend to its keys and values: response log-probs and the gradient of a loss over
    them equal the row-by-row forward's (float32: log-probs within 1e-5, gradients within 1e-5 of each
    tensor's largest entry)."""
    config, graphdef, params, inputs, out = sampled
    seqs = batching.build_sequences(inputs, out.tokens, out.mask, out.logprobs, N_SAMPLES, pad_id=0)
    rows = len(seqs.input_ids)
    group = batching.shared_prompt_group(rows, num_micro, N_SAMPLES)
    assert group == N_SAMPLES
    batches = {}
    for g in (1, group):
        vision = batching.pack_micro_batches(inputs.row_images, seqs.prompt_index, num_micro, _Packer(config),
                                            [256, 512], g)
        batches[g] = batching.to_train_batch(seqs, np.zeros(rows), np.zeros(rows), num_micro, vision, group=g)
    shared = batches[group]
    assert shared.prompt_mask.shape == (num_micro, rows // num_micro // group, inputs.input_ids.shape[1])
    per = rows // num_micro
    mask = jnp.asarray(seqs.loss_mask.reshape(num_micro, per, -1))

    def loss(p, tb):
        lps = []
        for m in range(num_micro):
            v = VisionInputs(*(None if x is None else jnp.asarray(x[m]) for x in tb.vision))
            pm = None if tb.prompt_mask is None else jnp.asarray(tb.prompt_mask[m])
            stats = sequence_stats(graphdef, p, jnp.asarray(tb.input_ids[m]), jnp.asarray(tb.positions[m]),
                                   jnp.asarray(tb.attention_mask[m]), jnp.asarray(tb.targets[m]), v, prompt_mask=pm,
                                   chunk_size=256, temperature=TEMPERATURE)
            lps.append(stats.logprobs * mask[m])
        lp = jnp.stack(lps)
        return (lp * jnp.arange(1, lp.shape[-1] + 1)).sum(), lp

    (_, ref_lp), ref_grad = jax.value_and_grad(loss, has_aux=True)(params, batches[1])
    (_, lp), grad = jax.value_and_grad(loss, has_aux=True)(params, shared)
    assert float(jnp.abs(ref_lp).sum()) > 0
    np.testing.assert_allclose(np.asarray(lp), np.asarray(ref_lp), atol=1e-5)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):  # summation order differs: 1e-5 of the scale
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * float(jnp.abs(b).max()))
    assert float(jnp.abs(grad["visual"]["blocks"]["qkv_w"]).max()) > 0
