"""3-D rotary positions (M-RoPE) for Qwen2-VL / Qwen2.5-VL prompts, computed on the host in NumPy.

Semantics are transformers 5.x `get_rope_index`: per row, padding is skipped; consecutive tokens of
one modality form a group; a text group of length L takes `pos + arange(L)` on all three axes; an
image group with grid (t, h, w) takes the (t, h/m, w/m) meshgrid offset by `pos` and then advances
`pos` by `max(h, w) / m` (its temporal extent is ignored). Padding positions are 0. Decoding
continues each row at `max(position) + 1` (the "rope delta" bookkeeping).
"""

from __future__ import annotations

import itertools

import numpy as np

TEXT, IMAGE, VIDEO = 0, 1, 2


def token_types(input_ids: np.ndarray, image_token_id: int, video_token_id: int) -> np.ndarray:
    """int [B, L] -> int32 [B, L]: 0 text, 1 image placeholder, 2 video placeholder."""
    return ((input_ids == image_token_id) * IMAGE + (input_ids == video_token_id) * VIDEO).astype(np.int32)


def rope_positions(types: np.ndarray, attention_mask: np.ndarray, image_grids: np.ndarray,
                   merge_size: int) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE positions for a batch of prompts.

    types: int [B, L] from `token_types`; attention_mask: [B, L] (1 = real token); image_grids:
    int [n_images, 3] (t, h, w in patches) in reading order (row by row, left to right).
    Returns positions int32 [3, B, L] and next_position int32 [B] (the first decode position).
    """
    b, length = types.shape
    positions = np.zeros((3, b, length), np.int32)
    next_position = np.zeros((b,), np.int32)
    grids = iter(np.asarray(image_grids, np.int64).reshape(-1, 3))
    for row in range(b):
        valid = np.flatnonzero(np.asarray(attention_mask[row]).astype(bool))
        row_types = types[row, valid]
        pos, chunks = 0, []
        for kind, group in itertools.groupby(row_types.tolist()):
            n = len(list(group))
            if kind == TEXT:
                chunks.append(np.broadcast_to(pos + np.arange(n), (3, n)))
                pos += n
                continue
            if kind == VIDEO:
                raise NotImplementedError("video inputs are not supported yet")
            try:
                t, h, w = next(grids)
            except StopIteration:
                raise ValueError(f"row {row}: more image placeholder groups than image grids "
                                 f"({len(image_grids)} given)") from None
            gh, gw = h // merge_size, w // merge_size
            if t * gh * gw != n:
                raise ValueError(f"row {row}: an image group has {n} placeholder tokens but its grid "
                                 f"{(int(t), int(h), int(w))} needs {t * gh * gw}")
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            chunks.append(np.stack([tt, hh, ww]).reshape(3, -1) + pos)
            pos += max(gh, gw)
        if chunks:
            row_pos = np.concatenate(chunks, axis=1)
            positions[:, row, valid] = row_pos
            next_position[row] = row_pos.max() + 1
    if next(grids, None) is not None:
        raise ValueError(f"{len(image_grids)} image grids given but fewer image placeholder groups in the prompts")
    return positions, next_position


def text_positions(attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions for text-only rows: count real tokens from 0 (left padding skipped).

    attention_mask: [B, L] -> positions int32 [3, B, L], next_position int32 [B].
    """
    mask = np.asarray(attention_mask).astype(np.int32)
    pos = np.where(mask > 0, np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return np.broadcast_to(pos, (3, *pos.shape)).copy(), mask.sum(axis=1).astype(np.int32)
