"""DyME's visual supervision, pluggable: a checker (the thinking reward: DyME's lexical F1 against
the reference rationale, or does the reasoning state the image's facts correctly?) and a refiner
(the memorisation target: the reference rationale as it is, or rewritten to be grounded in the image).

Typical use in a training loop::

    from vrl_jax.rewards.visual import make_visual_supervision

    vs = make_visual_supervision({"kind": "lexical"}, answer_format="flag")  # or "rule_based", "http"
    thinking = vs.checker.check(completions, examples)        # .scores [B], .fallback [B]
    targets = vs.refiner.refine(examples).texts               # each ends with its answer line
    log(vs.checker.stats.snapshot(), vs.refiner.stats.snapshot())
    vs.close()
"""
from vrl_jax.rewards.visual.base import (ANSWER_FLAG, ANSWER_FORMATS, DEFAULT_KIND, KINDS, CheckResult,
                                         Checker, IdentityRefiner, RefineResult, Refiner,
                                         SupervisionStats, VisualExample, VisualSupervision,
                                         answer_line, as_visual_example, flatten_facts,
                                         hint_then_answer, make_visual_supervision,
                                         strip_final_answer, unchanged_reference, with_answer_line)
from vrl_jax.rewards.visual.http_client import HttpChecker, HttpConfig, HttpRefiner
from vrl_jax.rewards.visual.keywords import ApproxExtractor, SpacyExtractor, make_extractor
from vrl_jax.rewards.visual.lexical import (LexicalChecker, LexicalConfig, LexicalReport, keyword_f1,
                                            thinking_part)
from vrl_jax.rewards.visual.rule_based import (FactReport, RuleBasedChecker, RuleBasedConfig,
                                               RuleBasedRefiner, assess)

__all__ = [
    "ANSWER_FLAG", "ANSWER_FORMATS", "ApproxExtractor", "CheckResult", "Checker", "DEFAULT_KIND",
    "FactReport", "HttpChecker", "HttpConfig", "HttpRefiner", "IdentityRefiner", "KINDS",
    "LexicalChecker", "LexicalConfig", "LexicalReport", "RefineResult", "Refiner", "RuleBasedChecker",
    "RuleBasedConfig", "RuleBasedRefiner", "SpacyExtractor", "SupervisionStats", "VisualExample",
    "VisualSupervision", "answer_line", "as_visual_example", "assess", "flatten_facts",
    "hint_then_answer", "keyword_f1", "make_extractor", "make_visual_supervision",
    "strip_final_answer", "thinking_part", "unchanged_reference", "with_answer_line",
]
