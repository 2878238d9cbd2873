"""Reading and writing safetensors files and sharded HF weight directories, tensor by tensor.

The `safetensors` NumPy reader cannot return bfloat16, so reading parses the header (8-byte length,
JSON, raw data) and memory-maps each tensor with ml_dtypes; nothing is read until a tensor is asked
for, which keeps peak host memory at one tensor. Writing uses `safetensors.numpy`.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from vrl_jax.errors import UserError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be read, with the file (and key) named."""


class MissingWeightsError(UserError, FileNotFoundError):
    """A model directory without the weight files it should hold."""


class SafetensorsFile:
    """Lazy access to the tensors of one .safetensors file."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise CheckpointError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, expected "
                                  "an object of tensors)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = header
        self.data_start = 8 + n
        for key, entry in header.items():
            _check_entry(path, key, entry)
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.data_start + end > size:
            raise CheckpointError(f"{path}: truncated safetensors file: tensors need {self.data_start + end} "
                                  f"bytes, the file has {size}")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def get(self, key: str) -> np.ndarray:
        e = self.entries[key]
        begin, end = e["data_offsets"]
        dtype = np.dtype(_DTYPES[e["dtype"]])
        count = (end - begin) // dtype.itemsize
        arr = np.memmap(self.path, dtype=dtype, mode="r", offset=self.data_start + begin, shape=(count,))
        return arr.reshape(e["shape"])


def _check_entry(path: str, key: str, entry) -> None:
    """A header entry must name a known dtype, a shape and the byte range that shape needs."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
        ok = all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(begin, int) and isinstance(end, int)
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path}: corrupt safetensors header: tensor {key!r} needs dtype, shape and "
                              f"data_offsets [begin, end], got {entry!r}")
    if dtype not in _DTYPES:
        raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype}; expected one of "
                              f"{sorted(_DTYPES)}")
    need = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
    if not 0 <= begin <= end or end - begin != need:
        raise CheckpointError(f"{path}: tensor {key!r} of shape {shape} and dtype {dtype} needs {need} bytes, but its "
                              f"data_offsets [{begin}, {end}] span {end - begin}: the file is damaged or mis-written")


def checkpoint_files(directory: str) -> list[str]:
    """The safetensors files of an HF model directory (from its index when sharded)."""
    if not os.path.isdir(directory):
        raise MissingWeightsError(f"{directory}: not a directory (expected a Hugging Face model directory)")
    index = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a JSON object with a 'weight_map' ({e})") from None
        if not weight_map:
            raise CheckpointError(f"{index}: no 'weight_map'")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(directory, f))]
        if missing:
            raise MissingWeightsError(f"{index} names shard(s) that do not exist: {missing}")
        return [os.path.join(directory, f) for f in files]
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise MissingWeightsError(f"{directory}: no *.safetensors weights (PyTorch .bin checkpoints are not read; "
                                f"convert them with transformers' save_pretrained first)")
    return [os.path.join(directory, f) for f in files]


def iterate_tensors(directory: str) -> Iterator[tuple[str, SafetensorsFile]]:
    """Yields (key, file) for every tensor of the checkpoint; the caller reads with `file.get(key)`."""
    for path in checkpoint_files(directory):
        st = SafetensorsFile(path)
        for key in st.keys():
            yield key, st


def save_sharded(tensors: Iterator[tuple[str, np.ndarray]], directory: str, max_shard_bytes: int = 5 << 30):
    """Writes tensors as HF does: one model.safetensors, or numbered shards plus an index."""
    os.makedirs(directory, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    for key, arr in tensors:
        if sizes[-1] and sizes[-1] + arr.nbytes > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][key] = np.ascontiguousarray(arr)
        sizes[-1] += arr.nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f, indent=2)
