"""Damaged and unfinished checkpoints in a checkpoint directory, local or in a bucket (through etils.epath).

Damage: a step whose files were cut short or lost after it was written (a truncated tensor file, a missing
`_METADATA` or data-state file) is not restorable. `Checkpointer.restore_latest_intact` then resumes from
the newest intact step and sets the damaged ones aside as `damaged_step_<N>` (`set_aside`: kept, never
deleted; orbax ignores them), saying which and why.

Unfinished: a save that failed (a full disk) or was killed leaves a step orbax does not list, in orbax's
form for the place: on a local disk `<step>.orbax-checkpoint-tmp-<time>`, renamed when complete; in a
bucket, where a rename is a copy, `<step>/` written in place, complete once it holds `commit_success.txt`.
`discard_unfinished` removes them with orbax's own test for each form.

In a bucket, `set_aside` copies the step's objects to the new name and deletes the old ones: a process
killed meanwhile leaves both names (the step is then found damaged again and set aside under a new name,
`damaged_step_<N>.1`); nothing is lost.
"""
from __future__ import annotations

import time
from typing import NamedTuple

from etils import epath
from orbax.checkpoint import path as ocp_path

from vrl_jax.errors import UserError

DAMAGED_PREFIX = "damaged_step_"


class DamagedCheckpointError(UserError):
    """A step directory that cannot be restored (files cut short or missing)."""


class Damaged(NamedTuple):
    """A step that could not be restored: why, and where it was set aside (None if it was not moved)."""

    step: int
    reason: str
    set_aside_as: str | None = None


def check_complete(step_dir: epath.Path, needed: list[str]) -> None:
    """Raises DamagedCheckpointError naming the files of `needed` (relative to `step_dir`) that are missing."""
    missing = [name for name in needed if not (step_dir / name).exists()]
    if missing:
        raise DamagedCheckpointError(f"{step_dir} lacks {', '.join(missing)}")


def set_aside(directory: epath.Path, step: int) -> epath.Path:
    """Renames `directory/<step>` to `damaged_step_<step>` (or `.1`, `.2`, ... when taken); returns the new path."""
    target, n = directory / f"{DAMAGED_PREFIX}{step}", 1
    while target.exists():
        target, n = directory / f"{DAMAGED_PREFIX}{step}.{n}", n + 1
    (directory / str(step)).rename(target)
    return target


def discard_unfinished(directory: epath.Path, settle_s: float = 1.0, give_up_s: float = 15.0) -> list[str]:
    """Deletes the steps in `directory` that orbax counts as unfinished (see the module docstring); returns
    the names removed. One that cannot be removed (a read-only disk) is left and not named.

    When a save fails, orbax reports the first failed write while tensorstore may still be writing other
    chunks of the same step; such a write can make the deletion fail ("directory not empty") or put a
    file back after it. So the directory is swept until it has stayed clean for `settle_s` seconds, for
    at most `give_up_s`."""
    removed: set[str] = set()
    clean_since = start = time.monotonic()
    while True:
        left = False
        for tmp in ocp_path.step.all_temporary_paths(directory):
            path = tmp.get()
            try:
                path.rmtree()
                removed.add(path.name)
            except OSError:
                left = True
            clean_since = time.monotonic()
        now = time.monotonic()
        if now - clean_since >= settle_s or now - start >= give_up_s:
            break
        time.sleep(0.1 if left else 0.2)
    return sorted(name for name in removed if not (directory / name).exists())
