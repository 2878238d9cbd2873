"""Every command the README shows is run by a test, as the README writes it (paths and sizes made tiny);
the CLIs explain bad input in one paragraph (what setup.py declares: `test_packaging.py`).

`COVERAGE` maps each command found in README.md (each line of its ```bash blocks, and each inline code
span that starts a command) to the test that runs it. `test_every_readme_command_has_a_test` fails for a
README command missing from the map, so a command cannot be documented without a test. The tests of the
code blocks read their commands from README.md, so what runs is what the README shows.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
HF_PLACEHOLDER = "/path/to/Qwen2.5-VL-3B-Instruct"

# README command -> the test that runs it ("file::function"; the main and test commands run in CI).
COVERAGE = {
    # ```bash blocks
    "pip install -e . && python -m vrl_jax.train --config experiments/default.py --workdir workdirs/default":
        "tests/test_cli_commands.py::test_ci_runs_the_readme_main_and_test_commands",
    'pip install -e ".[test]" && python -m pytest -x -n 2 --dist loadfile --no-loadscope-reorder tests':
        "tests/test_cli_commands.py::test_ci_runs_the_readme_main_and_test_commands",
    "python -m vrl_jax.evaluate --model workdirs/default/export --data workdirs/default/data/maye_test_iid.jsonl "
    "--template plain --k 4 --breakdown family,modality": "tests/test_cli_commands.py::test_readme_evaluate",
    "python -m vrl_jax.report --workdir workdirs/default --out workdirs/default/report":
        "tests/test_cli_commands.py::test_readme_report",
    "python -m vrl_jax.data.synthgeo --out data/synthgeo --train 3000 --val 100 --test 200":
        "tests/test_cli_commands.py::test_readme_synthgeo",
    "python -m vrl_jax.rewards.audit judge_cases.jsonl --mode maye_compat":
        "tests/test_cli_commands.py::test_readme_audit",
    "python tools/trace_step.py": "tests/test_trace_step.py::test_trace_step_lists_every_file_one_grpo_step_runs",
    "python -m vrl_jax.evaluation.paired before.outcomes.jsonl after.outcomes.jsonl":
        "tests/test_paired.py::test_readme_paired_command",
    "tools/tpu_vm.sh create geo --zone us-central1-a --type v5litepod-8 [--spot]":
        "tests/test_cli_commands.py::test_readme_tpu_vm_dry_runs",
    "tools/tpu_vm.sh setup geo": "tests/test_cli_commands.py::test_readme_tpu_vm_dry_runs",
    "tools/tpu_vm.sh train geo -- --config experiments/geo.py --workdir workdirs/geo":
        "tests/test_cli_commands.py::test_readme_tpu_vm_dry_runs",
    "tools/tpu_vm.sh fetch geo workdirs/geo && tools/tpu_vm.sh delete geo":
        "tests/test_cli_commands.py::test_readme_tpu_vm_dry_runs",
    f"python -m vrl_jax.convert to-orbax {HF_PLACEHOLDER} ckpt/qwen25vl3b":
        "tests/test_cli_commands.py::test_readme_convert",
    "python -m vrl_jax.convert to-hf ckpt/qwen25vl3b exported/ [--dtype bfloat16] [--overwrite]":
        "tests/test_cli_commands.py::test_readme_convert",
    f"python -m vrl_jax.convert check {HF_PLACEHOLDER} [--model ckpt/qwen25vl3b] [--dtype bfloat16]":
        "tests/test_cli_commands.py::test_readme_convert",
    "python -m vrl_jax.standin experiments/geo.py workdirs/standin":
        "tests/test_experiments.py::test_standin_command_runs_the_recipe_through_the_train_cli",
    "python -m vrl_jax.train --config experiments/geo.py ...":
        "tests/test_experiments.py::test_standin_command_runs_the_recipe_through_the_train_cli",
    # inline code spans
    "python -m vrl_jax.evaluation.paired": "tests/test_paired.py::test_readme_paired_command",
    "python -m vrl_jax.convert": "tests/test_cli_commands.py::test_readme_convert",
    "python -m vrl_jax.data.synthgeo": "tests/test_cli_commands.py::test_readme_synthgeo",
    "python -m vrl_jax.rewards.audit": "tests/test_cli_commands.py::test_readme_audit",
    "python -m vrl_jax.evaluate": "tests/test_cli_commands.py::test_readme_evaluate",
    "python -m vrl_jax.report": "tests/test_cli_commands.py::test_readme_report",
    "python -m vrl_jax.train --config experiments/<file>.py[:variant] --workdir DIR [--config.key=value ...]":
        "tests/test_train_e2e.py::test_sft_then_grpo_runs_and_writes_everything",
    "python -m vrl_jax.train": "tests/test_train_e2e.py::test_sft_alone_runs",
    "python -m vrl_jax.report --workdir DIR [DIR ...]": "tests/test_cli_commands.py::test_readme_report",
    "tools/ablation.sh": "tests/test_cli_commands.py::test_ablation_dry_run",
    "tools/tpu_vm.sh": "tests/test_cli_commands.py::test_readme_tpu_vm_dry_runs",
    "tools/gpu_launch.sh": "tests/test_tools.py::test_the_two_node_example_in_docs_multihost_runs_as_documented",
    'pip install -e ".[gcs]"': "tests/test_packaging.py::test_readme_gcs_extra",
    'pip install -e ".[test]"': "tests/test_cli_commands.py::test_ci_runs_the_readme_main_and_test_commands",
    "python benchmarks/sampler.py": "tests/test_cli_commands.py::test_readme_benchmarks",
    "python benchmarks/train_step.py": "tests/test_cli_commands.py::test_readme_benchmarks",
    "python -m vrl_jax.plan --config experiments/geo.py --model-config benchmarks/configs/qwen2_5_vl_7b.json "
    "--config.prompts_per_step=1024 --mesh data=1,fsdp=8,tensor=1 --image-patches 1024 --device-memory h100":
        "tests/test_memory.py::test_seven_b_on_eight_h100s_fits_and_on_a_v5e_8_gets_a_combination_that_fits",
    "python -m vrl_jax.plan":
        "tests/test_memory.py::test_seven_b_on_eight_h100s_fits_and_on_a_v5e_8_gets_a_combination_that_fits",
}


# ---- the README's commands ------------------------------------------------------------------------

def _readme_parts() -> tuple[list[str], str]:
    """(the lines of the ```bash blocks, the text outside any fenced block)."""
    lines, outside, fenced = [], [], False
    for line in open(README, encoding="utf-8").read().splitlines():
        if line.startswith("```"):
            fenced = not fenced and line.strip() == "```bash"
            continue
        (lines if fenced else outside).append(line)
    return lines, "\n".join(outside)


def block_commands() -> list[str]:
    """Each command line of the README's bash blocks, without its trailing comment."""
    lines, _ = _readme_parts()
    return [re.split(r"\s+#\s", line, maxsplit=1)[0].strip() for line in lines if line.strip()]


def inline_commands() -> list[str]:
    _, text = _readme_parts()
    return [s for s in re.findall(r"`([^`\n]+)`", text) if re.match(r"(python|pip|tools/)\S*( |$)", s)]


def readme(prefix: str) -> list[str]:
    """The README's code-block commands that start with `prefix`."""
    found = [c for c in block_commands() if c.startswith(prefix)]
    assert found, f"README.md shows no command starting with {prefix!r}"
    return found


def variants(command: str) -> list[str]:
    """A command with its optional `[...]` parts left out, and with all of them given."""
    bare = re.sub(r"\s*\[[^\]]*\]", "", command)
    full = re.sub(r"\[([^\]]*)\]", r"\1", command)
    return [bare] if bare == full else [bare, full]


def with_options(command: str, **values) -> list[str]:
    """The command's words with the values of some options replaced (`train="8"` -> `--train 8`)."""
    words = shlex.split(command)
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        assert flag in words, f"{command!r} has no {flag}"
        words[words.index(flag) + 1] = value
    return words


def run(words, cwd, env=None, timeout=900):
    """Runs a README command: `python` is this interpreter and `vrl_jax` this checkout's."""
    words = [sys.executable, *words[1:]] if words[0] == "python" else list(words)
    env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": xla_flags(), "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run(words, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def paragraph(text: str) -> str:
    """A message wrapped to the terminal, with its line breaks undone."""
    return " ".join(text.split())


def test_every_readme_command_has_a_test():
    shown = set(block_commands()) | set(inline_commands())
    missing = sorted(shown - set(COVERAGE))
    assert not missing, f"README commands without a test (add one and list it in COVERAGE): {missing}"
    assert not sorted(set(COVERAGE) - shown), "COVERAGE lists commands the README no longer shows"
    for command, ref in COVERAGE.items():
        path, name = ref.split("::")
        assert f"def {name}(" in open(os.path.join(ROOT, path)).read(), f"{ref} (for {command!r}) does not exist"


def test_ci_runs_the_readme_main_and_test_commands():
    """CI's stage (a) runs the main command (smoke variant) in a bare environment, stage (b) the test command."""
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    main, = readme("pip install -e . &&")
    install, train = main.split(" && ")
    smoke = train.replace("experiments/default.py", "experiments/default.py:smoke").split(" --workdir")[0]
    lines = [line.strip() for line in ci.splitlines()]
    assert install in lines and "python -m venv" in ci and ci.index(install) < ci.index(smoke + " --workdir")
    assert "python -m vrl_jax.evaluate --model \"$WD/export\" --data \"$WD/data/maye_val.jsonl\"" in ci
    test_command, = readme('pip install -e ".[test]"')
    assert test_command in lines


# ---- fixtures: the synthetic data and a tiny model with a tokenizer ------------------------------

@pytest.fixture(scope="module")
def cache_env(session_jax_cache):
    """The session's JAX compilation cache for the module's subprocesses."""
    return {"JAX_COMPILATION_CACHE_DIR": session_jax_cache,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


@pytest.fixture(scope="module")
def synthgeo_dir(tmp_path_factory):
    """The README's synthgeo command, 8/4/4 items instead of 3000/100/200."""
    cwd = tmp_path_factory.mktemp("synthgeo")
    command, = readme("python -m vrl_jax.data.synthgeo")
    ok(run(with_options(command, train="8", val="4", test="4") + ["--no-progress"], cwd))
    return cwd / "data" / "synthgeo"


@pytest.fixture(scope="module")
def model_dir(synthgeo_dir, tmp_path_factory):
    """The default experiment's tiny Qwen2.5-VL (tokenizer trained on the synthetic data), smallest shapes."""
    from vrl_jax.models.tiny import build_tiny_model
    rows = [json.loads(line) for line in (synthgeo_dir / "maye_train.jsonl").read_text().splitlines()]
    texts = [r[k] for r in rows for k in ("question", "solution", "answer")]
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), texts, vocab_size=300, hidden=32,
                            layers=1, intermediate=64, vision_width=32, vision_depth=1)


def test_readme_synthgeo(synthgeo_dir):
    manifest = json.loads((synthgeo_dir / "manifest.json").read_text())
    assert {s: e["count"] for s, e in manifest["splits"].items()} == {"train": 8, "val": 4, "test_iid": 4,
                                                                       "test_ood": 4}
    for split in manifest["splits"]:
        for name in (f"maye_{split}.jsonl", f"easyr1_{split}.parquet", f"dyme_{split}.json"):
            assert (synthgeo_dir / name).stat().st_size > 0, name


# ---- convert -----------------------------------------------------------------------------------

def test_readme_convert(model_dir, tmp_path, monkeypatch, capsys):
    """The four conversions on a tiny checkpoint: to-orbax, to-hf, to-hf --dtype bfloat16 (over the first
    export, with --overwrite), and check with and without --model/--dtype. Each runs what `python -m
    vrl_jax.convert` runs (`run_cli(main)`, in this process: one JAX start for all of them; the module's
    entry point itself runs in `test_every_cli_explains_a_missing_input`)."""
    from types import SimpleNamespace

    from tests.test_convert import read_all
    from vrl_jax import convert as cli
    from vrl_jax.errors import run_cli
    from vrl_jax.models.safetensors_io import SafetensorsFile, checkpoint_files
    monkeypatch.chdir(tmp_path)

    def convert(command):
        words = shlex.split(command.replace(HF_PLACEHOLDER, model_dir))
        assert words[:3] == ["python", "-m", "vrl_jax.convert"], words
        capsys.readouterr()
        code = run_cli(cli.main, cli.PROG, words[3:])
        out = capsys.readouterr()
        assert code == 0, f"{words}\n{out.out[-3000:]}\n{out.err[-3000:]}"
        return SimpleNamespace(stdout=out.out)

    to_orbax, = readme("python -m vrl_jax.convert to-orbax")
    convert(to_orbax)
    assert (tmp_path / "ckpt/qwen25vl3b/params").is_dir() and (tmp_path / "ckpt/qwen25vl3b/tokenizer.json").exists()

    to_hf, = readme("python -m vrl_jax.convert to-hf")
    plain, full = variants(to_hf)
    assert "--dtype bfloat16" in full and "--overwrite" in full
    convert(plain)
    before, after = read_all(model_dir), read_all(str(tmp_path / "exported"))
    assert sorted(before) == sorted(after) and all(np.array_equal(before[k], after[k]) for k in before)
    convert(full)  # into the float32 export: --overwrite replaces it
    files = checkpoint_files(str(tmp_path / "exported"))
    assert {SafetensorsFile(f).entries[k]["dtype"] for f in files for k in SafetensorsFile(f).keys()} == {"BF16"}
    assert json.loads((tmp_path / "exported/config.json").read_text())["dtype"] == "bfloat16"

    check, = readme("python -m vrl_jax.convert check")
    for command in variants(check):
        out = convert(command).stdout
        assert out.count("max|logit diff|") == 4 and "PASS" in out, out


# ---- evaluate, report, audit -------------------------------------------------------------------

def _default_workdir(root, model_dir, synthgeo_dir):
    """A stand-in for the README's `workdirs/default`: the tiny model as export/, the synthetic data as data/."""
    wd = root / "workdirs" / "default"
    wd.mkdir(parents=True)
    os.symlink(model_dir, wd / "export")
    os.symlink(synthgeo_dir, wd / "data")
    return wd


def test_readme_evaluate(model_dir, synthgeo_dir, tmp_path, cache_env):
    _default_workdir(tmp_path, model_dir, synthgeo_dir)
    command, = readme("python -m vrl_jax.evaluate")
    words = shlex.split(command) + ["--max-new-tokens", "8", "--batch-size", "2", "--max-examples", "3",
                                    "--settings", "low,high", "--out", "results/test_iid"]
    proc = ok(run(words, tmp_path, cache_env))
    metrics = json.loads((tmp_path / "results/test_iid.json").read_text())
    assert metrics["eval/test/num_problems"] == 3.0
    assert "acc/Test Set Epoch Accuracy pass@4 Temperature=1.0" in metrics and "pass@4" in proc.stdout
    assert len((tmp_path / "results/test_iid.samples.jsonl").read_text().splitlines()) == 3
    assert sum(v for k, v in metrics.items() if k.startswith("eval/test/modality/") and k.endswith("/num_problems")) == 3
    assert "test by family, pass@4 Temperature=1.0: " in proc.stdout


def _write_run(workdir, seed):
    from vrl_jax.evaluation.passk import MAYE_SETTINGS
    from vrl_jax.evaluation.writers import MetricWriter
    with MetricWriter(str(workdir), tensorboard=False) as w:
        for epoch in range(3):
            w.write(epoch * 2, {MAYE_SETTINGS[0].metric_key("val"): 0.1 * epoch + 0.01 * seed, "epoch": epoch},
                    split="eval", kind="eval")
            w.write(epoch * 2 + 1, {"response/response_lengths": 10.0 + epoch}, split="train")


def test_readme_report(tmp_path):
    """The README's report command on one workdir, and the inline form on several."""
    (tmp_path / "workdirs").mkdir()
    _write_run(tmp_path / "workdirs" / "default", 0)
    command, = readme("python -m vrl_jax.report")
    ok(run(shlex.split(command), tmp_path))
    md = (tmp_path / "workdirs/default/report/report.md").read_text()
    assert "Validation" in md and (tmp_path / "workdirs/default/report/accuracy.png").exists()
    inline = next(c for c in inline_commands() if c.startswith("python -m vrl_jax.report --workdir"))
    _write_run(tmp_path / "workdirs" / "default_seed1", 1)
    words = shlex.split(inline.replace("DIR [DIR ...]", "workdirs/default workdirs/default_seed1"))
    out = ok(run(words + ["--no-plots"], tmp_path)).stdout
    assert "wrote workdirs/default/report/report.md" in out
    assert "| default | `workdirs/default_seed1` |" in (tmp_path / "workdirs/default/report/report.md").read_text()


def test_readme_audit(tmp_path):
    command, = readme("python -m vrl_jax.rewards.audit")
    cases = [{"prediction": r"so \boxed{12}", "answer": "12", "expected": True},
             {"prediction": r"\boxed{7}", "answer": "8", "expected": False}]
    (tmp_path / "judge_cases.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cases))
    out = ok(run(shlex.split(command), tmp_path)).stdout
    assert "agreement with expected: 2/2 (100.0%)" in out and "mode: maye_compat" in out


# ---- tools/ and benchmarks/ ----------------------------------------------------------------------

def test_readme_tpu_vm_dry_runs():
    commands = [part.strip() for c in readme("tools/tpu_vm.sh") for v in variants(c) for part in v.split(" && ")]
    assert {shlex.split(c)[1] for c in commands} == {"create", "setup", "train", "fetch", "delete"}
    for command in commands:
        proc = ok(run(shlex.split(command), ROOT, {"DRY_RUN": "1"}))
        printed = [shlex.split(line) for line in proc.stdout.splitlines()]
        assert printed and all(words[0] in ("gcloud", "tar") for words in printed), proc.stdout
        if "--spot" in command:
            assert "--spot" in printed[0]


def test_ablation_dry_run(tmp_path):
    """`DRY_RUN=1 tools/ablation.sh ROOT` prints the shared start, the 12 arms from it, and the report."""
    root = tmp_path / "abl"
    stub = tmp_path / "bin"  # a `python` that refuses: a dry run that ran a command would train for an hour
    stub.mkdir()
    (stub / "python").write_text("#!/bin/sh\necho \"ran python $*\" >&2\nexit 3\n")
    (stub / "python").chmod(0o755)
    path = f"{stub}{os.pathsep}{os.environ['PATH']}"
    proc = ok(run(["tools/ablation.sh", str(root)], ROOT, {"DRY_RUN": "1", "PATH": path}, timeout=60))
    lines = [shlex.split(line) for line in proc.stdout.splitlines()]
    assert lines[0] == ["python", "-m", "vrl_jax.train", "--config", "experiments/ablation.py:start",
                        "--workdir", f"{root}/start"]
    arms = sorted(tuple(words) for words in lines[1:-1])
    expected = sorted(("python", "-m", "vrl_jax.train", "--config", f"experiments/ablation.py:{a},{s}",
                       "--workdir", f"{root}/{a}-{s}", f"--config.model.path={root}/start/export")
                      for a in ("sft", "grpo", "sft_grpo", "dyme") for s in range(3))
    assert arms == expected
    report = lines[-1]
    assert report[:4] == ["python", "-m", "vrl_jax.report", "--workdir"] and report[-2:] == ["--out", f"{root}/report"]
    assert sorted(report[4:-2]) == sorted([f"{root}/start"] + [a[6] for a in expected])
    assert not root.exists()  # a dry run writes nothing


def test_readme_benchmarks():
    """The two benchmark scripts of the README's figures table, on the smallest shapes."""
    inline = "python benchmarks/train_step.py"
    assert inline in inline_commands()
    out = ok(run(shlex.split(inline) + ["--batch", "2", "--prompt", "8", "--response", "8", "--repeats", "1"], ROOT,
                 timeout=600)).stdout
    assert out.splitlines()[-1].startswith("ratio torch/vrl_jax"), out[-2000:]
    # Every figure line names the machine it was measured on: the ratios differ between CPUs.
    figures = json.loads(out.splitlines()[-2])
    assert figures["cpu_model"] and figures["cpu_count"] >= 1 and "load_avg_1m" in figures, out[-2000:]
    assert figures.get("vector_isa", "linux only") != "unknown", figures
    assert figures["layers"] == "unroll", figures  # the default experiment's layer loop (`model.unroll_layers`)
    # a CPU backend: PyTorch on the CPU too (on a GPU both go there: benchmarks/common.torch_device)
    assert "jax_device" not in figures and figures["torch_device"] == "cpu", figures
    # The sampler split over two CPU devices (one per core), timed beside the one-device sampler in the same run,
    # so this one run covers the README's `python benchmarks/sampler.py` with and without `--devices 2`.
    assert "python benchmarks/sampler.py" in inline_commands()
    small = ["--batch", "2", "--prompt", "8", "--new", "4", "--repeats", "1"]
    out = ok(run(["python", "benchmarks/sampler.py", *small, "--devices", "2"], ROOT, timeout=600)).stdout
    figures = json.loads(out.splitlines()[-2])
    assert figures["devices"] == 2 and figures["vrl_jax_1_device_tokens_per_s"] > 0, out[-2000:]
    # and the default's decode segments beside one decode loop, in the same run
    assert figures["decode_segments"] == 4 and figures["vrl_jax_1_loop_tokens_per_s"] > 0, out[-2000:]
    # and the sampler's layer scan (`SamplerConfig.unroll_layers`) beside unrolled layers
    assert figures["layers"] == "scan" and figures["vrl_jax_unroll_tokens_per_s"] > 0, out[-2000:]
    assert figures["vrl_jax_ynn_dots_tokens_per_s"] > 0, out[-2000:]  # and YNN's dots, which the sampler turns off
    assert out.splitlines()[-1].startswith("ratio vrl_jax/transformers"), out[-2000:]
    bad = run(["python", "benchmarks/sampler.py", *small, "--devices", "3"], ROOT, timeout=600)
    assert bad.returncode == 2 and "--devices 3 must be >= 1 and divide --batch 2" in bad.stderr, bad.stderr[-2000:]
    bad = run(["python", "benchmarks/sampler.py", *small, "--decode-segments", "0"], ROOT, timeout=600)
    assert bad.returncode == 2 and "--decode-segments 0 must be >= 1" in bad.stderr, bad.stderr[-2000:]


# ---- bad input: one paragraph, exit code 2, no traceback ------------------------------------------

def user_error(main, argv, capsys):
    """(exit code, stderr as one line) of `main(argv)` run as its `python -m` entry point runs it."""
    from vrl_jax.errors import run_cli
    capsys.readouterr()
    try:
        rc = run_cli(main, "prog", argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, paragraph(err)


def test_evaluate_missing_or_wrong_inputs(model_dir, synthgeo_dir, tmp_path, capsys):
    from vrl_jax import evaluate
    data = str(synthgeo_dir / "maye_val.jsonl")

    def fails(*argv):
        rc, err = user_error(evaluate.main, list(argv), capsys)
        assert rc == 2, err
        return err

    err = fails("--model", str(tmp_path / "nope"), "--data", data)
    assert f"--model {tmp_path / 'nope'}: no such directory" in err and "config.json" in err and "to-orbax" in err
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(model_dir, name), no_tokenizer / name)
    assert "holds no tokenizer files" in fails("--model", str(no_tokenizer), "--data", data)
    err = fails("--model", model_dir, "--data", str(tmp_path / "val.jsonl"))
    assert f"--data {tmp_path / 'val.jsonl'}: no such file" in err and "python -m vrl_jax.data.synthgeo" in err
    (tmp_path / "val.txt").write_text("hello\n")
    assert "unknown data file extension '.txt'" in fails("--model", model_dir, "--data", str(tmp_path / "val.txt"))
    assert "--k must be >= 1, got 0" in fails("--model", model_dir, "--data", data, "--k", "0")


def test_report_bad_arguments(tmp_path, capsys):
    from vrl_jax.evaluation import report
    _write_run(tmp_path / "run", 0)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("")
    for argv, message in (
            (["--workdir", str(tmp_path / "empty")], f"{tmp_path / 'empty'}: no metrics.jsonl"),
            (["--workdir", str(tmp_path / "gone")], f"--workdir {tmp_path / 'gone'}: no such directory"),
            (["--workdir", str(tmp_path / "run"), "--group", "seed(\\d"], "--group 'seed(\\\\d' is not a regular"),
            (["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "a_file")], "is a file")):
        rc, err = user_error(report.main, argv, capsys)
        assert rc == 2 and message in err, err


def test_synthgeo_bad_arguments(tmp_path, capsys):
    from vrl_jax.data.synthgeo import __main__ as synthgeo_cli
    (tmp_path / "a_file").write_text("")
    out = str(tmp_path / "ds")
    for argv, message in (
            (["--out", out, "--train", "4", "--tokenizer", "--vocab-size", "10"], "--vocab-size must be >= 264"),
            (["--out", str(tmp_path / "a_file"), "--val", "2"], "is a file"),
            (["--out", out], "nothing to write"),
            (["--out", out, "--val", "2", "--image-size", "5"], "--image-size: "),
            (["--out", out, "--val", "2", "--families", "hexagon"], "unknown synthgeo family 'hexagon'")):
        rc, err = user_error(synthgeo_cli.main, argv, capsys)
        assert rc == 2 and message in err, err
    assert not os.path.exists(out)  # refused before anything was written


def test_audit_bad_arguments(tmp_path, capsys):
    from vrl_jax.rewards import audit
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "one.jsonl").write_text('{"prediction": "1", "answer": "1"}\n')
    for argv, message in (
            ([str(tmp_path / "empty.jsonl")], "holds no record; expected one object per line"),
            ([str(tmp_path / "nope.jsonl")], "nope.jsonl: no such file; expected a JSONL file"),
            ([str(tmp_path / "one.jsonl"), "--timeout", "0"], "--timeout: JudgeConfig.timeout_s"),
            ([str(tmp_path / "one.jsonl"), "--workers", "0"], "--workers: JudgeConfig.workers")):
        rc, err = user_error(audit.main, argv, capsys)
        assert rc == 2 and message in err, err


@pytest.mark.parametrize("module", ["vrl_jax.convert", "vrl_jax.evaluate", "vrl_jax.report",
                                    "vrl_jax.data.synthgeo", "vrl_jax.rewards.audit"])
def test_every_cli_runs_through_run_cli(module, tmp_path):
    """`python -m MODULE` with a missing input: one paragraph, exit code 2; --debug shows the traceback."""
    missing = str(tmp_path / "missing")
    argv = {"vrl_jax.convert": ["to-orbax", missing, str(tmp_path / "out")],
            "vrl_jax.evaluate": ["--model", missing, "--data", missing],
            "vrl_jax.report": ["--workdir", missing],
            "vrl_jax.data.synthgeo": ["--out", str(tmp_path / "ds"), "--train", "2", "--tokenizer",
                                      "--vocab-size", "10"],
            "vrl_jax.rewards.audit": [missing]}[module]
    proc = run(["python", "-m", module, *argv], tmp_path, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"python -m {module}: error:" in proc.stderr
    if module != "vrl_jax.data.synthgeo":  # argparse's own errors have no traceback to show
        debug = run(["python", "-m", module, *argv, "--debug"], tmp_path, timeout=300)
        assert debug.returncode != 0 and "Traceback" in debug.stderr
