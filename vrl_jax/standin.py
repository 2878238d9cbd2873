"""Stand-ins: an experiment file's recipe at toy size, offline, on a laptop CPU.

  python -m vrl_jax.standin experiments/geo.py[:variant] DIR

writes DIR/data (the synthetic geometry benchmark in every file format the loaders read: MAYE jsonl,
EasyR1 parquet, DyME json) and DIR/model (a tiny random Qwen2.5-VL whose tokenizer is trained on that
data; DIR/model_<family> for a recipe whose `model.tiny.family` is another architecture, e.g.
LLaVA-OneVision for DyME or Qwen3-VL), then prints the `python -m vrl_jax.train` command that runs the recipe on them:
`--config.*` overrides of the keys in `SIZE_KEYS` only. The test suite runs every experiment file and
variant this way (`tests/test_experiments.py`), so what a stand-in may change is fixed here, in one
place, and checked there.

What changes: where the model and the data come from (`model.path`; `data.train` and every
`data.eval.*` file, in the recipe's own `data.source` format; or the sizes of the generated
benchmark for `data.source='synthgeo'`) and sizes: steps (1 SFT step if the recipe has SFT, 2 RL
steps if it has RL), prompts per step, micro- and mini-batches (at most 2 of each, so gradient
accumulation and several updates per generation step stay where the recipe has them), generated
and target tokens, length and patch buckets, evaluation batch. What stays: everything else, in
particular the algorithm, advantage estimator, samples per prompt, loss, KL, optimizer, trainable
parts, rewards and judge, prompt template, dtype, remat, evaluation settings, pass@k, evaluation and
checkpoint schedule.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import os
import shlex
import sys
from typing import Any, Mapping

from vrl_jax.errors import run_cli

# The keys a stand-in may change (fnmatch patterns over dotted config keys); nothing else.
SIZE_KEYS = (
    "model.path", "data.train", "data.eval.*", "data.synthgeo.train", "data.synthgeo.val", "data.synthgeo.test",
    "data.length_buckets", "data.patch_buckets", "sft.steps", "sft.batch_size", "sft.max_target_tokens",
    "rl_steps", "rl_epochs", "prompts_per_step", "num_micro", "num_mini", "rollout.max_new_tokens",
    "eval.max_new_tokens", "eval.batch_size", "advantage.num_whiten_shards",
)

# Sizes of the stand-in itself.
SFT_STEPS, RL_STEPS = 1, 2
MAX_NEW_TOKENS, MAX_TARGET_TOKENS = 8, 16
LENGTH_BUCKET = 160  # fits the longest stand-in prompt: ~135 tokens with MAYE's or DyME's instruction
SPLIT_SIZES = {"train": 8, "val": 2, "test_iid": 2, "test_ood": 2}
EVAL_BATCH = 2
IMAGE_SIZE = 112  # the tiny model's processor takes 112 x 112 images: 8 x 8 = 64 patches each
TINY_MODEL = dict(hidden=32, layers=1, intermediate=64, vision_width=32, vision_depth=2, vocab_size=1024)
# Patch rows one stand-in image takes, per tiny family: Qwen2.5-VL 8 x 8 patches of 14 pixels; Qwen3-VL 6 x 6
# of 16 (the side rounded down to a multiple of 32); LLaVA-OneVision a base tile and at most 4 x 4 tiles of
# 2 x 2 patches (`models.llava_tiny`).
PATCH_ROWS = {"qwen2_5_vl": (IMAGE_SIZE // 14) ** 2, "qwen3_vl": (IMAGE_SIZE // 32 * 2) ** 2,
              "llava_onevision": (1 + 16) * 4}
# File names the synthgeo exporter writes, per loader format ("{split}" is a synthgeo split).
FILE_NAMES = {"maye": "maye_{split}.jsonl", "easyr1": "easyr1_{split}.parquet", "dyme": "dyme_{split}.json"}


def is_size_key(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in SIZE_KEYS)


def data_file(root: str, source: str, split: str) -> str:
    """The stand-in file of `split` in the loader format `source` (eval splits other than 'val' read test_iid)."""
    synth = split if split in ("train", "val") else "test_iid"
    return os.path.join(root, "data", FILE_NAMES[source].format(split=synth))


def _smallest_multiple(step: int, at_least: int) -> int:
    return step * max(1, -(-at_least // step))


def model_dir(root: str, family: str = "qwen2_5_vl") -> str:
    """The stand-in model of architecture `family` (`model.tiny.family`) under `root`."""
    return os.path.join(root, "model" if family == "qwen2_5_vl" else f"model_{family}")


def standin_overrides(c, root: str) -> dict[str, Any]:
    """{dotted key: value}: the stand-in of config `c` with its model and data under `root`.

    Pure (reads nothing); `prepare` writes what the paths point to. Every key is in `SIZE_KEYS`. The
    model is a tiny one of the recipe's `model.tiny.family` (its checkpoint's architecture).
    """
    out: dict[str, Any] = {"model.path": model_dir(root, c.model.tiny.family)}
    if c.data.source == "synthgeo":
        out.update({"data.synthgeo.train": SPLIT_SIZES["train"], "data.synthgeo.val": SPLIT_SIZES["val"],
                    "data.synthgeo.test": SPLIT_SIZES["test_iid"]})
    else:
        out["data.train"] = data_file(root, c.data.source, "train")
        out.update({f"data.eval.{split}": data_file(root, c.data.source, split) for split in c.data.eval.keys()})
    if c.sft.steps:
        out["sft.steps"] = SFT_STEPS
    if c.rl_steps or c.rl_epochs:
        out["rl_steps"], out["rl_epochs"] = RL_STEPS, 0.0
    # Several mini-batches (updates per generation step) and micro-batches per mini-batch (gradient
    # accumulation) where the recipe has them, two of each at most.
    num_mini = min(c.num_mini, 2)
    num_micro = num_mini * min(c.num_micro // c.num_mini, 2)
    n = c.rollout.num_samples
    prompts = _smallest_multiple(num_micro // math.gcd(num_micro, n), 2)  # rows split into micro-batches
    # Per-device whitening blocks (MAYE: one per GPU) follow the batch: several where the recipe has several.
    shards = c.advantage.num_whiten_shards
    if (prompts * n) % shards:
        out["advantage.num_whiten_shards"] = 2 if shards > 1 and (prompts * n) % 2 == 0 else 1
    out.update({"num_mini": num_mini, "num_micro": num_micro, "prompts_per_step": prompts,
                "sft.batch_size": _smallest_multiple(num_micro, 2), "sft.max_target_tokens": MAX_TARGET_TOKENS,
                "rollout.max_new_tokens": MAX_NEW_TOKENS, "eval.batch_size": EVAL_BATCH})
    if c.eval.max_new_tokens:
        out["eval.max_new_tokens"] = MAX_NEW_TOKENS
    # Images packed into one buffer, one per example at most: a prompt batch, or a micro-batch's rows.
    images = max(prompts, prompts * n // num_micro, out["sft.batch_size"] // num_micro, EVAL_BATCH)
    out["data.length_buckets"] = (LENGTH_BUCKET,)
    out["data.patch_buckets"] = (PATCH_ROWS[c.model.tiny.family] * images,)
    return {k: v for k, v in out.items() if _get(c, k) != v}


def _get(c, key: str):
    for part in key.split("."):
        c = c[part]
    return c


def apply_overrides(c, overrides: Mapping[str, Any]):
    """A locked copy of `c` with `overrides` set; refuses any key outside `SIZE_KEYS`."""
    bad = sorted(k for k in overrides if not is_size_key(k))
    if bad:
        raise ValueError(f"a stand-in may change only {SIZE_KEYS}; got {bad}")
    c = c.copy_and_resolve_references()
    c.lock()
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = c
        for part in parents:
            node = node[part]
        node[leaf] = value
    return c


def prepare(root: str, family: str = "qwen2_5_vl") -> str:
    """Writes the stand-in data (`SPLIT_SIZES`, every format) and the tiny model of `family` under `root`
    once; returns root."""
    from vrl_jax.data.prompts import TEMPLATES
    from vrl_jax.data.synthgeo.export import FORMATS, export_dataset
    from vrl_jax.data.synthgeo.generator import GeneratorConfig, corpus_texts, generate_split
    from vrl_jax.models.tiny import build_tiny_model
    data, model = os.path.join(root, "data"), model_dir(root, family)
    if not os.path.exists(os.path.join(data, "manifest.json")):
        export_dataset(data, SPLIT_SIZES, GeneratorConfig(image_size=IMAGE_SIZE), formats=FORMATS, progress=False)
    if not os.path.exists(os.path.join(model, "preprocessor_config.json")):  # written last
        # The templates' instructions are in the tokenizer's corpus, so prompts stay short.
        texts = list(corpus_texts(generate_split("train", 200, GeneratorConfig()))) + [
            t.text.replace("{question}", "") for t in TEMPLATES.values()] * 20
        build_tiny_model(model, texts, family=family, image_size=IMAGE_SIZE, **TINY_MODEL)
    return root


def standin_config(c, root: str):
    """`prepare(root)`, then `c` with its stand-in overrides applied."""
    prepare(root, c.model.tiny.family)
    return apply_overrides(c, standin_overrides(c, root))


def as_flags(overrides: Mapping[str, Any]) -> list[str]:
    """`--config.key=value` arguments for `python -m vrl_jax.train`."""
    return [f"--config.{k}={v!r}" if not isinstance(v, str) else f"--config.{k}={v}" for k, v in overrides.items()]


def load_experiment(spec: str):
    """`experiments/<file>.py[:variant]` -> its config, loaded as `python -m vrl_jax.train --config` loads it."""
    from vrl_jax.train import load_config_file
    return load_config_file(spec)


PROG = "python -m vrl_jax.standin"


def main(argv=None) -> int:
    return run_cli(_main, PROG, argv)


def _main(argv) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="experiments/<file>.py[:variant]")
    parser.add_argument("dir", help="where the stand-in data and model go (reused when present)")
    parser.add_argument("--workdir", help="the run's directory (default DIR/run)")
    args = parser.parse_args(argv)
    c = load_experiment(args.config)
    overrides = standin_overrides(c, args.dir)
    prepare(args.dir, c.model.tiny.family)
    cmd = ["python", "-m", "vrl_jax.train", f"--config={args.config}",
           f"--workdir={args.workdir or os.path.join(args.dir, 'run')}", *as_flags(overrides)]
    print(" ".join(shlex.quote(a) for a in cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
