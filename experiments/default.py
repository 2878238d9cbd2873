r"""The embedded default: the synthetic geometry benchmark and a tiny Qwen2.5-VL, on a CPU, offline.

  python -m vrl_jax.train --config experiments/default.py --workdir workdirs/default

Nothing is downloaded: the data is generated (`vrl_jax.data.synthgeo`), and the model is a small
random Qwen2.5-VL with a tokenizer trained on that data, written as an ordinary HF directory in the
workdir and loaded through the same code as a real checkpoint. A random model never answers
correctly, so reward-only RL has nothing to learn from: the default runs a short SFT stage (400 steps of 16)
on the reference rationales (the hint and the boxed answer, at most 104 tokens), then 100 GRPO steps (8 prompts
x 8 samples, 128 new tokens, the two-stage baseline of DyME's paper), and evaluates all 100 val and 200
test_iid items under MAYE's three settings after SFT and at the end, each also per family and per modality
(`eval.breakdown`); the run ends with each setting's change from the SFT checkpoint, paired by problem, with
its standard error (README, "Is RL's change beyond noise?").

Why these RL settings (README, "Measured figures"): a learning rate of 3e-4 held near the SFT policy by a
KL term (0.05, k3, to the policy SFT left), since 1e-4 alone barely moved the rollout accuracy, 3e-4 alone
lost half of it midway and most of its pass@4, and 1e-3 collapsed it. The 8000 training items hold 1604
distinct problems (levels 0-1 have small parameter spaces), so SFT sees each about 4 times, and RL raises the
training rollouts' accuracy without carrying over to test_iid, whose 76 distinct problems are disjoint from
train (README, "Why RL does not carry over"). 400 SFT steps, 8000 items (earlier 500 and 12000: the same four
passes over the problems), checkpoints every 25 steps and the host split into two CPU devices took the run from
11 min 48 s (an earlier slow day) to 10 min 04 s (a slow day) on 2 cores, with the same outcome in three seeds (README, "The default now").

Variants:

  experiments/default.py:grpo    GRPO only        experiments/default.py:sft    SFT only
  experiments/default.py:dyme    DyME             experiments/default.py:smoke  a few seconds, for tests
  experiments/default.py:grpo_qwen3  GRPO only, on a tiny Qwen3-VL (`model.tiny.family`) instead

LoRA or QLoRA on any of them: --config.model.lora.rank=16 [--config.model.lora.quantize=nf4] (README, "LoRA
and QLoRA"; both run end to end on the smoke variant in tests/test_lora_run.py).
"""

from vrl_jax.configs import base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.name = "default"
    c.algorithm = "grpo"
    c.seed = 0

    c.model.path = ""  # empty: build the tiny model below in the workdir
    c.model.tiny.hidden = 128
    c.model.tiny.layers = 4
    c.model.tiny.intermediate = 384
    c.model.unroll_layers = True  # 4 layers: straight-line code trains 4-10% faster than a scan, compiles a bit longer

    c.data.source = "synthgeo"
    c.data.synthgeo.train = 8000
    c.data.synthgeo.val = 100
    c.data.synthgeo.test = 200
    c.data.synthgeo.levels = (0, 1)  # the two easiest levels: a 1M-parameter model learns them in minutes
    c.data.synthgeo.text_fraction = 0.5
    c.data.template = "plain"
    c.data.length_buckets = (96, 128)
    c.data.patch_buckets = (512, 1024, 2048, 4096)

    c.sft.steps = 400
    c.sft.batch_size = 16
    c.sft.learning_rate = 2e-3
    c.sft.max_target_tokens = 128  # hint + answer line: at most 104 tokens on synthgeo

    c.rl_steps = 100
    c.prompts_per_step = 8
    c.rollout.num_samples = 8
    c.rollout.max_new_tokens = 128
    c.num_micro = 1  # 64 rows in one micro-batch: each group's prompt and image computed once
    c.optim.learning_rate = 3e-4  # RL's; SFT's is sft.learning_rate
    c.loss.kl_coef = 0.05  # to the policy SFT left (saved as the workdir's reference/)
    c.optim.warmup_ratio = 0.0
    c.optim.train_vit = True
    c.optim.train_connector = True
    c.loss.agg_mode = "seq_mean_token_mean"

    c.rewards.weights = {"accuracy": 1.0}
    c.eval.every_steps = 0  # after SFT and at the end
    c.eval.at_start = False  # a random model scores 0
    c.eval.splits = ("val", "test_iid")
    c.eval.max_examples = 200  # all 100 val and 200 test_iid problems
    c.eval.batch_size = 50  # 50 images of 64 patches fill the largest patch bucket
    c.eval.settings = ("low", "medium", "high")
    c.eval.pass_k = 4
    c.eval.breakdown = ("family", "modality")  # each family, and vision items apart from their text twins
    c.checkpoint.every_steps = 25  # a save costs ~0.25 s here; SIGTERM still saves the current step
    # On a CPU backend, two devices, one per core of a 2-core machine: XLA:CPU decodes on one core per device, so
    # the split mostly speeds the rollouts and evaluations. No effect on an accelerator.
    c.mesh.cpu_devices = 2

    if arg in (None, "", "sft_grpo"):
        pass
    elif arg in ("grpo", "grpo_qwen3"):
        c.sft.steps = 0
        c.optim.learning_rate, c.loss.kl_coef = 1e-4, 0.0  # from a random model: no policy to stay near
        if arg == "grpo_qwen3":
            c.model.tiny.family = "qwen3_vl"
    elif arg == "sft":
        c.algorithm = "sft"
        c.rl_steps = 0
        c.loss.kl_coef = 0.0  # no RL stage
        c.sft.steps = 500  # the SFT+GRPO default's 400 + 100 optimizer steps
    elif arg == "dyme":
        c.algorithm = "dyme"
        c.sft.steps = 0
        c.optim.learning_rate, c.loss.kl_coef = 1e-4, 0.0  # DyME trains without a reference model
        c.data.template = "dyme_answer"
        c.data.length_buckets = (128, 192)  # DyME's instruction adds ~40 tokens
        c.dyme.answer_format = "flag"
    elif arg == "smoke":  # a few seconds end to end: tests and first contact
        c.data.synthgeo.train = 64
        c.data.synthgeo.val = 8
        c.data.synthgeo.test = 8
        c.model.tiny.hidden = 32
        c.model.tiny.layers = 1
        c.model.tiny.intermediate = 64
        c.sft.steps = 2
        c.sft.batch_size = 4
        c.rl_steps = 2
        c.prompts_per_step = 2
        c.rollout.num_samples = 2
        c.rollout.max_new_tokens = 8
        c.sft.max_target_tokens = 16
        c.num_micro = 2
        c.eval.every_steps = 0
        c.eval.at_start = True  # cheap here: the tests see the step-0 ("Vanilla") row
        c.eval.max_examples = 4
        c.eval.pass_k = 2
        c.eval.batch_size = 4
        c.checkpoint.every_steps = 1
        c.mesh.cpu_devices = 1  # a batch of 2 prompts: nothing to split
    else:
        raise ValueError(f"experiments/default.py: unknown variant {arg!r}; expected sft_grpo, grpo, grpo_qwen3, "
                         "sft, dyme, smoke")
    return c
