"""Host-side image processing against transformers' Qwen2VLImageProcessorPil and vision_utils."""
import json
import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from vrl_jax.models.image_processing import (
    DeferredPatches,
    ImageProcessor,
    ProcessedImage,
    choose_bucket,
    num_image_tokens,
    pack_images,
    smart_resize,
)

MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 64


def _noise(height, width, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def _hf_process(hf_proc, image):
    out = hf_proc(images=[image], return_tensors="np")
    return out["pixel_values"], tuple(int(v) for v in out["image_grid_thw"][0])


def _assert_same_as_hf(image, hf_proc, proc):
    expected_pixels, expected_grid = _hf_process(hf_proc, image)
    got = proc(image)
    assert got.grid_thw == expected_grid
    assert got.patches.dtype == np.float32 and got.patches.shape == expected_pixels.shape
    np.testing.assert_allclose(got.patches, expected_pixels, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def processors():
    return (Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
            ImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS))


# ----------------------------------------------------------------------------------- resizing

def test_smart_resize_matches_reference_over_many_sizes():
    sizes = [1, 3, 13, 14, 27, 28, 29, 41, 42, 55, 56, 70, 90, 130, 333, 640, 1000, 2000]
    budgets = [(56 * 56, 28 * 28 * 1280), (MIN_PIXELS, MAX_PIXELS), (28 * 28 * 16, 28 * 28 * 16)]
    for min_pixels, max_pixels in budgets:
        for h in sizes:
            for w in sizes:
                if max(h, w) / min(h, w) > 200:
                    continue
                assert smart_resize(h, w, 28, min_pixels, max_pixels) == \
                    hf_smart_resize(h, w, 28, min_pixels, max_pixels), (h, w, min_pixels, max_pixels)


def test_smart_resize_hand_checked():
    assert smart_resize(90, 130, 28, MIN_PIXELS, MAX_PIXELS) == (84, 140)   # rounding only
    assert smart_resize(56, 84) == (56, 84)                                  # already on the grid
    assert smart_resize(10, 10, 28, 56 * 56, 10**6) == (56, 56)              # min clamp: ceil(10*5.6/28)*28


@pytest.mark.parametrize("height,width", [
    (90, 130),    # plain rounding -> grid 1x6x10
    (56, 84),     # already a multiple of 28: identity resize
    (20, 30),     # below min_pixels: scaled up
    (500, 700),   # above max_pixels: scaled down
    (1000, 30),   # tall and thin
    (40, 600),    # wide
])
def test_rgb_pixels_and_grid_match_reference(processors, height, width):
    hf_proc, proc = processors
    _assert_same_as_hf(PIL.Image.fromarray(_noise(height, width)), hf_proc, proc)


@pytest.mark.parametrize("height, width", [(90, 130), (28, 700), (333, 97)])
def test_deferred_processing_knows_its_grid_and_computes_once_when_read(height, width):
    """`defer`: the grid and patch shape from the image's size alone (nothing computed), then, when read,
    the patches `proc(image)` gives, computed once and counted."""
    proc = ImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    image = PIL.Image.fromarray(_noise(height, width, seed=height))
    eager, before = proc(image), DeferredPatches.computed()
    deferred = pickle.loads(pickle.dumps(proc.defer(image)))  # grain's worker processes pickle batches
    assert deferred.grid_thw == eager.grid_thw and deferred.patches.shape == eager.patches.shape
    assert DeferredPatches.computed() == before
    np.testing.assert_array_equal(np.asarray(deferred.patches), eager.patches)
    buffer = np.zeros((eager.patches.shape[0] + 4, eager.patches.shape[1]), np.float32)
    buffer[2:-2] = deferred.patches  # how pack_images reads it
    np.testing.assert_array_equal(buffer[2:-2], eager.patches)
    assert DeferredPatches.computed() == before + 1
    packed = pack_images([deferred], [1024], 112)
    np.testing.assert_array_equal(packed.pixel_values, pack_images([eager], [1024], 112).pixel_values)
    layout = pack_images([proc.defer(image)], [1024], 112, pixels=False)
    assert not layout.pixel_values.any() and DeferredPatches.computed() == before + 1
    np.testing.assert_array_equal(layout.window_ids, packed.window_ids)


def _pil_variants():
    rgb = PIL.Image.fromarray(_noise(77, 91, seed=1))
    rgba = _noise(61, 103, 4, seed=2)
    rgba[..., 3] = np.linspace(0, 255, 103).astype(np.uint8)[None, :]   # full range of partial alpha
    palette_transparent = rgb.convert("P")
    palette_transparent.info["transparency"] = palette_transparent.getpixel((0, 0))   # an index in use
    return {
        "L": rgb.convert("L"),
        "P": rgb.convert("P"),
        "P+transparency": palette_transparent,
        "RGBA": PIL.Image.fromarray(rgba, "RGBA"),
        "LA": PIL.Image.fromarray(rgba, "RGBA").convert("LA"),
        "CMYK": rgb.convert("CMYK"),
        "1": rgb.convert("1"),
    }


@pytest.mark.parametrize("mode", list(_pil_variants()))
def test_pil_modes_convert_like_reference(processors, mode):
    hf_proc, proc = processors
    _assert_same_as_hf(_pil_variants()[mode], hf_proc, proc)


@pytest.mark.parametrize("channels", [3, 4])
def test_numpy_hwc_inputs_match_reference(processors, channels):
    hf_proc, proc = processors
    array = _noise(66, 99, channels, seed=3)
    _assert_same_as_hf(array, hf_proc, proc)


def test_numpy_grayscale_equals_pil_grayscale(processors):
    _, proc = processors
    gray = _noise(50, 70, 1, seed=4)[..., 0]
    expected = proc(PIL.Image.fromarray(gray, "L"))
    for array in (gray, gray[..., None]):
        got = proc(array)
        assert got.grid_thw == expected.grid_thw
        np.testing.assert_array_equal(got.patches, expected.patches)


def test_other_patch_size_and_normalisation_match_reference():
    kwargs = dict(patch_size=16, min_pixels=32 * 32, max_pixels=32 * 32 * 64, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    _assert_same_as_hf(PIL.Image.fromarray(_noise(100, 150, seed=5)), Qwen2VLImageProcessorPil(**kwargs),
                       ImageProcessor(**kwargs))


def test_patch_rows_are_merge_block_major_and_frame_duplicated():
    # Each pixel holds its own patch index, so every row must be one patch, constant, in block-major order.
    proc = ImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56, image_mean=(0, 0, 0), image_std=(1, 1, 1),
                          rescale_factor=1.0)
    patch_index = np.arange(16, dtype=np.uint8).reshape(4, 4).repeat(14, axis=0).repeat(14, axis=1)
    out = proc(np.repeat(patch_index[..., None], 3, axis=-1))
    assert out.grid_thw == (1, 4, 4) and out.patches.shape == (16, 3 * 2 * 14 * 14)
    row_values = out.patches[:, 0]
    assert np.all(out.patches == row_values[:, None])
    np.testing.assert_array_equal(row_values, [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15])


# ---------------------------------------------------------------------------------- config

def _write_config(directory, config):
    (directory / "preprocessor_config.json").write_text(json.dumps(config))
    return directory


def test_from_pretrained_reads_what_reference_saved(tmp_path):
    hf_proc = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 32, image_mean=[0.5, 0.4, 0.3],
                                       image_std=[0.2, 0.3, 0.4])
    hf_proc.save_pretrained(tmp_path)
    proc = ImageProcessor.from_pretrained(tmp_path)
    assert proc == ImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 32, image_mean=(0.5, 0.4, 0.3),
                                  image_std=(0.2, 0.3, 0.4))
    _assert_same_as_hf(PIL.Image.fromarray(_noise(300, 200, seed=6)), hf_proc, proc)


@pytest.mark.parametrize("config", [
    {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2},
    {"size": {"shortest_edge": 1000, "longest_edge": 9000}, "min_pixels": 2000},   # top-level wins, as in HF
])
def test_from_pretrained_pixel_budget_agrees_with_reference(tmp_path, config):
    _write_config(tmp_path, config)
    hf_size = Qwen2VLImageProcessorPil.from_pretrained(tmp_path).size
    proc = ImageProcessor.from_pretrained(tmp_path)
    assert (proc.min_pixels, proc.max_pixels) == (hf_size["shortest_edge"], hf_size["longest_edge"])


def test_from_pretrained_without_config_gives_defaults(tmp_path):
    assert ImageProcessor.from_pretrained(tmp_path) == ImageProcessor()
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        ImageProcessor.from_pretrained(tmp_path / "does-not-exist")


@pytest.mark.parametrize("config,message", [
    ({"patch_size": "14"}, "patch_size"),
    ({"min_pixels": 5000, "max_pixels": 4000}, "min_pixels=5000 exceeds max_pixels=4000"),
    ({"image_mean": [0.5, 0.5]}, "image_mean must have 3 values"),
    ({"image_std": 0.5}, "image_std must be 3 numbers"),
    ({"rescale_factor": "1/255"}, "rescale_factor must be a positive number"),
    ({"resample": 2}, "resample"),
    ({"do_normalize": False}, "do_normalize"),
])
def test_bad_config_names_file_and_field(tmp_path, config, message):
    _write_config(tmp_path, config)
    with pytest.raises(ValueError, match=message) as info:
        ImageProcessor.from_pretrained(tmp_path)
    assert "preprocessor_config.json" in str(info.value)


def test_invalid_json_names_line(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text('{\n"patch_size": 14,\n}')
    with pytest.raises(ValueError, match="preprocessor_config.json: invalid JSON at line 3"):
        ImageProcessor.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------- bad images

def test_image_errors():
    proc = ImageProcessor()
    with pytest.raises(ValueError, match=r"height=10, width=2010 has aspect ratio 201\.0"):
        proc(np.zeros((10, 2010, 3), np.uint8))
    with pytest.raises(ValueError, match="zero size"):
        proc(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="zero size"):
        proc(PIL.Image.new("RGB", (0, 5)))
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 4, 3\)"):
        proc(np.zeros((2, 3, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"got shape \(3, 40, 40\)"):
        proc(np.zeros((3, 40, 40), np.uint8))   # channels-first is refused, not guessed
    with pytest.raises(ValueError, match="dtype uint8, got float32"):
        proc(np.zeros((40, 40, 3), np.float32))


# ---------------------------------------------------------------------------------- packing

def _hf_labels(cu_seqlens, n):
    """Per-row segment index from cumulative boundaries [k+1] over n rows."""
    return np.searchsorted(np.asarray(cu_seqlens), np.arange(n), side="right") - 1


def _hf_window_ids(grids, window_size, patch_size=14, merge_size=2):
    window_index, cu_window = get_vision_window_index(torch.tensor(grids), merge_size, window_size, patch_size)
    unit = merge_size**2
    # window_index permutes merge units; row r of the permuted sequence is original patch permuted[r].
    permuted = (window_index.numpy()[:, None] * unit + np.arange(unit)).reshape(-1)
    ids = np.empty(len(permuted), np.int64)
    ids[permuted] = _hf_labels(cu_window.numpy(), len(permuted))
    return ids


def _fake_images(grids, dim=8):
    rng = np.random.default_rng(7)
    return [ProcessedImage(rng.standard_normal((t * h * w, dim)).astype(np.float32), (t, h, w)) for t, h, w in grids]


GRID_SETS = [
    [(1, 6, 10)],                          # merged 3x5: partial windows for W=2
    [(1, 8, 4)],                           # merged 4x2: exact multiple of W=2
    [(1, 6, 10), (1, 8, 4), (1, 2, 2)],   # packed, mixed sizes
    [(1, 4, 6), (2, 6, 4), (1, 10, 14)],  # a two-frame entry: segments are per frame
]


@pytest.mark.parametrize("grids", GRID_SETS)
@pytest.mark.parametrize("window_size", [56, 112])
def test_packed_metadata_matches_reference(grids, window_size):
    n = sum(t * h * w for t, h, w in grids)
    batch = pack_images(_fake_images(grids), buckets=[n + 12, 4096], window_size=window_size)
    grid_tensor = torch.tensor(grids)
    assert batch.pixel_values.shape == (n + 12, 8) and batch.pixel_values.dtype == np.float32
    np.testing.assert_array_equal(batch.grid_thw, np.asarray(grids, np.int32))

    np.testing.assert_array_equal(batch.hw_pos[:n], get_vision_position_ids(grid_tensor, 2).numpy())
    np.testing.assert_array_equal(batch.segment_ids[:n], _hf_labels(get_vision_cu_seqlens(grid_tensor).numpy(), n))
    np.testing.assert_array_equal(batch.window_ids[:n], _hf_window_ids(grids, window_size))
    assert np.all(batch.window_ids[:n].reshape(-1, 4) == batch.window_ids[:n:4, None])   # merge units stay whole

    for name in ("hw_pos", "segment_ids", "window_ids", "pixel_values"):
        assert getattr(batch, name).dtype == (np.float32 if name == "pixel_values" else np.int32)
    np.testing.assert_array_equal(batch.pixel_values[:n], np.concatenate([img.patches for img in _fake_images(grids)]))
    assert np.all(batch.pixel_values[n:] == 0) and np.all(batch.hw_pos[n:] == 0)
    assert np.all(batch.segment_ids[n:] == -1) and np.all(batch.window_ids[n:] == -1)


def test_windows_hand_checked():
    # grid 1x6x10, window 56 -> merged 3x5 tokens, 2x2 tokens per window -> 2x3 windows, the last row/col partial.
    batch = pack_images(_fake_images([(1, 6, 10)]), buckets=[60], window_size=56)
    merged_window_of_token = batch.window_ids[::4].reshape(3, 5)
    np.testing.assert_array_equal(merged_window_of_token, [[0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [3, 3, 4, 4, 5]])
    np.testing.assert_array_equal(batch.hw_pos[:8], [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]])


def test_no_window_size_makes_frames_the_windows():
    batch = pack_images(_fake_images([(1, 4, 6), (2, 6, 4)]), buckets=[72], window_size=None)
    np.testing.assert_array_equal(batch.window_ids, batch.segment_ids)
    np.testing.assert_array_equal(np.bincount(batch.segment_ids), [24, 24, 24])


def test_processed_images_pack_end_to_end(processors):
    _, proc = processors
    images = [proc(PIL.Image.fromarray(_noise(90, 130))), proc(PIL.Image.fromarray(_noise(20, 30, seed=1)))]
    batch = pack_images(images, buckets=[64, 128], window_size=112)
    assert batch.pixel_values.shape == (128, 1176)
    np.testing.assert_array_equal(batch.grid_thw, [[1, 6, 10], [1, 4, 6]])
    assert list(num_image_tokens(batch.grid_thw)) == [15, 6]


def test_pack_errors():
    with pytest.raises(ValueError, match=r"84 patches fit in none of the buckets \[32, 64\]"):
        pack_images(_fake_images([(1, 6, 10), (1, 4, 6)]), buckets=[64, 32], window_size=None)
    with pytest.raises(ValueError, match="at least one image"):
        pack_images([], buckets=[64], window_size=None)
    with pytest.raises(ValueError, match="window_size=20"):
        pack_images(_fake_images([(1, 2, 2)]), buckets=[64], window_size=20)
    with pytest.raises(ValueError, match=r"image 0: grid_thw \(1, 3, 4\)"):
        pack_images(_fake_images([(1, 3, 4)]), buckets=[64], window_size=None)


def test_choose_bucket_and_token_count():
    assert choose_bucket(60, [128, 64, 1024]) == 64
    assert choose_bucket(64, [128, 64]) == 64
    assert choose_bucket(65, [128, 64]) == 128
    with pytest.raises(ValueError, match=r"2000 patches fit in none of the buckets \[64, 1024\]"):
        choose_bucket(2000, [1024, 64])
    with pytest.raises(ValueError, match="multiples of 4, got 30"):
        choose_bucket(10, [30, 64])
    assert num_image_tokens((1, 6, 10)) == 15
    np.testing.assert_array_equal(num_image_tokens([[1, 6, 10], [2, 4, 4]], merge_size=2), [15, 8])
    with pytest.raises(ValueError, match=r"shape \[3\] or \[n, 3\]"):
        num_image_tokens([1, 6])
