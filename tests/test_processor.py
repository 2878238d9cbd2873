"""Prompt processing: chat template, placeholder expansion, buckets, and the full path into the model."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.tiny_models import build_hf_model, random_image
from vrl_jax.data.synthgeo.tokenizer import build_tokenizer, special_token_ids
from vrl_jax.models.image_processing import DeferredPatches, ImageProcessor
from vrl_jax.models.processor import VLProcessor
from vrl_jax.models.qwen_vl import VisionInputs
from vrl_jax.models.weights import load_hf_params

TEXTS = ["What is the area of the rectangle? Solve step by step.", "The answer is \\boxed{12}.",
         "Count the circles in the picture."] * 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("proc"))
    tok = build_tokenizer(TEXTS, d, vocab_size=400)
    ids = special_token_ids(tok)
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    hf = build_hf_model(d, "qwen2_5_vl", tie=True, special=special)
    return d, hf


def user(text, n_images=0):
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def test_encode_matches_transformers_end_to_end(model_dir):
    d, hf = model_dir
    proc = VLProcessor.from_pretrained(d, length_buckets=(64, 128), patch_buckets=(128, 256))
    proc.image_processor = ImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    rs = np.random.RandomState(0)
    img = random_image(rs, 90, 130)
    batch = proc.encode([user("Count the circles in the picture.", 1), user("What is the area?")], [[img], []])
    n_image_tokens = int((batch.input_ids == proc.config.image_token_id).sum())
    assert n_image_tokens == 6 * 10 // 4
    assert batch.input_ids.shape[1] in (64, 128) and batch.attention_mask[1, 0] == 0  # bucketed, left padded
    text = proc.tokenizer.decode(batch.input_ids[0][batch.attention_mask[0] > 0])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|image_pad|>")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    model = load_hf_params(d, proc.config)
    v = batch.vision
    ours = np.asarray(model(jnp.asarray(batch.input_ids), jnp.asarray(batch.positions),
                            jnp.asarray(batch.attention_mask),
                            VisionInputs(*(jnp.asarray(x) for x in (v.pixel_values, v.hw_pos, v.segment_ids,
                                                                    v.window_ids)))))
    types = (batch.input_ids == proc.config.image_token_id).astype(np.int64)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(batch.input_ids).long(), attention_mask=torch.tensor(batch.attention_mask),
                 position_ids=torch.tensor(batch.positions).long(),
                 pixel_values=torch.tensor(proc.image_processor(img).patches),
                 image_grid_thw=torch.tensor([proc.image_processor(img).grid_thw]),
                 mm_token_type_ids=torch.tensor(types)).logits.numpy()
    valid = batch.attention_mask.astype(bool)
    assert np.abs(ours - ref)[valid].max() <= 1e-4


def test_only_the_local_row_shards_images_are_preprocessed(model_dir):
    """`encode(shards=S, local=...)`, as a host of a multi-host run calls it: the images of row shards another
    host's devices hold are laid out (tokens, positions, patch metadata, buckets: the same on every host) but
    never resized or patchified, and their pixels stay zero; the local shard's buffer equals a full encode's."""
    d, _ = model_dir
    proc = VLProcessor.from_pretrained(d, length_buckets=(64, 128), patch_buckets=(128, 256))
    proc.image_processor = ImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    rs = np.random.RandomState(1)
    images = [[random_image(rs, 90, 130)], [random_image(rs, 60, 60)], [random_image(rs, 130, 70)],
              [random_image(rs, 80, 80)]]
    prompts = [user("Count the circles in the picture.", 1)] * 4
    full = proc.encode(prompts, images, shards=2)
    before = DeferredPatches.computed()
    host = proc.encode(prompts, images, shards=2, local=[True, False])
    assert DeferredPatches.computed() - before == 2  # rows 0 and 1: shard 0
    assert [isinstance(row[0].patches, DeferredPatches) for row in host.row_images] == [True] * 4
    assert [row[0].patches._value is not None for row in host.row_images] == [True, True, False, False]
    for name in ("input_ids", "attention_mask", "positions", "next_position"):
        np.testing.assert_array_equal(getattr(host, name), getattr(full, name))
    for name, want in full.vision._asdict().items():
        got = getattr(host.vision, name)
        if name == "pixel_values":
            np.testing.assert_array_equal(got[0], want[0])
            assert got.shape == want.shape and not got[1].any() and want[1].any()
        elif want is not None:
            np.testing.assert_array_equal(got, want)
    # a later layout that puts shard 1's rows on this host computes them then, equal to an eager processing
    np.testing.assert_array_equal(np.asarray(host.row_images[3][0].patches), proc.image_processor(images[3][0]).patches)
    assert DeferredPatches.computed() - before == 3


def test_text_only_batch_keeps_the_same_vision_shape(model_dir):
    d, _ = model_dir
    proc = VLProcessor.from_pretrained(d, length_buckets=(64,), patch_buckets=(128,))
    batch = proc.encode([user("What is the area?")])
    assert batch.vision.pixel_values.shape == (128, proc.config.vision.patch_dim)
    assert (batch.vision.segment_ids == -1).all()
    np.testing.assert_array_equal(batch.positions[0][batch.attention_mask > 0],
                                  np.concatenate([np.arange(batch.attention_mask.sum())]))


def test_errors_name_the_problem(model_dir, tmp_path):
    d, _ = model_dir
    proc = VLProcessor.from_pretrained(d, length_buckets=(16,), patch_buckets=(128,))
    with pytest.raises(ValueError, match="prompt length of .* exceeds the largest bucket 16"):
        proc.encode([user("What is the area of the rectangle? " * 5)])
    proc = VLProcessor.from_pretrained(d, length_buckets=(64,), patch_buckets=(128,))
    with pytest.raises(ValueError, match="1 image placeholder\\(s\\) but 0 image"):
        proc.encode([user("Count.", 1)], [[]])
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        VLProcessor.from_pretrained(str(tmp_path))


def test_over_long_prompts_are_counted_and_skipped_with_their_source(model_dir, tmp_path):
    from PIL import Image

    from vrl_jax.data.faults import FaultCounter
    from vrl_jax.data.formats import Example, ImageRef
    from vrl_jax.run_setup import drop_long_prompts, prompt_length
    d, _ = model_dir
    proc = VLProcessor.from_pretrained(d, length_buckets=(64,), patch_buckets=(128,))
    proc.image_processor = ImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    path = tmp_path / "img.png"
    random_image(np.random.RandomState(0), 90, 130).save(path)
    short = Example(id="a", question="<image>Count.", images=(ImageRef(path=str(path)),), answer="1",
                    solution="", source="data.jsonl:1")
    long = Example(id="b", question="What is the area? " * 12, images=(), answer="1", solution="",
                   source="data.jsonl:2")
    # The estimate equals the real encoded length, image tokens included.
    encoded = proc.encode([[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count."}]}]],
                          [[Image.open(path)]])
    assert prompt_length(short, proc, "plain") == int(encoded.attention_mask.sum())
    faults = FaultCounter(max_share=0.9, min_seen=1)
    faults.ok(2)
    kept = drop_long_prompts([short, long], proc, "plain", 64, faults)
    assert [e.id for e in kept] == ["a"]
    assert faults.counts["prompt_too_long"] == 1 and "data.jsonl:2" in str(faults.examples[0])
