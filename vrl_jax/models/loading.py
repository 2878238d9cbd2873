"""Loading and saving whole models: HF directories and vrl_jax's orbax model directories.

A vrl_jax model directory holds `config.json` (the HF config, unchanged), the tokenizer and
processor files copied from the source, and `params/` (an orbax checkpoint of the parameters).
Either kind of directory loads with `load_model`.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from vrl_jax.errors import UserError
from vrl_jax.storage import is_remote
from vrl_jax.models.config import ModelConfig
from vrl_jax.models.qwen_vl import QwenVL
from vrl_jax.models.safetensors_io import CheckpointError, SafetensorsFile, checkpoint_files, save_sharded
from vrl_jax.models.weights import abstract_model, check_hf_shape, hf_target, hf_tensors, load_hf_params, param_shapes

PARAMS_DIR = "params"
# Files that travel with the weights so a converted directory is self-contained.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
              "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
              "generation_config.json")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # either one makes a loadable tokenizer
ORBAX_METADATA = "_METADATA"  # written last by orbax: without it the parameters cannot be restored

Shardings = Callable[[str, tuple[int, ...]], jax.sharding.Sharding]


def is_orbax_model_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, PARAMS_DIR))


class ModelDirError(UserError, FileNotFoundError):
    """A model directory that is missing or lacks the files a model needs."""


def check_model_dir(path: str) -> ModelConfig:
    """Checks, without reading any weight, that `path` is a model directory vrl_jax loads: config.json of
    a supported model_type, tokenizer files, and weights: safetensors whose headers are intact and whose
    shapes fit the config, or an orbax `params/` checkpoint. Raises a UserError naming the file at fault."""
    if not os.path.isdir(path):
        raise ModelDirError(f"{path}: {'not a directory' if os.path.exists(path) else 'no such directory'}")
    has_weights = is_orbax_model_dir(path) or any(f.endswith(".safetensors") for f in os.listdir(path))
    lacks = [what for what, present in (
        ("config.json", os.path.isfile(os.path.join(path, "config.json"))),
        ("tokenizer files (tokenizer.json or tokenizer_config.json)",
         any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)),
        ("weights (*.safetensors, or params/ written by convert to-orbax)", has_weights)) if not present]
    if lacks:
        raise ModelDirError(f"{path} lacks {', '.join(lacks)}" + (" (the directory is empty)" if not os.listdir(path)
                                                                   else ""))
    config = ModelConfig.from_pretrained(path)
    if is_orbax_model_dir(path):
        if not os.path.isfile(os.path.join(path, PARAMS_DIR, ORBAX_METADATA)):
            raise CheckpointError(f"{os.path.join(path, PARAMS_DIR)}: incomplete orbax checkpoint (no "
                                  f"{ORBAX_METADATA}); convert the model again")
        return config
    shapes = param_shapes(config)
    for file in checkpoint_files(path):
        st = SafetensorsFile(file)  # checks the header and that the file holds every byte it announces
        for key in st.keys():
            target = hf_target(key, file, config, shapes)
            if target is not None:
                check_hf_shape(target, key, file, st.shape(key))
    return config


def load_model(path: str, dtype=jnp.float32, param_dtype=jnp.float32, shardings: Shardings | None = None) -> QwenVL:
    """Loads an HF directory (safetensors) or a vrl_jax orbax model directory."""
    config = ModelConfig.from_pretrained(path)
    if is_orbax_model_dir(path):
        return load_orbax(path, config, dtype, param_dtype, shardings)
    return load_hf_params(path, config, param_dtype=param_dtype, shardings=shardings, dtype=dtype)


def _copy_side_files(source: str | None, out_dir: str, config: ModelConfig, dtype: str | None = None):
    """config.json and the tokenizer/processor files, into a local directory or a bucket (epath)."""
    from etils import epath
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = dict(config.raw)
    if dtype is not None:  # transformers loads in the dtype the config records
        raw["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    if source and os.path.isdir(source):
        for name in SIDE_FILES:
            if os.path.exists(os.path.join(source, name)):
                (out / name).write_bytes(epath.Path(source, name).read_bytes())


def _absolute(path: str) -> str:
    """orbax wants absolute paths; a bucket URI is one already (abspath would make it `<cwd>/gs:/...`)."""
    return path if is_remote(path) else os.path.abspath(path)


def save_orbax(model: QwenVL, out_dir: str, source_dir: str | None = None):
    """Writes a vrl_jax model directory (config, side files, orbax parameters). In a multi-process run
    every process calls it (orbax writes each process's shards); process 0 writes the side files."""
    out_dir = _absolute(out_dir)
    if jax.process_index() == 0:
        _copy_side_files(source_dir, out_dir, model.config)
    state = nnx.state(model, nnx.Param).to_pure_dict()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(out_dir, PARAMS_DIR), state, force=True)


def load_orbax(path: str, config: ModelConfig, dtype=jnp.float32, param_dtype=jnp.float32,
               shardings: Shardings | None = None) -> QwenVL:
    graphdef, abstract = abstract_model(config, dtype, param_dtype)
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # (devices()[0] is process 0's)

    def target(path_tuple, leaf):
        name = ".".join(str(p) for p in path_tuple)
        sharding = shardings(name, tuple(leaf.shape)) if shardings else cpu
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    pure = abstract.to_pure_dict()
    targets = jax.tree_util.tree_map_with_path(lambda p, x: target(tuple(k.key for k in p), x), pure)
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(_absolute(os.path.join(path, PARAMS_DIR)), targets)
    nnx.replace_by_pure_dict(abstract, restored)
    return nnx.merge(graphdef, abstract)


def export_hf(model: QwenVL, out_dir: str, source_dir: str | None = None, max_shard_bytes: int = 5 << 30,
              torch_dtype: str | None = None):
    """Writes an HF directory that `transformers` loads with `from_pretrained` (legacy key layout).
    In a multi-process run every process calls it: the tensors are gathered one by one (a collective)
    and process 0 writes them."""
    tensors = hf_tensors(model)
    if jax.process_index() != 0:
        for _ in tensors:  # take part in each tensor's gather
            pass
        return
    _copy_side_files(source_dir, out_dir, model.config, torch_dtype)
    if torch_dtype is not None:
        np_dtype = np.dtype(jnp.dtype(torch_dtype))
        tensors = ((k, v.astype(np_dtype)) for k, v in tensors)
    write_files(out_dir, lambda directory: save_sharded(tensors, directory, max_shard_bytes))


def write_files(out_dir: str, write: Callable[[str], None]) -> None:
    """Runs `write(directory)` on `out_dir`, or, for a bucket URI, on a temporary local directory whose files
    are then uploaded one by one (safetensors writes local files only)."""
    if not is_remote(out_dir):
        os.makedirs(out_dir, exist_ok=True)
        write(out_dir)
        return
    import tempfile
    from etils import epath
    with tempfile.TemporaryDirectory() as local:
        write(local)
        for name in os.listdir(local):
            (epath.Path(out_dir) / name).write_bytes(epath.Path(local, name).read_bytes())
