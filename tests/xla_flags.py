"""The XLA flags of every JAX process the tests run, in-process (conftest) and in subprocesses.

LLVM's backend optimisation level 0: XLA's HLO passes (fusion, layout, sharding) run as they do for a
user, only the CPU kernels' machine code is optimised less. The tests' models are tiny, so compiling
dominates their time, and this cuts it by about a third (a smoke run of the training command: 30.6 s ->
21.6 s). Reductions may sum in another order than at the default level; every tolerance the tests
state allows for that. CI's first stage runs the README's main command at the default level.
"""

from __future__ import annotations

FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a test process, with `devices` virtual CPU devices (None: XLA's default, one)."""
    count = "" if devices is None else f"--xla_force_host_platform_device_count={devices} "
    return count + FAST_COMPILE
