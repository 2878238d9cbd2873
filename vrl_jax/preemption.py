"""Preemption: SIGTERM / SIGINT (and JAX's multi-host preemption notices) turned into a flag the trainer
polls once per step (`guard.should_stop(step, checkpointer)`); it then saves with `force=True`, `wait()`s
and exits.
"""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING

import jax
import numpy as np

if TYPE_CHECKING:
    from vrl_jax.checkpointing import Checkpointer


class PreemptionGuard:
    """Turns SIGTERM / SIGINT into a flag the trainer polls once per step.

    The handlers only record the signal: saving from inside a handler would run orbax and JAX at an
    arbitrary bytecode of the main thread. A second SIGINT while a stop is already pending raises
    KeyboardInterrupt, so a stuck run can still be interrupted from the keyboard. Handlers are
    installed on construction (main thread only) and the previous ones restored by `close()` /
    leaving the `with` block.

        with PreemptionGuard() as guard, Checkpointer(dir) as ckpt:
            for step in ...:
                ...
                if guard.should_stop(step, ckpt):
                    ckpt.save(step, state, it.get_state(), extra, force=True); ckpt.wait()
                    raise SystemExit(f"{guard.reason} at step {step}: saved {ckpt.step_path(step)}")
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be created in the main thread (Python delivers signals there)")
        self._signum: int | None = None
        self._elsewhere: str | None = None  # why should_stop said stop when no signal came here
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame):
        if self._signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._signum = signum

    @property
    def requested(self) -> bool:
        """A stop signal arrived on this process."""
        return self._signum is not None

    @property
    def reason(self) -> str | None:
        """"SIGTERM" / "SIGINT" for a local signal, else why `should_stop` stopped, else None."""
        return self._elsewhere if self._signum is None else signal.Signals(self._signum).name

    def should_stop(self, step: int, checkpointer: Checkpointer | None = None) -> bool:
        """Whether to save and exit now. Multi-process: every process must take the same branch
        (the save is collective), so the local flags are OR-ed over processes (one tiny host
        all-gather per call), and orbax's preemption sync point is consulted."""
        stop = self.requested
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            if bool(np.any(multihost_utils.process_allgather(np.int32(stop)))) and not stop:
                stop, self._elsewhere = True, "stop signal on another process"
        if checkpointer is not None and checkpointer.reached_preemption(step):
            if not stop:
                self._elsewhere = "JAX preemption sync point"
            stop = True
        return stop

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __enter__(self) -> PreemptionGuard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
