"""Test-wide settings: 8 virtual CPU devices for sharding tests, float32 matmuls for parity."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def session_jax_cache(tmp_path_factory) -> str:
    """One persistent compilation cache for every subprocess run of the session (`python -m vrl_jax.train`,
    the README commands, the experiment worker): a program two modules both run compiles once. Compile
    counts stay honest, since `CompileWatch` counts lowerings, which a persistent-cache hit still does."""
    return str(tmp_path_factory.mktemp("jax_cache"))
