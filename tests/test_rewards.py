"""Format rewards, penalties, composition by name and weight, and the audit CLI end to end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vrl_jax.rewards import (AnswerJudge, RewardSet, answer_flag_format, compute_rewards, is_r1_formatted,
                             language_penalty, maye_format, maye_penalty, r1_format, soft_overlong)


@pytest.fixture(scope="module")
def judge():
    with AnswerJudge(timeout_s=1.0) as shared:
        yield shared


# ---------------------------------------------------------------------------------- format rewards
@pytest.mark.parametrize("text,ok", [
    (r"<think>2+2=4</think> The answer is \boxed{4}.", True),
    (r"  <think>a</think>\boxed{\frac{1}{2}}", True),
    (r"<think>a</think> no box", False),
    (r"<think>a \boxed{4}</think> done", False),                  # the box must follow the thinking
    (r"<think>a</think><think>b</think>\boxed{4}", False),        # thinking twice
    (r"text first <think>a</think>\boxed{4}", False),             # must start with <think>
    (r"<think>a</think>\boxed{4", False),                         # truncated box
    (r"<think>a\boxed{4}", False),                                # never closed
])
def test_r1_format(text, ok):
    assert is_r1_formatted(text) == ok


def test_r1_format_with_prefilled_think():
    assert is_r1_formatted(r"reasoning</think>\boxed{3}", prefilled_think=True)
    assert not is_r1_formatted(r"<think>reasoning</think>\boxed{3}", prefilled_think=True)
    np.testing.assert_array_equal(r1_format([r"<think>x</think>\boxed{1}", "nope"]), [1.0, 0.0])


def test_answer_flag_format():
    texts = ["Look at the bars.\nAnswer: 12", "answer: 3", "Answer: 3. Final answer: 4", "12", "ANSWER: x"]
    np.testing.assert_array_equal(answer_flag_format(texts), [1, 1, 0, 0, 1])
    # min_thinking_length counts the stripped text before the flag (DyME's check).
    np.testing.assert_array_equal(answer_flag_format(["ab Answer: 1", "abcdef Answer: 1"], min_thinking_length=5),
                                  [0, 1])


def test_maye_format():
    texts = ["<think>a</think> x", "<think>a</think><think>b</think>", "no tags", "<think>a<think>b</think>",
             "<think>\nmulti\nline</think>"]
    np.testing.assert_array_equal(maye_format(texts), [1, 0, 0, 1, 1])


def test_language_penalty():
    out = language_penalty(["abc中文", "", "plain", "全中文"], coefficient=0.1)
    np.testing.assert_allclose(out, [-0.1 * 2 / 5, 0.0, 0.0, -0.1], rtol=1e-6)


def test_maye_penalty_uses_last_valid_index():
    # MAYE compares seq_lens = length - 1 with min_response_length: a 2-token response (EOS included)
    # passes min 1; a 1-token one does not.
    completions = ["a", "b", "c", "d"]
    lengths = np.array([1, 2, 19, 2048])
    truncated = np.array([False, False, False, True])
    np.testing.assert_array_equal(maye_penalty(completions, lengths=lengths, truncated=truncated), [1, 0, 0, 1])
    np.testing.assert_array_equal(
        maye_penalty(completions, lengths=lengths, truncated=truncated, min_response_length=18,
                     penalise_no_eos=False), [1, 1, 0, 0])


def _dapo_reference(length, max_length, cache):
    """DAPO eq. 13, written case by case."""
    if length <= max_length - cache:
        return 0.0
    if length <= max_length:
        return ((max_length - cache) - length) / cache
    return -1.0


def test_soft_overlong_matches_dapo():
    lengths = np.arange(0, 40)
    out = soft_overlong(["x"] * 40, lengths=lengths, max_length=30, buffer_length=8)
    np.testing.assert_allclose(out, [_dapo_reference(n, 30, 8) for n in lengths], atol=1e-7)
    assert out[22] == 0.0 and out[26] == pytest.approx(-0.5) and out[30] == -1.0 and out[39] == -1.0
    half = soft_overlong(["x"], lengths=[30], max_length=30, buffer_length=8, penalty_factor=0.5)
    assert half[0] == pytest.approx(-0.5)


def test_length_penalties_name_missing_or_bad_inputs():
    with pytest.raises(ValueError, match=r"lengths is required"):
        soft_overlong(["x"], max_length=10, buffer_length=2)
    with pytest.raises(ValueError, match=r"lengths: expected shape \(2,\)"):
        maye_penalty(["x", "y"], lengths=[1, 2, 3], truncated=[False, False])
    with pytest.raises(ValueError, match="buffer_length"):
        soft_overlong(["x"], lengths=[1], max_length=10, buffer_length=0)


# ------------------------------------------------------------------------------------- composition
def length_bonus(completions, examples, *, scale=1.0):
    """A plugin reward: the characters of each completion, scaled."""
    return [scale * len(c) for c in completions]


def uses_context(completions, examples, **context):
    return np.asarray(context["lengths"], np.float32)


def wrong_shape(completions, examples):
    return np.zeros((len(completions), 2))


def gives_nan(completions, examples):
    return [float("nan")] * len(completions)


COMPLETIONS = [r"<think>4</think> \boxed{4}", r"<think>x</think> \boxed{5}", "Answer: 4", "4中"]
EXAMPLES = [{"answer": "4"}, {"answer": "4"}, {"answer": "4"}, {"answer": "4"}]


def test_weighted_total_and_every_component(judge):
    spec = {"weights": {"accuracy": 1.0, "r1_format": 0.5, "language": 1.0}}
    out = compute_rewards(COMPLETIONS, EXAMPLES, spec, judge=judge)
    assert set(out) == {"accuracy", "r1_format", "language", "total"}
    np.testing.assert_array_equal(out["accuracy"], [1, 0, 1, 0])
    np.testing.assert_array_equal(out["r1_format"], [1, 1, 0, 0])
    np.testing.assert_allclose(out["language"], [0, 0, 0, -0.1 * 1 / 2])
    np.testing.assert_allclose(out["total"], out["accuracy"] + 0.5 * out["r1_format"] + out["language"])
    assert all(v.dtype == np.float32 and v.shape == (4,) for v in out.values())


def test_maye_recipe_with_penalty_override(judge):
    # MAYE: acc + format + language, then score := -0.1 where there is no EOS or the response is too short.
    spec = {"weights": {"accuracy": 1.0, "maye_format": 1.0, "language": 1.0},
            "overrides": {"maye_penalty": -0.1},
            "params": {"maye_penalty": {"min_response_length": 1}}}
    out = compute_rewards(COMPLETIONS, EXAMPLES, spec, judge=judge, lengths=[10, 10, 1, 10],
                          truncated=[False, True, False, False])
    np.testing.assert_array_equal(out["maye_penalty"], [0, 1, 1, 0])
    np.testing.assert_allclose(out["total"], [2.0, -0.1, -0.1, -0.05])


def test_spec_forms_are_equivalent(judge):
    ml_collections = pytest.importorskip("ml_collections")
    forms = [{"accuracy": 1.0, "r1_format": 0.5}, [{"accuracy": 1.0}, {"r1_format": 0.5}],
             [("accuracy", 1.0), ("r1_format", 0.5)],
             ml_collections.ConfigDict({"weights": {"accuracy": 1.0, "r1_format": 0.5}})]
    totals = [compute_rewards(COMPLETIONS, EXAMPLES, f, judge=judge)["total"] for f in forms]
    for t in totals[1:]:
        np.testing.assert_array_equal(t, totals[0])


def test_plugin_rewards_with_params_and_context():
    spec = {"weights": {f"{__name__}:length_bonus": 2.0, f"{__name__}:uses_context": 1.0},
            "params": {f"{__name__}:length_bonus": {"scale": 0.5}}}
    out = compute_rewards(["ab", "abcd"], [{}, {}], spec, lengths=[7, 9])
    np.testing.assert_allclose(out[f"{__name__}:length_bonus"], [1.0, 2.0])
    np.testing.assert_allclose(out["total"], [2 * 1.0 + 7, 2 * 2.0 + 9])


def test_plugins_name_reward_functions_for_configs_whose_keys_cannot_hold_dots():
    spec = {"weights": {"bonus": 2.0, "accuracy": 0.0}, "params": {"bonus": {"scale": 0.5}},
            "plugins": {"bonus": f"{__name__}:length_bonus"}}
    out = compute_rewards(["ab", "abcd"], [{"answer": "1"}, {"answer": "2"}], spec)
    np.testing.assert_allclose(out["bonus"], [1.0, 2.0])
    np.testing.assert_allclose(out["total"], [2.0, 4.0])
    with pytest.raises(ValueError, match=r"plugins\['bonus'\]: expected 'package.module:function'"):
        RewardSet({**spec, "plugins": {"bonus": "no_colon"}})
    with pytest.raises(ValueError, match=r"plugins\['bonus'\]: reward .*has no attribute 'nothing'"):
        RewardSet({**spec, "plugins": {"bonus": f"{__name__}:nothing"}})
    with pytest.raises(ValueError, match=r"plugins: \['accuracy'\] are built-in reward names"):
        RewardSet({**spec, "plugins": {"bonus": f"{__name__}:length_bonus", "accuracy": f"{__name__}:length_bonus"}})


def test_reward_set_reuses_its_judge_and_closes_it():
    rewards = RewardSet({"weights": {"accuracy": 1.0}, "judge": {"mode": "chartqa"}})
    assert rewards.judge.config.mode == "chartqa"
    np.testing.assert_array_equal(rewards(["Answer: 10.4"], [{"answer": "10"}])["accuracy"], [1.0])
    np.testing.assert_array_equal(rewards(["Answer: 11"], [{"answer": "10"}])["accuracy"], [0.0])
    rewards.close()


# DyME's training reward (checker.get_answer_reward): split_initial_context, then eval_one_chart with
# tolerance 0; its evaluation (eval_chartqa.py) and ChartQA's protocol keep 5%.
DYME_TRAIN_JUDGE = {"mode": "chartqa", "relaxed_tol": 0.0, "chartqa_parser": "dyme"}
CHARTQA_EVAL_JUDGE = {"mode": "chartqa"}
DYME_EVAL_JUDGE = {"mode": "chartqa", "chartqa_parser": "dyme"}


@pytest.mark.parametrize("response,gold,eval_ok,train_ok", [
    ("The bar reads about 105.\nAnswer: 104.9", "100", True, False),     # 4.9% off: relaxed only
    ("Answer: 105.1", "100", False, False),                              # 5.1% off: neither
    ("Answer: 100.", "Answer: 100", True, True),                          # trailing dot, flagged gold
    ("Answer: 100\nThe tallest bar is 100.", "100", True, False),         # DyME reads all the rest
    ("Answer: 1,000", "1000", True, False),                               # float("1,000") fails
    ("Answer: **2017**", "2017", True, False),                            # markdown stays in DyME's
    ("Answer: 50%", "0.5", True, True),                                   # 50% is 0.5 for both
    ("Answer: 50%", "50", True, False),                                   # ... and never 50 for DyME
    ("Answer: 0.0", "0", True, False),                                    # a 0 prediction: text equality
    ("answer: YES", "Yes", True, True),
    ("Answer: b) Paris", "B", True, False),                               # ChartQA's letter rule only
    ("The answer is 7", "7", False, False),                               # no flag: the whole text
])
def test_training_and_evaluation_judges_are_separate_settings(response, gold, eval_ok, train_ok):
    """Relaxed accuracy changes which groups DyME memorises, so training must use DyME's exact judge
    (`rewards.judge`) while evaluation keeps ChartQA's 5% relaxed accuracy (`eval.judge`)."""
    with RewardSet({"weights": {"accuracy": 1.0}, "judge": DYME_TRAIN_JUDGE}) as train, \
            RewardSet({"weights": {"accuracy": 1.0}, "judge": CHARTQA_EVAL_JUDGE}) as evaluate:
        assert evaluate([response], [{"answer": gold}])["accuracy"][0] == float(eval_ok)
        assert train([response], [{"answer": gold}])["accuracy"][0] == float(train_ok)


def test_dyme_evaluation_measures_the_change_against_the_prediction():
    """eval_chartqa.py calls relaxed_correctness(target=prediction, prediction=gold): the 5% is of the
    prediction, so 95.1 against 100 (4.9% of the gold, 5.15% of the prediction) fails there."""
    with AnswerJudge(CHARTQA_EVAL_JUDGE) as chartqa, AnswerJudge(DYME_EVAL_JUDGE) as dyme:
        assert chartqa.judge("Answer: 95.1", "100").correct and not dyme.judge("Answer: 95.1", "100").correct
        assert chartqa.judge("Answer: 104.9", "100").correct and dyme.judge("Answer: 104.9", "100").correct
        verdict = dyme.judge("Reasoning.\nANSWER: 2017.", "Answer: 2017")
        assert verdict.correct and verdict.extracted == "2017" and verdict.gold_normalized == "2017"
    with pytest.raises(ValueError, match="chartqa_parser"):
        AnswerJudge({"mode": "chartqa", "chartqa_parser": "strict"})


def test_accuracy_answer_key(judge):
    out = compute_rewards([r"\boxed{20}"], [{"answer": "3", "solution": r"so \boxed{20}"}],
                          {"weights": {"accuracy": 1.0}, "params": {"accuracy": {"answer_key": "solution"}}},
                          judge=judge)
    assert out["accuracy"][0] == 1.0
    with pytest.raises(KeyError, match="example 0 has no field 'gold'"):
        compute_rewards(["x"], [{"answer": "1"}], {"weights": {"accuracy": 1.0},
                                                   "params": {"accuracy": {"answer_key": "gold"}}}, judge=judge)


@pytest.mark.parametrize("spec,message", [
    ({"acuracy": 1.0}, r"reward 'acuracy': unknown name; built-ins are"),
    ({"no_such_module_xyz:fn": 1.0}, r"cannot import module 'no_such_module_xyz'"),
    ({f"{__name__}:missing_fn": 1.0}, r"has no attribute 'missing_fn'"),
    ({f"{__name__}:COMPLETIONS": 1.0}, r"'COMPLETIONS' is a list, not a function"),
    ({"r1_format": "high"}, r"rewards\['r1_format'\]: expected a finite number"),
    ([{"r1_format": 1.0}, {"r1_format": 2.0}], r"'r1_format' is listed twice"),
    ([{"r1_format": 1.0, "maye_format": 1.0}], r"rewards\[0\]: expected \{name: weight\}"),
    ({"weights": {"r1_format": 1.0}, "params": {"maye_format": {}}}, r"params: \['maye_format'\] are not in"),
    ({"weights": {"r1_format": 1.0}, "params": {"r1_format": {"bogus": 1}}}, r"reward 'r1_format': bad params"),
    ({"weights": {"soft_overlong": 1.0}}, r"missing params \['max_length', 'buffer_length'\]"),
    ({"weights": {}}, r"no rewards given"),
])
def test_spec_errors_name_the_entry(spec, message):
    with pytest.raises(ValueError, match=message):
        RewardSet(spec)


def test_bad_return_values_name_the_reward():
    with pytest.raises(ValueError, match=rf"reward '{__name__}:wrong_shape' returned shape \(2, 2\); expected \(2,\)"):
        compute_rewards(["a", "b"], [{}, {}], {f"{__name__}:wrong_shape": 1.0})
    with pytest.raises(ValueError, match=r"non-finite values at indices \[0, 1\]"):
        compute_rewards(["a", "b"], [{}, {}], {f"{__name__}:gives_nan": 1.0})
    with pytest.raises(ValueError, match="2 completions but 1 examples"):
        compute_rewards(["a", "b"], [{}], {"r1_format": 1.0})
    with pytest.raises(ValueError, match="lengths is required"):
        compute_rewards(["a"], [{}], {"weights": {"soft_overlong": 1.0},
                                      "params": {"soft_overlong": {"max_length": 8, "buffer_length": 2}}})


# ----------------------------------------------------------------------------------------- audit CLI
def _audit(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "vrl_jax.rewards.audit", *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=cwd)


def test_audit_cli_end_to_end(tmp_path):
    rows = [
        {"prediction": r"so \boxed{12 \text{ cm}^2}", "answer": "12", "expected": True},
        {"prediction": r"\boxed{\sqrt{12}}", "answer": r"2\sqrt{3}", "expected": True},
        {"prediction": "The answer is 7.", "answer": "7", "expected": True},
        {"prediction": r"\boxed{5}", "answer": ["4", "5"]},
    ]
    path = tmp_path / "audit.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    result = _audit(str(path), "--timeout", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("[line 1] CORRECT method=numeric") and "normalized='12'" in lines[0]
    assert "extracted='\\\\sqrt{12}'" in lines[1] and "method=math_verify" in lines[1]
    assert "WRONG" in lines[2] and "DISAGREE" in lines[2]
    assert "agreement with expected: 2/3 (66.7%)" in result.stdout
    assert "throughput:" in result.stdout and "samples/s" in result.stdout
    assert _audit(str(path), "--fail-on-disagreement").returncode == 1


def test_audit_cli_names_the_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prediction": "a", "answer": "1"}\n\n{"prediction": "b"}\n')
    result = _audit(str(path), "--mode", "chartqa")
    assert result.returncode == 2  # one paragraph, wrapped to the terminal: compare with the line breaks undone
    assert f"{path}:3: missing field 'answer'" in " ".join(result.stderr.split())
    path.write_text('{"prediction": "a", "answer": "1", "expected": "yes"}\n')
    assert "bad.jsonl:1: field 'expected' must be true or false" in " ".join(_audit(str(path)).stderr.split())
