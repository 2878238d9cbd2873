"""LoRA adapters on the vision tower and the connector (`model.lora.targets` over their parameter paths).

The reference for the adapted forward is the base model with merged weights W + A @ B * alpha / r (computed
here in NumPy, float64), on random tiny Qwen2.5-VL and Qwen3-VL models with an image; the PEFT round trip runs
peft 0.21.2 on a transformers Qwen2.5-VL with an image. Tolerances, float32: 1e-5 between vrl_jax's own merged
and unmerged forwards, 1e-4 (the parity tests' TOL) against transformers and peft.
"""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from jax.sharding import PartitionSpec as P

from tests.rl_batches import make_model, make_rollouts, model_config, train_batch
from tests.test_models import TOL, forward, max_diff
from tests.tiny_models import make_batch, random_image
from vrl_jax import configs, sharding as shd
from vrl_jax.errors import UserError
from vrl_jax.models import lora
from vrl_jax.models.config import ModelConfig
from vrl_jax.models.image_processing import ImageProcessor
from vrl_jax.models.lora_export import merge_adapters

SELF_TOL = 1e-5
# Per family: the targets (a language projection, vision blocks, the connector) and the paths they choose.
CASES = {
    "qwen2_5_vl": (r"^language\.layers\.q_w$|^visual\.blocks\.(qkv|proj|gate|down)_w$|^visual\.merger_fc(1|2)_w$",
                   ("language.layers.q_w", "visual.blocks.qkv_w", "visual.blocks.proj_w", "visual.blocks.gate_w",
                    "visual.blocks.down_w", "visual.merger_fc1_w", "visual.merger_fc2_w")),
    "qwen3_vl": (r"^language\.layers\.q_w$|^visual\.blocks\.(qkv|fc2)_w$|^visual\.(deepstack_fc1|deepstack_fc2|"
                 r"merger_fc1)_w$",
                 ("language.layers.q_w", "visual.blocks.qkv_w", "visual.blocks.fc2_w", "visual.merger_fc1_w",
                  "visual.deepstack_fc1_w", "visual.deepstack_fc2_w")),
}


def family_config(family: str) -> ModelConfig:
    if family == "qwen3_vl":
        from tests.test_qwen3_vl import hf_config
        return ModelConfig.from_dict(hf_config(False).to_dict())
    return model_config(family)


def image_batch(config: ModelConfig) -> dict:
    """Two left-padded rows, one with an image (the family's patch size)."""
    from tests.test_qwen3_vl import PROC
    proc = PROC if config.model_type == "qwen3_vl" else ImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    image = proc(random_image(np.random.RandomState(0), 90, 130))
    return make_batch([[5, 6, ("img", 0), 7, 8], [9, 10, 11]], [image], config)


def vision_inputs(batch: dict, config: ModelConfig):
    from vrl_jax.models.image_processing import pack_images
    from vrl_jax.models.qwen_vl import VisionInputs
    vb = pack_images(batch["images"], [256], config.vision.window_size)
    return VisionInputs(*(jnp.asarray(x) for x in (vb.pixel_values, vb.hw_pos, vb.segment_ids, vb.window_ids)))


def text_inputs(batch: dict):
    return tuple(jnp.asarray(batch[k]) for k in ("input_ids", "positions", "attention_mask"))


def logits(model, batch, lora_scale=1.0):
    """The forward with an image, [B, T, V]; lora_scale traced (a runtime value, as the reference's would be)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, ids, pos, mask, v, scale: nnx.merge(graphdef, s)(ids, pos, mask, v, lora_scale=scale))
    return np.asarray(fn(state, *text_inputs(batch), vision_inputs(batch, model.config), jnp.float32(lora_scale)))


def randomise_adapters(model, seed=0):
    """Nonzero A and B on every adapted weight (B large enough that each update moves the logits visibly)."""
    rs = np.random.RandomState(seed)
    for path in lora.adapted_paths(model):
        module, name = lora.parent(model, path)
        for suffix, std in ((lora.A_SUFFIX, 0.3), (lora.B_SUFFIX, 0.1)):
            p = getattr(module, name + suffix)
            p.value = jnp.asarray(std * rs.randn(*p.value.shape), p.value.dtype)


def merged_by_hand(config, adapted, paths, scaling):
    """A plain model whose weights at `paths` are W + A @ B * scaling, from `adapted`'s adapters (NumPy float64)."""
    model = make_model(config)
    for path in paths:
        module, name = lora.parent(adapted, path)
        a, b = (np.asarray(getattr(module, name + s).value, np.float64) for s in (lora.A_SUFFIX, lora.B_SUFFIX))
        w = getattr(lora.parent(model, path)[0], name)
        w.value = jnp.asarray(np.asarray(w.value, np.float64) + np.einsum("...ir,...ro->...io", a, b) * scaling,
                              jnp.float32)
    return model


@pytest.mark.parametrize("family", list(CASES))
def test_vision_and_connector_adapters_forward_equals_merged_weights(family):
    """With an image: zero B gives the base model bit for bit; random adapters give the logits of the merged
    weights (by hand, and `merge_adapters`); the vision tower's and connector's adapters matter on their own;
    lora_scale 0 switches them off with the language model's."""
    config = family_config(family)
    regex, paths = CASES[family]
    batch = image_batch(config)
    base = logits(make_model(config), batch)
    model = make_model(config)
    cfg = lora.LoraConfig(rank=4, alpha=8.0, targets_regex=regex)
    assert sorted(lora.add_adapters(model, cfg, jax.random.key(0))) == sorted(paths)
    assert model.language.lora == model.visual.lora == cfg
    c4 = config.vision.width * config.vision.merge_size ** 2
    assert model.visual.merger_fc1_w_lora_a.value.shape == (c4, 4)  # a single matrix: single adapters
    assert model.visual.merger_fc1_w_lora_b.value.shape == (4, c4)
    assert model.visual.blocks.qkv_w_lora_a.value.shape == (config.vision.depth, config.vision.width, 4)
    np.testing.assert_array_equal(logits(model, batch), base)  # max diff 0.0

    randomise_adapters(model)
    got = logits(model, batch)
    want = logits(merged_by_hand(config, model, paths, cfg.scaling), batch)
    language_only = logits(merged_by_hand(config, model, paths[:1], cfg.scaling), batch)
    mask = batch["attention_mask"]
    vision_effect = max_diff(want, language_only, mask)
    diff = max_diff(got, want, mask)
    merged_diff = max_diff(logits(merge_adapters(model), batch), got, mask)
    print(f"{family}: adapted vs merged by hand {diff:.1e}, vs merge_adapters {merged_diff:.1e}; "
          f"the vision/connector adapters move the logits by {vision_effect:.1e}")
    assert vision_effect > 1e-2 and diff <= SELF_TOL and merged_diff <= SELF_TOL
    np.testing.assert_array_equal(logits(model, batch, lora_scale=0.0), base)


def test_vision_adapter_dropout_draws_per_key_in_training_forwards_only():
    """A training forward's key drops the vision tower's and connector's adapter inputs too (the same key the
    same masks, another key others); without a key (sampling, log-probs) there is no dropout."""
    config = model_config("qwen2_5_vl")
    batch = image_batch(config)
    model = make_model(config)
    lora.add_adapters(model, lora.LoraConfig(4, 8.0, r"^visual\.(blocks\.qkv_w|merger_fc1_w)$", dropout=0.5),
                      jax.random.key(0))
    assert model.language.lora is None and model.visual.lora.dropout == 0.5
    randomise_adapters(model)
    graphdef, state = nnx.split(model)
    args, vision = text_inputs(batch), vision_inputs(batch, config)
    hidden = jax.jit(lambda s, key: nnx.merge(graphdef, s).hidden_states(*args, vision, lora_dropout=key)[0])
    plain = np.asarray(jax.jit(lambda s: nnx.merge(graphdef, s).hidden_states(*args, vision)[0])(state))
    h1, h1_again, h2 = (np.asarray(hidden(state, jax.random.key(k))) for k in (1, 1, 2))
    np.testing.assert_array_equal(h1, h1_again)
    assert np.abs(h1 - plain).max() > 1e-3 and np.abs(h1 - h2).max() > 1e-3


TRAIN_TARGETS = r"^language\.layers\.(q|v)_w$|^visual\.blocks\.(qkv|down)_w$|^visual\.merger_fc2_w$"


def test_a_step_trains_exactly_the_adapters_of_the_adapted_parts():
    """Adapters on the language model, the vision tower and the connector, all three flags on: the gradient and
    the Adam moments hold exactly the adapters, each adapter moves (the images' forward reaches the tower's and
    the connector's), and every other weight of the three parts stays bit for bit."""
    from vrl_jax.rl.train_state import OptimizerConfig, create_train_state
    from vrl_jax.rl.train_step import StepConfig, batch_gradients, make_train_step

    config = model_config("qwen2_5_vl")
    model = make_model(config)
    adapted = lora.add_adapters(model, lora.LoraConfig(4, 8.0, TRAIN_TARGETS), jax.random.key(0))
    randomise_adapters(model)
    opt = OptimizerConfig(learning_rate=1e-2, train_vit=True, train_connector=True, clip_grad_norm=None)
    state, _, graphdef = create_train_state(model, opt)
    batch = train_batch(make_rollouts(config, 4, seed=2), config, num_micro=2)
    cfg = StepConfig(batch_size=4, num_micro=2, with_entropy=False)
    adapters = {p + s for p in adapted for s in (lora.A_SUFFIX, lora.B_SUFFIX)}
    grads = traverse_util.flatten_dict(batch_gradients(state.params, batch, graphdef=graphdef, opt_cfg=opt,
                                                       cfg=cfg)[0], sep=".")
    assert set(grads) == adapters
    assert all(float(jnp.abs(g).max()) > 0 for g in grads.values()), [k for k, g in grads.items() if not g.any()]

    before = traverse_util.flatten_dict(jax.tree.map(np.asarray, state.params), sep=".")  # the step donates them
    new, _ = make_train_step(graphdef, opt, cfg)(state, batch)
    after = traverse_util.flatten_dict(jax.tree.map(np.asarray, new.params), sep=".")
    moved = {p for p in before if not np.array_equal(before[p], after[p])}
    assert moved == adapters, (sorted(moved - adapters), sorted(adapters - moved))
    assert set(new.opt_state[0].mu) == adapters  # Adam's first moment: a flat dict over the trained parameters


def test_trainable_mask_freezes_only_the_parts_that_carry_adapters():
    """Adapters on the vision tower alone: its other weights freeze, while the connector and the language
    model (no adapters) train whole by their flags; with the tower's flag off its adapters do not train."""
    from vrl_jax.rl.train_state import OptimizerConfig, trainable_mask

    config = model_config("qwen2_5_vl")
    model = make_model(config)
    lora.add_adapters(model, lora.LoraConfig(4, 8.0, r"^visual\.blocks\.qkv_w$"), jax.random.key(0))
    params = nnx.state(model, nnx.Param).to_pure_dict()
    on = traverse_util.flatten_dict(trainable_mask(params, OptimizerConfig(train_vit=True, train_connector=True)),
                                    sep=".")
    want = {p: lora.is_adapter(p) or p.startswith(("visual.merger", "language.")) for p in on}
    assert on == want
    off = traverse_util.flatten_dict(trainable_mask(params, OptimizerConfig(train_vit=False)), sep=".")
    assert {p for p, t in off.items() if t} == {p for p in off if p.startswith("language.")}


def test_vision_and_connector_adapters_split_like_their_weight():
    """A splits its weight's input dimension and B its output dimension, over the weight's axis and fsdp,
    the rank whole (as the decoder's adapters)."""
    mesh = shd.make_mesh((2, 2, 2))
    spec = lambda path, shape: shd.param_spec(path, shape, mesh)  # noqa: E731
    assert spec("visual.blocks.qkv_w_lora_a", (4, 32, 4)) == P(None, "fsdp", None)
    assert spec("visual.blocks.qkv_w_lora_b", (4, 4, 96)) == P(None, None, ("fsdp", "tensor"))
    assert spec("visual.blocks.down_w_lora_a", (4, 64, 4)) == P(None, ("fsdp", "tensor"), None)
    assert spec("visual.blocks.down_w_lora_b", (4, 4, 32)) == P(None, None, "fsdp")
    assert spec("visual.merger_fc1_w_lora_a", (128, 4)) == P("fsdp", None)
    assert spec("visual.merger_fc2_w_lora_a", (128, 4)) == P(("fsdp", "tensor"), None)
    assert spec("projector.linear1_w_lora_b", (4, 64)) == P(None, ("fsdp", "tensor"))
    assert spec("visual.deepstack_fc2_w_lora_b", (2, 4, 64)) == P(None, None, "fsdp")
    assert spec("visual.layers.o_w_lora_a", (2, 32, 4)) == P(None, ("fsdp", "tensor"), None)


# ---- config ----------------------------------------------------------------------------------------------


def lora_run_config(targets: str, **optim):
    c = configs.base_config()
    c.eval.splits = ("val",)  # synthgeo's
    c.model.lora.rank, c.model.lora.targets = 4, targets
    for key, value in optim.items():
        c.optim[key] = value
    return c


@pytest.mark.parametrize("targets,optim,message", [
    (r"^visual\.nothing$", {}, r"config\.model\.lora\.targets: '\^visual\\\\\.nothing\$' matches none of the "
                               r"adaptable projections language\.layers\.q_w"),
    (r"\.(q|k|v|o|gate|up|down)_w$", {}, r"config\.model\.lora\.targets: .* puts adapters on visual\.blocks\.gate_w "
                                         r"\(the vision tower\), which would not train with optim\.train_vit=False"),
    (r"^language\.layers\.q_w$|^visual\.merger_fc1_w$", {"train_vit": True},
     r"puts adapters on visual\.merger_fc1_w \(the connector\), which would not train with "
     r"optim\.train_connector=False"),
    (r"^language\.layers\.q_w$", {"train_llm": False, "train_vit": True},
     r"puts adapters on language\.layers\.q_w \(the language model\), which would not train with "
     r"optim\.train_llm=False"),
])
def test_targets_that_match_nothing_or_a_part_that_does_not_train_are_config_errors(targets, optim, message):
    with pytest.raises(configs.ConfigValidationError, match=message):
        configs.validate(lora_run_config(targets, **optim))


def test_targets_over_every_part_with_their_flags_on_validate_and_a_family_without_them_is_a_user_error():
    configs.validate(lora_run_config(r"^language\.layers\.q_w$|^visual\.(blocks\.qkv_w|merger_fc1_w|layers\.q_w)$|"
                                     r"^projector\.linear1_w$", train_vit=True, train_connector=True))
    configs.validate(lora_run_config(r"^visual\.blocks\.qkv_w$", train_vit=True))  # the vision tower's alone
    quantized = lora_run_config(r"^visual\.blocks\.qkv_w$", train_vit=True)
    quantized.model.lora.quantize = "nf4"  # QLoRA freezes the language model, which would train whole here
    with pytest.raises(configs.ConfigValidationError, match=r"config\.model\.lora\.quantize: 'nf4' stores the "
                                                            r"language model's weights frozen"):
        configs.validate(quantized)
    model = make_model(model_config("qwen2_5_vl"))  # SigLIP's paths: not in a Qwen-VL model
    with pytest.raises(UserError, match=r"matches none of the model's projections language\.layers\.q_w, .*"
                                        r"visual\.blocks\.qkv_w, .*visual\.merger_fc2_w"):
        lora.add_adapters(model, lora.LoraConfig(4, 8.0, r"^visual\.layers\.q_w$"), jax.random.key(0))


# ---- exports against transformers and peft ----------------------------------------------------------------

PEFT_TARGETS = r"^language\.layers\.(q|v)_w$|^visual\.blocks\.(qkv|proj|down)_w$|^visual\.merger_fc(1|2)_w$"


def test_peft_round_trip_and_merged_export_with_vision_and_connector_adapters(tmp_path):
    """Qwen2.5-VL with adapters on the language model, the vision tower (attention and MLP) and the merger:
    peft 0.21.2 adapts exactly those modules (not the language model's mlp.down_proj nor the patch embedding's
    proj, which share their names) and gives the adapted logits with an image; so does transformers on the
    merged export."""
    from transformers import AutoModelForImageTextToText

    from tests.test_lora_export import lora_modules, peft_model
    from tests.test_models import hf_logits
    from tests.tiny_models import build_hf_model
    from vrl_jax.models.loading import export_hf, load_model
    from vrl_jax.models.lora_export import ADAPTER_CONFIG, export_peft

    d, out, merged_dir = (str(tmp_path / n) for n in ("hf", "adapter", "merged"))
    build_hf_model(d, "qwen2_5_vl", tie=False, seed=5)
    model = load_model(d)
    lora.add_adapters(model, lora.LoraConfig(4, 8.0, PEFT_TARGETS), jax.random.key(0))
    rs = np.random.RandomState(0)
    for path in lora.adapted_paths(model):  # A as drawn, B random
        b = getattr(*lora.parent(model, path + lora.B_SUFFIX))
        b.value = jnp.asarray(0.05 * rs.randn(*b.value.shape), b.value.dtype)
    export_peft(model, out, base_model_name_or_path=d)
    export_hf(merge_adapters(model), merged_dir, source_dir=d)

    settings = json.load(open(os.path.join(out, ADAPTER_CONFIG)))
    assert settings["target_modules"] == sorted(["q_proj", "v_proj", "qkv", "proj", "down_proj", "mlp.0", "mlp.2"])
    exclude = re.compile(settings["exclude_modules"])
    assert exclude.fullmatch("model.language_model.layers.1.mlp.down_proj") and exclude.fullmatch(
        "model.visual.patch_embed.proj") and not exclude.fullmatch("model.visual.blocks.3.mlp.down_proj")
    peft = peft_model(d, out)
    depth = model.config.vision.depth
    want = sorted([f"model.language_model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
                  + [f"model.visual.blocks.{i}.{m}" for i in range(depth) for m in ("attn.qkv", "attn.proj",
                                                                                    "mlp.down_proj")]
                  + ["model.visual.merger.mlp.0", "model.visual.merger.mlp.2"])
    assert depth == 4 and lora_modules(peft) == want

    batch = image_batch(model.config)
    ours = forward(model, batch, model.config.vision.window_size)
    base_diff = max_diff(forward(load_model(d), batch, model.config.vision.window_size), ours, batch["attention_mask"])
    peft_diff = max_diff(hf_logits(peft, batch), ours, batch["attention_mask"])
    hf_diff = max_diff(hf_logits(AutoModelForImageTextToText.from_pretrained(merged_dir).eval(), batch), ours,
                       batch["attention_mask"])
    print(f"qwen2_5_vl with an image: peft vs vrl_jax adapted {peft_diff:.1e}, transformers on the merged export "
          f"{hf_diff:.1e} (the adapters move the logits by {base_diff:.1e})")
    assert base_diff > 1e-2 and peft_diff <= TOL and hf_diff <= TOL
