"""Prompts to model inputs: the checkpoint's chat template, image placeholders, positions, packed patches.

This replaces transformers' `Qwen2VLProcessor` (which cannot be built without torchvision) with
host-side NumPy that produces static shapes: prompts are left-padded to a length bucket and the
patches of all images of a batch are packed into one patch bucket.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import NamedTuple, Sequence

import numpy as np

from vrl_jax.models.config import ConfigError, ModelConfig
from vrl_jax.models.image_processing import (ImageProcessor, ProcessedImage, VisionBatch, choose_bucket,
                                             num_image_tokens, pack_images)
from vrl_jax.models.positions import rope_positions, token_types
from vrl_jax.models.qwen_vl import VisionInputs

IMAGE_PAD = "<|image_pad|>"


class ModelInputs(NamedTuple):
    """A batch of prompts: input_ids, attention_mask int32 [B, L] (left padded), positions int32 [3, B, L],
    next_position int32 [B] (where decoding continues), vision (packed patches, always present so that
    text-only and image batches share one compiled shape; a `VisionBatch`, or `VisionInputs` [S, P, ...]
    packed per row shard), row_images (host only: each row's
    ProcessedImages, for re-packing rows into training micro-batches)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    positions: np.ndarray
    next_position: np.ndarray
    vision: VisionBatch | VisionInputs
    row_images: tuple = ()


def _patches(images) -> int:
    return sum(int(np.prod(im.grid_thw)) for im in images)


def stack_pixels(buffers: Sequence[np.ndarray], local: Sequence[bool] | None) -> np.ndarray:
    """The blocks' pixel buffers [P, D] stacked [M, P, D], with only the `local` blocks' filled (the rest
    stay zero pages never written: another host's devices hold them); local None: all."""
    out = np.zeros((len(buffers), *np.shape(buffers[0])), np.float32)
    for m, buffer in enumerate(buffers):
        if local is None or local[m]:
            out[m] = buffer
    return out


def pack_row_blocks(processor, row_images: Sequence[Sequence], prompt_index: np.ndarray, num_blocks: int,
                    buckets: Sequence[int], group: int = 1, local: Sequence[bool] | None = None) -> VisionInputs:
    """Packs the images of `num_blocks` contiguous blocks of rows into one shared patch bucket, so the
    buffers stack: VisionInputs [M, P, ...] with `feature_index` [M, U] (see `batching.pack_micro_batches`).
    Row r answers prompt `prompt_index[r]`, whose images are `row_images[prompt_index[r]]`; a prompt's
    images are packed once per block. `processor`: anything with the model `config` and `pack`.
    `local` (bool [M], None: all): the blocks this process's devices hold; the others get their layout but
    no pixels, so their deferred images are not computed here."""
    per = len(prompt_index) // num_blocks
    merge = processor.config.vision.merge_size ** 2
    micro = [list(prompt_index[m * per:(m + 1) * per:group]) for m in range(num_blocks)]
    unique = [list(dict.fromkeys(prompts)) for prompts in micro]
    bucket = choose_bucket(max(max(_patches(im for p in u for im in row_images[p]) for u in unique), 1), buckets)
    units = choose_bucket(max(max(_patches(im for p in m for im in row_images[p]) for m in micro), 1),
                          buckets) // merge
    packed, index = [], np.zeros((num_blocks, units), np.int32)
    for m, (prompts, u) in enumerate(zip(micro, unique)):
        packed.append(processor.pack([im for p in u for im in row_images[p]], [bucket],
                                     pixels=local is None or bool(local[m])))
        start, offset = {}, 0
        for p in u:  # each prompt's first merged unit in the packed buffer
            start[p], offset = offset, offset + _patches(row_images[p]) // merge
        flat = [start[p] + k for p in prompts for k in range(_patches(row_images[p]) // merge)]
        index[m, :len(flat)] = flat
    return VisionInputs(stack_pixels([p.pixel_values for p in packed], local),
                        *(np.stack([getattr(p, f) for p in packed]) for f in ("hw_pos", "segment_ids", "window_ids")),
                        feature_index=index)


def left_pad(rows: Sequence[Sequence[int]], length: int | None = None, pad_id: int = 0):
    """Token rows -> input_ids, attention_mask int32 [B, length] (default the longest row), left padded."""
    length = max(map(len, rows)) if length is None else length
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    return ids, mask


def check_patch_geometry(image_processor: ImageProcessor, config: ModelConfig, directory: str) -> None:
    """The processor must cut patches as the vision tower reads them (Qwen3-VL: 16 pixels, Qwen2/2.5-VL: 14);
    raises ConfigError naming preprocessor_config.json and each disagreeing field."""
    v = config.vision
    wrong = [f"{name} {getattr(image_processor, name)} but the model's vision_config has {want}"
             for name, want in (("patch_size", v.patch_size), ("merge_size", v.merge_size),
                                ("temporal_patch_size", v.temporal_patch_size))
             if getattr(image_processor, name) != want]
    if wrong:
        file = os.path.join(directory, "preprocessor_config.json")
        missing = "" if os.path.exists(file) else " (the file is missing, so Qwen2-VL's defaults were used)"
        raise ConfigError(f"{file}{missing}: {'; '.join(wrong)}")


def _bucket(n: int, buckets: Sequence[int], what: str) -> int:
    for b in sorted(buckets):
        if n <= b:
            return b
    raise ValueError(f"{what} of {n} exceeds the largest bucket {max(buckets)} (buckets {sorted(buckets)}); "
                     f"raise the bucket sizes in the config or shorten the input")


@dataclasses.dataclass
class VLProcessor:
    """Renders chat messages with the checkpoint's tokenizer and prepares static-shape model inputs."""

    tokenizer: object  # a transformers tokenizer with a chat template
    image_processor: ImageProcessor
    config: ModelConfig
    length_buckets: tuple[int, ...] = (128, 256, 512, 1024, 2048)
    patch_buckets: tuple[int, ...] = (256, 1024, 4096, 16384)

    image_placeholder = IMAGE_PAD  # the chat template's text for one image

    @classmethod
    def from_pretrained(cls, directory: str, **kwargs) -> "VLProcessor":
        """The processor of the directory's model family (`families.FAMILIES`)."""
        from transformers import AutoTokenizer

        from vrl_jax.models.families import resolve
        if not os.path.exists(os.path.join(directory, "tokenizer_config.json")) and \
                not os.path.exists(os.path.join(directory, "tokenizer.json")):
            raise FileNotFoundError(f"{directory}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
        tokenizer = AutoTokenizer.from_pretrained(directory)
        template = os.path.join(directory, "chat_template.json")  # the processor's template (llava-hf repos)
        if getattr(tokenizer, "chat_template", None) is None and os.path.exists(template):
            with open(template) as f:
                tokenizer.chat_template = json.load(f).get("chat_template")
        config = ModelConfig.from_pretrained(directory)
        family = resolve(config.model_type, "processor")
        return family(tokenizer, family.load_image_processor(directory, config), config, **kwargs)

    @classmethod
    def load_image_processor(cls, directory: str, config: ModelConfig):
        image_processor = ImageProcessor.from_pretrained(directory)
        check_patch_geometry(image_processor, config, directory)
        return image_processor

    def process_row(self, images: Sequence) -> list:
        """One prompt's images (PIL / arrays, or already processed) -> processed images, their pixels computed
        when first packed (`ImageProcessor.defer`)."""
        return [im if isinstance(im, ProcessedImage) else self.image_processor.defer(im) for im in images]

    def num_tokens(self, image) -> int:
        """Image placeholder tokens of one processed image."""
        return int(num_image_tokens(image.grid_thw, self.image_processor.merge_size))

    def image_tokens_for_size(self, height: int, width: int, images_in_prompt: int) -> int:
        """Placeholder tokens of an image of that size (read from its header, not decoded)."""
        ip = self.image_processor
        rh, rw = ip.target_size(height, width)
        return int(num_image_tokens((1, rh // ip.patch_size, rw // ip.patch_size), ip.merge_size))

    def positions(self, input_ids: np.ndarray, attention_mask: np.ndarray, images: list) -> tuple:
        """Rotary positions int32 [3, B, L] and next_position int32 [B] of left-padded prompts."""
        types = token_types(input_ids, self.config.image_token_id, self.config.video_token_id)
        grids = np.array([im.grid_thw for im in images], np.int64).reshape(-1, 3)
        return rope_positions(types, attention_mask, grids, self.config.vision.merge_size)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else (self.config.pad_token_id or 0))

    def render(self, messages: list[dict]) -> str:
        """Chat messages -> prompt text ending with the assistant generation prompt."""
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat_template; the checkpoint's tokenizer_config.json or "
                             "chat_template.jinja must provide one")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def tokenize_prompt(self, messages: list[dict], images: Sequence[ProcessedImage]) -> list[int]:
        """One prompt's token ids with each image placeholder expanded to its number of image tokens."""
        text = self.render(messages)
        parts = text.split(self.image_placeholder)
        if len(parts) - 1 != len(images):
            raise ValueError(f"the prompt has {len(parts) - 1} image placeholder(s) but {len(images)} image(s) "
                             f"were given")
        counts = [self.num_tokens(img) for img in images]
        expanded = parts[0] + "".join(self.image_placeholder * n + part for n, part in zip(counts, parts[1:]))
        return list(self.tokenizer(expanded, add_special_tokens=False)["input_ids"])

    def encode(self, prompts: Sequence[list[dict]], images: Sequence[Sequence] | None = None,
               shards: int = 1, local: Sequence[bool] | None = None) -> ModelInputs:
        """prompts: chat messages per row; images: per row, PIL images or `ProcessedImage`s in prompt order.
        shards > 1: the rows' images packed per contiguous block of B / shards rows (the rows one
        data-parallel device holds), `VisionInputs` [S, P, ...]; else one buffer for the batch. `local`
        (bool [S]): the blocks this process's devices hold, the only ones whose pixels it computes."""
        images = images if images is not None else [[] for _ in prompts]
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
        if shards < 1 or len(prompts) % shards:
            raise ValueError(f"{len(prompts)} prompts do not split into {shards} equal blocks")
        processed = [self.process_row(row) for row in images]
        rows = [self.tokenize_prompt(m, imgs) for m, imgs in zip(prompts, processed)]
        length = _bucket(max(len(r) for r in rows), self.length_buckets, "a prompt length")
        ids, mask = left_pad(rows, length, self.pad_token_id)
        flat = [im for row in processed for im in row]
        positions, next_position = self.positions(ids, mask, flat)
        vision = self.pack(flat) if shards == 1 else self.pack_micro_batches(
            processed, np.arange(len(rows)), shards, self.patch_buckets, local=local)
        return ModelInputs(ids, mask, positions, next_position, vision, tuple(map(tuple, processed)))

    def encode_examples(self, examples: Sequence[dict], shards: int = 1,
                        local: Sequence[bool] | None = None) -> ModelInputs:
        """The data pipeline's `encode_fn`: per-example dicts with `prompt_messages` and `images`."""
        return self.encode([e["prompt_messages"] for e in examples], [e["images"] for e in examples], shards, local)

    def pack_micro_batches(self, row_images: Sequence[Sequence], prompt_index: np.ndarray, num_blocks: int,
                           buckets: Sequence[int], group: int = 1, local: Sequence[bool] | None = None) -> VisionInputs:
        """`pack_row_blocks` with this processor (a family whose placeholders are not its merged units in
        order, LLaVA-OneVision, overrides it)."""
        return pack_row_blocks(self, row_images, prompt_index, num_blocks, buckets, group, local)

    def pack(self, images: list[ProcessedImage], buckets: Sequence[int] | None = None,
             pixels: bool = True) -> VisionBatch:
        """Packs a batch's images into the smallest patch bucket; an all-padding buffer when there are none.
        `pixels=False`: the layout alone (zero pixels, deferred images left uncomputed)."""
        v = self.config.vision
        buckets = tuple(buckets or self.patch_buckets)
        if images:
            return pack_images(images, buckets, v.window_size, patch_size=v.patch_size, merge_size=v.merge_size,
                               pixels=pixels)
        p = min(buckets)
        return VisionBatch(np.zeros((p, v.patch_dim), np.float32), np.zeros((p, 2), np.int32),
                           np.full((p,), -1, np.int32), np.full((p,), -1, np.int32), np.zeros((0, 3), np.int32))
