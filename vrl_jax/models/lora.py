"""Low-rank adapters (LoRA) on chosen projections of the language model, the vision tower and the connector,
written by hand.

Why not qwix (Tunix's LoRA/QLoRA library; its 0.1.8 source read): its `LoraProvider` intercepts each
`dot_general`/`einsum` call site inside a module's method and creates one adapter per call site, chosen by
module path. Our models keep their weights as raw arrays stacked on a leading block axis and run every
block through one `lax.scan`, so the q projection of all 28 layers is one call site: qwix would give all
layers one shared adapter (and would see the attention matmuls as candidates too). Restructuring the models
into per-layer `nnx.Linear`s would lose the scan. So the adapters are plain parameters next to the weights
they adapt, on the same module:

    P_lora_a [..., in, r], P_lora_b [..., r, out]   for each chosen projection P [..., in, out]

with the weight's leading axes: [L, in, r] for a stacked block weight (the decoder's "q_w", the vision
tower's "qkv_w", Qwen3-VL's DeepStack mergers), [in, r] for a single connector matrix. A projection computes
`x @ W + (x @ A) @ (B * alpha / r)` (`project`), and a scan slices stacked adapters per block with the rest
of the block's weights. Which projections can carry adapters is the table `TARGETS`; `LoraConfig.targets_regex`
chooses among them by their dotted parameter paths ("language.layers.q_w", "visual.merger_fc1_w", ...).
`sharding.param_spec` splits A's input and B's output dimension as their weight's, r whole.

Each top-level part of the model that carries adapters ("language", "visual", "projector") holds the config
as `.lora` and prepares its weights for `project` with `weights`: switching the adapters off (the KL
reference) multiplies B by 0 there, once per forward before the scan, instead of threading a scale through
every block function: B is small, the block code stays one path, and `x @ W + (x @ A) @ 0` is exactly
`x @ W`, so the reference is the base model bit for bit with no second copy of the weights.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from vrl_jax.errors import UserError
from vrl_jax.models import quantize

A_SUFFIX, B_SUFFIX = "_lora_a", "_lora_b"
# The projections adapters can go on, by the path of the module holding them: every family's (a model has its
# architecture's). Stacked [n, in, out] weights get stacked adapters, single [in, out] matrices single ones.
TARGETS = {
    "language.layers": ("q_w", "k_w", "v_w", "o_w", "gate_w", "up_w", "down_w"),  # every family's decoder
    "visual.blocks": ("qkv_w", "proj_w", "fc1_w", "fc2_w", "gate_w", "up_w", "down_w"),  # Qwen-VL towers
    "visual.layers": ("q_w", "k_w", "v_w", "o_w", "fc1_w", "fc2_w"),  # LLaVA-OneVision's SigLIP
    "visual": ("merger_fc1_w", "merger_fc2_w", "deepstack_fc1_w", "deepstack_fc2_w"),  # Qwen-VL connectors
    "projector": ("linear1_w", "linear2_w"),  # LLaVA-OneVision's connector
}
CANDIDATES = tuple(f"{module}.{name}" for module, names in TARGETS.items() for name in names)
PATH_PREFIX = "language.layers."
PROJECTIONS = TARGETS["language.layers"]  # the decoder's, which every family has (`Qwen2Decoder`)
# Each name's dropout stream (`_dropped`); the decoder's first, so its masks are what they were before the others.
_NAMES = tuple(dict.fromkeys(n for names in TARGETS.values() for n in names))
_ADAPTER = re.compile(f"({A_SUFFIX}|{B_SUFFIX})$")


def is_adapter(path: str) -> bool:
    """Whether the dotted parameter path is a LoRA adapter (`*_lora_a`, `*_lora_b`)."""
    return _ADAPTER.search(path) is not None


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    r"""rank: r, the adapters' inner size; alpha: the update is scaled by alpha / r (so changing r
    does not change the update's size at init-equivalent learning rates); targets_regex: `re.search`ed
    against the dotted path of each projection in `CANDIDATES` the model has ("language.layers.q_w",
    "visual.blocks.qkv_w", "visual.merger_fc1_w", "projector.linear1_w", ...), e.g. r"^language\.layers\.(q|v)_w$"."""

    rank: int
    alpha: float
    targets_regex: str
    dropout: float = 0.0  # the adapters' input dropout in training forwards (PEFT's lora_dropout)

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise UserError(f"LoraConfig.rank: expected a positive integer, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise UserError(f"LoraConfig.alpha: expected a positive finite number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise UserError(f"LoraConfig.dropout: expected a number in [0, 1), got {self.dropout!r}")
        try:
            re.compile(self.targets_regex)
        except (re.error, TypeError) as e:
            raise UserError(f"LoraConfig.targets_regex: {self.targets_regex!r} is not a valid regular "
                            f"expression ({e})") from None

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def parent(model: nnx.Module, path: str) -> tuple[nnx.Module | None, str]:
    """(the module holding the parameter at dotted `path`, or None where the model has no such module, its name)."""
    *modules, name = path.split(".")
    module = model
    for part in modules:
        module = getattr(module, part, None)
    return module, name


def _has(model: nnx.Module, path: str) -> bool:
    module, name = parent(model, path)
    return isinstance(getattr(module, name, None), nnx.Param)


def projection_names(layers: nnx.Module) -> tuple[str, ...]:
    """The adaptable weights of a `DecoderLayers`: stacked matrices [L, in, out] named '*_w'."""
    return tuple(n for n in layers.names()
                 if n.endswith("_w") and getattr(layers, n).value.ndim == 3)


def target_paths(model: nnx.Module, config: LoraConfig) -> tuple[str, ...]:
    """The model's projections (`CANDIDATES` it has) whose path matches `config.targets_regex`; a UserError
    naming the regex and the candidates when none does."""
    candidates = [p for p in CANDIDATES if _has(model, p)]
    pattern = re.compile(config.targets_regex)
    chosen = tuple(p for p in candidates if pattern.search(p))
    if not chosen:
        raise UserError(f"LoraConfig.targets_regex: {config.targets_regex!r} matches none of the model's "
                        f"projections {', '.join(candidates)}")
    return chosen


def adapted_names(module: nnx.Module) -> tuple[str, ...]:
    """The weights of one module that carry adapters (have `<name>_lora_a`), in the module's order."""
    return tuple(n.removesuffix(A_SUFFIX) for n in vars(module) if n.endswith(A_SUFFIX))


def adapted_paths(model: nnx.Module) -> tuple[str, ...]:
    """The dotted paths of the model's weights that carry adapters, in `CANDIDATES` order."""
    return tuple(p for p in CANDIDATES if _has(model, p + A_SUFFIX))


PARTS = tuple(dict.fromkeys(m.split(".")[0] for m in TARGETS))  # the model's attributes that can hold a config


def parts(model: nnx.Module) -> dict[str, LoraConfig]:
    """{part ("language", "visual", "projector"): its LoraConfig} for the parts of `model` carrying adapters."""
    out = {p: getattr(getattr(model, p, None), "lora", None) for p in PARTS}
    return {p: c for p, c in out.items() if c is not None}


def add_adapters(model: nnx.Module, config: LoraConfig, key: jax.Array) -> tuple[str, ...]:
    """Adds adapters to the projections of `model` (a whole VLM) that `config` chooses, in place, sets
    `config` as `.lora` on each part holding them, and returns their paths.

    A [..., in, r] ~ N(0, 1/in) (variance-preserving like PEFT's kaiming-uniform default, whose bound
    1/sqrt(in) gives variance 1/(3 in): x @ A keeps x's scale whatever r is, and alpha / r then sets the
    update's size); B [..., r, out] = 0, so the adapted model starts equal to the base model. Both in
    the projection weight's dtype, with its leading (block) axes.
    """
    paths = target_paths(model, config)
    for path, k in zip(paths, jax.random.split(key, len(paths))):
        module, name = parent(model, path)
        w = getattr(module, name).value
        *lead, d_in, d_out = w.shape
        a = jax.random.normal(k, (*lead, d_in, config.rank), jnp.float32) / math.sqrt(d_in)
        setattr(module, name + A_SUFFIX, nnx.Param(a.astype(w.dtype)))
        setattr(module, name + B_SUFFIX, nnx.Param(jnp.zeros((*lead, config.rank, d_out), w.dtype)))
    for part in dict.fromkeys(p.split(".")[0] for p in paths):
        getattr(model, part).lora = config
    return paths


def scale_adapters(weights: dict, scale) -> dict:
    """The weights with every `*_lora_b` multiplied by `scale` (a float or traced scalar: alpha / r
    for the adapted model, 0.0 for the base model); other entries are passed through. A no-op without
    adapters."""
    return {k: v * scale if k.endswith(B_SUFFIX) else v for k, v in weights.items()}


DROPOUT_KEY, DROPOUT_RATE = "lora_dropout_key", "lora_dropout_rate"


def with_dropout(weights: dict, rate: float, key: jax.Array | None, stacked: bool = True) -> dict:
    """The weights plus what `project` needs to drop the adapters' inputs: stacked ([L, ...] weights a scan
    slices), a key per block (uint32 [L, 2]) and the rate ([L], so the scan hands each block a scalar);
    otherwise one key (uint32 [2]) and a scalar rate. A no-op when `key` is None (sampling, old and reference
    log-probs) or the rate is 0."""
    if key is None or not rate:
        return weights
    if not stacked:
        return {**weights, DROPOUT_KEY: jax.random.key_data(key), DROPOUT_RATE: jnp.float32(rate)}
    n = next(iter(weights.values())).shape[0]
    return {**weights, DROPOUT_KEY: jax.random.key_data(jax.random.split(key, n)),
            DROPOUT_RATE: jnp.full((n,), rate, jnp.float32)}


def weights(module: nnx.Module, config: LoraConfig | None, lora_scale=1.0, key: jax.Array | None = None, *,
            prefix: str = "", stacked: bool = True) -> dict:
    """The parameters of `module` named `prefix*`, {name: array}, as `project` takes them: with `config` (the
    part's `.lora`; None without adapters) the adapters' B scaled by alpha / r * lora_scale (`scale_adapters`;
    lora_scale 0.0 = the base model) and, with a dropout key, what drops the adapters' inputs (`with_dropout`;
    `stacked`: the arrays have a leading block axis)."""
    w = {k: v.value for k, v in vars(module).items() if isinstance(v, nnx.Param) and k.startswith(prefix)}
    if config is None:
        return w
    return with_dropout(scale_adapters(w, config.scaling * lora_scale), config.dropout, key, stacked)


def cast(w: dict, dtype) -> dict:
    """`weights`' arrays in `dtype`, the dropout key (bits) as it is."""
    return {k: v if k == DROPOUT_KEY else v.astype(dtype) for k, v in w.items()}


def sub_key(key: jax.Array | None, i) -> jax.Array | None:
    """An independent dropout key for part or shard `i` (an int, traced or not); None stays None."""
    return None if key is None else jax.random.fold_in(key, i)


def _dropped(x, w: dict, name: str):
    """x with each element zeroed with probability w[DROPOUT_RATE] and the rest scaled by 1 / (1 - rate);
    each projection of a block draws its own mask."""
    if DROPOUT_KEY not in w:
        return x
    key = jax.random.fold_in(jax.random.wrap_key_data(w[DROPOUT_KEY]), _NAMES.index(name))
    rate = w[DROPOUT_RATE]
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros((), x.dtype))


def project(x, w: dict, name: str):
    """x [..., in] -> [..., out]: `x @ w[name]` (widened from `quantize`'s codes where it is stored quantized),
    plus `(x @ A) @ B` when w holds `name + "_lora_a/_b"` (A [in, r], B [r, out], B already scaled by
    `scale_adapters`), its input dropped out where `with_dropout` put a key in w. Computes in x's dtype."""
    dt = x.dtype
    y = x @ quantize.weight(w, name, dt)
    if name + A_SUFFIX in w:
        y = y + (_dropped(x, w, name) @ w[name + A_SUFFIX].astype(dt)) @ w[name + B_SUFFIX].astype(dt)
    return y
