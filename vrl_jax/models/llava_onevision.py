"""LLaVA-OneVision (llava-hf/llava-onevision-qwen2-*-ov-hf): SigLIP tiles, a GELU projector, a Qwen2 decoder.

The language model is the shared `Qwen2Decoder` with 1-D rotary positions: the three M-RoPE rows are
equal and `mrope_section` is (head_dim/2, 0, 0), which is exactly 1-D RoPE. Image placeholders are
filled from the projected SigLIP features of each image's tiles plus `image_newline`, through the
host-computed gather of `anyres.feature_map` (unpadding, anyres_max_N downsampling, newlines), so the
device sees static shapes only.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vrl_jax.models import anyres, layers, lora
from vrl_jax.models.config import ModelConfig
from vrl_jax.models.positions import text_positions
from vrl_jax.models.processor import VLProcessor, left_pad, stack_pixels
from vrl_jax.models.qwen2 import Qwen2Decoder, _param, _zeros
from vrl_jax.models.qwen_vl import QwenVL, VisionInputs, merge_image_features
from vrl_jax.models.siglip import SiglipTower
from vrl_jax.models.weights import LM_RULES, WeightTable


def gather_units(units, index, weight):
    """units: [N, H]; index: int [U, K]; weight: [U, K] -> [U, H], sum_k weight * units[index] (float32 sum)."""
    picked = jnp.take(units, index, axis=0).astype(jnp.float32)
    return jnp.einsum("uk,ukh->uh", weight.astype(jnp.float32), picked,
                      precision=jax.lax.Precision.HIGHEST).astype(units.dtype)


class Projector(nnx.Module):
    """The connector: linear -> activation -> linear into the LM width, and the `image_newline` vector."""

    def __init__(self, v, hidden: int, *, param_dtype, rngs: nnx.Rngs):
        self.config = v
        self.linear1_w, self.linear2_w = _param(rngs, (v.width, hidden), param_dtype), _param(rngs, (hidden, hidden),
                                                                                              param_dtype)
        if v.projector_bias:
            self.linear1_b, self.linear2_b = _zeros((hidden,), param_dtype), _zeros((hidden,), param_dtype)
        self.newline = _param(rngs, (hidden,), param_dtype, std=hidden ** -0.5)
        self.lora: lora.LoraConfig | None = None  # set by `lora.add_adapters`

    def __call__(self, feats, lora_scale=1.0, lora_dropout=None):
        """SigLIP features [P, width] -> [P, H]; lora_scale, lora_dropout: for the adapters (`Qwen2Decoder`)."""
        dt, bias = feats.dtype, self.config.projector_bias
        w = lora.cast(lora.weights(self, self.lora, lora_scale, lora_dropout, prefix="linear", stacked=False), dt)
        x = lora.project(feats, w, "linear1_w")
        x = layers.activation(self.config.projector_act)(x + w["linear1_b"] if bias else x)
        x = lora.project(x, w, "linear2_w")
        return x + w["linear2_b"] if bias else x


class LlavaOnevision(QwenVL):
    """LLaVA-OneVision; the decoder, hidden_states, logits and __call__ are QwenVL's."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.dtype = dtype
        self.visual = SiglipTower(config.vision, param_dtype=param_dtype, rngs=rngs)
        self.projector = Projector(config.vision, config.text.hidden_size, param_dtype=param_dtype, rngs=rngs)
        self.language = Qwen2Decoder(config.text, tie_word_embeddings=config.tie_word_embeddings,
                                     param_dtype=param_dtype, rngs=rngs)

    def image_features(self, vision: VisionInputs, remat: bool = False, lora_scale=1.0, lora_dropout=None):
        """Placeholder features [U, H] in placeholder order, from packed tiles and the feature map."""
        feats = self.visual(vision.pixel_values, vision.hw_pos, dtype=self.dtype, remat=remat, lora_scale=lora_scale,
                            lora_dropout=lora.sub_key(lora_dropout, 0))
        feats = self.projector(feats, lora_scale, lora.sub_key(lora_dropout, 1))
        units = jnp.concatenate([feats, self.projector.newline.value.astype(self.dtype)[None]])  # unit P: newline
        return gather_units(units, vision.feature_index, vision.feature_weight)

    def embed_with_deepstack(self, input_ids, vision: VisionInputs | None = None, remat: bool = False,
                             lora_scale=1.0, lora_dropout=None):
        """input_ids: int [B, T] -> ([B, T, H] with image features merged in, None: no DeepStack)."""
        x = self.language.embed_tokens(input_ids, self.dtype)
        if vision is not None:
            feats = self.image_features(vision, remat, lora_scale, lora_dropout)
            x = merge_image_features(x, input_ids, feats, self.config.image_token_id)
        return x, None


def _siglip_rules():
    enc = "vision_tower.encoder.layers.{i}."
    return (
        ("vision_tower.embeddings.patch_embedding.weight", "visual.patch_w", "conv"),
        ("vision_tower.embeddings.patch_embedding.bias", "visual.patch_b", None),
        ("vision_tower.embeddings.position_embedding.weight", "visual.pos_embed", None),
        *((f"{enc}layer_norm{n}.{s}", f"visual.layers.norm{n}_{s[0]}", None) for n in "12" for s in ("weight", "bias")),
        *((f"{enc}self_attn.{hf}_proj.weight", f"visual.layers.{p}_w", "linear") for hf, p in
          (("q", "q"), ("k", "k"), ("v", "v"), ("out", "o"))),
        *((f"{enc}self_attn.{hf}_proj.bias", f"visual.layers.{p}_b", None) for hf, p in
          (("q", "q"), ("k", "k"), ("v", "v"), ("out", "o"))),
        *((f"{enc}mlp.fc{n}.weight", f"visual.layers.fc{n}_w", "linear") for n in "12"),
        *((f"{enc}mlp.fc{n}.bias", f"visual.layers.fc{n}_b", None) for n in "12"),
        ("vision_tower.post_layernorm.weight", "visual.post_norm_w", None),
        ("vision_tower.post_layernorm.bias", "visual.post_norm_b", None),
    )


# The layout transformers 5.x writes (`save_pretrained`); also read: the in-memory 5.x names
# (`model.language_model.*`, ...) and the 4.x files of the released checkpoints (`vision_tower.vision_model.*`).
LLAVA_WEIGHTS = WeightTable(
    rules=(*(("language_model." + t, p, k) for t, p, k in LM_RULES),
           ("image_newline", "projector.newline", None),
           *((f"multi_modal_projector.linear_{n}.{s}", f"projector.linear{n}_{s[0]}",
              "linear" if s == "weight" else None) for n in "12" for s in ("weight", "bias")),
           *_siglip_rules()),
    in_memory=(("language_model.model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
               ("multi_modal_projector.", "model.multi_modal_projector."), ("image_newline", "model.image_newline"),
               ("language_model.lm_head.", "lm_head.")),
    prefixes=(("vision_tower.vision_model.", "vision_tower."),))


@dataclasses.dataclass
class LlavaProcessor(VLProcessor):
    """Prompts and images to model inputs for LLaVA-OneVision.

    An image is tiled when it is its prompt's only image (transformers' `batch_num_images == 1`), else
    it is one padded base tile; `<image>` expands to transformers' token count; positions are 1-D.
    """

    patch_buckets: tuple[int, ...] = ()  # () = whole tiles, see __post_init__
    image_placeholder = "<image>"

    def __post_init__(self):
        v = self.config.vision
        if not self.patch_buckets:  # whole tiles: 4, 8, 16, then 1, 2, 4 times the most one image has (1 + 36)
            most = 1 + max(h * w for h, w in v.grid_pinpoints) // v.image_size ** 2
            tiles = sorted({4, 8, 16} | {-(-most * k // 4) * 4 for k in (1, 2, 4)})
            self.patch_buckets = tuple(v.tile_tokens * n for n in tiles)
        anyres.check_buckets(self.patch_buckets, v.tile_tokens)

    @classmethod
    def load_image_processor(cls, directory: str, config: ModelConfig):
        return anyres.AnyResImageProcessor.from_pretrained(directory, config.vision.patch_size,
                                                           config.vision.grid_pinpoints)

    def process_row(self, images: Sequence) -> list:
        tiled = len(images) == 1
        return [im if isinstance(im, anyres.AnyResImage) else self.image_processor.defer(im, tiled=tiled)
                for im in images]

    def feature_map(self, image: anyres.AnyResImage):
        return self._feature_map(image.image_size, image.tiled)

    def _feature_map(self, size: tuple[int, int], tiled: bool):
        v = self.config.vision
        return anyres.feature_map(size, tiled, v.image_size, v.grid, v.grid_pinpoints, v.max_num_patches)

    def num_tokens(self, image: anyres.AnyResImage) -> int:
        return len(self.feature_map(image)[0])

    def image_tokens_for_size(self, height: int, width: int, images_in_prompt: int) -> int:
        return len(self._feature_map((height, width), images_in_prompt == 1)[0])

    def positions(self, input_ids, attention_mask, images):
        return text_positions(attention_mask)

    def pack(self, images: list, buckets: Sequence[int] | None = None, pixels: bool = True) -> anyres.AnyResBatch:
        """Packs a batch's tiles into the smallest bucket (an all-padding buffer when there are none)."""
        v = self.config.vision
        return anyres.pack_anyres(images, [self.feature_map(im) for im in images],
                                  tuple(buckets or self.patch_buckets), v.patch_dim, v.grid, pixels)

    def pack_micro_batches(self, row_images: Sequence[Sequence], prompt_index: np.ndarray, num_micro: int,
                           buckets: Sequence[int], group: int = 1, local: Sequence[bool] | None = None) -> VisionInputs:
        """`processor.pack_row_blocks` for tiles: each prompt's images once per block of rows, and every row's
        (with `group` > 1: every group's first row's) placeholders mapped onto them. VisionInputs of
        [M, P, ...], feature_index/weight [M, U, TAPS]; only the `local` blocks' pixels (None: all)."""
        v = self.config.vision
        per = len(prompt_index) // num_micro
        micro = [list(prompt_index[m * per:(m + 1) * per:group]) for m in range(num_micro)]
        unique = [list(dict.fromkeys(prompts)) for prompts in micro]
        rows = lambda prompts: sum(im.patches.shape[0] for p in prompts for im in row_images[p])  # noqa: E731
        anyres.check_buckets(buckets, v.tile_tokens)
        bucket = anyres.choose_bucket(max(max(rows(u) for u in unique), 1), buckets)
        units = anyres.max_placeholders(anyres.choose_bucket(max(max(rows(m) for m in micro), 1), buckets), v.grid)
        packed, index, weight = [], [], []
        for m, (prompts, u) in enumerate(zip(micro, unique)):
            batch = self.pack([im for p in u for im in row_images[p]], [bucket], pixels=local is None or bool(local[m]))
            maps, offset = {}, 0
            for p in u:  # each prompt's slice of the packed placeholder map
                n = sum(self.num_tokens(im) for im in row_images[p])
                maps[p], offset = slice(offset, offset + n), offset + n
            idx = np.concatenate([batch.feature_index[maps[p]] for p in prompts] + [np.zeros((0, anyres.TAPS), int)])
            w = np.concatenate([batch.feature_weight[maps[p]] for p in prompts] + [np.zeros((0, anyres.TAPS))])
            index.append(np.pad(idx, ((0, units - len(idx)), (0, 0))).astype(np.int32))
            weight.append(np.pad(w, ((0, units - len(w)), (0, 0))).astype(np.float32))
            packed.append(batch)
        return VisionInputs(stack_pixels([p.pixel_values for p in packed], local),
                            *(np.stack([getattr(p, f) for p in packed])
                              for f in ("hw_pos", "segment_ids", "window_ids")),
                            feature_index=np.stack(index), feature_weight=np.stack(weight))


def check_inputs(config: ModelConfig, rs: np.random.RandomState) -> list[dict]:
    """`convert check` inputs: text, a left-padded text batch, one tiled image, two images in one prompt
    and a tiled image next to a prompt with two (left padding). Each carries transformers' kwargs."""
    from PIL import Image
    v = config.vision
    proc = anyres.AnyResImageProcessor(tile_size=v.image_size, patch_size=v.patch_size, grid_pinpoints=v.grid_pinpoints)
    fake = LlavaProcessor(tokenizer=None, image_processor=proc, config=config)

    def image(h, w):
        yy, xx = np.mgrid[0:h, 0:w]
        rgb = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), (xx + yy) % 256], -1)
        return Image.fromarray(rgb.astype(np.uint8))

    reserved = {config.image_token_id, config.video_token_id}
    text = lambda n: [int(i) if int(i) not in reserved else 0  # noqa: E731
                      for i in rs.randint(0, min(config.text.vocab_size, 150000), size=n)]
    s = v.image_size
    wide, tall = image(s * 5 // 4, s * 7 // 3), image(s * 2, s * 3 // 4)

    def batch(name, rows):
        images = [fake.process_row([im for im in row if not isinstance(im, int)]) for row in rows]
        ids = []
        for row, processed in zip(rows, images):
            it = iter(processed)
            ids.append([t for item in row for t in ([item] if isinstance(item, int) else
                                                   [config.image_token_id] * fake.num_tokens(next(it)))])
        input_ids, mask = left_pad(ids)
        flat = [im for row in images for im in row]
        positions = text_positions(mask)[0]
        out = dict(name=name, input_ids=input_ids, attention_mask=mask, positions=positions, vision=None,
                   hf=dict(position_ids=positions[0]))
        if flat:
            packed = fake.pack(flat, [-(-sum(im.patches.shape[0] for im in flat) // (4 * v.tile_tokens))
                                      * 4 * v.tile_tokens])
            out["vision"] = VisionInputs.from_batch(packed)
            out["hf"].update(hf_image_kwargs(images, v))
        return out

    return [batch("text", [text(24)]), batch("text, left-padded batch", [text(20), text(9)]),
            batch("one image", [text(5) + [wide] + text(8)]),
            batch("two images of different sizes", [text(3) + [wide] + text(2) + [tall] + text(4)]),
            batch("tiled + two-image rows, padded", [text(2) + [tall] + text(3),
                                                            text(4) + [wide, tall] + text(2)])]


def hf_image_kwargs(row_images: Sequence[Sequence[anyres.AnyResImage]], v) -> dict:
    """transformers' image inputs for processed rows: pixel_values [images, max tiles, C, S, S] (zero tiles
    pad), image_sizes [images, 2] (H, W), batch_num_images [rows]."""
    flat = [im for row in row_images for im in row]
    tiles = max(im.grid_thw[0] for im in flat)
    g, p, c = v.grid, v.patch_size, v.in_channels
    pixels = np.zeros((len(flat), tiles, c, v.image_size, v.image_size), np.float32)
    for i, im in enumerate(flat):
        n = im.grid_thw[0]
        pixels[i, :n] = im.patches.reshape(n, g, g, c, p, p).transpose(0, 3, 1, 4, 2, 5).reshape(
            n, c, v.image_size, v.image_size)
    return dict(pixel_values=pixels, image_sizes=np.array([im.image_size for im in flat], np.int64),
                batch_num_images=np.array([len(row) for row in row_images if row], np.int64))
