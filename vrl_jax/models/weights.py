"""Hugging Face checkpoint <-> vrl_jax parameters, through one table of names.

Each row of `RULES` names an HF key template (`{i}` is a layer index), the vrl_jax parameter it
fills (per-layer keys fill one slice of a stacked parameter) and how the tensor is laid out
("linear": PyTorch [out, in] transposed to [in, out]; "conv": Conv3d flattened to a matmul). The
table is read both ways: loading and exporting cannot disagree.

Loading streams tensor by tensor: each target parameter is assembled in one host buffer and put on
its device (or its sharding) as soon as its last slice arrives, so host memory never holds two full
copies of the weights.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vrl_jax.models.config import ModelConfig
from vrl_jax.models.qwen_vl import QwenVL
from vrl_jax.models.safetensors_io import CheckpointError, iterate_tensors

# (HF key template in the legacy layout, vrl_jax parameter path, layout): the Qwen2 language model ...
LM_RULES: tuple[tuple[str, str, str | None], ...] = (
    ("model.embed_tokens.weight", "language.embed", None),
    ("model.norm.weight", "language.norm", None),
    ("lm_head.weight", "language.lm_head", "linear"),
    ("model.layers.{i}.input_layernorm.weight", "language.layers.input_norm", None),
    ("model.layers.{i}.post_attention_layernorm.weight", "language.layers.post_norm", None),
    *((f"model.layers.{{i}}.self_attn.{p}_proj.weight", f"language.layers.{p}_w", "linear") for p in "qkvo"),
    *((f"model.layers.{{i}}.self_attn.{p}_proj.bias", f"language.layers.{p}_b", None) for p in "qkv"),
    *((f"model.layers.{{i}}.mlp.{p}_proj.weight", f"language.layers.{p}_w", "linear")
      for p in ("gate", "up", "down")),
)
# ... and the Qwen2-VL / Qwen2.5-VL vision tower.
RULES: tuple[tuple[str, str, str | None], ...] = LM_RULES + (
    ("visual.patch_embed.proj.weight", "visual.patch_embed", "conv"),
    *((f"visual.blocks.{{i}}.norm{n}.{s}", f"visual.blocks.norm{n}_{s[0]}", None)
      for n in "12" for s in ("weight", "bias")),
    *((f"visual.blocks.{{i}}.attn.{p}.weight", f"visual.blocks.{p}_w", "linear") for p in ("qkv", "proj")),
    *((f"visual.blocks.{{i}}.attn.{p}.bias", f"visual.blocks.{p}_b", None) for p in ("qkv", "proj")),
    *((f"visual.blocks.{{i}}.mlp.{p}.weight", f"visual.blocks.{p.removesuffix('_proj')}_w", "linear")
      for p in ("fc1", "fc2", "gate_proj", "up_proj", "down_proj")),
    *((f"visual.blocks.{{i}}.mlp.{p}.bias", f"visual.blocks.{p.removesuffix('_proj')}_b", None)
      for p in ("fc1", "fc2", "gate_proj", "up_proj", "down_proj")),
    ("visual.merger.ln_q.weight", "visual.merger_norm_w", None),
    ("visual.merger.ln_q.bias", "visual.merger_norm_b", None),
    ("visual.merger.mlp.0.weight", "visual.merger_fc1_w", "linear"),
    ("visual.merger.mlp.0.bias", "visual.merger_fc1_b", None),
    ("visual.merger.mlp.2.weight", "visual.merger_fc2_w", "linear"),
    ("visual.merger.mlp.2.bias", "visual.merger_fc2_b", None),
)

# Qwen3-VL, in the same legacy-prefix form: Qwen2's decoder keys without q/k/v biases plus the q/k
# norms; Qwen2-VL's block norms and attention; its own patch bias, position table, MLP, merger and
# DeepStack mergers (stacked on their list index).
QWEN3_VL_RULES: tuple[tuple[str, str, str | None], ...] = (
    *(r for r in RULES if r[1].startswith("language.") and not r[1].endswith(("q_b", "k_b", "v_b"))),
    *((f"model.layers.{{i}}.self_attn.{p}_norm.weight", f"language.layers.{p}_norm", None) for p in "qk"),
    *(r for r in RULES
      if r[0].startswith(("visual.patch_embed.", "visual.blocks.{i}.norm", "visual.blocks.{i}.attn."))),
    ("visual.patch_embed.proj.bias", "visual.patch_embed_b", None),
    ("visual.pos_embed.weight", "visual.pos_embed", None),
    *((f"visual.blocks.{{i}}.mlp.linear_{p}.weight", f"visual.blocks.{p}_w", "linear") for p in ("fc1", "fc2")),
    *((f"visual.blocks.{{i}}.mlp.linear_{p}.bias", f"visual.blocks.{p}_b", None) for p in ("fc1", "fc2")),
    *((f"visual.merger.norm.{s}", f"visual.merger_norm_{s[0]}", None) for s in ("weight", "bias")),
    *((f"visual.merger.linear_{p}.weight", f"visual.merger_{p}_w", "linear") for p in ("fc1", "fc2")),
    *((f"visual.merger.linear_{p}.bias", f"visual.merger_{p}_b", None) for p in ("fc1", "fc2")),
    *((f"visual.deepstack_merger_list.{{i}}.norm.{s}", f"visual.deepstack_norm_{s[0]}", None)
      for s in ("weight", "bias")),
    *((f"visual.deepstack_merger_list.{{i}}.linear_{p}.weight", f"visual.deepstack_{p}_w", "linear")
      for p in ("fc1", "fc2")),
    *((f"visual.deepstack_merger_list.{{i}}.linear_{p}.bias", f"visual.deepstack_{p}_b", None)
      for p in ("fc1", "fc2")),
)


def _rename_prefix(key: str, prefixes: tuple[tuple[str, str], ...]) -> str:
    """`key` with the first matching (old, new) prefix of `prefixes` replaced."""
    for old, new in prefixes:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def template_pattern(template: str) -> str:
    """A key template ("...layers.{i}.mlp.down_proj.weight") as a regex whose group 1 is the layer index."""
    return re.escape(template).replace(r"\{i\}", r"(\d+)")


class WeightTable:
    """One family's checkpoint names: `rules` in the layout export writes; `in_memory`, (rules' prefix,
    transformers 5.x module prefix) renames, first match wins, giving the names of the modules transformers
    builds (its `state_dict()`, and so peft, use them); and `prefixes`, (other layout's prefix, the written
    layout's) pairs applied in order after the in-memory names' own, so that every layout transformers reads
    loads."""

    def __init__(self, rules, prefixes=(), on_disk=(), in_memory=()):
        self.rules = tuple(rules)
        self.prefixes = tuple((new, old) for old, new in in_memory) + tuple(prefixes)
        self._compiled = [(re.compile("^" + template_pattern(t) + "$"), p, k) for t, p, k in self.rules]
        # export's names: the rules' templates with `on_disk` (rules' prefix, written prefix) renames
        self.by_path = {p: (_rename_prefix(t, tuple(on_disk)), k) for t, p, k in self.rules}
        # parameter path -> its key template in transformers' in-memory model
        self.in_memory = {p: _rename_prefix(t, tuple(in_memory)) for t, p, _ in self.rules}

    def normalize_key(self, key: str) -> str:
        for other, written in self.prefixes:
            if key.startswith(other):
                key = written + key[len(other):]
        return key

    def match(self, hf_key: str) -> tuple[str, int | None, str | None] | None:
        """HF key -> (parameter path, layer index or None, layout), or None when no rule matches."""
        key = self.normalize_key(hf_key)
        for regex, path, layout in self._compiled:
            m = regex.match(key)
            if m:
                return path, (int(m.group(1)) if m.groups() else None), layout
        return None


# The legacy layout the table is written in -> transformers 5.x's in-memory (and new on-disk) names.
_LEGACY_TO_NEW = (("model.", "model.language_model."), ("visual.", "model.visual."))
QWEN_VL_WEIGHTS = WeightTable(RULES, in_memory=_LEGACY_TO_NEW)
# transformers writes the legacy layout for Qwen2/2.5-VL and the new one for Qwen3-VL (models.md 2.4).
QWEN3_VL_WEIGHTS = WeightTable(QWEN3_VL_RULES, on_disk=_LEGACY_TO_NEW, in_memory=_LEGACY_TO_NEW)


def weight_table(config: ModelConfig) -> WeightTable:
    from vrl_jax.models.families import resolve
    return resolve(config.model_type, "weights")


def normalize_key(key: str) -> str:
    return QWEN_VL_WEIGHTS.normalize_key(key)


def match(hf_key: str, model_type: str = "qwen2_vl") -> tuple[str, int | None, str | None] | None:
    """HF key of a `model_type` checkpoint -> (parameter path, layer index or None, layout), or None."""
    from vrl_jax.models.families import resolve
    return resolve(model_type, "weights").match(hf_key)


def to_jax_layout(arr: np.ndarray, layout: str | None) -> np.ndarray:
    if layout == "linear":
        return arr.T
    if layout == "conv":  # Conv3d [out, C, T, P, P] with stride = kernel is a matmul on flattened patches
        return arr.reshape(arr.shape[0], -1).T
    return arr


def to_hf_layout(arr: np.ndarray, layout: str | None, hf_shape: tuple[int, ...] | None = None) -> np.ndarray:
    if layout == "linear":
        return np.ascontiguousarray(arr.T)
    if layout == "conv":
        return np.ascontiguousarray(arr.T).reshape(hf_shape)
    return arr


def abstract_model(config: ModelConfig, dtype=jnp.float32, param_dtype=jnp.float32, lora=None,
                   quantize: str = "none"):
    """The model's graph and parameter shapes, with no parameter allocated; with `lora` (a
    `lora.LoraConfig`), its adapters too, and with `quantize` ("int8", "nf4") the language model's
    projections stored quantized (`models/quantize.py`)."""
    from vrl_jax.models import lora as lora_lib
    from vrl_jax.models import quantize as quantize_lib
    from vrl_jax.models.families import resolve
    cls = resolve(config.model_type, "model")

    def build():
        model = cls(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
        if lora is not None:
            lora_lib.add_adapters(model, lora, jax.random.key(0))
        if quantize != "none":
            layers = model.language.layers
            quantize_lib.quantize_layers(layers, lora_lib.projection_names(layers), quantize)
        return model

    return nnx.split(nnx.eval_shape(build))


def _flat_params(state: nnx.State) -> dict[str, object]:
    return {".".join(str(p) for p in path): leaf for path, leaf in nnx.to_flat_state(state)}


class Target(NamedTuple):
    """Where one HF tensor goes: the vrl_jax parameter, its layer slice (None: the whole parameter), the
    layout, the shape it fills in vrl_jax's layout and the shape HF stores it in."""

    path: str
    layer: int | None
    layout: str | None
    shape: tuple[int, ...]
    hf_shape: tuple[int, ...]


def hf_target(key: str, where: str, config: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> Target | None:
    """The target of HF tensor `key` (read from file `where`) in a model of parameter `shapes`; None for a
    tensor to skip (the lm_head copy of a tied checkpoint). Raises CheckpointError naming the file and key."""
    hit = weight_table(config).match(key)
    if hit is None:
        raise CheckpointError(f"{where}: tensor {key!r} has no counterpart in vrl_jax's "
                              f"{config.model_type} model (unknown key)")
    path, layer, layout = hit
    if path == "language.lm_head" and config.tie_word_embeddings:
        return None  # tied checkpoints may still carry a copy; the embedding is the source of truth
    if path not in shapes:
        raise CheckpointError(f"{where}: tensor {key!r} maps to {path}, which this config "
                              f"({config.model_type}) does not have")
    full = shapes[path]
    want = full[1:] if layer is not None else full
    if layer is not None and layer >= full[0]:
        raise CheckpointError(f"{where}: tensor {key!r} is layer {layer}, but the config has {full[0]} layers")
    if layout == "linear":
        hf_shape = want[::-1]
    elif layout == "conv":
        hf_shape = config.vision.patch_embed_hf_shape
    else:
        hf_shape = want
    return Target(path, layer, layout, tuple(want), tuple(hf_shape))


def check_hf_shape(target: Target, key: str, where: str, stored: tuple[int, ...]) -> None:
    if tuple(stored) != target.hf_shape:
        raise CheckpointError(f"{where}: tensor {key!r} has shape {tuple(stored)}, but the config "
                              f"implies {target.hf_shape} (as stored by HF)")


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter path -> shape of the model `config` describes (nothing allocated)."""
    _, abstract = abstract_model(config)
    return {k: tuple(v.value.shape) for k, v in _flat_params(abstract).items()}


def load_hf_params(directory: str, config: ModelConfig, param_dtype=jnp.float32,
                   shardings: Callable[[str, tuple[int, ...]], jax.sharding.Sharding] | None = None,
                   dtype=jnp.float32) -> QwenVL:
    """Builds a QwenVL from an HF directory's safetensors, streaming tensor by tensor.

    shardings: optional `(param_path, shape) -> Sharding`; each parameter is placed straight into it.
    Raises CheckpointError naming the key on unknown keys, shape mismatches and missing weights.
    """
    graphdef, abstract = abstract_model(config, dtype, param_dtype)
    targets = _flat_params(abstract)
    shapes = {k: tuple(v.value.shape) for k, v in targets.items()}
    buffers: dict[str, np.ndarray] = {}
    filled: dict[str, set] = {}
    values: dict[str, jax.Array] = {}
    for key, file in iterate_tensors(directory):
        target = hf_target(key, file.path, config, shapes)
        if target is None:
            continue
        path, layer, layout, want, _ = target
        full = shapes[path]
        check_hf_shape(target, key, file.path, file.shape(key))
        arr = to_jax_layout(file.get(key), layout)
        np_dtype = np.dtype(targets[path].value.dtype)
        if layer is None:
            buffers[path] = arr.astype(np_dtype)
            filled[path] = {None}
        else:
            buf = buffers.setdefault(path, np.empty(full, np_dtype))
            buf[layer] = arr
            filled.setdefault(path, set()).add(layer)
        if len(filled[path]) == (1 if layer is None else full[0]):
            host = buffers.pop(path)
            values[path] = jax.device_put(host, shardings(path, full)) if shardings else jnp.asarray(host)
    missing = sorted(set(shapes) - set(values))
    if missing:
        details = [f"{p} (layers {sorted(set(range(shapes[p][0])) - filled[p])} missing)" if p in filled else p
                   for p in missing]
        raise CheckpointError(f"{directory}: weights missing for {details}")
    for path, var in targets.items():
        var.value = values[path]
    return nnx.merge(graphdef, abstract)


def to_host(x) -> np.ndarray:
    """A parameter as a NumPy array on this host; one spread over several processes is gathered (every
    process must call this for the same parameter at the same time)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def hf_tensors(model: QwenVL) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF key, array in HF layout) for every parameter, in the key layout transformers writes for
    the model type, one at a time."""
    cfg = model.config
    params = _flat_params(nnx.state(model, nnx.Param))
    by_path = weight_table(cfg).by_path
    conv_shape = cfg.vision.patch_embed_hf_shape
    for path, var in params.items():
        template, layout = by_path[path]
        arr = to_host(var.value)
        if "{i}" not in template:
            yield template, to_hf_layout(arr, layout, conv_shape)
            continue
        for i in range(arr.shape[0]):
            yield template.format(i=i), to_hf_layout(arr[i], layout)
