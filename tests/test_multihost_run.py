"""The README's training command on several processes, launched as a user launches it on a GPU cluster
without SLURM: the same command in every process, with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID set (jax.distributed over localhost, CPU devices, gloo collectives).

Against 1 process x 4 devices, on the smoke default with images: 2 processes x 2 devices run SFT steps,
GRPO steps, evaluations, checkpoints and the HF export, stopped by SIGTERM to one process during GRPO
and resumed; 4 processes x 1 device run REINFORCE++ (whitened over the whole batch) with DAPO's
dynamic sampling (extra rounds decided on the whole batch) on LoRA adapters. The metrics rows are
equal within 1e-5 (relative; collectives across processes may sum in another order), and the exported
parameters (the merged export, and the PEFT adapter of the LoRA run) within 1e-6, while each process
preprocesses only its own devices' images.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOLATILE = ("time/", "speed/", "compile/", "timestamp", "time")

# A user's experiment file: the smoke default with global batches of 4 prompts (one per device of the
# 4-device mesh). The tiny random policy never answers correctly, so every group's reward is the same:
# an entropy bonus and a KL term (a KL reward for REINFORCE++) make each update move the policy anyway,
# and the reference forward runs.
EXPERIMENT = '''
import importlib.util, os
_spec = importlib.util.spec_from_file_location("default", os.path.join({root!r}, "experiments", "default.py"))
_default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_default)


def get_config(arg=None):
    c = _default.get_config("smoke")
    c.prompts_per_step = 4
    c.num_micro = 1
    c.eval.batch_size = 4
    c.loss.entropy_coef = 0.01
    c.loss.kl_coef = 0.01
    if arg == "reinforce_pp":
        c.algorithm = "reinforce_pp"
        c.advantage.estimator = "reinforce_pp"
        c.advantage.kl_reward_coef = 0.05
        c.loss.kl_coef = 0.001
        c.rollout.old_logprobs = "recompute"  # pi_old from a training forward over the mesh
        c.sft.steps = 0
        c.dapo.dynamic_sampling = True
        c.dapo.filter_on = "total"
        c.dapo.fill = "zero_advantage"  # every group ties: the fillers still train (the entropy bonus)
        c.dapo.max_rounds = 2
        c.eval.at_start = False
        c.eval.splits = ()
        c.model.lora.rank = 4  # LoRA on the language model, nothing else trains: export/ and adapter/
        c.model.lora.alpha = 8.0
        c.optim.learning_rate = 5e-3  # B starts at 0: a step that moves the policy visibly
        c.optim.train_vit = False
        c.optim.train_connector = False
    return c
'''


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    path = tmp_path_factory.mktemp("experiment") / "multihost.py"
    path.write_text(EXPERIMENT.format(root=ROOT))
    return str(path)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(processes: int, devices: int, workdir: str, config: str, cache: str, *overrides: str):
    """The README command in `processes` processes joined through the three environment variables."""
    port = free_port()
    procs = []
    for i in range(processes):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": xla_flags(devices),
               "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
        if processes > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes),
                       JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "vrl_jax.train", f"--config={config}", f"--workdir={workdir}", "--noreport",
             *overrides], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs, timeout: float = 600) -> list[str]:
    outputs = []
    deadline = time.time() + timeout
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a process did not finish in {timeout} s")
        outputs.append(out)
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{out[-4000:]}"
    return outputs


def run(processes: int, devices: int, workdir: str, config: str, cache: str, *overrides: str) -> list[str]:
    return finish(start(processes, devices, workdir, config, cache, *overrides))


def rows(workdir: str, split: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)}
                for r in map(json.loads, f) if r.get("split") == split]


def assert_same_rows(got_dir: str, want_dir: str, split: str) -> None:
    got, want = rows(got_dir, split), rows(want_dir, split)
    assert [r["step"] for r in got] == [r["step"] for r in want], split
    for a, b in zip(got, want):
        assert a.keys() == b.keys(), (split, b["step"], set(a) ^ set(b))
        for key, value in b.items():
            if isinstance(value, float):
                assert abs(a[key] - value) <= 1e-5 * max(1.0, abs(value)), (split, b["step"], key, a[key], value)
            else:
                assert a[key] == value, (split, b["step"], key)


def assert_same_export(got_dir: str, want_dir: str, file: str = "export/model.safetensors") -> None:
    from safetensors.numpy import load_file
    got = load_file(os.path.join(got_dir, file))
    want = load_file(os.path.join(want_dir, file))
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-6, err_msg=key)


def preprocessed(outputs: list[str]) -> list[int]:
    """Per process, how many images it resized and patchified (its last line saying so)."""
    found = [re.findall(r"data: (\d+) images preprocessed by process", out) for out in outputs]
    assert all(found), [out[-2000:] for out, f in zip(outputs, found) if not f]
    return [int(f[-1]) for f in found]


# Two micro-batches: the update lays a step's rows out over the devices differently from the sampler, so a
# host's devices get rows of prompts whose images the other host preprocessed for sampling (and compute them).
GRPO = ("--config.rl_steps=4", "--config.num_micro=2", "--config.sft.batch_size=8", "--config.checkpoint.every_steps=2",
        "--config.eval.splits=('val',)", "--config.eval.settings=('low','high')")


@pytest.fixture(scope="module")
def one_process(experiment, session_jax_cache, tmp_path_factory):
    """1 process x 4 devices: the reference run."""
    wd = str(tmp_path_factory.mktemp("p1x4"))
    run(1, 4, wd, experiment, session_jax_cache, *GRPO)
    return wd


def test_the_reference_run_learns_something(one_process):
    """The comparisons below mean something: rewards differ within groups, so updates move the policy."""
    train = rows(one_process, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]  # 2 SFT + 4 GRPO steps
    rl = [r for r in train if r["stage"] == 1.0]
    assert all(r["loss/loss"] != 0.0 for r in rl) and any(r["training/kl"] > 0.0 for r in rl)
    assert [r["step"] for r in rows(one_process, "eval")] == [0, 2, 6]


def test_two_processes_stopped_by_sigterm_to_one_then_resumed_equal_one(one_process, experiment, session_jax_cache,
                                                                        tmp_path):
    """2 x 2: SIGTERM reaches process 1 only, during GRPO; both stop after the same step and save; the
    same command resumes (the KL reference read back by both); every metrics row (train, eval, epoch)
    and the export equal the 1-process run's."""
    wd = str(tmp_path / "p2x2")
    procs = start(2, 2, wd, experiment, session_jax_cache, *GRPO)
    metrics = os.path.join(wd, "metrics.jsonl")
    while not (os.path.exists(metrics) and any(r["step"] >= 3 for r in rows(wd, "train"))):
        assert all(p.poll() is None for p in procs), "a process ended before the first GRPO step"
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)  # the first GRPO step is logged: the stop lands in step 4 or 5
    outputs = finish(procs)
    assert "stopped by signal (SIGTERM)" in outputs[1], outputs[1][-3000:]
    assert "stopped by signal (stop signal on another process)" in outputs[0], outputs[0][-3000:]
    stopped_at = max(r["step"] for r in rows(wd, "train"))
    assert 3 <= stopped_at < 6
    outputs = run(2, 2, wd, experiment, session_jax_cache, *GRPO)
    assert all(f"resumed {wd} at step {stopped_at}" in out for out in outputs)
    for split in ("train", "eval", "epoch"):
        assert_same_rows(wd, one_process, split)
    assert_same_export(wd, one_process)


def test_reinforce_pp_with_dynamic_sampling_on_four_processes_equals_one(experiment, session_jax_cache, tmp_path):
    """4 x 1: REINFORCE++ whitens over the whole batch and DAPO decides its extra rounds on the whole
    batch's rewards: the same rounds, fillers and updates as 1 x 4. The zero-advantage fillers train
    (the entropy bonus, the KL loss); pi_old, recomputed by a training forward, gives a first-update
    ratio of 1. The policy is LoRA adapters split over the 4 processes: the merged export and the PEFT
    adapter, each gathered tensor by tensor and written by process 0, equal the 1-process run's. Each process
    preprocessed (resized, patchified) only the images of its own device's rows: a quarter of them."""
    config = experiment + ":reinforce_pp"
    one, four = str(tmp_path / "rpp1x4"), str(tmp_path / "rpp4x1")
    single = preprocessed(run(1, 4, one, config, session_jax_cache, "--config.rl_steps=2"))
    per_host = preprocessed(run(4, 1, four, config, session_jax_cache, "--config.rl_steps=2"))
    print(f"images preprocessed: 1 x 4 {single}, 4 x 1 {per_host}")
    # Each host resized and patchified only its own device's rows' images (DAPO's chosen groups may land on
    # another host than the one that sampled them, which then computes them too).
    assert all(0 < n <= 0.4 * single[0] for n in per_host) and sum(per_host) >= single[0]
    train = rows(one, "train")
    assert all(r["dapo/sampling_rounds"] == 2 for r in train)  # every group ties: both rounds run
    assert all(r["update/tokens"] > 0 and "loss/kl_loss" in r for r in train)  # the fillers train
    assert train[-1]["training/kl"] > 1e-9  # the first update moved the policy off the reference
    assert all(r["training/max_abs_ratio_minus_1_first_update"] < 1e-5 for r in train)
    assert all(np.isfinite(r["training/sampler_max_abs_ratio_minus_1"]) for r in train)
    assert_same_rows(four, one, "train")
    assert_same_export(four, one)
    assert_same_export(four, one, "adapter/adapter_model.safetensors")
    with open(os.path.join(one, "adapter", "adapter_config.json")) as f:
        assert json.load(f)["r"] == 4
