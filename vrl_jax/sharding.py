"""Device mesh, parameter and batch shardings.

The mesh has three axes, in this order:
  "data"   pure data parallelism: parameters replicated, the batch split;
  "fsdp"   fully sharded data parallelism: the batch split *and* each large weight split on its
           input (model-width) dimension, gathered by XLA just before use;
  "tensor" tensor parallelism: weights split on attention-head / MLP-hidden / vocabulary dimensions.

Parameter placement is an ordered table of (regex on the dotted parameter path, one mesh axis or
None per dimension); the first match wins and unmatched parameters are replicated. A dimension whose
size does not divide by its mesh axis size falls back to replication on that dimension only, so any
model runs on any mesh (e.g. 2 key/value heads of width 64 = 128 columns shard on tensor=2 or 4 but
not on 3). Tensor-parallel columns are split by size, not by head: when heads * head_dim divides but
the head count does not, a head spans two devices; that is still exact (XLA inserts the collectives)
but slower than a head-aligned split.

Stacked parameters (`language.layers.*`, `visual.blocks.*`) have a leading layer axis that is never
sharded: the layers run under `lax.scan`, which slices it.

All functions here run on the host at setup time; none is traced.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from vrl_jax.models.lora import A_SUFFIX, B_SUFFIX

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes

# (regex on the parameter path, mesh axis per dimension). Layouts are `x @ W`, i.e. [in, out].
PARAM_RULES: tuple[tuple[str, tuple[Any, ...]], ...] = (
    # Embedding [V, H]: vocabulary-parallel on tensor, width on fsdp. The tied unembedding is its
    # transpose, so the chunked log-softmax reads vocabulary slices that are already split.
    (r"^language\.embed$", ("tensor", "fsdp")),
    (r"^language\.lm_head$", ("fsdp", "tensor")),  # [H, V]
    # Decoder, stacked [L, ...]: column-parallel q/k/v/gate/up, row-parallel o/down (Megatron).
    (r"^language\.layers\.(q|k|v|gate|up)_w$", (None, "fsdp", "tensor")),  # [L, H, out]
    (r"^language\.layers\.(q|k|v)_b$", (None, "tensor")),  # [L, out]
    (r"^language\.layers\.(o|down)_w$", (None, "tensor", "fsdp")),  # [L, in, H]
    # LoRA adapters follow their weight's rule (`adapter_spec`).
    # QLoRA's quantized weights (`models/quantize.py`): codes [L, in or in/2, out], scales [L, 1 or in/64, out]
    # and NF4's second-level constants [L, 1, out] as their weight (a dimension that does not divide, such as
    # a single scale row, stays whole).
    (r"^language\.layers\.(q|k|v|gate|up)_w_(codes|scale|scale_min|scale_step)$", (None, "fsdp", "tensor")),
    (r"^language\.layers\.(o|down)_w_(codes|scale|scale_min|scale_step)$", (None, "tensor", "fsdp")),
    # Vision blocks, stacked [depth, ...].
    (r"^visual\.blocks\.(qkv|fc1|gate|up)_w$", (None, "fsdp", "tensor")),
    (r"^visual\.blocks\.(qkv|fc1|gate|up)_b$", (None, "tensor")),
    (r"^visual\.blocks\.(proj|fc2|down)_w$", (None, "tensor", "fsdp")),
    (r"^visual\.patch_embed$", (None, "fsdp")),  # [patch_dim, C]; patch_dim (1176) rarely divides
    # The connector (merger MLP): column- then row-parallel.
    (r"^visual\.merger_fc1_w$", ("fsdp", "tensor")),
    (r"^visual\.merger_fc1_b$", ("tensor",)),
    (r"^visual\.merger_fc2_w$", ("tensor", "fsdp")),
    # LLaVA-OneVision: SigLIP layers, stacked [depth, ...], and the projector, as above.
    (r"^visual\.layers\.(q|k|v|fc1)_w$", (None, "fsdp", "tensor")),
    (r"^visual\.layers\.(q|k|v|fc1)_b$", (None, "tensor")),
    (r"^visual\.layers\.(o|fc2)_w$", (None, "tensor", "fsdp")),
    (r"^projector\.linear1_w$", ("fsdp", "tensor")),
    (r"^projector\.linear1_b$", ("tensor",)),
    (r"^projector\.linear2_w$", ("tensor", "fsdp")),
    # Qwen3-VL's DeepStack mergers, stacked [taps, ...]: as the merger.
    (r"^visual\.deepstack_fc1_w$", (None, "fsdp", "tensor")),
    (r"^visual\.deepstack_fc1_b$", (None, "tensor")),
    (r"^visual\.deepstack_fc2_w$", (None, "tensor", "fsdp")),
    # Norm weights and the remaining biases are small: replicated (the default).
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; at most one may be -1 (= every remaining device)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def sizes(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    @classmethod
    def of(cls, mesh) -> "MeshConfig":
        """The axis sizes of a config's `mesh` section (which also holds `cpu_devices`, the host split
        `distributed.split_cpu_host` applies before JAX starts)."""
        return cls(**{axis: mesh[axis] for axis in AXES})


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolves -1 and checks the product against `num_devices`; errors name the field."""
    sizes = list(config.sizes())
    for name, size in zip(AXES, sizes):
        if size != -1 and (not isinstance(size, int) or size < 1):
            raise ValueError(f"MeshConfig.{name} must be a positive int or -1; got {size!r}")
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ValueError(f"MeshConfig: only one axis may be -1; got {dict(zip(AXES, sizes))}")
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"MeshConfig.{AXES[free[0]]}=-1: the other axes multiply to {fixed}, which does "
                             f"not divide the {num_devices} devices")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(f"MeshConfig {dict(zip(AXES, sizes))}: data*fsdp*tensor = {math.prod(sizes)} must equal "
                         f"the number of devices ({num_devices})")
    return tuple(sizes)


def make_mesh(config: MeshConfig | Sequence[int] = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all devices of all processes)."""
    if not isinstance(config, MeshConfig):
        config = MeshConfig(*config)
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(config, len(devices))
    # Auto axes: GSPMD propagates shardings from the annotated inputs and outputs.
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def batch_size_divisor(mesh: Mesh) -> int:
    """How many ways the batch dimension is split: data * fsdp."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


# ---- Parameters ----------------------------------------------------------------------------------


def _fit(spec: Sequence[Any], shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drops the axes of `spec` whose dimension does not divide; pads/truncates to the rank."""
    spec = tuple(spec)[: len(shape)] + (None,) * max(0, len(shape) - len(spec))
    out = []
    for axis, size in zip(spec, shape):
        names = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
        ways = math.prod(mesh.shape[n] for n in names)
        out.append(axis if names and size % ways == 0 and ways > 1 else None)
    return P(*out)


def _with_fsdp(axis) -> Any:
    names = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
    names = ("fsdp",) + tuple(n for n in names if n != "fsdp")
    return names[0] if len(names) == 1 else names


def adapter_spec(weight_spec: tuple[Any, ...], suffix: str) -> tuple[Any, ...]:
    """The spec of a LoRA adapter (`models/lora.py`) from its weight's [..., in, out]: A [..., in, r] splits
    `in` and B [..., r, out] splits `out` as the weight does, so x @ A and (x @ A) @ B need no more
    communication than x @ W, and over "fsdp" too (stored split, gathered for use as every FSDP weight is);
    the rank r whole, leading (block) axes as the weight's."""
    *lead, d_in, d_out = weight_spec
    return (*lead, _with_fsdp(d_in), None) if suffix == A_SUFFIX else (*lead, None, _with_fsdp(d_out))


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh,
               rules: Sequence[tuple[str, tuple[Any, ...]]] = PARAM_RULES) -> P:
    """PartitionSpec of the parameter at dotted `path` with `shape` (first matching rule; a LoRA adapter's
    from its weight's, `adapter_spec`)."""
    for suffix in (A_SUFFIX, B_SUFFIX):
        if path.endswith(suffix):
            weight = path.removesuffix(suffix)
            spec = next((s for pattern, s in rules if re.search(pattern, weight)), ())
            spec = tuple(spec) + (None,) * (len(shape) - len(spec))
            return _fit(adapter_spec(spec, suffix), shape, mesh)
    for pattern, spec in rules:
        if re.search(pattern, path):
            return _fit(spec, shape, mesh)
    return P()


def param_sharding_fn(mesh: Mesh, rules: Sequence[tuple[str, tuple[Any, ...]]] = PARAM_RULES
                      ) -> Callable[[str, tuple[int, ...]], NamedSharding]:
    """`fn(path, shape) -> NamedSharding`, the form `load_hf_params(..., shardings=fn)` takes."""
    return lambda path, shape: NamedSharding(mesh, param_spec(path, tuple(shape), mesh, rules))


def _path_str(key_path) -> str:
    parts = []
    for k in key_path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return ".".join(parts)


def param_shardings(params: Any, mesh: Mesh, rules: Sequence[tuple[str, tuple[Any, ...]]] = PARAM_RULES) -> Any:
    """A tree of NamedSharding matching `params` (a pure dict of arrays or ShapeDtypeStructs)."""
    fn = param_sharding_fn(mesh, rules)
    return jax.tree_util.tree_map_with_path(lambda kp, x: fn(_path_str(kp), tuple(x.shape)), params)


# ---- Batches and placement -----------------------------------------------------------------------


def batch_spec(shape: tuple[int, ...], batch_dim: int, mesh: Mesh) -> P:
    """Splits dimension `batch_dim` over ("data", "fsdp") when it divides, else replicates."""
    spec = [None] * len(shape)
    if shape[batch_dim] % batch_size_divisor(mesh) == 0:
        spec[batch_dim] = BATCH_AXES
    return P(*spec)


def row_shards(rows: int, mesh: Mesh | None) -> int:
    """Into how many contiguous blocks `batch_spec` splits `rows` rows: the data-parallel devices
    ("data" x "fsdp") when they divide `rows`, else 1. Image patches are packed per block (one buffer
    per block, `VisionInputs` with a leading shard axis), so each device encodes its own rows' images."""
    if mesh is None:
        return 1
    d = batch_size_divisor(mesh)
    return d if d > 1 and rows % d == 0 else 1


def local_blocks(blocks: int, mesh: Mesh | None) -> np.ndarray | None:
    """bool [blocks]: which of `blocks` contiguous row blocks (split over the mesh as `batch_spec` splits
    them) a device of this process holds, i.e. whose image pixels this host must compute; None when it
    holds all of them (one process, no mesh)."""
    if mesh is None or jax.process_count() == 1:
        return None
    spec = NamedSharding(mesh, batch_spec((blocks,), 0, mesh))
    held = np.zeros(blocks, bool)
    for index in spec.addressable_devices_indices_map((blocks,)).values():
        held[index[0]] = True
    return held


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put(tree: Any, shardings: Any) -> Any:
    """Places host or device arrays into `shardings` (a matching tree), in every process.

    With several processes each one passes the full global value (every host builds the same global
    batch from the same seed, see `vrl_jax.distributed`); `make_array_from_callback` keeps only the
    shards this process's devices own. An array already spread over the processes is resharded.
    """
    def one(x, sharding):
        if x is None:
            return None
        if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
            return jax.device_put(x, sharding)  # (a global array is resharded on the devices)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings, is_leaf=lambda x: x is None)


def shardings_of(tree: Any) -> Any:
    """The sharding of every array leaf (for jit in/out shardings that match a placed state)."""
    return jax.tree.map(lambda x: x.sharding, tree)
