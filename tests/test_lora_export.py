"""The two exports of a LoRA-adapted model (`vrl_jax.models.lora_export`), against transformers and peft.

Tiny random HF checkpoints are converted to vrl_jax, given adapters with random nonzero A and B on
attention and MLP projections, and exported: the PEFT directory loaded by `peft.PeftModel.from_pretrained`
onto the transformers model, and the merged model written by `export_hf` and loaded by transformers, both
give the vrl_jax adapted forward's logits. Tolerances, float32: 1e-4 against transformers (the parity
tests' TOL; measured ~1e-6 here), 1e-5 between vrl_jax's own merged and unmerged forwards.
"""

from __future__ import annotations

import json
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from tests import test_llava_onevision as llava
from tests.test_models import TOL, forward, hf_logits, left_padded_text_batch, max_diff
from tests.tiny_models import build_hf_model, make_batch, random_image
from vrl_jax.errors import UserError
from vrl_jax.models import lora
from vrl_jax.models.image_processing import ImageProcessor
from vrl_jax.models.loading import export_hf, load_model
from vrl_jax.models.lora_export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_peft, merge_adapters, peft_modules
from vrl_jax.models.weights import weight_table

SELF_TOL = 1e-5
CONFIG = lora.LoraConfig(rank=4, alpha=8.0, targets_regex=r"^language\.layers\.(q|v|o|gate|down)_w$")
ADAPTED = ("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj")  # the HF modules CONFIG adapts


def adapted(hf_dir, seed=0):
    """The converted checkpoint with CONFIG's adapters: A as `add_adapters` draws it, B ~ N(0, 0.05^2)
    (large enough that the update moves the logits visibly)."""
    model = load_model(hf_dir)
    lora.add_adapters(model, CONFIG, jax.random.key(seed))
    rs = np.random.RandomState(seed)
    for name in lora.adapted_names(model.language.layers):
        b = getattr(model.language.layers, name + lora.B_SUFFIX)
        b.value = jnp.asarray(0.05 * rs.randn(*b.value.shape), b.value.dtype)
    return model


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """(HF directory, the adapted vrl_jax model, its PEFT export, a text batch, an image batch)."""
    d = str(tmp_path_factory.mktemp("q25"))
    build_hf_model(d, "qwen2_5_vl", tie=False, seed=5)
    model = adapted(d)
    out = str(tmp_path_factory.mktemp("q25_peft"))
    export_peft(model, out, base_model_name_or_path=d)
    rs = np.random.RandomState(0)
    image = ImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 64)(random_image(rs, 90, 130))
    batches = dict(text=left_padded_text_batch(), image=make_batch([[5, 6, ("img", 0), 7, 8]], [image], model.config))
    return d, model, out, batches


@pytest.fixture(scope="module")
def llava_ov(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("llava"))
    llava.build_hf_model(d, tie=False, seed=2)
    model = adapted(d, seed=1)
    out = str(tmp_path_factory.mktemp("llava_peft"))
    export_peft(model, out)
    return d, model, out


def ours(model, batch):
    return forward(model, batch, model.config.vision.window_size)


def peft_model(hf_dir, adapter_dir):
    """peft's model of the adapter on the transformers model, having loaded every tensor of the file into an
    adapter it made and left none of its adapters without a tensor (its missing-keys warning is an error)."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Found missing adapter keys")
        peft = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(hf_dir), adapter_dir).eval()
    theirs = {k.replace(".default.", ".") for k in peft.state_dict() if ".lora_" in k}
    assert theirs == set(load_file(os.path.join(adapter_dir, ADAPTER_WEIGHTS)))
    return peft


def lora_modules(peft):
    """The names (in the transformers model) of the modules peft put adapters on."""
    prefix = "base_model.model."
    return sorted(name[len(prefix):] for name, module in peft.named_modules() if hasattr(module, "lora_A"))


def expected_modules(layers):
    return sorted(f"model.language_model.layers.{i}.{part}.{m}" for i in range(layers) for m in ADAPTED
                  for part in (("self_attn",) if m[0] in "qkvo" else ("mlp",)))


def param_names(model):
    return sorted(".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)))


# ---- merged weights --------------------------------------------------------------------------------


def test_merged_model_equals_adapted_forward_and_leaves_the_model_alone(qwen):
    d, model, _, batches = qwen
    merged = merge_adapters(model)
    assert merged.language.lora is None and not lora.adapted_names(merged.language.layers)
    base = load_model(d)
    assert param_names(merged) == param_names(base)  # a plain model: what export_hf / save_orbax write
    assert model.language.lora == CONFIG and len(lora.adapted_names(model.language.layers)) == len(ADAPTED)
    for kind, batch in batches.items():
        want = ours(model, batch)
        assert max_diff(want, ours(base, batch), batch["attention_mask"]) > 1e-2  # the update matters
        diff = max_diff(ours(merged, batch), want, batch["attention_mask"])
        print(f"merged vs adapted, {kind}: max |logit diff| {diff:.1e}")
        assert diff <= SELF_TOL
    # the caller's model is untouched: its weights are still W (not W + A @ B)
    np.testing.assert_array_equal(np.asarray(model.language.layers.q_w.value),
                                  np.asarray(base.language.layers.q_w.value))


def test_merged_export_loads_in_transformers_with_the_adapted_logits(qwen, tmp_path):
    from transformers import AutoModelForImageTextToText
    d, model, _, batches = qwen
    out = str(tmp_path / "merged")
    export_hf(merge_adapters(model), out, source_dir=d)
    hf = AutoModelForImageTextToText.from_pretrained(out).eval()
    for kind, batch in batches.items():
        diff = max_diff(hf_logits(hf, batch), ours(model, batch), batch["attention_mask"])
        print(f"transformers on the merged export vs vrl_jax adapted, {kind}: max |logit diff| {diff:.1e}")
        assert diff <= TOL


# ---- PEFT ------------------------------------------------------------------------------------------


def test_peft_adapter_files(qwen):
    d, model, out, _ = qwen
    assert sorted(os.listdir(out)) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    config = json.loads(open(os.path.join(out, ADAPTER_CONFIG)).read())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias",
                                   "fan_in_fan_out", "use_rslora", "base_model_name_or_path")} == dict(
        peft_type="LORA", task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, bias="none",
        fan_in_fan_out=False, use_rslora=False, base_model_name_or_path=d)
    assert sorted(config["target_modules"]) == sorted(ADAPTED)
    tensors = load_file(os.path.join(out, ADAPTER_WEIGHTS))
    layers = model.language.layers
    key = "base_model.model.model.language_model.layers.1.mlp.down_proj"
    np.testing.assert_array_equal(tensors[key + ".lora_A.weight"], np.asarray(layers.down_w_lora_a.value[1]).T)
    np.testing.assert_array_equal(tensors[key + ".lora_B.weight"], np.asarray(layers.down_w_lora_b.value[1]).T)
    assert tensors[key + ".lora_A.weight"].shape == (4, 128) and tensors[key + ".lora_B.weight"].shape == (64, 4)
    assert len(tensors) == 2 * 2 * len(ADAPTED)  # A and B, 2 layers, 5 projections


def test_exclude_modules_names_only_the_models_own_same_named_modules():
    """Qwen2-VL shares Qwen2.5-VL's weight table but its tower has mlp.fc1/fc2, no mlp.down_proj: nothing to
    exclude (peft warns about an exclude_modules that excludes nothing)."""
    from tests.rl_batches import model_config
    names = tuple(lora.PATH_PREFIX + n for n in ("q_w", "gate_w", "down_w"))
    assert peft_modules(model_config("qwen2_vl"), names)[1] is None
    exclude = peft_modules(model_config("qwen2_5_vl"), names)[1]
    assert re.fullmatch(exclude, "model.visual.blocks.3.mlp.down_proj")
    assert re.fullmatch(exclude, "model.visual.blocks.0.mlp.gate_proj")
    assert not re.fullmatch(exclude, "model.language_model.layers.0.mlp.down_proj")
    assert not re.fullmatch(exclude, "model.visual.blocks.0.mlp.up_proj")


def test_peft_round_trip_qwen2_5_vl(qwen):
    """peft adapts exactly the language model's modules (not the vision tower's same-named mlp.*_proj) and
    gives the adapted logits on text and on an image."""
    d, model, out, batches = qwen
    peft = peft_model(d, out)
    assert lora_modules(peft) == expected_modules(2)
    for kind, batch in batches.items():
        diff = max_diff(hf_logits(peft, batch), ours(model, batch), batch["attention_mask"])
        print(f"peft vs vrl_jax adapted, qwen2_5_vl {kind}: max |logit diff| {diff:.1e}")
        assert diff <= TOL


def test_peft_round_trip_llava_onevision(llava_ov):
    """LLaVA-OneVision: another on-disk layout (`language_model.model.*`) and a SigLIP tower with its own
    q_proj / v_proj, which the adapter must leave alone."""
    d, model, out = llava_ov
    peft = peft_model(d, out)
    assert lora_modules(peft) == expected_modules(2)
    batch = left_padded_text_batch()
    batch["vision"] = None
    diff = max_diff(llava.hf_logits(peft, batch), llava.forward(model, batch), batch["attention_mask"])
    print(f"peft vs vrl_jax adapted, llava_onevision text: max |logit diff| {diff:.1e}")
    assert diff <= TOL


def test_llava_onevision_vision_and_projector_adapters_forward_equals_merged_weights(llava_ov):
    """LLaVA-OneVision's SigLIP tower and projector take adapters too: with a tiled image next to a
    text row, the adapted forward equals `merge_adapters`'s (float32, 1e-5), and the vision and
    projector adapters move the logits on their own."""
    from tests.test_lora_vision import randomise_adapters
    from vrl_jax.models.config import ModelConfig
    d = llava_ov[0]
    model = load_model(d)
    cfg = lora.LoraConfig(rank=4, alpha=8.0, targets_regex=r"^language\.layers\.q_w$|^visual\.layers\.(q|v|fc1|fc2)_w$|"
                                                          r"^projector\.linear(1|2)_w$")
    assert sorted(lora.add_adapters(model, cfg, jax.random.key(0))) == sorted(
        ["language.layers.q_w", "visual.layers.q_w", "visual.layers.v_w", "visual.layers.fc1_w", "visual.layers.fc2_w",
         "projector.linear1_w", "projector.linear2_w"])
    randomise_adapters(model)
    config = ModelConfig.from_pretrained(d)
    images = llava.LlavaProcessor.load_image_processor(d, config)
    processor = llava.LlavaProcessor(tokenizer=None, image_processor=images, config=config)
    batch = llava.make_batch(processor, [[5, 6, ("img", 0), 7, 8], [9, 10, 11]],
                             [random_image(np.random.RandomState(3), 150, 60)])
    got = llava.forward(model, batch)
    diff = max_diff(got, llava.forward(merge_adapters(model), batch), batch["attention_mask"])
    for part in ("visual", "projector"):  # the language model's adapters alone
        for name in lora.adapted_names(getattr(model, part) if part == "projector" else model.visual.layers):
            module = model.projector if part == "projector" else model.visual.layers
            b = getattr(module, name + lora.B_SUFFIX)
            b.value = jnp.zeros_like(b.value)
    vision_effect = max_diff(got, llava.forward(model, batch), batch["attention_mask"])
    print(f"llava_onevision: adapted vs merged {diff:.1e}; the vision/projector adapters move the logits by "
          f"{vision_effect:.1e}")
    assert diff <= 1e-5 and vision_effect > 1e-2


def test_in_memory_names_are_transformers_module_names(qwen, llava_ov):
    """The in-memory names of the vrl_jax parameters (every layer) are exactly the parameters of the model
    transformers builds (the names the PEFT keys are made of), for both families."""
    from transformers import AutoModelForImageTextToText
    for d, model in ((qwen[0], qwen[1]), (llava_ov[0], llava_ov[1])):
        theirs = set(AutoModelForImageTextToText.from_pretrained(d).state_dict())
        in_memory = weight_table(model.config).in_memory
        ours = set()
        for path, var in nnx.to_flat_state(nnx.state(merge_adapters(model), nnx.Param)):
            template = in_memory[".".join(map(str, path))]
            ours |= {template.format(i=i) for i in range(var.value.shape[0] if "{i}" in template else 1)}
        assert ours == theirs, (sorted(ours - theirs), sorted(theirs - ours))


# ---- bad input -------------------------------------------------------------------------------------


def test_a_model_without_adapters_and_a_directory_of_something_else(qwen, tmp_path):
    d, model, out, _ = qwen
    plain = load_model(d)
    for fn, args in ((merge_adapters, ()), (export_peft, (str(tmp_path / "a"),))):
        with pytest.raises(UserError, match=rf"{fn.__name__}: the model has no LoRA adapters"):
            fn(plain, *args)
    assert not (tmp_path / "a").exists()
    with pytest.raises(UserError, match=rf"{d} is not empty \(it holds config.json, .*model.safetensors\) and is "
                                        r"not a PEFT adapter directory"):
        export_peft(model, d)
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file"):
        export_peft(model, str(tmp_path / "file"))
    before = load_file(os.path.join(out, ADAPTER_WEIGHTS))
    export_peft(model, out)  # an earlier adapter export is overwritten
    after = load_file(os.path.join(out, ADAPTER_WEIGHTS))
    assert sorted(before) == sorted(after) and all(np.array_equal(before[k], after[k]) for k in before)


def test_export_peft_into_a_bucket(qwen, tmp_path, monkeypatch):
    """A gs:// out_dir gets the same files as a local one, through epath; its check sees the bucket."""
    from tests import fake_gcs
    _, model, _, _ = qwen
    monkeypatch.chdir(tmp_path)  # a stray local write of "gs://..." would land here
    export_peft(model, "local")
    fs = fake_gcs.install()
    try:
        export_peft(model, "gs://bucket/adapter")
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            assert fs.cat_file(f"gs://bucket/adapter/{name}") == (tmp_path / "local" / name).read_bytes()
        fs.pipe_file("gs://bucket/run/notes.txt", b"x")
        with pytest.raises(UserError, match=r"gs://bucket/run is not empty \(it holds notes.txt\)"):
            export_peft(model, "gs://bucket/run")
    finally:
        fake_gcs.uninstall()
    assert not (tmp_path / "gs:").exists()
