"""Low-rank adapters (LoRA) on the language model's projections, written by hand.

qwix (Tunix's LoRA/QLoRA library) is not installed in this environment and was not evaluated; the
decoder keeps its weights as stacked raw arrays under `lax.scan` and multiplies them with `@` (no
`nnx.Linear` to wrap), so the adapters are plain stacked parameters next to the weights they adapt:

    P_lora_a [L, in, r], P_lora_b [L, r, out]   for each chosen projection P ("q_w", "down_w", ...)

and a projection computes `x @ W + (x @ A) @ (B * alpha / r)` (`project`). They live on the
`DecoderLayers` module as ordinary `nnx.Param`s, so `lax.scan` slices them per layer with the rest of
`w`. `sharding.PARAM_RULES` splits A's input and B's output dimension as their weight's, r whole.

Switching the adapters off (the KL reference) multiplies B by 0 in `scale_adapters`, once per forward
before the scan, instead of threading a scale through every block function: B is small ([L, r, out]),
the block code stays one path, and `x @ W + (x @ A) @ 0` is exactly `x @ W`, so the reference is
the base model bit for bit with no second copy of the weights.
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
PATH_PREFIX = "language.layers."  # adapter targets are matched against "language.layers.<name>"
# The decoder's projections every family has (`Qwen2Decoder`), for checking a config before the model exists.
PROJECTIONS = ("q_w", "k_w", "v_w", "o_w", "gate_w", "up_w", "down_w")
_ADAPTER = re.compile(f"({A_SUFFIX}|{B_SUFFIX})$")


def is_adapter(path: str) -> bool:
    """Whether the dotted parameter path is a LoRA adapter (`*_lora_a`, `*_lora_b`)."""
    return _ADAPTER.search(path) is not None


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank: r, the adapters' inner size; alpha: the update is scaled by alpha / r (so changing r
    does not change the update's size at init-equivalent learning rates); targets_regex: `re.search`ed
    against each decoder projection's path "language.layers.<name>" (names: q_w k_w v_w o_w gate_w up_w
    down_w), e.g. r"(q|v)_w$"."""

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


def projection_names(layers: nnx.Module) -> tuple[str, ...]:
    """The adaptable weights of a `DecoderLayers`: stacked matrices [L, in, out] named '*_w'."""
    return tuple(n for n in layers.names()
                 if n.endswith("_w") and getattr(layers, n).value.ndim == 3)


def target_names(layers: nnx.Module, config: LoraConfig) -> tuple[str, ...]:
    """The projections whose path "language.layers.<name>" matches `config.targets_regex`; a UserError
    naming the regex and the candidates when none does."""
    candidates = projection_names(layers)
    pattern = re.compile(config.targets_regex)
    chosen = tuple(n for n in candidates if pattern.search(PATH_PREFIX + n))
    if not chosen:
        raise UserError(f"LoraConfig.targets_regex: {config.targets_regex!r} matches none of the language "
                        f"model's projections {', '.join(PATH_PREFIX + n for n in candidates)}")
    return chosen


def adapted_names(layers: nnx.Module) -> tuple[str, ...]:
    """The projections of a `DecoderLayers` that carry adapters (have `<name>_lora_a`), in layer order."""
    return tuple(n for n in projection_names(layers) if hasattr(layers, n + A_SUFFIX))


def add_adapters(decoder: nnx.Module, config: LoraConfig, key: jax.Array) -> tuple[str, ...]:
    """Adds adapters to a `Qwen2Decoder` in place and returns the adapted projection names.

    A [L, in, r] ~ N(0, 1/in) (variance-preserving like PEFT's kaiming-uniform default, whose bound
    1/sqrt(in) gives variance 1/(3 in): x @ A keeps x's scale whatever r is, and alpha / r then sets the
    update's size); B [L, r, out] = 0, so the adapted model starts equal to the base model. Both in
    the projection weight's dtype.
    """
    layers = decoder.layers
    names = target_names(layers, config)
    for name, k in zip(names, jax.random.split(key, len(names))):
        w = getattr(layers, name).value
        n, d_in, d_out = w.shape
        a = jax.random.normal(k, (n, d_in, config.rank), jnp.float32) / math.sqrt(d_in)
        setattr(layers, name + A_SUFFIX, nnx.Param(a.astype(w.dtype)))
        setattr(layers, name + B_SUFFIX, nnx.Param(jnp.zeros((n, config.rank, d_out), w.dtype)))
    decoder.lora = config
    return names


def scale_adapters(stacked: dict, scale) -> dict:
    """The layer weights with every `*_lora_b` multiplied by `scale` (a float or traced scalar: alpha / r
    for the adapted model, 0.0 for the base model); other entries are passed through. A no-op without
    adapters."""
    return {k: v * scale if k.endswith(B_SUFFIX) else v for k, v in stacked.items()}


DROPOUT_KEY, DROPOUT_RATE = "lora_dropout_key", "lora_dropout_rate"


def with_dropout(stacked: dict, rate: float, key: jax.Array | None) -> dict:
    """The stacked layer weights plus what `project` needs to drop the adapters' inputs: a key per layer
    (uint32 [L, 2]) and the rate ([L], so the scan hands each layer a scalar). A no-op when `key` is None
    (sampling, old and reference log-probs) or the rate is 0."""
    if key is None or not rate:
        return stacked
    n = next(iter(stacked.values())).shape[0]
    return {**stacked, DROPOUT_KEY: jax.random.key_data(jax.random.split(key, n)),
            DROPOUT_RATE: jnp.full((n,), rate, jnp.float32)}


def _dropped(x, w: dict, name: str):
    """x with each element zeroed with probability w[DROPOUT_RATE] and the rest scaled by 1 / (1 - rate);
    each projection of a layer draws its own mask."""
    if DROPOUT_KEY not in w:
        return x
    key = jax.random.fold_in(jax.random.wrap_key_data(w[DROPOUT_KEY]), PROJECTIONS.index(name))
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
