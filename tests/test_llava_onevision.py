"""LLaVA-OneVision parity with transformers (the oracle), float32, eager attention.

A tiny random LLaVA-OneVision (SigLIP tiles of 56 pixels = 4 x 4 patches, pinpoints up to 4 x 4 tiles so
that large images take the anyres_max_9 bilinear downsampling) is built from a transformers config.
Tolerance: max |logit difference| <= 1e-4 over every real (non-padding) position.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests.tiny_models import random_image
from vrl_jax.models import anyres
from vrl_jax.models.config import ModelConfig
from vrl_jax.models.llava_onevision import LlavaProcessor, hf_image_kwargs
from vrl_jax.models.positions import text_positions
from vrl_jax.models.qwen_vl import VisionInputs
from vrl_jax.models.weights import load_hf_params

TOL = 1e-4
TILE = 56
IMAGE, VIDEO = 1000, 1001
PINPOINTS = [[TILE * a, TILE * b] for a in range(1, 5) for b in range(1, 5)]
MEAN = STD = [0.5, 0.5, 0.5]
# (height, width): several tiles, unpadding by rows and by columns, and (the last two) more than
# anyres_max_9 allows, so their features are bilinearly downsampled.
SIZES = [(70, 130), (150, 60), (200, 210), (120, 230)]


def hf_config(tie: bool = True):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=TILE, patch_size=14, vision_use_head=False)
    text = Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
                       max_position_embeddings=4096, tie_word_embeddings=tie)
    return LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=IMAGE,
                                video_token_index=VIDEO, vision_feature_layer=-1,
                                vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                image_grid_pinpoints=PINPOINTS, tie_word_embeddings=tie)


def build_hf_model(directory: str, tie: bool = True, seed: int = 0, wide: bool = False):
    """Saves a random tiny LLaVA-OneVision; biases, norms and image_newline are randomised too."""
    from transformers import LlavaOnevisionForConditionalGeneration
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(hf_config(tie)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if wide and p.ndim >= 2:
                p.normal_(0.0, (p[0].numel() if "embed_tokens" not in name else 1) ** -0.5)
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "LlavaOnevisionImageProcessor", "size": {"height": TILE, "width": TILE},
                   "image_grid_pinpoints": PINPOINTS, "image_mean": MEAN, "image_std": STD}, f)
    return model


def hf_image_processor():
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)
    return LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS,
                                           image_mean=MEAN, image_std=STD)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("llava_ov"))
    return d, build_hf_model(d)


@pytest.fixture(scope="module")
def processor(checkpoint):
    d, _ = checkpoint
    config = ModelConfig.from_pretrained(d)
    return LlavaProcessor(tokenizer=None, image_processor=LlavaProcessor.load_image_processor(d, config),
                          config=config)


@pytest.fixture(scope="module")
def pil_images():
    rs = np.random.RandomState(0)
    return [random_image(rs, h, w) for h, w in SIZES]


def make_batch(processor, rows_spec, pil):
    """rows_spec: per row, ints (text tokens) and ('img', k) entries; left-pads rows.

    Returns numpy input_ids, attention_mask, positions, the packed vision inputs and transformers' kwargs.
    """
    rows, images = [], []
    for spec in rows_spec:
        processed = iter(processor.process_row([pil[item[1]] for item in spec if isinstance(item, tuple)]))
        row_images = []
        row = []
        for item in spec:
            if isinstance(item, tuple):
                img = next(processed)
                row_images.append(img)
                row += [IMAGE] * processor.num_tokens(img)
            else:
                row.append(item)
        rows.append(row)
        images.append(row_images)
    length = max(map(len, rows))
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    flat = [im for row in images for im in row]
    out = dict(input_ids=ids, attention_mask=mask, positions=text_positions(mask)[0], images=images, vision=None)
    if flat:
        out["vision"] = VisionInputs.from_batch(processor.pack(flat))
        out["hf"] = hf_image_kwargs(images, processor.config.vision)
    return out


def forward(model, batch):
    graphdef, state = nnx.split(model)
    vision = None if batch["vision"] is None else VisionInputs(*(None if x is None else jnp.asarray(x)
                                                                 for x in batch["vision"]))
    fn = jax.jit(lambda s, ids, pos, mask, vis: nnx.merge(graphdef, s)(ids, pos, mask, vis))
    return np.asarray(fn(state, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["positions"]),
                         jnp.asarray(batch["attention_mask"]), vision))


def hf_logits(hf, batch):
    kwargs = dict(input_ids=torch.tensor(batch["input_ids"]).long(),
                  attention_mask=torch.tensor(batch["attention_mask"]).long(),
                  position_ids=torch.tensor(batch["positions"][0]).long())
    kwargs.update({k: torch.tensor(v) for k, v in batch.get("hf", {}).items()})
    with torch.no_grad():
        return hf(**kwargs).logits.numpy()


def max_diff(a, b, mask):
    return float(np.abs(a - b)[mask.astype(bool)].max())


def test_text_logits_with_left_padding(checkpoint, processor):
    d, hf = checkpoint
    model = load_hf_params(d, processor.config)
    rs = np.random.RandomState(1)
    spec = [list(rs.randint(0, 999, 16)), list(rs.randint(0, 999, 11)), list(rs.randint(0, 999, 5))]
    batch = make_batch(processor, spec, [])
    diff = max_diff(forward(model, batch), hf_logits(hf, batch), batch["attention_mask"])
    print(f"text, left padding: max |logit diff| = {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("size", range(len(SIZES)))
def test_one_image_logits(checkpoint, processor, pil_images, size):
    d, hf = checkpoint
    model = load_hf_params(d, processor.config)
    batch = make_batch(processor, [[5, 6, ("img", size), 7, 8]], pil_images)
    image = batch["images"][0][0]
    assert image.tiled and image.grid_thw[0] > 2
    diff = max_diff(forward(model, batch), hf_logits(hf, batch), batch["attention_mask"])
    print(f"one image {SIZES[size]} ({image.grid_thw[0]} tiles): max |logit diff| = {diff:.2e}")
    assert diff <= TOL
