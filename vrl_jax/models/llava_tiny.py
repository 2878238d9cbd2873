"""A tiny LLaVA-OneVision, created offline: the tiny default's model in the `llava_onevision` family.

The same recipe as `tiny.py` (random weights, a tokenizer trained on the synthetic texts, saved as an
ordinary Hugging Face directory) with LLaVA-OneVision's pieces: `<image>` / `<video>` added as special
tokens, the chat template of the released checkpoints' conversion script (`<|im_start|>{role}\n`, each
image as `<image>\n` before the text, no default system prompt), 28-pixel SigLIP tiles (2 x 2 patches)
and pinpoints of up to 4 x 4 tiles, so anyres_max_9 downsampling runs. Nothing here needs PyTorch.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import jax.numpy as jnp
from flax import nnx

from vrl_jax.models.config import ModelConfig
from vrl_jax.models.loading import export_hf
from vrl_jax.models.tiny import init_random

IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
TILE = 28  # 2 x 2 patches per tile: a 112-pixel image takes ~50 placeholders, as many as the tiny Qwen's prompts allow
PINPOINTS = [[TILE * a, TILE * b] for a in range(1, 5) for b in range(1, 5)]  # a 4 x 4 grid is downsampled
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}{{- '<image>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'video' or 'video' in item -%}{{- '<video>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def tiny_llava_config(vocab_size: int, special: dict[str, int], *, hidden: int = 128, layers: int = 4,
                      heads: int = 4, kv_heads: int = 2, intermediate: int = 384, vision_width: int = 64,
                      vision_depth: int = 2) -> dict:
    """A LLaVA-OneVision config.json dict (transformers 5.x layout)."""
    from transformers import LlavaOnevisionConfig
    cfg = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=vision_width,
                           intermediate_size=2 * vision_width, num_hidden_layers=vision_depth, num_attention_heads=2,
                           image_size=TILE, patch_size=14, vision_use_head=False),
        text_config=dict(model_type="qwen2", vocab_size=vocab_size, hidden_size=hidden,
                         intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=4096, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True,
                         bos_token_id=special["<|endoftext|>"], eos_token_id=special["<|im_end|>"],
                         pad_token_id=special["<|endoftext|>"]),
        image_token_index=special[IMAGE_TOKEN], video_token_index=special[VIDEO_TOKEN],
        vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=PINPOINTS, tie_word_embeddings=True)
    raw = cfg.to_dict()
    raw.update(model_type="llava_onevision", eos_token_id=special["<|im_end|>"], pad_token_id=special["<|endoftext|>"])
    return raw


def build_tiny_llava(out_dir: str, texts: Iterable[str], *, seed: int = 0, image_size: int = 112,
                     vocab_size: int = 1024, **sizes) -> str:
    """Writes a tiny random LLaVA-OneVision with a tokenizer trained on `texts` to `out_dir`; returns it.

    image_size: unused (tiles have a fixed size; any image is tiled), kept for `build_tiny_model`'s signature.
    """
    from vrl_jax.data.synthgeo.tokenizer import build_tokenizer, special_token_ids
    from vrl_jax.models.llava_onevision import LlavaOnevision
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = build_tokenizer(texts, out_dir, vocab_size=vocab_size)
    tokenizer.add_tokens([IMAGE_TOKEN, VIDEO_TOKEN], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    special = {**special_token_ids(tokenizer), **{t: tokenizer.convert_tokens_to_ids(t) for t in
                                                  (IMAGE_TOKEN, VIDEO_TOKEN)}}
    vocab = -(-len(tokenizer) // 64) * 64  # a multiple of 64 keeps matmuls aligned
    config = ModelConfig.from_dict(tiny_llava_config(vocab, special, **sizes))
    export_hf(init_random(lambda: LlavaOnevision(config, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))), out_dir)
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "LlavaOnevisionImageProcessor", "size": {"height": TILE, "width": TILE},
                   "image_grid_pinpoints": PINPOINTS, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                   "do_pad": True}, f, indent=2)
    return out_dir
