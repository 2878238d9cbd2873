"""`python tools/trace_step.py`, as the README shows it: it lists what one GRPO step of the smoke default
runs, and the README's reading path names only files that the step enters."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from tests.xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The step's stations (README, "Layout"), each with a function that must have run there.
STATIONS = {
    "vrl_jax/trainer.py": "Loop.rl_step",
    "vrl_jax/sampling/sampler.py": "generate",
    "vrl_jax/rewards/compose.py": "RewardSet.__call__",
    "vrl_jax/rl/algorithms.py": "credit",
    "vrl_jax/rl/advantages.py": "grpo_advantages",
    "vrl_jax/rl/batching.py": "to_train_batch",
    "vrl_jax/rl/train_step.py": "train_step",
    "vrl_jax/rl/logprobs.py": "sequence_stats",
    "vrl_jax/rl/losses.py": "policy_objective",
    "vrl_jax/rl/train_state.py": "make_optimizer",
}


def test_trace_step_lists_every_file_one_grpo_step_runs(tmp_path, session_jax_cache):
    out_json = tmp_path / "trace.json"
    env = {**os.environ, "XLA_FLAGS": xla_flags(), "JAX_COMPILATION_CACHE_DIR": session_jax_cache,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    out = subprocess.run([sys.executable, "tools/trace_step.py", f"--json={out_json}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    files = json.loads(out_json.read_text())
    for path, function in STATIONS.items():
        assert function in files.get(path, {}).get("functions", []), f"{path}: {function} not traced"
    assert not files["vrl_jax/rl/losses.py"]["background"]
    # The Python inside jax.jit is traced: the decode loop's body and the update's scan body.
    assert "generate.<locals>.body" in files["vrl_jax/sampling/sampler.py"]["functions"]
    assert "train_step.<locals>.update" in files["vrl_jax/rl/train_step.py"]["functions"]

    # The count line agrees with the JSON.
    last = out.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"files: (\d+) outside models/ in the step's own thread, (\d+) more in the data pipeline's "
                     r"background threads, (\d+) in models/", last)
    assert m, last
    model = [f for f in files if f.startswith("vrl_jax/models/")]
    background = [f for f, e in files.items() if e["background"] and f not in model]
    assert (int(m[1]), int(m[2]), int(m[3])) == (len(files) - len(model) - len(background), len(background), len(model))
    assert "vrl_jax/models/qwen2.py" in model

    # Every vrl_jax file the README's reading path names is one the step runs (besides the CLI, which starts it).
    readme = open(os.path.join(ROOT, "README.md")).read()
    path_paragraph = readme.split("## Layout", 1)[1].split("\n\n", 2)[1]
    named = {p if p.startswith("vrl_jax/") else "vrl_jax/" + p
             for p in re.findall(r"`([\w/]+\.py)`", path_paragraph) if not p.startswith(("experiments/", "tools/"))}
    assert len(named) >= 8, named
    # The README's counts are the measured ones (the background threads' share depends on their timing).
    own = re.search(r"- (\d+) files outside `models/` in the step's own thread", path_paragraph)
    in_models = re.search(r"- (\d+) in `models/`", path_paragraph)
    assert own and in_models, path_paragraph
    assert (int(own[1]), int(in_models[1])) == (int(m[1]), int(m[3])), "update the README's counts"
    missing = named - set(files) - {"vrl_jax/train.py"}
    assert not missing, f"the README's reading path names files the step does not run: {sorted(missing)}"
