"""Per-device memory of a run, worked out before anything is allocated (`python -m vrl_jax.plan`).

Where each figure comes from (the `source` column of the table):
  exact     parameters, Adam moments, gradients and the KL reference: the parameter tree's shapes from
            `jax.eval_shape` (nothing allocated), split by the mesh's sharding rules (`sharding.param_spec`);
            the sampler's KV cache and the packed image buffers: the arrays' own shapes.
  analytic  the train step's activations: what one micro-batch's forward keeps for the backward pass under
            the remat policy, counted per token and layer (`train_activations`).
  compiler  the same, read from XLA's memory analysis of the lowered train step on as many virtual CPU
            devices as the mesh (`measured_train_activations`; small models, tests and `--compile`).

All sizes are bytes on one device. The train phase holds parameters, moments, gradients, the reference and
the activations; the rollout phase holds parameters, moments, the reference, the KV cache and the image
buffers. The peak is the larger of the two.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh

from vrl_jax import sharding as shd
from vrl_jax.models.config import ModelConfig
from vrl_jax.models.layers import remat_policy_name
from vrl_jax.sampling.sampler import kv_caches

GiB = 1024 ** 3
# High-bandwidth memory per chip, GiB.
DEVICE_MEMORY_GIB = {"h100": 80, "h200": 141, "a100": 80, "a100-40gb": 40, "l4": 24,
                     "v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}


class Item(NamedTuple):
    name: str
    bytes: int
    source: str  # exact | analytic | compiler
    phase: str  # both | train | rollout


@dataclasses.dataclass(frozen=True)
class RunShape:
    """The sizes of a run that memory depends on (read off an experiment config by `run_shape`)."""

    prompts: int  # prompts per RL step (global)
    samples: int  # responses per prompt
    num_micro: int  # micro-batches per step
    prompt_len: int  # the longest prompt bucket
    new_tokens: int  # response length
    patches: int  # the largest patch bucket (one buffer)
    image_patches: int  # the most patches one image has (the vision tower attends within an image)
    dtype: str  # compute dtype
    param_dtype: str
    moments_dtype: str
    remat: str
    chunk_size: int  # vocabulary chunk of the log-softmax
    train_vit: bool
    train_connector: bool
    train_llm: bool
    reference: bool  # a KL reference copy of the trained parameters is kept
    num_mini: int = 1  # optimizer updates per PPO epoch (MAYE's mini-batches): divides num_micro
    lora_rank: int = 0  # LoRA adapters' rank (`model.lora`), 0 = full fine-tuning
    lora_targets: str = r"^language\.layers\.(q|k|v|o|gate|up|down)_w$"
    quantize: str = "none"  # QLoRA: the frozen projections stored in int8 / nf4 (`model.lora.quantize`)


def run_shape(c, image_patches: int | None = None) -> RunShape:
    """The sizes of experiment config `c`; `image_patches` defaults to the largest patch bucket."""
    patches = max(c.data.patch_buckets)
    return RunShape(
        prompts=c.prompts_per_step, samples=c.rollout.num_samples, num_micro=c.num_micro,
        prompt_len=max(c.data.length_buckets), new_tokens=c.rollout.max_new_tokens, patches=patches,
        image_patches=min(image_patches or patches, patches),
        dtype=c.model.dtype, param_dtype=c.model.param_dtype, moments_dtype=c.optim.moments_dtype,
        remat=remat_policy_name(c.model.remat), chunk_size=c.loss.chunk_size, train_vit=c.optim.train_vit,
        train_connector=c.optim.train_connector, train_llm=c.optim.train_llm,
        reference=bool(c.loss.kl_coef or (c.advantage.estimator == "reinforce_pp" and c.advantage.kl_reward_coef)),
        num_mini=c.num_mini, lora_rank=c.model.lora.rank, lora_targets=c.model.lora.targets,
        quantize=c.model.lora.quantize)


def lora_of(shape: RunShape):
    """The `lora.LoraConfig` of the run's adapters, or None (alpha does not change any size)."""
    from vrl_jax.models.lora import LoraConfig
    return LoraConfig(shape.lora_rank, 1.0, shape.lora_targets) if shape.lora_rank else None


def abstract_mesh(sizes: tuple[int, int, int]) -> AbstractMesh:
    return AbstractMesh(tuple(sizes), shd.AXES)


def _bytes(shape, dtype) -> int:
    return int(math.prod(shape)) * jnp.dtype(dtype).itemsize


def shard_bytes(path: str, shape: tuple[int, ...], dtype, mesh) -> int:
    """Bytes of one device's shard of the parameter (or moment) at `path`, under the sharding rules."""
    spec = shd.param_spec(path, tuple(shape), mesh)
    local = [size // math.prod(mesh.shape[n] for n in ((axis,) if isinstance(axis, str) else axis))
             if axis else size for size, axis in zip(shape, tuple(spec) + (None,) * len(shape))]
    return _bytes(local, dtype)


def abstract_params(model_config: ModelConfig, shape: RunShape) -> dict[str, jax.ShapeDtypeStruct]:
    """{dotted path: ShapeDtypeStruct} of the model's parameters (LoRA adapters included), nothing allocated."""
    return _abstract_params(model_config, shape.dtype, shape.param_dtype, lora_of(shape), shape.quantize)


@functools.lru_cache(maxsize=16)
def _abstract_params(model_config: ModelConfig, dtype: str, param_dtype: str, lora,
                     quantize: str) -> dict[str, jax.ShapeDtypeStruct]:
    from flax import traverse_util

    from vrl_jax.models.weights import abstract_model
    _, state = abstract_model(model_config, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype), lora=lora,
                              quantize=quantize)
    return traverse_util.flatten_dict(state.to_pure_dict(), sep=".")


def _trainable(params: dict, shape: RunShape) -> dict:
    from flax import traverse_util

    from vrl_jax.rl.train_state import OptimizerConfig, trainable_params
    cfg = OptimizerConfig(train_vit=shape.train_vit, train_connector=shape.train_connector, train_llm=shape.train_llm)
    return trainable_params(traverse_util.unflatten_dict(params, sep="."), cfg)


def state_items(model_config: ModelConfig, shape: RunShape, mesh) -> list[Item]:
    """Parameters, Adam moments, gradients and the reference (a copy of the trained parameters,
    `run_setup.reference_copy`), exact per device."""
    params = abstract_params(model_config, shape)
    trainable = _trainable(params, shape)
    p = sum(shard_bytes(k, v.shape, v.dtype, mesh) for k, v in params.items())
    moments = 2 * sum(shard_bytes(k, v.shape, shape.moments_dtype, mesh) for k, v in trainable.items())
    grads = sum(shard_bytes(k, v.shape, v.dtype, mesh) for k, v in trainable.items())
    items = [Item("parameters", p, "exact", "both"), Item("Adam moments", moments, "exact", "both"),
             Item("gradients", grads, "exact", "train")]
    if shape.reference:
        items.append(Item("KL reference parameters", grads, "exact", "both"))
    return items


def rollout_items(model_config: ModelConfig, shape: RunShape, mesh) -> list[Item]:
    """The sampler's KV caches (each prompt's slots once, each sample's response slots; rows over the batch
    axes, kv heads over "tensor" when they divide) and one prompt batch's packed image buffer."""
    t = model_config.text
    rows = shape.prompts * shape.samples
    local_rows = rows // shd.row_shards(rows, mesh)
    local_prompts = shape.prompts // shd.row_shards(shape.prompts, mesh)
    tensor = mesh.shape["tensor"]
    local = dataclasses.replace(t, num_kv_heads=t.num_kv_heads // tensor if t.num_kv_heads % tensor == 0
                                else t.num_kv_heads)  # kv heads split over "tensor" when they divide
    caches = jax.eval_shape(lambda: kv_caches(local, local_prompts, shape.prompt_len, local_rows, shape.new_tokens,
                                              jnp.dtype(shape.dtype)))
    cache = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(caches))
    # One buffer per device's prompts (`processor.encode(shards=S)`), at most one image per prompt within the
    # largest bucket, and one vision layer's activations at a time during the prefill.
    p = min(shape.patches, local_prompts * shape.image_patches)
    v = model_config.vision
    images = _bytes((p, v.patch_dim), jnp.float32) + _vision_layer_bytes(model_config, shape, p)
    logits = local_rows * t.vocab_size * 4 * 2
    return [Item("rollout KV cache", cache, "exact", "rollout"),
            Item("image buffers and vision prefill", images, "analytic", "rollout"),
            Item("decode logits", logits, "exact", "rollout")]


def _vision_layer_bytes(model_config: ModelConfig, shape: RunShape, patches: int) -> int:
    """One vision block's activations over `patches` patches, attention banded to one image."""
    v = model_config.vision
    band = min(patches, shape.image_patches)
    a = jnp.dtype(shape.dtype).itemsize
    return int(patches * (6 * v.width + 4 * v.mlp_dim) * a + 3 * v.num_heads * patches * band * 4)


def train_activations(model_config: ModelConfig, shape: RunShape, mesh) -> int:
    """What one micro-batch's forward keeps for its backward pass, bytes per device (analytic).

    Per token and decoder layer, with tensor parallelism t splitting heads and the MLP, `none` keeps the
    block's inputs and norm outputs (4 H) and their float32 upcasts (2 H), q/k/v and the attention output
    (2 qd + 2 kvd over t), the MLP's gate, up, activation and product (4 I / t), and three float32
    [heads / t, T] attention arrays (scores, probabilities, the masked select); `dots` keeps only the
    matmul outputs (q, k, v, o, gate, up, down); `full` keeps each layer's input. Every policy adds one
    layer's `none` set live during its backward pass, and the loss one vocabulary chunk's float32 logits
    three times (logits, probabilities, their gradient). A trained vision tower adds its layers the same
    way, its attention banded to one image. Checked against XLA's memory analysis of the lowered step
    (`tests/test_memory.py`).
    """
    t, v = model_config.text, model_config.vision
    rows = shape.prompts * shape.samples // shape.num_micro
    local = rows // shd.row_shards(rows, mesh)
    seq = shape.prompt_len + shape.new_tokens
    tokens = local * seq
    tp = mesh.shape["tensor"]
    a = jnp.dtype(shape.dtype).itemsize
    head_dim = t.explicit_head_dim or t.hidden_size // t.num_heads
    qd, kvd = t.num_heads * head_dim / tp, t.num_kv_heads * head_dim / tp
    inter, h = t.intermediate_size / tp, t.hidden_size
    full_layer = tokens * ((4 * h + 2 * qd + 2 * kvd + 4 * inter) * a + 2 * h * 4 + 3 * (t.num_heads / tp) * seq * 4)
    dots_layer = tokens * (qd + 2 * kvd + h + 2 * inter + h) * a
    saved = {"none": full_layer, "dots": dots_layer, "offload": 0.0, "full": tokens * h * a}[shape.remat]
    lm = t.num_layers * saved + full_layer
    loss = 3 * tokens * min(shape.chunk_size, t.vocab_size) * 4
    vit = 0
    if shape.train_vit:  # a micro-batch's images on this device: at most one per prompt row, within the bucket
        p = min(shape.patches, local * shape.image_patches)
        per = _vision_layer_bytes(model_config, shape, p)
        vit = v.depth * (per if shape.remat == "none" else p * v.width * a) + per
    return int(lm + loss + vit)


def measured_train_activations(model_config: ModelConfig, shape: RunShape, mesh_sizes: tuple[int, int, int]) -> int:
    """XLA's own figure: the temporary bytes per device of the train step lowered for abstract inputs of
    `shape` (text rows; no images) on the first prod(mesh_sizes) devices of this process, which must exist
    (`XLA_FLAGS=--xla_force_host_platform_device_count=N` on CPU). Compiles; allocates nothing."""
    from flax import nnx

    from vrl_jax.models.weights import abstract_model
    from vrl_jax.rl.losses import PolicyLossConfig
    from vrl_jax.rl.train_state import (OptimizerConfig, TrainState, make_optimizer, train_state_shardings,
                                        trainable_params)
    from vrl_jax.rl.train_step import StepConfig, TrainBatch, batch_shardings, make_train_step
    n = math.prod(mesh_sizes)
    mesh = shd.make_mesh(shd.MeshConfig(*mesh_sizes), jax.devices()[:n])
    graphdef, abstract = abstract_model(model_config, dtype=jnp.dtype(shape.dtype),
                                        param_dtype=jnp.dtype(shape.param_dtype), lora=lora_of(shape),
                                        quantize=shape.quantize)
    graphdef = nnx.split(nnx.merge(graphdef, abstract), nnx.Param)[0]
    params = abstract.to_pure_dict()
    opt_cfg = OptimizerConfig(train_vit=shape.train_vit, train_connector=shape.train_connector,
                              train_llm=shape.train_llm, moments_dtype=shape.moments_dtype)
    opt_state = jax.eval_shape(make_optimizer(opt_cfg).init, trainable_params(params, opt_cfg))
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    state = TrainState(params, opt_state, scalar, scalar, jax.ShapeDtypeStruct((2,), jnp.uint32))
    rows = shape.prompts * shape.samples
    m, seq = shape.num_micro, shape.prompt_len + shape.new_tokens
    mb = rows // m
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    batch = TrainBatch(input_ids=i32(m, mb, seq), attention_mask=i32(m, mb, seq), positions=i32(m, 3, mb, seq),
                       targets=i32(m, mb, seq), loss_mask=f32(m, mb, seq), old_logprobs=f32(m, mb, seq),
                       advantages=f32(m, mb, seq), sft_weights=f32(m, mb),
                       ref_logprobs=f32(m, mb, seq) if shape.reference else None)
    loss = PolicyLossConfig(kl_coef=0.01 if shape.reference else 0.0)
    cfg = StepConfig(batch_size=rows, num_micro=m, loss=loss, remat=shape.remat, chunk_size=shape.chunk_size)
    step = make_train_step(graphdef, opt_cfg, cfg, mesh=mesh, state_shardings=train_state_shardings(state, mesh),
                           batch_shardings=batch_shardings(batch, mesh))
    stats = step.jitted.lower(state, batch).compile().memory_analysis()
    return int(stats.temp_size_in_bytes)


@dataclasses.dataclass
class Plan:
    items: list[Item]
    mesh_sizes: tuple[int, int, int]
    device_memory: int | None = None

    def phase(self, name: str) -> int:
        return sum(i.bytes for i in self.items if i.phase in ("both", name))

    @property
    def peak(self) -> int:
        return max(self.phase("train"), self.phase("rollout"))

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.peak <= self.device_memory

    def table(self) -> str:
        mesh = ", ".join(f"{a}={s}" for a, s in zip(shd.AXES, self.mesh_sizes))
        lines = [f"per device, mesh {mesh}:", f"  {'':36} {'GiB':>9}  source    phase"]
        for i in self.items:
            lines.append(f"  {i.name:36} {i.bytes / GiB:9.3f}  {i.source:9} {i.phase}")
        lines.append(f"  {'train phase':36} {self.phase('train') / GiB:9.3f}")
        lines.append(f"  {'rollout phase':36} {self.phase('rollout') / GiB:9.3f}")
        lines.append(f"  {'peak':36} {self.peak / GiB:9.3f}")
        if self.device_memory is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {'device memory':36} {self.device_memory / GiB:9.3f}  {verdict}")
        return "\n".join(lines)


def make_plan(model_config: ModelConfig, shape: RunShape, mesh_sizes: tuple[int, int, int],
              device_memory: int | None = None, measured_activations: int | None = None) -> Plan:
    mesh = abstract_mesh(mesh_sizes)
    act = (Item("train activations (one micro-batch)", measured_activations, "compiler", "train")
           if measured_activations is not None else
           Item("train activations (one micro-batch)", train_activations(model_config, shape, mesh), "analytic",
                "train"))
    return Plan(state_items(model_config, shape, mesh) + [act] + rollout_items(model_config, shape, mesh),
                tuple(mesh_sizes), device_memory)


LORA_RANK = 64  # what the planner suggests (a common rank for 7B-scale RL; its memory is ~1% of the weights)


def _changes(shape: RunShape, mesh_sizes: tuple[int, int, int]) -> list[tuple[str, tuple[int, int, int], RunShape]]:
    """Single changes worth trying, in order: shard parameters and moments more (fsdp), fewer rows per
    micro-batch, remat, bfloat16 moments, bfloat16 parameters, then those that change the recipe: LoRA
    adapters in place of the language model's weights (and then their base in NF4), and fewer prompts per
    step (the rollout's KV cache holds every sample of a step)."""
    data, fsdp, tensor = mesh_sizes
    out: list[tuple[str, tuple[int, int, int], RunShape]] = []
    if data > 1:
        out.append((f"--config.mesh.data=1 --config.mesh.fsdp={data * fsdp} (shard parameters and moments over "
                    f"all {data * fsdp} batch devices)", (1, data * fsdp, tensor), shape))
    rows, batch_devices = shape.prompts * shape.samples, data * fsdp
    splits = lambda micro: rows % micro == 0 and (rows // micro) % batch_devices == 0  # noqa: E731 - as validated
    for k in (2, 4, 8, 16):
        if splits(shape.num_micro * k):
            out.append((f"--config.num_micro={shape.num_micro * k} (fewer rows per micro-batch)", mesh_sizes,
                        dataclasses.replace(shape, num_micro=shape.num_micro * k)))
    for policy in ("dots", "full"):
        if shape.remat != policy and not (policy == "dots" and shape.remat == "full"):
            out.append((f"--config.model.remat={policy}", mesh_sizes, dataclasses.replace(shape, remat=policy)))
    if shape.moments_dtype != "bfloat16":
        out.append(("--config.optim.moments_dtype=bfloat16", mesh_sizes,
                    dataclasses.replace(shape, moments_dtype="bfloat16")))
    if shape.param_dtype != "bfloat16":
        out.append(("--config.model.param_dtype=bfloat16 --config.model.dtype=bfloat16", mesh_sizes,
                    dataclasses.replace(shape, param_dtype="bfloat16", dtype="bfloat16")))
    if shape.train_llm and not shape.lora_rank:  # trains adapters, not the language model's weights: changes the recipe
        out.append((f"--config.model.lora.rank={LORA_RANK} (train LoRA adapters instead of the language model)",
                    mesh_sizes, dataclasses.replace(shape, lora_rank=LORA_RANK)))
    if shape.lora_rank and shape.quantize == "none":  # QLoRA: frozen weights in 4 bits, computed with in 4 bits
        out.append(("--config.model.lora.quantize=nf4 (QLoRA: the frozen weights in 4 bits)", mesh_sizes,
                    dataclasses.replace(shape, quantize="nf4")))
    for k in (2, 4, 8):  # as many rows per micro-batch and per update as before: num_micro, num_mini shrink too
        if shape.prompts % k == 0 and shape.num_micro % k == 0 and shape.num_mini % k == 0:
            mini = f" --config.num_mini={shape.num_mini // k}" if shape.num_mini > 1 else ""
            out.append((f"--config.prompts_per_step={shape.prompts // k} --config.num_micro={shape.num_micro // k}"
                        f"{mini} (a smaller step: changes the recipe)", mesh_sizes,
                        dataclasses.replace(shape, prompts=shape.prompts // k, num_micro=shape.num_micro // k,
                                            num_mini=shape.num_mini // k)))
    return out


def suggestions(model_config: ModelConfig, shape: RunShape, mesh_sizes: tuple[int, int, int],
                device_memory: int, accepts=lambda flags: True) -> list[tuple[str, Plan]]:
    """Changes that make the run fit, each with its plan: every single change that does (`_changes` order),
    else one combination, built greedily (each round adds the change that lowers the peak most). accepts:
    whether the run's config with a suggestion's flags (text) is valid (`plan.config_accepts`); others are
    never suggested."""
    single = [(text, plan) for text, sizes, s in _changes(shape, mesh_sizes)
              if (plan := make_plan(model_config, s, sizes, device_memory)).fits and accepts(text)]
    if single:
        return single
    chosen: list[str] = []
    sizes, current = mesh_sizes, shape
    best = make_plan(model_config, shape, mesh_sizes, device_memory)
    while not best.fits:
        options = [(make_plan(model_config, s, z, device_memory), text, z, s) for text, z, s in _changes(current, sizes)
                   if accepts(combined(chosen + [text]))]
        options = [o for o in options if o[0].peak < best.peak]
        if not options:
            return []
        best, text, sizes, current = min(options, key=lambda o: o[0].peak)
        chosen.append(text)
    return [(combined(chosen), best)]


def combined(texts: list[str]) -> str:
    """Change texts ('--config.a=1 --config.b=2 (why)') as one: each flag once, at its last value (a later
    round may change a flag again, such as num_micro), then the reasons."""
    flags: dict[str, str] = {}
    notes: list[str] = []
    for text in texts:
        head, _, note = text.partition(" (")
        for flag in head.split():
            name = flag.split("=")[0]
            flags.pop(name, None)  # re-inserted last: the flags read in the order they were last set
            flags[name] = flag
        if note and note.rstrip(")") not in notes:
            notes.append(note.rstrip(")"))
    return " ".join(flags.values()) + (f" ({'; '.join(notes)})" if notes else "")


def parse_bytes(text: str) -> int:
    """'80GiB', '16 GB', '141gib', '1.5TiB', or a preset name (h100, v5e, ...) -> bytes."""
    key = text.strip().lower()
    if key in DEVICE_MEMORY_GIB:
        return DEVICE_MEMORY_GIB[key] * GiB
    units = {"tib": 1024 ** 4, "tb": 1000 ** 4, "gib": GiB, "gb": 1000 ** 3, "mib": 1024 ** 2, "mb": 1000 ** 2,
             "kib": 1024, "kb": 1000, "b": 1}
    for unit, scale in units.items():
        if key.endswith(unit):
            number = key[:-len(unit)].strip()
            try:
                return int(float(number) * scale)
            except ValueError:
                break
    raise ValueError(f"{text!r} is not a memory size (e.g. 80GiB, 16GB) or a device "
                     f"({', '.join(sorted(DEVICE_MEMORY_GIB))})")


def device_memory_limit() -> int | None:
    """The first local device's memory limit as the runtime reports it (GPU, TPU), None on CPU."""
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None
    limit = stats.get("bytes_limit")
    return int(limit) if limit else None
