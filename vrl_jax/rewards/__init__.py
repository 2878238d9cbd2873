"""Rewards for RL with verifiable answers: the answer judge (composition follows)."""
from vrl_jax.rewards.chartqa import relaxed_correct, relaxed_match
from vrl_jax.rewards.extract import after_flag, extract_answer, last_boxed
from vrl_jax.rewards.judge import AnswerJudge, JudgeConfig, Verdict
from vrl_jax.rewards.normalize import normalize_answer, parse_number
from vrl_jax.rewards.symbolic import Check, CheckResult, SymbolicChecker, pathological_reason

__all__ = [
    "AnswerJudge", "Check", "CheckResult", "JudgeConfig", "SymbolicChecker", "Verdict", "after_flag",
    "extract_answer", "last_boxed", "normalize_answer", "parse_number", "pathological_reason",
    "relaxed_correct", "relaxed_match",
]
