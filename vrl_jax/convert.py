"""Checkpoint conversion CLI.

  python -m vrl_jax.convert to-orbax HF_DIR OUT_DIR [--overwrite]   # HF safetensors -> vrl_jax model directory
  python -m vrl_jax.convert to-hf MODEL_DIR OUT_DIR [--overwrite]    # vrl_jax (or HF) directory -> HF directory
  python -m vrl_jax.convert check HF_DIR [--model MODEL_DIR] [--tolerance 1e-4] [--dtype float32]

OUT_DIR must be new or empty: a directory holds one model, and the weights of an earlier export left
beside new ones (an old index and its shards, an old params/) would be read instead of them by one
reader or the other. `--overwrite` first removes the files a model directory is made of (config.json,
weights, index, params/, tokenizer and processor files) and leaves any other file alone.

`check` runs the same text and image inputs through transformers and vrl_jax and prints the max
|logit difference| per input, exiting 1 above the tolerance. It loads one model at a time (vrl_jax
first, then transformers), so a 7B check needs memory for one copy of the weights, and its inputs
are a few dozen tokens and two small images.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import os
import shutil
import sys
import time

import numpy as np

from vrl_jax.errors import UserError, run_cli

PROG = "python -m vrl_jax.convert"
# What a model directory is, for the messages about one that is not.
MODEL_DIR_HELP = (
    "A model directory holds config.json and the weights: *.safetensors files (a Hugging Face checkpoint "
    "such as Qwen/Qwen2.5-VL-3B-Instruct, downloaded with `hf download "
    "Qwen/Qwen2.5-VL-3B-Instruct --local-dir DIR`) or params/ (a vrl_jax directory written by "
    "`python -m vrl_jax.convert to-orbax HF_DIR OUT_DIR`); a training run exports one to <workdir>/export.")
TORCH_HELP = (
    "`convert check` runs transformers on PyTorch as the oracle, and PyTorch is not installed in this "
    "environment. Install the test extra, which pins the versions the numerics are tested against: "
    "pip install -e \".[test]\" (in the vrl_jax checkout). to-orbax and to-hf do not need it.")


def _contents(path: str, limit: int = 6) -> str:
    """'it is empty' or 'it holds a, b and 3 more', for messages."""
    names = sorted(os.listdir(path))
    if not names:
        return "it is empty"
    return "it holds " + ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def require_model_dir(path: str, what: str, *, hf: bool = False, tokenizer: bool = False):
    """Checks that `path` is a model directory before anything slow starts; returns its `ModelConfig`.

    what: how the user named it ("HF_DIR", "--model"). hf: the weights must be safetensors (transformers
    reads those, not params/). tokenizer: the tokenizer files must be there too (to generate text).
    Raises `UserError` saying what is missing and what the directory should hold.
    """
    from vrl_jax.models.config import ConfigError, ModelConfig
    from vrl_jax.models.loading import PARAMS_DIR, is_orbax_model_dir
    from vrl_jax.models.safetensors_io import CheckpointError, SafetensorsFile, checkpoint_files

    where = f"{what} {path}"
    if not os.path.exists(path):
        raise UserError(f"{where}: no such directory. {MODEL_DIR_HELP}")
    if not os.path.isdir(path):
        raise UserError(f"{where} is a file, not a directory. {MODEL_DIR_HELP}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{where} holds no config.json ({_contents(path)}). {MODEL_DIR_HELP}")
    try:
        config = ModelConfig.from_pretrained(path)
    except ConfigError as err:  # its message starts with the file
        raise UserError(f"{what} {err}") from err
    if not (is_orbax_model_dir(path) and not hf):
        try:
            for file in checkpoint_files(path):
                SafetensorsFile(file)  # reads the header only: a truncated file is found here, in milliseconds
        except (FileNotFoundError, CheckpointError) as err:
            if hf and is_orbax_model_dir(path):
                raise UserError(f"{where} is a vrl_jax directory ({PARAMS_DIR}/), which transformers cannot read: "
                                f"pass the Hugging Face checkpoint here and this directory as --model, or make "
                                f"one with `{PROG} to-hf {path} OUT_DIR`.") from err
            raise UserError(f"{what} {err}. {MODEL_DIR_HELP}") from err
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json")
    if tokenizer and not any(os.path.isfile(os.path.join(path, f)) for f in tokenizer_files):
        raise UserError(f"{where} holds no tokenizer files (tokenizer.json / tokenizer_config.json), which are "
                        f"needed to generate text. Copy them from the checkpoint the model came from; "
                        f"`{PROG} to-orbax/to-hf` copy them from their source directory.")
    return config


@contextlib.contextmanager
def reading_model(what: str):
    """Damaged weights found while reading them (a truncated file, a wrong shape) are the user's to fix."""
    from vrl_jax.models.config import ConfigError
    from vrl_jax.models.safetensors_io import CheckpointError
    try:
        yield
    except (ConfigError, CheckpointError) as err:  # their messages start with the file
        raise UserError(f"{what} {err}") from err


def owned_entries(out_dir: str) -> list[str]:
    """The entries of `out_dir` that make up a model directory (what `--overwrite` removes)."""
    from vrl_jax.models.loading import PARAMS_DIR, SIDE_FILES

    def owned(name):
        return name in ("config.json", PARAMS_DIR) or name in SIDE_FILES or name.endswith(".safetensors") or \
            name.endswith(".safetensors.index.json")
    return sorted(n for n in os.listdir(out_dir) if owned(n))


def check_out_dir(out_dir: str, src: str, overwrite: bool) -> None:
    """Refuses an OUT_DIR that is the source, a file, or non-empty without --overwrite."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"OUT_DIR {out_dir} is a file; name a new or empty directory.")
    if os.path.isdir(out_dir) and os.path.samefile(out_dir, src):
        raise UserError(f"OUT_DIR {out_dir} is the source directory; write the converted model to another "
                        "directory.")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise UserError(f"OUT_DIR {out_dir} is not empty ({_contents(out_dir)}). Name a new or empty "
                        f"directory, or pass --overwrite to replace the model files there (config.json, "
                        f"weights, index, params/, tokenizer files); other files are left alone.")


def clear_owned(out_dir: str) -> None:
    """Removes what an earlier export left in `out_dir`, so no old shard or index outlives it."""
    if not os.path.isdir(out_dir):
        return
    for name in owned_entries(out_dir):
        path = os.path.join(out_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    kept = sorted(os.listdir(out_dir))
    if kept:
        print(f"kept {len(kept)} other file(s) in {out_dir}: {', '.join(kept)}")


def _build_check_inputs(config, rs: np.random.RandomState) -> list[dict]:
    """Deterministic Qwen-VL prompts: text, a left-padded text batch, one image, two images of different sizes.

    Each input: name, input_ids, attention_mask, positions, vision (VisionInputs or None) and hf (the
    other keyword arguments of the transformers model, NumPy)."""
    from vrl_jax.models.image_processing import ImageProcessor, pack_images
    from vrl_jax.models.positions import rope_positions, text_positions, token_types
    from vrl_jax.models.qwen_vl import VisionInputs

    processor = ImageProcessor(patch_size=config.vision.patch_size, merge_size=config.vision.merge_size,
                               temporal_patch_size=config.vision.temporal_patch_size,
                               min_pixels=28 * 28, max_pixels=112 * 112)
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
            return dict(input_ids=ids, attention_mask=mask, positions=pos, vision=None, hf=dict(position_ids=pos))
        types = token_types(ids, config.image_token_id, config.video_token_id)
        grids = np.array([p.grid_thw for p in images])
        pos, _ = rope_positions(types, mask, grids, config.vision.merge_size)
        n_patches = sum(int(np.prod(p.grid_thw)) for p in images)
        packed = pack_images(images, [-(-n_patches // 4) * 4], config.vision.window_size)
        hf = dict(position_ids=pos, pixel_values=np.concatenate([p.patches for p in images]), image_grid_thw=grids,
                  mm_token_type_ids=types)
        return dict(input_ids=ids, attention_mask=mask, positions=pos, vision=VisionInputs.from_batch(packed), hf=hf)

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
        vision = None if inp["vision"] is None else VisionInputs(
            *(None if x is None else jnp.asarray(x) for x in inp["vision"]))
        logits = model(jnp.asarray(inp["input_ids"]), jnp.asarray(inp["positions"]),
                       jnp.asarray(inp["attention_mask"]), vision)
        out.append(np.asarray(logits, np.float32))
    return out


def _transformers_logits(hf_dir, inputs, dtype) -> list[np.ndarray]:
    try:
        import torch
        from transformers import AutoModelForImageTextToText
    except ImportError as e:
        raise UserError(f"{TORCH_HELP} ({e})") from e
    model = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=getattr(torch, dtype),
                                                        attn_implementation="eager").eval()
    out = []
    with torch.no_grad():
        for inp in inputs:
            kwargs = dict(input_ids=torch.tensor(inp["input_ids"]), attention_mask=torch.tensor(inp["attention_mask"]))
            for key, value in inp["hf"].items():
                value = torch.tensor(np.asarray(value))
                kwargs[key] = value.to(model.dtype) if value.is_floating_point() else value.long()
            out.append(model(**kwargs).logits.float().numpy())
    return out


def check(hf_dir: str, model_dir: str | None, tolerance: float, dtype: str) -> int:
    import jax

    from vrl_jax.models.config import ModelConfig
    from vrl_jax.models.families import resolve

    jax.config.update("jax_default_matmul_precision", "highest")
    config = ModelConfig.from_pretrained(hf_dir)
    inputs = resolve(config.model_type, "check_inputs")(config, np.random.RandomState(0))
    t0 = time.perf_counter()
    with reading_model("--model" if model_dir else "HF_DIR"):
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
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("to-orbax", help="HF directory -> vrl_jax model directory (orbax params)")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--overwrite", action="store_true", help="replace the model files of a non-empty OUT_DIR")
    p = sub.add_parser("to-hf", help="vrl_jax (or HF) model directory -> HF directory")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="tensor dtype to write")
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.add_argument("--overwrite", action="store_true", help="replace the model files of a non-empty OUT_DIR")
    p = sub.add_parser("check", help="compare logits of transformers and vrl_jax on the same inputs")
    p.add_argument("hf_dir")
    p.add_argument("--model", default=None, help="a vrl_jax model directory to check instead of loading hf_dir")
    p.add_argument("--tolerance", type=float, default=None, help="default 1e-4 (float32), 0.5 (bfloat16)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)

    if args.command == "check":
        if args.tolerance is not None and not args.tolerance >= 0:
            parser.error(f"--tolerance must be >= 0, got {args.tolerance}")
        if importlib.util.find_spec("torch") is None:  # before minutes of loading the vrl_jax side
            raise UserError(TORCH_HELP)
        require_model_dir(args.hf_dir, "HF_DIR", hf=True)
        if args.model:
            require_model_dir(args.model, "--model")
        tolerance = args.tolerance if args.tolerance is not None else (1e-4 if args.dtype == "float32" else 0.5)
        return check(args.hf_dir, args.model, tolerance, args.dtype)

    if args.command == "to-hf" and not args.max_shard_gb > 0:
        parser.error(f"--max-shard-gb must be > 0, got {args.max_shard_gb}")
    require_model_dir(args.src, "SRC")
    check_out_dir(args.out, args.src, args.overwrite)

    import jax.numpy as jnp

    from vrl_jax.models.loading import export_hf, load_model, save_orbax
    dtype = jnp.dtype(args.param_dtype) if args.command == "to-orbax" else jnp.float32
    with reading_model("SRC"):
        model = load_model(args.src, param_dtype=dtype)
    clear_owned(args.out)  # only once the source has loaded: a failed conversion leaves OUT_DIR as it was
    if args.command == "to-orbax":
        save_orbax(model, args.out, source_dir=args.src)
    else:
        export_hf(model, args.out, source_dir=args.src, max_shard_bytes=int(args.max_shard_gb * (1 << 30)),
                  torch_dtype=args.dtype)
    print(f"wrote {args.out}")
    return 0


def cli() -> int:
    """The console script `vrl-convert`."""
    return run_cli(main, PROG)


if __name__ == "__main__":
    sys.exit(cli())
