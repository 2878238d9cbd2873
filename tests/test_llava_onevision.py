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

from tests.test_convert import flat_params, read_all
from tests.tiny_models import random_image
from vrl_jax.models import anyres
from vrl_jax.models.config import ModelConfig
from vrl_jax.models.llava_onevision import LlavaProcessor, hf_image_kwargs
from vrl_jax.models.positions import text_positions
from vrl_jax.models.processor import left_pad
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
    ids, mask = left_pad(rows)
    flat = [im for row in images for im in row]
    out = dict(input_ids=ids, attention_mask=mask, positions=text_positions(mask)[0], images=images, vision=None)
    if flat:
        out["packed"] = processor.pack(flat)
        out["vision"] = VisionInputs.from_batch(out["packed"])
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


def test_two_images_of_different_sizes_and_left_padding(checkpoint, processor, pil_images):
    """A prompt with two images (each one base tile and one newline, not tiled) next to a tiled image's
    prompt, left-padded: every image feature lands on its own placeholders."""
    d, hf = checkpoint
    model = load_hf_params(d, processor.config)
    batch = make_batch(processor, [[5, ("img", 0), 6, 7, ("img", 2), 8], [9, 10, ("img", 3), 11],
                                   [12, ("img", 1), 13, 14]], pil_images)
    assert [[im.tiled for im in row] for row in batch["images"]] == [[False, False], [True], [True]]
    assert batch["attention_mask"].min() == 0
    diff = max_diff(forward(model, batch), hf_logits(hf, batch), batch["attention_mask"])
    print(f"two images + tiled images, left padding: max |logit diff| = {diff:.2e}")
    assert diff <= TOL


def test_image_features_equal_pack_image_features(checkpoint, processor, pil_images):
    """The gathered placeholder features equal transformers' packed image features (unpadding, bilinear
    downsampling, newline columns), image by image; the downsampled images really are downsampled."""
    d, hf = checkpoint
    model = load_hf_params(d, processor.config)
    batch = make_batch(processor, [[("img", k)] for k in range(len(SIZES))], pil_images)
    weights = np.asarray(batch["vision"].feature_weight)
    assert ((weights > 0) & (weights < 1)).any()  # some placeholders blend four features
    ours = np.asarray(jax.jit(lambda v: model.image_features(v))(
        VisionInputs(*(None if x is None else jnp.asarray(x) for x in batch["vision"]))))
    kw = {k: torch.tensor(v) for k, v in batch["hf"].items()}
    with torch.no_grad():
        ref = hf.model.get_image_features(kw["pixel_values"], kw["image_sizes"],
                                          batch_num_images=kw["batch_num_images"]).pooler_output
    counts = [processor.num_tokens(row[0]) for row in batch["images"]]
    assert counts == [f.shape[0] for f in ref]
    ref = torch.cat(list(ref)).numpy()
    assert np.abs(ours[:len(ref)] - ref).max() <= 1e-5


def test_image_processing_equals_transformers(pil_images):
    """Pixel values equal LlavaOnevisionImageProcessorPil's bit for bit (tiled, and padded to a square when a
    prompt has several images); token counts equal LlavaOnevisionProcessor's `_get_number_of_features`."""
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor
    ip = hf_image_processor()
    ours = anyres.AnyResImageProcessor(tile_size=TILE, patch_size=14, grid_pinpoints=PINPOINTS, image_mean=MEAN,
                                       image_std=STD)
    counter = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)  # its tokenizer is not needed to count
    counter.image_processor, counter.num_image_tokens, counter.vision_aspect_ratio = ip, 16, "anyres_max_9"
    rs = np.random.RandomState(3)
    extra = [random_image(rs, h, w) for h, w in ((56, 56), (33, 170), (301, 300), (90, 90))]
    for img in list(pil_images) + extra:
        h, w = img.height, img.width
        for tiled in (True, False):
            ref = ip(images=[img] if tiled else [[img, img]], return_tensors="np")
            got = ours(img, tiled=tiled)
            deferred = ours.defer(img, tiled=tiled)  # the tile count from the size alone, the pixels when read
            assert deferred[1:] == got[1:] and deferred.patches.shape == got.patches.shape
            np.testing.assert_array_equal(np.asarray(deferred.patches), got.patches)
            n = got.grid_thw[0]
            ref_pixels = ref["pixel_values"][0][:n]
            assert len(ref_pixels) == n and (tiled or n == 1)
            patches = ref_pixels.reshape(n, 3, 4, 14, 4, 14).transpose(0, 2, 4, 1, 3, 5).reshape(n * 16, -1)
            np.testing.assert_array_equal(got.patches, patches)
            assert tuple(ref["image_sizes"][0]) == got.image_size == (h, w)
            index, _ = anyres.feature_map(got.image_size, tiled, TILE, 4, PINPOINTS, 9)
            expected = counter._get_number_of_features(h, w, TILE, TILE) if tiled else 16 + 1
            assert len(index) == expected, (h, w, tiled)


# ---- Conversion ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("llava_untied"))
    return d, build_hf_model(d, tie=False, seed=1)


@pytest.mark.parametrize("tie", [True, False])
def test_hf_to_vrl_jax_to_hf_is_bit_identical_and_loads_in_transformers(checkpoint, untied, processor, pil_images,
                                                                       tmp_path, tie):
    from transformers import AutoModelForImageTextToText

    from vrl_jax.models.loading import export_hf, load_model
    d, hf = checkpoint if tie else untied
    model = load_model(d)
    assert (model.language.lm_head is None) == tie
    out = str(tmp_path / "export")
    export_hf(model, out, source_dir=d)
    before, after = read_all(d), read_all(out)
    assert sorted(before) == sorted(after)
    assert any(k.endswith("lm_head.weight") for k in before) != tie
    for key in before:
        assert before[key].dtype == after[key].dtype and np.array_equal(before[key], after[key]), key
    batch = make_batch(processor, [[5, ("img", 2), 6]], pil_images)
    reloaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert type(reloaded).__name__ == "LlavaOnevisionForConditionalGeneration"
    np.testing.assert_array_equal(hf_logits(reloaded, batch), hf_logits(hf, batch))


def test_both_key_layouts_load(checkpoint, tmp_path):
    """transformers 4.x files (the released checkpoints: `vision_tower.vision_model.*`) and the 5.x in-memory
    names (`model.language_model.*`, `model.vision_tower.*`, ...) load to the same parameters."""
    import shutil

    from safetensors.numpy import save_file

    from vrl_jax.models.loading import load_model
    d, hf = checkpoint
    reference = flat_params(load_model(d))
    tensors = read_all(d)
    v4 = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in tensors.items()}
    assert any(k.startswith("vision_tower.vision_model.encoder.") for k in v4)
    in_memory = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in in_memory)
    for name, layout in (("v4", v4), ("in_memory", in_memory)):
        target = tmp_path / name
        target.mkdir()
        shutil.copy(os.path.join(d, "config.json"), target / "config.json")
        save_file(layout, str(target / "model.safetensors"))
        loaded = flat_params(load_model(str(target)))
        assert sorted(loaded) == sorted(reference)
        assert all(np.array_equal(loaded[k], reference[k]) for k in reference), name


def test_orbax_round_trip_and_check_cli(checkpoint, untied, tmp_path, capsys):
    from tests.test_convert import assert_orbax_round_trip_and_check
    from vrl_jax import convert
    d, _ = checkpoint
    printed = assert_orbax_round_trip_and_check(d, tmp_path, capsys)
    assert "one image" in printed and "two images of different sizes" in printed and "PASS" in printed
    print(printed)
    assert convert.main(["check", d, "--model", untied[0]]) == 1
    assert "FAIL" in capsys.readouterr().out


# ---- Sampling and training -------------------------------------------------------------------------

NEW, NEVER = 24, 1023  # NEVER: a stop token these tiny models do not produce (checked)
N_SAMPLES, TEMPERATURE = 2, 0.8


@pytest.fixture(scope="module")
def sampling(tmp_path_factory, pil_images):
    """An untied model with wide weights (a random tied model copies its last token forever), and a batch:
    a tiled image with downsampled features, and a left-padded prompt with two images."""
    from vrl_jax.models.processor import ModelInputs
    d = str(tmp_path_factory.mktemp("llava_wide"))
    hf = build_hf_model(d, tie=False, seed=7, wide=True)
    config = ModelConfig.from_pretrained(d)
    proc = LlavaProcessor(tokenizer=None, image_processor=LlavaProcessor.load_image_processor(d, config),
                          config=config)
    b = make_batch(proc, [[5, 6, ("img", 3), 7, 8], [9, ("img", 0), 10, ("img", 1), 11, 12, 13]], pil_images)
    assert b["attention_mask"].min() == 0
    inputs = ModelInputs(b["input_ids"], b["attention_mask"], b["positions"], b["attention_mask"].sum(1),
                         b["packed"], row_images=tuple(map(tuple, b["images"])))
    return hf, load_hf_params(d, config), proc, b, inputs


def test_greedy_is_token_identical_to_transformers_generate(sampling):
    from vrl_jax.sampling.sampler import Sampler, SamplerConfig
    hf, model, _, b, inputs = sampling
    sampler, params = Sampler.for_model(model, SamplerConfig(max_new_tokens=NEW, stop_token_ids=(NEVER,)))
    out = sampler(params, inputs, jax.random.key(0), temperature=0.0)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(b["input_ids"]).long(),
                          attention_mask=torch.tensor(b["attention_mask"]).long(),
                          **{k: torch.tensor(v) for k, v in b["hf"].items()}, max_new_tokens=NEW, do_sample=False,
                          eos_token_id=NEVER, pad_token_id=0)[:, b["input_ids"].shape[1]:].numpy()
    assert ref.shape == (2, NEW) and not np.asarray(out.stopped).any()
    assert min(len(set(r.tolist())) for r in ref) >= 4  # non-degenerate continuations
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)


def test_rollout_logprobs_and_one_train_step(sampling):
    """Sampled rows laid out for training (each prompt's images packed once per micro-batch, every sample's
    placeholders mapped onto them) give the sampler's log-probs back, and one RL step runs and updates."""
    from vrl_jax.rl import batching
    from vrl_jax.rl.logprobs import sequence_stats
    from vrl_jax.rl.losses import PolicyLossConfig
    from vrl_jax.rl.train_state import OptimizerConfig, create_train_state
    from vrl_jax.rl.train_step import StepConfig, make_train_step
    from vrl_jax.sampling.sampler import Sampler, SamplerConfig
    _, model, proc, _, inputs = sampling
    sampler, params = Sampler.for_model(model, SamplerConfig(max_new_tokens=10, num_samples=N_SAMPLES,
                                                             stop_token_ids=(NEVER,)))
    out = jax.device_get(sampler(params, inputs, jax.random.key(0), temperature=TEMPERATURE))
    seqs = batching.build_sequences(inputs, out.tokens, out.mask, out.logprobs, N_SAMPLES, pad_id=0)
    graphdef, state = nnx.split(model, nnx.Param)
    for num_micro in (1, 2):  # both prompts in one micro-batch; one prompt's two samples per micro-batch
        vision = batching.pack_micro_batches(inputs.row_images, seqs.prompt_index, num_micro, proc,
                                            proc.patch_buckets)
        assert vision.feature_index.shape[0] == num_micro and vision.feature_weight.shape == vision.feature_index.shape
        per = len(seqs.prompt_index) // num_micro
        for m in range(num_micro):  # each prompt's images are encoded once per micro-batch
            rows = slice(m * per, (m + 1) * per)
            tiles = sum(im.grid_thw[0] for p in set(seqs.prompt_index[rows]) for im in inputs.row_images[p])
            assert (vision.segment_ids[m] >= 0).sum() == tiles * proc.config.vision.tile_tokens
            stats = sequence_stats(graphdef, state.to_pure_dict(), jnp.asarray(seqs.input_ids[rows]),
                                   jnp.asarray(seqs.positions[:, rows]), jnp.asarray(seqs.attention_mask[rows]),
                                   jnp.asarray(seqs.targets[rows]), jax.tree.map(lambda x: jnp.asarray(x[m]), vision),
                                   chunk_size=256, temperature=TEMPERATURE)
            mask = seqs.loss_mask[rows] > 0
            assert np.abs(np.asarray(stats.logprobs)[mask] - seqs.old_logprobs[rows][mask]).max() < 1e-4
    # Packed per row shard (one buffer per device's two rows: [M=1, S=2, ...]): the same log-probs.
    shards = batching.pack_micro_batches(inputs.row_images, seqs.prompt_index, 1, proc, proc.patch_buckets,
                                         shards=2)
    assert shards.pixel_values.shape[:2] == (1, 2) and shards.feature_weight.shape[:2] == (1, 2)
    stats = sequence_stats(graphdef, state.to_pure_dict(), jnp.asarray(seqs.input_ids),
                           jnp.asarray(seqs.positions), jnp.asarray(seqs.attention_mask), jnp.asarray(seqs.targets),
                           jax.tree.map(lambda x: jnp.asarray(x[0]), shards), chunk_size=256, temperature=TEMPERATURE)
    mask = seqs.loss_mask > 0
    assert np.abs(np.asarray(stats.logprobs)[mask] - seqs.old_logprobs[mask]).max() < 1e-4
    batch = batching.to_train_batch(seqs, np.array([1.0, -1.0, 0.5, -0.5]), np.zeros(4), 2, vision)
    opt = OptimizerConfig(learning_rate=1e-3, total_steps=2, train_vit=True, train_connector=True)
    state, _, graphdef = create_train_state(model, opt)
    before = jax.tree.map(np.array, state.params)
    step = make_train_step(graphdef, opt, StepConfig(batch_size=4, num_micro=2, chunk_size=256,
                                                     loss=PolicyLossConfig(), temperature=TEMPERATURE))
    state, metrics = step(state, jax.tree.map(jnp.asarray, batch))
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(metrics))
    after = jax.tree.map(np.array, state.params)
    for path in (("visual", "layers", "q_w"), ("visual", "pos_embed"), ("projector", "linear1_w"),
                 ("projector", "newline"), ("language", "layers", "q_w")):
        old, new = before, after
        for key in path:
            old, new = old[key], new[key]
        assert not np.array_equal(old, new), path  # every part got a gradient, through the feature map


# ---- The tiny offline family and the processor -----------------------------------------------------


def test_tiny_family_prompts_equal_transformers_processor_and_check_passes(tmp_path, pil_images, capsys):
    """`model.tiny.family=llava_onevision` builds an HF directory whose processor (picked by model_type)
    encodes chat prompts to exactly the ids of transformers' LlavaOnevisionProcessor (a tiled image; two
    images in one prompt), and whose weights pass `convert check` against transformers. A template only
    in chat_template.json is found."""
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    from vrl_jax import convert
    from vrl_jax.models.image_processing import read_processor_config
    from vrl_jax.models.processor import VLProcessor
    from vrl_jax.models.tiny import build_tiny_model
    d = build_tiny_model(str(tmp_path / "tiny"), ["a triangle has three sides", "the answer is 42"] * 20,
                         family="llava_onevision", hidden=32, layers=1, intermediate=64, vision_width=32,
                         vision_depth=1)
    proc = VLProcessor.from_pretrained(d)
    assert isinstance(proc, LlavaProcessor) and proc.config.model_type == "llava_onevision"
    question = lambda n: [{"role": "user", "content": [{"type": "image"}] * n +  # noqa: E731
                           [{"type": "text", "text": "How many sides?"}]}]
    rows = [[pil_images[3]], [pil_images[0], pil_images[1]]]
    ours = proc.encode([question(1), question(2)], rows)
    pre = read_processor_config(d)
    ip = anyres.AnyResImageProcessor.from_dict(pre, 14)
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)
    hf_ip = LlavaOnevisionImageProcessorPil(size=pre["size"], image_grid_pinpoints=pre["image_grid_pinpoints"],
                                            image_mean=pre["image_mean"], image_std=pre["image_std"])
    # Its constructor needs torchvision (a video processor); its token expansion does not.
    hf_proc = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    hf_proc.image_processor, hf_proc.num_image_tokens, hf_proc.image_token = hf_ip, ip.grid ** 2, "<image>"
    hf_proc.vision_feature_select_strategy, hf_proc.vision_aspect_ratio = "full", "anyres_max_9"
    for i, (row, images) in enumerate(zip([question(1), question(2)], rows)):
        image_inputs = hf_ip(images=[images], return_tensors="np")
        parts = proc.render(row).split("<image>")
        text = parts[0] + "".join(hf_proc.replace_image_token(image_inputs, k) + part
                                  for k, part in enumerate(parts[1:]))
        ref = proc.tokenizer(text, add_special_tokens=False)["input_ids"]
        got = ours.input_ids[i][ours.attention_mask[i] > 0]
        np.testing.assert_array_equal(got, ref)
        assert (got == proc.config.image_token_id).sum() > 4 * len(images)
    capsys.readouterr()
    assert convert.main(["check", d]) == 0
    assert "PASS" in capsys.readouterr().out
    # Released llava-hf repos keep the template in the processor's chat_template.json: it is read from there.
    import shutil
    bare = tmp_path / "bare"
    shutil.copytree(d, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((bare / "tokenizer_config.json").read_text())
    template = tok_cfg.pop("chat_template", None) or proc.tokenizer.chat_template
    (bare / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    with pytest.raises(ValueError, match="no chat_template"):
        VLProcessor.from_pretrained(str(bare)).render(question(1))
    (bare / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert VLProcessor.from_pretrained(str(bare)).render(question(1)) == proc.render(question(1))


@pytest.mark.parametrize("change,message", [
    (dict(vision_feature_select_strategy="default"), "vision_feature_select_strategy 'default' is not supported"),
    (dict(vision_aspect_ratio="pad"), "vision_aspect_ratio must be 'anyres_max_N'"),
    (dict(vision_feature_layer=[-2, -1]), "vision_feature_layer must be one integer"),
    (dict(image_grid_pinpoints=[[56, 100]]), "image_grid_pinpoints [[56, 100]] are not positive multiples"),
])
def test_config_mistakes_name_the_field(change, message, tmp_path):
    from vrl_jax.models.config import ConfigError
    raw = {**hf_config().to_dict(), **change}
    with pytest.raises(ConfigError, match=r"^<config>: .*" + message.replace("[", r"\[").replace("]", r"\]")):
        ModelConfig.from_dict(raw)
    assert ModelConfig.from_dict(hf_config().to_dict()).vision.max_num_patches == 9


def test_hf_trainer_decay_mask_equals_hf_trainers_decay_parameters():
    """DyME's `decay_mask='hf_trainer'` on LLaVA-OneVision: SigLIP LayerNorms, biases and RMSNorms are not
    decayed, image_newline and the position embedding are, exactly as HF Trainer decides on the torch model."""
    from flax import traverse_util
    from transformers import LlavaOnevisionForConditionalGeneration, Trainer

    from vrl_jax.models.llava_onevision import LLAVA_WEIGHTS
    from vrl_jax.models.weights import abstract_model
    from vrl_jax.rl.train_state import DECAY_MASKS
    model = LlavaOnevisionForConditionalGeneration(hf_config(tie=False))
    decayed = set(Trainer.get_decay_parameter_names(None, model))  # the method does not use `self`
    want = {}
    for name, _ in model.named_parameters():
        want.setdefault(LLAVA_WEIGHTS.match(name)[0], set()).add(name in decayed)
    assert all(len(v) == 1 for v in want.values())  # every layer of a stacked parameter agrees
    want = {p: v.pop() for p, v in want.items()}
    _, abstract = abstract_model(ModelConfig.from_dict(hf_config(tie=False).to_dict()))
    got = DECAY_MASKS["hf_trainer"](list(traverse_util.flatten_dict(abstract.to_pure_dict(), sep=".")))
    assert got == want
    assert not got["visual.layers.norm1_w"] and got["projector.newline"] and got["visual.pos_embed"]
