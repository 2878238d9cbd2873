"""Per-token log-probabilities (and entropy) of target tokens under the policy: one forward, no logits.

`sequence_stats` is the single place where the model meets the loss: the train step differentiates
it, and `batch_logprobs` runs it forward-only over a whole micro-batched `TrainBatch` for the
old-policy (rollout) and reference log-probs. Both therefore share the model code, the dtype and
the vocabulary-chunked log-softmax, so on-policy ratios are exactly 1 at the first update.

The final hidden states meet the unembedding chunk by chunk (`losses.chunked_token_stats`), so no
`[B, T, V]` float32 logits are ever built (Qwen's vocabulary is ~152k).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from vrl_jax.models.qwen_vl import VisionInputs
from vrl_jax.rl.losses import TokenStats, chunked_token_stats


def sequence_stats(graphdef: nnx.GraphDef, params: Any, input_ids: jax.Array, positions: jax.Array,
                   attention_mask: jax.Array, targets: jax.Array, vision: VisionInputs | None = None, *,
                   prompt_mask: jax.Array | None = None, chunk_size: int = 8192, temperature: float = 1.0,
                   with_entropy: bool = False, remat: bool = False, lora_dropout=None) -> TokenStats:
    """Log-probs of `targets` under `softmax(logits / temperature)` at every position.

    graphdef, params: `nnx.split(model, nnx.Param)`'s graph and the pure param dict.
    input_ids, attention_mask, targets: int `[B, T]` (targets[t] is the token after input_ids[t]);
    positions: int `[3, B, T]`; vision: packed patches for this batch's images (`[P, ...]`) or None.
    prompt_mask: `[G, L]` or None: the rows are G groups of B / G consecutive rows sharing their first
    L columns (`TrainBatch.prompt_mask`); the prompt is then computed once per group, and only the
    positions from L - 1 on (those that predict response tokens) are scored, the others hold 0.
    lora_dropout: a key for LoRA adapters' input dropout (the train step's forward), or None.
    Returns TokenStats of float32 `[B, T]` (entropy None unless `with_entropy`); padding positions
    hold finite garbage, mask them.
    """
    model = nnx.merge(graphdef, params)
    if prompt_mask is None:
        hidden, _ = model.hidden_states(input_ids, positions, attention_mask, vision, remat=remat,
                                        lora_dropout=lora_dropout)
        skipped = 0
    else:
        hidden = model.shared_prompt_hidden_states(input_ids, positions, attention_mask, prompt_mask, vision,
                                                   remat=remat, lora_dropout=lora_dropout)
        skipped = input_ids.shape[1] - hidden.shape[1]
    unembed = model.language.unembedding().astype(hidden.dtype)
    stats = chunked_token_stats(hidden, unembed, targets[:, skipped:], chunk_size=chunk_size,
                                temperature=temperature, with_entropy=with_entropy)
    pad = lambda x: None if x is None else jnp.pad(x, ((0, 0), (skipped, 0)))  # noqa: E731
    return TokenStats(pad(stats.logprobs), pad(stats.entropy))


def batch_logprobs(graphdef: nnx.GraphDef, params: Any, batch: Any, *, chunk_size: int = 8192,
                   temperature: float = 1.0, with_entropy: bool = False) -> TokenStats:
    """`sequence_stats` over every micro-batch of a TrainBatch-like tree, one at a time (`lax.map`).

    batch: has input_ids, attention_mask, targets `[M, mb, T]`, positions `[M, 3, mb, T]`,
    vision (VisionInputs of `[M, P, ...]`) or None, and optionally prompt_mask `[M, G, L]` or None. Returns TokenStats of float32 `[M, mb, T]`.
    """
    fields = (batch.input_ids, batch.positions, batch.attention_mask, batch.targets, batch.vision,
              getattr(batch, "prompt_mask", None))

    def one(xs):
        ids, pos, mask, tgt, vision, prompt_mask = xs
        return sequence_stats(graphdef, params, ids, pos, mask, tgt, vision, prompt_mask=prompt_mask,
                              chunk_size=chunk_size, temperature=temperature, with_entropy=with_entropy)

    return jax.lax.map(one, fields)


def training_compiler_options() -> dict[str, Any]:
    """XLA options of the training-side programs (train step, reference and old log-probs). On CPU, YNN
    (XNNPACK's successor) runs every dot: the update's large GEMMs and their weight-gradient transposes
    run ~20% faster (`benchmarks/train_step.py`, ratio 0.82 -> 0.99 on 2 cores). The sampler asks for XLA's
    own dots (`sampling.sampler.decode_compiler_options`), faster for decode's skinny ones."""
    if jax.default_backend() != "cpu":
        return {}
    return {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def make_logprob_fn(graphdef: nnx.GraphDef, *, chunk_size: int = 8192, temperature: float = 1.0,
                    with_entropy: bool = False, param_shardings: Any = None, batch_shardings: Any = None,
                    out_sharding: Any = None, compiler_options: dict[str, Any] | None = None
                    ) -> Callable[[Any, Any], TokenStats]:
    """Compiled `fn(params, batch) -> TokenStats [M, mb, T]` for old-policy / reference log-probs.

    The shardings are optional: given, they pin the inputs (params as placed for training, the
    batch as `train_step.batch_shardings`) and the output, so nothing is resharded between calls.
    """
    def fn(params, batch):
        return batch_logprobs(graphdef, params, batch, chunk_size=chunk_size, temperature=temperature,
                              with_entropy=with_entropy)

    compiler_options = {**training_compiler_options(), **(compiler_options or {})}

    if param_shardings is None and batch_shardings is None:
        return jax.jit(fn, compiler_options=compiler_options)
    out = None if out_sharding is None else TokenStats(out_sharding, out_sharding if with_entropy else None)
    return jax.jit(fn, in_shardings=(param_shardings, batch_shardings), out_shardings=out,
                   compiler_options=compiler_options)
