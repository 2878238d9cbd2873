r"""DyME with its defaults (`config/config.py` of the DyME repository), on a Qwen2.5-VL checkpoint.

  python -m vrl_jax.train --config experiments/dyme.py --workdir workdirs/dyme \
      --config.model.path=ckpt/qwen2.5-vl-3b --config.data.train=data/chartqa/train_high.json

Per prompt group: all rollouts wrong -> the first row becomes the (refined) reference rationale
and trains with NLL; some right -> GRPO advantages (r - mean) / (std + 1e-4); all right -> skipped.
8 rollouts of at most 300 tokens per prompt, 32 prompts per optimizer step, AdamW 8e-5, no warmup,
grad clip 1.0, wd 0.01, no reference model (beta 0), seq-mean-token-mean ('grpo') aggregation,
vision tower frozen. DyME's own model (LLaVA-OneVision-0.5B) is not ported yet; Qwen2.5-VL stands in.
Visual supervision: the rule-based checker/refiner by default; point `dyme.visual` at a local
OpenAI-compatible server with `{"kind": "http", "base_url": ..., "model": ...}`.
"""

from vrl_jax.configs import base_config


def get_config(arg: str | None = None):
    if arg:
        raise ValueError(f"experiments/dyme.py takes no variant, got {arg!r}")
    c = base_config()
    c.name = "dyme"
    c.algorithm = "dyme"
    c.model.path = "ckpt/qwen2.5-vl-3b-instruct"
    c.model.dtype = "bfloat16"
    c.data.source = "dyme"
    c.data.train = "data/chartqa/train_high.json"
    c.data.template = "dyme_answer"
    c.dyme.answer_format = "flag"
    c.dyme.refine = True
    c.rollout.num_samples = 8
    c.rollout.max_new_tokens = 300
    c.prompts_per_step = 32
    c.num_micro = 16
    c.optim.learning_rate = 8e-5
    c.optim.warmup_ratio = 0.0
    c.optim.weight_decay = 0.01
    c.optim.clip_grad_norm = 1.0
    c.optim.train_vit, c.optim.train_connector, c.optim.train_llm = False, True, True
    c.loss.kl_coef = 0.0
    c.loss.agg_mode = "seq_mean_token_mean"
    c.advantage.eps = 1e-4
    c.rewards.weights = {"accuracy": 1.0, "answer_flag_format": 1.0}
    c.rewards.judge = {"mode": "chartqa"}
    c.rl_steps = 1000
    c.eval.settings = ("low",)  # DyME evaluates greedily
    return c
