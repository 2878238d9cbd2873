"""One process of the 2-process CPU job of `test_multihost.py`.

Usage: python -m tests.multihost_worker PROCESS_ID PORT WORK_DIR LOCAL_DEVICES MESH (e.g. "2,2,2").
Reads `inputs.pkl` (host params, a numpy TrainBatch, the configs) from WORK_DIR, runs one train step
on the global mesh, and process 0 writes `result.pkl` (gathered params and metrics).
"""

from __future__ import annotations

import os
import pickle
import sys
import time

from tests.xla_flags import xla_flags

START = time.time()


def log(message: str) -> None:
    print(f"[{time.time() - START:7.1f}s] {message}", flush=True)


def main(process_id: int, port: int, work_dir: str, local_devices: int, mesh_shape: tuple[int, ...]) -> None:
    os.environ["XLA_FLAGS"] = xla_flags(local_devices)
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    # gloo is jax 0.10's default CPU collectives backend; set it explicitly, before initialize.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id,
                               initialization_timeout=120)
    import numpy as np
    from flax import nnx
    from jax.experimental import multihost_utils

    from vrl_jax import sharding as shd
    from vrl_jax.models.weights import abstract_model
    from vrl_jax.rl.train_state import create_train_state, train_state_shardings
    from vrl_jax.rl.train_step import batch_shardings, make_train_step

    log("initialized")
    assert jax.process_count() == 2 and len(jax.devices()) == 2 * local_devices
    with open(os.path.join(work_dir, "inputs.pkl"), "rb") as f:
        inputs = pickle.load(f)
    graphdef, _ = abstract_model(inputs["model_config"])
    model = nnx.merge(graphdef, inputs["params"])  # the exact parameters the test used
    mesh = shd.make_mesh(mesh_shape)
    state, _, graphdef = create_train_state(model, inputs["opt_cfg"], seed=3, mesh=mesh)
    batch = inputs["batch"]
    b_sh = batch_shardings(batch, mesh)
    step = make_train_step(graphdef, inputs["opt_cfg"], inputs["step_cfg"], mesh=mesh,
                           state_shardings=train_state_shardings(state), batch_shardings=b_sh)
    placed = shd.put(batch, b_sh)
    log("state and batch placed")
    new_state, metrics = step(state, placed)
    jax.block_until_ready(new_state)
    log("step done")
    # One resharding program replicates everything; then every process holds full copies.
    outputs = jax.jit(lambda t: t, out_shardings=shd.replicated(mesh))(
        (new_state.params, metrics, (new_state.step, new_state.skipped)))
    params, metrics, counters = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), outputs)
    pooled = pool_host_metrics(inputs["texts"], inputs["correct"], inputs["values"], process_id)
    log("host rows gathered")
    if process_id == 0:
        result = dict(params=jax.tree.map(np.asarray, params), metrics=jax.tree.map(np.asarray, metrics),
                      step=int(counters[0]), skipped=int(counters[1]),
                      local_devices=[d.id for d in jax.local_devices()], pooled=pooled)
        with open(os.path.join(work_dir, "result.pkl.tmp"), "wb") as f:
            pickle.dump(result, f)
        os.replace(os.path.join(work_dir, "result.pkl.tmp"), os.path.join(work_dir, "result.pkl"))
    log("results written")
    multihost_utils.sync_global_devices("done")
    jax.distributed.shutdown()


def pool_host_metrics(texts, correct, values, process_id: int) -> dict:
    """Each process judges its `distributed.share` of the rows (3 of the 6 here, or 2 and 1 of 3) and
    `gather_rows` / `gather_texts` give every process all of them, in row order, exactly."""
    from vrl_jax import distributed

    out = {}
    for n in (len(texts), len(texts) // 2):
        mine = distributed.share(n)
        rows = distributed.gather_rows({"correct": correct[:n][mine], "values": values[:n][mine]}, n)
        out[n] = dict(texts=distributed.gather_texts(texts[:n][mine], n), **rows)
    return out


if __name__ == "__main__":
    pid, port, work_dir, local, mesh = sys.argv[1:6]
    main(int(pid), int(port), work_dir, int(local), tuple(int(x) for x in mesh.split(",")))
