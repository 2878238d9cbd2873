"""The two exports of a LoRA-adapted model (`vrl_jax.models.lora`): merged weights, or a PEFT adapter.

`merge_adapters` folds each adapter into its weight, W + A @ B * alpha / r, and gives a plain model that
`loading.export_hf` / `save_orbax` write as usual. `export_peft` writes the adapters alone as a PEFT LoRA
directory (`adapter_config.json` + `adapter_model.safetensors`) that `peft.PeftModel.from_pretrained` puts
on the base HF model:

    <PEFT_PREFIX><module>.lora_A.weight  [r, in]  = A[l].T   (A [L, in, r]; a connector's [in, r]: A.T)
    <PEFT_PREFIX><module>.lora_B.weight  [out, r] = B[l].T   (B [L, r, out], unscaled: peft applies alpha / r)

where <module> is the block-l module's name in the model transformers builds (e.g.
`model.language_model.layers.0.self_attn.q_proj`, `model.visual.blocks.0.attn.qkv`, `model.visual.merger.mlp.0`),
read from the family's weight table (`WeightTable.in_memory`), so every family is covered by the table that
loads it.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vrl_jax.errors import UserError
from vrl_jax.models import lora
from vrl_jax.models.loading import write_files
from vrl_jax.models.weights import param_shapes, template_pattern, to_hf_layout, to_host, weight_table

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# What peft's own `save_pretrained` writes too (a model card): a directory holding only these is an adapter's.
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md")
PEFT_PREFIX = "base_model.model."  # PeftModel (base_model) -> LoraModel (model) -> the transformers model


def merged_weight(w: jax.Array, a: jax.Array, b: jax.Array, scaling: float) -> jax.Array:
    """W [..., in, out] + A [..., in, r] @ B [..., r, out] * scaling, computed in float32, in W's dtype."""
    update = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    return (w.astype(jnp.float32) + update * scaling).astype(w.dtype)


def adapters_of(model, what: str) -> tuple[dict[str, lora.LoraConfig], tuple[str, ...]]:
    """({part: its LoRA config}, the adapted weights' paths) of `model`; a UserError naming `what` when it
    has none."""
    configs, paths = lora.parts(model), lora.adapted_paths(model)
    if not configs or not paths:
        raise UserError(f"{what}: the model has no LoRA adapters (no part of it has a `.lora` config); add them "
                        f"with vrl_jax.models.lora.add_adapters, or write the plain model with loading.export_hf "
                        f"or save_orbax")
    return configs, paths


def merge_adapters(model):
    """A new model with every adapted W replaced by `merged_weight` and the adapters removed (each part's
    `.lora` None), which export_hf and save_orbax write as a plain model. `model` is left as it was (adapters
    included); the new one shares its unadapted arrays (immutable), and each merged W keeps W's sharding. In a
    multi-process run every process calls it."""
    configs, paths = adapters_of(model, "merge_adapters")
    merged = nnx.clone(model)
    for path in paths:
        module, name = lora.parent(merged, path)
        w = getattr(module, name)
        a, b = (getattr(module, name + suffix).value for suffix in (lora.A_SUFFIX, lora.B_SUFFIX))
        merge = jax.jit(merged_weight, static_argnums=3, out_shardings=getattr(w.value, "sharding", None))
        w.value = merge(w.value, a, b, configs[path.split(".")[0]].scaling)
        delattr(module, name + lora.A_SUFFIX)
        delattr(module, name + lora.B_SUFFIX)
    for part in configs:
        getattr(merged, part).lora = None
    return merged


def peft_target(module: str) -> str:
    """The `target_modules` entry naming module `module` (a name or template): its last name ("q_proj",
    "qkv"), from the last non-numeric one where it ends in a number ("mlp.0": peft matches an entry against
    the end of every module's name, and "0" would name every first block)."""
    names = module.split(".")
    last = max(i for i, n in enumerate(names) if not n.isdigit() and n != "{i}")
    return ".".join(names[last:])


def peft_modules(model_config, paths: tuple[str, ...]) -> tuple[dict[str, str], str | None]:
    """({adapted weight's path: its module's name template in the transformers model, "{i}" the block}, the
    `exclude_modules` regex of the model's other modules that the `peft_target` entries would adapt too, e.g.
    Qwen2.5-VL's vision `mlp.down_proj` beside the language model's, or None). Reads the config only (the
    parameter names of the model it describes, nothing allocated)."""
    in_memory = weight_table(model_config).in_memory
    modules = {p: in_memory[p].removesuffix(".weight") for p in paths}
    targets = {peft_target(m) for m in modules.values()}
    # this model's modules only (a table can serve several models: Qwen2-VL's and Qwen2.5-VL's towers), each
    # parameter's module and the modules holding it
    names = [in_memory[p].split(".")[:-1] for p in param_shapes(model_config)]
    all_modules = {".".join(n[:k]) for n in names for k in range(1, len(n) + 1)}
    matches = lambda m: any(f".{m}".replace("{i}", "0").endswith(f".{t}") for t in targets)  # noqa: E731 - peft's rule
    others = sorted(m for m in all_modules - set(modules.values()) if matches(m))
    return modules, "|".join(template_pattern(m) for m in others) or None


def adapter_config(config: lora.LoraConfig, modules: dict[str, str], exclude: str | None,
                   base_model_name_or_path: str | None) -> dict:
    """The adapter_config.json of adapters `config` on `modules` (from `peft_modules`)."""
    alpha = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
    out = dict(peft_type="LORA", task_type="CAUSAL_LM", r=config.rank, lora_alpha=alpha,
               target_modules=sorted({peft_target(m) for m in modules.values()}), lora_dropout=config.dropout,
               bias="none", fan_in_fan_out=False, use_rslora=False, init_lora_weights=True, inference_mode=True,
               base_model_name_or_path=base_model_name_or_path)
    if exclude:  # only when needed: peft warns about an exclude_modules that excludes nothing
        out["exclude_modules"] = exclude
    return out


def peft_tensors(model, modules: dict[str, str]) -> Iterator[tuple[str, np.ndarray]]:
    """(peft key, array in PyTorch layout) for every block's A and B (a connector's: its one), one adapter at
    a time (each gathered across processes in a multi-process run: every process must iterate)."""
    for path, module in modules.items():
        parent, name = lora.parent(model, path)
        a, b = (to_host(getattr(parent, name + suffix).value) for suffix in (lora.A_SUFFIX, lora.B_SUFFIX))
        blocks = [(module.format(i=i), a[i], b[i]) for i in range(a.shape[0])] if "{i}" in module else [(module, a, b)]
        for key, a_i, b_i in blocks:
            yield PEFT_PREFIX + key + ".lora_A.weight", to_hf_layout(a_i, "linear")
            yield PEFT_PREFIX + key + ".lora_B.weight", to_hf_layout(b_i, "linear")


def adapter_dir_problem(out_dir: str) -> str | None:
    """Why `out_dir` (local or a bucket URI) cannot take an adapter: a file, or a non-empty directory holding
    something besides ADAPTER_FILES (an earlier adapter export is overwritten); None when it can."""
    from etils import epath
    path = epath.Path(out_dir)
    if path.exists() and not path.is_dir():
        return f"export_peft: {out_dir} is a file; name a new or empty directory for the PEFT adapter."
    if path.is_dir():
        other = sorted(p.name for p in path.iterdir() if p.name not in ADAPTER_FILES)
        if other:
            shown = ", ".join(other[:6]) + (f" and {len(other) - 6} more" if len(other) > 6 else "")
            return (f"export_peft: {out_dir} is not empty (it holds {shown}) and is not a PEFT adapter "
                    f"directory; name a new or empty directory, or one that holds only {', '.join(ADAPTER_FILES)}.")
    return None


def check_adapter_dir(out_dir: str) -> None:
    """Raises a UserError when `out_dir` cannot take an adapter. In a multi-process run every process calls
    it: process 0 looks and the verdict is shared, so no process is left waiting in the export's gathers."""
    problem = adapter_dir_problem(out_dir) if jax.process_index() == 0 else None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        refused = bool(multihost_utils.broadcast_one_to_all(np.int32(problem is not None)))
        if refused and problem is None:
            raise UserError(f"export_peft: process 0 refused {out_dir} (its log says why)")
    if problem:
        raise UserError(problem)


def export_peft(model, out_dir: str, base_model_name_or_path: str | None = None) -> None:
    """Writes the adapters of `model` as a PEFT LoRA directory in `out_dir` (local or a bucket URI). In a
    multi-process run every process calls it: the adapters are gathered one by one and process 0 writes."""
    configs, paths = adapters_of(model, "export_peft")
    if len(set(configs.values())) > 1:
        raise UserError(f"export_peft: the model's parts carry different LoRA configs ({configs}); a PEFT adapter "
                        f"has one rank, alpha and dropout")
    config = next(iter(configs.values()))
    check_adapter_dir(out_dir)
    modules, exclude = peft_modules(model.config, paths)
    tensors = dict(peft_tensors(model, modules))  # r (in + out) per layer and projection: small
    if jax.process_index() != 0:
        return
    from safetensors.numpy import save_file
    settings = adapter_config(config, modules, exclude, base_model_name_or_path)

    def write(directory: str):
        save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
            json.dump(settings, f, indent=2)
    write_files(out_dir, write)
