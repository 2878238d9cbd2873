"""The grain input pipeline: per-process shards, per-epoch shuffling, decoding, static-size batches.

Training: `MapDataset.source(examples).seed(seed).shuffle()` gives a fresh permutation per epoch;
each process takes the strided slice `[p : per*P : P]` of it (the same `per` for every process, so
all hosts run the same number of steps); batches are cut inside an epoch (`drop_remainder`), and
`repeat` runs the epochs. Everything is a `MapDataset`, so the iterator's grain state (a single
`next_index`) restores an interrupted run exactly, across epoch boundaries too.

Evaluation: no shuffle; the example list is padded to a multiple of `P * batch_size` so every
process gets the same number of full batches and every example is in exactly one of them; padded
slots carry `valid=False`.

A sample whose image fails to decode keeps its slot (the batch size must stay static) but is filled
with a copy of a good sample and marked `valid=False`, and the fault is counted.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import grain
import ml_collections
import numpy as np

from vrl_jax.data.faults import FaultCounter
from vrl_jax.data.formats import Example, SampleFault, load_image
from vrl_jax.data.prompts import PromptTemplate, build_messages, get_template

EncodeFn = Callable[[list[dict]], Any]


class Batch(NamedTuple):
    """One batch of `B` slots.

    Attributes:
      inputs: `encode_fn(examples)`, e.g. `ModelInputs` with static shapes.
      examples: the `B` per-example dicts given to `encode_fn` (see `prepare_example`).
      valid: bool [B]; False for evaluation padding and for samples that failed to load, whose
        slot holds a copy of a good sample so shapes stay static.
      epoch: the epoch this batch belongs to (batches never straddle epochs).
    """

    inputs: Any
    examples: list[dict]
    valid: np.ndarray
    epoch: int


def default_config() -> ml_collections.ConfigDict:
    """Pipeline options; `train_dataset(examples, encode_fn, **cfg)` accepts them as keywords."""
    return ml_collections.ConfigDict({
        "batch_size": 8,
        "seed": 0,
        "num_epochs": None,  # None: repeat forever
        "shuffle": True,
        "template": "maye_cot",
        "max_image_side": 2048,
        "read_threads": 2,
        "prefetch_batches": 4,
        "worker_count": 0,  # >0 needs absl flags parsed and a __main__ guard (grain spawns workers)
    })


# ---------------------------------------------------------------------------------------------
# Static-shape helpers for encode_fn


def pad_to_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= `length`; raises ValueError naming both when none fits."""
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    fitting = [b for b in buckets if b >= length]
    if not fitting:
        raise ValueError(f"length {length} exceeds the largest bucket {max(buckets, default=None)} "
                         f"(buckets: {sorted(buckets)})")
    return min(fitting)


def geometric_buckets(smallest: int, largest: int, factor: int = 2) -> tuple[int, ...]:
    """`smallest, smallest*factor, ...` up to and always including `largest`, e.g. (64, ..., 1024)."""
    if not 0 < smallest <= largest or factor < 2:
        raise ValueError(f"need 0 < smallest <= largest and factor >= 2, got {smallest}, {largest}, {factor}")
    buckets = []
    size = smallest
    while size < largest:
        buckets.append(size)
        size *= factor
    return tuple(buckets + [largest])


def pad_to_length(array: np.ndarray, length: int, *, axis: int = -1, value: Any = 0,
                  left: bool = False) -> np.ndarray:
    """`array` padded with `value` along `axis` to `length` (on the left for prompts)."""
    array = np.asarray(array)
    missing = length - array.shape[axis]
    if missing < 0:
        raise ValueError(f"array of length {array.shape[axis]} along axis {axis} is longer than {length}")
    widths = [(0, 0)] * array.ndim
    widths[axis] = (missing, 0) if left else (0, missing)
    return np.pad(array, widths, constant_values=value)


def train_batches_per_epoch(num_examples: int, batch_size: int, process_count: int = 1) -> int:
    """Batches each process yields per training epoch (every process yields the same number)."""
    return (num_examples // process_count) // batch_size


def eval_num_batches(num_examples: int, batch_size: int, process_count: int = 1) -> int:
    """Batches each process yields for one evaluation pass over `num_examples`."""
    return -(-num_examples // (process_count * batch_size))


# ---------------------------------------------------------------------------------------------
# Per-example preparation and batching


def prepare_example(example: Example, template: PromptTemplate, max_image_side: int | None) -> dict:
    """The per-example dict of CONTRACTS.md: decoded RGB images and the chat messages.

    Returns `{"id", "question", "prompt_messages", "images" (list of PIL RGB), "answer", "solution",
    "hint", "meta", "source"}`; `question` is the dataset's question without the prompt template
    (DyME's `question_wo_prompt`, which its checker and refiner read). Raises `SampleFault` when an
    image cannot be loaded.
    """
    messages = build_messages(example, template)
    images = [load_image(ref, max_image_side) for ref in example.images]
    return {"id": example.id, "question": example.question, "prompt_messages": messages, "images": images,
            "answer": example.answer, "solution": example.solution, "hint": example.hint,
            "meta": dict(example.meta), "source": example.source}


@dataclasses.dataclass(frozen=True)
class _Slot:
    """One batch position: the prepared example, or None for padding or a faulty sample."""

    epoch: int
    example: dict | None


class _PaddedExamples(Sequence):
    """`examples` followed by None up to `length` (evaluation padding)."""

    def __init__(self, examples: Sequence[Example], length: int):
        self._examples = examples
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Example | None:
        return self._examples[index] if index < len(self._examples) else None


class _Prepare:
    """`map_with_index` transform: index within this process's stream -> `_Slot`.

    grain never calls it on None (evaluation padding): those stay None up to the batcher.
    """

    def __init__(self, template: PromptTemplate, max_image_side: int | None, faults: FaultCounter,
                 epoch_length: int):
        self.template = template
        self.max_image_side = max_image_side
        self.faults = faults
        self.epoch_length = epoch_length

    def __call__(self, index: int, example: Example) -> _Slot:
        epoch = index // self.epoch_length
        try:
            prepared = prepare_example(example, self.template, self.max_image_side)
        except SampleFault as fault:
            self.faults.record(fault.kind, example.source or example.id, fault.detail)
            return _Slot(epoch, None)
        self.faults.ok()
        return _Slot(epoch, prepared)


class _Batcher:
    """`batch_fn`: fills empty slots with a good example, then calls `encode_fn`."""

    def __init__(self, encode_fn: EncodeFn, examples: Sequence[Example], template: PromptTemplate,
                 max_image_side: int | None):
        self.encode_fn = encode_fn
        self.examples = examples
        self.template = template
        self.max_image_side = max_image_side
        self._filler: dict | None = None

    def _first_good_example(self) -> dict:
        # Only needed when a whole batch is padding/faulty (e.g. the tail of an evaluation shard).
        if self._filler is None:
            for example in self.examples:
                try:
                    self._filler = prepare_example(example, self.template, self.max_image_side)
                    break
                except SampleFault:
                    continue
            else:
                raise RuntimeError("no example of the dataset could be loaded; see the fault log")
        return self._filler

    def __call__(self, slots: Sequence[_Slot | None]) -> Batch:
        # grain passes padding (None) through `map_with_index` untouched, so a slot may be None.
        prepared = [None if slot is None else slot.example for slot in slots]
        valid = np.array([example is not None for example in prepared], dtype=bool)
        good = [example for example in prepared if example is not None]
        filler = good[0] if good else self._first_good_example()
        examples = [filler if example is None else example for example in prepared]
        epoch = next((slot.epoch for slot in slots if slot is not None), 0)
        return Batch(inputs=self.encode_fn(examples), examples=examples, valid=valid, epoch=epoch)


# ---------------------------------------------------------------------------------------------
# Datasets


def _process_shard(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only when the caller leaves sharding to the running JAX processes

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got process_index={process_index}, "
                         f"process_count={process_count}")
    return process_index, process_count


def _finish(ds: grain.MapDataset, read_threads: int, prefetch_batches: int,
            worker_count: int) -> grain.IterDataset:
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=prefetch_batches))
    if worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it


def train_dataset(
    examples: Sequence[Example],
    encode_fn: EncodeFn,
    *,
    batch_size: int,
    seed: int,
    template: str | PromptTemplate = "maye_cot",
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
    shuffle: bool = True,
    max_image_side: int | None = 2048,
    faults: FaultCounter | None = None,
    read_threads: int = 2,
    prefetch_batches: int = 4,
    worker_count: int = 0,
) -> grain.IterDataset:
    """Training batches of exactly `batch_size`, reshuffled every epoch, for one process.

    `iter(ds)` gives a grain iterator with `get_state()`/`set_state()` (or save it with
    `grain.checkpoint.CheckpointSave` in an orbax CheckpointManager); a restored iterator yields
    the batches an uninterrupted one would. `process_index`/`process_count` default to JAX's.
    Each epoch every process sees `len(examples) // process_count` examples (disjoint across
    processes, a different subset dropped each epoch) cut into `train_batches_per_epoch` batches.
    """
    if not examples:
        raise ValueError("train_dataset: no examples")
    if batch_size < 1:
        raise ValueError(f"train_dataset: batch_size must be >= 1, got {batch_size}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"train_dataset: seed must be in [0, 2**32), got {seed}")
    process_index, process_count = _process_shard(process_index, process_count)
    per_process = len(examples) // process_count
    if per_process < batch_size:
        raise ValueError(f"train_dataset: {len(examples)} examples over {process_count} processes leave "
                         f"{per_process} per process, fewer than batch_size={batch_size}")
    template = get_template(template)
    faults = FaultCounter() if faults is None else faults
    ds = grain.MapDataset.source(examples).seed(seed)
    if shuffle:
        ds = ds.shuffle()
    ds = ds[process_index:per_process * process_count:process_count]
    ds = ds.map_with_index(_Prepare(template, max_image_side, faults, epoch_length=per_process))
    ds = ds.batch(batch_size, drop_remainder=True,
                  batch_fn=_Batcher(encode_fn, examples, template, max_image_side))
    ds = ds.repeat(num_epochs)
    return _finish(ds, read_threads, prefetch_batches, worker_count)


def eval_dataset(
    examples: Sequence[Example],
    encode_fn: EncodeFn,
    *,
    batch_size: int,
    template: str | PromptTemplate = "maye_cot",
    process_index: int | None = None,
    process_count: int | None = None,
    max_image_side: int | None = 2048,
    faults: FaultCounter | None = None,
    read_threads: int = 2,
    prefetch_batches: int = 4,
    worker_count: int = 0,
) -> grain.IterDataset:
    """One evaluation pass in file order: every example in exactly one slot with `valid=True`.

    Process `p` gets examples `p, p + P, ...`; all processes get `eval_num_batches` batches.
    """
    if not examples:
        raise ValueError("eval_dataset: no examples")
    if batch_size < 1:
        raise ValueError(f"eval_dataset: batch_size must be >= 1, got {batch_size}")
    process_index, process_count = _process_shard(process_index, process_count)
    template = get_template(template)
    faults = FaultCounter() if faults is None else faults
    per_process = eval_num_batches(len(examples), batch_size, process_count) * batch_size
    padded = _PaddedExamples(examples, per_process * process_count)
    ds = grain.MapDataset.source(padded)[process_index::process_count]
    ds = ds.map_with_index(_Prepare(template, max_image_side, faults, epoch_length=per_process))
    ds = ds.batch(batch_size, drop_remainder=True,
                  batch_fn=_Batcher(encode_fn, examples, template, max_image_side))
    return _finish(ds, read_threads, prefetch_batches, worker_count)
