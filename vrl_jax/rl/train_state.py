"""The training state (a plain pytree) and its optimizer.

`TrainState` holds the parameters as a *pure* nested dict of arrays (`nnx.State.to_pure_dict()`;
`nnx.merge(graphdef, params)` rebuilds the model inside the step), the optax state, and counters.

The optimizer is AdamW with linear warmup then a cosine (MAYE), linear (HF Trainer / TRL, DyME) or
constant schedule, global-norm gradient clipping and decoupled weight decay on all parameters
(MAYE) or not on biases and norms (HF Trainer's rule). It is built once, from the config alone, and
acts on the trainable parameters only: a flat dict {dotted path: array} of the leaves MAYE's
`train_vit` / `train_connector` / `train_llm` flags leave trainable (`trainable_params`). Frozen
leaves carry no Adam moments, get no gradient, and clipping sees only trainable gradients.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax import traverse_util

from vrl_jax import sharding as shd
from vrl_jax.models.lora import is_adapter

# Which flag owns a parameter path (MAYE: vit = patch embedding + blocks, connector = the merger, Qwen3-VL's
# DeepStack mergers and LLaVA-OneVision's projector).
_PARTS = ((r"^visual\.(merger|deepstack)_", "train_connector"), (r"^projector\.", "train_connector"),
          (r"^visual\.", "train_vit"), (r"^language\.", "train_llm"))
PART_NAMES = {"train_vit": "the vision tower", "train_connector": "the connector", "train_llm": "the language model"}


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW + warmup/cosine schedule + clipping + freezing. Defaults follow MAYE's launch script.

    learning_rate: peak learning rate (MAYE 5e-6).
    warmup_steps: optimizer updates of linear warmup from 0 (MAYE: 10% of all updates).
    total_steps: optimizer updates of the whole run (warmup included); the schedule decays over the
      rest down to `learning_rate * final_lr_ratio`, and stays there after `total_steps`.
    schedule: after warmup, "cosine" (MAYE), "linear" (HF Trainer's default `linear`, DyME/TRL:
      `lr * (total - step) / (total - warmup)`, 0 at `total_steps` when final_lr_ratio is 0) or
      "constant" (HF `constant_with_warmup`; final_lr_ratio unused).
    b1, b2, eps: Adam (MAYE 0.9, 0.95, 1e-5; HF Trainer 0.9, 0.999, 1e-8). weight_decay: decoupled
      (AdamW) decay, 0.01.
    clip_grad_norm: global-norm clip over the trainable gradients, None = off (MAYE 1.0).
    decay_mask: which parameters weight decay applies to (`DECAY_MASKS`): "all" (MAYE's torch AdamW
      over `model.parameters()`), "no_bias_norm" (every bias and every norm weight excluded), or
      "hf_trainer" (exactly HF Trainer's `get_decay_parameter_names` on the HF names, see
      `decay_mask_hf_trainer`).
    no_decay_regex: parameter paths matching it also get no weight decay (None = no extra rule).
    train_vit, train_connector, train_llm: MAYE's flags (paper: F / F / T).
    moments_dtype: the dtype Adam's two moments are stored in: "float32", or "bfloat16" (half their
      memory; the update itself is computed in float32, `scale_by_adam_stored_in`).
    """

    learning_rate: float = 5e-6
    warmup_steps: int = 0
    total_steps: int = 1
    final_lr_ratio: float = 0.0
    schedule: str = "cosine"
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.01
    clip_grad_norm: float | None = 1.0
    decay_mask: str = "all"
    no_decay_regex: str | None = None
    train_vit: bool = False
    train_connector: bool = False
    train_llm: bool = True
    moments_dtype: str = "float32"

    def __post_init__(self):
        if not self.learning_rate >= 0:
            raise ValueError(f"OptimizerConfig.learning_rate must be >= 0; got {self.learning_rate}")
        if not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise ValueError(f"OptimizerConfig.total_steps must be a positive int; got {self.total_steps!r}")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"OptimizerConfig.warmup_steps must be an int in [0, total_steps={self.total_steps}]; "
                             f"got {self.warmup_steps!r}")
        if not 0.0 <= self.final_lr_ratio <= 1.0:
            raise ValueError(f"OptimizerConfig.final_lr_ratio must be in [0, 1]; got {self.final_lr_ratio}")
        for name, choices in (("schedule", tuple(SCHEDULES)), ("decay_mask", tuple(DECAY_MASKS)),
                              ("moments_dtype", ("float32", "bfloat16"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"OptimizerConfig.{name} must be one of {choices}; got {getattr(self, name)!r}")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"OptimizerConfig.{name} must be in [0, 1); got {getattr(self, name)}")
        if self.eps <= 0:
            raise ValueError(f"OptimizerConfig.eps must be > 0; got {self.eps}")
        if self.weight_decay < 0:
            raise ValueError(f"OptimizerConfig.weight_decay must be >= 0; got {self.weight_decay}")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ValueError(f"OptimizerConfig.clip_grad_norm must be > 0 or None; got {self.clip_grad_norm}")
        if self.no_decay_regex is not None:
            try:
                re.compile(self.no_decay_regex)
            except re.error as e:
                raise ValueError(f"OptimizerConfig.no_decay_regex is not a valid regex: {e}") from None
        if not (self.train_vit or self.train_connector or self.train_llm):
            raise ValueError("OptimizerConfig: train_vit, train_connector and train_llm are all False; "
                             "nothing would train")


class TrainState(NamedTuple):
    """params: pure nested dict of arrays; opt_state: optax state; step: int32 optimizer updates
    attempted (applied + skipped); skipped: int32 updates skipped as non-finite; rng: uint32 [2] key."""

    params: Any
    opt_state: Any
    step: jax.Array
    skipped: jax.Array
    rng: jax.Array


def _cosine(cfg: "OptimizerConfig") -> optax.Schedule:
    decay = max(cfg.total_steps, cfg.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps, decay,
                                              end_value=cfg.learning_rate * cfg.final_lr_ratio)


def _with_warmup(cfg: "OptimizerConfig", after: optax.Schedule) -> optax.Schedule:
    if cfg.warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def _linear(cfg: "OptimizerConfig") -> optax.Schedule:
    # HF `get_linear_schedule_with_warmup`: lr * (total - step) / (total - warmup) after warmup.
    steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    return _with_warmup(cfg, optax.linear_schedule(cfg.learning_rate, cfg.learning_rate * cfg.final_lr_ratio, steps))


def _constant(cfg: "OptimizerConfig") -> optax.Schedule:
    return _with_warmup(cfg, optax.constant_schedule(cfg.learning_rate))


# Learning-rate schedules after the linear warmup, by `OptimizerConfig.schedule`.
SCHEDULES = {"cosine": _cosine, "linear": _linear, "constant": _constant}


def lr_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Learning rate as a function of the number of applied updates (update k uses `schedule(k)`)."""
    return SCHEDULES[cfg.schedule](cfg)


def _flat(params: Any) -> dict[str, Any]:
    return traverse_util.flatten_dict(params, sep=".")


def _unflat(flat: dict[str, Any]) -> Any:
    return traverse_util.unflatten_dict(flat, sep=".")


def overlay(params: Any, flat: dict[str, Any]) -> Any:
    """`params` (pure dict) with the leaves at `flat`'s dotted paths replaced by its arrays: the reference's
    full parameters from `run_setup.reference_copy`, a state's from a checkpoint's trainable ones."""
    return _unflat({**_flat(params), **flat})


def part_flag(path: str) -> str:
    """The `train_*` flag that owns the parameter at dotted `path` (`_PARTS`)."""
    for pattern, flag in _PARTS:
        if re.search(pattern, path):
            return flag
    raise ValueError(f"parameter {path!r} belongs to none of vit / connector / llm")


def trainable_mask(params: Any, cfg: OptimizerConfig) -> Any:
    """Booleans, the structure of `params`: True where the parameter trains (by the train_* flags).

    LoRA (`models/lora.py`): a part (vision tower, connector, language model) whose params hold adapters
    trains through them alone: its adapters follow its flag and its other weights are frozen."""
    flat = _flat(params)
    adapted = {part_flag(p) for p in flat if is_adapter(p)}

    def trains(path: str) -> bool:
        flag = part_flag(path)
        return bool(getattr(cfg, flag)) and (flag not in adapted or is_adapter(path))
    return _unflat({k: trains(k) for k in flat})


def decay_mask_all(paths: list[str]) -> dict[str, bool]:
    return {p: True for p in paths}


def decay_mask_no_bias_norm(paths: list[str]) -> dict[str, bool]:
    """No decay on biases (`*_b`) or norm weights (`*norm*`, `norm1_w`, `merger_norm_w`, ...); LoRA adapters
    (`*_lora_b` is not a bias) decay."""
    return {p: is_adapter(p) or re.search(r"(_b$|norm)", p.rsplit(".", 1)[-1]) is None for p in paths}


# HF Trainer's `get_decay_parameter_names` (the same in transformers 4.57.1, DyME's pin, and 5.23):
# parameters of `nn.LayerNorm` modules, or whose lower-cased name matches one of these, get no decay.
_HF_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def decay_mask_hf_trainer(paths: list[str]) -> dict[str, bool]:
    """HF Trainer's rule, applied to each parameter's HF name (the families' `WeightTable`s).

    Excluded: every bias; the LLM's RMSNorm weights (`input_layernorm`, `post_attention_layernorm`,
    `model.norm`: matched by name); Qwen2-VL's vision `norm1`/`norm2` and merger `ln_q` (modules
    of type `nn.LayerNorm`, recognised here by their bias). Decayed: Qwen2.5-VL's vision
    `norm1`/`norm2` and `ln_q` weights, which are `Qwen2RMSNorm` modules whose names match no
    pattern, so HF Trainer decays them too.
    """
    from vrl_jax.models.families import hf_names as family_names  # heavy; only this mask needs it

    hf_names = family_names()  # the first family's name of a path wins (Qwen2's); others add their own
    present = set(paths)
    out = {}
    for path in paths:
        if is_adapter(path):  # PEFT's lora_A / lora_B weights match none of the patterns: HF Trainer decays them
            out[path] = True
            continue
        if path not in hf_names:
            raise ValueError(f"decay_mask 'hf_trainer': parameter {path!r} has no HF name in any family's weight table")
        last = path.rsplit(".", 1)[-1]
        layer_norm = "norm" in last and last.endswith("_w") and path[:-1] + "b" in present  # RMSNorm has no bias
        out[path] = not (layer_norm or _HF_NO_DECAY.search(hf_names[path].replace("{i}", "0").lower()))
    return out


# Which parameters weight decay applies to, by `OptimizerConfig.decay_mask`: flat paths -> {path: decays}.
DECAY_MASKS = {"all": decay_mask_all, "no_bias_norm": decay_mask_no_bias_norm, "hf_trainer": decay_mask_hf_trainer}


def weight_decay_mask(params: Any, cfg: OptimizerConfig) -> Any:
    """Booleans, the structure of `params`: True where weight decay applies."""
    paths = list(_flat(params))
    decays = DECAY_MASKS[cfg.decay_mask](paths)
    if cfg.no_decay_regex is not None:
        decays = {p: d and re.search(cfg.no_decay_regex, p) is None for p, d in decays.items()}
    return _unflat(decays)


def trainable_params(params: Any, cfg: OptimizerConfig) -> dict[str, Any]:
    """The trainable leaves of a pure param dict as a flat dict {dotted path: array}: what the
    optimizer updates and holds moments for."""
    mask = _flat(trainable_mask(params, cfg))
    return {k: v for k, v in _flat(params).items() if mask[k]}


def scale_by_adam_stored_in(dtype, b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """`optax.scale_by_adam` with both moments stored in `dtype` (optax's `mu_dtype` covers the first
    only); each update reads them into float32, computes there, and stores them back rounded."""
    f32 = jnp.float32

    def init(params):
        zeros = lambda p: jnp.zeros(p.shape, dtype)  # noqa: E731
        return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params),
                                      jax.tree.map(zeros, params))

    def update(grads, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        mu = jax.tree.map(lambda m, g: b1 * m.astype(f32) + (1 - b1) * g.astype(f32), state.mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * v.astype(f32) + (1 - b2) * jnp.square(g.astype(f32)), state.nu, grads)
        c1, c2 = 1 - b1 ** count.astype(f32), 1 - b2 ** count.astype(f32)
        out = jax.tree.map(lambda m, v, g: ((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(g.dtype), mu, nu, grads)
        cast = lambda t: jax.tree.map(lambda x: x.astype(dtype), t)  # noqa: E731
        return out, optax.ScaleByAdamState(count, cast(mu), cast(nu))

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """The optax transformation over `trainable_params` (the weight-decay mask is read off its paths)."""
    decay_mask = None
    if cfg.decay_mask != "all" or cfg.no_decay_regex is not None:
        decay_mask = lambda flat: _flat(weight_decay_mask(_unflat(dict(flat)), cfg))  # noqa: E731
    if cfg.moments_dtype == "float32":
        adamw = optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                            mask=decay_mask)
    else:  # the chain optax.adamw builds, with the moments stored in bfloat16
        adamw = optax.chain(scale_by_adam_stored_in(jnp.dtype(cfg.moments_dtype), cfg.b1, cfg.b2, cfg.eps),
                            optax.add_decayed_weights(cfg.weight_decay, decay_mask),
                            optax.scale_by_learning_rate(lr_schedule(cfg)))
    return adamw if cfg.clip_grad_norm is None else optax.chain(optax.clip_by_global_norm(cfg.clip_grad_norm), adamw)


def pure_params(model: nnx.Module) -> Any:
    """The model's parameters as a pure nested dict of arrays."""
    return nnx.state(model, nnx.Param).to_pure_dict()


def create_train_state(model: nnx.Module, cfg: OptimizerConfig, seed: int = 0, mesh: jax.sharding.Mesh | None = None,
                       rules=shd.PARAM_RULES) -> tuple[TrainState, optax.GradientTransformation, nnx.GraphDef]:
    """Builds (state, optimizer, graphdef) from a model.

    With a mesh the parameters are placed by `rules` (every process must pass the same model, e.g.
    built from the same seed or checkpoint) and the optimizer state is created already sharded (Adam
    moments follow their parameter's sharding); counters and the key are replicated.

    The state shares the model's parameter buffers where no copy is needed (a model loaded straight
    into its shardings is not duplicated), and the train step donates them: after the first step the
    model's arrays are deleted. Keep using the state's params (`nnx.merge(graphdef, state.params)`).
    """
    graphdef, _ = nnx.split(model, nnx.Param)
    params = pure_params(model)
    optimizer = make_optimizer(cfg)
    rng = jax.random.key_data(jax.random.key(seed))
    scalars = (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), rng)
    if mesh is None:
        return TrainState(params, optimizer.init(trainable_params(params, cfg)), *scalars), optimizer, graphdef
    p_shard = shd.param_shardings(params, mesh, rules)
    params = shd.put(params, p_shard)
    trainable = trainable_params(params, cfg)
    opt_shape = jax.eval_shape(optimizer.init, trainable)
    # Moments have their parameter's shape; match them to their parameter by path.
    opt_shard = opt_state_shardings(opt_shape, p_shard, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shard)(trainable)
    rep = shd.replicated(mesh)
    return TrainState(params, opt_state, *shd.put(scalars, (rep, rep, rep))), optimizer, graphdef


def opt_state_shardings(opt_state: Any, param_shardings: Any, mesh: jax.sharding.Mesh) -> Any:
    """Shardings for an optax state: a leaf whose path ends with a parameter's path (Adam's mu/nu
    are copies of the trainable params, keyed by dotted path) takes that parameter's sharding;
    everything else is replicated."""
    by_path = {tuple(k.split(".")): s for k, s in _flat(param_shardings).items()}
    rep = shd.replicated(mesh)

    def one(key_path, leaf):
        names = tuple(part for k in key_path
                      for part in str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))).split("."))
        for n in range(len(names)):
            if names[n:] in by_path:
                sharding = by_path[names[n:]]
                if len(sharding.spec) <= len(leaf.shape):
                    return sharding
        return rep

    return jax.tree_util.tree_map_with_path(one, opt_state)


def train_state_shardings(state: TrainState, mesh: jax.sharding.Mesh | None = None,
                          rules=shd.PARAM_RULES) -> TrainState:
    """Shardings for every leaf of a TrainState (for jit in/out shardings or a sharded restore).

    Without a mesh: the shardings the placed arrays already have. With a mesh: the layout
    `create_train_state(..., mesh=mesh)` gives, computed from shapes alone, so `state` may be
    abstract (`jax.ShapeDtypeStruct` leaves, e.g. `jax.eval_shape` of a state or a checkpoint's
    metadata): params by `rules`, Adam moments like their parameter, counters and key replicated.
    """
    if mesh is None:
        return shd.shardings_of(state)
    p_shard = shd.param_shardings(state.params, mesh, rules)
    rep = shd.replicated(mesh)
    return TrainState(p_shard, opt_state_shardings(state.opt_state, p_shard, mesh), rep, rep, rep)
