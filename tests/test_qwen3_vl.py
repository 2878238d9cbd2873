"""Dense Qwen3-VL against transformers (the oracle): float32 logits, image processing, conversion both
ways, `convert check`, greedy sampling, and one training step.

The tiny model follows models.md 2.3 (patch 16, a 64-entry learned position table, q/k norms,
interleaved M-RoPE) with an explicit head_dim of 32 that is not hidden/heads (64/4) and sections
[4, 6, 6]; three vision blocks are tapped for DeepStack at [2, 0] (out of order on purpose: feature j
comes from the j-th tap in block order through the merger listed at its place) and there are three
decoder layers, so DeepStack adds to two of them and not to the third.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests.test_convert import assert_orbax_round_trip_and_check, assert_round_trip, read_all
from tests.test_models import (TOL, assert_positions_equal_get_rope_index, forward, hf_logits, left_padded_text_batch,
                               max_diff)
from tests.tiny_models import SPECIAL, make_batch, random_image
from vrl_jax import convert
from vrl_jax.models.config import ModelConfig
from vrl_jax.models.image_processing import ImageProcessor, num_image_tokens, pack_images
from vrl_jax.models.loading import load_model
from vrl_jax.models.qwen_vl import QwenVL
from vrl_jax.models.weights import load_hf_params

# Qwen3-VL-*-Instruct's preprocessor_config.json (the class defaults are CLIP's; the checkpoints use 0.5).
RELEASED_PREPROCESSOR = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
                         "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                         "image_std": [0.5, 0.5, 0.5], "image_processor_type": "Qwen2VLImageProcessorFast"}
PROC = ImageProcessor(patch_size=16, min_pixels=32 * 32, max_pixels=32 * 32 * 64, image_mean=(0.5,) * 3,
                      image_std=(0.5,) * 3)
NEW = 24
NEVER = 1023  # a stop token these models do not produce in the sampling test


def hf_config(tie: bool, deepstack=(2, 0)):
    from transformers import Qwen3VLConfig
    return Qwen3VLConfig(
        text_config=dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 6, 6],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                           num_position_embeddings=64, deepstack_visual_indexes=list(deepstack)),
        tie_word_embeddings=tie, **SPECIAL)


def build(directory: str, tie: bool, seed: int = 0, wide: bool = False):
    """A random tiny Qwen3-VL saved by transformers; biases, norms and the position table are randomised
    so that every tensor matters. wide: std 1/sqrt(fan_in) matrices, so greedy decoding varies."""
    from transformers import Qwen3VLForConditionalGeneration
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(hf_config(tie)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if wide and p.ndim >= 2 and "pos_embed" not in name:
                p.normal_(0.0, (p[0].numel() if "embed" not in name else 1) ** -0.5)
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if "pos_embed" in name:
                p.normal_(0.0, 1.0)  # large, so a wrong interpolation shows in the logits
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for tie in (True, False):
        d = str(tmp_path_factory.mktemp(f"qwen3_vl_tie{int(tie)}"))
        out[tie] = (d, build(d, tie, seed=int(tie)))
    return out


@pytest.fixture(scope="module")
def images():
    rs = np.random.RandomState(0)
    return [PROC(random_image(rs, 90, 130)), PROC(random_image(rs, 150, 70))]


def load(d):
    return load_hf_params(d, ModelConfig.from_pretrained(d))


# ---- logits ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_text_logits_with_left_padding(checkpoints, tie):
    d, hf = checkpoints[tie]
    model = load(d)
    assert (model.language.lm_head is None) == tie
    batch = left_padded_text_batch()
    diff = max_diff(forward(model, batch, None), hf_logits(hf, batch), batch["attention_mask"])
    print(f"qwen3_vl tie={tie} text, left-padded: max|logit diff| {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("tie", [True, False])
def test_one_image_logits(checkpoints, images, tie):
    d, hf = checkpoints[tie]
    model = load(d)
    batch = make_batch([[3, ("img", 0), 4, 5]], images, model.config)
    diff = max_diff(forward(model, batch, None), hf_logits(hf, batch), batch["attention_mask"])
    print(f"qwen3_vl tie={tie} one image: max|logit diff| {diff:.2e}")
    assert diff <= TOL


def test_two_images_of_different_sizes_left_padded(checkpoints, images):
    d, hf = checkpoints[False]
    model = load(d)
    assert images[0].grid_thw != images[1].grid_thw
    batch = make_batch([[5, 6, ("img", 0), 7, 8, 9], [11, ("img", 1), 12, 13, 14, 15, 16, 17, 18, 19],
                        [1, ("img", 1), 2, ("img", 0), 3]], images, model.config)
    assert batch["attention_mask"].min() == 0  # rows are left-padded
    diff = max_diff(forward(model, batch, None, packed_bucket=512), hf_logits(hf, batch), batch["attention_mask"])
    print(f"qwen3_vl two images of different sizes, left-padded: max|logit diff| {diff:.2e}")
    assert diff <= TOL


def test_bfloat16_logits_close_to_float32(checkpoints, images):
    from tests.test_models import BF16_TOL
    d, _ = checkpoints[False]
    config = ModelConfig.from_pretrained(d)
    batch = make_batch([[5, ("img", 0), 6, 7]], images, config)
    f32 = forward(load(d), batch, None)
    bf16_model = load_hf_params(d, config, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    assert bf16_model.visual.deepstack_fc1_w.value.dtype == jnp.bfloat16
    diff = max_diff(forward(bf16_model, batch, None), f32, batch["attention_mask"])
    print(f"qwen3_vl bfloat16 vs float32: max|logit diff| {diff:.2e}")
    assert 0 < diff <= BF16_TOL


def test_shared_image_encoding_equals_one_encoding_per_row(checkpoints, images):
    """A GRPO group's rows share one encoding of their image (`feature_index`): the merged features and the
    DeepStack features both follow it, so the logits equal those of packing the image once per row."""
    from vrl_jax.models.qwen_vl import VisionInputs
    d, _ = checkpoints[False]
    model = load(d)
    rows = [[5, ("img", 0), 6, 7], [8, 9, ("img", 0), 10]]
    batch = make_batch(rows, images, model.config)
    per_row = forward(model, batch, None)
    once = pack_images([images[0]], [128], None)
    units = int(np.prod(images[0].grid_thw)) // 4
    vision = VisionInputs(*(jnp.asarray(x) for x in (once.pixel_values, once.hw_pos, once.segment_ids,
                                                      once.window_ids)),
                          feature_index=jnp.asarray(np.tile(np.arange(units), 2), jnp.int32))
    shared = np.asarray(model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["positions"]),
                              jnp.asarray(batch["attention_mask"]), vision))
    assert max_diff(shared, per_row, batch["attention_mask"]) <= 1e-5


def test_shared_prompt_forward_carries_deepstack(checkpoints, images):
    """The update's shared-prompt forward (`TrainBatch.prompt_mask`: a group's prompt computed once, its
    responses attending to its keys and values) adds DeepStack features in the prompt as the row-by-row
    forward does: response log-probs equal (float32, 1e-5)."""
    from flax import nnx

    from vrl_jax.models.qwen_vl import VisionInputs
    from vrl_jax.rl.logprobs import sequence_stats
    d, _ = checkpoints[False]
    model = load(d)
    n, responses = 3, np.random.RandomState(1).randint(0, 999, (6, 5))
    prompts = [[5, ("img", 0), 6, 7], [8, 9, ("img", 1), 10]]
    batch = make_batch([p + list(r) for i, p in enumerate(prompts) for r in responses[i * n:(i + 1) * n]],
                       images, model.config)
    ids, mask, pos = (jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "positions"))
    length = ids.shape[1] - responses.shape[1]
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros((6, 1), ids.dtype)], axis=1)
    graphdef, state = nnx.split(model, nnx.Param)
    params = state.to_pure_dict()

    def vision(rows):
        packed = pack_images([im for r in rows for im in batch["images"][r:r + 1]], [512], None)
        return VisionInputs(*(jnp.asarray(x) for x in (packed.pixel_values, packed.hw_pos, packed.segment_ids,
                                                       packed.window_ids)))
    per_row = pack_images(batch["images"], [1024], None)
    rows_vision = VisionInputs(*(jnp.asarray(x) for x in (per_row.pixel_values, per_row.hw_pos,
                                                          per_row.segment_ids, per_row.window_ids)))
    ref = sequence_stats(graphdef, params, ids, pos, mask, targets, rows_vision, chunk_size=256).logprobs
    group_vision = vision([0, n])  # the groups' first rows' images, in group order
    shared = sequence_stats(graphdef, params, ids, pos, mask, targets, group_vision, chunk_size=256,
                            prompt_mask=mask[::n, :length]).logprobs
    np.testing.assert_allclose(np.asarray(shared)[:, length - 1:], np.asarray(ref)[:, length - 1:], atol=1e-5)
    # The groups' images packed per row shard (two devices, one group each: [S=2, P, ...]): DeepStack's
    # units of each shard are offset into one table, and the log-probs stay the same.
    per_shard = jax.tree.map(lambda a, b: jnp.stack([a, b]), vision([0]), vision([n]))
    sharded = sequence_stats(graphdef, params, ids, pos, mask, targets, per_shard, chunk_size=256,
                             prompt_mask=mask[::n, :length]).logprobs
    np.testing.assert_allclose(np.asarray(sharded)[:, length - 1:], np.asarray(ref)[:, length - 1:], atol=1e-5)


def _variant(model: QwenVL, **changes) -> QwenVL:
    """The same parameters under a config with `changes` applied to its text or vision part."""
    cfg = model.config
    text = {k: v for k, v in changes.items() if hasattr(cfg.text, k)}
    vision = {k: v for k, v in changes.items() if hasattr(cfg.vision, k) and k not in text}
    new_cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, **text),
                                  vision=dataclasses.replace(cfg.vision, **vision))
    graphdef, state = nnx.split(model)
    other = nnx.eval_shape(lambda: QwenVL(new_cfg, rngs=nnx.Rngs(0)))
    nnx.update(other, state)
    return other


def test_each_qwen3_difference_is_seen_by_the_parity_check(checkpoints, images, monkeypatch):
    """Chunked instead of interleaved M-RoPE, DeepStack off, or the learned positions dropped each break
    parity by far more than the tolerance: the checks above exercise all three."""
    d, hf = checkpoints[False]
    model = load(d)
    batch = make_batch([[3, ("img", 0), 4, 5, 6]], images, model.config)
    ref, mask = hf_logits(hf, batch), batch["attention_mask"]
    assert max_diff(forward(model, batch, None), ref, mask) <= TOL
    assert max_diff(forward(_variant(model, mrope_interleaved=False), batch, None), ref, mask) > 1e-3
    from vrl_jax.models.vision import VisionTower
    encode = VisionTower.encode
    with monkeypatch.context() as m:
        m.setattr(VisionTower, "encode", lambda *args, **kwargs: (encode(*args, **kwargs)[0], None))
        assert max_diff(forward(model, batch, None), ref, mask) > 1e-3
    model.visual.pos_embed.value = jnp.zeros_like(model.visual.pos_embed.value)
    assert max_diff(forward(model, batch, None), ref, mask) > 1e-3


def test_positions_equal_transformers_get_rope_index(checkpoints, images):
    d, hf = checkpoints[False]
    assert_positions_equal_get_rope_index(hf, ModelConfig.from_pretrained(d), images)


# ---- image processing --------------------------------------------------------------------------------


def test_image_processing_equals_transformers():
    """Pixel values, grids and placeholder counts equal transformers' for Qwen3-VL's sizing (patch 16,
    factor 32, the released checkpoint's min/max pixels and 0.5 mean/std) and for a small max_pixels."""
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLProcessor
    rs = np.random.RandomState(3)
    for settings in (RELEASED_PREPROCESSOR, dict(patch_size=16, min_pixels=32 * 32, max_pixels=32 * 32 * 64,
                                                 image_mean=[0.5] * 3, image_std=[0.5] * 3)):
        kwargs = {k: v for k, v in settings.items() if k != "image_processor_type"}
        theirs = Qwen2VLImageProcessorPil(**kwargs)
        ours = ImageProcessor.from_dict(settings)
        assert ours.patch_size == 16 and ours.image_mean == (0.5,) * 3
        for h, w in ((90, 130), (150, 70), (31, 40), (333, 500)):
            image = random_image(rs, h, w)
            ref = theirs(images=[image], return_tensors="np")
            got = ours(image)
            assert tuple(ref["image_grid_thw"][0]) == got.grid_thw
            np.testing.assert_array_equal(ref["pixel_values"], got.patches)
            # Qwen3VLProcessor's own placeholder expansion (it cannot be built without torchvision)
            holder = types.SimpleNamespace(image_processor=theirs, image_token="<|image_pad|>")
            expanded = Qwen3VLProcessor.replace_image_token(holder, {"image_grid_thw": ref["image_grid_thw"]}, 0)
            assert expanded.count("<|image_pad|>") == num_image_tokens(got.grid_thw) == \
                theirs.get_number_of_image_patches(h, w, {}) // 4


def test_vl_processor_prompt_ids_equal_transformers_expansion(tmp_path):
    """VLProcessor on a Qwen3-VL directory: the prompt's placeholders expand as Qwen3VLProcessor's, the
    patches are Qwen3-VL's 16-pixel ones, and the positions are the model's."""
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLProcessor
    from vrl_jax.data.synthgeo.tokenizer import build_tokenizer, special_token_ids
    from vrl_jax.models.processor import VLProcessor
    tok = build_tokenizer(["what is the angle 1 2 3 in the figure"] * 20, str(tmp_path), vocab_size=300)
    special = special_token_ids(tok)
    raw = hf_config(False).to_dict()
    raw.update(image_token_id=special["<|image_pad|>"], video_token_id=special["<|video_pad|>"],
               vision_start_token_id=special["<|vision_start|>"], vision_end_token_id=special["<|vision_end|>"])
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {**RELEASED_PREPROCESSOR, "size": {"shortest_edge": 32 * 32, "longest_edge": 32 * 32 * 64}}))
    proc = VLProcessor.from_pretrained(str(tmp_path))
    rs = np.random.RandomState(4)
    pil = random_image(rs, 150, 70)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is the angle"}]}]
    inputs = proc.encode([messages], [[pil]])
    theirs = Qwen2VLImageProcessorPil(patch_size=16, min_pixels=32 * 32, max_pixels=32 * 32 * 64,
                                      image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ref = theirs(images=[pil], return_tensors="np")
    holder = types.SimpleNamespace(image_processor=theirs, image_token="<|image_pad|>")
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True).replace(
        "<|image_pad|>", Qwen3VLProcessor.replace_image_token(holder, {"image_grid_thw": ref["image_grid_thw"]}, 0))
    want = tok(text, add_special_tokens=False)["input_ids"]
    got = inputs.input_ids[0][inputs.attention_mask[0].astype(bool)]
    np.testing.assert_array_equal(got, want)
    n = int(ref["pixel_values"].shape[0])
    np.testing.assert_array_equal(inputs.vision.pixel_values[:n], ref["pixel_values"])
    assert inputs.vision.pixel_values.shape[1] == 3 * 2 * 16 * 16


# ---- conversion --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_is_bit_identical_in_the_new_layout_and_loads_in_transformers(checkpoints, tmp_path, tie):
    d, _ = checkpoints[tie]
    after = assert_round_trip(d, str(tmp_path / "export"))
    assert any(k.startswith("model.language_model.") for k in after)
    assert any(k.startswith("model.visual.deepstack_merger_list.") for k in after)


def test_orbax_round_trip_and_check_cli(checkpoints, tmp_path, capsys):
    d, _ = checkpoints[False]
    printed = assert_orbax_round_trip_and_check(d, tmp_path, capsys)
    with capsys.disabled():
        print(printed)
    assert "two images of different sizes" in printed and "PASS" in printed
    other = str(tmp_path / "other")
    build(other, tie=False, seed=5)
    assert convert.main(["check", d, "--model", other]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_checkpoint_errors_name_the_qwen3_key(checkpoints, tmp_path):
    """A Qwen2-only key in a Qwen3-VL checkpoint is unknown there; a missing q_norm layer is named."""
    import shutil

    from safetensors.numpy import save_file

    from vrl_jax.models.safetensors_io import CheckpointError
    d, _ = checkpoints[False]
    bad = shutil.copytree(d, tmp_path / "bias")
    tensors = read_all(str(bad))
    tensors["model.language_model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="q_proj.bias.*unknown key"):
        load_model(str(bad))
    tensors = read_all(d)
    tensors.pop("model.language_model.layers.1.self_attn.q_norm.weight")
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"language.layers.q_norm \(layers \[1\] missing\)"):
        load_model(str(bad))


# ---- sampling and training ---------------------------------------------------------------------------


def test_greedy_sampling_is_token_identical_to_transformers_generate(tmp_path, images):
    from tests.test_sampler import hf_generate
    from vrl_jax.models.processor import ModelInputs
    from vrl_jax.sampling.sampler import Sampler, SamplerConfig
    d = str(tmp_path / "wide")
    hf = build(d, tie=False, seed=7, wide=True)
    model = load(d)
    b = make_batch([[5, 6, ("img", 0), 7, 8, 9], [11, ("img", 1), 12, 13, 14, 15, 16, 17, 18, 19]], images,
                   model.config)
    inputs = ModelInputs(b["input_ids"], b["attention_mask"], b["positions"], b["next_position"],
                         pack_images(b["images"], [256], None))
    sampler, params = Sampler.for_model(model, SamplerConfig(max_new_tokens=NEW, stop_token_ids=(NEVER,)))
    out = sampler(params, inputs, jax.random.key(0), temperature=0.0)
    ref = hf_generate(hf, b, new=NEW)
    assert ref.shape == (2, NEW) and not np.asarray(out.stopped).any()
    assert len(set(ref[0].tolist())) >= 4 and len(set(ref[1].tolist())) >= 4  # non-degenerate continuations
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)


def test_one_training_step_updates_the_trainable_parts(checkpoints):
    """One GRPO-style update on Qwen3-VL rollouts with images: finite loss and gradient, the LLM and the
    connector (merger and DeepStack mergers) move, the frozen ViT (with its position table) does not."""
    from flax import traverse_util

    from tests.rl_batches import make_rollouts, train_batch
    from tests.test_train_step import LOSS
    from vrl_jax.rl.train_state import OptimizerConfig, create_train_state
    from vrl_jax.rl.train_step import StepConfig, make_train_step
    d, _ = checkpoints[False]
    model = load(d)
    config = model.config
    proc = ImageProcessor(patch_size=16, min_pixels=64 * 64, max_pixels=64 * 64, image_mean=(0.5,) * 3,
                          image_std=(0.5,) * 3)
    rollouts = make_rollouts(config, 8, seed=1, proc=proc)
    assert rollouts["row_images"][0][0].grid_thw == (1, 4, 4)
    batch = train_batch(rollouts, config, 2, ref_logprobs=np.zeros(rollouts["input_ids"].shape, np.float32))
    opt = OptimizerConfig(learning_rate=1e-3, total_steps=2, train_vit=False, train_connector=True)
    state, _, graphdef = create_train_state(model, opt, seed=0)
    before = traverse_util.flatten_dict(jax.tree.map(np.asarray, jax.device_get(state.params)), sep=".")
    step = make_train_step(graphdef, opt, StepConfig(batch_size=8, num_micro=2, loss=LOSS, chunk_size=256))
    state, metrics = step(state, batch)
    metrics = jax.device_get(metrics)
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(metrics))
    after = traverse_util.flatten_dict(jax.tree.map(np.asarray, jax.device_get(state.params)), sep=".")
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    for name in ("language.layers.q_norm", "language.layers.q_w", "visual.merger_fc1_w", "visual.deepstack_fc1_w",
                 "visual.deepstack_norm_w"):
        assert name in moved, name
    for name in ("visual.pos_embed", "visual.patch_embed_b", "visual.blocks.fc1_w"):
        assert name not in moved, name


# ---- the tiny default in this family -----------------------------------------------------------------


def test_tiny_family_builds_a_qwen3_vl_equal_to_transformers(tmp_path):
    """`model.tiny.family=qwen3_vl`: the tiny default is a Qwen3-VL directory (config, weights in the new
    layout, a 16-pixel processor with 0.5 mean/std) that transformers loads with the same logits, on a
    prompt encoded by vrl_jax's processor from that directory."""
    from transformers import AutoModelForImageTextToText

    from vrl_jax.models.processor import VLProcessor
    from vrl_jax.models.tiny import build_tiny_model
    d = build_tiny_model(str(tmp_path / "tiny"), ["what is the angle 1 2 3 in the figure"] * 20, family="qwen3_vl",
                         hidden=32, layers=2, intermediate=64, vision_width=32, vision_depth=2, vocab_size=300)
    config = ModelConfig.from_pretrained(d)
    assert config.model_type == "qwen3_vl" and config.vision.deepstack_visual_indexes
    assert any(k.startswith("model.visual.deepstack_merger_list.") for k in read_all(d))
    proc = VLProcessor.from_pretrained(d, length_buckets=(128,), patch_buckets=(64,))
    assert proc.image_processor.patch_size == 16 and proc.image_processor.image_mean == (0.5,) * 3
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is the angle"}]}]
    inputs = proc.encode([messages], [[random_image(np.random.RandomState(6), 112, 112)]])
    model = load_model(d)
    vision = tuple(jnp.asarray(x) for x in inputs.vision[:4])
    from vrl_jax.models.qwen_vl import VisionInputs
    ours = np.asarray(model(jnp.asarray(inputs.input_ids), jnp.asarray(inputs.positions),
                            jnp.asarray(inputs.attention_mask), VisionInputs(*vision)))
    hf = AutoModelForImageTextToText.from_pretrained(d, attn_implementation="eager").eval()
    grid = inputs.vision.grid_thw
    n = int(np.prod(grid, axis=1).sum())
    types = (inputs.input_ids == config.image_token_id).astype(np.int64)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(inputs.input_ids).long(), attention_mask=torch.tensor(inputs.attention_mask),
                 position_ids=torch.tensor(inputs.positions).long(),
                 pixel_values=torch.tensor(inputs.vision.pixel_values[:n]), image_grid_thw=torch.tensor(grid),
                 mm_token_type_ids=torch.tensor(types)).logits.numpy()
    diff = max_diff(ours, ref, inputs.attention_mask)
    print(f"tiny qwen3_vl family: max|logit diff| {diff:.2e}")
    assert diff <= TOL


def test_tiny_family_is_checked_before_anything_is_built():
    from vrl_jax import configs, standin
    c = standin.load_experiment(os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", "default.py"))
    c.model.tiny.family = "qwen3_vl"
    configs.validate(c)
    c.model.tiny.family = "qwen3"
    with pytest.raises(configs.UserError, match=r"model.tiny.family.*'qwen3'.*'qwen2_5_vl', 'qwen3_vl'"):
        configs.validate(c)


def test_processor_with_the_wrong_patch_size_is_refused(tmp_path):
    """A Qwen3-VL directory without its preprocessor_config.json (Qwen2-VL's 14-pixel defaults) or with a
    wrong patch size: the processor would feed the tower rows it cannot read; the error names the file."""
    from vrl_jax.data.synthgeo.tokenizer import build_tokenizer
    from vrl_jax.models.config import ConfigError
    from vrl_jax.models.processor import VLProcessor
    build_tokenizer(["what is the angle"] * 20, str(tmp_path), vocab_size=300)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(False).to_dict()))
    with pytest.raises(ConfigError, match=r"preprocessor_config.json \(the file is missing.*patch_size 14 but "
                                          r"the model's vision_config has 16"):
        VLProcessor.from_pretrained(str(tmp_path))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**RELEASED_PREPROCESSOR, "patch_size": 14}))
    with pytest.raises(ConfigError, match=r"preprocessor_config.json: patch_size 14"):
        VLProcessor.from_pretrained(str(tmp_path))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(RELEASED_PREPROCESSOR))
    assert VLProcessor.from_pretrained(str(tmp_path)).image_processor.patch_size == 16


def test_sharded_load_and_forward_equal_unsharded(checkpoints, images):
    """On an 8-device mesh (fsdp 2 x tensor 4) every parameter, the DeepStack mergers included, is placed
    by the sharding rules while it streams in, and the logits equal the single-device ones."""
    from vrl_jax import sharding as shd
    d, _ = checkpoints[False]
    config = ModelConfig.from_pretrained(d)
    mesh = shd.make_mesh((1, 2, 4))
    model = load_hf_params(d, config, shardings=shd.param_sharding_fn(mesh))
    spec = model.visual.deepstack_fc1_w.value.sharding.spec
    assert tuple(spec) == (None, "fsdp", "tensor")
    batch = make_batch([[3, ("img", 0), 4, 5], [6, 7, ("img", 1), 8]], images, config)
    sharded = forward(model, batch, None)
    single = forward(load(d), batch, None)
    assert max_diff(sharded, single, batch["attention_mask"]) <= 1e-5


def test_config_fields_and_errors():
    """Qwen3-VL's fields are read (4.x `rope_scaling` + `rope_theta` as in the released files, or 5.x
    `rope_parameters`); unsupported or inconsistent values are refused with the field named."""
    from vrl_jax.models.config import ConfigError
    raw = hf_config(True).to_dict()
    text = raw["text_config"]
    text["rope_scaling"] = {"rope_type": "default", "mrope_section": [4, 6, 6], "mrope_interleaved": True}
    text["rope_theta"] = 5e6
    del text["rope_parameters"]
    config = ModelConfig.from_dict(raw)
    # head_dim is explicit and not hidden/heads (64/4), as in Qwen3-VL-4B (128, not 2560/32)
    assert (config.text.rope_theta, config.text.mrope_section, config.text.head_dim) == (5e6, (4, 6, 6), 32)
    assert config.text.qk_norm and not config.text.attention_bias and config.text.mrope_interleaved
    for where, key, value, message in (
            ("text_config", "attention_bias", True, "attention_bias=true is not supported"),
            ("vision_config", "deepstack_visual_indexes", [3], r"deepstack_visual_indexes \[3\] must be distinct"),
            ("vision_config", "num_position_embeddings", 60, "num_position_embeddings 60 must be a square"),
            ("vision_config", "out_hidden_size", 32, "merger output width 32 must equal text hidden_size 64")):
        bad = hf_config(True).to_dict()
        bad[where][key] = value
        with pytest.raises(ConfigError, match=message):
            ModelConfig.from_dict(bad)


def test_hf_trainer_decay_mask_equals_hf_trainers_for_qwen3_vl():
    """decay_mask 'hf_trainer' on Qwen3-VL's parameters (q/k norms, position table, DeepStack mergers)
    equals HF Trainer's choice for the same transformers model."""
    from flax import traverse_util
    from transformers import Qwen3VLForConditionalGeneration, Trainer

    from vrl_jax.models.weights import abstract_model, match
    from vrl_jax.rl.train_state import DECAY_MASKS
    model = Qwen3VLForConditionalGeneration(hf_config(False))
    decayed = set(Trainer.get_decay_parameter_names(None, model))  # the method does not use `self`
    want = {}
    for name, _ in model.named_parameters():
        want.setdefault(match(name, "qwen3_vl")[0], set()).add(name in decayed)
    assert all(len(v) == 1 for v in want.values())  # every layer of a stacked parameter agrees
    want = {p: v.pop() for p, v in want.items()}
    _, abstract = abstract_model(ModelConfig.from_dict(hf_config(False).to_dict()))
    got = DECAY_MASKS["hf_trainer"](list(traverse_util.flatten_dict(abstract.to_pure_dict(), sep=".")))
    assert got == want
    assert not got["language.layers.q_norm"] and not got["visual.deepstack_norm_w"] and got["visual.pos_embed"]
