"""The experiment config: every key with its default, validation, and the typed configs built from it.

Experiments (`experiments/*.py`) start from `base_config()` and change what they need. The config is
locked before command-line overrides apply, so `--config.typo=1` fails, and ml_collections checks
types on assignment. `validate` then checks values and combinations and names the key, before any
model is loaded or anything compiles.
"""

from __future__ import annotations

import dataclasses
import math
import re

import ml_collections

from vrl_jax.errors import UserError
from vrl_jax.evaluation.reflection import MATCH_MODES
from vrl_jax.rl.losses import (AGG_MODES, KL_CLAMP_MODES, KL_ESTIMATORS, RATIO_LEVELS, PolicyLossConfig,
                               check_combination)
from vrl_jax.rl.train_state import DECAY_MASKS, SCHEDULES, OptimizerConfig

ALGORITHMS = ("grpo", "reinforce_pp", "dyme", "sft")
ESTIMATORS = ("grpo", "drgrpo", "rloo", "reinforce_pp")
DATA_SOURCES = ("synthgeo", "maye", "easyr1", "dyme")
EVAL_SETTINGS = ("low", "medium", "high")
OLD_LOGPROBS = ("sampler", "recompute", "forward")
DAPO_FILLS = ("masked", "zero_advantage")
SYNTHGEO_EVAL_SPLITS = ("val", "test_iid", "test_ood")
PARTS = ("train_vit", "train_connector", "train_llm")  # the model parts an optimizer trains (optim.*, sft.*)
STAGES = ("sft", "rl", "any")


class ConfigValidationError(UserError, ValueError):
    """A config value or combination that cannot run; the message names the key."""


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "experiment"
    c.seed = 0
    c.algorithm = "grpo"  # grpo | reinforce_pp | dyme | sft

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # HF or vrl_jax model directory; empty: build the tiny model in the workdir
    c.model.dtype = "float32"  # compute dtype
    c.model.param_dtype = "float32"
    c.model.remat = "none"  # none | full | dots | offload: what each layer keeps for the backward pass (models/layers.py)
    # The language model's layers as straight-line code instead of a `lax.scan` (`models/qwen2.py`): faster steps
    # for shallow models (no stacked residuals), a compile time that grows with depth; keep False for deep ones.
    # The training programs' only: the sampler decodes with the scan (`SamplerConfig.unroll_layers`).
    c.model.unroll_layers = False
    # Low-rank adapters on the language model's projections, and optionally the vision tower's and connector's
    # (`models/lora.py`), rank 0 = full fine-tuning. With rank > 0 a part carrying adapters trains them alone
    # (a part without trains by its optim.train_* flag), the KL reference copies only what trains, and
    # checkpoints hold only that. targets: `re.search`ed against the dotted parameter paths of `lora.CANDIDATES`:
    # language.layers.<q_w k_w v_w o_w gate_w up_w down_w>, visual.blocks.<qkv_w proj_w fc1_w fc2_w gate_w up_w
    # down_w> (Qwen-VL), visual.layers.<q_w k_w v_w o_w fc1_w fc2_w> (SigLIP), visual.merger_fc1_w / _fc2_w and
    # visual.deepstack_fc1_w / _fc2_w, projector.linear1_w / linear2_w; at least one of the language model's.
    # dropout: the share of the adapters' inputs dropped in the update's forward (PEFT's lora_dropout; the
    # sampler and the old / reference log-probs run without). quantize: none | int8 | nf4: the language
    # model's frozen projection weights stored quantized (QLoRA, `models/quantize.py`), widened for each matmul.
    c.model.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0,
                                                  targets=r"^language\.layers\.(q|k|v|o|gate|up|down)_w$",
                                                  dropout=0.0, quantize="none"))
    # family: the architecture of the tiny offline model (`models.tiny.TINY_FAMILIES`: qwen2_5_vl | qwen3_vl |
    # llava_onevision)
    c.model.tiny = ml_collections.ConfigDict(dict(family="qwen2_5_vl", hidden=128, layers=4, intermediate=384,
                                                  vision_width=64, vision_depth=2, vocab_size=1024))
    # Memory check before anything compiles (`python -m vrl_jax.plan` prints the table): the run stops with a
    # suggestion when its planned peak exceeds device_gib GiB per device; 0 = the device's own limit (GPU,
    # TPU; no check on CPU).
    c.memory = ml_collections.ConfigDict(dict(device_gib=0.0))

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthgeo"  # synthgeo | maye | easyr1 | dyme (files on disk)
    c.data.train = ""  # a file for maye/easyr1/dyme
    c.data.eval = ml_collections.ConfigDict({"val": "", "test": ""})  # split name -> file
    # families: empty = all; levels: difficulty levels of train/val/test_iid (test_ood uses level 3).
    c.data.synthgeo = ml_collections.ConfigDict(dict(train=2000, val=100, test=200, seed=0, families=(),
                                                     levels=(0, 1, 2), text_fraction=0.25))
    c.data.template = "maye_cot"
    c.data.length_buckets = (128, 256, 512)
    c.data.patch_buckets = (256, 1024, 4096)
    c.data.max_fault_share = 0.05
    c.data.hint_field = "hint"
    c.data.shuffle = True  # reshuffle the training examples every epoch (False: file order, e.g. a curriculum)

    # old_logprobs: the ratio's pi_old: "sampler" (the rollout's log-probs), "recompute" (a training-forward
    # pass over the batch before the update), "forward" (the update's own forward, detached: the ratio is
    # exactly 1, as in TRL/DyME with one update per step). decode_segments: decode in this many loops, each
    # reading the response cache only up to its end, so early tokens attend over fewer slots (1: one loop
    # over the whole cache, the least compiling; see `SamplerConfig.decode_segments`).
    c.rollout = ml_collections.ConfigDict(dict(num_samples=8, max_new_tokens=256, temperature=1.0, top_p=1.0,
                                               top_k=0, old_logprobs="sampler", decode_segments=4))
    c.prompts_per_step = 8
    c.rl_steps = 100
    c.rl_epochs = 0.0  # > 0: rl_steps = ceil(rl_epochs * training prompts / prompts_per_step), once data is read
    c.num_micro = 1
    c.num_mini = 1
    c.ppo_epochs = 1

    # max_target_tokens: the most response columns of an SFT row (reference rationale + answer; longer
    # ones are truncated and counted); a batch takes the next power of two above its longest target.
    # train_vit / train_connector / train_llm: what the SFT stage trains; None = as optim.train_* (RL's). A
    # from-scratch model needs its vision tower trained by SFT, while RL may leave it frozen, as MAYE does.
    c.sft = ml_collections.ConfigDict(dict(steps=0, batch_size=16, learning_rate=1e-4, max_target_tokens=256,
                                           **{part: ml_collections.config_dict.placeholder(bool) for part in PARTS}))

    # schedule after warmup: cosine (MAYE) | linear (HF Trainer, DyME) | constant; decay_mask: which weights
    # decay: all (MAYE's torch AdamW) | no_bias_norm | hf_trainer (HF Trainer's rule, DyME).
    c.optim = ml_collections.ConfigDict(dict(learning_rate=5e-6, warmup_ratio=0.1, final_lr_ratio=0.0, b1=0.9,
                                             b2=0.95, eps=1e-5, weight_decay=0.01, clip_grad_norm=1.0,
                                             train_vit=False, train_connector=False, train_llm=True,
                                             schedule="cosine", decay_mask="all", moments_dtype="float32"))
    c.loss = ml_collections.ConfigDict(dict(clip_low=0.2, clip_high=0.2, clip_c=0.0, ratio_level="token",
                                            agg_mode="token_mean", kl_coef=0.0, kl_estimator="k3", kl_clamp=10.0,
                                            kl_clamp_mode="mean", entropy_coef=0.0, chunk_size=8192))
    # num_whiten_shards: REINFORCE++ whitens each of this many consecutive blocks of rows on its own
    # (MAYE whitens per GPU: 7 blocks of 128 prompts); 1 = the whole batch.
    c.advantage = ml_collections.ConfigDict(dict(estimator="grpo", eps=1e-6, gamma=1.0, kl_reward_coef=0.0,
                                                 whiten=True, shift_mean=True, num_whiten_shards=1))
    c.rewards = ml_collections.ConfigDict()
    c.rewards.weights = {"accuracy": 1.0}
    c.rewards.params = ml_collections.ConfigDict()
    c.rewards.overrides = ml_collections.ConfigDict()
    # Your own reward functions by name: {"name": "package.module:function"}, then weights {"name": w}.
    c.rewards.plugins = ml_collections.ConfigDict()
    c.rewards.judge = ml_collections.ConfigDict(dict(mode="default", timeout_s=2.0))
    # DAPO's dynamic sampling: groups whose `filter_on` reward is the same for every sample are dropped and
    # more prompts drawn (at most max_rounds rounds). fill: a batch still short after that is completed with
    # dropped groups whose rows are "masked" (they count in no loss or denominator: DAPO trains on fewer
    # groups) or kept as "zero_advantage" rows (they dilute token-mean denominators).
    c.dapo = ml_collections.ConfigDict(dict(dynamic_sampling=False, max_rounds=3, filter_on="accuracy",
                                            fill="masked"))
    # visual: DyME's checker/refiner (`rewards.visual` kinds): "lexical" is its released run (spaCy lemma F1
    # thinking reward, hints kept as they are); "rule_based" and "http" rewrite hints. max_target_tokens:
    # the most response columns a memorized reference may widen a rollout batch to.
    c.dyme = ml_collections.ConfigDict(dict(visual=ml_collections.ConfigDict({"kind": "lexical"}),
                                            refine=True, answer_format="boxed", thinking_weight=0.0,
                                            max_target_tokens=1024))

    c.eval = ml_collections.ConfigDict(dict(every_steps=10, splits=("val", "test"), settings=EVAL_SETTINGS,
                                            max_examples=0, batch_size=16, pass_k=8, max_new_tokens=0,
                                            at_start=True, breakdown=()))
    # breakdown: record fields (synthgeo's family and modality, MathVerse's problem_version, ...) whose
    # values each get their own accuracy per setting, `eval/<split>/<field>/<value>/...`.
    # The evaluation's judge (JudgeConfig fields); mode "" = the training reward's (rewards.judge). DyME
    # trains on exact answers and evaluates with ChartQA's 5% relaxed accuracy.
    c.eval.judge = ml_collections.ConfigDict(dict(mode="", timeout_s=2.0))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=10, keep=3, best_metric="", export_hf=True))
    # cpu_devices: on a CPU backend, the training command splits the host into this many devices (XLA's
    # host platform device count), so the mesh's data axis runs on that many cores; XLA:CPU runs a decode
    # step on one core per device. Ignored on GPU/TPU and where XLA_FLAGS already sets the count.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, cpu_devices=1))
    # Joining the processes of a multi-host run (`vrl_jax.distributed`): the environment variables
    # JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID win over these; auto: let JAX detect
    # SLURM and Cloud TPU VMs when nothing is given.
    c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=-1, process_id=-1,
                                                   auto=True, timeout_s=300))
    # reflection_match: MAYE's reflection words as whole words, or as substrings (MAYE's own rule).
    # every_steps: train rows are written (and the update's device metrics fetched) every N steps and at the
    # end; profile_steps: steps (1-based) traced with jax.profiler into workdir/profile (TensorBoard/Perfetto).
    c.log = ml_collections.ConfigDict(dict(every_steps=1, tensorboard=True, wandb=False, wandb_project="vrl_jax",
                                           samples_per_eval=16, reflection_match="word", profile_steps=()))
    return c


def _fail(key: str, message: str):
    raise ConfigValidationError(f"config.{key}: {message}")


def _get(c, key: str, default=None):
    """The value at a dotted key, or `default` where an experiment left the key out (e.g. judge options)."""
    value = c
    for part in key.split("."):
        if not hasattr(value, "keys") or part not in value:
            return default
        value = value[part]
    return value


@dataclasses.dataclass(frozen=True)
class Range:
    """The numbers a key accepts: [low, high] with either end open or absent; `off` is also accepted
    (a switch-off value outside the range, such as 0 for the dual clip)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    off: float | None = None

    def holds(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.off is not None and value == self.off:
            return True
        if not math.isfinite(value):  # NaN compares False either way; inf is never a useful size or rate
            return False
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        if self.high is None:
            text = f"{'>' if self.low_open else '>='} {self.low}"
        else:
            text = f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        return text if self.off is None else f"{self.off} (off) or {text}"


POSITIVE, NON_NEGATIVE = Range(0, low_open=True), Range(0)
UNIT, UNIT_OPEN_HIGH = Range(0, 1), Range(0, 1, high_open=True)

# Every numeric key and the values it accepts, with what 0 means where 0 is allowed. Checked before
# anything is built, so a value that would fail deep inside (an optimizer, a fault counter, a modulo in
# the loop) is reported under the key the user set.
RULES: dict[str, tuple[Range, str]] = {
    "seed": (NON_NEGATIVE, ""),
    "rl_steps": (NON_NEGATIVE, ""), "rl_epochs": (NON_NEGATIVE, "0 = run rl_steps steps"), "prompts_per_step": (POSITIVE, ""), "num_micro": (POSITIVE, ""),
    "num_mini": (POSITIVE, ""), "ppo_epochs": (POSITIVE, ""),
    "model.tiny.hidden": (POSITIVE, ""), "model.tiny.layers": (POSITIVE, ""),
    "model.tiny.intermediate": (POSITIVE, ""), "model.tiny.vision_width": (POSITIVE, ""),
    "model.tiny.vision_depth": (POSITIVE, ""), "model.tiny.vocab_size": (POSITIVE, ""),
    "model.lora.rank": (NON_NEGATIVE, "0 = no adapters: full fine-tuning"), "model.lora.alpha": (POSITIVE, ""),
    "model.lora.dropout": (UNIT_OPEN_HIGH, "the share of the adapters' inputs dropped in training forwards"),
    "data.max_fault_share": (UNIT, "the share of samples that may be skipped as faulty"),
    "data.synthgeo.train": (NON_NEGATIVE, ""), "data.synthgeo.val": (NON_NEGATIVE, ""),
    "data.synthgeo.test": (NON_NEGATIVE, ""), "data.synthgeo.seed": (NON_NEGATIVE, ""),
    "data.synthgeo.text_fraction": (UNIT, ""),
    "rollout.num_samples": (POSITIVE, ""), "rollout.max_new_tokens": (POSITIVE, ""),
    "rollout.temperature": (NON_NEGATIVE, "0 samples greedily"),
    "rollout.top_p": (Range(0, 1, low_open=True), "1 keeps the whole distribution"),
    "rollout.top_k": (NON_NEGATIVE, "0 = off"),
    "rollout.decode_segments": (POSITIVE, "1 = one decode loop"),
    "mesh.cpu_devices": (POSITIVE, "1 = the host is one CPU device"),
    "sft.steps": (NON_NEGATIVE, ""), "sft.batch_size": (POSITIVE, ""), "sft.learning_rate": (POSITIVE, ""),
    "sft.max_target_tokens": (POSITIVE, ""),
    "optim.learning_rate": (POSITIVE, ""), "optim.warmup_ratio": (UNIT, "the share of updates spent warming up"),
    "optim.final_lr_ratio": (UNIT, ""), "optim.b1": (UNIT_OPEN_HIGH, ""), "optim.b2": (UNIT_OPEN_HIGH, ""),
    "optim.eps": (POSITIVE, ""), "optim.weight_decay": (NON_NEGATIVE, ""),
    "optim.clip_grad_norm": (NON_NEGATIVE, "0 = no clipping"),
    "memory.device_gib": (NON_NEGATIVE, "0 = the device's own limit"),
    "loss.clip_low": (UNIT_OPEN_HIGH, ""), "loss.clip_high": (NON_NEGATIVE, ""),
    "loss.clip_c": (Range(1, low_open=True, off=0), "the dual-clip cap"),
    "loss.kl_coef": (NON_NEGATIVE, ""), "loss.kl_clamp": (NON_NEGATIVE, "0 = no clamp"),
    "loss.chunk_size": (POSITIVE, ""),
    "advantage.eps": (NON_NEGATIVE, ""), "advantage.gamma": (UNIT, ""), "advantage.kl_reward_coef": (NON_NEGATIVE, ""),
    "rewards.judge.timeout_s": (POSITIVE, ""), "eval.judge.timeout_s": (POSITIVE, ""),
    "advantage.num_whiten_shards": (POSITIVE, ""), "dyme.max_target_tokens": (POSITIVE, ""),
    "dapo.max_rounds": (POSITIVE, ""), "dyme.thinking_weight": (NON_NEGATIVE, ""),
    "eval.every_steps": (NON_NEGATIVE, "0 = only at the start, after SFT and at the end"),
    "eval.max_examples": (NON_NEGATIVE, "0 = every example"), "eval.batch_size": (POSITIVE, ""),
    "eval.pass_k": (POSITIVE, ""), "eval.max_new_tokens": (NON_NEGATIVE, "0 = rollout.max_new_tokens"),
    "checkpoint.every_steps": (NON_NEGATIVE, "0 = only at the end of the run and when stopped by a signal"),
    "checkpoint.keep": (POSITIVE, ""),
    "log.every_steps": (POSITIVE, ""), "log.samples_per_eval": (NON_NEGATIVE, ""),
}

# Typed configs built from a config section, and the section their field names stand for: whatever the
# rules above miss is still reported under the user's key, not the internal class's.
_TYPED_SECTIONS = {"OptimizerConfig": "optim", "PolicyLossConfig": "loss", "JudgeConfig": "rewards.judge",
                   "GeneratorConfig": "data.synthgeo"}


_MISSING = object()


def _check_rules(c) -> None:
    for key, (allowed, meaning) in RULES.items():
        value = _get(c, key, _MISSING)
        if value is _MISSING:
            continue
        if not allowed.holds(value):
            _fail(key, f"must be {allowed.describe()}, got {value!r}" + (f" ({meaning})" if meaning else ""))


def _choice(c, key: str, choices):
    value = _get(c, key)
    if value not in choices:
        _fail(key, f"{value!r} is not one of {tuple(choices)}")


def _typed(build) -> None:
    """Builds a typed config and reports its complaint under the config key it came from."""
    try:
        build()
    except (ValueError, TypeError) as e:
        message = str(e)
        for cls, section in _TYPED_SECTIONS.items():
            message = message.replace(f"{cls}.", f"config.{section}.").replace(f"{cls}:", f"config.{section}:")
        raise ConfigValidationError(message if message.startswith("config.") else f"config: {message}") from None


def validate(c: ml_collections.ConfigDict, num_devices: int = 1) -> None:
    """Checks values and combinations; raises ConfigValidationError naming the key."""
    _choice(c, "algorithm", ALGORITHMS)
    _choice(c, "advantage.estimator", ESTIMATORS)
    _choice(c, "data.source", DATA_SOURCES)
    _choice(c, "loss.agg_mode", AGG_MODES)
    _choice(c, "loss.ratio_level", RATIO_LEVELS)
    _choice(c, "loss.kl_estimator", KL_ESTIMATORS)
    _choice(c, "model.dtype", ("float32", "bfloat16"))
    _choice(c, "model.param_dtype", ("float32", "bfloat16"))
    _choice(c, "model.remat", ("none", "full", "dots", "offload"))
    _choice(c, "model.unroll_layers", (True, False))
    _choice(c, "dyme.answer_format", ("boxed", "flag"))
    _choice(c, "loss.kl_clamp_mode", KL_CLAMP_MODES)
    _choice(c, "optim.schedule", tuple(SCHEDULES))
    _choice(c, "optim.decay_mask", tuple(DECAY_MASKS))
    _choice(c, "optim.moments_dtype", ("float32", "bfloat16"))
    _choice(c, "rollout.old_logprobs", OLD_LOGPROBS)
    _choice(c, "dapo.filter_on", tuple(c.rewards.weights.keys()) + ("accuracy", "total"))
    _choice(c, "dapo.fill", DAPO_FILLS)
    _choice(c, "log.reflection_match", MATCH_MODES)
    for s in c.eval.settings:
        if s not in EVAL_SETTINGS:
            _fail("eval.settings", f"{s!r} is not one of {EVAL_SETTINGS}")
    if any(not isinstance(f, str) or not f or "/" in f for f in c.eval.breakdown):
        _fail("eval.breakdown", f"expected record field names (no '/'), got {tuple(c.eval.breakdown)}")
    _check_rules(c)
    if any(not isinstance(s, int) or s < 1 for s in c.log.profile_steps):
        _fail("log.profile_steps", f"expected step numbers >= 1, got {tuple(c.log.profile_steps)}")
    from vrl_jax.models.tiny import TINY_FAMILIES
    _choice(c, "model.tiny.family", tuple(TINY_FAMILIES))
    if c.model.tiny.hidden % 8:
        _fail("model.tiny.hidden", f"must be a multiple of 8 (4 heads of an even width), got {c.model.tiny.hidden}")
    if c.model.tiny.vision_width % 4:
        _fail("model.tiny.vision_width", f"must be a multiple of 4 (2 heads of an even width), "
                                         f"got {c.model.tiny.vision_width}")
    _check_lora(c)
    if c.algorithm == "sft" and c.sft.steps == 0:
        _fail("sft.steps", "algorithm 'sft' needs sft.steps > 0")
    if c.algorithm != "sft" and c.rl_steps == 0 and c.rl_epochs == 0 and c.sft.steps == 0:
        _fail("rl_steps", "nothing to run: rl_steps and sft.steps are both 0")
    if c.algorithm in ("grpo", "dyme") and c.rollout.num_samples < 2:
        _fail("rollout.num_samples", f"{c.algorithm} compares samples within a group: needs >= 2")
    if c.algorithm == "reinforce_pp" and c.advantage.estimator != "reinforce_pp":
        _fail("advantage.estimator", "algorithm 'reinforce_pp' needs advantage.estimator 'reinforce_pp'")
    if c.algorithm == "dyme" and c.loss.kl_coef:
        _fail("loss.kl_coef", "DyME trains without a reference model (its trainer asserts beta == 0)")
    if c.rollout.old_logprobs == "forward" and c.num_mini * c.ppo_epochs != 1:
        _fail("rollout.old_logprobs", f"'forward' takes pi_old from the update's own forward, which is only "
                                      f"the rollout policy for one update per step; num_mini * ppo_epochs = "
                                      f"{c.num_mini * c.ppo_epochs} (use 'recompute')")
    try:
        check_combination(None if c.algorithm in ("dyme", "sft") else c.advantage.estimator, c.loss.ratio_level,
                          c.loss.agg_mode)
    except ValueError as e:
        raise ConfigValidationError(f"config.{e}") from None
    if not (c.optim.train_vit or c.optim.train_connector or c.optim.train_llm):
        _fail("optim.train_llm", "optim.train_vit, train_connector and train_llm are all False: nothing would train")
    if c.sft.steps and not any(trained_parts(c, "sft").values()):
        _fail("sft.train_llm", "the SFT stage would train nothing: sft.train_vit, train_connector and train_llm "
                               "(None = as optim.*) are all False")
    rows = c.prompts_per_step * c.rollout.num_samples
    if rows % c.num_micro:
        _fail("num_micro", f"prompts_per_step * rollout.num_samples = {rows} rows must divide by num_micro "
                           f"= {c.num_micro}")
    if c.num_micro % c.num_mini:
        _fail("num_mini", f"num_micro = {c.num_micro} must divide by num_mini = {c.num_mini}")
    if c.sft.steps and c.sft.batch_size % c.num_micro:
        _fail("sft.batch_size", f"{c.sft.batch_size} must divide by num_micro = {c.num_micro}")
    data_parallel = _data_parallel(c, num_devices)
    micro_rows = rows // c.num_micro
    if micro_rows % data_parallel:
        _fail("mesh.data", f"a micro-batch of {micro_rows} rows does not split over {data_parallel} data-parallel "
                           f"devices (mesh data x fsdp); change prompts_per_step, rollout.num_samples or num_micro")
    if c.sft.steps and (c.sft.batch_size // c.num_micro) % data_parallel:
        _fail("sft.batch_size", f"an SFT micro-batch of {c.sft.batch_size // c.num_micro} rows (sft.batch_size "
                                f"{c.sft.batch_size} / num_micro {c.num_micro}) does not split over {data_parallel} "
                                f"data-parallel devices (mesh data x fsdp)")
    if c.prompts_per_step % data_parallel:
        _fail("prompts_per_step", f"{c.prompts_per_step} prompts do not split over {data_parallel} devices")
    if c.eval.batch_size % data_parallel:
        _fail("eval.batch_size", f"{c.eval.batch_size} does not split over {data_parallel} devices")
    if c.data.source != "synthgeo" and not c.data.train and (c.rl_steps or c.rl_epochs or c.sft.steps):
        _fail("data.train", f"data.source {c.data.source!r} needs a training file")
    if c.data.source == "synthgeo":
        unknown = [s for s in c.eval.splits if s not in SYNTHGEO_EVAL_SPLITS]
        if unknown:  # they would be left out without a word
            _fail("eval.splits", f"{unknown} are not synthgeo splits; choose from {SYNTHGEO_EVAL_SPLITS}")
    _check_rewards(c)
    for key in ("length_buckets", "patch_buckets"):
        if not c.data[key] or any(b <= 0 for b in c.data[key]):
            _fail(f"data.{key}", f"needs positive sizes, got {tuple(c.data[key])}")
    if any(b % 4 for b in c.data.patch_buckets):
        _fail("data.patch_buckets", "sizes must be multiples of 4 (one merge unit)")
    _typed(lambda: optimizer_config(c, max(c.rl_steps * c.num_mini * c.ppo_epochs, 1)))
    _typed(lambda: loss_config(c, max_len=c.rollout.max_new_tokens))
    if c.data.source == "synthgeo":
        _typed(lambda: _generator_config(c))


def _check_rewards(c) -> None:
    from vrl_jax.rewards.compose import BUILTINS, resolve_reward
    from vrl_jax.rewards.judge import JudgeConfig
    if not c.rewards.weights:
        _fail("rewards.weights", "no reward components")
    plugins = c.rewards.plugins.to_dict()
    for name in plugins:
        if name in BUILTINS:
            _fail(f"rewards.plugins.{name}", "is a built-in reward name; give your function another name")
        try:
            resolve_reward(name, plugins)
        except ValueError as e:
            _fail(f"rewards.plugins.{name}", str(e).removeprefix(f"plugins[{name!r}]: "))
    for section in ("weights", "params", "overrides"):
        for name in c.rewards[section].keys():
            try:
                resolve_reward(name, plugins)
            except ValueError as e:
                _fail(f"rewards.{section}", str(e))
    _typed(lambda: JudgeConfig.from_mapping(c.rewards.judge.to_dict()))
    try:
        JudgeConfig.from_mapping(eval_judge(c))
    except (ValueError, TypeError) as e:
        _fail("eval.judge", str(e).replace("JudgeConfig.", ""))


def eval_judge(c) -> dict:
    """The evaluation's JudgeConfig fields: `eval.judge`, or `rewards.judge` where its mode is ""."""
    judge = c.eval.judge.to_dict()
    return c.rewards.judge.to_dict() if not judge.get("mode") else judge


def _generator_config(c):
    from vrl_jax.data.synthgeo import GeneratorConfig
    s = c.data.synthgeo
    return GeneratorConfig(seed=s.seed, levels=tuple(s.levels), text_fraction=s.text_fraction,
                           **({"families": tuple(s.families)} if s.families else {}))


def _check_lora(c) -> None:
    lo = _get(c, "model.lora")
    if lo is None:
        return
    if not isinstance(lo.rank, int) or isinstance(lo.rank, bool):
        _fail("model.lora.rank", f"must be an integer (0 = off), got {lo.rank!r}")
    from vrl_jax.models.quantize import SCHEMES
    _choice(c, "model.lora.quantize", ("none",) + SCHEMES)
    if not lo.rank:
        if lo.quantize != "none":
            _fail("model.lora.quantize", f"{lo.quantize!r} stores the frozen base weights of a LoRA run; set "
                                         "model.lora.rank > 0 (full fine-tuning trains those weights)")
        return
    try:
        pattern = re.compile(lo.targets)
    except (re.error, TypeError) as e:
        _fail("model.lora.targets", f"{lo.targets!r} is not a valid regular expression ({e})")
    from vrl_jax.models.lora import CANDIDATES, PATH_PREFIX
    from vrl_jax.rl.train_state import PART_NAMES, part_flag
    matched = [p for p in CANDIDATES if pattern.search(p)]
    if not matched:
        _fail("model.lora.targets", f"{lo.targets!r} matches none of the adaptable projections "
                                    f"{', '.join(CANDIDATES)}")
    if lo.quantize != "none" and not any(p.startswith(PATH_PREFIX) for p in matched):
        _fail("model.lora.quantize", f"{lo.quantize!r} stores the language model's weights frozen, but "
                                     f"model.lora.targets={lo.targets!r} puts no adapter on it (it would train whole)")
    for path in matched:
        flag = part_flag(path)
        if not c.optim[flag]:
            _fail("model.lora.targets", f"{lo.targets!r} puts adapters on {path} ({PART_NAMES[flag]}), which "
                                        f"would not train with optim.{flag}=False; set optim.{flag}=True or "
                                        f"leave {path} out of the regex (e.g. anchor it: ^language\\.layers\\.)")


def lora_config(c) -> "LoraConfig | None":
    """The adapters `c.model.lora` asks for, or None for full fine-tuning (rank 0)."""
    from vrl_jax.models.lora import LoraConfig
    lo = _get(c, "model.lora")
    return LoraConfig(lo.rank, float(lo.alpha), lo.targets, float(lo.dropout)) if lo is not None and lo.rank else None


def _data_parallel(c, num_devices: int) -> int:
    """data x fsdp of the mesh `c.mesh` resolves to over `num_devices` (the trainer's own resolver)."""
    from vrl_jax.sharding import MeshConfig, mesh_shape
    try:
        data, fsdp, _ = mesh_shape(MeshConfig.of(c.mesh), num_devices)
    except (TypeError, ValueError) as e:
        _fail("mesh", str(e).replace("MeshConfig.", "mesh.").replace("MeshConfig", "mesh"))
    return data * fsdp


def trained_parts(c, stage: str = "rl") -> dict[str, bool]:
    """{part: trains?} for `stage`: "rl" (optim.train_*), "sft" (sft.train_*, None = optim's), or "any" (what
    either stage of the run trains: what a checkpoint must hold)."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: expected one of {STAGES}")
    rl = {part: bool(c.optim[part]) for part in PARTS}
    sft = {part: rl[part] if c.sft[part] is None else bool(c.sft[part]) for part in PARTS}
    if stage == "any":
        return {part: rl[part] or (bool(c.sft.steps) and sft[part]) for part in PARTS}
    return sft if stage == "sft" else rl


def optimizer_config(c, total_updates: int, learning_rate: float | None = None, stage: str = "rl") -> OptimizerConfig:
    """The optimizer of `stage` ("sft", "rl"; "any" only names the parameters some stage trains)."""
    o = c.optim
    return OptimizerConfig(
        learning_rate=o.learning_rate if learning_rate is None else learning_rate,
        warmup_steps=int(round(o.warmup_ratio * total_updates)), total_steps=max(total_updates, 1),
        final_lr_ratio=o.final_lr_ratio, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
        clip_grad_norm=o.clip_grad_norm or None, **trained_parts(c, stage), schedule=o.schedule,
        decay_mask=o.decay_mask, moments_dtype=o.moments_dtype)


def loss_config(c, max_len: int | None = None) -> PolicyLossConfig:
    lo = c.loss
    return PolicyLossConfig(
        clip_low=lo.clip_low, clip_high=lo.clip_high, clip_c=lo.clip_c or None, ratio_level=lo.ratio_level,
        agg_mode=lo.agg_mode, max_len=max_len if lo.agg_mode == "seq_mean_token_sum_norm" else None,
        kl_coef=lo.kl_coef, kl_estimator=lo.kl_estimator, kl_clamp=lo.kl_clamp or None,
        kl_clamp_mode=lo.kl_clamp_mode,
        entropy_coef=lo.entropy_coef, sft_coef=1.0)
