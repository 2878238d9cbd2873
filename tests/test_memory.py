"""The memory planner (`vrl_jax.memory`, `python -m vrl_jax.plan`) and the training CLI's check before it
compiles: exact state figures against real trees, the activation estimate against XLA's own memory analysis
of the lowered step, suggestions that do fit, and the 7B table."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from tests.rl_batches import make_model, model_config
from vrl_jax import memory, sharding as shd
from vrl_jax.models import lora, quantize
from vrl_jax.plan import main as plan_main
from vrl_jax.rl.train_state import OptimizerConfig, create_train_state, trainable_params
from tests.xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEVEN_B = os.path.join(ROOT, "benchmarks", "configs", "qwen2_5_vl_7b.json")
SHAPE = memory.RunShape(prompts=8, samples=4, num_micro=2, prompt_len=128, new_tokens=128, patches=256,
                        image_patches=64, dtype="float32", param_dtype="float32", moments_dtype="float32",
                        remat="none", chunk_size=256, train_vit=False, train_connector=True, train_llm=True,
                        reference=True)


def shard_nbytes(tree) -> int:
    """Bytes one device holds of a tree of (possibly sharded) arrays: its first device's shards."""
    device = jax.devices()[0]
    return sum(sum(s.data.nbytes for s in x.addressable_shards if s.device == device)
               if isinstance(x, jax.Array) else np.asarray(x).nbytes for x in jax.tree.leaves(tree))


VISION_TARGETS = r"|^visual\.blocks\.(qkv|down)_w$|^visual\.merger_fc1_w$"  # beside the language model's


@pytest.mark.parametrize("mesh_sizes,moments,lora_rank,scheme,vision", [
    ((1, 1, 1), "float32", 0, "none", False), ((1, 2, 2), "bfloat16", 0, "none", False),
    ((1, 2, 2), "float32", 4, "none", False), ((1, 2, 2), "float32", 4, "nf4", False),
    ((2, 1, 2), "float32", 4, "int8", False), ((1, 2, 2), "float32", 4, "nf4", True)])
def test_state_figures_equal_the_real_trees_bytes(mesh_sizes, moments, lora_rank, scheme, vision):
    """Parameters, Adam moments, gradients and the KL reference (the trainable parameters' size) per device
    equal the bytes the first device really holds of a train state built on that mesh, exactly; with LoRA
    adapters (on q and down: a column- and a row-parallel projection) too, over a quantized base, and with
    adapters on the vision tower (stacked) and the connector (a single matrix) whose flags are on."""
    config = model_config("qwen2_5_vl", tie=False)
    targets = r"^language\.layers\.(q|down)_w$" + (VISION_TARGETS if vision else "")
    shape = dataclasses.replace(SHAPE, moments_dtype=moments, lora_rank=lora_rank, lora_targets=targets,
                                quantize=scheme, train_vit=vision)
    opt = OptimizerConfig(train_vit=vision, train_connector=True, moments_dtype=moments)
    n = math.prod(mesh_sizes)
    mesh = shd.make_mesh(shd.MeshConfig(*mesh_sizes), jax.devices()[:n]) if n > 1 else None
    model = make_model(config)
    if lora_rank:
        lora.add_adapters(model, lora.LoraConfig(lora_rank, 8.0, targets), jax.random.key(0))
    if scheme != "none":
        quantize.quantize_layers(model.language.layers, lora.projection_names(model.language.layers), scheme)
    state, _, _ = create_train_state(model, opt, mesh=mesh)
    items = {i.name: i.bytes for i in memory.state_items(config, shape, memory.abstract_mesh(mesh_sizes))}
    assert items["parameters"] == shard_nbytes(state.params)
    moments_tree = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert items["Adam moments"] == shard_nbytes(moments_tree)
    trained = trainable_params(state.params, opt)
    assert items["gradients"] == items["KL reference parameters"] == shard_nbytes(trained)
    if n > 1:  # the figures are per device, not the whole tree's
        assert items["parameters"] < sum(x.nbytes for x in jax.tree.leaves(state.params))
    if lora_rank:  # only the adapters of the language model train (and of the tower and connector where adapted)
        adapted = ("language.", "visual.") if vision else ("language.",)
        assert trained and all(not k.startswith(adapted) or lora.is_adapter(k) for k in trained)
        assert {k.split(".")[0] for k in trained if lora.is_adapter(k)} == {p.rstrip(".") for p in adapted}


@pytest.mark.parametrize("change,mesh_sizes", [
    ({}, (1, 1, 1)),
    ({"remat": "full"}, (1, 1, 1)),
    ({"remat": "dots"}, (2, 1, 1)),
    ({"new_tokens": 256, "num_micro": 4}, (1, 2, 2)),
    ({"lora_rank": 8}, (1, 2, 1)),  # frozen base weights: the same activations, no weight gradients
])
def test_activation_estimate_is_within_25_percent_of_the_compilers(change, mesh_sizes):
    """The analytic train-step activations against XLA's memory analysis of the same step lowered for
    abstract inputs on the mesh's virtual CPU devices (temporary bytes per device)."""
    config = model_config("qwen2_5_vl", tie=False)
    shape = dataclasses.replace(SHAPE, **change)
    analytic = memory.train_activations(config, shape, memory.abstract_mesh(mesh_sizes))
    measured = memory.measured_train_activations(config, shape, mesh_sizes)
    assert 0.75 <= analytic / measured <= 1.25, (analytic, measured)


def test_seven_b_on_eight_h100s_fits_and_on_a_v5e_8_gets_a_combination_that_fits(capsys):
    """The README's plan command (Qwen2.5-VL-7B, MAYE's geometry recipe at 1024 prompts, 8-way fsdp): it fits
    80 GiB; on 16 GiB it does not and exits 1: with 2048 + 2048 tokens only a combination with LoRA fits, with
    1024 + 1024 a combination does (re-planned). With LoRA, the gradients are a fraction of full fine-tuning's."""
    args = ["--config", os.path.join(ROOT, "experiments", "geo.py"), "--model-config", SEVEN_B,
            "--config.prompts_per_step=1024", "--mesh", "data=1,fsdp=8,tensor=1", "--image-patches", "1024"]
    assert plan_main([*args, "--device-memory", "h100"]) == 0  # the README's command
    out = capsys.readouterr().out
    assert "fits" in out and "parameters" in out and "rollout KV cache" in out
    params = next(line for line in out.splitlines() if line.strip().startswith("parameters"))
    assert abs(float(params.split()[1]) - 8.29e9 * 4 / 8 / memory.GiB) < 0.1  # 8.29 B float32 params / 8
    assert plan_main([*args, "--device-memory=v5e"]) == 1  # 2048 + 2048 tokens: only with LoRA among others
    out = capsys.readouterr().out
    suggestion = out.split("changes that would fit:")[1].strip().splitlines()[0]
    assert "does NOT fit" in out and "--config.model.lora.rank=64" in suggestion
    # The suggested flags, as printed, make a config the trainer accepts (geo.py's num_mini = 32 scales down
    # with the step) and a plan that fits.
    flags = suggestion.split(" (")[0].split()
    assert "--config.num_mini=8" in flags
    assert plan_main([*args, *flags, "--device-memory=v5e"]) == 0
    capsys.readouterr()
    assert plan_main([*args, "--config.model.lora.rank=64", "--device-memory=h100"]) == 0
    lora_out = capsys.readouterr().out
    assert plan_main([*args, "--config.model.lora.rank=64", "--config.model.lora.quantize=nf4"]) == 0
    first = lambda text, name: float(next(  # noqa: E731 - the GiB column of a table row
        line for line in text.splitlines() if line.strip().startswith(name)).split()[1])
    # NF4 codes (4.5 bits with their scales) for the decoder's projections, float32 for the rest.
    assert first(capsys.readouterr().out, "parameters") < 0.45 * first(lora_out, "parameters")
    adapters = next(line for line in lora_out.splitlines() if line.strip().startswith("gradients"))
    assert float(adapters.split()[1]) < 0.2 * float(next(  # adapters + vision tower, not the language model
        line for line in out.splitlines() if line.strip().startswith("gradients")).split()[1])
    shorter = ["--config.rollout.max_new_tokens=1024", "--config.data.length_buckets=(512,1024)"]
    assert plan_main([*args, *shorter, "--device-memory=v5e"]) == 1
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "changes that would fit:" in out
    from vrl_jax.models.config import ModelConfig
    from vrl_jax.train import load_config_file
    c = load_config_file(os.path.join(ROOT, "experiments", "geo.py"))
    shape = dataclasses.replace(memory.run_shape(c, 1024), prompts=1024, new_tokens=1024, prompt_len=1024)
    fixes = memory.suggestions(ModelConfig.from_pretrained(SEVEN_B), shape, (1, 8, 1), 16 * memory.GiB)
    assert fixes and all(plan.fits for _, plan in fixes)


def test_single_changes_that_fit_are_listed_and_really_fit():
    """Between the tiny model's peak with and without remat, a limit that only remat (or more micro-batches)
    meets: each suggestion fits, and the unchanged run does not."""
    config = model_config("qwen2_5_vl", tie=False)
    mesh = (1, 1, 1)
    full = memory.make_plan(config, dataclasses.replace(SHAPE, remat="full"), mesh)
    none = memory.make_plan(config, SHAPE, mesh)
    limit = (full.peak + none.peak) // 2
    fixes = memory.suggestions(config, SHAPE, mesh, limit)
    assert fixes and all(p.fits and p.peak <= limit < none.peak for _, p in fixes)
    assert any("--config.model.remat=full" in text for text, _ in fixes)


def test_sizes_and_mesh_flags_are_read_or_refused_by_name():
    assert memory.parse_bytes("80GiB") == 80 * memory.GiB and memory.parse_bytes("h200") == 141 * memory.GiB
    assert memory.parse_bytes("16 GB") == 16 * 10 ** 9
    with pytest.raises(ValueError, match="not a memory size"):
        memory.parse_bytes("lots")
    from vrl_jax.errors import UserError
    with pytest.raises(UserError, match="--mesh=data=two"):
        plan_main(["--config", os.path.join(ROOT, "experiments", "default.py"), "--mesh=data=two"])
    with pytest.raises(UserError, match="--device-memory"):
        plan_main(["--config", os.path.join(ROOT, "experiments", "default.py"), "--device-memory=lots"])


def test_training_refuses_a_run_that_cannot_fit_before_building_anything(tmp_path):
    """config.memory.device_gib below the smoke run's peak: one paragraph naming the key, the largest part
    and the plan command, exit 2, before any model or data is generated."""
    wd = tmp_path / "w"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}  # one device, as a user's laptop
    out = subprocess.run([sys.executable, "-m", "vrl_jax.train", "--config", "experiments/default.py:smoke",
                          f"--workdir={wd}", "--config.memory.device_gib=0.001"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    err = " ".join(out.stderr.split())
    assert "Traceback" not in err and "config.memory.device_gib" in err and "python -m vrl_jax.plan" in err
    assert "GiB per device" in err
    assert not os.path.exists(wd / "model") and not os.path.exists(wd / "checkpoints")


def test_abstract_parameters_are_the_models_own():
    """The planner's parameter tree (eval_shape, nothing allocated) has the real model's paths and shapes."""
    config = model_config("qwen2_5_vl", tie=False)
    real = nnx.state(make_model(config), nnx.Param).flat_state()
    abstract = memory.abstract_params(config, SHAPE)
    got = {k: tuple(v.shape) for k, v in abstract.items()}
    want = {".".join(map(str, path)): tuple(np.shape(v.value)) for path, v in real}
    assert got == want


def test_a_combination_names_each_flag_once_at_its_last_value():
    """Greedy rounds may set a flag twice (a smaller step sets num_micro, then more micro-batches raise it):
    the suggestion prints it once, as last set, followed by the reasons."""
    text = memory.combined(["--config.prompts_per_step=256 --config.num_micro=16 (a smaller step)",
                            "--config.model.lora.rank=64 (LoRA)", "--config.num_micro=32 (fewer rows)",
                            "--config.model.param_dtype=bfloat16 --config.model.dtype=bfloat16"])
    assert text == ("--config.prompts_per_step=256 --config.model.lora.rank=64 --config.num_micro=32 "
                    "--config.model.param_dtype=bfloat16 --config.model.dtype=bfloat16 (a smaller step; LoRA; "
                    "fewer rows)")
