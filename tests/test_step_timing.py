"""Where a step's time goes, as the trainer logs it: phases timed apart, compiling counted apart (and zero
once every bucketed shape was seen), and a profiler trace of the steps asked for. (Device metrics fetched
on logging steps only: `test_train_e2e.py`'s mesh run.)"""

from __future__ import annotations

import glob
import os

import pytest

from tests.test_train_e2e import CACHE, compilation_cache, run_train  # noqa: F401
from vrl_jax.timing import CompileWatch, PhaseTimer

SHAPES = ("shapes/train_columns", "shapes/train_patches", "shapes/prompt_columns", "shapes/prompt_patches")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """SFT then GRPO over two epochs of 6 problems (each RL shape comes back), the third step profiled."""
    wd = str(tmp_path_factory.mktemp("timing"))
    out = run_train(wd, "--config.rl_steps=6", "--config.data.synthgeo.train=6", "--config.log.profile_steps=(3,)")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return wd


def raw_rows(wd, split="train"):
    import json
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("split") == split]


def test_phases_are_timed_apart(run):
    rl = [r for r in raw_rows(run) if r["stage"] == 1.0]
    for r in rl:
        phases = [r[f"time/{p}"] for p in ("sample", "score", "credit", "update")]
        assert all(t > 0 for t in phases)
        assert r["time/step"] == pytest.approx(sum(phases) + r.get("time/reference", 0.0))
        assert r["speed/sample_tokens_per_second"] > 0 and r["speed/update_tokens_per_second"] > 0
        assert "time/rollout" not in r and "time/reward" not in r  # the old, mixed phases


def test_nothing_compiles_once_a_shape_was_seen(run):
    """The sampler and the train step compile once per bucketed shape: a step whose shapes (prompt columns
    and patches, train columns and patches) all came before compiles nothing; the first steps do."""
    seen, repeats = set(), 0
    train = raw_rows(run)
    assert train[0]["compile/count"] > 0 and train[0]["time/compile"] > 0
    for r in train:
        key = (r["stage"],) + tuple(r.get(k) for k in SHAPES)
        if key in seen:
            repeats += 1
            assert r["compile/count"] == 0, (r["step"], key)
        seen.add(key)
    assert repeats >= 3  # the second RL epoch repeats the first one's shapes
    evals = raw_rows(run, "eval")
    assert evals[0]["compile/count"] > 0 and evals[-1]["compile/count"] == 0  # the same splits, compiled once


def test_the_profiled_step_leaves_a_trace(run):
    assert glob.glob(os.path.join(run, "profile", "**", "*.xplane.pb"), recursive=True)


def test_phase_timer_and_compile_watch():
    import jax
    import jax.numpy as jnp

    x5, x6 = jnp.ones(5), jnp.ones(6)
    watch, timer = CompileWatch(), PhaseTimer()
    f = jax.jit(lambda x: jnp.sin(x) * 3)
    with timer("a"):
        timer.block(f(x5))
    with timer("a"):
        f(x5)
    count, seconds = watch.take()
    assert count == 1 and seconds > 0 and set(timer.seconds) == {"a"}
    f(x5)
    assert watch.take() == (0, 0.0)
    f(x6)  # a new shape compiles again
    assert watch.take()[0] == 1
