"""Evaluate a model directory on a data file, MAYE's way (the scheme: `vrl_jax/evaluation/evaluator.py`).

  python -m vrl_jax.evaluate --model DIR --data FILE [--format maye] [--settings low,medium,high] [--k 8]
                             [--breakdown family,modality]

Settings: low = pass@1 at temperature 0.01, medium = pass@1 at 0.6, high = pass@k at 1.0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import jax

from vrl_jax.errors import UserError, run_cli
from vrl_jax.evaluation.evaluator import (SETTINGS, Evaluator, breakdown_lines, check_breakdown,
                                          parse_breakdown_key, settings_from_names)

PROG = "python -m vrl_jax.evaluate"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF or vrl_jax model directory (with tokenizer files)")
    parser.add_argument("--data", required=True, help="a MAYE jsonl, EasyR1 parquet or DyME json file")
    parser.add_argument("--format", default=None, choices=[None, "maye", "easyr1", "dyme"])
    parser.add_argument("--split-name", default="test")
    parser.add_argument("--template", default="maye_cot")
    parser.add_argument("--settings", default="low,medium,high")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-examples", type=int, default=0)
    parser.add_argument("--judge-mode", default="default", choices=["default", "maye_compat", "chartqa"])
    parser.add_argument("--breakdown", default="",
                        help="record fields to report accuracy by, comma-separated (e.g. family,modality)")
    parser.add_argument("--out", default=None, help="write OUT.json (metrics), OUT.samples.jsonl and "
                        "OUT.outcomes.jsonl (each problem's score per setting, for `vrl_jax.evaluation.paired`)")
    args = parser.parse_args(argv)

    names = [s for s in args.settings.split(",") if s]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown or not names:
        parser.error(f"--settings: unknown {unknown}; expected some of {sorted(SETTINGS)}, comma-separated")
    for flag, value, low in (("--k", args.k, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--batch-size", args.batch_size, 1), ("--max-examples", args.max_examples, 0)):
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")

    from flax import nnx

    from vrl_jax.convert import reading_model, require_model_dir
    from vrl_jax.data.faults import TooManyFaultsError
    from vrl_jax.data.formats import load_examples
    from vrl_jax.data.pipeline import eval_dataset, eval_num_batches
    from vrl_jax.models.loading import load_model
    from vrl_jax.models.processor import VLProcessor
    from vrl_jax.rewards import RewardSet

    # Every input is checked before the model loads or anything compiles.
    require_model_dir(args.model, "--model", tokenizer=True)
    _require_data_file(args.data)
    if args.out and os.path.dirname(args.out):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    try:
        examples = load_examples(args.data, format=args.format)
    except (ValueError, TooManyFaultsError) as err:  # the file's contents: named by path and line
        raise UserError(f"--data {args.data}: {err}") from err
    if not examples:
        raise UserError(f"--data {args.data} holds no usable example. {DATA_HELP}")
    if args.max_examples:
        examples = examples[:args.max_examples]
    breakdown = [f for f in args.breakdown.split(",") if f]
    check_breakdown(breakdown, {args.split_name: examples}, "--breakdown")
    processor = VLProcessor.from_pretrained(args.model)
    with reading_model("--model"):
        model = load_model(args.model)
        model.visual.max_segment = processor.image_processor.max_patches  # banded vision attention
    graphdef, params = nnx.split(model, nnx.Param)
    rewards = RewardSet({"weights": {"accuracy": 1.0}, "judge": {"mode": args.judge_mode}})
    stop = list(processor.config.eos_token_ids) or [processor.tokenizer.eos_token_id]
    evaluator = Evaluator(graphdef, processor, rewards, settings_from_names(names, args.k, args.max_new_tokens),
                          stop, processor.pad_token_id, breakdown=breakdown)
    batches = eval_dataset(examples, processor.encode_examples, batch_size=args.batch_size, template=args.template,
                           process_index=0, process_count=1)
    metrics, samples, outcomes = evaluator.evaluate_split(
        params.to_pure_dict(), batches, jax.random.key(0), args.split_name, keep_samples=10**9,
        num_batches=eval_num_batches(len(examples), args.batch_size))
    rewards.close()
    for k, v in metrics.items():
        if parse_breakdown_key(k) is None:  # the per-field accuracies follow as one line per setting
            print(f"{k}: {v:.4f}")
    for line in breakdown_lines(metrics):
        print(line)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(metrics, f, indent=2)
        for suffix, rows in ((".samples.jsonl", samples), (".outcomes.jsonl", outcomes)):
            with open(args.out + suffix, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


DATA_HELP = ("Expected a MAYE jsonl, EasyR1 parquet or DyME json file (--format maye|easyr1|dyme; by default "
             "the format is told from the first record's keys). A training run writes its evaluation data to "
             "<workdir>/data/maye_val.jsonl; `python -m vrl_jax.data.synthgeo --out data/synthgeo --val 100 "
             "--test 100` writes the synthetic benchmark in all three formats.")


def _require_data_file(path: str) -> None:
    if not os.path.exists(path):
        raise UserError(f"--data {path}: no such file. {DATA_HELP}")
    if not os.path.isfile(path):
        raise UserError(f"--data {path} is a directory, not a file. {DATA_HELP}")


if __name__ == "__main__":
    from vrl_jax.host_malloc import reexec_with_huge_pages
    reexec_with_huge_pages()  # huge pages for XLA's per-step buffers: vrl_jax/host_malloc.py
    sys.exit(run_cli(main, PROG))
