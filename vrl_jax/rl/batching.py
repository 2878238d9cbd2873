"""Trajectories: prompts plus sampled responses laid out as the train step's micro-batched `TrainBatch`.

Host-side NumPy. A row is one (prompt, response) pair: the left-padded prompt in slots [0, L), the
response in [L, L + N). Position t predicts token t + 1, so the loss covers targets in
[L - 1, L + N - 1) where the response mask is set. Rows are prompt-major (row b*n + j is sample j of
prompt b), the order the sampler returns.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import numpy as np

from vrl_jax.models.processor import pack_row_blocks
from vrl_jax.models.qwen_vl import VisionInputs
from vrl_jax.rl.train_step import TrainBatch


class Sequences(NamedTuple):
    """Rows of prompt + response, [R, T] with T = L + N (positions [3, R, T])."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    positions: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    old_logprobs: np.ndarray
    prompt_index: np.ndarray  # int [R]: the prompt each row answers
    prompt_length: int = 0  # L: the prompt columns every row starts with


def build_sequences(prompts, tokens, response_mask, logprobs, num_samples: int, pad_id: int) -> Sequences:
    """prompts: ModelInputs of B prompts (input_ids [B, L], positions [3, B, L], next_position [B]);
    tokens, response_mask, logprobs: [B*n, N] from the sampler (or replaced rows). Returns Sequences."""
    tokens = np.asarray(tokens, np.int32)
    rows, n_new = tokens.shape
    index = np.repeat(np.arange(len(prompts.input_ids)), num_samples)
    if len(index) != rows:
        raise ValueError(f"{rows} response rows for {len(prompts.input_ids)} prompts x {num_samples} samples")
    mask = np.asarray(response_mask, np.int32)
    ids = np.concatenate([prompts.input_ids[index], np.where(mask > 0, tokens, pad_id)], axis=1)
    attention = np.concatenate([prompts.attention_mask[index], mask], axis=1)
    new_pos = prompts.next_position[index][:, None] + np.arange(n_new)[None]
    positions = np.concatenate([prompts.positions[:, index], np.broadcast_to(new_pos, (3, rows, n_new))], axis=2)
    length = prompts.input_ids.shape[1]
    targets = np.concatenate([ids[:, 1:], np.full((rows, 1), pad_id, np.int32)], axis=1)
    loss_mask = np.zeros(ids.shape, np.float32)
    loss_mask[:, length - 1:length - 1 + n_new] = mask
    old = np.zeros(ids.shape, np.float32)
    old[:, length - 1:length - 1 + n_new] = np.asarray(logprobs, np.float32) * mask
    return Sequences(ids.astype(np.int32), attention.astype(np.int32), positions.astype(np.int32),
                     targets.astype(np.int32), loss_mask, old, index, length)


def shared_prompt_group(rows: int, num_micro: int, num_samples: int) -> int:
    """How many consecutive rows the train step may treat as one prompt group (`TrainBatch.prompt_mask`):
    the samples per prompt when every micro-batch holds whole groups, else 1 (no sharing)."""
    per = rows // num_micro
    return num_samples if num_samples > 1 and per % num_samples == 0 else 1


def target_width(longest: int, cap: int, smallest: int = 32) -> int:
    """Response columns for a batch of reference targets: the next power of two >= `longest` (and
    >= `smallest`), at most `cap`. A few static widths, so SFT batches do not pay for `cap` columns
    when every target is short, at the price of one compilation per width."""
    width = smallest
    while width < longest:
        width *= 2
    return min(width, cap)


def replace_responses(tokens, mask, logprobs, rows: Sequence[int], targets: Sequence[Sequence[int]]):
    """Puts reference token sequences in place of the sampled responses of `rows` (DyME memorization,
    SFT): tokens are truncated to N, the rest of the row masked; their logprobs are 0 (they train with
    the supervised term, not the ratio). Returns new (tokens, mask, logprobs)."""
    tokens, mask, logprobs = np.array(tokens), np.array(mask), np.array(logprobs)
    n_new = tokens.shape[1]
    for r, target in zip(rows, targets):
        t = list(target)[:n_new]
        tokens[r] = 0
        tokens[r, :len(t)] = t
        mask[r] = 0
        mask[r, :len(t)] = 1
        logprobs[r] = 0.0
    return tokens, mask, logprobs


def truncated_targets(targets: Sequence[Sequence[int]], width: int) -> int:
    """How many targets are longer than `width` columns (they lose their answer line and end token)."""
    return sum(len(t) > width for t in targets)


class Replaced(NamedTuple):
    """Rows after `insert_targets`: tokens, mask [R, W] and logprobs [R, W] with W >= N; `truncated`
    counts the targets longer than W (cut at W)."""

    tokens: np.ndarray
    mask: np.ndarray
    logprobs: np.ndarray
    truncated: int


def insert_targets(tokens, mask, logprobs, rows: Sequence[int], targets: Sequence[Sequence[int]],
                   max_width: int) -> Replaced:
    """`replace_responses` for reference targets among sampled rows (DyME memorization): when a target
    is longer than the N sampled columns, every row is widened with masked columns to
    `target_width(longest, max_width)` (N itself if that is not wider), so the target keeps its answer
    line and end token; W takes a few static values (N or a power of two up to `max_width`), each one
    compilation of the train step. Targets still longer than W are cut and counted."""
    tokens, mask, logprobs = np.asarray(tokens), np.asarray(mask), np.asarray(logprobs)
    n_new = tokens.shape[1]
    longest = max((len(t) for t in targets), default=0)
    width = target_width(longest, max(max_width, n_new)) if longest > n_new else n_new
    pad = ((0, 0), (0, width - n_new))
    tokens, mask, logprobs = (np.pad(x, pad) for x in (tokens, mask, logprobs))
    return Replaced(*replace_responses(tokens, mask, logprobs, rows, targets), truncated_targets(targets, width))


def pack_micro_batches(row_images: Sequence[Sequence], prompt_index: np.ndarray, num_micro: int, processor,
                       buckets: Sequence[int], group: int = 1, shards: int = 1,
                       local: Sequence[bool] | None = None) -> VisionInputs:
    """Packs each micro-batch's images into one shared patch bucket, so the micro-batches stack:
    VisionInputs of [M, P, ...] with `feature_index` [M, U]; with `shards` > 1, one buffer per
    contiguous block of a micro-batch's rows (the rows one data-parallel device holds): [M, S, P, ...],
    so that each device encodes its own rows' images and no image attends to another device's.

    Each prompt's images are packed once per buffer, however many of its rows (a GRPO group's samples)
    the buffer serves, and `feature_index` points every row's placeholders at them: the vision tower
    encodes a group's image once, not n times (its gradient sums over the rows, as n encodings would).
    U is the bucketed placeholder count of all rows, so shapes stay bucketed. group > 1
    (`shared_prompt_group`): placeholders are those of each group's first row only, the rows the train
    step embeds when it computes a group's prompt once (`TrainBatch.prompt_mask`). `local` (bool [shards],
    None: all): the row shards this process's devices hold; the others' buffers get no pixels here.
    """
    pack = getattr(processor, "pack_micro_batches", None)
    if pack is None:  # a bare object with the processor's `config` and `pack`, as tests build
        pack = functools.partial(pack_row_blocks, processor)
    rows = len(prompt_index)
    if rows % (num_micro * shards) or (rows // (num_micro * shards)) % group:
        raise ValueError(f"{rows} rows do not split into {num_micro} micro-batches x {shards} shards of whole "
                         f"groups of {group}")
    blocks = None if local is None else np.tile(np.asarray(local, bool), num_micro)  # block m * S + s
    vision = pack(row_images, prompt_index, num_micro * shards, buckets, group, local=blocks)
    if shards == 1:
        return vision
    return jax.tree.map(lambda x: x.reshape(num_micro, shards, *x.shape[1:]), vision)


def to_train_batch(seqs: Sequences, advantages, sft_weights, num_micro: int, vision: VisionInputs | None,
                   ref_logprobs=None, group: int = 1) -> TrainBatch:
    """Splits rows into `num_micro` micro-batches. advantages: [R] (broadcast over tokens) or [R, T];
    sft_weights: [R]; group > 1 (`shared_prompt_group`): rows come in groups of `group` sharing
    their prompt, which the train step then computes once per group (`TrainBatch.prompt_mask`).
    Returns a NumPy TrainBatch with leading [M, mb] axes (positions [M, 3, mb, T])."""
    rows, length = seqs.input_ids.shape
    if rows % num_micro:
        raise ValueError(f"{rows} rows do not split into num_micro={num_micro} micro-batches")
    if group > 1:
        prompts = seqs.input_ids[:, :seqs.prompt_length].reshape(rows // group, group, -1)
        if (rows // num_micro) % group or not (prompts == prompts[:, :1]).all():
            raise ValueError(f"rows do not come in groups of {group} sharing their prompt within micro-batches")
    adv = np.asarray(advantages, np.float32)
    if adv.ndim == 1:
        adv = np.broadcast_to(adv[:, None], (rows, length))
    split = lambda x: np.asarray(x).reshape(num_micro, rows // num_micro, *np.asarray(x).shape[1:])  # noqa: E731
    pos = seqs.positions.reshape(3, num_micro, rows // num_micro, length).transpose(1, 0, 2, 3)
    return TrainBatch(
        input_ids=split(seqs.input_ids), attention_mask=split(seqs.attention_mask), positions=pos,
        targets=split(seqs.targets), loss_mask=split(seqs.loss_mask), old_logprobs=split(seqs.old_logprobs),
        advantages=split(adv * seqs.loss_mask), sft_weights=split(np.asarray(sft_weights, np.float32)),
        ref_logprobs=None if ref_logprobs is None else split(ref_logprobs), vision=vision,
        prompt_mask=None if group == 1 else seqs.attention_mask[::group, :seqs.prompt_length].reshape(
            num_micro, rows // num_micro // group, seqs.prompt_length))


class Rollouts(NamedTuple):
    """One step's prompts and their sampled, scored responses (prompt-major rows, n per prompt).

    inputs: ModelInputs of B prompts; examples: B dicts; valid: bool [B]; tokens, mask, logprobs:
    [B*n, N]; lengths int [B*n]; stopped bool [B*n]; texts: B*n strings; rewards: name -> float [B*n].
    """

    inputs: object
    examples: list
    valid: np.ndarray
    tokens: np.ndarray
    mask: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    stopped: np.ndarray
    texts: list
    rewards: dict

    @property
    def row_images(self):
        return self.inputs.row_images


def _left_pad(x: np.ndarray, length: int, axis: int, value=0) -> np.ndarray:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (length - x.shape[axis], 0)
    return np.pad(x, pad, constant_values=value)


def select_groups(chosen: Sequence[tuple[Rollouts, int]], num_samples: int, pad_id: int) -> Rollouts:
    """Builds one Rollouts from (rollouts, group index) pairs drawn from several rounds; prompts of
    different length buckets are left-padded to the longest (padding positions are 0 and masked)."""
    length = max(r.inputs.input_ids.shape[1] for r, _ in chosen)
    ids, masks, pos, nxt, images, examples, valid = [], [], [], [], [], [], []
    for r, g in chosen:
        ids.append(_left_pad(r.inputs.input_ids[g:g + 1], length, 1, pad_id))
        masks.append(_left_pad(r.inputs.attention_mask[g:g + 1], length, 1))
        pos.append(_left_pad(r.inputs.positions[:, g:g + 1], length, 2))
        nxt.append(r.inputs.next_position[g:g + 1])
        images.append(r.inputs.row_images[g])
        examples.append(r.examples[g])
        valid.append(r.valid[g])
    first = chosen[0][0].inputs
    inputs = first._replace(input_ids=np.concatenate(ids), attention_mask=np.concatenate(masks),
                            positions=np.concatenate(pos, axis=1), next_position=np.concatenate(nxt),
                            vision=None, row_images=tuple(images))
    rows = lambda r, g: slice(g * num_samples, (g + 1) * num_samples)  # noqa: E731
    cat = lambda field: np.concatenate([np.asarray(getattr(r, field))[rows(r, g)] for r, g in chosen])  # noqa
    texts = [t for r, g in chosen for t in r.texts[rows(r, g)]]
    rewards = {k: np.concatenate([r.rewards[k][rows(r, g)] for r, g in chosen]) for k in chosen[0][0].rewards}
    return Rollouts(inputs, examples, np.asarray(valid), cat("tokens"), cat("mask"), cat("logprobs"),
                    cat("lengths"), cat("stopped"), texts, rewards)


def response_slice(full: np.ndarray, prompt_length: int, n_new: int) -> np.ndarray:
    """[R, T] per-position values (position t predicts token t + 1) -> [R, N] per response token."""
    return full[:, prompt_length - 1:prompt_length - 1 + n_new]


def response_to_row(values: np.ndarray, prompt_length: int) -> np.ndarray:
    """[R, N] per response token -> [R, L + N] at the positions that predict them (0 elsewhere)."""
    rows, n_new = values.shape
    out = np.zeros((rows, prompt_length + n_new), np.float32)
    out[:, prompt_length - 1:prompt_length - 1 + n_new] = values
    return out
