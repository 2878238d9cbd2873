"""CLI: `python -m vrl_jax.data.synthgeo --out DIR --train N --val N --test N [--seed S] [--formats ...]`.

Writes a dataset directory (images, MAYE/EasyR1/DyME files, manifest.json, README.md) and,
with `--tokenizer`, a tiny BPE tokenizer trained on the train split's texts under DIR/tokenizer.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from vrl_jax.data.synthgeo.difficulty import IID_LEVELS
from vrl_jax.errors import run_cli
from vrl_jax.data.synthgeo.export import FORMATS, check_formats, export_dataset
from vrl_jax.data.synthgeo.families import FAMILIES
from vrl_jax.data.synthgeo.generator import GeneratorConfig, corpus_texts, generate_split


PROG = "python -m vrl_jax.data.synthgeo"
# GeneratorConfig's fields and the options that set them, so its complaints name what the user typed.
_FLAGS = {"seed": "--seed", "families": "--families", "levels": "--levels", "text_fraction": "--text-fraction",
          "image_size": "--image-size"}


def _flag_of(message: str) -> str | None:
    return next((flag for field, flag in _FLAGS.items() if f".{field} " in message), None)


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output dataset directory")
    parser.add_argument("--train", type=int, default=0, help="number of train items")
    parser.add_argument("--val", type=int, default=0, help="number of val items")
    parser.add_argument("--test", type=int, default=0, help="number of items in each of test_iid and test_ood")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated subset of {FORMATS}")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated family names")
    parser.add_argument("--levels", default=",".join(map(str, IID_LEVELS)),
                        help="difficulty levels for train/val/test_iid (test_ood always uses level 3)")
    parser.add_argument("--text-fraction", type=float, default=GeneratorConfig.text_fraction,
                        help="share of text twins (numbers stated in the question)")
    parser.add_argument("--image-size", type=int, default=GeneratorConfig.image_size)
    parser.add_argument("--tokenizer", action="store_true", help="also train a tokenizer into OUT/tokenizer")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    for name in ("train", "val", "test"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if not (args.train or args.val or args.test or args.tokenizer):
        parser.error("nothing to write: give the number of items with --train, --val and/or --test")
    try:
        args.levels = tuple(int(v) for v in _names(args.levels))
    except ValueError:
        parser.error(f"--levels must be comma-separated integers, got {args.levels!r}")
    try:
        args.formats = check_formats(_names(args.formats))
        args.config = GeneratorConfig(seed=args.seed, families=_names(args.families), levels=args.levels,
                                      text_fraction=args.text_fraction, image_size=args.image_size)
    except ValueError as err:
        flag = _flag_of(str(err))
        parser.error(f"{flag}: {err}" if flag else str(err))
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a file; name a new or existing directory")
    if args.tokenizer:
        from tokenizers import pre_tokenizers

        from vrl_jax.data.synthgeo.tokenizer import SPECIAL_TOKENS
        floor = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())  # checked before the data is drawn
        if args.vocab_size < floor:
            parser.error(f"--vocab-size must be >= {floor} (8 special tokens + 256 bytes), got {args.vocab_size}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = {"train": args.train, "val": args.val, "test_iid": args.test, "test_ood": args.test}
    train_texts = []

    def collect(item):  # the tokenizer learns from train text only, like any other model part
        if args.tokenizer and item.split == "train":
            train_texts.extend(corpus_texts([item]))

    start = time.perf_counter()
    manifest = export_dataset(args.out, sizes, args.config, args.formats, progress=not args.no_progress,
                              on_item=collect)
    seconds = time.perf_counter() - start
    total = sum(entry["count"] for entry in manifest["splits"].values())
    print(f"wrote {total} items to {args.out} in {seconds:.1f} s ({total / max(seconds, 1e-9):.0f} items/s)")
    if args.tokenizer:
        from vrl_jax.data.synthgeo.tokenizer import build_tokenizer, special_token_ids

        texts = train_texts or corpus_texts(generate_split("train", 200, args.config))
        tokenizer = build_tokenizer(texts, os.path.join(args.out, "tokenizer"), vocab_size=args.vocab_size)
        print(f"tokenizer: {len(tokenizer)} tokens, special ids {special_token_ids(tokenizer)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, PROG))
