"""The rollout engine: prefill once, decode in one compiled loop over a preallocated KV cache.

`generate` is a pure function of (params, prompt arrays, key, temperature, top_p) and is jitted
whole: no host round trip per token. The n samples of a prompt share its prefill, its image
encoding and its keys and values: the prompt cache [layers, B, K, L, hd] is held once per prompt
and every decode step's queries of its n rows attend to it together
(`layers.attention_with_prefix`), next to a response cache of B * n rows. Decoding stops early once
every row has produced a stop token, inside `lax.while_loop`. It runs in segments
(`SamplerConfig.decode_segments`), one loop each, whose steps read the response cache only up to the
segment's end: the slots written so far, rounded up, rather than all `max_new_tokens` of them.

Cache slots: the prompt occupies the prompt cache's slots [0, L) (left padded); generated token i
is written at slot i of its row's response cache. M-RoPE positions continue per row at
`next_position + i` on all three axes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from vrl_jax import sharding as shd

from vrl_jax.models.qwen2 import KVCache
from vrl_jax.models.qwen_vl import QwenVL, VisionInputs
from vrl_jax.sampling.filters import choose_tokens


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """What is compiled into the sampler (changing any of these recompiles)."""

    max_new_tokens: int
    num_samples: int = 1
    top_k: int = 0  # 0 = off
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    cache_dtype: str | None = None  # default: the model's compute dtype
    # Decode in this many segments of equal length, each a loop whose steps read only the response cache's
    # slots up to the segment's end, not all max_new_tokens: (k + 1) / (2k) of the reads for k segments.
    # Each segment is its own loop in the program (compiled once each). 1: one loop over the whole cache.
    decode_segments: int = 4
    # The layer loop in prefill and decode: False = `lax.scan` over the stacked layers, whatever the model
    # trains with (`model.unroll_layers`); on CPU, decode with the scan ran 11-17% faster than straight-line
    # code at the benchmarks' shapes (`benchmarks/sampler.py --layers`).
    unroll_layers: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not self.stop_token_ids:
            raise ValueError("stop_token_ids is empty: give at least the EOS token id")
        if self.decode_segments < 1:
            raise ValueError(f"decode_segments must be >= 1 (1 = one decode loop), got {self.decode_segments}")

    MIN_SEGMENT = 8  # a shorter segment saves fewer reads than its loop costs to compile

    def segment_ends(self) -> list[int]:
        """The response cache's length in each decode segment (at most `decode_segments` of them, equal but
        the last, and at least MIN_SEGMENT tokens long); the last is max_new_tokens."""
        seg = max(-(-self.max_new_tokens // self.decode_segments), self.MIN_SEGMENT)
        return list(range(seg, self.max_new_tokens, seg)) + [self.max_new_tokens]


class SampleOutput(NamedTuple):
    """Rows are prompt-major: row b*n + j is sample j of prompt b.

    tokens int32 [B*n, N] (pad after the stop token), logprobs float32 [B*n, N] (0 where masked),
    mask int32 [B*n, N] (1 for generated tokens, the stop token included), lengths int32 [B*n],
    stopped bool [B*n] (a stop token was produced; False = truncated at max_new_tokens).
    """

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    lengths: jax.Array
    stopped: jax.Array


def decode_responses(tokenizer, tokens, mask) -> list[str]:
    """The text of each sampled response: `SampleOutput.tokens` [R, N] where `mask` is set, special tokens
    dropped (host-side)."""
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    return tokenizer.batch_decode([t[m > 0].tolist() for t, m in zip(tokens, mask)], skip_special_tokens=True)


def _repeat_rows(x, n: int, axis: int = 0):
    return x if n == 1 else jnp.repeat(x, n, axis=axis)


def kv_caches(text, prompts: int, prompt_len: int, rows: int, steps: int, dtype) -> tuple[KVCache, KVCache]:
    """The sampler's two caches, zeroed: the prompts' ([layers, prompts, K, prompt_len, hd], written by the
    prefill, then read by every sample of the prompt) and the samples' ([layers, rows, K, steps, hd]).
    `memory.rollout_items` sizes the rollout from this."""
    return KVCache.zeros(text, prompts, prompt_len, dtype), KVCache.zeros(text, rows, steps, dtype)


def generate(model: QwenVL, input_ids, attention_mask, positions, next_position, vision: VisionInputs | None,
             key, temperature, top_p, *, cfg: SamplerConfig) -> SampleOutput:
    """Samples `cfg.num_samples` continuations of each prompt.

    input_ids, attention_mask: int [B, L] left padded; positions: int [3, B, L]; next_position: int [B];
    vision: packed patches or None; key: PRNG key; temperature, top_p: float scalars.
    """
    b, length = input_ids.shape
    n, steps = cfg.num_samples, cfg.max_new_tokens
    text = model.config.text
    cache_dtype = jnp.dtype(cfg.cache_dtype) if cfg.cache_dtype else model.dtype
    stop_ids = jnp.asarray(cfg.stop_token_ids, jnp.int32)

    rows = b * n
    ends = cfg.segment_ends()
    prompt_valid = attention_mask.astype(bool)
    prompt_cache, cache = kv_caches(text, b, length, rows, steps, cache_dtype)
    hidden, prompt_cache = model.hidden_states(input_ids, positions, attention_mask, vision, cache=prompt_cache,
                                               write_index=0, kv_valid=prompt_valid)
    last_logits = model.logits(hidden[:, -1:])[:, 0]  # the last slot is always a real token (left padding)

    next_position = _repeat_rows(next_position, n)
    # pad (not fresh zeros) keeps the mask's rows split like the prompts' under explicit meshes.
    kv_valid = jnp.pad(_repeat_rows(prompt_valid, n), ((0, 0), (0, steps)))[:, length:]
    first, first_lp = choose_tokens(jax.random.fold_in(key, 0), _repeat_rows(last_logits, n), temperature,
                                    cfg.top_k, top_p)
    tokens = jnp.full((rows, steps), cfg.pad_token_id, jnp.int32).at[:, 0].set(first)
    logprobs = jnp.zeros((rows, steps), jnp.float32).at[:, 0].set(first_lp)
    done = jnp.isin(first, stop_ids)
    lengths = jnp.ones((rows,), jnp.int32)

    def cond(state, end):  # step i writes token i-1's keys at slot i-1: the segment reads slots [0, end)
        i, _, _, _, done, _, _ = state
        return (i < steps) & (i <= end) & ~jnp.all(done)

    def body(state, end):  # a step of the segment whose slots are [0, end): the attention reads those only
        i, tokens, logprobs, lengths, done, cache, kv_valid = state
        slot = i - 1
        kv_valid = kv_valid.at[:, slot].set(True)
        pos = jnp.broadcast_to((next_position + i - 1)[None, :, None], (3, rows, 1))
        prev = jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1)
        hidden, cache = model.hidden_states(prev, pos, None, None, cache=cache, write_index=slot,
                                            kv_valid=kv_valid[:, :end], prefix=prompt_cache,
                                            prefix_valid=prompt_valid)
        tok, lp = choose_tokens(jax.random.fold_in(key, i), model.logits(hidden)[:, 0], temperature, cfg.top_k,
                                top_p)
        tok = jnp.where(done, cfg.pad_token_id, tok)
        lp = jnp.where(done, 0.0, lp)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], i, axis=1)
        logprobs = jax.lax.dynamic_update_slice_in_dim(logprobs, lp[:, None], i, axis=1)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(tok, stop_ids)
        return i + 1, tokens, logprobs, lengths, done, cache, kv_valid

    state = (jnp.int32(1), tokens, logprobs, lengths, done, cache, kv_valid)
    for end in ends:  # each segment's steps attend over `end` response slots (a static length)
        state = jax.lax.while_loop(functools.partial(cond, end=end), functools.partial(body, end=end), state)
    _, tokens, logprobs, lengths, done, _, _ = state
    mask = (jnp.arange(steps)[None, :] < lengths[:, None]).astype(jnp.int32)
    return SampleOutput(tokens, logprobs * mask, mask, lengths, done)


class Sampler:
    """A compiled sampler for one model graph and one `SamplerConfig`.

    `sampler(params, inputs, key, temperature=1.0, top_p=1.0)`: params is the model's `nnx.State`,
    inputs anything with input_ids, attention_mask, positions, next_position and vision fields (a
    `ModelInputs`). Calls with the same shapes reuse one compilation; `trace_count` counts compilations.

    With a `mesh` the prompts' rows are split over its batch axes ("data", "fsdp") and so are their
    images when packed per row shard (`processor.encode(..., shards=S)`), the parameters stay where the
    train state placed them, and the output is replicated, so every process of a multi-host run reads
    every row (the arrays are small next to the decode's compute).
    """

    def __init__(self, graphdef, cfg: SamplerConfig, mesh=None, compiler_options: dict | None = None):
        self.graphdef = graphdef
        self.cfg = cfg
        self.mesh = mesh
        self.trace_count = 0
        options = {**decode_compiler_options(), **(compiler_options or {})}  # XLA options, over the sampler's
        self._fn = jax.jit(self._generate, compiler_options=options) if mesh is None else jax.jit(
            self._generate, out_shardings=shd.replicated(mesh), compiler_options=options)

    @classmethod
    def for_model(cls, model: QwenVL, cfg: SamplerConfig, **kwargs) -> tuple["Sampler", nnx.State]:
        graphdef, params = nnx.split(model)
        return cls(graphdef, cfg, **kwargs), params

    def _generate(self, params, input_ids, attention_mask, positions, next_position, vision, key, temperature,
                  top_p):
        self.trace_count += 1  # runs at trace time only
        model = nnx.merge(self.graphdef, params)
        model.language.unroll_layers = self.cfg.unroll_layers
        return generate(model, input_ids, attention_mask, positions, next_position, vision, key, temperature, top_p,
                        cfg=self.cfg)

    def _arguments(self, params, inputs, key, temperature, top_p) -> tuple:
        v = inputs.vision
        arrays = (inputs.input_ids, inputs.attention_mask, inputs.positions, inputs.next_position,
                  None if v is None else VisionInputs.from_batch(v))
        if self.mesh is None:
            arrays = jax.tree.map(jnp.asarray, arrays)
        else:
            arrays = shd.put(arrays, prompt_shardings(arrays, self.mesh))
        return (params, *arrays, key, jnp.float32(temperature), jnp.float32(top_p))

    def __call__(self, params, inputs, key, temperature: float = 1.0, top_p: float = 1.0) -> SampleOutput:
        return self._fn(*self._arguments(params, inputs, key, temperature, top_p))

    def lower(self, params, inputs, key, temperature: float = 1.0, top_p: float = 1.0) -> jax.stages.Lowered:
        """The program a call with these arguments runs, lowered: `.compile().as_text()` is its optimised HLO."""
        return self._fn.lower(*self._arguments(params, inputs, key, temperature, top_p))


def decode_compiler_options() -> dict[str, str]:
    """XLA options of the sampler's program. On CPU, XLA's own dots: jax >= 0.10 hands every dot to YNN by
    default, which suits the update's large GEMMs (`rl.logprobs.training_compiler_options` asks for it) but
    not decode's, with one query row per sample: a whole rollout ran 10-15% slower with YNN's, unrolled
    layers, and at half the tokens/s with the layer scan (`benchmarks/README.md`, "Decode on jax 0.10's CPU
    backend")."""
    return {"xla_cpu_experimental_ynn_fusion_type": ""} if jax.default_backend() == "cpu" else {}


def prompt_shardings(arrays, mesh):
    """Shardings of the sampler's inputs (input_ids, attention_mask [B, L], positions [3, B, L],
    next_position [B], vision): prompt rows over the batch axes; image buffers packed per row shard
    (`VisionInputs` [S, P, ...], S = the row shards) with the rows they serve, one buffer for the whole
    batch replicated."""
    ids, mask, positions, next_position, vision = arrays
    row = lambda x, dim: NamedSharding(mesh, shd.batch_spec(tuple(np.shape(x)), dim, mesh))  # noqa: E731
    if vision is not None:
        per_shard = np.ndim(vision.pixel_values) == 3
        if per_shard and len(vision.pixel_values) != shd.row_shards(len(ids), mesh):
            raise ValueError(f"the prompts' images are packed in {len(vision.pixel_values)} buffers, but the "
                             f"{len(ids)} rows split into {shd.row_shards(len(ids), mesh)} shards on this mesh")
        vision = jax.tree.map(lambda x: row(x, 0) if per_shard else shd.replicated(mesh), vision)
    return row(ids, 0), row(mask, 0), row(positions, 1), row(next_position, 0), vision
