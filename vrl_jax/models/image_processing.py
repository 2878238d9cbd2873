"""Host-side image preprocessing for Qwen2-VL / Qwen2.5-VL (NumPy + PIL, never traced).

Reproduces transformers' ``Qwen2VLImageProcessorPil`` (resize to a multiple of ``patch*merge``
within a pixel budget, BICUBIC, rescale, normalise, patchify in merge-block-major order) and packs
the patches of all images of a batch into one static-size buffer with the per-patch metadata the
vision encoder needs: 2-D rotary positions, per-frame attention segments and Qwen2.5-VL windows.

The processors' `defer` gives an image whose patch grid is known from its size while its pixels
(resize, normalise, patchify: most of the host's cost per image) are computed the first time they are
read (`DeferredPatches`): on several hosts each one computes only its own devices' images.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import PIL.Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200
CONFIG_NAME = "preprocessor_config.json"
PADDING_ID = -1


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, area in [min_pixels, max_pixels], aspect kept."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image has zero size: height={height}, width={width}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"image of height={height}, width={width} has aspect ratio {ratio:.1f}; "
                         f"expected at most {MAX_ASPECT_RATIO}")
    # Python's round (half to even) on purpose: that is what the reference processor does.
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def read_processor_config(directory: str | os.PathLike):
    """``directory/preprocessor_config.json`` as a dict, or None when there is none."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e


def to_rgb_array(image: PIL.Image.Image | np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3] from a PIL image of any mode or a uint8 array [H, W] / [H, W, 1|3|4].

    Transparency is composited onto white, as transformers' ``convert_to_rgb`` does.
    """
    if isinstance(image, PIL.Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(PIL.Image.alpha_composite(white, rgba).convert("RGB"))
        return np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a PIL.Image.Image or a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"numpy image must have dtype uint8, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"numpy image must be [H, W] or channels-last [H, W, C] with C in (1, 3, 4), "
                         f"got shape {image.shape}")
    channels = image.shape[-1]
    if channels == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 4:
        alpha = image[..., 3:4] / 255.0
        return np.round(alpha * image[..., :3] + (1 - alpha) * 255.0).astype(np.uint8)
    return image


def patchify(image: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int) -> np.ndarray:
    """Still image float [H, W, C] -> patch rows [H*W/P², C*T*P*P] in merge-block-major order.

    Row order is (block row, block col, row in block, col in block) so that the merger can group
    ``merge_size²`` consecutive rows; each row is laid out (C, T, P, P), the frame repeated T times.
    """
    height, width, channels = image.shape
    blocks_h, blocks_w = height // (patch_size * merge_size), width // (patch_size * merge_size)
    grid = image.reshape(blocks_h, merge_size, patch_size, blocks_w, merge_size, patch_size, channels)
    grid = grid.transpose(0, 3, 1, 4, 6, 2, 5)  # (bh, bw, mh, mw, C, ph, pw)
    grid = np.broadcast_to(grid[:, :, :, :, :, None], grid.shape[:5] + (temporal_patch_size,) + grid.shape[5:])
    n_patches = blocks_h * blocks_w * merge_size**2
    return grid.reshape(n_patches, channels * temporal_patch_size * patch_size * patch_size)


def image_hw(image: PIL.Image.Image | np.ndarray) -> tuple[int, int]:
    """(height, width) of a PIL image or a channels-last array, without converting it."""
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray) and image.ndim in (2, 3):
        return int(image.shape[0]), int(image.shape[1])
    raise TypeError(f"image must be a PIL.Image.Image or a [H, W(, C)] numpy array, got "
                    f"{type(image).__name__}{'' if not hasattr(image, 'shape') else f' of shape {image.shape}'}")


class DeferredPatches:
    """An image's patch rows float32 `shape`, computed by `make()` the first time they are read (`np.asarray`,
    an assignment into a buffer, `np.concatenate`) and kept. The shape is known before, from the image's size,
    so tokens, positions and buffer layouts are built on every host while only the hosts whose devices hold
    the image pay for its pixels. `computed()` counts the images computed in this process."""

    __slots__ = ("shape", "_make", "_value", "_lock")
    dtype = np.dtype(np.float32)
    ndim = 2
    _count = 0
    _count_lock = threading.Lock()

    def __init__(self, shape: tuple[int, int], make: Callable[[], np.ndarray]):
        self.shape, self._make, self._value, self._lock = tuple(shape), make, None, threading.Lock()

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        with self._lock:  # grain's reader threads and the loop may both read a batch's images
            if self._value is None:
                value = np.ascontiguousarray(self._make(), np.float32)
                if value.shape != self.shape:
                    raise ValueError(f"an image's patches came out {value.shape}, its grid promised {self.shape}")
                self._value, self._make = value, None  # drop the source image
                with DeferredPatches._count_lock:
                    DeferredPatches._count += 1
        value = self._value if dtype is None else self._value.astype(dtype, copy=False)
        return value.copy() if copy and value is self._value else value  # numpy's copy=True: not the cached one

    def __getitem__(self, index):
        return np.asarray(self)[index]

    def __len__(self) -> int:
        return self.shape[0]

    def reshape(self, *shape):
        return np.asarray(self).reshape(*shape)

    def __getstate__(self):  # grain's worker processes pickle batches
        return {"shape": self.shape, "make": self._make, "value": self._value}

    def __setstate__(self, state):
        self.shape, self._make, self._value = state["shape"], state["make"], state["value"]
        self._lock = threading.Lock()

    @staticmethod
    def computed() -> int:
        return DeferredPatches._count


class ProcessedImage(NamedTuple):
    """One image as encoder input: ``patches`` float32 [t*h*w, 3*T*P*P] (an array, or `DeferredPatches`),
    ``grid_thw`` (t, h, w) in patches."""
    patches: np.ndarray | DeferredPatches
    grid_thw: tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """Qwen2-VL style image processor; ``proc(image) -> ProcessedImage``."""
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255

    def __post_init__(self):
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ImageProcessor.{name} must be a positive int, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"ImageProcessor.min_pixels={self.min_pixels} exceeds max_pixels={self.max_pixels}")
        for name in ("image_mean", "image_std"):
            raw = getattr(self, name)
            try:
                value = tuple(float(v) for v in raw)
            except (TypeError, ValueError):
                raise ValueError(f"ImageProcessor.{name} must be 3 numbers (RGB), got {raw!r}") from None
            if len(value) != 3:
                raise ValueError(f"ImageProcessor.{name} must have 3 values (RGB), got {value}")
            object.__setattr__(self, name, value)  # lists from JSON become hashable tuples
        if isinstance(self.rescale_factor, bool) or not isinstance(self.rescale_factor, (int, float)) \
                or self.rescale_factor <= 0:
            raise ValueError(f"ImageProcessor.rescale_factor must be a positive number, got {self.rescale_factor!r}")
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"ImageProcessor.image_std must be non-zero, got {self.image_std}")

    @property
    def max_patches(self) -> int:
        """The most patches one image frame can have (`VisionTower.max_segment`): max_pixels / patch^2."""
        return self.max_pixels // self.patch_size ** 2

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> ImageProcessor:
        """From a ``preprocessor_config.json`` dict; top-level ``min_pixels``/``max_pixels`` override ``size``."""
        if not isinstance(config, Mapping):
            raise ValueError(f"expected a JSON object of processor fields, got {type(config).__name__}")
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if config.get(flag, True) is not True:
                raise ValueError(f"field {flag!r}: only true is supported, got {config[flag]!r}")
        if config.get("resample", PIL.Image.Resampling.BICUBIC) != PIL.Image.Resampling.BICUBIC:
            raise ValueError(f"field 'resample': only 3 (BICUBIC) is supported, got {config['resample']!r}")
        size = config.get("size") or {}
        if not isinstance(size, Mapping):
            raise ValueError(f"field 'size' must be an object, got {size!r}")
        kwargs = {}
        for field, size_keys in (("min_pixels", ("shortest_edge", "min_pixels")),
                                 ("max_pixels", ("longest_edge", "max_pixels"))):
            candidates = [config.get(field)] + [size.get(k) for k in size_keys]
            value = next((v for v in candidates if v is not None), None)
            if value is not None:
                kwargs[field] = value
        for field in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std",
                      "rescale_factor"):
            if config.get(field) is not None:
                kwargs[field] = config[field]
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ImageProcessor:
        """Reads ``directory/preprocessor_config.json``; class defaults when the directory has none."""
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
        path = os.path.join(directory, CONFIG_NAME)
        config = read_processor_config(directory)
        if config is None:
            return cls()
        try:
            return cls.from_dict(config)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from e

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """Resized (height, width) in pixels for an input of that size."""
        return smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)

    def defer(self, image: PIL.Image.Image | np.ndarray) -> ProcessedImage:
        """`self(image)` with its patches computed when first read (`DeferredPatches`); the grid now."""
        height, width = self.target_size(*image_hw(image))
        grid = (1, height // self.patch_size, width // self.patch_size)
        dim = 3 * self.temporal_patch_size * self.patch_size ** 2
        return ProcessedImage(DeferredPatches((grid[1] * grid[2], dim), functools.partial(patches_of, self, image)),
                              grid)

    def __call__(self, image: PIL.Image.Image | np.ndarray) -> ProcessedImage:
        rgb = to_rgb_array(image)
        height, width = self.target_size(*rgb.shape[:2])
        resized = np.asarray(PIL.Image.fromarray(rgb).resize((width, height), PIL.Image.Resampling.BICUBIC))
        # float64 rescale then float32 normalise: the reference's order, kept for bit-equal output.
        scaled = (resized.astype(np.float64) * self.rescale_factor).astype(np.float32)
        normed = (scaled - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        patches = patchify(normed, self.patch_size, self.merge_size, self.temporal_patch_size)
        grid = (1, height // self.patch_size, width // self.patch_size)
        return ProcessedImage(np.ascontiguousarray(patches, dtype=np.float32), grid)


def patches_of(processor, image, *args) -> np.ndarray:
    """`processor(image, *args).patches`: a deferred image's computation (picklable, for grain's workers)."""
    return processor(image, *args).patches


class VisionBatch(NamedTuple):
    """All images of a batch packed into one patch buffer of static size P (a bucket).

    pixel_values f32 [P, 3*T*P*P]; hw_pos int32 [P, 2] (row, col of the patch in its image);
    segment_ids int32 [P] (one per (image, frame)); window_ids int32 [P] (one per (image, frame,
    window)); grid_thw int32 [n_images, 3]. Padding rows: zero pixels, hw_pos 0, ids -1.
    """
    pixel_values: np.ndarray
    hw_pos: np.ndarray
    segment_ids: np.ndarray
    window_ids: np.ndarray
    grid_thw: np.ndarray


def num_image_tokens(grid_thw: Sequence[int] | np.ndarray, merge_size: int = 2) -> int | np.ndarray:
    """LM placeholder tokens: ``t*h*w // merge²`` for grid_thw [3] (int) or [n, 3] (int array [n])."""
    grid = np.asarray(grid_thw, dtype=np.int64)
    if grid.shape[-1:] != (3,) or grid.ndim > 2:
        raise ValueError(f"grid_thw must have shape [3] or [n, 3], got {grid.shape}")
    tokens = grid.prod(axis=-1) // merge_size**2
    return int(tokens) if grid.ndim == 1 else tokens


def choose_bucket(n_patches: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n_patches; buckets must be positive multiples of 4 (a merge unit)."""
    for bucket in buckets:
        if isinstance(bucket, bool) or not isinstance(bucket, (int, np.integer)) or bucket <= 0 or bucket % 4:
            raise ValueError(f"bucket sizes must be positive multiples of 4, got {bucket!r} in {list(buckets)}")
    fitting = [b for b in buckets if b >= n_patches]
    if not fitting:
        raise ValueError(f"{n_patches} patches fit in none of the buckets {sorted(buckets)}; "
                         f"add a larger bucket or lower max_pixels")
    return int(min(fitting))


def patch_positions(grid_thw: Sequence[int], merge_size: int) -> np.ndarray:
    """(row, col) of each patch, int32 [t*h*w, 2], in merge-block-major order, repeated per frame."""
    t, h, w = grid_thw
    bh, bw, mh, mw = np.indices((h // merge_size, w // merge_size, merge_size, merge_size))
    rows, cols = (bh * merge_size + mh).reshape(-1), (bw * merge_size + mw).reshape(-1)
    return np.tile(np.stack([rows, cols], axis=-1), (t, 1)).astype(np.int32)


def patch_windows(grid_thw: Sequence[int], merge_size: int, merged_window: int) -> tuple[np.ndarray, int]:
    """Local window id int32 [t*h*w] (frame-major, windows row-major) and the number of windows.

    A window covers ``merged_window²`` merged tokens; the last row/column of windows may be partial.
    """
    t, h, w = grid_thw
    windows_h = -(-(h // merge_size) // merged_window)
    windows_w = -(-(w // merge_size) // merged_window)
    pos = patch_positions((1, h, w), merge_size) // merge_size // merged_window
    in_frame = pos[:, 0] * windows_w + pos[:, 1]
    per_frame = windows_h * windows_w
    ids = (np.arange(t)[:, None] * per_frame + in_frame[None, :]).reshape(-1)
    return ids.astype(np.int32), t * per_frame


def pack_images(images: Sequence[ProcessedImage], buckets: Sequence[int], window_size: int | None, *,
                patch_size: int = 14, merge_size: int = 2, pixels: bool = True) -> VisionBatch:
    """Pack images into the smallest bucket that fits; see ``VisionBatch`` for the layout.

    ``pixels=False`` lays out everything but the pixels (left zero, deferred images not computed): the
    buffer of rows another host's devices hold, whose shape and metadata this host still needs.

    ``window_size`` (pixels, Qwen2.5-VL ``vision_config.window_size``) gives windows of
    ``window_size // merge_size // patch_size`` merged tokens a side; ``None`` (Qwen2-VL, no window
    attention) makes every frame one window, i.e. ``window_ids == segment_ids``.
    """
    if not images:
        raise ValueError("pack_images needs at least one image; use no VisionBatch for text-only batches")
    merged_window = None
    if window_size is not None:
        merged_window = window_size // merge_size // patch_size
        if merged_window <= 0:
            raise ValueError(f"window_size={window_size} is smaller than one merged token "
                             f"(merge_size*patch_size={merge_size * patch_size})")
    dims = {img.patches.shape[-1] for img in images}
    if len(dims) != 1:
        raise ValueError(f"images have different patch row sizes {sorted(dims)}")
    for i, img in enumerate(images):
        t, h, w = img.grid_thw
        if h % merge_size or w % merge_size or img.patches.shape[0] != t * h * w:
            raise ValueError(f"image {i}: grid_thw {tuple(img.grid_thw)} with {img.patches.shape[0]} patch rows "
                             f"is not a t*h*w grid with h, w multiples of merge_size={merge_size}")
    n_patches = sum(img.patches.shape[0] for img in images)
    bucket = choose_bucket(n_patches, buckets)

    pixel_values = np.zeros((bucket, dims.pop()), np.float32)
    hw_pos = np.zeros((bucket, 2), np.int32)
    segment_ids = np.full(bucket, PADDING_ID, np.int32)
    window_ids = np.full(bucket, PADDING_ID, np.int32)
    start = n_segments = n_windows = 0
    for img in images:
        t, h, w = img.grid_thw
        rows = slice(start, start + t * h * w)
        if pixels:
            pixel_values[rows] = img.patches
        hw_pos[rows] = patch_positions(img.grid_thw, merge_size)
        segment_ids[rows] = n_segments + np.repeat(np.arange(t, dtype=np.int32), h * w)
        if merged_window is None:
            window_ids[rows] = segment_ids[rows]
        else:
            local, count = patch_windows(img.grid_thw, merge_size, merged_window)
            window_ids[rows] = n_windows + local
            n_windows += count
        n_segments += t
        start += t * h * w
    grid_thw = np.asarray([img.grid_thw for img in images], dtype=np.int32).reshape(-1, 3)
    return VisionBatch(pixel_values, hw_pos, segment_ids, window_ids, grid_thw)
