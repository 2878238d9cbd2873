"""MAYE's accuracy judge (``maye/datasets/math.py::MathGenerationDataset.judge``), for reproduction runs.

MAYE scores ``math_verify OR AutoScoringJudge OR number_judge`` on the *last sentence containing
"boxed"* of prediction and solution, with math-verify's arguments in the reversed order
``verify(parse(prediction), parse(solution))``. This module holds the string-level parts; the
math-verify call runs in the judge's time-limited server (see ``judge.py``).

One approximation: MAYE hands AutoScoringJudge whole sentences and never extracts the box, so
its sympy branches cannot parse them (a checked call, "The answer is \\boxed{20}" against
"\\boxed{20}", gives False) and the judge reduces to string comparison after its symbol clean-up;
``asj_equal`` implements that string-level behaviour, not the sympy branches.
"""
from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"(?<!\d)[.!?](?!\d)")
# MAYE's LaTeX fix-ups (`latex_main_body_rule_process`), applied to prediction and solution alike,
# in MAYE's order, which matters: `\textcirc` is replaced before `\textcircles`, so the latter
# becomes `\circles` (its own rule never fires), and `\texto` also rewrites `\textoverline`.
_MAYE_FIXES = (
    (r"\text{circ}", r"\circ"), (r"\text{degree}", r"\circ"), (r"\{circ}", r"\circ"), (r"\{degree}", r"\circ"),
    (r"\textcirc", r"\circ"), (r"\textdegree", r"\circ"), (r"\text{circles}", r"\circ"),
    (r"\textcircles", r"\circ"), (r"\text{o}", r"\circ"), (r"\texto", r"\circ"), (r"\bigcirc", r"\circ"),
    (r"\bullet", r"\circ"), ("{sqrt}", r"\sqrt"), ("{radical}", r"\sqrt"), ("{°}", r"\circ"),
    (r"\,\text{cm}", "cm"),
)
# AutoScoringJudge's symbol map (MM-Math flavour) and unit removals.
_ASJ_SYMBOLS = (
    (r"\left", ""), (r"\right", ""), ("厘米", ""), ("，", ","), ("$", ""), ("（", "("), ("）", ")"),
    (r"\infty", "oo"), (r"\colon ", ":"), ("＋", "+"), (r"\, ", ""), (r"\,", ""), (r"^\circ", ""),
    (r"^{\circ}", ""),
)
_ASJ_UNITS = (r"\text{cm}^2", r"\text{cm}", r"\,cm", r"\text{ cm}", "cm", r"\text{分米}^2", "cm^{2}",
              r"\ \text{m}", r"\text{米}")
_CJK = re.compile(r"[\u4e00-\u9fff]+")
_NUMBER_JUDGE = re.compile(r"\\boxed\{(\d*?)(?:\^|$)")


def maye_preprocess(text: str) -> str:
    """The last sentence containing "boxed" (``""`` if none), with MAYE's LaTeX fix-ups.

    Sentences end at ``.``, ``!`` or ``?`` not adjacent to a digit, so ``3.5`` stays whole.
    """
    kept = ""
    for sentence in _SENTENCE_END.split(text):
        if "boxed" in sentence:
            kept = sentence
    for old, new in _MAYE_FIXES:
        kept = kept.replace(old, new)
    return kept.strip()


def maye_solution(gold: str) -> str:
    """MAYE's ``solution`` field is ``\\boxed{answer}``; a bare answer gets that wrapping."""
    return gold if "boxed" in gold else "\\boxed{" + gold + "}"


def _asj_clean(expr: str) -> str:
    for unit in _ASJ_UNITS:
        expr = expr.replace(unit, "")
    expr = re.sub(r"(.+)m$", r"\1", expr.strip())
    if "\\in " in expr:
        expr = expr.split("\\in ")[1]
    for old, new in _ASJ_SYMBOLS:
        expr = expr.replace(old, new)
    expr = re.sub(r"(\\sin|\\cos|\\tan)(\d+)", r"\1((\2/180)\\pi)", expr)
    expr = expr.strip("\n,.:;^_=+`!@#%^&*~，。")
    return re.sub(r"\\(?:mathrm|mathbf)\{~?([^}]*)\}", r"\1", expr)


def _split_top_level_commas(expr: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(expr):
        depth += ch in "(["
        depth -= ch in ")]"
        if ch == "," and depth == 0:
            parts.append(expr[start:i].strip())
            start = i + 1
    if start < len(expr):
        parts.append(expr[start:].strip())
    return parts


def _expand_pm(items: list[str]) -> list[str]:
    out = []
    for item in items:
        if "\\pm" in item:
            out += [item.replace("\\pm", "+"), item.replace("\\pm", "-")]
        else:
            out.append(item)
    return out


def asj_equal(prediction: str, solution: str) -> bool:
    """AutoScoringJudge as MAYE calls it on whole sentences: clean-up, then string matching.

    Exact match after clean-up, or after removing CJK characters, order-free over top-level
    comma-separated items (``\\pm`` expanded).
    """
    gold, pred = _asj_clean(solution), _asj_clean(prediction)
    if gold == pred:
        return True
    gold = gold if _CJK.fullmatch(gold) else _CJK.sub("", gold)
    pred = pred if _CJK.fullmatch(pred) else _CJK.sub("", pred)
    gold_items = _expand_pm(_split_top_level_commas(gold))
    pred_items = _expand_pm(_split_top_level_commas(pred))
    if len(gold_items) != len(pred_items):
        return False
    remaining = list(pred_items)
    for item in gold_items:
        if item == "" or item not in remaining:
            return False
        remaining.remove(item)
    return True


def number_judge(prediction: str, solution: str) -> bool:
    """MAYE's digit check: ``\\boxed{<digits>`` followed by ``^`` or the end, equal on both sides."""
    p, s = _NUMBER_JUDGE.search(prediction), _NUMBER_JUDGE.search(solution)
    return bool(p and s and p.group(1) == s.group(1))
