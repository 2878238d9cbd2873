"""Rewards for RL with verifiable answers: the answer judge, format rewards, penalties, composition.

Typical use in a training loop::

    from vrl_jax.rewards import RewardSet

    rewards = RewardSet({"weights": {"accuracy": 1.0, "r1_format": 0.1},
                         "judge": {"timeout_s": 2.0}})
    out = rewards(completions, examples, lengths=lengths, truncated=truncated)
    # out == {"accuracy": [B], "r1_format": [B], "total": [B]}, float32
    rewards.close()

Audit a judge on a JSONL file: ``python -m vrl_jax.rewards.audit FILE.jsonl --mode default``.
"""
from vrl_jax.rewards.chartqa import relaxed_correct, relaxed_match
from vrl_jax.rewards.compose import BUILTINS, RewardSet, RewardSpec, accuracy, compute_rewards, resolve_reward
from vrl_jax.rewards.extract import after_flag, extract_answer, last_boxed
from vrl_jax.rewards.formatting import answer_flag_format, is_r1_formatted, maye_format, r1_format
from vrl_jax.rewards.judge import AnswerJudge, JudgeConfig, Verdict
from vrl_jax.rewards.normalize import normalize_answer, parse_number
from vrl_jax.rewards.penalties import language_penalty, maye_penalty, soft_overlong
from vrl_jax.rewards.symbolic import Check, CheckResult, SymbolicChecker, pathological_reason

__all__ = [
    "AnswerJudge", "BUILTINS", "Check", "CheckResult", "JudgeConfig", "RewardSet", "RewardSpec",
    "SymbolicChecker", "Verdict", "accuracy", "after_flag", "answer_flag_format", "compute_rewards",
    "extract_answer", "is_r1_formatted", "language_penalty", "last_boxed", "maye_format", "maye_penalty",
    "normalize_answer", "parse_number", "pathological_reason", "r1_format", "relaxed_correct",
    "relaxed_match", "resolve_reward", "soft_overlong",
]
