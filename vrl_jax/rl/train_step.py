"""One RL training step: PPO epochs x mini-batches of optimizer updates, each over micro-batches.

Layout. A `TrainBatch` carries every array with a leading micro-batch axis `[M, mb, ...]`. The M
micro-batches split into `num_mini` mini-batches of k = M / num_mini consecutive micro-batches; each
PPO epoch runs one optimizer update per mini-batch, so a step makes `ppo_epochs * num_mini` updates
(MAYE: ppo_batch_size / grad-accum -> mini-batches; DyME/TRL: one update per step).

Exact accumulation. The loss of a micro-batch is a `SumCount`: `total` (differentiated) and `count`
(the aggregation denominator, parameter-free). A `lax.scan` over the k micro-batches sums gradients
of `total` and the counts; the mini-batch gradient is `sum grad / sum count`, which is exactly the
gradient of the mini-batch loss whatever k is (up to float summation order).

Non-finite guard. If an update's loss or gradient norm is not finite, the parameters and optimizer
state are left as they were (selected with `jnp.where`, no host round trip) and `state.skipped`
grows by one. The learning-rate schedule counts applied updates only.

Old log-probs. By default the ratio's pi_old is the batch's `old_logprobs`: the sampler's, or the
training forward's when the trainer recomputes them before the step (`recompute_old_logprobs`).
`StepConfig.old_logprobs="forward"` takes them from the update's own forward instead (detached),
as TRL/DyME do with one update per generation batch: the ratio is then exactly 1.

Metrics are float32 device scalars: loss parts and token means pooled over every micro-batch of the
step (`SumCount`s summed, divided once), the mean pre-clip gradient norm over updates and that of the
last update, the learning rate of the last update and of the next one, the response-token count of
the batch, updates made and skipped, and `max_abs_ratio_minus_1_first_update`: max |pi / pi_old - 1|
over the RL tokens (loss mask on, SFT weight 0) of the first update, pi_old being the batch's
`old_logprobs`. Nothing has changed the policy yet at that point, so it is the gap between the
program that produced `old_logprobs` (the sampler) and the training forward.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vrl_jax import sharding as shd
from vrl_jax.models.layers import remat_policy_name
from vrl_jax.models.qwen_vl import VisionInputs
from vrl_jax.rl.logprobs import sequence_stats, training_compiler_options
from vrl_jax.rl.losses import PolicyLossConfig, max_abs_ratio_minus_one, policy_objective
from vrl_jax.rl.train_state import OptimizerConfig, TrainState, lr_schedule, make_optimizer, trainable_params


class TrainBatch(NamedTuple):
    """One step's rollouts, M micro-batches of mb rows, T tokens, P packed image patches.

    input_ids, attention_mask: int `[M, mb, T]`; positions: int `[M, 3, mb, T]` (M-RoPE);
    targets: int `[M, mb, T]`, the next token at each position (targets[t] = input_ids[t + 1]);
    loss_mask: float `[M, mb, T]`, 1 where targets[t] is a response token that counts;
    old_logprobs: float `[M, mb, T]` rollout-policy log-probs of the targets;
    advantages: float `[M, mb, T]` (sequence-level advantages broadcast over tokens on the host);
    sft_weights: float `[M, mb]`, DyME memorization rows' NLL weight (0 elsewhere);
    ref_logprobs: float `[M, mb, T]` reference-policy log-probs, or None when the KL term is off;
    vision: VisionInputs of `[M, P, patch_dim]`, `[M, P, 2]`, `[M, P]`, `[M, P]` (each micro-batch's
      images packed in reading order), or of `[M, S, P, ...]` (packed per block of mb / S rows, the rows
      one data-parallel device holds), or None for text-only batches.
    prompt_mask: int `[M, G, L]` or None. Set, it says that each micro-batch's mb rows are G groups of
      n = mb / G consecutive rows whose first L columns are the same prompt (a GRPO group), gives that
      prompt's mask, and has the forward compute each prompt once per group instead of n times
      (`QwenVL.shared_prompt_hidden_states`); vision then holds the G prompts' images, placeholders in
      group order.
    """

    input_ids: jax.Array
    attention_mask: jax.Array
    positions: jax.Array
    targets: jax.Array
    loss_mask: jax.Array
    old_logprobs: jax.Array
    advantages: jax.Array
    sft_weights: jax.Array
    ref_logprobs: jax.Array | None = None
    vision: VisionInputs | None = None
    prompt_mask: jax.Array | None = None


OLD_LOGPROBS = ("batch", "forward")

# Which dimension of each TrainBatch field holds the rows (or, for vision, the patches).
_BATCH_DIM = dict(input_ids=1, attention_mask=1, positions=2, targets=1, loss_mask=1, old_logprobs=1,
                  advantages=1, sft_weights=1, ref_logprobs=1, prompt_mask=1)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of `train_step` (hashable).

    batch_size: rows per step (all M micro-batches together); num_micro: M; num_mini: mini-batches
      (= optimizer updates) per PPO epoch, dividing num_micro; ppo_epochs: passes over the batch.
    loss: the objective (`losses.PolicyLossConfig`).
    remat: what the decoder and vision blocks keep for the backward pass, a `layers.REMAT_POLICIES` name
      ("none", "full", "dots", "offload") or a bool (True = "full"): memory traded for compute.
    chunk_size: vocabulary chunk of the log-softmax; temperature: logits are divided by it (use the
      sampling temperature, as verl does).
    with_entropy: compute full-vocabulary entropy (needed when loss.entropy_coef != 0; else a metric).
    shuffle: permute the micro-batches with the state's key before each PPO epoch (only changes
      anything with num_mini > 1; rows stay with their micro-batch because images are packed per
      micro-batch).
    old_logprobs: "batch" (the ratio's pi_old is `TrainBatch.old_logprobs`) or "forward" (the
      update's own forward log-probs, detached: ratio exactly 1, TRL/DyME; needs one update per
      step; the batch's old_logprobs then only feed the first-update gap metric).
    """

    batch_size: int
    num_micro: int = 1
    num_mini: int = 1
    ppo_epochs: int = 1
    loss: PolicyLossConfig = PolicyLossConfig()
    remat: bool | str = False
    chunk_size: int = 8192
    temperature: float = 1.0
    with_entropy: bool = True
    shuffle: bool = False
    old_logprobs: str = "batch"

    def __post_init__(self):
        for name in ("batch_size", "num_micro", "num_mini", "ppo_epochs", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"StepConfig.{name} must be a positive int; got {value!r}")
        if self.batch_size % self.num_micro:
            raise ValueError(f"StepConfig.batch_size={self.batch_size} must be divisible by "
                             f"StepConfig.num_micro={self.num_micro}")
        if self.num_micro % self.num_mini:
            raise ValueError(f"StepConfig.num_micro={self.num_micro} must be divisible by "
                             f"StepConfig.num_mini={self.num_mini}")
        if not self.temperature > 0:
            raise ValueError(f"StepConfig.temperature must be > 0; got {self.temperature}")
        remat_policy_name(self.remat)  # raises naming the policies
        if not isinstance(self.loss, PolicyLossConfig):
            raise ValueError(f"StepConfig.loss must be a PolicyLossConfig; got {type(self.loss).__name__}")
        if self.loss.entropy_coef != 0.0 and not self.with_entropy:
            raise ValueError("StepConfig.with_entropy must be True when loss.entropy_coef != 0")
        if self.old_logprobs not in OLD_LOGPROBS:
            raise ValueError(f"StepConfig.old_logprobs must be one of {OLD_LOGPROBS}; got {self.old_logprobs!r}")
        if self.old_logprobs == "forward" and self.num_updates != 1:
            raise ValueError(f"StepConfig.old_logprobs='forward' needs one update per step (ppo_epochs * num_mini "
                             f"= {self.num_updates}): later updates would take their own policy as the old one")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.num_micro

    @property
    def num_updates(self) -> int:
        return self.ppo_epochs * self.num_mini

    def check_mesh(self, mesh: Mesh | None) -> None:
        """The micro-batch must split evenly over the data-parallel devices (data * fsdp)."""
        if mesh is None:
            return
        ways = shd.batch_size_divisor(mesh)
        if self.micro_batch_size % ways:
            raise ValueError(f"StepConfig.batch_size / num_micro = {self.micro_batch_size} rows per micro-batch "
                             f"must be divisible by the data-parallel size data*fsdp = {ways}")

    def check_batch(self, batch: TrainBatch) -> None:
        """Shapes of `batch` against this config; errors name the field. Host-side, before compiling."""
        if not isinstance(batch, TrainBatch):
            raise ValueError(f"batch must be a TrainBatch; got {type(batch).__name__}")
        m, mb = self.num_micro, self.micro_batch_size
        ids = batch.input_ids
        if ids.ndim != 3 or tuple(ids.shape[:2]) != (m, mb):
            raise ValueError(f"TrainBatch.input_ids must be [num_micro={m}, batch_size/num_micro={mb}, T]; "
                             f"got {tuple(ids.shape)}")
        t = ids.shape[2]
        want = dict(attention_mask=(m, mb, t), positions=(m, 3, mb, t), targets=(m, mb, t), loss_mask=(m, mb, t),
                    old_logprobs=(m, mb, t), advantages=(m, mb, t), sft_weights=(m, mb), ref_logprobs=(m, mb, t))
        for name, shape in want.items():
            x = getattr(batch, name)
            if x is None and name == "ref_logprobs":
                if self.loss.kl_coef != 0.0:
                    raise ValueError(f"TrainBatch.ref_logprobs is required when loss.kl_coef={self.loss.kl_coef}")
                continue
            if x is None or tuple(x.shape) != shape:
                raise ValueError(f"TrainBatch.{name} must have shape {shape}; got "
                                 f"{None if x is None else tuple(x.shape)}")
        if batch.vision is not None:
            pv = batch.vision.pixel_values
            lead = tuple(pv.shape[:pv.ndim - 2]) if pv.ndim in (3, 4) else None  # (M,) or (M, S)
            p = pv.shape[len(lead)] if lead else None
            shape = f"[num_micro={m}{', S' if lead and len(lead) == 2 else ''}, P, ...]"
            for name, tail in (("pixel_values", None), ("hw_pos", (2,)), ("segment_ids", ()), ("window_ids", ())):
                x = getattr(batch.vision, name)
                ok = (lead is not None and lead[0] == m and tuple(x.shape[:len(lead) + 1]) == (*lead, p)
                      and (tail is None or tuple(x.shape[len(lead) + 1:]) == tail))
                if not ok:
                    raise ValueError(f"TrainBatch.vision.{name} must be {shape} with one P for all fields; got "
                                     f"{tuple(x.shape)}")
            index, weight = batch.vision.feature_index, batch.vision.feature_weight
            if index is not None and (index.ndim != len(lead) + (1 if weight is None else 2)
                                      or tuple(index.shape[:len(lead)]) != lead):
                raise ValueError(f"TrainBatch.vision.feature_index must be [{', '.join(map(str, lead))}, U"
                                 f"{'' if weight is None else ', K'}]; got {tuple(index.shape)}")
            if weight is not None and (index is None or weight.shape != index.shape):
                raise ValueError(f"TrainBatch.vision.feature_weight must have feature_index's shape "
                                 f"{None if index is None else tuple(index.shape)}; got {tuple(weight.shape)}")
        pm = batch.prompt_mask
        if pm is not None and (pm.ndim != 3 or pm.shape[0] != m or mb % max(pm.shape[1], 1) or pm.shape[2] >= t):
            raise ValueError(f"TrainBatch.prompt_mask must be [num_micro={m}, G, L] with G dividing the {mb} rows of "
                             f"a micro-batch and L < T={t}; got {tuple(pm.shape)}")


# ---- Shardings -----------------------------------------------------------------------------------


def batch_shardings(batch: TrainBatch, mesh: Mesh) -> TrainBatch:
    """NamedShardings for a TrainBatch (arrays or ShapeDtypeStructs): rows over ("data", "fsdp").

    Image buffers packed per row shard ([M, S, P, ...], `batching.pack_micro_batches`) go with their rows
    (dimension 1 is S); one buffer per micro-batch ([M, P, ...]) has its patches split over the same axes
    when P divides (the vision tower is per-patch apart from attention, for which XLA gathers keys and
    values), else replicated.
    """
    out = {}
    for name, dim in _BATCH_DIM.items():
        x = getattr(batch, name)
        out[name] = None if x is None else NamedSharding(mesh, shd.batch_spec(tuple(x.shape), dim, mesh))
    vision = None
    if batch.vision is not None:
        vision = VisionInputs(*(None if x is None else NamedSharding(mesh, shd.batch_spec(tuple(x.shape), 1, mesh))
                                for x in batch.vision))
    return TrainBatch(**out, vision=vision)


# ---- The step ------------------------------------------------------------------------------------


def _flat(tree: Any) -> dict[str, Any]:
    return traverse_util.flatten_dict(tree, sep=".")


def _unflat(flat: dict[str, Any]) -> Any:
    return traverse_util.unflatten_dict(flat, sep=".")


def _tree_add(a: Any, b: Any) -> Any:
    return jax.tree.map(jnp.add, a, b)


def _micro_loss(graphdef: nnx.GraphDef, cfg: StepConfig, trainable: dict, frozen: dict, micro: TrainBatch, key):
    """(loss.total, (loss, metrics, gap)) of one micro-batch; differentiable in `trainable` only.

    key: this micro-batch's key for LoRA adapter dropout (unused without it).
    gap: max |pi / pi_old - 1| over its RL tokens, pi_old = the batch's old log-probs."""
    params = _unflat({**trainable, **jax.lax.stop_gradient(frozen)})
    stats = sequence_stats(graphdef, params, micro.input_ids, micro.positions, micro.attention_mask, micro.targets,
                           micro.vision, prompt_mask=micro.prompt_mask, chunk_size=cfg.chunk_size,
                           temperature=cfg.temperature, with_entropy=cfg.with_entropy, remat=cfg.remat,
                           lora_dropout=key)
    old = micro.old_logprobs if cfg.old_logprobs == "batch" else jax.lax.stop_gradient(stats.logprobs)
    loss, metrics = policy_objective(cfg.loss, stats.logprobs, old, micro.advantages, micro.loss_mask,
                                     ref_logprobs=micro.ref_logprobs, entropy=stats.entropy,
                                     sft_weights=micro.sft_weights)
    rl_tokens = micro.loss_mask * (micro.sft_weights == 0).astype(micro.loss_mask.dtype)[:, None]
    gap = max_abs_ratio_minus_one(stats.logprobs, micro.old_logprobs, rl_tokens)
    return loss.total, (loss, metrics, gap)


def _accumulate(graphdef, cfg, trainable, frozen, mini: TrainBatch, grad_shardings, key):
    """Sums gradients and SumCounts (max of the gaps) over the leading micro-batch axis of `mini` with
    `lax.scan`: the gradient sum is the carry, each micro-batch's loss parts are outputs summed after.
    key: the update's dropout key; micro-batch j uses `fold_in(key, j)`."""
    grad_fn = jax.value_and_grad(lambda tr, mc, k: _micro_loss(graphdef, cfg, tr, frozen, mc, k), has_aux=True)

    def constrain(grads):
        if grad_shardings is None:
            return grads
        return {k: jax.lax.with_sharding_constraint(g, grad_shardings[k]) for k, g in grads.items()}

    def body(grads, xs):
        micro, j = xs
        (_, parts), g = grad_fn(trainable, micro, jax.random.fold_in(key, j))
        return _tree_add(grads, constrain(jax.tree.map(lambda x: x.astype(jnp.float32), g))), parts

    zeros = constrain(jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable))
    grads, (loss, metrics, gap) = jax.lax.scan(body, zeros, (mini, jnp.arange(mini.input_ids.shape[0])))
    return grads, _sum0(loss), _sum0(metrics), gap.max(0)


def _sum0(tree):
    return jax.tree.map(lambda x: x.sum(0), tree)


def _split_params(params: Any, opt_cfg: OptimizerConfig) -> tuple[dict, dict, dict]:
    """(flat params, trainable flat dict, frozen flat dict) by the optimizer's train_* flags."""
    flat, trainable = _flat(params), trainable_params(params, opt_cfg)
    return flat, trainable, {k: v for k, v in flat.items() if k not in trainable}


def _mean_gradients(graphdef, cfg, trainable, frozen, mini, grad_shardings, key):
    """Mini-batch gradient `sum_k grad total_k / sum_k count_k` (0 when nothing counts) + SumCounts."""
    grads, loss, metrics, gap = _accumulate(graphdef, cfg, trainable, frozen, mini, grad_shardings, key)
    scale = jnp.where(loss.count > 0, 1.0 / jnp.where(loss.count > 0, loss.count, 1.0), 0.0)
    return jax.tree.map(lambda g: g * scale, grads), loss, metrics, gap


def batch_gradients(params: Any, batch: TrainBatch, *, graphdef: nnx.GraphDef, opt_cfg: OptimizerConfig,
                    cfg: StepConfig, key: jax.Array | None = None) -> tuple[Any, jax.Array, dict[str, jax.Array]]:
    """The gradient one optimizer update of `train_step` uses, for a whole TrainBatch as one mini-batch.

    params: pure dict; batch: TrainBatch `[M, mb, ...]`. Returns (gradients as a pure dict of the
    trainable parameters only, float32; the loss value; token-mean metrics and `max_abs_ratio_minus_1`),
    all over all M micro-batches. key: the dropout key of LoRA adapters (`dropout_key`), default key 0.
    """
    _, trainable, frozen = _split_params(params, opt_cfg)
    key = jax.random.key(0) if key is None else key
    grads, loss, metrics, gap = _mean_gradients(graphdef, cfg, trainable, frozen, batch, None, key)
    return _unflat(grads), loss.value(), {**{k: v.value() for k, v in metrics.items()}, "max_abs_ratio_minus_1": gap}


def recompute_old_logprobs(logprob_fn: Callable[[Any, Any], Any], params: Any, batch: TrainBatch) -> TrainBatch:
    """`batch` with `old_logprobs` from the training forward under `params` (the policy that sampled).

    logprob_fn: `logprobs.make_logprob_fn(graphdef, chunk_size=cfg.chunk_size, temperature=cfg.temperature)`
    (same chunking and temperature as the step, so the ratio of the first update is 1 up to the
    numerics of two compiled programs). Positions outside the loss mask are not used.
    """
    return batch._replace(old_logprobs=logprob_fn(params, batch).logprobs)


def dropout_key(rng: jax.Array, update: jax.Array | int) -> jax.Array:
    """The key of update `update`'s LoRA adapter dropout, from the state's key data (uint32 [2]) before the
    step; its own stream, so the state's next key and the shuffle order are the same with or without it."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(rng), 0xD20), update)


def micro_batch_order(rng: jax.Array, epoch: jax.Array | int, num_micro: int) -> jax.Array:
    """The micro-batch order of PPO epoch `epoch` when `StepConfig.shuffle` is on.

    rng: the state's key data (uint32 [2]) *before* the step. Returns int32 [num_micro], a permutation.
    """
    shuffle_key = jax.random.split(jax.random.wrap_key_data(rng))[1]
    return jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), num_micro)


def train_step(state: TrainState, batch: TrainBatch, *, graphdef: nnx.GraphDef, opt_cfg: OptimizerConfig,
               cfg: StepConfig, param_shardings: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """All optimizer updates of one RL step; pure (jit it with `make_train_step`).

    state: TrainState with pure-dict params; batch: TrainBatch `[M, mb, ...]` (see its docstring);
    graphdef: `nnx.split(model, nnx.Param)[0]`; param_shardings: optional tree of NamedSharding
    matching the params (pins gradient accumulators to the parameters' layout).
    Returns the new state and a dict of float32 scalar metrics.
    """
    optimizer = make_optimizer(opt_cfg)
    schedule = lr_schedule(opt_cfg)
    flat, trainable, frozen = _split_params(state.params, opt_cfg)
    grad_shardings = None
    if param_shardings is not None:
        grad_shardings = {k: s for k, s in _flat(param_shardings).items() if k in trainable}
    m, k = cfg.num_micro, cfg.num_micro // cfg.num_mini
    next_rng = jax.random.split(jax.random.wrap_key_data(state.rng))[0]

    def update(carry, u):
        trainable, opt_state, applied, skipped = carry
        epoch, j = u // cfg.num_mini, u % cfg.num_mini
        if k == m:  # one mini-batch: the whole batch, no copy (micro-batch order only reorders a sum)
            mini = batch
        elif not cfg.shuffle:
            mini = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, j * k, k), batch)
        else:
            index = jax.lax.dynamic_slice_in_dim(micro_batch_order(state.rng, epoch, m), j * k, k)
            mini = jax.tree.map(lambda x: jnp.take(x, index, axis=0), batch)
        grads, loss, metrics, gap = _mean_gradients(graphdef, cfg, trainable, frozen, mini, grad_shardings,
                                                    dropout_key(state.rng, u))
        grad_norm = optax.global_norm(grads)
        updates, new_opt_state = optimizer.update(grads, opt_state, trainable)
        new_trainable = {n: (p + updates[n]).astype(p.dtype) for n, p in trainable.items()}
        ok = jnp.isfinite(loss.total) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        lr = jnp.asarray(schedule(applied), jnp.float32)
        carry = (keep(new_trainable, trainable), keep(new_opt_state, opt_state), applied + ok.astype(jnp.int32),
                 skipped + (~ok).astype(jnp.int32))
        return carry, ({"loss": loss, **metrics}, grad_norm, lr, gap)  # per update, reduced below

    carry0 = (trainable, state.opt_state, state.step - state.skipped, jnp.zeros((), jnp.int32))
    (trainable, opt_state, applied, skipped), (parts, norms, lrs, gaps) = jax.lax.scan(
        update, carry0, jnp.arange(cfg.num_updates))
    pooled = _sum0(parts)

    params = _unflat({**flat, **trainable})
    new_state = TrainState(params, opt_state, state.step + cfg.num_updates, state.skipped + skipped,
                           jax.random.key_data(next_rng))
    metrics = {name: sc.value() for name, sc in pooled.items()}
    # MAYE logs the last update's pre-clip norm and, after its scheduler steps, the next update's rate.
    metrics.update(grad_norm=norms.mean(), grad_norm_last=norms[-1], learning_rate=lrs[-1],
                   next_learning_rate=jnp.asarray(schedule(applied), jnp.float32),
                   max_abs_ratio_minus_1_first_update=gaps[0], tokens=batch.loss_mask.astype(jnp.float32).sum(),
                   updates=jnp.float32(cfg.num_updates), skipped_updates=skipped.astype(jnp.float32))
    return new_state, metrics


def make_train_step(graphdef: nnx.GraphDef, opt_cfg: OptimizerConfig, cfg: StepConfig, *, mesh: Mesh | None = None,
                    state_shardings: TrainState | None = None, batch_shardings: TrainBatch | None = None,
                    donate: bool = True, compiler_options: dict[str, Any] | None = None
                    ) -> Callable[[TrainState, TrainBatch], tuple[TrainState, dict]]:
    """`step(state, batch) -> (state, metrics)`, jitted, the state donated.

    With a mesh, `state_shardings` (e.g. `train_state.train_state_shardings(state)`) and
    `batch_shardings` (`batch_shardings(example_batch, mesh)`) pin inputs and outputs; metrics come
    back replicated. Config and shape errors are raised on the host before anything compiles.
    compiler_options: passed to XLA (e.g. {"xla_backend_optimization_level": 0} halves CPU compile
    time for tests and debugging; the HLO program is the same).
    """
    cfg.check_mesh(mesh)
    params_sh = None if state_shardings is None else state_shardings.params
    fn = lambda state, batch: train_step(state, batch, graphdef=graphdef, opt_cfg=opt_cfg, cfg=cfg,  # noqa: E731
                                         param_shardings=params_sh)
    kwargs: dict[str, Any] = dict(donate_argnums=(0,) if donate else (),
                                  compiler_options={**training_compiler_options(), **(compiler_options or {})})
    if mesh is not None:
        if state_shardings is None or batch_shardings is None:
            raise ValueError("make_train_step: with a mesh, pass state_shardings and batch_shardings")
        kwargs.update(in_shardings=(state_shardings, batch_shardings),
                      out_shardings=(state_shardings, NamedSharding(mesh, P())))
    jitted = jax.jit(fn, **kwargs)

    def step(state: TrainState, batch: TrainBatch):
        cfg.check_batch(batch)
        return jitted(state, batch)

    step.jitted = jitted  # for lowering / cost analysis
    return step


class OnMesh:
    """`fn(first, batch)` (the train step, a log-prob forward) under a mesh: each host `TrainBatch` is
    placed with its rows over ("data", "fsdp") and `make(batch_shardings)` compiles `fn` for that
    layout, once per layout (which fields are set, which dimensions split); new length buckets only
    recompile. Without a mesh the batch goes to the default device and `make(None)` is compiled once."""

    def __init__(self, make, mesh):
        self.make, self.mesh = make, mesh
        self.fns: dict = {}

    def __call__(self, first, batch):
        if self.mesh is None:
            if None not in self.fns:
                self.fns[None] = self.make(None)
            return self.fns[None](first, jax.tree.map(jnp.asarray, batch))
        shardings = batch_shardings(batch, self.mesh)
        key = (jax.tree.structure(batch), tuple(s.spec for s in jax.tree.leaves(shardings)))
        if key not in self.fns:
            self.fns[key] = self.make(shardings)
        return self.fns[key](first, shd.put(batch, shardings))
