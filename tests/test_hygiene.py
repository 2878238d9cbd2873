"""Importing vrl_jax must not initialise a JAX backend (that would fix the platform and device count
before a user's `jax.distributed.initialize` or XLA_FLAGS could take effect)."""

import pkgutil
import subprocess
import sys

import vrl_jax


def test_importing_every_module_initialises_no_backend():
    modules = [m.name for m in pkgutil.walk_packages(vrl_jax.__path__, "vrl_jax.")
               if not m.name.endswith("__main__") and "tfds" not in m.name]
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "from jax._src import xla_bridge\n"
            "print('BACKENDS', sorted(xla_bridge._backends))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "BACKENDS []" in out.stdout, out.stdout
    assert len(modules) > 10
