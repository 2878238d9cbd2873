"""Pooling host-side counts and sums over the processes of a multi-host run.

Ratios over a run (accuracy, MAYE's reflection ratios) must be taken of pooled counts: the mean of
per-process ratios weights a process with few samples like one with many. Everything here sums
numpy leaves over `jax.process_count()` processes and is the identity on one process.

The gather goes through `multihost_utils.process_allgather`, which carries only JAX's 32-bit types
when x64 is off; int64 counts and float64 sums are therefore sent as their raw bytes viewed as
uint32 words and viewed back after the gather, so the pooled sums are exact (float64 addition in
process order on every process, so every process gets the same result).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from vrl_jax.evaluation.metrics import EpochAccumulator
from vrl_jax.evaluation.reflection import ReflectionCounts


def _to_words(x) -> tuple[np.ndarray, np.dtype, tuple]:
    a = np.asarray(x)  # not ascontiguousarray: it turns 0-d arrays into 1-d ones
    if a.dtype.itemsize % 4:
        a = a.astype(np.int64 if a.dtype.kind in "biu" else np.float64)
    return np.ascontiguousarray(a.reshape(-1)).view(np.uint32), a.dtype, a.shape


def sum_over_processes(tree: Any) -> Any:
    """A pytree of numpy arrays/scalars -> the same structure, each leaf summed over processes
    (bool and small ints come back as int64). Every process must call it with the same structure."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    leaves, treedef = jax.tree.flatten(tree)
    encoded = [_to_words(x) for x in leaves]
    gathered = multihost_utils.process_allgather([w for w, _, _ in encoded])  # each leaf: [P, words]
    out = []
    for (_, dtype, shape), g in zip(encoded, gathered):
        words = np.ascontiguousarray(np.asarray(g, np.uint32))
        per_process = words.view(dtype).reshape((jax.process_count(),) + shape)
        out.append(per_process.sum(axis=0, dtype=dtype))
    return jax.tree.unflatten(treedef, out)


def pool_reflection(counts: ReflectionCounts) -> ReflectionCounts:
    """Reflection counts of every process, added (the words are the same on every process)."""
    return ReflectionCounts.from_array(sum_over_processes(counts.to_array()), counts.words)


def pool_epoch(acc: EpochAccumulator) -> EpochAccumulator:
    """An epoch accumulator holding every process's counts and sums."""
    return EpochAccumulator.from_dict(sum_over_processes(acc.to_dict()))
