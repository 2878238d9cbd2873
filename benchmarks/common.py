"""What the benchmarks share: performance.md's tiny Qwen2.5-VL-shaped peer model, and the machine's
measured matmul throughput (the physical limit a CPU step is compared against)."""

from __future__ import annotations

import statistics
import time


def build_checkpoint(directory: str, scale: int = 1):
    """A random ~3.7 M-parameter Qwen2.5-VL (text hidden 256, 4 layers, intermediate 768, 4 heads /
    2 KV heads, vocabulary 1024) saved to `directory`; returns the transformers model. `scale` multiplies
    the width (hidden, intermediate, heads): scale 3 is ~8x the matmul parameters."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    text = dict(vocab_size=1024, hidden_size=256 * scale, intermediate_size=768 * scale, num_hidden_layers=4,
                num_attention_heads=4 * scale,
                num_key_value_heads=2 * scale, max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]})
    vision = dict(depth=2, hidden_size=64, out_hidden_size=256 * scale, intermediate_size=128, num_heads=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, image_token_id=1000,
                           video_token_id=1001, vision_start_token_id=1002, vision_end_token_id=1003)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(directory)
    return model


def matmul_flops_per_s(repeats: int = 10) -> float:
    """Measured float32 matmul throughput of this machine (jitted 2048 x 2048 @ 2048 x 2048)."""
    import jax
    import jax.numpy as jnp
    n = 2048
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, b))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)
