"""DyME's visual supervision, pluggable: a checker (thinking reward: does the reasoning state the
image's facts correctly?) and a refiner (a memorisation target grounded in the image).

Typical use in a training loop::

    from vrl_jax.rewards.visual import make_visual_supervision

    vs = make_visual_supervision({"kind": "rule_based"})      # or {"kind": "http", ...}
    thinking = vs.checker.check(completions, examples)        # .scores [B], .fallback [B]
    targets = vs.refiner.refine(examples).texts               # each ends with its answer line
    log(vs.checker.stats.snapshot(), vs.refiner.stats.snapshot())
    vs.close()
"""
from vrl_jax.rewards.visual.base import (ANSWER_FLAG, ANSWER_FORMATS, KINDS, CheckResult, Checker,
                                         RefineResult, Refiner, SupervisionStats, VisualExample,
                                         VisualSupervision, answer_line, as_visual_example,
                                         flatten_facts, make_visual_supervision, strip_final_answer,
                                         unchanged_reference, with_answer_line)
from vrl_jax.rewards.visual.http_client import HttpChecker, HttpConfig, HttpRefiner
from vrl_jax.rewards.visual.rule_based import (FactReport, RuleBasedChecker, RuleBasedConfig,
                                               RuleBasedRefiner, assess)

__all__ = [
    "ANSWER_FLAG", "ANSWER_FORMATS", "KINDS", "CheckResult", "Checker", "FactReport", "HttpChecker",
    "HttpConfig", "HttpRefiner", "RefineResult",
    "Refiner", "RuleBasedChecker", "RuleBasedConfig", "RuleBasedRefiner", "SupervisionStats",
    "VisualExample", "VisualSupervision", "answer_line", "as_visual_example", "assess", "flatten_facts",
    "make_visual_supervision", "strip_final_answer", "unchanged_reference", "with_answer_line",
]
