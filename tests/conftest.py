"""Test-wide settings: 8 virtual CPU devices for sharding tests, fast compiling (`tests/xla_flags.py`),
float32 matmuls for parity."""
import os

from tests.xla_flags import xla_flags

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# The files whose runs take longest, longest first. Under pytest-xdist (`-n 2 --dist loadfile
# --no-loadscope-reorder`, the README's test command) a worker takes whole files in collection order, so
# starting with these keeps one long file from running alone at the end while the other worker idles.
HEAVY_FIRST = ("test_multihost_run.py", "test_experiments.py", "test_train_e2e.py", "test_user_errors.py",
               "test_recipe_fidelity.py", "test_lora_run.py", "test_multihost.py",
               "test_cli_commands.py", "test_qwen3_vl.py", "test_memory.py", "test_llava_onevision.py",
               "test_train_step.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise


@pytest.fixture(scope="session")
def session_jax_cache(tmp_path_factory) -> str:
    """One persistent compilation cache for every subprocess run of the session (`python -m vrl_jax.train`,
    the README commands, the experiment worker), shared by the pytest-xdist workers: a program two
    modules both run compiles once. Compile counts stay honest, since `CompileWatch` counts lowerings,
    which a persistent-cache hit still does."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the directory all workers' temporary directories live in
    path = base / "jax_cache"
    path.mkdir(exist_ok=True)
    return str(path)
