"""Bad input as a new user types it, and faults mid-run: each gives one paragraph naming the key, file or
path and what was expected, exit code 2 and no traceback, before anything slow starts; faults lose no data.

The full disk is simulated with RLIMIT_FSIZE lowered and SIGXFSZ ignored in the trainer's process
(writes past the limit fail with EFBIG, as on a full disk they fail with ENOSPC): it needs no mount. A
read-only workdir is a read-only tmpfs in a private mount namespace, where `unshare` allows it.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from tests.test_train_e2e import CACHE, ROOT, SMOKE, compilation_cache, rows, run_train  # noqa: F401
from vrl_jax import configs, train
from vrl_jax.train import load_config_file as load_config
from vrl_jax.errors import UserError, run_cli
from tests.xla_flags import xla_flags

PROG = "python -m vrl_jax.train"


def cli(argv, capsys, monkeypatch):
    """Runs the train CLI in this process; returns (exit code, stderr)."""
    monkeypatch.delenv("VRL_JAX_DEBUG", raising=False)
    code = run_cli(train.main, PROG, argv)
    return code, capsys.readouterr().err


def assert_one_paragraph(err: str, *needles: str):
    """`prog: error: ...` then the --debug hint, nothing else after it, and no traceback anywhere."""
    assert "Traceback" not in err and err.count(f"{PROG}: error:") == 1, err
    lines = err[err.index(f"{PROG}: error:"):].strip().splitlines()
    assert lines[0].startswith(f"{PROG}: error: ") and lines[-1].startswith("(run with --debug"), err
    assert "" not in lines, err
    text = " ".join(" ".join(lines[:-1]).split())
    for needle in needles:
        assert needle in text, (needle, text)


# ---------------------------------------------------------------------------------------------
# The command line


@pytest.fixture
def broken_config(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("from vrl_jax.configs import base_config\n\ndef get_config(arg=None):\n"
                    "    c = base_config(\n    return c\n")
    return str(path)


@pytest.mark.parametrize("args,needles", [
    (["--config.no_such_key=1"], ["--config.no_such_key", "config.no_such_key is not a config key", "rl_steps"]),
    (["--config.data.trian=x"], ["config.data.trian is not a config key", "did you mean config.data.train?"]),
    (["--config.rl_steps=abc"], ["--config.rl_steps=abc", "config.rl_steps takes an integer (now 2)"]),
    (["--config.rollout.temperature=hot"], ["config.rollout.temperature takes a number (now 1.0)"]),
    (["--wrkdir=x"], ["unknown flag --wrkdir", "usage:"]),
    (["stray"], ["unexpected argument(s) ['stray']"]),
])
def test_command_line_mistakes_are_one_paragraph(args, needles, tmp_path, capsys, monkeypatch):
    code, err = cli(["--config", SMOKE, "--workdir", str(tmp_path / "w"), *args], capsys, monkeypatch)
    assert code == 2
    assert_one_paragraph(err, *needles)
    assert not (tmp_path / "w").exists()  # nothing was created


@pytest.mark.parametrize("argv,needles", [
    (["--config", "experiments/nope.py"], ["no config file experiments/nope.py", "default.py, dyme.py"]),
    (["--config", "experiments/geo.py:nope"], ["--config experiments/geo.py:nope", "unknown variant 'nope'"]),
    (["--config", "experiments/default.py:nope"], ["unknown variant 'nope'", "smoke"]),
    (["--config", "experiments/default.py"], ["--workdir is required"]),
    ([], ["--config is required"]),
])
def test_missing_flags_files_and_variants(argv, needles, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    workdir = [] if "--workdir is required" in needles else ["--workdir", str(tmp_path / "w")]
    code, err = cli([*argv, *workdir], capsys, monkeypatch)
    assert code == 2
    assert_one_paragraph(err, *needles)


def test_a_syntax_error_in_a_config_names_its_file_and_line(broken_config, tmp_path, capsys, monkeypatch):
    code, err = cli(["--config", broken_config, "--workdir", str(tmp_path / "w")], capsys, monkeypatch)
    assert code == 2
    assert_one_paragraph(err, f"{broken_config}, line 4", "syntax error", "c = base_config(")


def test_debug_shows_the_traceback(broken_config, tmp_path, monkeypatch):
    monkeypatch.delenv("VRL_JAX_DEBUG", raising=False)
    with pytest.raises(UserError, match="syntax error"):
        run_cli(train.main, PROG, ["--config", broken_config, "--workdir", str(tmp_path / "w"), "--debug"])


def test_overrides_and_flags_still_apply():
    cmd = train.parse_command_line(["--config", SMOKE, "--workdir=W", "--config.rl_steps=7", "--noreport",
                                    "--config.eval.splits=('val',)", "--allow_config_change"])
    assert (cmd.workdir, cmd.report, cmd.allow_config_change) == ("W", False, True)
    assert cmd.config.rl_steps == 7 and tuple(cmd.config.eval.splits) == ("val",)
    with pytest.raises(AttributeError):
        cmd.config.new_key = 1  # locked


# ---------------------------------------------------------------------------------------------
# Config values


def smoke_config() -> ml_collections.ConfigDict:
    return load_config(SMOKE)


def with_value(key: str, value):
    c = smoke_config()
    *parents, last = key.split(".")
    node = c
    for p in parents:
        node = node[p]
    node[last] = value
    return c


@pytest.mark.parametrize("key,value", [
    ("data.max_fault_share", 1.5), ("data.max_fault_share", -0.1),
    ("optim.learning_rate", 0.0), ("optim.learning_rate", -1e-5), ("sft.learning_rate", 0.0),
    ("optim.warmup_ratio", 1.5), ("optim.final_lr_ratio", -1.0), ("optim.b2", 1.0), ("optim.eps", 0.0),
    ("optim.clip_grad_norm", -1.0), ("loss.clip_low", 1.0), ("loss.clip_high", -0.1), ("loss.clip_c", 0.5),
    ("loss.kl_coef", -1.0), ("loss.chunk_size", 0), ("rollout.top_p", 0.0),
    ("rollout.top_p", 1.5), ("rollout.top_k", -1), ("rollout.decode_segments", 0), ("mesh.cpu_devices", 0),
    ("advantage.gamma", 2.0),
    ("data.synthgeo.text_fraction", 2.0), ("data.synthgeo.train", -1), ("model.tiny.hidden", 36),
    ("model.tiny.layers", 0), ("dapo.max_rounds", 0), ("eval.max_new_tokens", -1),
    ("rewards.judge.timeout_s", 0.0), ("eval.splits", ("val", "test")), ("optim.learning_rate", float("nan")),
    ("data.synthgeo.levels", (0, 3)),
])
def test_config_values_that_would_fail_later_are_rejected_naming_the_key(key, value):
    with pytest.raises(configs.ConfigValidationError) as e:
        configs.validate(with_value(key, value), num_devices=1)
    assert f"config.{key}" in str(e.value), str(e.value)


def test_batches_that_do_not_split_over_the_devices_are_rejected_naming_the_key():
    """Caught before anything compiles, not as the train step's error: each RL micro-batch, each SFT
    micro-batch, the prompts and the evaluation batch must split over the data-parallel devices."""
    c = smoke_config()  # 2 prompts x 2 samples, 2 micro-batches; SFT batches of 4
    configs.validate(c, num_devices=2)
    for key, change, devices in (("mesh.data", dict(num_micro=4), 2), ("sft.batch_size", dict(prompts_per_step=4), 4),
                                 ("eval.batch_size", dict(eval=dict(batch_size=3)), 2)):
        bad = smoke_config()
        bad.update(change)
        with pytest.raises(configs.ConfigValidationError) as e:
            configs.validate(bad, num_devices=devices)
        assert f"config.{key}" in str(e.value), (key, str(e.value))


def test_an_unknown_reward_name_is_rejected_before_the_run():
    c = smoke_config()
    c.rewards.weights = {"accuracy": 1.0, "language_penalty": 1.0}
    with pytest.raises(configs.ConfigValidationError, match=r"config.rewards.weights: reward 'language_penalty'"):
        configs.validate(c, num_devices=1)


@pytest.mark.parametrize("plugins,key,expected", [
    ({"mine": "tests.toy_rewards:no_such_function"}, "config.rewards.plugins.mine", "has no attribute"),
    ({"mine": "tests/toy_rewards.py"}, "config.rewards.plugins.mine", "expected 'package.module:function'"),
    ({"accuracy": "tests.toy_rewards:early_letters"}, "config.rewards.plugins.accuracy", "built-in reward name"),
    ({}, "config.rewards.weights", "reward 'mine': unknown name"),
])
def test_a_bad_reward_plugin_is_rejected_before_the_run_naming_it(plugins, key, expected):
    c = smoke_config()
    c.rewards.plugins = plugins
    c.rewards.weights = {"accuracy": 0.0, "mine": 1.0}
    with pytest.raises(configs.ConfigValidationError) as e:
        configs.validate(c, num_devices=1)
    assert key in str(e.value) and expected in str(e.value), str(e.value)


# ---------------------------------------------------------------------------------------------
# Missing inputs


def experiment_config(name: str):
    return load_config(os.path.join(ROOT, "experiments", name))


@pytest.mark.parametrize("experiment,needles", [
    ("geo.py", ["config.data.train = datasets/geometry3k/geometry3k_rl_v0.jsonl",
                "config.data.eval.val = datasets/geometry3k/geometry3k_validation_v0.jsonl",
                "ManTle/MAYE", "--formats maye", "--config.data.train=data/synthgeo/maye_train.jsonl"]),
    ("mmmath.py", ["datasets/mm_math/mm_math_rl_v0.jsonl", "ManTle/MAYE", "mathverse_images/"]),
    ("dyme.py", ["config.data.train = data/chartqa/train_high.json", "HuggingFaceM4/ChartQA",
                 "HKUST-LongGroup/DyME", "--formats dyme", "data/synthgeo/dyme_train.json"]),
])
def test_missing_data_says_what_to_put_where(experiment, needles, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        train_check(experiment_config(experiment), tmp_path / "w")
    text = " ".join(str(e.value).split())
    for needle in needles + ["config.model.path", "convert to-orbax"]:
        assert needle in text, (needle, text)
    # The synthgeo command it suggests is one the synthgeo CLI accepts.
    from vrl_jax.data.synthgeo.__main__ import parse_args
    command = text.split("run `python -m vrl_jax.data.synthgeo ")[1].split("`")[0]
    args = parse_args(command.split())
    assert args.train == 2000 and args.formats == (experiment_config(experiment).data.source,)


def train_check(config, workdir):
    from vrl_jax.run_setup import check_inputs
    check_inputs(config, str(workdir))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny HF model directory as the trainer builds it (config, tokenizer, safetensors)."""
    from vrl_jax.data.synthgeo import GeneratorConfig
    from vrl_jax.data.synthgeo.generator import corpus_texts, generate_split
    from vrl_jax.models.tiny import build_tiny_model
    d = str(tmp_path_factory.mktemp("tiny_model"))
    build_tiny_model(d, corpus_texts(generate_split("train", 40, GeneratorConfig())), hidden=32, layers=1,
                     intermediate=64, vision_width=32, vision_depth=1)
    return d


def model_copy(tiny_model, tmp_path, drop=()):
    d = tmp_path / "model"
    shutil.copytree(tiny_model, d)
    for name in drop:
        os.remove(d / name)
    return d


def check_model(path, tmp_path) -> str:
    c = smoke_config()
    c.model.path = str(path)
    with pytest.raises(UserError) as e:
        train_check(c, tmp_path / "w")
    text = " ".join(str(e.value).split())
    assert text.startswith("config.model.path: ") and "convert to-orbax" in text, text
    return text


def test_a_good_model_directory_passes(tiny_model, tmp_path):
    c = smoke_config()
    c.model.path = tiny_model
    train_check(c, tmp_path / "w")


def test_missing_and_empty_model_directories(tmp_path):
    assert f"{tmp_path}/nowhere: no such directory" in check_model(tmp_path / "nowhere", tmp_path)
    (tmp_path / "empty").mkdir()
    text = check_model(tmp_path / "empty", tmp_path)
    assert "lacks config.json, tokenizer files" in text and "(the directory is empty)" in text


def test_a_model_directory_without_tokenizer_or_weights(tiny_model, tmp_path):
    d = model_copy(tiny_model, tmp_path, drop=("tokenizer.json", "tokenizer_config.json", "model.safetensors"))
    text = check_model(d, tmp_path)
    assert f"{d} lacks tokenizer files" in text and "weights (*.safetensors" in text


def test_an_unsupported_model_type(tiny_model, tmp_path):
    d = model_copy(tiny_model, tmp_path)
    raw = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**raw, "model_type": "idefics3"}))
    assert f"{d}/config.json: model_type 'idefics3' is not supported" in check_model(d, tmp_path)


def test_a_truncated_safetensors_file(tiny_model, tmp_path):
    d = model_copy(tiny_model, tmp_path)
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    assert f"{path}: truncated safetensors file" in check_model(d, tmp_path)


def test_a_mis_shaped_safetensors_file(tiny_model, tmp_path):
    from safetensors.numpy import save_file

    from vrl_jax.models.safetensors_io import SafetensorsFile
    d = model_copy(tiny_model, tmp_path)
    path = d / "model.safetensors"
    st = SafetensorsFile(str(path))
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    tensors["model.norm.weight"] = np.ones(7, np.float32)  # hidden is 32
    save_file(tensors, str(path))
    text = check_model(d, tmp_path)
    assert f"{path}: tensor 'model.norm.weight' has shape (7,), but the config implies (32,)" in text


def test_a_safetensors_header_that_contradicts_its_data(tmp_path):
    from vrl_jax.models.safetensors_io import CheckpointError, SafetensorsFile
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(CheckpointError, match=r"bad.safetensors: tensor 'w' of shape \[2, 2\] and dtype F32 needs "
                                              r"16 bytes, but its data_offsets \[0, 8\] span 8"):
        SafetensorsFile(str(path))


def test_a_workdir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="--workdir .*file: cannot write there: it is not a directory"):
        train_check(smoke_config(), tmp_path / "file")


def cli_subprocess(*args, preexec_fn=None, timeout=300):
    cmd = [sys.executable, "-m", "vrl_jax.train", *args]
    env = {**os.environ, "XLA_FLAGS": xla_flags(), "JAX_COMPILATION_CACHE_DIR": CACHE["dir"]}
    env.pop("VRL_JAX_DEBUG", None)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec_fn)


def test_the_train_command_stops_on_a_missing_model_before_generating_data(tmp_path):
    """Today's code generated the synthetic data first, then failed with 'no tokenizer files'."""
    (tmp_path / "empty_model").mkdir()
    out = cli_subprocess(f"--config={SMOKE}", f"--workdir={tmp_path / 'w'}",
                         f"--config.model.path={tmp_path / 'empty_model'}")
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert_one_paragraph(out.stderr, "config.model.path:", "lacks config.json")
    assert not (tmp_path / "w" / "data").exists()  # nothing was generated


def test_a_read_only_workdir(tmp_path):
    """A read-only file system mounted at the workdir, in a private mount namespace."""
    workdir = tmp_path / "ro"
    workdir.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro,size=1m tmpfs {workdir}"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (unshare/mount not permitted)")
    cmd = " ".join([sys.executable, "-m", "vrl_jax.train", f"--config={SMOKE}", f"--workdir={workdir}"])
    out = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro,size=1m tmpfs {workdir} && {cmd}"],
                         cwd=ROOT, env={**os.environ, "XLA_FLAGS": xla_flags()}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert_one_paragraph(out.stderr, f"--workdir {workdir}: cannot write there: the file system is read-only")


# ---------------------------------------------------------------------------------------------
# Corrupt data


def write_png(path, size=(56, 56)):
    from PIL import Image
    Image.new("RGB", size, (200, 10, 10)).save(path)


def test_a_corrupt_image_in_prompt_length_filtering_is_a_counted_fault(tiny_model, tmp_path):
    """Today PIL.UnidentifiedImageError stopped the run; now it is one `corrupt_image` fault in the budget."""
    from vrl_jax.data.faults import FaultCounter
    from vrl_jax.data.formats import Example, ImageRef
    from vrl_jax.models.processor import VLProcessor
    from vrl_jax.run_setup import drop_long_prompts
    processor = VLProcessor.from_pretrained(tiny_model, length_buckets=(128, 256), patch_buckets=(256, 1024))
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    write_png(good)
    bad.write_bytes(b"this is not an image")
    examples = [Example(id=str(i), question="<image>What is the area?", images=(ImageRef(path=str(p)),),
                        answer="4", solution="\\boxed{4}", source=f"train.jsonl:{i + 1}")
                for i, p in enumerate([good, bad, good, good])]
    faults = FaultCounter(max_share=0.5)
    faults.ok(len(examples))  # as the loader counted them
    kept = drop_long_prompts(examples, processor, "plain", 256, faults)
    assert [e.id for e in kept] == ["0", "2", "3"]
    assert dict(faults.counts) == {"corrupt_image": 1} and faults.num_ok == 3 and faults.num_seen == 4
    assert faults.examples[0].where == "train.jsonl:2" and "bad.png" in faults.examples[0].detail
    assert "1 of 4 samples skipped as faulty (corrupt_image 1" in faults.brief()


# ---------------------------------------------------------------------------------------------
# End to end: a corrupt image, checkpoints only at the end, a full disk, a rejected config change


def smoke_data(workdir):
    """The smoke run's synthetic data, written where the trainer would generate it, with one train image
    replaced by bytes PIL cannot identify."""
    from vrl_jax.data.synthgeo import GeneratorConfig, export_dataset
    c = smoke_config().data.synthgeo
    out = os.path.join(workdir, "data")
    export_dataset(out, {"train": c.train, "val": c.val, "test_iid": c.test, "test_ood": c.test},
                   GeneratorConfig(seed=c.seed, levels=tuple(c.levels), text_fraction=c.text_fraction),
                   formats=("maye",), progress=False)
    with open(os.path.join(out, "maye_train.jsonl")) as f:
        image = json.loads(f.readline())["image"]
    with open(os.path.join(out, image), "wb") as f:
        f.write(b"not a png")
    return image


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The smoke run with one corrupt image and `checkpoint.every_steps=0`: today's code crashed on the
    image (UnidentifiedImageError) and, without it, with ZeroDivisionError after step 1."""
    wd = str(tmp_path_factory.mktemp("finished"))
    image = smoke_data(wd)
    out = run_train(wd, "--config.checkpoint.every_steps=0")
    return wd, image, out


def test_a_corrupt_image_is_counted_and_the_run_goes_on(finished_run):
    wd, image, out = finished_run
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "corrupt_image 1" in out.stdout and image in out.stdout  # reported, with the file
    assert [r["step"] for r in rows(wd)] == [1, 2, 3, 4]


def test_checkpoint_every_steps_zero_saves_only_at_the_end(finished_run):
    wd, _, out = finished_run
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["4"]


def tree_digest(directory) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_a_config_change_is_refused_without_touching_config_json(finished_run, tmp_path):
    wd = str(tmp_path / "w")
    shutil.copytree(finished_run[0], wd)
    before = open(os.path.join(wd, "config.json")).read()
    out = run_train(wd, "--config.checkpoint.every_steps=0",
                    "--config.rl_steps=4", "--config.optim.learning_rate=0.001")
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert_one_paragraph(out.stderr, "written with a different config", "optim.learning_rate: 0.0003 -> 0.001",
                         "rl_steps: 2 -> 4", "--allow_config_change")
    assert "\n  optim.learning_rate: 0.0003 -> 0.001\n  rl_steps: 2 -> 4\n" in out.stderr  # one key a line
    assert open(os.path.join(wd, "config.json")).read() == before


def fill_disk_at(limit_bytes: int):
    def preexec():  # in the trainer's process: writes past `limit_bytes` fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, resource.RLIM_INFINITY))
    return preexec


def test_a_full_disk_mid_run_is_one_paragraph_and_keeps_the_checkpoints(finished_run, tmp_path):
    """Resume the finished run for 2 more steps (--allow_config_change) on a 'disk' that takes no file over
    200 kB: every checkpoint's tensor file is larger, so the save at the end fails. One paragraph, exit 2,
    no half-written checkpoint left, the previous checkpoint unchanged; then, with room again, the same
    command resumes from it and finishes."""
    wd = str(tmp_path / "w")
    shutil.copytree(finished_run[0], wd)
    ckpts = os.path.join(wd, "checkpoints")
    before = tree_digest(ckpts)
    more = ("--config.checkpoint.every_steps=0", "--config.rl_steps=4",
            "--allow_config_change")
    out = run_train(wd, *more, preexec_fn=fill_disk_at(200_000))
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stdout + out.stderr, (out.stdout + out.stderr)[-5000:]
    assert_one_paragraph(out.stderr, f"cannot write the checkpoint {ckpts}/6",
                         "the file is larger than this process may write")
    assert sorted(os.listdir(ckpts)) == ["4"]  # no *.orbax-checkpoint-tmp left
    assert tree_digest(ckpts) == before
    again = run_train(wd, *more)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed" in again.stdout and "at step 4" in again.stdout
    assert [r["step"] for r in rows(wd)] == [1, 2, 3, 4, 5, 6]
