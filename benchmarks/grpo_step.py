"""One GRPO step end to end: vrl_jax's training loop vs TRL's `GRPOTrainer`, side by side in one run.

  pip install trl==1.16.0      # the peer (PyTorch CPU; torch==2.13.0 as pinned in the test extra)
  python benchmarks/grpo_step.py [--width 1] [--prompts 8] [--group 8] [--new 128] [--steps 4] [--warmup 2]

Both sides train the same tiny random Qwen2.5-VL directory (text hidden 128 x `--width`, 4 layers, the
offline default's tokenizer and vision tower) on the same synthetic geometry problems with images, in
the same order (no shuffling on either side), `--prompts` prompts x `--group` samples per step, at most
`--new` new tokens at temperature 1, the same reward (vrl_jax's answer judge, called by both), the same
objective (GRPO advantages (r - mean) / (std + 1e-4), PPO clip 0.2, no KL, sequence-mean token-mean:
TRL's loss_type "grpo") and the same optimizer (AdamW, betas 0.9/0.999, eps 1e-8, no weight decay,
linear decay, grad-norm clip 1.0), every parameter trained, float32, one optimizer update per step.

vrl_jax runs its trainer (`vrl_jax.trainer.train`) and reads each step's phase times from its metrics
(sample, score, credit, update; compiling is logged apart and its steps are warm-up); TRL runs
`GRPOTrainer.train` with its generation (HF `generate`, one prefill per row) and scoring timed by
wrapping `_generate_and_score_completions`, the rest of each step being its update. Steady state is the
median over `--steps` steps after `--warmup`. The last line is TRL step time / vrl_jax step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from common import machine, torch_device, torch_placement  # benchmarks/common.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR, EPS_ADV, CLIP, MAX_NORM = 1e-5, 1e-4, 0.2, 1.0
JUDGE = {"weights": {"accuracy": 1.0}, "judge": {"mode": "default"}}


def make_data(directory: str, n: int) -> str:
    """`n` synthetic geometry problems with images, as MAYE jsonl; returns the file."""
    from vrl_jax.data.synthgeo import GeneratorConfig, export_dataset
    export_dataset(directory, {"train": n}, GeneratorConfig(seed=0, levels=(0, 1), text_fraction=0.0),
                   formats=("maye",))
    return os.path.join(directory, "maye_train.jsonl")


def make_model(directory: str, data_file: str, width: int) -> str:
    from vrl_jax.data.formats import load_examples
    from vrl_jax.models.tiny import build_tiny_model
    texts = [t for e in load_examples(data_file) for t in (e.question, e.solution, e.answer) if t]
    return build_tiny_model(directory, texts, hidden=128 * width, layers=4, intermediate=384 * width)


# ---- vrl_jax ------------------------------------------------------------------------------------


def vrl_jax_config(args, model_dir: str, data_file: str):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import importlib.util
    spec = importlib.util.spec_from_file_location("default", os.path.join(ROOT, "experiments", "default.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("grpo")
    c.name = "grpo_step_benchmark"
    c.model.path = model_dir
    c.data.source, c.data.train, c.data.shuffle = "maye", data_file, False
    c.data.eval = {"val": "", "test": ""}
    c.data.template = "plain"
    c.data.length_buckets = tuple(int(b) for b in args.prompt_buckets.split(","))
    c.data.patch_buckets = (64 * args.prompts, 64 * args.prompts * args.group)  # 112 x 112 images: 64 patches
    c.rl_steps = args.warmup + args.steps
    c.prompts_per_step, c.rollout.num_samples, c.rollout.max_new_tokens = args.prompts, args.group, args.new
    c.rollout.temperature, c.rollout.top_p, c.rollout.top_k = 1.0, 1.0, 0
    c.num_micro = c.num_mini = c.ppo_epochs = 1
    c.optim.learning_rate, c.optim.warmup_ratio, c.optim.schedule = LR, 0.0, "linear"
    c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay = 0.9, 0.999, 1e-8, 0.0
    c.optim.clip_grad_norm = MAX_NORM
    c.optim.train_vit = c.optim.train_connector = c.optim.train_llm = True
    c.loss.clip_low = c.loss.clip_high = CLIP
    c.loss.agg_mode, c.loss.kl_coef, c.loss.entropy_coef = "seq_mean_token_mean", 0.0, 0.0
    c.advantage.estimator, c.advantage.eps = "grpo", EPS_ADV
    c.rewards.weights = dict(JUDGE["weights"])
    c.eval.at_start = False
    c.checkpoint.every_steps, c.checkpoint.export_hf = 0, False
    c.log.tensorboard = False
    return c


def run_vrl_jax(args, model_dir: str, data_file: str, workdir: str) -> list[dict]:
    from vrl_jax.trainer import train
    train(vrl_jax_config(args, model_dir, data_file), workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if r.get("split") == "train"]
    out = []
    for r in steps:
        rollout = r["time/sample"] + r["time/score"]
        out.append(dict(step=r["step"], rollout=rollout, update=r["time/step"] - rollout, step_s=r["time/step"],
                        sample=r["time/sample"], tokens=r["response/tokens_mean"] * args.prompts * args.group,
                        compiled=r["compile/count"] > 0, reward=r["rews/scores"]))
    return out


# ---- TRL ----------------------------------------------------------------------------------------


def run_trl(args, model_dir: str, data_file: str, workdir: str) -> list[dict]:
    import torch
    from datasets import Dataset
    from transformers import (AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessorPil, TrainerCallback)
    from trl import GRPOConfig, GRPOTrainer

    from vrl_jax.data.formats import load_examples, load_image
    from vrl_jax.data.prompts import build_messages
    from vrl_jax.rewards import RewardSet

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    # The PIL image processor and no video processor: the fast image processor and every video processor
    # need torchvision, which has no wheel for this CPU torch.
    class ImageTextProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            return None if name == "video_processor" and arg is None else super().check_argument_for_proper_class(
                name, arg)

    processor = ImageTextProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(model_dir),
                                   tokenizer=tokenizer, video_processor=None, chat_template=tokenizer.chat_template)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    rows = []
    for ex in load_examples(data_file):
        # The same user turn vrl_jax renders (`plain` template), as a conversational prompt.
        messages = build_messages(ex, "plain")
        rows.append({"prompt": messages, "image": load_image(ex.images[0]), "answer": ex.answer})
    judge = RewardSet(JUDGE)

    def accuracy(completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return judge(texts, [{"answer": a} for a in answer])["accuracy"].tolist()

    config = GRPOConfig(
        output_dir=workdir, per_device_train_batch_size=args.prompts * args.group, gradient_accumulation_steps=1,
        num_generations=args.group, max_completion_length=args.new, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=LR, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0,
        lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=MAX_NORM, loss_type="grpo", beta=0.0,
        epsilon=CLIP, scale_rewards="group", num_iterations=1, max_steps=args.warmup + args.steps,
        shuffle_dataset=False, seed=0, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=torch_device() == "cpu",
        bf16=False, dataloader_num_workers=0, disable_dropout=True)
    trainer = GRPOTrainer(model=model, reward_funcs=[accuracy], args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=processor)
    records: list[dict] = []
    generate = trainer._generate_and_score_completions

    def timed_generate(inputs):
        t0 = time.perf_counter()
        out = generate(inputs)
        records[-1]["rollout"] += time.perf_counter() - t0
        records[-1]["tokens"] += float(out["completion_mask"].sum())
        return out

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *a, **k):
            records.append({"rollout": 0.0, "tokens": 0.0, "t0": time.perf_counter()})

        def on_step_end(self, *a, **k):
            r = records[-1]
            r["step_s"] = time.perf_counter() - r.pop("t0")
            r["update"] = r["step_s"] - r["rollout"]
            r["step"] = len(records)

    trainer._generate_and_score_completions = timed_generate
    trainer.add_callback(StepTimes())
    trainer.train()
    judge.close()
    return records


def summary(records: list[dict], warmup: int) -> dict:
    steady = [r for r in records[warmup:] if not r.get("compiled")] or records[warmup:]
    med = lambda key: statistics.median(r[key] for r in steady)  # noqa: E731
    return dict(step_s=med("step_s"), rollout_s=med("rollout"), update_s=med("update"), tokens=med("tokens"),
                s_per_token=med("rollout") / med("tokens"), steps_measured=len(steady),
                step_times=[round(r["step_s"], 3) for r in records])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1, help="model width multiplier (hidden 128 x width)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompt-buckets", default="64,72,80,96,128,160,192,256",
                        help="vrl_jax's prompt-length buckets (TRL pads each batch to its longest prompt)")
    args = parser.parse_args()
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("the peer is TRL: pip install trl==1.16.0 (with torch==2.13.0 from the test extra)")

    with tempfile.TemporaryDirectory() as d:
        data_file = make_data(os.path.join(d, "data"), args.prompts * (args.warmup + args.steps))
        model_dir = make_model(os.path.join(d, "model"), data_file, args.width)
        ours = summary(run_vrl_jax(args, model_dir, data_file, os.path.join(d, "vrl_jax")), args.warmup)
        peer = summary(run_trl(args, model_dir, data_file, os.path.join(d, "trl")), args.warmup)
    for name, s in (("vrl_jax", ours), ("TRL", peer)):
        print(f"{name:8s} step {s['step_s']:7.3f} s  rollout {s['rollout_s']:7.3f} s  update {s['update_s']:7.3f} s  "
              f"{1e3 * s['s_per_token']:.3f} ms per generated token ({s['tokens']:.0f} tokens)")
    figures = {"args": vars(args), "vrl_jax": ours, "trl": peer, **machine(), **torch_placement(torch_device())}
    print(json.dumps(figures))
    print(f"ratio TRL/vrl_jax step time: {peer['step_s'] / ours['step_s']:.2f}")


if __name__ == "__main__":
    from vrl_jax.host_malloc import reexec_with_huge_pages
    reexec_with_huge_pages()  # both sides run under it (vrl_jax/host_malloc.py); machine() records it
    main()
