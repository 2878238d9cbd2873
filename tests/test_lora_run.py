"""LoRA runs end to end on the tiny default (`experiments/default.py:smoke` with `model.lora`): SFT then
GRPO with a KL term, training the language model's adapters alone, with adapter dropout; and DyME over an
NF4 base (QLoRA). Checkpoints and the KL reference hold the
trained parameters only, a run resumed from a checkpoint equals the uninterrupted one, and the run's exports
(the merged HF model, the PEFT adapter directory) load in transformers and peft with the policy's logits."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "experiments", "default.py") + ":smoke"
LORA = ["--config.model.lora.rank=4", "--config.model.lora.alpha=8.0", "--config.model.lora.dropout=0.1",
        "--config.loss.kl_coef=0.05",
        "--config.optim.train_vit=False", "--config.rl_steps=3", "--config.checkpoint.keep=10",
        "--config.eval.splits=('val',)", "--config.eval.settings=('low',)", "--report=false",
        "--config.optim.train_connector=False"]
VOLATILE = ("time/", "speed/", "compile/", "timestamp", "time")


def run_train(workdir, cache_dir, *overrides, base=LORA):
    cmd = [sys.executable, "-m", "vrl_jax.train", f"--config={SMOKE}", f"--workdir={workdir}", *base, *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XLA_FLAGS": xla_flags(), "JAX_COMPILATION_CACHE_DIR": cache_dir,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def rows(workdir, split="train"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)}
                for r in map(json.loads, f) if r.get("split") == split]


def saved_params(directory: str) -> set[str]:
    """The parameter paths an orbax checkpoint of a TrainState (or of a bare param tree) holds."""
    with open(os.path.join(directory, "_METADATA")) as f:
        keys = json.load(f)["tree_metadata"]
    paths = set()
    for key in keys:
        parts = [p.strip(" '") for p in key.strip("()").split(",") if p.strip()]
        if parts[0] == "params":
            parts = parts[1:]
        elif parts[0] in ("opt_state", "step", "skipped", "rng"):
            continue
        paths.add(".".join(parts))
    return paths


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, session_jax_cache):
    wd = str(tmp_path_factory.mktemp("lora"))
    run_train(wd, session_jax_cache)
    return wd


def test_lora_run_trains_and_keeps_only_the_adapters(uninterrupted):
    wd = uninterrupted
    train = rows(wd)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]  # 2 SFT + 3 GRPO steps
    rl = [r for r in train if r["stage"] == 1.0]
    # The KL reference is the policy RL starts from: the adapters as SFT left them, over the same base.
    assert abs(rl[0]["training/kl_token_mean"]) < 1e-5 and rl[-1]["loss/kl_loss"] > 0
    assert train[0]["sft/loss"] > 0
    assert all(r.get("update/skipped_updates", r.get("sft/skipped_updates")) == 0 for r in train)
    # Checkpoints and the reference hold the adapters alone, no base weight.
    for directory in (os.path.join(wd, "checkpoints", "5", "state"), os.path.join(wd, "reference")):
        paths = saved_params(directory)
        assert paths and all(p.startswith("language.") and p.endswith(("_lora_a", "_lora_b")) for p in paths), \
            sorted(paths)


def test_a_resumed_lora_run_equals_the_uninterrupted_one(uninterrupted, tmp_path, session_jax_cache):
    """Resume from the RL step-3 checkpoint (one RL step in): base weights from the model directory, the
    adapters and the optimizer from the checkpoint, the reference adapters from `reference/`."""
    wd = str(tmp_path / "resumed")
    shutil.copytree(uninterrupted, wd)
    for step in (4, 5):
        shutil.rmtree(os.path.join(wd, "checkpoints", str(step)))
    for export in ("export", "adapter"):
        shutil.rmtree(os.path.join(wd, export))
    out = run_train(wd, session_jax_cache)
    assert f"resumed {wd} at step 3" in out
    assert rows(wd) == rows(uninterrupted)
    assert rows(wd, "eval") == rows(uninterrupted, "eval")


def test_the_exports_load_in_transformers_and_peft_with_the_same_logits(uninterrupted):
    """`export/` (adapters merged) and `adapter/` (PEFT) on the run's base model give the same logits in
    transformers, and differ from the base model's: the adapters trained."""
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    def logits(model):
        ids = torch.tensor([[5, 17, 99, 3, 250, 41, 7, 8]])
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()

    load = lambda path: AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    with open(os.path.join(uninterrupted, "adapter", "adapter_config.json")) as f:
        adapter = json.load(f)
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (4, 8, 0.1)  # the run's model.lora
    base_dir = adapter["base_model_name_or_path"]
    assert os.path.samefile(base_dir, os.path.join(uninterrupted, "model"))
    base = logits(load(base_dir))
    merged = logits(load(os.path.join(uninterrupted, "export")))
    peft = logits(PeftModel.from_pretrained(load(base_dir), os.path.join(uninterrupted, "adapter")).eval())
    assert np.abs(merged - base).max() > 1e-4  # the adapters moved the policy
    assert np.abs(peft - merged).max() < 1e-4  # float32: the same weights, merged or not
    # The merged export moved exactly the adapted tensors: the language model's projections, nothing else.
    from safetensors.numpy import load_file
    start, end = (load_file(os.path.join(d, "model.safetensors")) for d in (base_dir, os.path.join(uninterrupted,
                                                                                                   "export")))
    moved = {k for k in start if not np.array_equal(start[k], end[k])}
    assert moved and all(re.search(r"layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight$", k)
                         and "visual" not in k for k in moved), sorted(moved)


def test_a_dyme_run_with_qlora_memorizes_through_the_adapters(tmp_path, session_jax_cache):
    """DyME with QLoRA (NF4 base; no KL: DyME has no reference): a random model is always wrong, so every group
    memorizes its reference through the NLL term; what trains and is saved is the adapters (the NF4 codes are
    frozen and read again from the model directory), and the merged export holds float weights again."""
    from safetensors.numpy import load_file

    from tests.test_recipe_fidelity import DYME
    wd = str(tmp_path / "dyme")
    run_train(wd, session_jax_cache, *DYME, "--config.rl_steps=2", "--config.model.lora.rank=4",
              "--config.model.lora.quantize=nf4", "--config.optim.train_vit=False",
              "--config.optim.train_connector=False", "--config.eval.splits=('val',)",
              "--config.eval.settings=('low',)", "--report=false", base=())
    train = rows(wd)
    assert len(train) == 2 and all(r["dyme/memorize_share"] == 1.0 and r["loss/sft_loss"] > 0 for r in train)
    paths = saved_params(os.path.join(wd, "checkpoints", "2", "state"))
    assert paths and all(p.endswith(("_lora_a", "_lora_b")) for p in paths)
    assert sorted(os.listdir(os.path.join(wd, "adapter"))) == ["adapter_config.json", "adapter_model.safetensors"]
    exported = load_file(os.path.join(wd, "export", "model.safetensors"))
    q_proj = next(v for k, v in exported.items() if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert q_proj.dtype == "float32"
