"""The recipe settings that make MAYE's and DyME's runs what their public code does, wired from the config
through the loop: DyME's reward (format + accuracy + thinking) and judges, its optimizer and ratio, the
MAYE-only switches, DAPO's filter and fill, the combinations the objectives forbid, epochs as DyME counts
them. The math of each piece is tested in its own module; here, that the config reaches it."""

from __future__ import annotations

import importlib.util
import os

import pytest

from tests.test_train_e2e import CACHE, ROOT, compilation_cache, rows, run_train  # noqa: F401
from vrl_jax import configs, run_setup
from vrl_jax.rewards import RewardSet


def recipe(name: str, variant: str | None = None):
    spec = importlib.util.spec_from_file_location("exp", os.path.join(ROOT, "experiments", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


# ---- configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, keys", [
    ({"loss.ratio_level": "sequence", "loss.agg_mode": "token_mean"}, ("loss.ratio_level", "loss.agg_mode")),  # GSPO
    ({"advantage.estimator": "drgrpo"}, ("advantage.estimator", "loss.agg_mode")),  # Dr.GRPO without its normaliser
    ({"rollout.old_logprobs": "forward", "num_mini": 2, "num_micro": 2}, ("rollout.old_logprobs",)),
    ({"dapo.filter_on": "thinking"}, ("dapo.filter_on",)),
    ({"optim.schedule": "exponential"}, ("optim.schedule",)),
])
def test_impossible_combinations_are_refused_naming_the_keys(changes, keys):
    c = recipe("default.py", "grpo")
    for key, value in changes.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    with pytest.raises(configs.ConfigValidationError) as e:
        configs.validate(c)
    assert all(k in str(e.value) for k in keys), str(e.value)


def test_gspo_and_drgrpo_run_with_their_aggregation():
    c = recipe("default.py", "grpo")
    c.loss.ratio_level, c.loss.agg_mode = "sequence", "seq_mean_token_mean"
    configs.validate(c)
    c.loss.ratio_level, c.advantage.estimator, c.loss.agg_mode = "token", "drgrpo", "seq_mean_token_sum_norm"
    configs.validate(c)


def test_dyme_recipe_is_dymes():
    c = recipe("dyme.py")
    o = configs.optimizer_config(c, 100)
    assert (o.schedule, o.b1, o.b2, o.eps, o.decay_mask, o.warmup_steps) == ("linear", 0.9, 0.999, 1e-8,
                                                                              "hf_trainer", 0)
    assert c.rollout.old_logprobs == "forward" and c.dyme.thinking_weight == 1.0 and c.rl_epochs == 10
    assert c.dyme.visual.kind == "lexical" and c.eval.max_new_tokens == 1024 and c.data.eval.test
    configs.validate(c)


def test_maye_recipe_switches():
    c = recipe("geo.py")
    assert (c.loss.kl_clamp_mode, c.log.reflection_match, c.advantage.num_whiten_shards) == ("mean", "substring", 7)
    assert configs.loss_config(c).kl_clamp_mode == "mean"
    assert c.prompts_per_step * c.rollout.num_samples // 7 == 128  # one block per MAYE training GPU


def test_dyme_trains_on_exact_answers_and_evaluates_relaxed():
    """DyME's training reward reads the answer after the last 'answer:' with tolerance 0; its evaluation
    keeps ChartQA's 5% relaxed accuracy. An answer 4% off is wrong in training and right in evaluation."""
    c = recipe("dyme.py")
    examples = [{"answer": "50", "solution": "Answer: 50"}] * 3
    texts = ["The bar is 52. Answer: 52", "Answer: 50", "the value. Answer: 60"]
    with RewardSet(run_setup.reward_spec(c)) as train, RewardSet(run_setup.eval_reward_spec(c)) as ev:
        assert train(texts, examples)["accuracy"].tolist() == [0.0, 1.0, 0.0]
        assert ev(texts, examples)["accuracy"].tolist() == [1.0, 1.0, 0.0]


def test_evaluation_judges_like_training_unless_told_otherwise():
    c = recipe("geo.py")
    assert configs.eval_judge(c) == c.rewards.judge.to_dict()  # MAYE evaluates with its training judge
    spec = run_setup.eval_reward_spec(c)
    assert spec["weights"] == {"accuracy": 1.0} and spec["params"] == {"accuracy": {"answer_key": "solution"}}


def test_rl_epochs_count_passes_over_the_prompts():
    c = recipe("dyme.py")  # 10 epochs, 32 prompts a step
    assert run_setup.rl_steps(c, 100) == 32  # ceil(10 * 100 / 32)
    c.rl_epochs = 0.0
    assert run_setup.rl_steps(c, 100) == c.rl_steps


@pytest.mark.parametrize("name, variant, fmt", [("dyme.py", None, "flag"), ("ablation.py", "dyme,0", "boxed")])
def test_dyme_memorizes_its_hint_in_the_runs_answer_format(name, variant, fmt):
    c = recipe(name, variant)
    visual = run_setup.make_visual(c)
    try:
        ex = {"question": "What is x?", "hint": "The bar shows 7. So the answer: is below.", "answer": "7"}
        text = visual.refiner.refine([ex]).texts[0]
    finally:
        visual.close()
    assert text.startswith("The bar shows 7. So the answer")  # the hint is kept whole (no rewrite)
    last = text.splitlines()[-1]
    assert last == "Answer: 7" if fmt == "flag" else "\\boxed{7}" in last and "Answer:" not in last


# ---- the loop -----------------------------------------------------------------------------------

DYME = ["--config.algorithm=dyme", "--config.data.template=dyme_answer", "--config.data.length_buckets=(128,192)",
        "--config.dyme.answer_format=flag", "--config.sft.steps=0", "--config.dyme.thinking_weight=1.0",
        "--config.rollout.old_logprobs=forward", "--config.rollout.max_new_tokens=4",
        "--config.loss.kl_coef=0.0"]  # DyME has no reference model (the default RL has a KL term)


def test_dyme_run_scores_thinking_and_keeps_whole_targets(tmp_path):
    """A random model is always wrong, so every group memorizes: the reference targets are longer than the
    4 sampled columns, and the rows widen to hold them instead of cutting their answer line."""
    wd = str(tmp_path / "dyme")
    out = run_train(wd, *DYME)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "DyME thinking reward: approx:lemminflect" in out.stdout or "spacy:" in out.stdout
    train = rows(wd)
    for r in train:
        assert r["dyme/memorize_share"] == 1.0 and r["dyme/truncated_targets"] == 0.0 and r["loss/sft_loss"] > 0
        assert "rews/thinking_rewards" in r and r["thinking/spacy"] in (0.0, 1.0)
        # the checker's per-row fallback is a share of the step's rows, not logged as a reward
        assert 0.0 <= r["thinking/fallback_share"] <= 1.0
        assert [k for k in r if "fallback" in k] == ["thinking/fallback_share"]
        assert r["update/tokens"] > 2 * 4  # the two memorized rows' targets, not 4 columns each


def test_dapo_fillers_count_nowhere_unless_asked(tmp_path):
    """A random model gets every group all wrong, so DAPO's filter drops every group and fillers make up
    the batch: masked (the default) they carry no loss token. (As zero-advantage rows they train, with
    pi_old recomputed: `tests/test_multihost_run.py`.)"""
    masked = str(tmp_path / "masked")
    out = run_train(masked, "--config.sft.steps=0", "--config.rl_steps=1", "--config.dapo.dynamic_sampling=true",
                    "--config.dapo.max_rounds=2")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (m,) = rows(masked)
    assert m["dapo/sampling_rounds"] == 2 and m["dapo/filler_groups"] == 2
    assert m["update/tokens"] == 0 and "training/sampler_max_abs_ratio_minus_1" not in m


def test_sft_memorizes_what_dymes_refiner_memorizes():
    """SFT's target is the hint and the answer line, the text DyME's (no-op) refiner gives, so the
    ablation's SFT and DyME arms memorize the same text; it is not the hint followed by the worked
    solution (which repeats the hint and, on synthgeo, runs past 128 tokens)."""
    from vrl_jax.trainer import reference_text
    c = recipe("ablation.py", "dyme,0")
    visual = run_setup.make_visual(c)
    ex = {"question": "Find x.", "hint": "Goal: find x.\nReasoning: 180 - 50 - 65 = 65.", "answer": "65",
          "solution": "The angles add up to 180. x = 180 - 50 - 65 = 65. The answer is \\boxed{65}."}
    try:
        assert reference_text(ex, "boxed") == visual.refiner.refine([ex]).texts[0]
    finally:
        visual.close()
    assert reference_text(ex, "boxed").endswith("\\boxed{65}.") and "The angles" not in reference_text(ex, "boxed")
    assert reference_text(ex, "flag").splitlines()[-1] == "Answer: 65"
    assert reference_text({**ex, "hint": ""}, "boxed") == ex["solution"]  # MAYE data: no hint, a solution
