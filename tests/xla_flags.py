"""The XLA flags of every JAX process the tests run, in-process (conftest) and in subprocesses.

LLVM's backend optimisation level 0: XLA's HLO passes (fusion, layout, sharding) run as they do for a
user, only the CPU kernels' machine code is optimised less. The tests' models are tiny, so compiling
dominates their time, and this cuts it by about a third (a smoke run of the training command: 30.6 s ->
21.6 s). Reductions may sum in another order than at the default level; every tolerance the tests
state allows for that. CI's first stage runs the README's main command at the default level.

XLA:CPU's legacy elemental emitters instead of its MLIR fusion emitters (`--xla_cpu_use_fusion_emitters=false`):
the same HLO fusions, lowered by the older code generator, which compiles these programs in about half the
time (a smoke run's compiling, summed: 32.0 s -> 19.2 s; its two train steps 8.2 and 6.9 s -> 3.9 and 3.5 s)
and runs them somewhat slower (that run's GRPO step 0.39 -> 0.53 s), which is the right trade where nearly
every second is compiling. That run's metrics rows were equal to the default emitters' within 6e-8 relative.
"""

from __future__ import annotations

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a test process, with `devices` virtual CPU devices (None: XLA's default, one)."""
    count = "" if devices is None else f"--xla_force_host_platform_device_count={devices} "
    return count + FAST_COMPILE
