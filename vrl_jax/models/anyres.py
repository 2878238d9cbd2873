"""LLaVA-OneVision's AnyRes image layout on the host (NumPy + PIL, never traced).

An image becomes SigLIP tiles: the whole image resized to one tile (the base), then, when it is the
only image of its prompt, the tiles of the best "pinpoint" resolution (resized keeping the aspect
ratio, padded, cut into tile-sized squares). Equal to transformers' `LlavaOnevisionImageProcessorPil`.

Which projected feature fills which image placeholder is decided here too, as a static gather:
`feature_map` returns, per placeholder, four (unit, weight) pairs over the image's projected patch
features, with unit -1 for `image_newline`. That covers transformers' `pack_image_features`: the
tile grid reassembled, unpadded to the original aspect ratio, bilinearly downsampled when it holds
more than `anyres_max_N` tiles' worth (`ratio > 1.1`: four weights; otherwise one weight of 1) and a
newline column after each row. The device only gathers and sums, so no shape depends on an image.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import PIL.Image

from vrl_jax.models.image_processing import (CONFIG_NAME, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, DeferredPatches,
                                             choose_bucket, image_hw, patches_of, read_processor_config, to_rgb_array)

NEWLINE = -1  # a feature_map unit that stands for the image_newline vector
TAPS = 4  # (unit, weight) pairs per placeholder: the four neighbours of a bilinear sample


def select_best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The (height, width) pinpoint keeping most of the image's resolution, then wasting least (transformers')."""
    best, best_effective, best_waste = None, 0, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = ph * pw - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (int(ph), int(pw)), effective, waste
    return best


def fit_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """Size of the image resized into (target_h, target_w) keeping its aspect ratio (`get_patch_output_size`)."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def _resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [height, width, 3], PIL BICUBIC (PIL copies when the size is unchanged)."""
    return np.asarray(PIL.Image.fromarray(rgb).resize((width, height), PIL.Image.Resampling.BICUBIC))


def tile_patches(tile: np.ndarray, patch: int) -> np.ndarray:
    """float [S, S, C] -> [(S/patch)^2, C*patch*patch]: row-major patches, each laid out (C, P, P) like Conv2d."""
    s, _, c = tile.shape
    g = s // patch
    return tile.reshape(g, patch, g, patch, c).transpose(0, 2, 4, 1, 3).reshape(g * g, c * patch * patch)


class AnyResImage(NamedTuple):
    """One image as SigLIP input: `patches` float32 [tiles * g*g, C*P*P] (the base tile first, then the grid
    tiles row-major), `grid_thw` (tiles, g, g), `image_size` (height, width) of the original and
    `tiled` (False when the image shares its prompt with others: the base tile alone)."""

    patches: np.ndarray
    grid_thw: tuple[int, int, int]
    image_size: tuple[int, int]
    tiled: bool


@dataclasses.dataclass(frozen=True)
class AnyResImageProcessor:
    """`LlavaOnevisionImageProcessorPil` in NumPy; `proc(image, tiled=True) -> AnyResImage`."""

    tile_size: int = 384
    patch_size: int = 14
    grid_pinpoints: tuple[tuple[int, int], ...] = tuple((384 * a, 384 * b) for a in range(1, 7) for b in range(1, 7))
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255

    def __post_init__(self):
        if self.tile_size % self.patch_size:
            raise ValueError(f"tile size {self.tile_size} must be a multiple of patch_size {self.patch_size}")
        for name in ("image_mean", "image_std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"AnyResImageProcessor.{name} must have 3 values (RGB), got {value}")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "grid_pinpoints", tuple((int(h), int(w)) for h, w in self.grid_pinpoints))

    @property
    def grid(self) -> int:
        return self.tile_size // self.patch_size

    @property
    def max_patches(self) -> int:
        """Patches of one SigLIP tile: the attention segment length (`visual.max_segment`)."""
        return self.grid ** 2

    @classmethod
    def from_dict(cls, config: Mapping, patch_size: int, grid_pinpoints=None) -> "AnyResImageProcessor":
        """From a `preprocessor_config.json` dict; `patch_size` and the default pinpoints come from the model."""
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if config.get(flag, True) is not True:
                raise ValueError(f"field {flag!r}: only true is supported, got {config[flag]!r}")
        if config.get("resample", PIL.Image.Resampling.BICUBIC) != PIL.Image.Resampling.BICUBIC:
            raise ValueError(f"field 'resample': only 3 (BICUBIC) is supported, got {config['resample']!r}")
        size = config.get("size") or {"height": 384, "width": 384}
        side = size.get("height", size.get("shortest_edge"))
        if side is None or size.get("width", side) != side:
            raise ValueError(f"field 'size' must be a square {{'height': S, 'width': S}}, got {size!r}")
        kwargs = {k: config[k] for k in ("image_mean", "image_std", "rescale_factor") if config.get(k) is not None}
        pinpoints = config.get("image_grid_pinpoints") or grid_pinpoints
        if pinpoints:
            kwargs["grid_pinpoints"] = pinpoints
        return cls(tile_size=int(side), patch_size=patch_size, **kwargs)

    @classmethod
    def from_pretrained(cls, directory: str, patch_size: int, grid_pinpoints=None) -> "AnyResImageProcessor":
        path = os.path.join(directory, CONFIG_NAME)
        try:
            return cls.from_dict(read_processor_config(directory) or {}, patch_size, grid_pinpoints)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from e

    def _normalize(self, tile: np.ndarray) -> np.ndarray:
        # float64 rescale then float32 normalise: the reference's order, kept for bit-equal output.
        scaled = (tile.astype(np.float64) * self.rescale_factor).astype(np.float32)
        return (scaled - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)

    def tiles(self, rgb: np.ndarray, tiled: bool) -> list[np.ndarray]:
        """uint8 [H, W, 3] -> uint8 tiles [S, S, 3]: the base tile, then the pinpoint grid row-major (tiled),
        or the image padded to a square with the mean colour and resized (not tiled)."""
        s = self.tile_size
        h, w = rgb.shape[:2]
        if not tiled:
            side = max(h, w)
            square = np.empty((side, side, 3), np.uint8)
            square[...] = np.asarray([int(m * 255) for m in self.image_mean], np.uint8)
            top, left = (side - h) // 2 if h < side else 0, (side - w) // 2 if w < side else 0
            square[top:top + h, left:left + w] = rgb
            return [_resize(square, s, s)]
        bh, bw = select_best_resolution(h, w, self.grid_pinpoints)
        nh, nw = fit_size(h, w, bh, bw)
        canvas = np.zeros((bh, bw, 3), np.uint8)  # padded with black, as transformers does here
        top, left = (bh - nh) // 2, (bw - nw) // 2
        canvas[top:top + nh, left:left + nw] = _resize(rgb, nh, nw)
        grid = [canvas[i:i + s, j:j + s] for i in range(0, bh, s) for j in range(0, bw, s)]
        return [_resize(rgb, s, s)] + grid

    def num_tiles(self, height: int, width: int, tiled: bool) -> int:
        """How many tiles `tiles` cuts an image of that size into: the base tile, and the grid when tiled."""
        if not tiled:
            return 1
        bh, bw = select_best_resolution(height, width, self.grid_pinpoints)
        return 1 + -(-bh // self.tile_size) * -(-bw // self.tile_size)

    def defer(self, image, tiled: bool = True) -> AnyResImage:
        """`self(image, tiled)` with its patches computed when first read (`DeferredPatches`)."""
        h, w = image_hw(image)
        tiles = self.num_tiles(h, w, tiled)
        shape = (tiles * self.grid * self.grid, 3 * self.patch_size ** 2)
        return AnyResImage(DeferredPatches(shape, functools.partial(patches_of, self, image, tiled)),
                           (tiles, self.grid, self.grid), (h, w), tiled)

    def __call__(self, image, tiled: bool = True) -> AnyResImage:
        rgb = to_rgb_array(image)
        tiles = self.tiles(rgb, tiled)
        patches = np.concatenate([tile_patches(self._normalize(t), self.patch_size) for t in tiles])
        return AnyResImage(np.ascontiguousarray(patches, np.float32), (len(tiles), self.grid, self.grid),
                           (int(rgb.shape[0]), int(rgb.shape[1])), tiled)


def bilinear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows of `interpolate(mode="bilinear", align_corners=False)` along one axis, in float32 as
    PyTorch computes them: (low int [out], high int [out], weight of high float32 [out])."""
    scale = np.float32(size_in) / np.float32(size_out)
    src = np.maximum(scale * (np.arange(size_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5),
                     np.float32(0))
    low = src.astype(np.int64)
    high = low + (low < size_in - 1)
    frac = np.clip(src - low.astype(np.float32), 0, 1).astype(np.float32)
    return low, high, frac


def unpadded_grid(height: int, width: int, rows: int, cols: int) -> tuple[slice, slice]:
    """The rows and columns of a [rows, cols] feature grid that cover the original image (`unpad_image`)."""
    if width / height > cols / rows:
        new = int(round(height * (cols / width), 7))
        pad = (rows - new) // 2
        return slice(pad, rows - pad), slice(0, cols)
    new = int(round(width * (rows / height), 7))
    pad = (cols - new) // 2
    return slice(0, rows), slice(pad, cols - pad)


def feature_map(image_size: tuple[int, int], tiled: bool, tile_size: int, grid: int,
                pinpoints: Sequence[Sequence[int]], max_num_patches: int) -> tuple[np.ndarray, np.ndarray]:
    """Which of the image's projected features fill its placeholders, in order.

    Units are the image's feature rows, tile-major (tile k, patch (r, c) -> k*grid^2 + r*grid + c), and
    NEWLINE. Returns index int32 [n, TAPS] and weight float32 [n, TAPS]; placeholder i takes
    sum_k weight[i, k] * unit[index[i, k]]. n is transformers' number of image tokens for this image.
    """
    t = grid * grid
    base = _taps(np.arange(t)[:, None], np.ones((t, 1), np.float32))
    newline = _taps(np.full((1, 1), NEWLINE), np.ones((1, 1), np.float32))
    if not tiled:
        return tuple(np.concatenate([b, n]) for b, n in zip(base, newline))
    bh, bw = select_best_resolution(*image_size, pinpoints)
    nph, npw = bh // tile_size, bw // tile_size
    r, c = np.meshgrid(np.arange(nph * grid), np.arange(npw * grid), indexing="ij")
    full = (1 + (r // grid) * npw + c // grid) * t + (r % grid) * grid + c % grid  # [rows, cols] unit ids
    rows, cols = unpadded_grid(*image_size, nph * grid, npw * grid)
    full = full[rows, cols]
    h, w = full.shape
    ratio = math.sqrt(h * w / (max_num_patches * grid ** 2))
    if ratio > 1.1:  # anyres_max_N: bilinear downsampling to int(h // ratio) x int(w // ratio)
        (y0, y1, fy), (x0, x1, fx) = bilinear_taps(h, int(h // ratio)), bilinear_taps(w, int(w // ratio))
        units = np.stack([full[y0][:, x0], full[y0][:, x1], full[y1][:, x0], full[y1][:, x1]], -1)
        wy0, wy1, wx0, wx1 = 1 - fy[:, None], fy[:, None], 1 - fx[None, :], fx[None, :]
        weights = np.stack(np.broadcast_arrays(wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1), -1)
    else:
        units, weights = full[..., None], np.ones(full.shape + (1,), np.float32)
    units, weights = _taps(units, weights)  # [h', w', TAPS]
    line_units = np.broadcast_to(newline[0], (units.shape[0], 1, TAPS))
    line_weights = np.broadcast_to(newline[1], (units.shape[0], 1, TAPS))
    units = np.concatenate([units, line_units], 1).reshape(-1, TAPS)  # a newline closes every row
    weights = np.concatenate([weights, line_weights], 1).reshape(-1, TAPS)
    return np.concatenate([base[0], units]), np.concatenate([base[1], weights])


def _taps(units: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pads [..., k] units/weights to [..., TAPS] with (unit 0, weight 0)."""
    pad = ((0, 0),) * (units.ndim - 1) + ((0, TAPS - units.shape[-1]),)
    return np.pad(units, pad).astype(np.int32), np.pad(weights, pad).astype(np.float32)


class AnyResBatch(NamedTuple):
    """The tiles of a batch's images packed into one buffer of P patch rows (P a multiple of the tile's g*g).

    pixel_values f32 [P, C*P*P]; hw_pos int32 [P, 2] (patch row, col in its tile: the position embedding);
    segment_ids int32 [P] (one per tile, -1 padding); window_ids = segment_ids; grid_thw int32 [n_images, 3];
    feature_index int32 [U, TAPS] and feature_weight f32 [U, TAPS]: per placeholder of the batch (reading
    order), the units it sums; unit P is image_newline. U = P + P / g bounds the placeholders of any
    images that fit in P rows, so U is static per bucket; padding entries are (0, weight 0).
    """

    pixel_values: np.ndarray
    hw_pos: np.ndarray
    segment_ids: np.ndarray
    window_ids: np.ndarray
    grid_thw: np.ndarray
    feature_index: np.ndarray
    feature_weight: np.ndarray


def max_placeholders(rows: int, grid: int) -> int:
    """The most placeholders images of `rows` patch rows can have (each tile's g*g units plus g newlines)."""
    return rows + rows // grid


def check_buckets(buckets: Sequence[int], tile_tokens: int) -> None:
    bad = [b for b in buckets if b % tile_tokens or b % 4]
    if bad:
        raise ValueError(f"patch buckets {bad} are not multiples of 4 and of one tile's {tile_tokens} patches "
                         f"(LLaVA-OneVision packs whole tiles)")


def pack_tiles(images: Sequence[AnyResImage], maps: Sequence[tuple[np.ndarray, np.ndarray]], bucket: int,
               patch_dim: int, grid: int, pixels: bool = True) -> AnyResBatch:
    """Packs the images' tiles into `bucket` rows; maps: each image's `feature_map`, in placeholder order.
    `pixels=False`: all but the pixels (left zero; see `image_processing.pack_images`)."""
    t = grid * grid
    pixel_values = np.zeros((bucket, patch_dim), np.float32)
    hw_pos = np.zeros((bucket, 2), np.int32)
    segment_ids = np.full(bucket, -1, np.int32)
    units = max_placeholders(bucket, grid)
    index, weight = np.zeros((units, TAPS), np.int32), np.zeros((units, TAPS), np.float32)
    start = n_tiles = placeholders = 0
    local = np.stack(np.divmod(np.arange(t), grid), -1)
    for img, (idx, w) in zip(images, maps):
        n = img.patches.shape[0]
        if n + start > bucket:
            raise ValueError(f"{start + n} patch rows do not fit in a bucket of {bucket}")
        tiles = n // t
        if pixels:
            pixel_values[start:start + n] = img.patches
        hw_pos[start:start + n] = np.tile(local, (tiles, 1))
        segment_ids[start:start + n] = n_tiles + np.repeat(np.arange(tiles, dtype=np.int32), t)
        index[placeholders:placeholders + len(idx)] = np.where(idx == NEWLINE, bucket, idx + start)
        weight[placeholders:placeholders + len(idx)] = w
        start, n_tiles, placeholders = start + n, n_tiles + tiles, placeholders + len(idx)
    grid_thw = np.asarray([img.grid_thw for img in images], np.int32).reshape(-1, 3)
    return AnyResBatch(pixel_values, hw_pos, segment_ids, segment_ids.copy(), grid_thw, index, weight)


def pack_anyres(images: Sequence[AnyResImage], maps, buckets: Sequence[int], patch_dim: int, grid: int,
                pixels: bool = True) -> AnyResBatch:
    """Packs into the smallest bucket that fits (see `pack_tiles`)."""
    check_buckets(buckets, grid * grid)
    bucket = choose_bucket(max(sum(img.patches.shape[0] for img in images), 1), buckets)
    return pack_tiles(images, maps, bucket, patch_dim, grid, pixels)
