"""What a run keeps in its workdir besides metrics: what a checkpoint holds of the train state (`saved_state`)
and the shapes a checkpoint of either stage restores into (`checkpoint_template`),
`config.json` (the recorded config a resumed run is checked against), `reference/` (RL's KL reference after an
SFT stage: the parameters that train, as SFT left them) and the exports at the end (`export/`, a LoRA run's
`adapter/`). Local directories and buckets alike (`etils.epath`); in a multi-host run every process takes part
in saving and loading the reference and in the exports (orbax writes and reads each process's shards)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from vrl_jax import configs
from vrl_jax.models import lora
from vrl_jax.models.lora import is_adapter
from vrl_jax.models.quantize import dequantize_layers
from vrl_jax.rl.train_state import (TrainState, make_optimizer, overlay, pure_params, train_state_shardings,
                                    trainable_params)
from vrl_jax.run_setup import reference_copy
from vrl_jax.storage import is_remote, write_text_atomic

REFERENCE_DIR = "reference"
ADAPTER_DIR = "adapter"  # a LoRA run's PEFT export, beside export/


def saved_state(c, state: TrainState) -> TrainState:
    """What a checkpoint holds: `state` with only the parameters that some stage trains (`optim.train_*`,
    `sft.train_*`; a LoRA run's adapters), so RL's checkpoints keep a vision tower that only SFT trained. The
    frozen ones are the model directory's, loaded again by a resumed run (`restored_state`)."""
    trainable = trainable_params(state.params, configs.optimizer_config(c, 1, stage="any"))
    return state._replace(params=traverse_util.unflatten_dict(trainable, sep="."))


def checkpoint_template(c, state, mesh, stage: str):
    """The abstract `saved_state` a checkpoint of `stage` restores into, from the run's fresh `state` (built
    for the run's first stage). An RL checkpoint of an SFT+RL run holds RL's optimizer moments, which cover
    other parameters than SFT's where `sft.train_*` differ from `optim.train_*`; they are shaped, not built."""
    if stage == "rl" and configs.trained_parts(c, "sft") != configs.trained_parts(c, "rl"):
        cfg = configs.optimizer_config(c, 1, stage="rl")
        state = state._replace(opt_state=jax.eval_shape(make_optimizer(cfg).init, trainable_params(state.params, cfg)))
        # Without a mesh the placed leaves keep their device; the shaped moments go to the first one.
        shardings = (train_state_shardings(state, mesh) if mesh is not None else jax.tree.map(
            lambda x: getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), state))
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        saved_state(c, state))


def restored_state(state: TrainState, saved: TrainState) -> TrainState:
    """A checkpoint's `saved_state` completed with the frozen parameters of `state` (the run's fresh one)."""
    return saved._replace(params=overlay(state.params, traverse_util.flatten_dict(saved.params, sep=".")))


def save_reference(c, params, workdir: str, mesh=None) -> dict:
    """RL's KL reference is the policy RL starts from: after an SFT stage, its result. Its part that differs
    from the policy (`run_setup.reference_copy`: the parameters that train) is written to `workdir/reference`
    (orbax; every process writes its shards), so that a resumed run measures KL against it too."""
    ref = reference_copy(c, params, mesh)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(_reference_dir(workdir), traverse_util.unflatten_dict(ref, sep="."), force=True)
    return ref


def load_reference(c, params, workdir: str, mesh=None) -> dict:
    """The reference `save_reference` wrote, each leaf placed like the parameter of `params` (the run's
    current state) it stands for."""
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, "sharding", None))
              for k, v in trainable_params(params, configs.optimizer_config(c, 1)).items()}
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(_reference_dir(workdir), traverse_util.unflatten_dict(target, sep="."))
    return traverse_util.flatten_dict(restored, sep=".")


def _reference_dir(workdir: str) -> str:
    path = os.path.join(workdir, REFERENCE_DIR)
    return path if is_remote(path) else os.path.abspath(path)  # orbax wants absolute paths


def export_policy(c, model, workdir: str, model_dir: str) -> None:
    """`workdir/export`: the policy as an HF directory; with LoRA, its adapters merged into the weights, and
    `workdir/adapter` the adapters alone, a PEFT directory to load onto the base model `model_dir`, when they
    are all that trained (a vision tower or connector trained beside them is only in export/)."""
    from vrl_jax.models.loading import export_hf
    # QLoRA: the weights the policy computed with, widened back (PEFT's base model is the original, unquantized).
    dequantize_layers(model.language.layers, jnp.dtype(c.model.param_dtype))
    if lora.parts(model):
        from vrl_jax.models.lora_export import export_peft, merge_adapters
        others = [k for k in trainable_params(pure_params(model), configs.optimizer_config(c, 1, stage="any"))
                  if not is_adapter(k)]
        if others:
            print(f"LoRA: no PEFT adapter directory, since parameters other than the adapters trained too "
                  f"({others[0]}, ...); the policy is in {os.path.join(workdir, 'export')}", flush=True)
        else:
            export_peft(model, os.path.join(workdir, ADAPTER_DIR), base_model_name_or_path=model_dir)
        model = merge_adapters(model)
    export_hf(model, os.path.join(workdir, "export"), source_dir=model_dir)


def write_config(workdir: str, config: dict) -> None:
    """`workdir/config.json`, replaced atomically: a full disk leaves the previous one, not half a file."""
    write_text_atomic(epath.Path(workdir) / "config.json", json.dumps(config, indent=2, default=str))


def read_config(workdir: str) -> dict | None:
    try:
        return json.loads((epath.Path(workdir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
