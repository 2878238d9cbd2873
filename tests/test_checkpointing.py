"""Checkpointer (orbax) and PreemptionGuard: bit-exact round trips (also across meshes), grain
iterator state, retention (last N plus best K), async saves, atomicity, config fingerprints, and a
subprocess that is sent SIGTERM, saves and exits 0."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from vrl_jax.checkpointing import (Checkpointer, ConfigMismatchError, DamagedCheckpointError, PreemptionGuard,
                                   abstract_like, config_diff, config_fingerprint)
from vrl_jax.errors import UserError
from tests.xla_flags import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class State(NamedTuple):
    """Same layout as vrl_jax.rl.train_state.TrainState."""
    params: Any
    opt_state: Any
    step: jax.Array
    skipped: jax.Array
    rng: jax.Array


def make_state(seed: int = 0, mesh=None) -> State:
    """Params (f32 and bf16), an adamw state after one real update (non-zero moments, count=1) and
    counters. With a mesh, 2-D leaves are split over ("data", "fsdp") and the rest replicated."""
    k = jax.random.split(jax.random.key(seed), 3)
    params = {"language": {"w": jax.random.normal(k[0], (8, 16)), "b": jax.random.normal(k[1], (16,))},
              "visual": {"w": jax.random.normal(k[2], (16, 8)).astype(jnp.bfloat16)}}
    if mesh is not None:
        params = jax.tree.map(
            lambda x: jax.device_put(x, NamedSharding(mesh, P("data", "fsdp") if x.ndim == 2 else P())), params)
    opt = optax.adamw(1e-2)
    opt_state = jax.jit(opt.init)(params)
    grads = jax.tree.map(lambda x: jnp.cos(x.astype(jnp.float32)).astype(x.dtype), params)
    updates, opt_state = jax.jit(opt.update)(grads, opt_state, params)
    params = jax.jit(optax.apply_updates)(params, updates)
    rng = jax.random.key_data(jax.random.key(seed + 7))
    return State(params, opt_state, jnp.int32(11), jnp.int32(2), rng)


def assert_bit_exact(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(path)
        assert a.tobytes() == b.tobytes(), jax.tree_util.keystr(path)


def gspmd_mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def test_round_trip_bit_exact_and_files(tmp_path):
    state = make_state()
    assert state.rng.dtype == jnp.uint32 and state.opt_state[0].count == 1
    extra = {"epoch": 2, "acc_sums": [np.float32(1.5), 2.25], "counts": np.arange(3), "note": None}
    with Checkpointer(tmp_path / "ck", fingerprint="abc") as ck:
        assert ck.latest_step() is None and ck.all_steps() == []
        assert ck.save(11, state, None, extra)
    # A fresh Checkpointer (as after a restart) finds and restores it.
    with Checkpointer(tmp_path / "ck", fingerprint="abc") as ck:
        assert ck.all_steps() == [11] and ck.latest_step() == 11
        r = ck.restore(abstract_state=abstract_like(state))
    assert r.step == 11 and r.data_state is None and r.fingerprint == "abc"
    assert isinstance(r.state, State) and isinstance(r.state.opt_state[0], optax.ScaleByAdamState)
    assert_bit_exact(r.state, state)
    assert r.extra == {"epoch": 2, "acc_sums": [1.5, 2.25], "counts": [0, 1, 2], "note": None}
    step_dir = tmp_path / "ck" / "11"
    assert {"data", "extra", "state"} <= set(os.listdir(step_dir))
    assert json.loads((step_dir / "data" / "process_0-of-1.json").read_text()) == {"format": "none", "state": None}
    assert json.loads((step_dir / "extra" / "metadata").read_text())["epoch"] == 2


def test_sharded_restore_onto_a_different_mesh(tmp_path):
    mesh = gspmd_mesh((2, 4), ("data", "fsdp"))
    state = make_state(1, mesh)
    w = state.params["language"]["w"]
    assert w.sharding.spec == P("data", "fsdp") and len(w.addressable_shards) == 8
    # Adam's moments inherit the parameter layout: they are saved sharded too.
    assert state.opt_state[0].mu["language"]["w"].sharding.is_equivalent_to(w.sharding, 2)
    with Checkpointer(tmp_path, async_save=True) as ck:
        ck.save(5, state, {"next_index": 3}, {})
        ck.wait()
        # Restore on a 4x2 mesh with the split axes swapped, and on a flat 8-device mesh.
        other = gspmd_mesh((4, 2), ("a", "b"))
        flat = gspmd_mesh((8,), ("x",))
        for target_mesh, spec in ((other, P("b", "a")), (flat, P(None, "x"))):
            shardings = jax.tree.map(lambda x: NamedSharding(target_mesh, spec if x.ndim == 2 else P()), state)
            r = ck.restore(5, abstract_state=abstract_like(state, shardings))
            assert_bit_exact(r.state, state)
            for got, want in zip(jax.tree.leaves(r.state), jax.tree.leaves(shardings)):
                assert got.sharding == want
            assert r.data_state == {"next_index": 3}


def _grain_iter():
    ds = grain.MapDataset.range(40).shuffle(seed=5).map(lambda x: x * 3).filter(lambda x: x % 2 == 0)
    return iter(ds.to_iter_dataset().batch(3))


def test_grain_iterator_resumes_where_saved(tmp_path):
    it = _grain_iter()
    for _ in range(2):
        next(it)
    saved = it.get_state()
    expected = [next(it).tolist() for _ in range(3)]
    with Checkpointer(tmp_path) as ck:
        ck.save(1, {"x": jnp.zeros(2)}, saved, {})
        r = ck.restore(abstract_state={"x": jax.ShapeDtypeStruct((2,), jnp.float32)})
    fresh = _grain_iter()
    fresh.set_state(r.data_state)
    assert [next(fresh).tolist() for _ in range(3)] == expected
    # Bytes states (grain DataLoader iterators) come back byte for byte, even when not UTF-8.
    blob = b'{"pos": 4}\x00\xff\xfe'
    with Checkpointer(tmp_path / "b") as ck:
        ck.save(1, {"x": jnp.zeros(2)}, blob, {})
        assert ck.restore(abstract_state={"x": jax.ShapeDtypeStruct((2,), jnp.float32)}).data_state == blob


@pytest.mark.parametrize("mode,values,keep", [
    # Best of "max" is step 3 (0.9), of "min" step 4 (0.1); the last two are 7 and 8. Step 2 has no
    # metrics (max) or a NaN one (min): kept only while it is among the last two.
    ("max", [0.1, None, 0.9, 0.3, 0.2, 0.5, 0.4, 0.0], {3, 7, 8}),
    ("min", [0.5, float("nan"), 0.9, 0.1, 0.7, 0.6, 0.8, 1.0], {4, 7, 8}),
])
def test_keeps_last_n_plus_best(tmp_path, mode, values, keep):
    state = {"x": jnp.zeros(4)}
    with Checkpointer(tmp_path, max_to_keep=2, best_metric="m", best_mode=mode, keep_best=1) as ck:
        for step, v in enumerate(values, start=1):
            assert ck.save(step, state, None, {"m": v}, metrics=None if v is None else {"m": v, "other": 1.0})
        ck.wait()
        assert set(ck.all_steps()) == keep
        best = 3 if mode == "max" else 4
        assert ck.best_step() == best
    on_disk = {int(n) for n in os.listdir(tmp_path) if n.isdigit()}
    assert on_disk == keep
    with Checkpointer(tmp_path, max_to_keep=2, best_metric="m", best_mode=mode) as ck:
        assert ck.best_step() == best and set(ck.all_steps()) == keep


def test_keep_several_best(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=1, best_metric="acc", keep_best=2, async_save=False) as ck:
        for step, acc in enumerate([0.5, 0.8, 0.1, 0.7, 0.2], start=1):
            ck.save(step, {"x": jnp.ones(2)}, None, {}, metrics={"acc": acc})
        assert ck.all_steps() == [2, 4, 5]
        with pytest.raises(KeyError, match="best_metric 'acc'"):
            ck.save(6, {"x": jnp.ones(2)}, None, {}, metrics={"loss": 1.0})


def test_nan_metric_ranks_worst(tmp_path):
    # Python sorts NaN arbitrarily (every comparison is False); unhandled, a diverged step would
    # evict the real best.
    with Checkpointer(tmp_path, max_to_keep=1, best_metric="acc", async_save=False) as ck:
        ck.save(1, {"x": jnp.ones(2)}, None, {}, metrics={"acc": 0.5})
        ck.save(2, {"x": jnp.ones(2)}, None, {}, metrics={"acc": float("nan")})
        assert ck.best_step() == 1 and ck.all_steps() == [1, 2]


def test_async_save_snapshot_then_wait(tmp_path):
    big = jax.random.normal(jax.random.key(0), (512, 1024))
    want = np.asarray(big).copy()
    extra = {"hist": [1.0, 2.0]}
    with Checkpointer(tmp_path, async_save=True) as ck:
        assert ck.save(3, {"w": big}, {"i": 1}, extra)
        # Returned with the arrays already copied to host: the caller may donate / delete its buffers
        # and mutate its dicts while the write goes on.
        big.delete()
        extra["hist"].append(3.0)
        ck.wait()
        assert (tmp_path / "3" / "state").is_dir() and ck.latest_step() == 3
        r = ck.restore(abstract_state={"w": jax.ShapeDtypeStruct(want.shape, want.dtype)})
    assert np.asarray(r.state["w"]).tobytes() == want.tobytes()
    assert r.extra == {"hist": [1.0, 2.0]}


def test_save_interval_and_force(tmp_path):
    with Checkpointer(tmp_path, save_interval_steps=3, max_to_keep=None) as ck:
        s = {"x": jnp.zeros(1)}
        decisions = [ck.save(step, s, None, {}) for step in range(1, 8)]
        # The first save of a fresh run always writes (orbax InitialSavePolicy), then multiples of 3.
        assert decisions == [True, False, True, False, False, True, False]
        assert ck.save(7, s, None, {}, force=True)
        assert not ck.save(7, s, None, {}, force=True)  # already saved: preemption right after a save
        ck.wait()
        assert ck.all_steps() == [1, 3, 6, 7]


def test_half_written_checkpoint_is_ignored_and_cleaned(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path) as ck:
        ck.save(1, state, {"next_index": 1}, {"k": 1})
    # A killed process leaves its step under orbax's temporary name; one here is complete (killed
    # just before the rename), one is half written.
    complete = tmp_path / "2.orbax-checkpoint-tmp-1700000000000000"
    shutil.copytree(tmp_path / "1", complete)
    half = tmp_path / "3.orbax-checkpoint-tmp-1700000000000001"
    (half / "state").mkdir(parents=True)
    (half / "state" / "partial").write_bytes(b"\x00" * 10)
    with Checkpointer(tmp_path) as ck:
        assert ck.latest_step() == 1 and ck.all_steps() == [1]
        r = ck.restore(abstract_state=abstract_like(state))
        assert r.step == 1 and r.extra == {"k": 1}
        assert ck.save(2, state, None, {"k": 2})  # the leftover's step number is free to reuse
        ck.wait()
        assert ck.all_steps() == [1, 2]
    assert not complete.exists() and not half.exists()


def test_config_fingerprint_mismatch(tmp_path):
    cfg_a = {"lr": 1e-5, "model": "tiny"}
    fp_a, fp_b = config_fingerprint(cfg_a), config_fingerprint({"lr": 2e-5, "model": "tiny"})
    assert fp_a == config_fingerprint({"model": "tiny", "lr": 1e-5}) and fp_a != fp_b
    abstract = {"x": jax.ShapeDtypeStruct((2,), jnp.float32)}
    with Checkpointer(tmp_path, fingerprint=fp_a) as ck:
        ck.save(4, {"x": jnp.ones(2)}, None, {})
    with Checkpointer(tmp_path, fingerprint=fp_b) as ck:
        with pytest.raises(ConfigMismatchError) as e:
            ck.restore(abstract_state=abstract)
        msg = str(e.value)
        assert str(tmp_path / "4") in msg and fp_a in msg and fp_b in msg and "allow_config_change" in msg
        r = ck.restore(abstract_state=abstract, allow_config_change=True)
        assert r.fingerprint == fp_a and np.asarray(r.state["x"]).tolist() == [1.0, 1.0]
    with Checkpointer(tmp_path) as ck:  # no fingerprint of its own (e.g. an eval script): not checked
        assert ck.restore(abstract_state=abstract).step == 4


def test_config_mismatch_names_the_keys_that_differ(tmp_path):
    """The config travels with the checkpoint: a rerun with another one is refused with the changed keys
    (old -> new), checked from the step metadata alone, before any tensor is read."""
    old = {"rl_steps": 4, "optim": {"learning_rate": 5e-5, "b1": 0.9}, "eval": {"splits": ("val",)}}
    new = {"rl_steps": 6, "optim": {"learning_rate": 1e-4, "b1": 0.9}, "eval": {"splits": ["val"]}}
    assert config_diff(old, new) == ["optim.learning_rate: 5e-05 -> 0.0001", "rl_steps: 4 -> 6"]
    with Checkpointer(tmp_path, fingerprint=config_fingerprint(old), config=old) as ck:
        ck.save(2, {"x": jnp.ones(2)}, None, {})
    with Checkpointer(tmp_path, fingerprint=config_fingerprint(new), config=new) as ck:
        with pytest.raises(ConfigMismatchError) as e:
            ck.check_config()
        assert isinstance(e.value, UserError)
        msg = str(e.value)
        assert "optim.learning_rate: 5e-05 -> 0.0001\n  rl_steps: 4 -> 6\n" in msg and "--allow_config_change" in msg
        assert ck.check_config(allow_config_change=True) == 2
    with Checkpointer(tmp_path, fingerprint=config_fingerprint(old), config=old) as ck:
        assert ck.check_config() == 2
    # Checkpoints written without the config (older runs): the diff comes from the previous config.json.
    with Checkpointer(tmp_path / "old", fingerprint=config_fingerprint(old)) as ck:
        ck.save(1, {"x": jnp.ones(2)}, None, {})
    with Checkpointer(tmp_path / "old", fingerprint=config_fingerprint(new), config=new) as ck:
        with pytest.raises(ConfigMismatchError, match="rl_steps: 4 -> 6"):
            ck.check_config(previous=old)


def damage(step_dir, how: str):
    """The damage a crash, a full disk or a careless copy does to a finished step directory."""
    if how == "truncated tensor file":
        files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir / "state") for f in fs
                 if os.path.basename(r) == "d"]
        for path in files:
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    else:
        os.remove(step_dir / {"missing _METADATA": "state/_METADATA", "missing data-state file":
                              "data/process_0-of-1.json", "missing step metadata": "_CHECKPOINT_METADATA"}[how])


@pytest.mark.parametrize("how", ["truncated tensor file", "missing _METADATA", "missing data-state file",
                                 "missing step metadata"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, how):
    states = {s: {"x": jnp.full((64,), float(s))} for s in (1, 2, 3)}
    with Checkpointer(tmp_path, fingerprint="fp", max_to_keep=3) as ck:
        for s, st in states.items():
            ck.save(s, st, {"pos": s}, {"s": s})
    damage(tmp_path / "3", how)
    abstract = abstract_like(states[1])
    with Checkpointer(tmp_path, fingerprint="fp", max_to_keep=3) as ck:
        assert ck.check_config() in (2, 3)  # the step metadata may still be readable
        restored, damaged = ck.restore_latest_intact(abstract)
        assert restored.step == 2 and restored.data_state == {"pos": 2} and restored.extra == {"s": 2}
        assert np.asarray(restored.state["x"]).tolist() == [2.0] * 64
        assert [d.step for d in damaged] == [3] and damaged[0].reason
        assert damaged[0].set_aside_as == str(tmp_path / "damaged_step_3")
        assert ck.all_steps() == [1, 2]
        ck.save(3, states[3], {"pos": 3}, {"s": 3}, force=True)  # the run goes on and saves step 3 again
        ck.save(4, states[3], {"pos": 4}, {"s": 4}, force=True)
    assert (tmp_path / "damaged_step_3").is_dir()  # kept: user data is never deleted
    with Checkpointer(tmp_path, fingerprint="fp") as ck:
        assert ck.all_steps() == [2, 3, 4] and ck.restore_latest_intact(abstract)[0].step == 4


def test_when_no_checkpoint_restores_nothing_is_moved(tmp_path):
    with Checkpointer(tmp_path, fingerprint="fp") as ck:
        ck.save(1, {"x": jnp.ones(8)}, None, {})
        ck.save(2, {"x": jnp.ones(8)}, None, {})
    damage(tmp_path / "1", "missing _METADATA")
    damage(tmp_path / "2", "truncated tensor file")
    with Checkpointer(tmp_path, fingerprint="fp") as ck:
        with pytest.raises(DamagedCheckpointError, match=r"(?s)no checkpoint in .* can be restored:.*step 2: .*"
                                                         r"step 1: .*lacks state/_METADATA"):
            ck.restore_latest_intact({"x": jax.ShapeDtypeStruct((8,), jnp.float32)})
        assert ck.all_steps() == [1, 2]


def test_discard_unfinished_removes_half_written_steps_only(tmp_path):
    with Checkpointer(tmp_path) as ck:
        ck.save(1, {"x": jnp.ones(2)}, None, {})
        ck.wait()
        (tmp_path / "2.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
        (tmp_path / "damaged_step_7").mkdir()
        assert ck.discard_unfinished() == ["2.orbax-checkpoint-tmp"]
    assert sorted(os.listdir(tmp_path)) == ["1", "damaged_step_7"]


def test_discard_unfinished_outlasts_writes_that_finish_after_the_failure(tmp_path):
    """A failed save is reported at its first failed write while tensorstore may still be writing other
    chunks: a chunk file that lands after the first sweep (here from a thread, 0.3 s later) is swept too."""
    import threading
    import time
    with Checkpointer(tmp_path) as ck:
        ck.save(1, {"x": jnp.ones(2)}, None, {})
        ck.wait()
        late = tmp_path / "2.orbax-checkpoint-tmp" / "state" / "d"
        late.mkdir(parents=True)

        def write_late():
            time.sleep(0.3)
            late.mkdir(parents=True, exist_ok=True)
            (late / "chunk").write_bytes(b"x" * 10)

        writer = threading.Thread(target=write_late)
        writer.start()
        assert ck.discard_unfinished() == ["2.orbax-checkpoint-tmp"]
        writer.join()
    assert sorted(os.listdir(tmp_path)) == ["1"]


def test_clear_errors(tmp_path):
    with Checkpointer(tmp_path / "empty") as ck:
        with pytest.raises(FileNotFoundError, match="no checkpoint in .*empty"):
            ck.restore(abstract_state={})
        with pytest.raises(TypeError, match=r"extra\['a'\]: key 1 is a int"):
            ck.save(1, {"x": jnp.ones(2)}, None, {"a": {1: 2}})
        with pytest.raises(TypeError, match=r"extra\['f'\]\[0\]: set is not JSON-serialisable"):
            ck.save(1, {"x": jnp.ones(2)}, None, {"f": [{1}]})
        with pytest.raises(TypeError, match="data_state must be"):
            ck.save(1, {"x": jnp.ones(2)}, [1, 2], {})
        ck.save(1, {"x": jnp.ones(2)}, None, {})
        with pytest.raises(FileNotFoundError, match=r"step 9 .*available: \[1\]"):
            ck.restore(9, abstract_state={})
        with pytest.raises(ValueError, match=r"restoring .*empty/1 failed.*shape"):
            ck.restore(abstract_state={"x": jax.ShapeDtypeStruct((3,), jnp.float32)})
    for bad in ({"max_to_keep": 0}, {"best_mode": "best"}, {"keep_best": 0}, {"save_interval_steps": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Checkpointer(tmp_path / "x", **bad)


def test_guard_sets_flag_and_restores_handlers():
    before_term, before_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with PreemptionGuard() as guard:
        assert not guard.requested and not guard.should_stop(0)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs between bytecodes of the main thread
        assert guard.requested and guard.reason == "SIGTERM" and guard.should_stop(0)
        # With a stop already pending, Ctrl-C escapes as usual.
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is before_term and signal.getsignal(signal.SIGINT) is before_int


_TRAINER = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp
    from vrl_jax.checkpointing import Checkpointer, PreemptionGuard
    with PreemptionGuard() as guard, Checkpointer(sys.argv[1], save_interval_steps=1000) as ck:
        w, step = jnp.zeros(4), 0
        while True:
            step += 1
            w = w + step                       # the "train step"
            ck.save(step, {"w": w}, {"next_index": step}, {})  # periodic: only step 1 (first save) writes
            if step == 3:
                print("ready", flush=True)
            if guard.should_stop(step, ck):
                ck.save(step, {"w": w}, {"next_index": step}, {"reason": guard.reason}, force=True)
                ck.wait()
                print(f"{guard.reason}: saved step {step} to {ck.step_path(step)}; exiting", flush=True)
                sys.exit(0)
            time.sleep(0.005)
""")


def test_sigterm_subprocess_saves_and_exits_zero(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(), PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-c", _TRAINER, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "SIGTERM: saved step" in out
    step = int(out.split("saved step ")[1].split()[0])
    with Checkpointer(tmp_path) as ck:
        assert ck.all_steps() == [1, step]  # the run's first save, then the forced one
        r = ck.restore(abstract_state={"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
    assert np.asarray(r.state["w"]).tolist() == [step * (step + 1) / 2] * 4
    assert r.data_state == {"next_index": step} and r.extra == {"reason": "SIGTERM"}
