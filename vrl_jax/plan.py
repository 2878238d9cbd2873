"""Will it fit? `python -m vrl_jax.plan --config experiments/<name>.py[:variant] [--config.KEY=VALUE ...]
[--mesh data=D,fsdp=F,tensor=T] [--device-memory 80GiB | --device-memory h100] [--model-config DIR_OR_JSON]
[--image-patches N] [--compile]`

Prints the per-device memory of the run (`vrl_jax.memory`: parameters, Adam moments, gradients, the KL
reference, the train step's activations, the rollout's KV cache and image buffers, the peak) from the model's
`config.json` alone: no weights are read, nothing is allocated. The model is `--model-config`, else the
experiment's `model.path`, else its tiny model. Images count at their largest (`--image-patches`, else the
model directory's preprocessor_config.json max_pixels, else transformers' default). With a device memory it says whether the run fits and, when it
does not, which single change would make it fit. `--compile` replaces the analytic activation figure by
XLA's memory analysis of the lowered train step (small models: it compiles the step on as many virtual CPU
devices as the mesh). Exits 0 when the run fits (or no device memory was given), 1 when it does not.
"""

from __future__ import annotations

import math
import os
import re
import sys

from vrl_jax.errors import UserError, run_cli

PROG = "python -m vrl_jax.plan"
USAGE = (f"usage: {PROG} --config experiments/<name>.py[:variant] [--config.KEY=VALUE ...] "
         "[--mesh data=D,fsdp=F,tensor=T] [--device-memory 80GiB|h100|v5e|...] [--model-config DIR_OR_JSON] "
         "[--image-patches N] [--compile] [--debug]")

# Special tokens of the tiny model's tokenizer that its config.json names (ids inside its vocabulary).
_TINY_SPECIAL = ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                 "<|vision_end|>")


def model_config_for(c, path: str | None = None):
    """The ModelConfig a run would use, from `path` (a directory with config.json, or the file), else the
    experiment's `model.path`, else its tiny model's config (no weights, no tokenizer)."""
    from vrl_jax.models.config import ModelConfig
    path = path or c.model.path
    if path:
        return ModelConfig.from_pretrained(path)
    from vrl_jax.models.tiny import QWEN_FAMILIES, tiny_hf_config
    t = c.model.tiny
    if t.family not in QWEN_FAMILIES:
        raise UserError(f"config.model.tiny.family={t.family!r}: the planner builds the tiny config of "
                        f"{sorted(QWEN_FAMILIES)} only; pass --model-config with the model's config.json")
    special = {name: t.vocab_size - 1 - i for i, name in enumerate(_TINY_SPECIAL)}
    return ModelConfig.from_dict(tiny_hf_config(t.vocab_size, special, family=t.family, hidden=t.hidden,
                                                layers=t.layers, intermediate=t.intermediate,
                                                vision_width=t.vision_width, vision_depth=t.vision_depth))


# transformers' Qwen2-VL image processor default max_pixels (28 * 28 * 1280) over 14-pixel patches.
DEFAULT_IMAGE_PATCHES = 28 * 28 * 1280 // 14 ** 2


def image_patches_for(c, path: str | None = None) -> tuple[int, str]:
    """(the most patches one image can have, where that came from): the model directory's
    preprocessor_config.json max_pixels over the patch area, the tiny model's processor, or transformers'
    default max_pixels."""
    import json
    path = path or c.model.path
    if not path:
        from vrl_jax.models.tiny import QWEN_FAMILIES, tiny_image_patches
        if c.model.tiny.family in QWEN_FAMILIES:
            return tiny_image_patches(c.model.tiny.family), "the tiny model's processor"
        return DEFAULT_IMAGE_PATCHES, "transformers' default max_pixels"
    file = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "preprocessor_config.json")
    try:
        with open(file) as f:
            raw = json.load(f)
        size = raw.get("size") or {}
        max_pixels = raw.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels")
        if max_pixels:
            return int(max_pixels) // int(raw.get("patch_size", 14)) ** 2, file
    except (OSError, ValueError, TypeError):
        pass
    return DEFAULT_IMAGE_PATCHES, "transformers' default max_pixels (no preprocessor_config.json)"


def parse_mesh(text: str | None, c) -> tuple[int, int, int]:
    """'data=1,fsdp=8,tensor=1' (missing axes 1) or None (the experiment's config.mesh, -1 counted as 1)."""
    from vrl_jax import sharding as shd
    if not text:
        return tuple(max(int(c.mesh[a]), 1) for a in shd.AXES)
    sizes = dict.fromkeys(shd.AXES, 1)
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\w+)\s*=\s*(\d+)\s*", part)
        if not m or m.group(1) not in sizes or int(m.group(2)) < 1:
            raise UserError(f"--mesh={text}: expected axis=size pairs over {shd.AXES} with sizes >= 1, "
                            f"e.g. --mesh data=1,fsdp=8,tensor=1")
        sizes[m.group(1)] = int(m.group(2))
    return tuple(sizes[a] for a in shd.AXES)


def config_accepts(c, num_devices: int):
    """`accepts(text)`: whether config `c` with the `--config.key=value` flags of a suggestion's text
    validates (`configs.validate`), so the planner never suggests a change the trainer would refuse."""
    import ast

    from vrl_jax import configs

    def accepts(text: str) -> bool:
        changed = c.copy_and_resolve_references()
        with changed.unlocked():
            for flag in text.split(" (")[0].split():
                key, _, value = flag[len("--config."):].partition("=")
                try:
                    value = ast.literal_eval(value)
                except (ValueError, SyntaxError):
                    pass  # a string such as bfloat16
                parent = changed
                *path, last = key.split(".")
                for part in path:
                    parent = parent[part]
                parent[last] = value
        try:
            configs.validate(changed, num_devices)
        except configs.ConfigValidationError:
            return False
        return True

    return accepts


def check_fits(c, num_devices: int, device_memory: int | None) -> None:
    """The training CLI's check before anything compiles: raises UserError with the plan and a change that
    would fit when the run's peak exceeds `device_memory` (no check when it is None)."""
    if device_memory is None:
        return
    from vrl_jax import memory, sharding as shd
    model_config = model_config_for(c)
    shape = memory.run_shape(c, image_patches_for(c)[0])
    sizes = shd.mesh_shape(shd.MeshConfig.of(c.mesh), num_devices)
    plan = memory.make_plan(model_config, shape, sizes, device_memory)
    if plan.fits:
        return
    fixes = memory.suggestions(model_config, shape, sizes, device_memory, config_accepts(c, num_devices))
    hint = (f"this change would fit (peak {fixes[0][1].peak / memory.GiB:.2f} GiB): {fixes[0][0]}" if fixes else
            "no change of mesh, micro-batches, remat, precision or step size makes it fit; use more devices or "
            "shorter prompts and responses")
    largest = max(plan.items, key=lambda i: i.bytes)
    raise UserError(f"the run would need {plan.peak / memory.GiB:.2f} GiB per device (the largest part: "
                    f"{largest.name}, {largest.bytes / memory.GiB:.2f} GiB), more than the "
                    f"{device_memory / memory.GiB:.2f} GiB there are (config.memory.device_gib, or the device's own "
                    f"limit when it is 0); {hint}. `python -m vrl_jax.plan` with the same --config flags prints "
                    f"the whole table")


def main(argv: list[str]) -> int:
    if {"-h", "--help", "--helpshort", "--helpfull"} & set(argv):
        print(__doc__.strip() + "\n\n" + USAGE)
        return 0
    from absl import flags

    from vrl_jax.train import parse_config_flags

    def define(fv):
        flags.DEFINE_string("mesh", None, "axis sizes, e.g. data=1,fsdp=8,tensor=1", flag_values=fv)
        flags.DEFINE_string("device_memory", None, "bytes per device (80GiB) or a device name", flag_values=fv)
        flags.DEFINE_string("model_config", None, "a model directory or its config.json", flag_values=fv)
        flags.DEFINE_bool("compile", False, "measure activations with XLA's memory analysis", flag_values=fv)
        flags.DEFINE_integer("image_patches", None, "the most patches one image has", lower_bound=1,
                             flag_values=fv)

    argv = [a.replace("--device-memory", "--device_memory").replace("--model-config", "--model_config")
            .replace("--image-patches", "--image_patches") for a in argv]
    c, fv = parse_config_flags(argv, PROG, USAGE, define)
    sizes = parse_mesh(fv.mesh, c)
    devices = sizes[0] * sizes[1] * sizes[2]
    if fv.compile and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={devices}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from vrl_jax import configs, memory
    configs.validate(c, devices)
    try:
        limit = None if fv.device_memory is None else memory.parse_bytes(fv.device_memory)
    except ValueError as e:
        raise UserError(f"--device-memory: {e}") from None
    model_config = model_config_for(c, fv.model_config)
    image_patches, source = ((fv.image_patches, "--image-patches") if fv.image_patches else
                             image_patches_for(c, fv.model_config))
    shape = memory.run_shape(c, image_patches)
    measured = memory.measured_train_activations(model_config, shape, sizes) if fv.compile else None
    plan = memory.make_plan(model_config, shape, sizes, limit, measured)
    t = model_config.text
    print(f"{model_config.model_type}: {t.num_layers} layers, hidden {t.hidden_size}, vocabulary {t.vocab_size}; "
          f"{shape.prompts} prompts x {shape.samples} samples in {shape.num_micro} micro-batches, "
          f"{shape.prompt_len} + {shape.new_tokens} tokens; compute {shape.dtype}, parameters {shape.param_dtype}, "
          f"moments {shape.moments_dtype}, remat {shape.remat}; images of at most {shape.image_patches} patches "
          f"({source})")
    print(plan.table())
    if plan.fits is False:
        fixes = memory.suggestions(model_config, shape, sizes, limit, config_accepts(c, math.prod(sizes)))
        print("changes that would fit:" if fixes else "no change of mesh, micro-batches, remat, precision or step "
              "size makes it fit: use more devices or shorter prompts and responses")
        for text, fixed in fixes:
            print(f"  {text}  (peak {fixed.peak / memory.GiB:.2f} GiB)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, PROG))
