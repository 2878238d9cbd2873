r"""MAYE's geometry3k recipe: REINFORCE++ on a Qwen2.5-VL checkpoint converted to vrl_jax.

  python -m vrl_jax.convert to-orbax /path/to/Qwen2.5-VL-7B-Instruct ckpt/qwen25vl7b
  python -m vrl_jax.train --config experiments/geo.py --workdir workdirs/geo \
      --config.model.path=ckpt/qwen25vl7b --config.data.train=datasets/geometry3k/geometry3k_rl_v0.jsonl

Hyper-parameters are MAYE's launch script (`scripts/train_ppo_vllm_distributed.sh`, paper App. A):
one rollout per prompt, 128 prompts per device x 7 devices, 32 updates per generation step (ppo
batch 4 per device), AdamW 5e-6 with 10% warmup and cosine decay, betas (0.9, 0.95), eps 1e-5,
grad-norm clip 1.0, KL loss k3 0.001 with the clamp to [-10, 10] on each backward batch's mean (as
MAYE clamps it), no KL reward, gamma 1, advantages whitened per device (7 blocks of 128 rows, MAYE's
per-rank whitening) with the mean added back (MAYE's torchtune quirk), only the LLM trained, max 2048
new tokens, temperature 1.0. The score is MAYE's judge against `solution` (with MAYE's LaTeX fixes),
replaced by -0.1 for no EOS or a too-short response; reflection words are matched as substrings, as
MAYE counts them. Metrics carry MAYE's names and definitions (`training/kl` is the k3 sum,
`loss/kl_loss` the unscaled KL).

Deviations, on purpose: evaluation accuracy and reflection ratios are pooled over processes (MAYE
averages per-rank ratios); `training/ratios` and `training/approx_policy_kl` are masked means (MAYE's
include its padding); the vision inputs are packed per micro-batch rather than re-collated.
`experiments/geo.py:tiny` runs the same recipe on the synthetic data and the tiny model, offline, after an SFT
stage (a random model never answers right); that stage also trains the random vision tower and connector
(`sft.train_*`), and RL then trains the LLM alone, as MAYE does.

`experiments/geo.py:qwen3` is the same recipe on dense Qwen3-VL (Qwen/Qwen3-VL-4B-Instruct, converted as
above); everything but the checkpoint is MAYE's. Its stand-in is a tiny Qwen3-VL (`model.tiny.family`).
"""

from vrl_jax.configs import base_config


def maye_recipe(c, dataset: str):
    c.algorithm = "reinforce_pp"
    c.advantage.estimator = "reinforce_pp"
    c.advantage.gamma = 1.0
    c.advantage.kl_reward_coef = 0.0
    c.advantage.whiten = True
    c.advantage.shift_mean = True
    c.advantage.num_whiten_shards = 7  # MAYE whitens on each of its 7 training GPUs (128 rows each)
    c.log.reflection_match = "substring"
    c.loss.kl_coef = 0.001
    c.loss.kl_estimator = "k3"
    c.loss.kl_clamp_mode = "mean"
    c.loss.clip_low = c.loss.clip_high = 0.2
    c.loss.agg_mode = "token_mean"
    c.optim.learning_rate = 5e-6
    c.optim.warmup_ratio = 0.1
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.95, 1e-5
    c.optim.weight_decay = 0.01
    c.optim.clip_grad_norm = 1.0
    c.optim.train_vit, c.optim.train_connector, c.optim.train_llm = False, False, True
    c.rollout.num_samples = 1
    c.rollout.max_new_tokens = 2048
    c.rollout.temperature = 1.0
    c.prompts_per_step = 128 * 7
    c.num_mini = 32
    c.num_micro = 64  # 7 devices x backward batch 2 = 14 rows per micro-batch (grad accumulation 2)
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.data.source = "maye"
    c.data.template = "maye_cot"
    c.data.train = f"datasets/{dataset}/{dataset}_rl_v0.jsonl"
    c.data.length_buckets = (512, 1024, 2048)
    c.data.patch_buckets = (4096, 16384, 65536)
    c.rewards.weights = {"accuracy": 1.0, "language": 1.0, "maye_penalty": 1.0}
    c.rewards.params = {"accuracy": {"answer_key": "solution"}, "maye_penalty": {"min_response_length": 1}}
    c.rewards.overrides = {"maye_penalty": -0.1}
    c.rewards.judge = {"mode": "maye_compat", "timeout_s": 10.0}
    c.eval.settings = ("low", "medium", "high")
    c.eval.pass_k = 8
    c.eval.max_new_tokens = 2048
    c.eval.batch_size = 128
    c.checkpoint.best_metric = "acc/Validation Set Epoch Accuracy pass@1 Temperature=0.6"
    return c


def get_config(arg: str | None = None):
    c = maye_recipe(base_config(), "geometry3k")
    c.name = "maye_geo"
    c.model.path = "ckpt/qwen2.5-vl-7b-instruct"
    c.data.eval = {"val": "datasets/geometry3k/geometry3k_validation_v0.jsonl",
                   "test": "datasets/geometry3k/geometry3k_test_v0.jsonl"}
    c.rl_steps = 100  # 50 epochs of 2101 problems at 896 per step (paper Sec. 5.1)
    c.eval.every_steps = 2  # every epoch
    if arg == "tiny":
        c.name = "maye_geo_tiny"
        c.model.path = ""
        c.model.dtype = "float32"
        c.model.remat = "none"
        c.data.source = "synthgeo"
        c.data.train = ""
        c.data.template = "plain"
        c.data.length_buckets = (96, 128)
        c.data.patch_buckets = (512, 1024, 2048)
        c.prompts_per_step, c.num_mini, c.num_micro = 32, 4, 8
        c.advantage.num_whiten_shards = 2  # two "devices" of 16 rows
        c.rollout.max_new_tokens = 224
        c.sft.steps, c.sft.batch_size, c.sft.learning_rate, c.sft.max_target_tokens = 150, 16, 2e-3, 224
        c.optim.learning_rate = 2e-4
        # The tiny model's vision tower and connector are random: SFT trains them; RL then trains the LLM
        # alone, as MAYE does (optim.train_* F / F / T).
        c.sft.train_vit = c.sft.train_connector = True
        c.rl_steps = 30
        c.eval.max_new_tokens = 224
        c.eval.batch_size = 16
        c.eval.max_examples = 64
        c.eval.splits = ("val", "test_iid")
        c.eval.every_steps = 0
    elif arg == "qwen3":
        c.name = "maye_geo_qwen3vl"
        c.model.path = "ckpt/qwen3-vl-4b-instruct"
        c.model.tiny.family = "qwen3_vl"  # the architecture of the stand-in and of a tiny default model
    elif arg:
        raise ValueError(f"experiments/geo.py: unknown variant {arg!r} (expected 'tiny' or 'qwen3')")
    return c
