"""Tiny random Qwen2-VL / Qwen2.5-VL checkpoints built offline from transformers configs, and inputs.

Vocabulary 1024 with small special ids keeps each checkpoint under 1 MB; transformers 5.x derives
positions only from `mm_token_type_ids`, so any ids work. Qwen2.5-VL uses a 56-pixel window so
that window attention (2x2 merged tokens) and full-attention blocks are both exercised.
"""

from __future__ import annotations

import numpy as np

IMAGE, VIDEO, VSTART, VEND = 1000, 1001, 1002, 1003

TEXT_CONFIG = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                   rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
SPECIAL = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND)


def hf_config(family: str, tie: bool, special: dict | None = None):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig
    special = special or SPECIAL
    if family == "qwen2_vl":
        return Qwen2VLConfig(text_config=TEXT_CONFIG, tie_word_embeddings=tie, **special, vision_config=dict(
            depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, in_channels=3))
    return Qwen2_5_VLConfig(text_config=TEXT_CONFIG, tie_word_embeddings=tie, **special, vision_config=dict(
        depth=4, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1, 3],
        tokens_per_second=2))


def build_hf_model(directory: str, family: str, tie: bool, seed: int = 0, special: dict | None = None,
                   wide: bool = False):
    """Saves a random tiny model; biases and norm weights are randomised too so every tensor matters.

    wide: matrices drawn with std 1/sqrt(fan_in) (embeddings std 1) instead of 0.02, so greedy decoding
    follows varied paths instead of collapsing onto one repeated token.
    """
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
    torch.manual_seed(seed)
    cls = Qwen2VLForConditionalGeneration if family == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    model = cls(hf_config(family, tie, special)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if wide and p.ndim >= 2:
                fan_in = p[0].numel() if "embed" not in name else 1
                p.normal_(0.0, fan_in ** -0.5)
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def random_image(rs: np.random.RandomState, h: int, w: int):
    from PIL import Image
    return Image.fromarray(rs.randint(0, 256, (h, w, 3), dtype=np.uint8))


def make_batch(rows_spec, processed, config):
    """rows_spec: per row, a list of ints (text tokens) or ('img', k) entries; left-pads rows.

    Returns a dict with numpy input_ids, attention_mask, positions, types and the images used.
    """
    from vrl_jax.models.positions import rope_positions, token_types
    rows, used = [], []
    for spec in rows_spec:
        row = []
        for item in spec:
            if isinstance(item, tuple):
                img = processed[item[1]]
                used.append(img)
                row += [VSTART] + [IMAGE] * (int(np.prod(img.grid_thw)) // 4) + [VEND]
            else:
                row.append(item)
        rows.append(row)
    length = max(map(len, rows))
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    types = token_types(ids, IMAGE, VIDEO)
    grids = np.array([p.grid_thw for p in used]).reshape(-1, 3)
    positions, next_pos = rope_positions(types, mask, grids, config.vision.merge_size)
    return dict(input_ids=ids, attention_mask=mask, positions=positions, types=types, images=used,
                next_position=next_pos)
