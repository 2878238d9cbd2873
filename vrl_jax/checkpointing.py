"""Checkpoints of a training run (orbax).

A checkpoint is one orbax step directory `<directory>/<step>/` with three items:
  "state"  the train state pytree (jax arrays, possibly sharded), restored straight into an abstract
           target (`jax.ShapeDtypeStruct`s carrying shardings), so a restore on the same or on a
           different mesh lands in place without a host round trip;
  "data"   the input iterator's state (grain's `get_state()`: a dict for `DatasetIterator`, bytes
           for `DataLoader` iterators), one JSON file per process: every host reads its own shard
           of the data, so every host saves and restores its own position;
  "extra"  a JSON dict from the trainer (epoch accumulators, counters, the step's metrics).
The config fingerprint and the config itself go into orbax's step metadata (`custom_metadata`), next
to the items, so a rerun with another config is refused with the keys that differ.

Atomicity, retention and async writes are orbax's `CheckpointManager`: a step is written under
`<step>.orbax-checkpoint-tmp-<timestamp>` and renamed when complete (on object stores, where rename
is not atomic, a `commit_success.txt` marks completion), so a process killed mid-save leaves a
directory that is never listed as a step; leftovers are deleted when the next manager opens.
Retention is orbax's `preservation_policy`: `AnyPreservationPolicy(LatestN(max_to_keep),
BestN(keep_best))` keeps a checkpoint that either policy keeps, i.e. "the last N plus the best K"
(one checkpoint can be both). A checkpoint saved without metrics is only ever kept as one of the
last N. Saving follows orbax's default decision policy: every `save_interval_steps`-th step, the
first save of a fresh manager, orbax preemption points, and any `force=True` save.

Damage: `restore_latest_intact` resumes from the newest step that restores and sets newer, damaged ones
aside as `damaged_step_<N>`; `discard_unfinished` removes what a failed save leaves behind. What damaged
and unfinished steps look like, on a disk and in a bucket, and how they are moved or removed:
`checkpoint_damage.py`.

Buckets: `directory` may be `gs://bucket/run/checkpoints`. orbax writes there itself (its files through
etils.epath, its arrays through tensorstore's own GCS driver); this module's own reads, listings, renames
and deletions go through etils.epath as well.

Preemption (SIGTERM, TPU maintenance) is `preemption.PreemptionGuard`, re-exported here.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm

from vrl_jax import checkpoint_damage
from vrl_jax.checkpoint_damage import Damaged, DamagedCheckpointError
from vrl_jax.errors import UserError
from vrl_jax.preemption import PreemptionGuard  # noqa: F401 - re-exported
from vrl_jax.storage import is_remote

FINGERPRINT_KEY = "config_fingerprint"  # key in the step's orbax custom_metadata
CONFIG_KEY = "config"  # the config itself, for saying which keys changed
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"  # orbax's per-step metadata (custom_metadata lives there)
_ITEMS = ("state", "data", "extra")


class ConfigMismatchError(UserError, ValueError):
    """The checkpoint was written under a different config fingerprint."""


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs between two nested config dicts (keys dotted)."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif _json_copy(a) != _json_copy(b):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _json_copy(value: Any) -> Any:
    """What the value looks like after a JSON round trip (tuples become lists), for comparing."""
    return json.loads(json.dumps(value, sort_keys=True, default=repr))


class Restored(NamedTuple):
    step: int
    state: Any
    data_state: dict | bytes | None
    extra: dict
    fingerprint: str | None = None


def config_fingerprint(config: Any) -> str:
    """A short stable hash of a config (dataclass, dict, ... anything `json` can print after
    `dataclasses.asdict`); unknown leaf types are hashed by their repr."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    text = json.dumps(config, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """`jax.ShapeDtypeStruct`s for a pytree of arrays, with `shardings` (a matching pytree) or the
    arrays' own shardings: the `abstract_state` that `Checkpointer.restore` fills."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def to_json(value: Any, where: str) -> Any:
    """A fresh JSON-able copy of `value` (so later mutation by the caller cannot leak into an async
    write). numpy / jax scalars become Python numbers, arrays become (nested) lists; dict keys must
    be strings (JSON would silently turn 1 into "1"). Errors name the offending path."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, jax.Array)):
        return np.asarray(value).tolist()
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}; JSON keys must be str")
            out[k] = to_json(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where}: {type(value).__name__} is not JSON-serialisable")


# ---------------------------------------------------------------------------------------------
# "data": the iterator state, one JSON file per process.


class DataStateHandler(ocp.CheckpointHandler):
    """Writes `process_<i>-of-<n>.json` = {"format": "dict"|"bytes"|"none", "state": ...} on every
    process (orbax's JsonCheckpointHandler writes on the primary host only, which would lose the
    other hosts' positions). Bytes are base64 so that any payload survives JSON. Synchronous: the
    file is tiny, and the state is then captured at the moment `save` is called."""

    def save(self, directory: epath.Path, args: DataStateSave):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / _process_file()).write_text(json.dumps(args.envelope))

    def restore(self, directory: epath.Path, args: DataStateRestore | None = None) -> Any:
        path = directory / _process_file()
        if not path.exists():
            found = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
            raise FileNotFoundError(f"no data-iterator state for this process at {path} (found {found}); "
                                    "was the checkpoint written with a different number of processes?")
        return _decode_data_state(json.loads(path.read_text()), str(path))

    def metadata(self, directory: epath.Path) -> None:
        return None

    def structure(self, directory: epath.Path) -> None:
        return None

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    envelope: dict


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


def _process_file() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def _encode_data_state(state: dict | bytes | None) -> dict:
    if state is None:
        return {"format": "none", "state": None}
    if isinstance(state, (bytes, bytearray)):
        return {"format": "bytes", "state": base64.b64encode(bytes(state)).decode("ascii")}
    if isinstance(state, dict):
        return {"format": "dict", "state": to_json(state, "data_state")}
    raise TypeError(f"data_state must be a dict (grain DatasetIterator.get_state()), bytes (grain DataLoader "
                    f"iterator) or None; got {type(state).__name__}")


def _decode_data_state(envelope: dict, where: str) -> dict | bytes | None:
    fmt = envelope.get("format")
    if fmt == "none":
        return None
    if fmt == "bytes":
        return base64.b64decode(envelope["state"])
    if fmt == "dict":
        return envelope["state"]
    raise ValueError(f"{where}: unknown data-state format {fmt!r}")


# ---------------------------------------------------------------------------------------------


class Checkpointer:
    """Saves and restores (state, data iterator state, extra) under `directory` with orbax.

    max_to_keep: the most recent checkpoints kept (None = all).
    best_metric: key of `metrics` (passed to `save`) that ranks checkpoints; None = no ranking.
    best_mode: "max" or "min". keep_best: the best checkpoints kept in addition to the last N.
    save_interval_steps: `save` writes only on multiples of it (plus the first save and `force`).
    async_save: write in a background thread; `save` returns once the arrays are copied to host,
      so the caller may donate / overwrite its buffers right away. `wait()` blocks until written.
    fingerprint: this run's config fingerprint (`config_fingerprint(cfg)`), stored with every save
      and compared on restore; None = neither stored nor checked.
    config: this run's config as a dict, stored with every save, so that a mismatch names the keys.
    """

    def __init__(self, directory: str | epath.PathLike, *, max_to_keep: int | None = 3, best_metric: str | None = None,
                 best_mode: str = "max", keep_best: int = 1, save_interval_steps: int = 1, async_save: bool = True,
                 fingerprint: str | None = None, config: dict | None = None):
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise ValueError(f"Checkpointer: max_to_keep must be a positive int or None; got {max_to_keep!r}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"Checkpointer: best_mode must be 'max' or 'min'; got {best_mode!r}")
        if not isinstance(keep_best, int) or keep_best < 1:
            raise ValueError(f"Checkpointer: keep_best must be a positive int; got {keep_best!r}")
        if not isinstance(save_interval_steps, int) or save_interval_steps < 1:
            raise ValueError(f"Checkpointer: save_interval_steps must be a positive int; got {save_interval_steps!r}")
        path = epath.Path(directory)
        if not is_remote(path):
            path = path.expanduser().resolve()  # orbax wants absolute local paths
        self.directory = path
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.fingerprint = fingerprint
        self.config = None if config is None else _json_copy(config)

        policies: list[Any] = [ocm.LatestN(n=max_to_keep)]
        if best_metric is not None:
            # BestN sorts ascending and keeps the tail; reverse=True for "min" keeps the smallest.
            policies.append(ocm.BestN(get_metric_fn=self._metric_value, reverse=(best_mode == "min"), n=keep_best,
                                      keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            best_fn=self._metric_value if best_metric is not None else None,  # for best_step() and metric writes
            best_mode=best_mode,
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # delete half-written steps left by a killed process
            create=True,
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": DataStateHandler(),
                    "extra": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(path, options=options, item_handlers=handlers)

    def _metric_value(self, metrics: dict) -> float:
        """Ranking value; a missing or NaN metric ranks worst, so it can never evict a real best."""
        worst = -math.inf if self.best_mode == "max" else math.inf
        value = metrics.get(self.best_metric) if isinstance(metrics, dict) else None
        if value is None:
            return worst
        value = float(value)
        return worst if math.isnan(value) else value

    # -- saving ---------------------------------------------------------------------------------

    def save(self, step: int, state: Any, data_state: dict | bytes | None, extra: dict,
             metrics: dict | None = None, force: bool = False) -> bool:
        """Saves if the interval (or `force`) says so; returns whether a save was started. With
        `force`, a step that is already saved is not an error (a preemption right after a regular
        save) and returns False. Arrays must be fully addressable or globally sharded jax arrays."""
        step = int(step)
        if not isinstance(extra, dict):
            raise TypeError(f"extra must be a dict; got {type(extra).__name__}")
        envelope = _encode_data_state(data_state)
        extra = to_json(extra, "extra")
        if metrics is not None:
            if not isinstance(metrics, dict):
                raise TypeError(f"metrics must be a dict or None; got {type(metrics).__name__}")
            metrics = to_json(metrics, "metrics")
            if self.best_metric is not None and self.best_metric not in metrics:
                raise KeyError(f"Checkpointer.save(step={step}): metrics lack best_metric {self.best_metric!r}; "
                               f"got keys {sorted(metrics)}")
        if force and step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=DataStateSave(envelope),
                                  extra=ocp.args.JsonSave(extra))
        custom = {FINGERPRINT_KEY: self.fingerprint} if self.fingerprint is not None else {}
        if self.config is not None:
            custom[CONFIG_KEY] = self.config
        custom = custom or None
        return bool(self._manager.save(step, args=args, metrics=metrics, force=force, custom_metadata=custom))

    def wait(self) -> None:
        """Blocks until every started save is on disk (and old checkpoints are pruned)."""
        self._manager.wait_until_finished()

    # -- listing --------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The best step by `best_metric` among those with metrics; without a best_metric, the
        latest step (orbax's convention)."""
        return self._manager.best_step()

    def step_path(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def reached_preemption(self, step: int) -> bool:
        """True at the step where JAX's preemption sync manager (multi-host TPU maintenance events,
        set up by `jax.distributed.initialize`) asks every host to checkpoint; False elsewhere."""
        return bool(self._manager.reached_preemption(step))

    # -- restoring ------------------------------------------------------------------------------

    def restore(self, step: int | None = None, *, abstract_state: Any, allow_config_change: bool = False) -> Restored:
        """Restores `step` (default: the latest) into `abstract_state`, a pytree of
        `jax.ShapeDtypeStruct`s with shardings (see `abstract_like`): arrays come back with those
        shardings, whatever mesh they were saved from. Shapes must match the saved ones."""
        self.wait()  # a save of this very step may still be in flight
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; available: {steps}")
        path = self.step_path(step)
        saved_fp, saved_config = self._saved_config(step)
        self._check_fingerprint(step, saved_fp, saved_config, allow_config_change)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=DataStateRestore(),
                                  extra=ocp.args.JsonRestore())
        try:
            out = self._manager.restore(step, args=args)
        except (ValueError, KeyError, TypeError) as e:  # orbax's messages do not name the checkpoint
            raise ValueError(f"restoring {path} failed: {type(e).__name__}: {e}") from e
        return Restored(step, out["state"], out["data"], out["extra"], saved_fp)

    def check_config(self, allow_config_change: bool = False, previous: dict | None = None) -> int | None:
        """Before a resume, and before anything slow: compares this run's fingerprint with the newest
        checkpoint whose metadata is readable; raises ConfigMismatchError listing the keys that differ
        (from the config stored with the checkpoint, else from `previous`, e.g. the workdir's config.json).
        Returns that step, or None when there is nothing to resume."""
        for step in reversed(self.all_steps()):
            try:
                saved_fp, saved_config = self._saved_config(step)
            except DamagedCheckpointError:
                continue  # restore_latest_intact says so and falls back
            self._check_fingerprint(step, saved_fp, saved_config or previous, allow_config_change)
            return step
        return None

    def restore_latest_intact(self, abstract_state: Any, allow_config_change: bool = False
                              ) -> tuple[Restored | None, list[Damaged]]:
        """Restores the newest step that restores into `abstract_state` (a pytree, or a function of the step
        giving one: a run whose stages hold different states), and sets every newer (damaged) one aside as
        `damaged_step_<N>` (kept on disk). Returns (restored or None when there is no checkpoint, the
        damaged steps). A config mismatch is not damage: it raises at once. When no step restores,
        nothing is moved and a UserError lists why each failed."""
        self.wait()
        damaged: list[Damaged] = []
        for step in reversed(self.all_steps()):
            try:
                self._check_complete(step)
                template = abstract_state(step) if callable(abstract_state) else abstract_state
                restored = self.restore(step, abstract_state=template, allow_config_change=allow_config_change)
            except ConfigMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - damage shows as tensorstore ValueErrors, missing files, bad JSON
                damaged.append(Damaged(step, " ".join(f"{type(e).__name__}: {e}".split())[:400]))
                continue
            return restored, [d._replace(set_aside_as=str(self.set_aside(d.step))) for d in damaged]
        if damaged:
            reasons = "\n".join(f"  step {d.step}: {d.reason}" for d in damaged)
            raise DamagedCheckpointError(
                f"no checkpoint in {self.directory} can be restored:\n{reasons}\nMove the checkpoints directory "
                "away to start the run over, or restore its files from a backup.")
        return None, []

    def set_aside(self, step: int) -> epath.Path:
        """Renames step `step` to `damaged_step_<step>` (orbax no longer lists it; nothing is deleted)."""
        target = checkpoint_damage.set_aside(self.directory, step)
        self._manager.reload()
        return target

    def discard_unfinished(self) -> list[str]:
        """After a failed save (a full disk, a read-only file system): lets the background save end, then
        deletes the half-written steps, so only complete checkpoints remain. Returns the names removed."""
        try:
            self._manager.wait_until_finished()
        except Exception:  # noqa: BLE001 - the failure itself is reported by whoever called save()
            pass
        return checkpoint_damage.discard_unfinished(self.directory)

    def _saved_config(self, step: int) -> tuple[str | None, dict | None]:
        """(fingerprint, config) stored with `step`, read from orbax's step metadata file alone (reading
        the item metadata would open every tensor file)."""
        path = self.step_path(step) / STEP_METADATA_FILE
        try:
            custom = json.loads(path.read_text()).get("custom_metadata") or {}
        except (OSError, ValueError, AttributeError) as e:
            raise DamagedCheckpointError(f"{path}: cannot read the step metadata ({type(e).__name__}: {e})") from e
        return custom.get(FINGERPRINT_KEY), custom.get(CONFIG_KEY)

    def _check_complete(self, step: int) -> None:
        """Files a restore needs that orbax would only miss deep inside (or not at all: a lost `_METADATA`)."""
        checkpoint_damage.check_complete(self.step_path(step), [STEP_METADATA_FILE, "state/_METADATA",
                                                                f"data/{_process_file()}", "extra/metadata"])

    def _check_fingerprint(self, step: int, saved_fp: str | None, saved_config: dict | None,
                           allow_config_change: bool) -> None:
        if self.fingerprint is None or saved_fp == self.fingerprint or allow_config_change:
            return
        path = self.step_path(step)
        if saved_config is not None and self.config is not None:
            changes = config_diff(saved_config, self.config) or ["(no key differs: the config's format changed)"]
            what = "these keys differ (checkpoint -> this run):\n" + "\n".join(f"  {c}" for c in changes) + "\n"
        else:
            what = f"config fingerprint {saved_fp!r} there, {self.fingerprint!r} here (the keys were not recorded). "
        raise ConfigMismatchError(
            f"checkpoint {path} was written with a different config; {what}Rerun with the checkpoint's config to "
            "resume it, use another workdir for a new run, or resume anyway with the new values: "
            "--allow_config_change on the train command line (allow_config_change=True from Python).")

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Waits for pending saves and releases orbax's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
