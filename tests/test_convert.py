"""Checkpoint conversion: round trips, both key layouts, sharded files, placement, bad input, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from tests.tiny_models import build_hf_model
from vrl_jax import convert
from vrl_jax.models.config import ConfigError, ModelConfig
from vrl_jax.models.loading import export_hf, load_model
from vrl_jax.models.safetensors_io import CheckpointError, SafetensorsFile, checkpoint_files
from vrl_jax.models.weights import load_hf_params


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("q25"))
    build_hf_model(d, "qwen2_5_vl", tie=False, seed=3)
    return d


def read_all(directory):
    out = {}
    for path in checkpoint_files(directory):
        f = SafetensorsFile(path)
        out.update({k: np.array(f.get(k)) for k in f.keys()})
    return out


def flat_params(model):
    return {".".join(map(str, p)): np.asarray(v.value) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_round_trip(hf_dir, out) -> dict:
    """HF -> vrl_jax -> HF: the same keys, dtypes and bits, and transformers loads `out` with equal logits.
    Returns the exported tensors."""
    from transformers import AutoModelForImageTextToText
    export_hf(load_model(hf_dir), out, source_dir=hf_dir)
    before, after = read_all(hf_dir), read_all(out)
    assert sorted(before) == sorted(after)
    for key in before:
        assert before[key].dtype == after[key].dtype and np.array_equal(before[key], after[key]), key
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        ref = AutoModelForImageTextToText.from_pretrained(hf_dir).eval()(input_ids=ids).logits
        got = AutoModelForImageTextToText.from_pretrained(out).eval()(input_ids=ids).logits
    assert torch.equal(ref, got)
    return after


def test_hf_to_vrl_jax_to_hf_is_bit_identical_and_loads_in_transformers(hf_dir, tmp_path):
    assert_round_trip(hf_dir, str(tmp_path / "export"))


def test_orbax_round_trip_through_the_cli(hf_dir, tmp_path):
    orbax_dir, back = str(tmp_path / "orbax"), str(tmp_path / "back")
    assert convert.main(["to-orbax", hf_dir, orbax_dir]) == 0
    assert os.path.exists(os.path.join(orbax_dir, "config.json"))
    a, b = flat_params(load_model(hf_dir)), flat_params(load_model(orbax_dir))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert convert.main(["to-hf", orbax_dir, back]) == 0
    before, after = read_all(hf_dir), read_all(back)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_new_key_layout_and_sharded_index(hf_dir, tmp_path):
    tensors = read_all(hf_dir)
    renamed = {("model.language_model." + k[6:] if k.startswith("model.") else
                "model.visual." + k[7:] if k.startswith("visual.") else k): v for k, v in tensors.items()}
    keys = sorted(renamed)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(os.path.join(hf_dir, "config.json"), d / "config.json")
    for name, ks in shards.items():
        save_file({k: renamed[k] for k in ks}, str(d / name))
    index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    a, b = flat_params(load_model(hf_dir)), flat_params(load_model(str(d)))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_export_writes_shards_with_an_index_and_bfloat16(hf_dir, tmp_path):
    from transformers import AutoModelForImageTextToText
    out = str(tmp_path / "bf16")
    assert convert.main(["to-hf", hf_dir, out, "--dtype", "bfloat16", "--max-shard-gb", "0.0002"]) == 0
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_parameters_placed_into_their_sharding(hf_dir):
    mesh = jax.make_mesh((8,), ("fsdp",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    by_rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))

    def shardings(path, shape):
        return by_rows if path == "language.embed" else replicated

    model = load_hf_params(hf_dir, ModelConfig.from_pretrained(hf_dir), shardings=shardings)
    assert model.language.embed.value.sharding == by_rows
    assert len(model.language.embed.value.addressable_shards) == 8
    assert model.language.layers.q_w.value.sharding == replicated


def test_check_cli_passes_and_fails(hf_dir, tmp_path, capsys):
    assert convert.main(["check", hf_dir]) == 0
    printed = capsys.readouterr().out
    assert "two images of different sizes" in printed and "PASS" in printed
    other = str(tmp_path / "other")
    build_hf_model(other, "qwen2_5_vl", tie=False, seed=4)
    assert convert.main(["check", hf_dir, "--model", other]) == 1
    assert "FAIL" in capsys.readouterr().out


# ---- bad input ---------------------------------------------------------------------------------

def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_missing_directory_and_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    shutil.copy(os.path.join(os.path.dirname(__file__), "..", "setup.py"), tmp_path / "empty" / "x")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path / "empty"))


def test_config_without_weights(hf_dir, tmp_path):
    d = tmp_path / "cfg_only"
    d.mkdir()
    shutil.copy(os.path.join(hf_dir, "config.json"), d / "config.json")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_model(str(d))


def test_unsupported_model_type(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path / "llama")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["model_type"] = "llama"
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ConfigError, match="model_type 'llama' is not supported"):
        load_model(d)


def test_bad_config_field_is_named(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path / "badcfg")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["text_config"]["rope_parameters"]["mrope_section"] = [2, 2, 2]
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ConfigError, match="mrope_section"):
        ModelConfig.from_pretrained(d)


def _rewrite(d, edit):
    path = os.path.join(d, "model.safetensors")
    tensors = read_all(d)
    edit(tensors)
    save_file(tensors, path)


def test_shape_mismatch_names_key_and_both_shapes(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path / "shape")
    key = "model.layers.1.self_attn.q_proj.weight"
    _rewrite(d, lambda t: t.__setitem__(key, np.zeros((64, 32), np.float32)))
    with pytest.raises(CheckpointError, match=r"q_proj.weight.*\(64, 32\).*\(64, 64\)"):
        load_model(d)


def test_unknown_and_missing_keys(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path / "unknown")
    _rewrite(d, lambda t: t.__setitem__("model.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match="model.extra.weight"):
        load_model(d)
    d2 = copy_dir(hf_dir, tmp_path / "missing")
    _rewrite(d2, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"language.layers.up_w \(layers \[1\] missing\)"):
        load_model(d2)


def test_truncated_safetensors(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path / "trunc")
    path = os.path.join(d, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        load_model(d)
    with open(path, "r+b") as f:
        f.truncate(5)
    with pytest.raises(CheckpointError, match="no header"):
        load_model(d)


# ---- the CLI on bad input: one paragraph, exit code 2, and nothing lost or mixed ----------------

def cli(argv, capsys):
    """(exit code, stderr as one line) of `python -m vrl_jax.convert ARGV`, run in this process."""
    from vrl_jax.errors import run_cli
    capsys.readouterr()
    rc = run_cli(convert.main, "python -m vrl_jax.convert", argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, " ".join(err.split())


def test_to_hf_over_an_earlier_sharded_export_refuses_then_overwrite_leaves_no_old_shard(hf_dir, tmp_path, capsys):
    """An old index and its shards beside a new model.safetensors made vrl_jax read the old weights (the
    index wins) and transformers the new ones. Now: refused without --overwrite, replaced with it."""
    from transformers import AutoModelForImageTextToText
    out = str(tmp_path / "exported")
    assert convert.main(["to-hf", hf_dir, out, "--max-shard-gb", "0.0002"]) == 0
    old_files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in old_files
    (tmp_path / "exported" / "NOTES.md").write_text("mine")
    other = str(tmp_path / "other")
    build_hf_model(other, "qwen2_5_vl", tie=False, seed=4)

    rc, err = cli(["to-hf", other, out], capsys)
    assert rc == 2 and f"OUT_DIR {out} is not empty" in err and "--overwrite" in err
    assert sorted(os.listdir(out)) == sorted(old_files + ["NOTES.md"])  # untouched

    assert cli(["to-hf", other, out, "--overwrite"], capsys)[0] == 0
    # no old index or shard is left; a file convert does not write is kept
    assert sorted(os.listdir(out)) == ["NOTES.md", "config.json", "generation_config.json", "model.safetensors"]
    new, ours = read_all(other), flat_params(load_model(out))
    expected = flat_params(load_model(other))
    assert all(np.array_equal(ours[k], expected[k]) for k in expected)
    theirs = AutoModelForImageTextToText.from_pretrained(out).state_dict()
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert np.array_equal(theirs[key].numpy(), new["model.layers.0.self_attn.q_proj.weight"])


def test_to_orbax_into_a_non_empty_directory(hf_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    out.mkdir()
    shutil.copy(os.path.join(hf_dir, "model.safetensors"), out / "model.safetensors")  # an HF export was here
    rc, err = cli(["to-orbax", hf_dir, str(out)], capsys)
    assert rc == 2 and "is not empty (it holds model.safetensors)" in err
    assert cli(["to-orbax", hf_dir, str(out), "--overwrite"], capsys)[0] == 0
    # transformers would have read the stale safetensors beside the new params/
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "params"]
    rc, err = cli(["to-hf", str(out), str(out), "--overwrite"], capsys)
    assert rc == 2 and "is the source directory" in err


@pytest.mark.parametrize("case, message", [
    ("missing", "{role} {d}: no such directory. A model directory holds config.json and the weights"),
    ("no_config", "{role} {d} holds no config.json (it holds notes.txt)"),
    ("no_weights", "{role} {d}: no *.safetensors weights"),
    ("llama", "model_type 'llama' is not supported"),
    ("truncated", "truncated safetensors file"),
])
def test_convert_on_a_missing_or_broken_model_directory(case, message, hf_dir, tmp_path, capsys):
    d = tmp_path / case
    if case == "no_config":
        d.mkdir()
        (d / "notes.txt").write_text("")
    elif case == "no_weights":
        d.mkdir()
        shutil.copy(os.path.join(hf_dir, "config.json"), d / "config.json")
    elif case == "llama":
        copy_dir(hf_dir, d)
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    elif case == "truncated":
        copy_dir(hf_dir, d)
        with open(d / "model.safetensors", "r+b") as f:
            f.truncate(os.path.getsize(d / "model.safetensors") // 2)
    for role, argv in (("SRC", ["to-orbax", str(d), str(tmp_path / "out")]),
                       ("SRC", ["to-hf", str(d), str(tmp_path / "out")]),
                       ("HF_DIR", ["check", str(d)]), ("--model", ["check", hf_dir, "--model", str(d)])):
        rc, err = cli(argv, capsys)
        assert rc == 2 and message.format(d=d, role=role) in err, (argv, err)
        assert not (tmp_path / "out").exists()


def test_convert_cli_subprocess_explains_a_missing_directory(tmp_path):
    import subprocess
    missing = str(tmp_path / "Qwen2.5-VL-3B-Instruct")
    proc = subprocess.run([sys.executable, "-m", "vrl_jax.convert", "to-orbax", missing, str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"SRC {missing}: no such directory" in " ".join(proc.stderr.split())


def test_check_without_torch_names_the_install_command(hf_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails as if it were not installed
    rc, err = cli(["check", hf_dir], capsys)
    assert rc == 2 and 'pip install -e ".[test]"' in err and "PyTorch is not installed" in err


def assert_orbax_round_trip_and_check(d: str, tmp_path, capsys) -> str:
    """HF -> orbax -> HF through the CLI is bit-identical (parameters and files), and `convert check` of the
    orbax copy against the HF directory passes; returns what `check` printed."""
    from vrl_jax import convert
    from vrl_jax.models.loading import load_model
    orbax_dir, back = str(tmp_path / "orbax"), str(tmp_path / "back")
    assert convert.main(["to-orbax", d, orbax_dir]) == 0
    a, b = flat_params(load_model(d)), flat_params(load_model(orbax_dir))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert convert.main(["to-hf", orbax_dir, back]) == 0
    before, after = read_all(d), read_all(back)
    assert sorted(before) == sorted(after) and all(np.array_equal(before[k], after[k]) for k in before)
    capsys.readouterr()
    assert convert.main(["check", d, "--model", orbax_dir]) == 0
    return capsys.readouterr().out
