r"""DyME with the defaults of its released run (`config/config.py`, `main.py` of the DyME repository),
on its own model, LLaVA-OneVision-Qwen2-0.5B (`llava-hf/llava-onevision-qwen2-0.5b-ov-hf`).

  python -m vrl_jax.train --config experiments/dyme.py --workdir workdirs/dyme \
      --config.model.path=ckpt/llava-onevision-qwen2-0.5b-ov-hf --config.data.train=data/chartqa/train_high.json \
      --config.data.eval.test=data/chartqa/test.json

  experiments/dyme.py:qwen2_5_vl   the same recipe on Qwen2.5-VL-3B-Instruct (ckpt/qwen2.5-vl-3b-instruct)

Per prompt group: all rollouts wrong -> the first row becomes the reference rationale (hint, then
"Answer: X") and trains with NLL; some right -> GRPO advantages (r - mean) / (std + 1e-4); all right ->
skipped. The reward is DyME's format + accuracy + thinking: the "Answer:" flag once; the ChartQA answer
after the last "answer:" judged exactly (tolerance 0, DyME's parser); and the thinking reward of its
released run, the F1 of the lemma sets of the thinking text and of the hint (spaCy en_core_web_sm
when installed, `pip install "vrl_jax[spacy]" && python -m spacy download en_core_web_sm`; else an
offline lemminflect approximation, which `thinking/spacy` = 0 in the metrics says). Hints are not
rewritten (the released run's refiner is a no-op); `--config.dyme.visual.refiner=...` or the
`rule_based` / `http` kinds rewrite them. 8 rollouts of at most 300 tokens per prompt, 32 prompts per
optimizer step, 10 epochs over the prompts, AdamW 8e-5 with HF Trainer's defaults (betas 0.9/0.999,
eps 1e-8, linear decay to 0, no warmup, no weight decay on biases and LayerNorm weights), grad clip
1.0, wd 0.01, no reference model (beta 0), seq-mean-token-mean ('grpo') aggregation, pi_old from the
update's own forward (the ratio is 1, as in TRL with one update per generation), vision tower frozen.
Evaluation: ChartQA's test split (DyME's `data_utils/chart/download.py` writes it as `json/test.json`),
greedy, 1024 new tokens, relaxed accuracy (5%) on the text after the last "answer:", as its
`eval/eval_chartqa.py` scores it.

Images are AnyRes-tiled as transformers does (a prompt's only image: base tile + up to 6 x 6 tiles of
384 pixels, 729 patches each), so the patch buckets count whole tiles.
Deviations: greedy evaluation is MAYE's "low" setting (temperature 0.01, top-p 0.001), not argmax.
"""

from vrl_jax.configs import base_config


TILE_PATCHES = 27 * 27  # one 384-pixel SigLIP tile


def get_config(arg: str | None = None):
    if arg not in (None, "", "qwen2_5_vl"):
        raise ValueError(f"experiments/dyme.py: unknown variant {arg!r}; expected none or qwen2_5_vl")
    c = base_config()
    c.name = "dyme"
    c.algorithm = "dyme"
    c.model.path = "ckpt/llava-onevision-qwen2-0.5b-ov-hf"
    c.model.tiny.family = "llava_onevision"  # the architecture of its offline stand-in
    # Whole tiles: one image (1 + 36 tiles), a micro-batch's two prompts, up to a 32-prompt rollout batch.
    c.data.patch_buckets = tuple(TILE_PATCHES * n for n in (8, 16, 40, 76, 152, 304, 608, 1184))
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
    c.rollout.old_logprobs = "forward"
    c.optim.learning_rate = 8e-5
    c.optim.warmup_ratio = 0.0
    c.optim.schedule = "linear"
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
    c.optim.weight_decay = 0.01
    c.optim.decay_mask = "hf_trainer"
    c.optim.clip_grad_norm = 1.0
    c.optim.train_vit, c.optim.train_connector, c.optim.train_llm = False, True, True
    c.loss.kl_coef = 0.0
    c.loss.agg_mode = "seq_mean_token_mean"
    c.advantage.eps = 1e-4
    c.rewards.weights = {"accuracy": 1.0, "answer_flag_format": 1.0}
    c.rewards.judge = {"mode": "chartqa", "relaxed_tol": 0.0, "chartqa_parser": "dyme"}
    c.dyme.visual = {"kind": "lexical"}
    c.dyme.thinking_weight = 1.0
    c.rl_epochs = 10.0
    c.data.eval = {"test": "data/chartqa/test.json"}
    c.eval.judge = {"mode": "chartqa", "chartqa_parser": "dyme"}  # relaxed_tol 0.05
    c.eval.splits = ("test",)
    c.eval.settings = ("low",)  # DyME evaluates greedily
    c.eval.max_new_tokens = 1024
    c.eval.every_steps = 0  # at the start and at the end
    if arg == "qwen2_5_vl":
        c.name = "dyme_qwen2_5_vl"
        c.model.path = "ckpt/qwen2.5-vl-3b-instruct"
        c.model.tiny.family = "qwen2_5_vl"
        c.data.patch_buckets = base_config().data.patch_buckets
    return c
