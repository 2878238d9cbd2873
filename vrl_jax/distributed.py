"""One program on every host: joining the processes of a multi-host run, and the few host-level
collectives the loop needs.

`initialize` runs first in `python -m vrl_jax.train`, before anything asks JAX for its devices:
  - JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID set
    (all three; the config's `distributed.*` keys fill in what the environment leaves out): join them.
    This is how a GPU cluster without SLURM, or several processes on one laptop, run the README command
    unchanged, every process with the same --workdir.
  - under SLURM with more than one task, or on a Cloud TPU VM (libtpu installed): let JAX detect the
    cluster (`jax.distributed.initialize()` with no arguments).
  - otherwise: one process, nothing to join.

The loop's contract across processes (see `trainer.py`): every process builds the same global host
batch from the same seed (prompts, decoded images, shape buckets), so no two hosts can disagree on a
shape, while each image's pixels are preprocessed only by the hosts whose devices hold its rows
(`image_processing.DeferredPatches`);
device work (sampling, the reference forward, the update, evaluation) runs once over the global mesh,
each device on its shard; host work that costs (judging rewards, DyME's checker and refiner) is split
into per-process shares (`share`) and the results gathered (`gather_rows`) so every process again
holds the same values. Only process 0 writes logs and reports.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np

from vrl_jax.errors import UserError

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


@dataclasses.dataclass(frozen=True)
class JoinSpec:
    """How this process joins the others: `how` is "none", "explicit" (the three values below) or
    "auto" (JAX detects the cluster: SLURM, Cloud TPU)."""

    how: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _int(value, name: str) -> int | None:
    if value in (None, "", -1):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"{name}={value!r}: expected an integer") from None


def join_spec(environ: dict | None = None, coordinator_address: str = "", num_processes: int = -1,
              process_id: int = -1, auto: bool = True) -> JoinSpec:
    """Decides how to join from the environment and the config's `distributed` keys (the environment
    wins where both are set). Raises UserError naming what is missing when only some are given."""
    env = os.environ if environ is None else environ
    address = env.get(ENV[0]) or coordinator_address or None
    count = _int(env.get(ENV[1]), ENV[1]) if env.get(ENV[1]) else _int(num_processes, "config.distributed.num_processes")
    pid = _int(env.get(ENV[2]), ENV[2]) if env.get(ENV[2]) else _int(process_id, "config.distributed.process_id")
    given = {"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": count, "JAX_PROCESS_ID": pid}
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise UserError(f"joining a multi-process run needs {', '.join(ENV)} (or config.distributed."
                            f"coordinator_address / num_processes / process_id); missing: {', '.join(missing)}")
        if count < 1 or not 0 <= pid < count:
            raise UserError(f"JAX_PROCESS_ID={pid} with JAX_NUM_PROCESSES={count}: expected 0 <= process id < "
                            "number of processes")
        if ":" not in address:
            raise UserError(f"JAX_COORDINATOR_ADDRESS={address!r}: expected host:port of process 0, e.g. "
                            "10.0.0.1:1234")
        return JoinSpec("explicit", address, count, pid)
    if not auto:
        return JoinSpec("none")
    slurm_tasks = _int(env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS"), "SLURM_NTASKS")
    if slurm_tasks and slurm_tasks > 1:
        return JoinSpec("auto")
    if importlib.util.find_spec("libtpu") is not None and env.get("VRL_JAX_SINGLE_PROCESS") != "1":
        return JoinSpec("auto")  # a Cloud TPU VM: a single-host one joins a 1-process "cluster"
    return JoinSpec("none")


HOST_DEVICE_COUNT = "--xla_force_host_platform_device_count"


def split_cpu_host(config=None, environ: dict | None = None) -> int | None:
    """Sets XLA's host platform device count to the config's `mesh.cpu_devices` (when above 1 and XLA_FLAGS
    does not set it already), so that a run on a CPU backend has that many devices: XLA:CPU runs each
    device's program on its own thread, and a decode step's small GEMMs on one core per device. The count
    applies to the CPU backend only; a GPU or TPU run is unaffected. Call before JAX starts its backends.
    Returns the count set, or None."""
    environ = os.environ if environ is None else environ
    count = config.mesh.get("cpu_devices", 1) if config is not None and "mesh" in config else 1
    flags = environ.get("XLA_FLAGS", "")
    if count <= 1 or HOST_DEVICE_COUNT in flags:
        return None
    environ["XLA_FLAGS"] = f"{flags} {HOST_DEVICE_COUNT}={count}".strip()
    return count


def cache_off_on_split_host() -> bool:
    """Turns JAX's persistent compilation cache off when the CPU backend holds several devices (the host split
    by `mesh.cpu_devices` or by XLA_FLAGS). XLA:CPU runs their collectives in-process, and an executable with
    collectives that is *loaded* from the cache deadlocks intermittently: its devices wait at different
    collectives of one execution (the reference log-prob program: an all-gather in the vision tower's layer
    loop on one device, the all-reduce after that loop on the other) until XLA aborts after 40 s. Measured on
    2 cores with another process busy on one: smoke runs on two devices that loaded their programs from a
    warm cache hung in 11 of 26 (resumed or not), runs that compiled their own in 0 of 10. A restarted
    split-host run therefore compiles again (tens of seconds); accelerators keep the cache. Call after JAX
    has its backend. Returns True when it turned the cache off."""
    if jax.default_backend() != "cpu" or jax.local_device_count() < 2:
        return False
    jax.config.update("jax_enable_compilation_cache", False)
    return True


_JOINED: list[JoinSpec] = []


def initialize(config=None, environ: dict | None = None) -> JoinSpec:
    """Joins the run's processes (see the module docstring); call once, before JAX starts its backends.
    `config` is the run's ConfigDict (its `distributed` section) or None."""
    if _JOINED:
        return _JOINED[0]
    d = config.distributed if config is not None and "distributed" in config else None
    spec = join_spec(environ, coordinator_address=d.coordinator_address if d else "",
                     num_processes=d.num_processes if d else -1, process_id=d.process_id if d else -1,
                     auto=d.auto if d else True)
    if spec.how == "explicit":
        jax.distributed.initialize(spec.coordinator_address, spec.num_processes, spec.process_id,
                                   initialization_timeout=d.timeout_s if d else 300)
    elif spec.how == "auto":
        jax.distributed.initialize()
    _JOINED.append(spec)
    return spec


# ---- host-level collectives --------------------------------------------------------------------


def is_main() -> bool:
    """Process 0: the one that writes logs, reports and shared setup files."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def once(name: str, make: Callable[[], Any], done: Callable[[], bool]) -> None:
    """A setup artefact (generated data, the tiny model) written once: process 0 makes it, the others wait
    for it; a process that still does not see it afterwards (a workdir on a disk the hosts do not share)
    makes its own copy, which is the same since `make` is deterministic."""
    if is_main() and not done():
        make()
    barrier(f"vrl_jax:{name}")
    if not done():
        make()


def share(num_items: int, process_index: int | None = None, process_count: int | None = None) -> slice:
    """This process's contiguous share of `num_items` items (the first shares one item larger)."""
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    base, extra = divmod(num_items, n)
    start = p * base + min(p, extra)
    return slice(start, start + base + (p < extra))


def gather_rows(local: dict[str, np.ndarray], num_items: int) -> dict[str, np.ndarray]:
    """Per-process `share`s of row arrays ({name: [share, ...]}) -> the full arrays [num_items, ...] on
    every process, in row order. The identity with one process."""
    if jax.process_count() == 1:
        return {k: np.asarray(v) for k, v in local.items()}
    from jax.experimental import multihost_utils
    size = share(num_items, 0).stop  # the largest share: every process sends that many rows
    padded = {}
    for k, v in local.items():
        v = np.asarray(v)
        if v.dtype == np.float64:
            v = v.astype(np.float32)  # process_allgather carries 32-bit types (x64 off)
        padded[k] = np.concatenate([v, np.zeros((size - len(v),) + v.shape[1:], v.dtype)]) if len(v) < size else v
    gathered = multihost_utils.process_allgather(padded)  # each [P, size, ...]
    return {k: np.concatenate([np.asarray(g[p])[:len(range(num_items)[share(num_items, p)])]
                               for p in range(jax.process_count())]) for k, g in gathered.items()}


def gather_texts(local: Sequence[str], num_items: int) -> list[str]:
    """Per-process shares of strings -> every string on every process, in order (as UTF-8 bytes)."""
    if jax.process_count() == 1:
        return list(local)
    encoded = [s.encode() for s in local]
    width = int(max_over_processes(max((len(b) for b in encoded), default=0)))
    codes = np.zeros((len(encoded), max(width, 1)), np.uint8)
    lengths = np.array([len(b) for b in encoded], np.int32)
    for i, b in enumerate(encoded):
        codes[i, :len(b)] = np.frombuffer(b, np.uint8)
    out = gather_rows({"codes": codes.astype(np.int32), "lengths": lengths}, num_items)
    return [bytes(c[:n].astype(np.uint8)).decode() for c, n in zip(out["codes"], out["lengths"])]


def max_over_processes(value: float) -> float:
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    return float(np.max(multihost_utils.process_allgather(np.float32(value))))
