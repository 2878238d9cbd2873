"""The launch tools: `tools/tpu_vm.sh` (Cloud TPU VMs and slices) and `tools/gpu_launch.sh` (GPU nodes).

Most tests read the commands a dry run prints (DRY_RUN=1); where a script's own logic runs on the far side (the
remote stop-and-start line, the queued-resource poll, the ssh launcher's stop, the SLURM batch script), it runs here
against stand-ins for gcloud, ssh, sbatch, srun and python placed first on PATH. No JAX is imported.
"""

from __future__ import annotations

import glob
import os
import shlex
import signal
import subprocess
import time
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_VM = os.path.join(ROOT, "tools", "tpu_vm.sh")
GPU_LAUNCH = os.path.join(ROOT, "tools", "gpu_launch.sh")
GCLOUD_SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]


def _run(script, *args, env=None, dry=True):
    env = {**os.environ, "DRY_RUN": "1" if dry else "0", **(env or {})}
    return subprocess.run([script, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)


def dry_run(*args, env=None):
    out = _run(TPU_VM, *args, env=env)
    return out.returncode, [shlex.split(line) for line in out.stdout.splitlines()], out.stderr


def gpu_dry_run(*args, env=None):
    out = _run(GPU_LAUNCH, *args, env=env)
    return out.returncode, out.stdout, out.stderr


def flag(cmd, name):
    """The value of `--name V` or `--name=V` in an argument list (None when absent)."""
    for i, a in enumerate(cmd):
        if a == name:
            return cmd[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def remote_command(cmd):
    assert cmd[:5] == GCLOUD_SSH, cmd
    return flag(cmd, "--command")


def fake_bin(tmp_path, name, body):
    """An executable `name` in tmp_path/bin (put first on PATH) running the bash `body`."""
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


def wait_for(predicate, what, timeout=30):
    """Waits for another process to reach a point (synchronisation, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------- tools/tpu_vm.sh


@pytest.mark.parametrize("tpu_type, version", [("v4-8", "tpu-ubuntu2204-base"), ("v4-32", "tpu-ubuntu2204-base"),
                                               ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5e-8", "v2-alpha-tpuv5-lite"),
                                               ("v5p-32", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e")])
def test_the_runtime_version_follows_the_accelerator_type(tpu_type, version):
    rc, cmds, _ = dry_run("create", "vm1", "--type", tpu_type)
    assert rc == 0 and cmds[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "vm1"]
    assert flag(cmds[0], "--accelerator-type") == tpu_type and flag(cmds[0], "--version") == version
    rc, cmds, _ = dry_run("create", "vm1", "--type", tpu_type, "--queued")
    assert rc == 0 and flag(cmds[0], "--runtime-version") == version


def test_create_names_zone_type_and_pricing_and_version_overrides():
    rc, cmds, _ = dry_run("create", "vm1", "--zone", "europe-west4-a", "--type", "v6e-8", "--spot")
    assert rc == 0 and cmds == [["gcloud", "compute", "tpus", "tpu-vm", "create", "vm1", "--zone", "europe-west4-a",
                                 "--accelerator-type", "v6e-8", "--version", "v2-alpha-tpuv6e", "--spot"]]
    rc, cmds, _ = dry_run("create", "vm1", "--type=v5p-8", "--version=my-image")
    assert rc == 0 and flag(cmds[0], "--version") == "my-image" and "--spot" not in cmds[0]


@pytest.mark.parametrize("pricing", ["--spot", "--reserved"])
def test_queued_resources_are_created_spot_or_reserved_and_deleted_with_their_vm(pricing):
    rc, cmds, _ = dry_run("create", "slice", "--type", "v5p-32", "--queued", pricing, "--zone", "us-east5-a")
    assert rc == 0 and len(cmds) == 1
    assert cmds[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "slice", "--node-id", "slice",
                       "--zone", "us-east5-a", "--accelerator-type", "v5p-32", "--runtime-version", "v2-alpha-tpuv5",
                       pricing]
    rc, cmds, _ = dry_run("delete", "slice", "--queued")
    assert rc == 0 and cmds[0][:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "slice"]
    assert "--force" in cmds[0]  # also deletes the VM the queued resource made
    rc, cmds, _ = dry_run("delete", "slice")
    assert rc == 0 and cmds[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "slice"]


def test_status_describes_the_queued_resource_state():
    rc, cmds, _ = dry_run("status", "slice", "--zone", "z1")
    assert rc == 0 and cmds == [["gcloud", "compute", "tpus", "queued-resources", "describe", "slice", "--zone", "z1",
                                 "--format", "value(state.state)"]]


def _fake_gcloud_states(tmp_path, states):
    """A gcloud that answers each describe with the next state of `states` and logs its arguments."""
    (tmp_path / "states").write_text("\n".join(states) + "\n")
    fake_bin(tmp_path, "gcloud", f'echo "$*" >> {tmp_path}/calls\n'
                                 f'head -n 1 {tmp_path}/states; sed -i 1d {tmp_path}/states\n')
    return {"PATH": f"{tmp_path}/bin:{os.environ['PATH']}", "POLL_S": "0"}


def test_wait_polls_until_the_queued_resource_is_active(tmp_path):
    env = _fake_gcloud_states(tmp_path, ["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE", "ACTIVE"])
    out = _run(TPU_VM, "wait", "slice", "--zone", "z1", env=env, dry=False)
    assert out.returncode == 0, out.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == ["compute tpus queued-resources describe slice --zone z1 --format value(state.state)"] * 3
    assert out.stdout.splitlines()[-1].endswith("slice: ACTIVE")


def test_wait_fails_when_the_queued_resource_failed(tmp_path):
    env = _fake_gcloud_states(tmp_path, ["WAITING_FOR_RESOURCES", "FAILED", "ACTIVE"])
    out = _run(TPU_VM, "wait", "slice", env=env, dry=False)
    assert out.returncode == 1 and "slice is FAILED" in out.stderr


def test_setup_ships_the_tracked_files_to_every_worker_and_installs_jax_tpu():
    rc, cmds, _ = dry_run("setup", "vm1")
    assert rc == 0 and [c[0] for c in cmds] == ["tar", "gcloud", "gcloud"]
    assert "setup.py" in cmds[0] and "vrl_jax/trainer.py" in cmds[0]
    assert cmds[1][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and flag(cmds[1], "--worker") == "all"
    assert flag(cmds[2], "--worker") == "all" and 'pip install -U "jax[tpu]" -e .' in remote_command(cmds[2])
    rc, cmds, _ = dry_run("setup", "vm1", "--worker", "2")
    assert flag(cmds[1], "--worker") == "2" and flag(cmds[2], "--worker") == "2"


def test_train_stops_a_stale_run_then_starts_the_same_command_on_every_worker():
    rc, cmds, _ = dry_run("train", "vm1", "--", "--config", "experiments/geo.py:tiny", "--workdir", "gs://bkt/runs/a b",
                          "--config.seed=3")
    assert rc == 0 and len(cmds) == 1 and cmds[0][5] == "vm1" and flag(cmds[0], "--worker") == "all"
    remote = remote_command(cmds[0])
    # The remote shell sees the arguments as the user gave them: gs:// unchanged, the space inside one argument.
    train = "python3 -m vrl_jax.train --config experiments/geo.py:tiny --workdir gs://bkt/runs/a\\ b --config.seed=3"
    assert f"nohup {train}" in remote and remote.rstrip().endswith("&")
    # Cleanup comes first: an earlier trainer is stopped and libtpu's lock removed before the new one starts.
    assert remote.index("pkill -TERM") < remote.index("/tmp/libtpu_lockfile") < remote.index("nohup")
    assert ">> train.$W.log 2>&1" in remote and "agent-worker-number" in remote  # one log per worker
    rc, cmds, _ = dry_run("train", "vm1", "--worker=1", "--", "--workdir", "w")
    assert flag(cmds[0], "--worker") == "1"


def test_the_remote_train_line_stops_the_stale_run_removes_the_lock_and_logs_per_worker(tmp_path):
    """Runs the printed remote line here: HOME, the process name and the lock paths are renamed into tmp_path so
    that nothing outside the test is touched. The shell running the line carries the trainer's name in its own
    command line; the stop must not kill it (else the new trainer never starts)."""
    rc, cmds, _ = dry_run("train", "vm1", "--", "--config", "c.py", "--workdir", "gs://b/r")
    tag = "vrl_jax_t" + uuid.uuid4().hex[:8]
    lock, tpu_logs = tmp_path / "libtpu_lockfile", tmp_path / "tpu_logs"
    remote = (remote_command(cmds[0]).replace("vrl_jax", tag).replace("/tmp/libtpu_lockfile", str(lock))
              .replace("/tmp/tpu_logs", str(tpu_logs)))
    lock.write_text("")
    tpu_logs.mkdir()
    (tmp_path / "home" / tag).mkdir(parents=True)
    fake_bin(tmp_path, "python3", 'echo "started $*" > args; echo "trainer output"\n')
    stale = subprocess.Popen(["bash", "-c", f'exec -a "python3 -m {tag}.train --old" sleep 600'])
    try:
        wait_for(lambda: subprocess.run(["pgrep", "-f", f"{tag}.train --old"], capture_output=True).returncode == 0,
                 "the stale process")
        env = {**os.environ, "HOME": str(tmp_path / "home"), "TPU_WORKER_ID": "3",
               "PATH": f"{tmp_path}/bin:{os.environ['PATH']}"}
        out = subprocess.run(["bash", "-c", remote], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert stale.wait(timeout=30) == -signal.SIGTERM  # SIGTERM first: the trainer saves a checkpoint
    finally:
        stale.kill()
    workdir = tmp_path / "home" / tag
    wait_for(lambda: (workdir / "args").exists() and "trainer output" in (workdir / "train.3.log").read_text(),
             "the new trainer")
    assert (workdir / "args").read_text().split() == ["started", "-m", f"{tag}.train", "--config", "c.py",
                                                      "--workdir", "gs://b/r"]
    log = (workdir / "train.3.log").read_text()
    assert f"worker 3: python3 -m {tag}.train --config c.py --workdir gs://b/r" in log
    assert not lock.exists() and tpu_logs.is_dir()  # the lock is gone; our own writable libtpu logs stay


def test_stop_runs_the_cleanup_alone_on_every_worker():
    rc, cmds, _ = dry_run("stop", "vm1")
    remote = remote_command(cmds[0])
    assert rc == 0 and flag(cmds[0], "--worker") == "all" and "pkill -TERM" in remote and "nohup" not in remote


def test_logs_tails_or_copies_every_workers_log():
    rc, cmds, _ = dry_run("logs", "vm1", "--lines", "5")
    assert rc == 0 and flag(cmds[0], "--worker") == "all"
    assert remote_command(cmds[0]) == "cd ~/vrl_jax && tail -n 5 train.*.log"
    rc, cmds, _ = dry_run("logs", "vm1", "--follow")
    assert remote_command(cmds[0]) == "cd ~/vrl_jax && tail -n 50 -F train.*.log"
    rc, cmds, _ = dry_run("logs", "vm1", "--to", "logs/vm1")
    assert rc == 0 and cmds[0] == ["mkdir", "-p", "logs/vm1"]
    assert cmds[1][:7] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "vm1:~/vrl_jax/train.*.log", "logs/vm1"]
    assert flag(cmds[1], "--worker") == "all"


def test_ssh_runs_a_command_on_every_worker_or_opens_a_shell_on_one():
    rc, cmds, _ = dry_run("ssh", "vm1", "--", "ls", "-l", "a b")
    assert rc == 0 and flag(cmds[0], "--worker") == "all" and remote_command(cmds[0]) == "cd ~/vrl_jax && ls -l a\\ b "
    rc, cmds, _ = dry_run("ssh", "vm1", "--worker", "3")
    assert rc == 0 and cmds == [GCLOUD_SSH + ["vm1", "--zone", "us-central1-a", "--worker=3"]]


def test_fetch_syncs_a_gs_workdir_without_ssh_and_tars_a_local_one_from_worker_0():
    rc, cmds, _ = dry_run("fetch", "vm1", "gs://bkt/runs/geo/")
    assert rc == 0 and cmds == [["mkdir", "-p", "runs/geo"],
                                ["gcloud", "storage", "rsync", "--recursive", "--exclude", "^checkpoints/.*",
                                 "gs://bkt/runs/geo", "runs/geo"]]
    rc, cmds, _ = dry_run("fetch", "vm1", "gs://bkt/geo", "--to", "here")
    assert rc == 0 and cmds[-1][-2:] == ["gs://bkt/geo", "here"]
    rc, cmds, _ = dry_run("fetch", "vm1", "workdirs/geo")
    assert rc == 0 and flag(cmds[0], "--worker") == "0" and flag(cmds[1], "--worker") == "0"
    assert remote_command(cmds[0]) == "cd ~/vrl_jax && tar --exclude=checkpoints -czf fetch.tar.gz workdirs/geo "
    assert cmds[-1] == ["tar", "-C", ".", "-xzf", "fetch.tar.gz"]
    rc, cmds, _ = dry_run("fetch", "vm1", "workdirs/geo", "--to", "back")
    assert rc == 0 and cmds[-2:] == [["mkdir", "-p", "back"], ["tar", "-C", "back", "-xzf", "fetch.tar.gz"]]


@pytest.mark.parametrize("args, message", [
    (("train", "vm1"), "after --"), (("fetch", "vm1"), "workdir"),
    (("create", "vm1", "--bogus"), "unknown option --bogus"),
    (("create", "vm1", "--type", "v9x-8"), "give --version"),
    (("create", "vm1", "--queued", "--spot", "--reserved"), "--spot and --reserved exclude each other"),
    (("ssh", "vm1", "--worker=all"), "one worker"), (("train", "vm1", "--worker", "two", "--", "x"), "--worker"),
    (("logs", "vm1", "--lines", "many"), "--lines"), (("logs", "vm1", "--to", "d", "--follow"), "give one"),
    (("fetch", "vm1", "w", "--worker=all"), "one worker"), (("create", "vm1", "--zone"), "--zone needs a value"),
    (("create", "--zone", "z"), "NAME"), (("launch", "vm1"), "unknown command launch"),
    (("train", "vm1", "stray"), "unexpected argument stray")])
def test_tpu_vm_mistakes_exit_2_with_a_message(args, message):
    rc, cmds, err = dry_run(*args)
    assert rc == 2 and message in err and cmds == []


# ------------------------------------------------------------------------------------------- tools/gpu_launch.sh


def _env_prefix(line):
    """{'JAX_...': value} and the command of an `env K=V ... CMD` line."""
    words = shlex.split(line)
    assert words[0] == "env"
    n = next(i for i, w in enumerate(words[1:], 1) if "=" not in w)
    return dict(w.split("=", 1) for w in words[1:n]), words[n:]


@pytest.mark.parametrize("rank", [0, 1])
def test_env_mode_exports_the_three_jax_variables_for_each_node(rank):
    rc, out, err = gpu_dry_run("env", "--coordinator", "node0", "--num-nodes", "2", "--node-rank", str(rank), "--",
                               "--config", "experiments/default.py", "--workdir", "/shared/run a")
    assert rc == 0, err
    env, cmd = _env_prefix(out)
    assert env == {"JAX_COORDINATOR_ADDRESS": "node0:12345", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(rank)}
    assert cmd == ["python", "-m", "vrl_jax.train", "--config", "experiments/default.py", "--workdir", "/shared/run a"]


def test_env_mode_reads_the_environment_and_execs_the_trainer(tmp_path):
    py = fake_bin(tmp_path, "python", 'echo "$JAX_COORDINATOR_ADDRESS|$JAX_NUM_PROCESSES|$JAX_PROCESS_ID|$*"\n')
    out = _run(GPU_LAUNCH, "env", "--", "--workdir", "gs://b/r", dry=False,
               env={"COORDINATOR": "10.0.0.1:8476", "NUM_NODES": "4", "NODE_RANK": "3", "PYTHON": str(py)})
    assert out.returncode == 0 and out.stdout.strip() == "10.0.0.1:8476|4|3|-m vrl_jax.train --workdir gs://b/r"
    # A flag wins over the environment.
    out = _run(GPU_LAUNCH, "env", "--node-rank", "0", "--", "x", dry=False,
               env={"COORDINATOR": "h", "NUM_NODES": "2", "NODE_RANK": "1", "PYTHON": str(py)})
    assert out.stdout.strip() == "h:12345|2|0|-m vrl_jax.train x"


def test_hosts_mode_starts_every_rank_over_ssh_with_node_0_as_coordinator():
    rc, out, err = gpu_dry_run("hosts", "--hosts", "alice@gpu0,gpu1", "--port", "9000", "--dir", "/shared/vrl jax",
                               "--", "--workdir", "gs://b/r")
    assert rc == 0, err
    lines = [shlex.split(line) for line in out.splitlines()]
    assert [line[:2] for line in lines] == [["ssh", "alice@gpu0"], ["ssh", "gpu1"]]
    for rank, (_, _, remote) in enumerate(lines):
        words = shlex.split(remote)
        assert words[:2] == ["cd", "/shared/vrl jax"]
        launch = words[words.index("tools/gpu_launch.sh"):]
        assert launch == ["tools/gpu_launch.sh", "env", "--coordinator", "gpu0:9000", "--num-nodes", "2",
                          "--node-rank", str(rank), "--", "--workdir", "gs://b/r"]


def test_hosts_mode_runs_every_rank_prefixes_their_output_and_stops_them_all_on_sigterm(tmp_path):
    """ssh is a stand-in that runs the remote line here; the trainers record their variables and, on SIGTERM,
    that they stopped (as the real one saves a checkpoint)."""
    fake_bin(tmp_path, "ssh", 'shift; exec bash -c "$1"\n')
    py = fake_bin(tmp_path, "python", f'f={tmp_path}/rank$JAX_PROCESS_ID\n'
                                      'echo "$JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES $*" > $f\n'
                                      'trap "echo stopped >> $f; exit 0" TERM\n'
                                      'echo started; while :; do sleep 0.05; done\n')
    env = {**os.environ, "PATH": f"{tmp_path}/bin:{os.environ['PATH']}", "PYTHON": str(py), "TMPDIR": str(tmp_path)}
    log = tmp_path / "launcher.log"
    with open(log, "w") as f:
        launcher = subprocess.Popen([GPU_LAUNCH, "hosts", "--hosts", "me@a,b", "--", "--workdir", "w"], stdout=f,
                                    stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        wait_for(lambda: log.read_text().count("started") == 2, "both ranks")
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=30) == 0
    finally:  # leave no trainer behind when the launcher failed to stop them
        launcher.kill()
        for pidfile in tmp_path.glob("vrl_jax.train.*.pid"):
            subprocess.run(["kill", "-KILL", pidfile.read_text().strip()], capture_output=True)
    assert {"[0 me@a] started", "[1 b] started"} <= set(log.read_text().splitlines())
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}").read_text().splitlines() == ["a:12345 2 -m vrl_jax.train --workdir w",
                                                                      "stopped"]


def _batch_script(out):
    lines = out.splitlines()
    assert lines[0] == "sbatch <<'EOF'" and lines[-1] == "EOF"
    return "\n".join(lines[1:-1]) + "\n"


def test_slurm_mode_one_process_per_node_sees_all_its_gpus():
    rc, out, err = gpu_dry_run("slurm", "--nodes", "2", "--gpus-per-node", "4", "--time", "2:00:00",
                               "--sbatch", "--account=lab", "--", "--config", "c.py", "--workdir", "/shared/w")
    assert rc == 0, err
    script = _batch_script(out)
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --signal=TERM@120", "#SBATCH --time=2:00:00", "#SBATCH --account=lab",
                 "export JAX_LOCAL_DEVICE_IDS=0,1,2,3"]:
        assert line in script.splitlines()
    srun = shlex.split(script.splitlines()[-1])
    assert srun[0] == "srun" and srun[-7:] == ["python", "-m", "vrl_jax.train", "--config", "c.py", "--workdir",
                                               "/shared/w"]


def test_slurm_mode_per_gpu_leaves_the_device_choice_to_jax():
    rc, out, _ = gpu_dry_run("slurm", "--nodes", "2", "--gpus-per-node", "8", "--per-gpu", "--", "x")
    script = _batch_script(out)
    assert rc == 0 and "#SBATCH --ntasks-per-node=8" in script and "JAX_LOCAL_DEVICE_IDS" not in script


def test_slurm_mode_submits_a_script_that_runs_srun_in_the_checkout(tmp_path):
    fake_bin(tmp_path, "sbatch", f"cat > {tmp_path}/job.sh\n")
    fake_bin(tmp_path, "srun", 'echo "$PWD|$JAX_LOCAL_DEVICE_IDS|$*"\n')
    env = {"PATH": f"{tmp_path}/bin:{os.environ['PATH']}"}
    out = _run(GPU_LAUNCH, "slurm", "--gpus-per-node", "2", "--", "--workdir", "a b", env=env, dry=False)
    assert out.returncode == 0, out.stderr
    ran = subprocess.run(["bash", str(tmp_path / "job.sh")], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, **env}, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == f"{ROOT}|0,1|--label --kill-on-bad-exit=1 python -m vrl_jax.train --workdir a b"


@pytest.mark.parametrize("args, message", [
    (("env", "--num-nodes", "2", "--node-rank", "0", "--", "x"), "--coordinator"),
    (("env", "--coordinator", "h", "--node-rank", "0", "--", "x"), "--num-nodes"),
    (("env", "--coordinator", "h", "--num-nodes", "2", "--", "x"), "--node-rank"),
    (("env", "--coordinator", "h", "--num-nodes", "2", "--node-rank", "2", "--", "x"), "rank is 0..1"),
    (("env", "--coordinator", "h:port", "--num-nodes", "2", "--node-rank", "0", "--", "x"), "port"),
    (("env", "--coordinator", "h", "--num-nodes", "0", "--node-rank", "0", "--", "x"), "number of nodes"),
    (("env", "--coordinator", "h", "--num-nodes", "1", "--node-rank", "0"), "after --"),
    (("hosts", "--", "x"), "--hosts"), (("slurm", "--gpus-per-node", "eight", "--", "x"), "--gpus-per-node"),
    (("slurm", "--bogus", "1", "--", "x"), "unknown option --bogus"), (("slurm", "stray", "--", "x"), "stray"),
    (("slurm", "--nodes"), "--nodes needs a value"), (("mpi", "--", "x"), "unknown mode mpi")])
def test_gpu_launch_mistakes_exit_2_with_a_message(args, message):
    env = {k: "" for k in ("COORDINATOR", "NUM_NODES", "NODE_RANK")}
    rc, out, err = gpu_dry_run(*args, env=env)
    assert rc == 2 and message in err and out == ""


@pytest.mark.parametrize("script", sorted(glob.glob(os.path.join(ROOT, "tools", "*.sh"))),
                         ids=os.path.basename)
def test_every_script_parses(script):
    assert subprocess.run(["bash", "-n", script]).returncode == 0


def test_the_two_node_example_in_docs_multihost_runs_as_documented():
    """The doc's two `env` commands print the env-prefixed trainer command the doc says they amount to."""
    doc = open(os.path.join(ROOT, "docs", "MULTIHOST.md")).read().replace("\\\n", " ")
    launches = [line for line in doc.splitlines() if line.startswith("COORDINATOR=")]
    plain = next(line for line in doc.splitlines() if line.startswith("JAX_COORDINATOR_ADDRESS="))
    assert len(launches) == 2
    outs = [subprocess.run(["bash", "-c", line], capture_output=True, text=True, cwd=ROOT, timeout=60,
                           env={**os.environ, "DRY_RUN": "1"}).stdout for line in launches]
    envs = [_env_prefix(out) for out in outs]
    assert [env["JAX_PROCESS_ID"] for env, _ in envs] == ["0", "1"]
    assert envs[1] == _env_prefix("env " + plain)
