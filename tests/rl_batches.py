"""Deterministic tiny models and RL batches for the train-step tests (also run by the multihost worker).

Rows are left-padded prompts (some with an image) followed by a response; a few rows end with
uncounted tokens (post-EOS padding). `train_batch` re-packs each micro-batch's own images, so the
same rows can be cut into any number of micro-batches.
"""

from __future__ import annotations

import numpy as np

from tests.tiny_models import hf_config, make_batch, random_image
from vrl_jax.models.config import ModelConfig
from vrl_jax.models.image_processing import ImageProcessor, pack_images
from vrl_jax.models.qwen_vl import VisionInputs
from vrl_jax.rl.train_step import TrainBatch

PATCH_BUCKETS = (32, 64, 128, 256)


def model_config(family: str = "qwen2_5_vl", tie: bool = False) -> ModelConfig:
    return ModelConfig.from_dict(hf_config(family, tie).to_dict())


def make_model(config: ModelConfig, seed: int = 0):
    """A random QwenVL drawn with NumPy (instant; jax.random would compile a kernel per shape):
    weights N(0, 0.02), norm weights 1 + N(0, 0.1), biases N(0, 0.1) so that every tensor matters."""
    from flax import nnx, traverse_util

    from vrl_jax.models.weights import abstract_model

    graphdef, abstract = abstract_model(config)
    rs = np.random.RandomState(seed)
    flat = traverse_util.flatten_dict(abstract.to_pure_dict(), sep=".")
    params = {}
    for name, shape_dtype in sorted(flat.items()):
        shape = shape_dtype.shape
        if "norm" in name:
            value = 1.0 + 0.1 * rs.randn(*shape)
        elif name.endswith("_b"):
            value = 0.1 * rs.randn(*shape)
        else:
            value = 0.02 * rs.randn(*shape)
        params[name] = value.astype(np.float32)
    return nnx.merge(graphdef, traverse_util.unflatten_dict(params, sep="."))


def make_rollouts(config: ModelConfig, n_rows: int, seed: int = 0, image_every: int = 2,
                  proc: ImageProcessor | None = None) -> dict:
    """Host arrays for n_rows rollouts: ids/mask/targets/loss_mask [B, T], positions [3, B, T], advantages
    [B, T], row_images (list per row), all numpy. proc: the image processor (default: Qwen2-VL's 14-pixel
    patches, one 4x4-patch image each)."""
    rs = np.random.RandomState(seed)
    proc = proc or ImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56)
    processed, specs, response = [], [], []
    for i in range(n_rows):
        spec = list(rs.randint(0, 999, rs.randint(2, 6)))
        if i % image_every == 0:
            processed.append(proc(random_image(rs, 56, 56)))
            spec.append(("img", len(processed) - 1))
            spec += list(rs.randint(0, 999, 2))
        n_resp = int(rs.randint(3, 8))
        spec += list(rs.randint(0, 999, n_resp))
        specs.append(spec)
        response.append(n_resp)
    batch = make_batch(specs, processed, config)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b, t = ids.shape
    targets = np.concatenate([ids[:, 1:], np.zeros((b, 1), ids.dtype)], axis=1)
    loss_mask = np.zeros((b, t), np.float32)
    for i, n in enumerate(response):
        loss_mask[i, t - n - 1:t - 1] = 1.0  # positions whose next token is a response token
        if i % 3 == 1:
            loss_mask[i, t - 2] = 0.0  # an uncounted trailing token
    adv = np.repeat(rs.randn(b, 1), t, axis=1) + 0.1 * rs.randn(b, t)
    image_of_row = [[processed[item[1]] for item in spec if isinstance(item, tuple)] for spec in specs]
    return dict(input_ids=ids, attention_mask=mask, positions=batch["positions"], targets=targets.astype(np.int32),
                loss_mask=loss_mask, advantages=adv.astype(np.float32), row_images=image_of_row,
                sft_weights=np.zeros((b,), np.float32))


def _pack(images, config: ModelConfig, bucket: int) -> VisionInputs:
    if not images:
        d = config.vision.patch_dim
        return VisionInputs(np.zeros((bucket, d), np.float32), np.zeros((bucket, 2), np.int32),
                            np.full((bucket,), -1, np.int32), np.full((bucket,), -1, np.int32))
    vb = pack_images(images, [bucket], config.vision.window_size)
    return VisionInputs(vb.pixel_values, vb.hw_pos, vb.segment_ids, vb.window_ids)


def train_batch(rollouts: dict, config: ModelConfig, num_micro: int, old_logprobs=None, ref_logprobs=None,
                with_vision: bool = True) -> TrainBatch:
    """Cuts rollouts into num_micro micro-batches (numpy TrainBatch); old/ref log-probs are [B, T] or None."""
    b, t = rollouts["input_ids"].shape
    mb = b // num_micro
    split = lambda x: x.reshape(num_micro, mb, *x.shape[1:])  # noqa: E731
    old = np.zeros((b, t), np.float32) if old_logprobs is None else np.asarray(old_logprobs, np.float32)
    vision = None
    if with_vision:
        groups = [sum(rollouts["row_images"][m * mb:(m + 1) * mb], []) for m in range(num_micro)]
        need = max(sum(img.patches.shape[0] for img in g) for g in groups)
        bucket = min(x for x in PATCH_BUCKETS if x >= max(need, 1))
        packed = [_pack(g, config, bucket) for g in groups]
        vision = VisionInputs(*(np.stack(field) for field in zip(*(p[:4] for p in packed))))
    pos = rollouts["positions"].reshape(3, num_micro, mb, t).transpose(1, 0, 2, 3)
    return TrainBatch(
        input_ids=split(rollouts["input_ids"]), attention_mask=split(rollouts["attention_mask"]),
        positions=np.ascontiguousarray(pos), targets=split(rollouts["targets"]),
        loss_mask=split(rollouts["loss_mask"]), old_logprobs=split(old), advantages=split(rollouts["advantages"]),
        sft_weights=split(rollouts["sft_weights"]),
        ref_logprobs=None if ref_logprobs is None else split(np.asarray(ref_logprobs, np.float32)), vision=vision)


def flat_rows(x: np.ndarray) -> np.ndarray:
    """[M, mb, ...] -> [M * mb, ...]."""
    x = np.asarray(x)
    return x.reshape(-1, *x.shape[2:])


def take_rows(rollouts: dict, start: int, stop: int) -> dict:
    """Rows [start, stop) of `make_rollouts` output (same T)."""
    out = {}
    for key, value in rollouts.items():
        if key == "positions":
            out[key] = value[:, start:stop]
        else:
            out[key] = value[start:stop]
    return out
