"""Where a step's time goes: wall-clock phases, and compiling (from JAX's own monitoring events).

Recompilation is the silent cost of a JAX loop: a new prompt length, image size or response width that
falls outside the configured buckets compiles the sampler or the train step again, and shows up only as a
slow step. `CompileWatch` counts lowerings (each one is a miss of JAX's in-memory compilation cache) and
the seconds spent tracing, lowering and compiling, so the trainer can log them per step (`compile/count`,
`time/compile`) beside the phase timings, and a test can assert that nothing compiles after warm-up.
"""

from __future__ import annotations

import contextlib
import threading
import time

import jax
from jax import monitoring

_LOWERED = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # once per in-memory cache miss
_DURATIONS = ("/jax/core/compile/jaxpr_trace_duration", _LOWERED, "/jax/core/compile/backend_compile_duration")


class CompileWatch:
    """Running totals of compilations and compile seconds in this process since it was created.

    `take()` returns (compilations, seconds) since the previous `take()`. One listener is registered per
    watch and stays registered (JAX offers no way to remove one); create one watch per run.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._count = 0
        self._seconds = 0.0
        monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name: str, seconds: float, **_) -> None:
        if name in _DURATIONS:
            with self._lock:
                self._seconds += seconds
                self._count += name == _LOWERED

    def take(self) -> tuple[int, float]:
        with self._lock:
            out = (self._count, self._seconds)
            self._count, self._seconds = 0, 0.0
        return out


class PhaseTimer:
    """Seconds per named phase of one step, summed over repeats (DAPO samples several rounds).

        timer = PhaseTimer()
        with timer("sample"):
            out = jax.block_until_ready(sampler(...))
        timer.seconds  # {"sample": 0.41}

    A phase ends when its block ends; device work still in flight is charged to whichever phase waits
    for it, so phases that hand device arrays on block on them (`block`) to keep the split honest.
    """

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    @staticmethod
    def block(tree):
        """`jax.block_until_ready(tree)`: ends a phase with its device work."""
        return jax.block_until_ready(tree)
