"""The shell tools: `tools/tpu_vm.sh` builds the right gcloud commands (dry run), and both scripts parse."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_VM = os.path.join(ROOT, "tools", "tpu_vm.sh")


def dry_run(*args):
    out = subprocess.run([TPU_VM, *args], capture_output=True, text=True, env={**os.environ, "DRY_RUN": "1"},
                         cwd=ROOT, timeout=60)
    return out.returncode, [shlex.split(line) for line in out.stdout.splitlines()], out.stderr


def test_create_and_delete_name_zone_type_and_spot():
    rc, cmds, _ = dry_run("create", "vm1", "--zone", "europe-west4-a", "--type", "v6e-8", "--spot")
    assert rc == 0 and cmds == [["gcloud", "compute", "tpus", "tpu-vm", "create", "vm1", "--zone", "europe-west4-a",
                                 "--accelerator-type", "v6e-8", "--version", "v2-alpha-tpuv5-lite", "--spot"]]
    rc, cmds, _ = dry_run("delete", "vm1")
    assert rc == 0 and cmds[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "vm1"]


def test_train_passes_the_trainer_arguments_through_one_remote_shell():
    rc, cmds, _ = dry_run("train", "vm1", "--", "--config", "experiments/geo.py:tiny", "--workdir", "runs/a b")
    assert rc == 0 and len(cmds) == 1
    cmd = cmds[0]
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "vm1"] and "--worker" in cmd
    remote = cmd[cmd.index("--command") + 1]
    # The remote shell sees the arguments as the user gave them (the space stays inside one argument).
    assert "python -m vrl_jax.train --config experiments/geo.py:tiny --workdir runs/a\\ b" in remote
    assert remote.startswith("cd ~/vrl_jax && nohup ") and remote.rstrip().endswith("&")


def test_setup_ships_the_tracked_files_and_installs_jax_tpu():
    rc, cmds, _ = dry_run("setup", "vm1")
    assert rc == 0 and [c[0] for c in cmds] == ["tar", "gcloud", "gcloud"]
    assert "setup.py" in cmds[0] and "vrl_jax/trainer.py" in cmds[0]
    assert 'pip install -U "jax[tpu]" -e .' in cmds[2][-1]


@pytest.mark.parametrize("args, message", [(("train", "vm1"), "after --"), (("fetch", "vm1"), "workdir"),
                                           (("create", "vm1", "--bogus"), "unknown option --bogus")])
def test_mistakes_exit_2_with_a_message(args, message):
    rc, _, err = dry_run(*args)
    assert rc == 2 and message in err


def test_ablation_script_parses():
    assert subprocess.run(["bash", "-n", os.path.join(ROOT, "tools", "ablation.sh")]).returncode == 0
