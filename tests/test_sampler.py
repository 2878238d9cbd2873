"""The compiled sampler: parity with transformers `generate`, train/rollout log-prob agreement, stop
tokens, filters, determinism, compile counts, and sharded batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.tiny_models import build_hf_model, make_batch, random_image
from vrl_jax.models.config import ModelConfig
from vrl_jax.models.image_processing import ImageProcessor, pack_images
from vrl_jax.models.processor import ModelInputs
from vrl_jax.models.qwen_vl import VisionInputs
from vrl_jax.models.weights import load_hf_params
from vrl_jax.sampling.filters import choose_tokens, top_k_filter, top_p_filter
from vrl_jax.sampling.sampler import Sampler, SamplerConfig

NEW = 32
NEVER = 1023  # a stop token the tiny models do not produce in these tests (checked below)


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    rs = np.random.RandomState(0)
    proc = ImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    images = [proc(random_image(rs, 90, 130)), proc(random_image(rs, 150, 70))]
    out = {}
    # Untied: with tied embeddings a random model's residual stream makes it copy its last token forever.
    for family, tie in (("qwen2_vl", False), ("qwen2_5_vl", False)):
        d = str(tmp_path_factory.mktemp(family))
        hf = build_hf_model(d, family, tie, seed=7, wide=True)
        config = ModelConfig.from_pretrained(d)
        b = make_batch([[5, 6, ("img", 0), 7, 8, 9], [11, ("img", 1), 12, 13, 14, 15, 16, 17, 18, 19]],
                       images, config)
        vb = pack_images(b["images"], [256], config.vision.window_size)
        inputs = ModelInputs(b["input_ids"], b["attention_mask"], b["positions"], b["next_position"], vb)
        out[family] = (hf, load_hf_params(d, config), b, inputs)
    return out


def hf_generate(hf, b, new=NEW):
    with torch.no_grad():
        g = hf.generate(input_ids=torch.tensor(b["input_ids"]).long(),
                        attention_mask=torch.tensor(b["attention_mask"]).long(),
                        pixel_values=torch.tensor(np.concatenate([p.patches for p in b["images"]])),
                        image_grid_thw=torch.tensor(np.array([p.grid_thw for p in b["images"]])),
                        mm_token_type_ids=torch.tensor(b["types"]).long(), max_new_tokens=new, do_sample=False,
                        eos_token_id=NEVER, pad_token_id=0)
    return g[:, b["input_ids"].shape[1]:].numpy()


@pytest.mark.parametrize("family, segments", [("qwen2_vl", 1), ("qwen2_5_vl", 1), ("qwen2_5_vl", 7)])
def test_greedy_is_token_identical_to_transformers_generate(setups, family, segments):
    """One decode loop, and four of them (8 tokens each: seven would be shorter than the minimum) over a
    response cache grown between them."""
    hf, model, b, inputs = setups[family]
    sampler, params = Sampler.for_model(model, SamplerConfig(max_new_tokens=NEW, stop_token_ids=(NEVER,),
                                                             decode_segments=segments))
    out = sampler(params, inputs, jax.random.key(0), temperature=0.0)
    ref = hf_generate(hf, b)
    assert ref.shape == (2, NEW) and not np.asarray(out.stopped).any()
    assert len(set(ref[0].tolist())) >= 4  # a non-degenerate continuation, so the comparison means something
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    np.testing.assert_array_equal(np.asarray(out.lengths), [NEW, NEW])


def test_the_sampler_decodes_with_the_layer_scan_and_xla_dots(setups):
    """The layer loop in the sampler is `SamplerConfig.unroll_layers`' (default: the scan), whatever the model
    trains with; both give transformers' greedy tokens. On CPU the program's dots are XLA's own, not YNN's
    (which jax uses by default and the training programs ask for): `decode_compiler_options`."""
    hf, model, b, inputs = setups["qwen2_5_vl"]
    model.language.unroll_layers = True  # as experiments/default.py trains
    try:
        loops = {}
        for unroll in (False, True):
            sampler, params = Sampler.for_model(model, SamplerConfig(max_new_tokens=16, stop_token_ids=(NEVER,),
                                                                     unroll_layers=unroll))
            out = sampler(params, inputs, jax.random.key(0), temperature=0.0)
            np.testing.assert_array_equal(np.asarray(out.tokens), hf_generate(hf, b, 16))
            hlo = sampler.lower(params, inputs, jax.random.key(0), temperature=0.0).compile().as_text()
            loops[unroll] = hlo.count(" while(")
            if jax.default_backend() == "cpu":
                assert "ynn" not in hlo
    finally:
        model.language.unroll_layers = False
    # the scan adds a layer loop to the prefill and to each decode segment's loop
    assert loops[False] > loops[True] >= 4, loops


def full_forward_logprobs(model, b, out, temperature, n):
    """Log-probs of the sampled tokens from one training-style forward over prompt + response."""
    ids = np.repeat(b["input_ids"], n, 0)
    mask = np.repeat(b["attention_mask"], n, 0)
    pos = np.repeat(b["positions"], n, 1)
    nxt = np.repeat(b["next_position"], n, 0)
    tokens = np.asarray(out.tokens)
    new_pos = nxt[:, None] + np.arange(tokens.shape[1])[None]
    seq = np.concatenate([ids, tokens], 1)
    seq_mask = np.concatenate([mask, np.asarray(out.mask)], 1)
    seq_pos = np.concatenate([pos, np.broadcast_to(new_pos, (3, *new_pos.shape))], 2)
    vb = pack_images([im for im in b["images"] for _ in range(n)] if n > 1 else b["images"], [512],
                     model.config.vision.window_size)
    # Images are repeated per sample in reading order, matching the repeated rows.
    vision = VisionInputs(*(jnp.asarray(x) for x in (vb.pixel_values, vb.hw_pos, vb.segment_ids, vb.window_ids)))
    logits = np.asarray(model(jnp.asarray(seq), jnp.asarray(seq_pos), jnp.asarray(seq_mask), vision))
    length = ids.shape[1]
    pred = logits[:, length - 1:-1] / temperature
    logp = pred - np.log(np.exp(pred - pred.max(-1, keepdims=True)).sum(-1, keepdims=True)) - pred.max(-1, keepdims=True)
    return np.take_along_axis(logp, tokens[..., None], -1)[..., 0] * np.asarray(out.mask)


def test_sampled_logprobs_equal_a_training_forward(setups):
    _, model, b, inputs = setups["qwen2_5_vl"]
    n, temperature = 2, 0.7
    sampler, params = Sampler.for_model(model, SamplerConfig(max_new_tokens=16, num_samples=n,
                                                             stop_token_ids=(NEVER,), decode_segments=2))
    out = sampler(params, inputs, jax.random.key(3), temperature=temperature)
    ref = full_forward_logprobs(model, b, out, temperature, n)
    assert np.abs(np.asarray(out.logprobs) - ref).max() <= 1e-4
    assert not np.array_equal(np.asarray(out.tokens[0]), np.asarray(out.tokens[1]))  # two different samples


def test_stop_tokens_end_rows_and_mask_the_rest(setups):
    _, model, _, inputs = setups["qwen2_vl"]
    sampler, params = Sampler.for_model(model, SamplerConfig(max_new_tokens=NEW, stop_token_ids=(NEVER,)))
    greedy = np.asarray(sampler(params, inputs, jax.random.key(0), temperature=0.0).tokens)
    stop = int(greedy[0, 5])
    first = int(np.flatnonzero(greedy[0] == stop)[0])
    # 4 decode segments of 8 tokens: row 0 stops in the first, and the segments after it keep it stopped
    sampler2, _ = Sampler.for_model(model, SamplerConfig(max_new_tokens=NEW, stop_token_ids=(NEVER, stop),
                                                         pad_token_id=0, decode_segments=4))
    out = sampler2(params, inputs, jax.random.key(0), temperature=0.0)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    assert bool(out.stopped[0]) and int(out.lengths[0]) == first + 1
    np.testing.assert_array_equal(tokens[0, :first + 1], greedy[0, :first + 1])
    assert (tokens[0, first + 1:] == 0).all() and mask[0].sum() == first + 1
    assert (np.asarray(out.logprobs)[0, first + 1:] == 0).all()
    row1_hits = np.flatnonzero(greedy[1] == stop)
    expected1 = int(row1_hits[0]) + 1 if len(row1_hits) else NEW
    assert int(out.lengths[1]) == expected1 and bool(out.stopped[1]) == bool(len(row1_hits))


def test_top_k_and_top_p_never_sample_outside_their_sets():
    rs = np.random.RandomState(0)
    logits = jnp.asarray(rs.randn(4, 50).astype(np.float32) * 2)
    k, p = 5, 0.6
    top_k_set = np.argsort(-np.asarray(logits), -1)[:, :k]
    probs = np.asarray(jax.nn.softmax(logits, -1))
    order = np.argsort(-probs, -1)
    nucleus = []
    for r in range(4):
        csum = np.cumsum(probs[r, order[r]])
        nucleus.append(set(order[r, : int(np.searchsorted(csum, p)) + 1].tolist()))
    assert np.isfinite(np.asarray(top_k_filter(logits, k))).sum(-1).tolist() == [k] * 4
    kept = np.isfinite(np.asarray(top_p_filter(logits, jnp.float32(p))))
    assert [set(np.flatnonzero(kept[r]).tolist()) for r in range(4)] == nucleus
    keys = jax.random.split(jax.random.key(0), 300)
    draw = jax.jit(jax.vmap(choose_tokens, in_axes=(0, None, None, None, None)), static_argnums=3)
    tk = np.asarray(draw(keys, logits, jnp.float32(1.0), k, jnp.float32(1.0))[0])
    tp = np.asarray(draw(keys, logits, jnp.float32(1.0), 0, jnp.float32(p))[0])
    for r in range(4):
        assert set(tk[:, r].tolist()) <= set(top_k_set[r].tolist())
        assert set(tp[:, r].tolist()) <= nucleus[r]
    # Enough draws that the sets are actually explored, not just the argmax.
    assert min(len(set(tk[:, r].tolist())) for r in range(4)) >= 2


def test_same_key_same_samples_and_n_samples_share_the_prompt(setups):
    _, model, _, inputs = setups["qwen2_5_vl"]
    sampler, params = Sampler.for_model(model, SamplerConfig(max_new_tokens=12, num_samples=3, top_k=20,
                                                             stop_token_ids=(NEVER,)))
    a = sampler(params, inputs, jax.random.key(1), temperature=1.0, top_p=0.9)
    b = sampler(params, inputs, jax.random.key(1), temperature=1.0, top_p=0.9)
    c = sampler(params, inputs, jax.random.key(2), temperature=1.0, top_p=0.9)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
    greedy = sampler(params, inputs, jax.random.key(1), temperature=0.0)
    single, _ = Sampler.for_model(model, SamplerConfig(max_new_tokens=12, stop_token_ids=(NEVER,)))
    one = np.asarray(single(params, inputs, jax.random.key(1), temperature=0.0).tokens)
    np.testing.assert_array_equal(np.asarray(greedy.tokens), np.repeat(one, 3, 0))
    # Changing prompts, temperature or top-p inside the same buckets never recompiles.
    other = inputs._replace(input_ids=np.where(inputs.attention_mask > 0, (inputs.input_ids * 7) % 900,
                                               inputs.input_ids))
    sampler(params, other, jax.random.key(5), temperature=0.3, top_p=1.0)
    assert sampler.trace_count == 1


def test_sharded_batch_gives_the_same_tokens(setups):
    _, model, _, inputs = setups["qwen2_5_vl"]
    cfg = SamplerConfig(max_new_tokens=8, num_samples=2, stop_token_ids=(NEVER,))
    sampler, params = Sampler.for_model(model, cfg)
    ref = sampler(params, inputs, jax.random.key(4), temperature=0.8)
    auto = jax.sharding.AxisType.Auto  # vrl_jax meshes are GSPMD (Auto) meshes
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(auto, auto))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    pos = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
    sharded = inputs._replace(input_ids=jax.device_put(inputs.input_ids, rows),
                              attention_mask=jax.device_put(inputs.attention_mask, rows),
                              positions=jax.device_put(inputs.positions, pos),
                              next_position=jax.device_put(inputs.next_position, rows))
    replicated = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    out = sampler(replicated, sharded, jax.random.key(4), temperature=0.8)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    assert np.abs(np.asarray(out.logprobs) - np.asarray(ref.logprobs)).max() < 1e-5
    assert len(out.tokens.sharding.device_set) > 1


def test_images_packed_per_row_shard_are_encoded_where_their_rows_are(setups):
    """`encode(..., shards=S)`'s layout: one image buffer per device's rows ([S, P, ...]). On a 2-device
    mesh the sampler gives the tokens of the one-buffer single-device run, and each device encodes only
    its rows' images: the embedding's per-device FLOPs fall by more than half against the one-buffer
    layout, which every device would encode whole."""
    from flax import nnx

    from vrl_jax import sharding as shd
    from vrl_jax.models.processor import pack_row_blocks

    _, model, b, inputs = setups["qwen2_5_vl"]
    config = model.config

    class Packer:  # the processor surface pack_row_blocks uses
        pass

    packer = Packer()
    packer.config = config
    packer.pack = lambda ims, buckets, pixels=True: pack_images(ims, buckets, config.vision.window_size, pixels=pixels)
    per_shard = pack_row_blocks(packer, [[im] for im in b["images"]], np.arange(2), 2, [256])
    assert per_shard.pixel_values.shape[:2] == (2, 256)
    cfg = SamplerConfig(max_new_tokens=8, num_samples=2, stop_token_ids=(NEVER,))
    single, params = Sampler.for_model(model, cfg)
    ref = single(params, inputs, jax.random.key(4), temperature=0.8)
    mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=1, tensor=1), jax.devices()[:2])
    graphdef = nnx.graphdef(model)
    sharded = Sampler(graphdef, cfg, mesh=mesh)
    out = sharded(shd.put(params, jax.tree.map(lambda _: shd.replicated(mesh), params)),
                  inputs._replace(vision=per_shard), jax.random.key(4), temperature=0.8)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    assert np.abs(np.asarray(out.logprobs) - np.asarray(ref.logprobs)).max() < 1e-5
    with pytest.raises(ValueError, match="packed in 2 buffers, but the 2 rows split into 1 shards"):
        Sampler(graphdef, cfg, mesh=shd.make_mesh(shd.MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1]))(
            params, inputs._replace(vision=per_shard), jax.random.key(4))

    def embed(params, ids, vision):
        return nnx.merge(graphdef, params).embed_rows(ids, vision)[0]

    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    ids = jax.device_put(b["input_ids"], rows)
    replicated = jax.device_put(params, shd.replicated(mesh))
    one = VisionInputs.from_batch(pack_images(b["images"], [512], config.vision.window_size))
    flops, embeds = [], []
    for vision, sharding in ((one, shd.replicated(mesh)), (per_shard, rows)):
        vision = jax.device_put(vision, sharding)
        fn = jax.jit(embed)
        flops.append(fn.lower(replicated, ids, vision).compile().cost_analysis()["flops"])
        embeds.append(np.asarray(fn(replicated, ids, vision)))
    np.testing.assert_allclose(embeds[1], embeds[0], atol=1e-5)
    assert flops[1] < 0.5 * flops[0], flops


def test_attention_with_a_shared_prefix_equals_attention_over_the_repeated_prefix():
    """The decode step's attention (rows in groups of n sharing their prompt's keys, held once), against
    a NumPy softmax over [the group's prefix keys; the row's own keys]: grouped query heads, left-padded
    prefixes, a masked own slot, two query columns."""
    from vrl_jax.models.layers import attention_with_prefix
    rs = np.random.RandomState(0)
    g, n, t, heads, kv, d, length, own = 3, 4, 2, 4, 2, 8, 5, 6
    q = rs.randn(g * n, t, heads, d).astype(np.float32)
    kp, vp = rs.randn(g, kv, length, d).astype(np.float32), rs.randn(g, kv, d, length).astype(np.float32)
    k, v = rs.randn(g * n, kv, own, d).astype(np.float32), rs.randn(g * n, kv, d, own).astype(np.float32)
    prefix_valid = np.arange(length)[None, :] >= np.array([0, 2, 4])[:, None]  # left padding per group
    mask = rs.rand(g * n, t, own) < 0.7
    got = np.asarray(attention_with_prefix(q, kp, vp, prefix_valid, k, v, mask, d**-0.5))
    want = np.zeros_like(q)
    for r in range(g * n):
        for h in range(heads):
            j = h // (heads // kv)  # the kv head serving query head h
            keys = np.concatenate([kp[r // n, j], k[r, j]])  # [L + S, d]
            values = np.concatenate([vp[r // n, j].T, v[r, j].T])
            for c in range(t):
                ok = np.concatenate([prefix_valid[r // n], mask[r, c]])
                scores = np.where(ok, keys @ q[r, c, h] * d**-0.5, -np.inf)
                p = np.exp(scores - scores.max())
                want[r, c, h] = (p / p.sum()) @ values
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_config_errors():
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplerConfig(max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplerConfig(max_new_tokens=0, stop_token_ids=(1,))
    with pytest.raises(ValueError, match="decode_segments"):
        SamplerConfig(max_new_tokens=4, stop_token_ids=(1,), decode_segments=0)
    ends = lambda new, k: SamplerConfig(max_new_tokens=new, stop_token_ids=(1,), decode_segments=k).segment_ends()  # noqa
    assert ends(40, 3) == [14, 28, 40] and ends(40, 1) == [40] and ends(128, 4) == [32, 64, 96, 128]
    assert ends(3, 4) == [3] and ends(10, 3) == [8, 10] and ends(32, 7) == [8, 16, 24, 32]  # 8 tokens at least
