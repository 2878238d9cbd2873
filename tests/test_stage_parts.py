"""What each stage trains (`sft.train_*` beside `optim.train_*`): an SFT stage that trains the vision tower
of a from-scratch model, then RL on the language model alone (MAYE's F / F / T). The tower SFT trained must
reach every RL checkpoint, the export and a resumed run; RL must leave it as SFT left it."""

from __future__ import annotations

import os
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from safetensors.numpy import load_file

from vrl_jax import configs
from vrl_jax.configs import ConfigValidationError
from tests import test_train_e2e as e2e

# SFT trains everything; RL the language model only.
PARTS = ("--config.optim.train_vit=False", "--config.optim.train_connector=False",
         "--config.sft.train_vit=True", "--config.sft.train_connector=True")
# 2 SFT steps, then 3 RL steps; every step's checkpoint kept. On the CPU host split into two devices (the
# option a user sets): an RL checkpoint restores into RL's optimizer shapes on a mesh too.
RUN = ("--config.rl_steps=3", "--config.checkpoint.keep=10", "--config.mesh.cpu_devices=2", *PARTS)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(session_jax_cache):
    e2e.CACHE["dir"] = session_jax_cache
    yield


def test_stage_parts_default_to_the_optimizer_s_and_a_checkpoint_holds_their_union():
    c = configs.base_config()
    c.sft.steps = 10
    c.optim.train_vit, c.optim.train_connector, c.optim.train_llm = False, False, True
    assert configs.trained_parts(c, "sft") == configs.trained_parts(c, "rl") == configs.trained_parts(c, "any")
    c.sft.train_vit = True
    assert configs.trained_parts(c, "sft") == {"train_vit": True, "train_connector": False, "train_llm": True}
    assert configs.trained_parts(c, "rl") == {"train_vit": False, "train_connector": False, "train_llm": True}
    assert configs.trained_parts(c, "any") == {"train_vit": True, "train_connector": False, "train_llm": True}
    assert configs.optimizer_config(c, 1, stage="sft").train_vit and not configs.optimizer_config(c, 1).train_vit
    c.sft.steps = 0  # no SFT stage: its flags train nothing, so checkpoints hold RL's parts only
    assert configs.trained_parts(c, "any") == configs.trained_parts(c, "rl")


def test_an_sft_stage_that_trains_nothing_is_a_config_error():
    c = configs.base_config()
    c.sft.steps = 10
    c.sft.train_vit, c.sft.train_connector, c.sft.train_llm = False, False, False
    with pytest.raises(ConfigValidationError, match=r"sft\.train_llm"):
        configs.validate(c)


def _state_params(workdir, step) -> dict:
    with ocp.PyTreeCheckpointer() as ckpt:
        state = ckpt.restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    return traverse_util.flatten_dict(state["params"], sep=".")


def test_rl_freezes_the_tower_sft_trained_and_a_resume_from_an_rl_checkpoint_equals_the_whole_run(tmp_path):
    full = str(tmp_path / "full")
    out = e2e.run_train(full, *RUN)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "devices: 2 cpu (mesh data=2 fsdp=1 tensor=1)" in out.stdout

    # The vision tower: trained by SFT (step 2 differs from the random model), frozen in RL (steps 3-5 equal 2),
    # and exported as SFT left it; the language model moves in RL.
    sft_end, last = _state_params(full, 2), _state_params(full, 5)
    initial = load_file(os.path.join(full, "model", "model.safetensors"))
    exported = load_file(os.path.join(full, "export", "model.safetensors"))
    tower = [k for k in sft_end if k.startswith("visual.") and k.endswith("_w")]
    assert tower and all(k in last for k in tower), "RL checkpoints must keep the tower that only SFT trained"
    for k in tower:
        np.testing.assert_array_equal(np.asarray(last[k]), np.asarray(sft_end[k]), err_msg=k)
    for layer in range(len(np.asarray(sft_end["visual.blocks.norm1_w"]))):
        hf = f"visual.blocks.{layer}.norm1.weight"
        assert not np.array_equal(exported[hf], initial[hf]), "SFT did not train the vision tower"
        np.testing.assert_array_equal(exported[hf], np.asarray(sft_end["visual.blocks.norm1_w"])[layer])
    llm = next(k for k in last if k.startswith("language.") and k.endswith("q_w"))
    assert not np.array_equal(np.asarray(last[llm]), np.asarray(sft_end[llm])), "RL did not train the LLM"

    # Resume from the first RL checkpoint (step 3: RL's optimizer state, which has no moments for the tower),
    # on the same mesh.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(full, resumed)
    for step in (4, 5):
        shutil.rmtree(os.path.join(resumed, "checkpoints", str(step)))
    out = e2e.run_train(resumed, *RUN)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"resumed {resumed} at step 3 (rl)" in out.stdout
    assert e2e.rows(resumed) == e2e.rows(full)
    assert e2e.rows(resumed, "eval") == e2e.rows(full, "eval")
