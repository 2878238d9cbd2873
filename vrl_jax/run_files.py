"""What a run keeps in its workdir besides checkpoints and metrics: `config.json` (the recorded config a
resumed run is checked against) and `reference/` (RL's KL reference, the policy RL starts from). Local
directories and buckets alike (`etils.epath`); in a multi-host run every process takes part in saving and
loading the reference (orbax writes and reads each process's shards)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx

from vrl_jax import sharding
from vrl_jax.run_setup import RunSetup
from vrl_jax.storage import write_text_atomic

REFERENCE_DIR = "reference"


def save_reference(setup: RunSetup, params, workdir: str):
    """RL's KL reference is the policy RL starts from: after an SFT stage, its result. It is written to
    `workdir/reference` (a vrl_jax model directory; every process writes its shards) so that a resumed
    run measures KL against it too."""
    from vrl_jax.models.loading import save_orbax
    ref = jax.tree.map(jnp.copy, params)
    save_orbax(nnx.merge(setup.graphdef, ref), os.path.join(workdir, REFERENCE_DIR), source_dir=setup.model_dir)
    return ref


def load_reference(c, setup: RunSetup, workdir: str, mesh=None):
    """The reference `save_reference` wrote (the run's own model config; each process reads its shards)."""
    from vrl_jax.models.config import ModelConfig
    from vrl_jax.models.loading import load_orbax
    model = load_orbax(os.path.join(workdir, REFERENCE_DIR), ModelConfig.from_pretrained(setup.model_dir),
                       dtype=jnp.dtype(c.model.dtype), param_dtype=jnp.dtype(c.model.param_dtype),
                       shardings=None if mesh is None else sharding.param_sharding_fn(mesh))
    return nnx.split(model, nnx.Param)[1].to_pure_dict()


def write_config(workdir: str, config: dict) -> None:
    """`workdir/config.json`, replaced atomically: a full disk leaves the previous one, not half a file."""
    write_text_atomic(epath.Path(workdir) / "config.json", json.dumps(config, indent=2, default=str))


def read_config(workdir: str) -> dict | None:
    try:
        return json.loads((epath.Path(workdir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
