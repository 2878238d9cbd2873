"""Checkpoint conversion CLI.

  python -m vrl_jax.convert to-orbax HF_DIR OUT_DIR      # HF safetensors -> vrl_jax model directory
  python -m vrl_jax.convert to-hf MODEL_DIR OUT_DIR      # vrl_jax (or HF) directory -> HF directory
  python -m vrl_jax.convert check HF_DIR [--model MODEL_DIR] [--tolerance 1e-4] [--dtype float32]

`check` runs the same text and image inputs through transformers and vrl_jax and prints the max
|logit difference| per input, exiting 1 above the tolerance. It loads one model at a time (vrl_jax
first, then transformers), so a 7B check needs memory for one copy of the weights, and its inputs
are a few dozen tokens and two small images.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import numpy as np


def _build_check_inputs(config, processor) -> list[dict]:
    """Deterministic prompts: text, a left-padded text batch, one image, two images of different sizes."""
    from vrl_jax.models.image_processing import pack_images
    from vrl_jax.models.positions import rope_positions, text_positions, token_types

    rs = np.random.RandomState(0)
    reserved = {config.image_token_id, config.video_token_id, config.vision_start_token_id,
                config.vision_end_token_id}
    vocab = config.text.vocab_size

    def text(n):
        ids = rs.randint(0, min(vocab, 150000), size=n)
        return [int(i) if int(i) not in reserved else 0 for i in ids]

    def image(h, w):
        yy, xx = np.mgrid[0:h, 0:w]
        rgb = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), (xx + yy) % 256], -1)
        return processor(rgb.astype(np.uint8))

    def batch(rows, images):
        length = max(len(r) for r in rows)
        ids = np.zeros((len(rows), length), np.int64)
        mask = np.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, length - len(r):] = r
            mask[i, length - len(r):] = 1
        if not images:
            pos, _ = text_positions(mask)
            return dict(input_ids=ids, attention_mask=mask, positions=pos, images=None, types=None)
        types = token_types(ids, config.image_token_id, config.video_token_id)
        grids = np.array([p.grid_thw for p in images])
        pos, _ = rope_positions(types, mask, grids, config.vision.merge_size)
        n_patches = sum(int(np.prod(p.grid_thw)) for p in images)
        packed = pack_images(images, [-(-n_patches // 4) * 4], config.vision.window_size)
        return dict(input_ids=ids, attention_mask=mask, positions=pos, images=images, types=types, packed=packed)

    def with_image(img, before, after):
        n = int(np.prod(img.grid_thw)) // config.vision.merge_size**2
        return text(before) + [config.vision_start_token_id] + [config.image_token_id] * n + \
            [config.vision_end_token_id] + text(after)

    a, b = image(56, 84), image(112, 56)
    return [
        dict(name="text", **batch([text(24)], [])),
        dict(name="text, left-padded batch", **batch([text(20), text(9)], [])),
        dict(name="one image", **batch([with_image(a, 5, 8)], [a])),
        dict(name="two images of different sizes", **batch([with_image(a, 3, 4), with_image(b, 6, 2)], [a, b])),
    ]


def _vrl_jax_logits(model_dir, config, inputs, dtype) -> list[np.ndarray]:
    import jax.numpy as jnp

    from vrl_jax.models.loading import load_model
    from vrl_jax.models.qwen_vl import VisionInputs

    model = load_model(model_dir, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
    out = []
    for inp in inputs:
        vision = VisionInputs.from_batch(inp["packed"]) if inp["images"] else None
        logits = model(jnp.asarray(inp["input_ids"]), jnp.asarray(inp["positions"]),
                       jnp.asarray(inp["attention_mask"]), vision)
        out.append(np.asarray(logits, np.float32))
    return out


def _transformers_logits(hf_dir, inputs, dtype) -> list[np.ndarray]:
    try:
        import torch
        from transformers import AutoModelForImageTextToText
    except ImportError as e:
        raise SystemExit(f"check needs PyTorch as the oracle ({e}); install it with: pip install 'vrl_jax[test]'")
    model = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=getattr(torch, dtype),
                                                        attn_implementation="eager").eval()
    out = []
    with torch.no_grad():
        for inp in inputs:
            kwargs = dict(input_ids=torch.tensor(inp["input_ids"]), attention_mask=torch.tensor(inp["attention_mask"]),
                          position_ids=torch.tensor(inp["positions"]).long())
            if inp["images"]:
                kwargs.update(
                    pixel_values=torch.tensor(np.concatenate([p.patches for p in inp["images"]])).to(model.dtype),
                    image_grid_thw=torch.tensor(np.array([p.grid_thw for p in inp["images"]])),
                    mm_token_type_ids=torch.tensor(inp["types"]))
            out.append(model(**kwargs).logits.float().numpy())
    return out


def check(hf_dir: str, model_dir: str | None, tolerance: float, dtype: str) -> int:
    import jax

    from vrl_jax.models.config import ModelConfig
    from vrl_jax.models.image_processing import ImageProcessor

    jax.config.update("jax_default_matmul_precision", "highest")
    config = ModelConfig.from_pretrained(hf_dir)
    processor = ImageProcessor(patch_size=config.vision.patch_size, merge_size=config.vision.merge_size,
                               temporal_patch_size=config.vision.temporal_patch_size,
                               min_pixels=28 * 28, max_pixels=112 * 112)
    inputs = _build_check_inputs(config, processor)
    t0 = time.perf_counter()
    ours = _vrl_jax_logits(model_dir or hf_dir, config, inputs, dtype)
    gc.collect()
    t1 = time.perf_counter()
    theirs = _transformers_logits(hf_dir, inputs, dtype)
    t2 = time.perf_counter()
    worst = 0.0
    for inp, a, b in zip(inputs, ours, theirs):
        valid = inp["attention_mask"].astype(bool)
        diff = float(np.abs(a - b)[valid].max())
        worst = max(worst, diff)
        print(f"{inp['name']:<32} tokens={int(valid.sum()):>4}  max|logit diff|={diff:.3e}")
    ok = worst <= tolerance
    print(f"vrl_jax {t1 - t0:.1f}s, transformers {t2 - t1:.1f}s; worst {worst:.3e} "
          f"{'<=' if ok else '>'} tolerance {tolerance:.1e}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vrl_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("to-orbax", help="HF directory -> vrl_jax model directory (orbax params)")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
    p = sub.add_parser("to-hf", help="vrl_jax (or HF) model directory -> HF directory")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="tensor dtype to write")
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p = sub.add_parser("check", help="compare logits of transformers and vrl_jax on the same inputs")
    p.add_argument("hf_dir")
    p.add_argument("--model", default=None, help="a vrl_jax model directory to check instead of loading hf_dir")
    p.add_argument("--tolerance", type=float, default=None, help="default 1e-4 (float32), 0.5 (bfloat16)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)

    import jax.numpy as jnp

    from vrl_jax.models.loading import export_hf, load_model, save_orbax
    if args.command == "to-orbax":
        model = load_model(args.src, param_dtype=jnp.dtype(args.param_dtype))
        save_orbax(model, args.out, source_dir=args.src)
        print(f"wrote {args.out}")
        return 0
    if args.command == "to-hf":
        model = load_model(args.src)
        export_hf(model, args.out, source_dir=args.src, max_shard_bytes=int(args.max_shard_gb * (1 << 30)),
                  torch_dtype=args.dtype)
        print(f"wrote {args.out}")
        return 0
    tolerance = args.tolerance if args.tolerance is not None else (1e-4 if args.dtype == "float32" else 0.5)
    return check(args.hf_dir, args.model, tolerance, args.dtype)


if __name__ == "__main__":
    sys.exit(main())
