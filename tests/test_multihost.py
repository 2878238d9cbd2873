"""Two processes on localhost (jax.distributed, CPU, gloo collectives) make the same update as one.

The test writes the inputs to a file, spawns `tests.multihost_worker` twice with a free port and
4 CPU devices each, and compares the gathered result with a single-process, single-device step.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from tests.rl_batches import flat_rows, make_model, make_rollouts, model_config, train_batch
from vrl_jax.rl.logprobs import make_logprob_fn
from vrl_jax.rl.losses import PolicyLossConfig
from vrl_jax.rl.train_state import OptimizerConfig, create_train_state
from vrl_jax.rl.train_step import StepConfig, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 540

# Rows for the host-side share-and-gather check (each process judges its share of a step's rows).
TEXTS = ["Wait, re-check: the side is 4. Answer 16.", "Let me verify: 5 + 7 = 12.", "The angle is 40°.",
         "x = 3, so the area is 12.", "Think again... wait, it is 9.", "The perimeter is 20. 答案"]
CORRECT = np.array([1.0, 1.0, 0.0, 1.0, 0.0, 1.0], np.float32)
VALUES = np.array([0.1, 1 / 3, 2.7, 1e-9, 5.5, 7 / 3], np.float32)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    config = model_config("qwen2_5_vl", tie=False)
    model = make_model(config, seed=0)
    graphdef, _ = nnx.split(model, nnx.Param)
    host = jax.tree.map(np.asarray, jax.device_get(nnx.state(model, nnx.Param).to_pure_dict()))
    rollouts = make_rollouts(config, 16, seed=21)
    logprob_fn = make_logprob_fn(graphdef, chunk_size=256)
    current = flat_rows(logprob_fn(host, train_batch(rollouts, config, 2)).logprobs)
    rs = np.random.RandomState(22)
    old = np.asarray(current) + 0.1 * rs.randn(*current.shape).astype(np.float32) * rollouts["loss_mask"]
    ref = old + 0.1 * rs.randn(*old.shape).astype(np.float32) * rollouts["loss_mask"]
    batch = train_batch(rollouts, config, 2, old, ref)
    opt_cfg = OptimizerConfig(learning_rate=1e-3, total_steps=4, train_connector=True)
    step_cfg = StepConfig(batch_size=16, num_micro=2, chunk_size=256,
                          loss=PolicyLossConfig(kl_coef=0.05, agg_mode="seq_mean_token_mean"))
    with open(tmp_path / "inputs.pkl", "wb") as f:
        pickle.dump(dict(model_config=config, params=host, batch=batch, opt_cfg=opt_cfg, step_cfg=step_cfg,
                         texts=TEXTS, correct=CORRECT, values=VALUES), f)

    port = free_port()
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", str(i), str(port), str(tmp_path), "4",
                               "2,2,2"], cwd=ROOT, env=env, stdout=logs[i], stderr=subprocess.STDOUT)
             for i in range(2)]
    try:
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        codes = None
    for log in logs:
        log.close()
    if codes != [0, 0]:
        tails = [(tmp_path / f"worker{i}.log").read_text()[-3000:] for i in range(2)]
        pytest.fail(f"workers exited with {codes} (None = timeout {TIMEOUT_S}s):\n" + "\n-----\n".join(tails))
    with open(tmp_path / "result.pkl", "rb") as f:
        result = pickle.load(f)
    assert len(result["local_devices"]) == 4

    # One process, one device.
    state, _, _ = create_train_state(nnx.merge(graphdef, jax.tree.map(np.array, host)), opt_cfg, seed=3)
    want_state, want_metrics = make_train_step(graphdef, opt_cfg, step_cfg)(state, batch)
    got_leaves = jax.tree_util.tree_leaves_with_path(result["params"])
    want_leaves = jax.tree.leaves(jax.device_get(want_state.params))
    assert len(got_leaves) == len(want_leaves)
    moved = 0.0
    for (path, got), want, before in zip(got_leaves, want_leaves, jax.tree.leaves(host)):
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=jax.tree_util.keystr(path))
        moved = max(moved, float(np.abs(want - before).max()))
    assert moved > 1e-4  # the update is not trivial
    assert result["metrics"].keys() == want_metrics.keys()
    for key, value in want_metrics.items():
        np.testing.assert_allclose(result["metrics"][key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert result["step"] == 1 and result["skipped"] == 0

    # Rows judged in per-process shares and gathered: every process holds all of them, in order, exactly
    # (texts with non-ASCII characters too; 6 rows split 3 + 3, 3 rows split 2 + 1).
    for n, got in result["pooled"].items():
        assert got["texts"] == TEXTS[:n]
        np.testing.assert_array_equal(got["correct"], CORRECT[:n])
        np.testing.assert_array_equal(got["values"], VALUES[:n])
        assert got["values"].dtype == np.float32
