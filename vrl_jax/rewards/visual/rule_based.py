"""An offline checker/refiner pair for data whose visual facts are known exactly (synthgeo: the
generator's parameters), with no model server.

Checker rule, per fact ``name -> value`` of the example (``flatten_facts``):

- A *numeric* fact (a number, or a string such as ``"9/2"`` or ``"0.25"``) is
  - **contradicted** if the reasoning binds the fact's name to a different value ("the width is
    5", "A = 3", "radius r = 4" when the fact says otherwise), even if the right value also
    appears elsewhere;
  - **correct** if every value bound to its name is right, or, with no binding, if the value is
    mentioned anywhere ("the rectangle is 7 by 4" states width 7 and height 4);
  - **missing** otherwise.
- A *categorical* fact (any other string, e.g. ``relation: "corresponding"``) is correct when its
  words occur ("corresponding angles"), else missing; it cannot be contradicted.

``score = clip((correct - contradiction_penalty * contradicted) / n_facts, 0, 1)``: omitting a fact
costs its share, stating it wrongly costs a share more (penalty 1 by default), so a wrong
observation is worse than none. An example with no facts gets the fallback (reason ``no_facts``).

Mentions are read after normalising formatting: "7 cm", "35°", "35^\\circ", "$35^{\\circ}$",
"\\frac{9}{2}", "9/2", "4.5", "25%" (also 1/4), "6x4", number words zero..twenty. A decimal with k
places matches a value that rounds to it at k places (0.33 states 1/3); integers and fractions
match exactly. A binding is the fact's name (or an alias), an optional one-letter symbol, then
connectors (``=``, ``:``, is, equals, of, measures, labelled, reads, has value/length), then a
number; a name after an arithmetic operator or a number before one ("E = 1 + 5") is an
expression, not a binding. One-letter names (bars "A", "B") are case-sensitive and need a
connector. Everything here is regex scans linear in the text (no nested quantifiers).

The refiner writes Goal / Observation / Reasoning / Conclusion (DyME's default template): the
observation states every fact (so this checker gives it full marks), the reasoning keeps the
hint's sentences except those that contradict a fact, and the last line is the answer.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from vrl_jax.rewards.visual.base import (ERROR, NO_FACTS, CheckResult, RefineResult,
                                         SupervisionStats, VisualSupervision,
                                         as_visual_example, check_answer_format,
                                         check_fallback_score, config_from_fields, fallback_value,
                                         reasoning_part, refine_each, strip_final_answer,
                                         with_answer_line)

# ---------------------------------------------------------------------------------------------
# Normalising formatting

_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_SHORT = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree\b|\\circ\b")
_WRAPPERS = re.compile(r"\\(?:text|mathrm|mathbf|textbf|operatorname|mbox)\s*\{([^{}]*)\}")
_TIMES = re.compile(r"\\times\b|\\cdot\b|[×·∗]")
_DIGIT_X_DIGIT = re.compile(r"(\d)\s*[xX]\s*(?=\d)")
_SPACES = re.compile(r"\\[,;:! ]|~|\$|\\[()\[\]]|\\left\b|\\right\b")
_COMMAND = re.compile(r"\\([A-Za-z]+)")
_PLAIN_NUMBER = re.compile(r"\s*-?\d+(?:\.\d+)?\s*")


def _frac(m: re.Match) -> str:
    num, den = m.group(1), m.group(2)
    if _PLAIN_NUMBER.fullmatch(num) and _PLAIN_NUMBER.fullmatch(den):
        return f" {num.strip()}/{den.strip()} "
    return f" ({num})/({den}) "


def normalize_text(text: str) -> str:
    """LaTeX and unicode number formatting reduced to plain ASCII the mention scanner reads."""
    text = text.replace("\\%", "%").replace("−", "-").replace("\u2212", "-")
    text = _FRAC.sub(_frac, text)
    text = _FRAC_SHORT.sub(r" \1/\2 ", text)
    text = _DEGREES.sub(" degrees ", text)
    text = _WRAPPERS.sub(r" \1 ", text)
    text = _TIMES.sub(" * ", text)
    text = _DIGIT_X_DIGIT.sub(r"\1 * ", text)
    text = _SPACES.sub(" ", text)
    text = _COMMAND.sub(r" \1 ", text)  # \angle A -> angle A, \pi -> pi, \sqrt{2} -> sqrt 2
    return text.replace("{", " ").replace("}", " ")


# ---------------------------------------------------------------------------------------------
# Number mentions

NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                "fourteen fifteen sixteen seventeen eighteen nineteen twenty").split()
_MENTION = re.compile(
    r"(?<![\w.])(?P<num>\d+(?:\.\d+)?)(?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?(?P<pct>\s*%)?"
    r"|\b(?P<word>" + "|".join(NUMBER_WORDS) + r")\b", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Mention:
    """A number in the text. ``candidates`` are ``(value, tolerance)`` pairs it can stand for when
    scanning for a fact anywhere: the value; a percentage also as a share; a fraction also its
    numerator and denominator ("18/2" mentions 18). The first ``n_bindable`` are what it can mean
    when bound to a name ("B = 25%" states B = 1/4; "r = 18/2" states r = 9, not 18)."""

    start: int
    end: int
    text: str
    candidates: tuple[tuple[Fraction, Fraction], ...]
    n_bindable: int = 1

    @staticmethod
    def _close(value: Fraction, tol: Fraction, target: Fraction) -> bool:
        # Strict for rounded decimals: 0.3 does not state 1/4 (0.25 is as close to 0.2).
        return value == target if tol == 0 else abs(value - target) < tol

    def states(self, target: Fraction) -> bool:
        """Whether this mention, anywhere in the text, can stand for ``target``."""
        return any(self._close(v, tol, target) for v, tol in self.candidates)

    def binds(self, target: Fraction) -> bool:
        """Whether this mention, bound to a fact's name, states ``target``."""
        return any(self._close(v, tol, target) for v, tol in self.candidates[:self.n_bindable])


def _decimal(s: str) -> tuple[Fraction, Fraction]:
    """The value and its rounding tolerance: '0.33' -> (33/100, 1/200); '7' -> (7, 0)."""
    places = len(s.split(".")[1]) if "." in s else 0
    return Fraction(s), (Fraction(1, 2 * 10 ** places) if places else Fraction(0))


def _is_negative(text: str, start: int) -> bool:
    """A '-' right before the digits is a sign unless it follows an operand ('180-50', 'x - 3')."""
    if start == 0 or text[start - 1] != "-":
        return False
    before = text[:start - 1].rstrip()
    return not before or not (before[-1].isalnum() or before[-1] in ")]}")


def find_mentions(text: str) -> list[Mention]:
    """Every number in normalised ``text``, in order."""
    out = []
    for m in _MENTION.finditer(text):
        if m.group("word"):
            value = Fraction(NUMBER_WORDS.index(m.group("word").lower()))
            out.append(Mention(m.start(), m.end(), m.group(0), ((value, Fraction(0)),)))
            continue
        sign = -1 if _is_negative(text, m.start()) else 1
        num, tol = _decimal(m.group("num"))
        candidates, bindable = [], 1
        if m.group("den") is not None:
            den, _ = _decimal(m.group("den"))
            if den != 0:
                candidates.append((sign * num / den, Fraction(0)))
            else:
                bindable = 0  # 'x/0' states nothing when bound
            candidates += [(sign * num, tol), (den, Fraction(0))]
        else:
            candidates.append((sign * num, tol))
            if m.group("pct"):
                candidates.append((sign * num / 100, tol / 100))
                bindable = 2
        start = m.start() - (1 if sign < 0 else 0)
        out.append(Mention(start, m.end(), text[start:m.end()], tuple(candidates), bindable))
    return out


# ---------------------------------------------------------------------------------------------
# Facts and bindings


def fact_number(value: Any) -> Fraction | None:
    """A fact's exact value, or None for a categorical fact."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, Fraction)):
        return Fraction(value)
    if isinstance(value, float):
        return Fraction(repr(value))  # 0.1 -> 1/10, not the binary expansion
    if isinstance(value, str):
        s = value.strip().replace(" ", "")
        if re.fullmatch(r"-?\d+(?:\.\d+)?(?:/\d+(?:\.\d+)?)?", s):
            try:
                num, _, den = s.partition("/")
                return Fraction(num) / (Fraction(den) if den else 1)
            except ZeroDivisionError:
                return None
    return None


def default_aliases(name: str) -> tuple[str, ...]:
    """Phrases that name a fact in text: 'given_angle' -> ('given angle',); 'A' -> ('A',).
    List elements ('given[0]') have none: they are checked by value only."""
    last = name.rsplit(".", 1)[-1]
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9 _-]*", last):
        return ()
    return (last.replace("_", " ").strip(),)


_CONNECTOR = (r"(?:=|:|\bis\b|\bequals\b|\bof\b|\bmeasures\b|\blabell?ed\b|\breads\b"
              r"|\bhas\s+(?:a\s+)?(?:value|length)(?:\s+of)?\b)")
_OPERATORS = "+-*/^="


@functools.lru_cache(maxsize=1024)
def _binding_pattern(alias: str) -> re.Pattern[str]:
    if len(alias) == 1:  # bar 'A': case-sensitive, and 'A 10 by 10 grid' is not a binding
        head, flags, connectors = rf"(?<![\w']){re.escape(alias)}(?![\w'])", 0, "{1,3}"
    else:
        words = [re.escape(w) for w in re.split(r"[\s_-]+", alias) if w]
        head, flags, connectors = r"\b" + r"[\s_-]+".join(words) + r"\b", re.IGNORECASE, "{0,3}"
    return re.compile(head + r"(?:\s+of\s+the\s+[a-z]+)?(?:\s+[A-Za-z](?!\w))?"
                      + rf"\s*(?:{_CONNECTOR}\s*){connectors}", flags)


def bound_mentions(text: str, alias: str, by_start: Mapping[int, Mention]) -> list[Mention]:
    """Mentions that ``text`` binds to ``alias`` (see the module docstring)."""
    out = []
    for m in _binding_pattern(alias).finditer(text):
        mention = by_start.get(m.end())  # a signed mention starts at its '-'
        if mention is None:
            continue
        before = text[:m.start()].rstrip()
        after = text[mention.end:].lstrip()
        if (before and before[-1] in _OPERATORS) or (after and after[0] in _OPERATORS):
            continue  # part of an expression ('D + E = 1 + 5'), not a statement of E
        out.append(mention)
    return out


def _phrase_present(text_lower: str, phrase: str) -> bool:
    words = [re.escape(w) for w in re.split(r"[\s_-]+", phrase.lower()) if w]
    return bool(words) and re.search(r"\b" + r"[\s_-]+".join(words) + r"\b", text_lower) is not None


@dataclasses.dataclass(frozen=True)
class FactReport:
    """Per-sample outcome: fact names correct / missing, and ``(name, stated, expected)`` for each
    contradicted fact."""

    correct: tuple[str, ...]
    missing: tuple[str, ...]
    contradicted: tuple[tuple[str, str, str], ...]

    def score(self, penalty: float) -> float:
        n = len(self.correct) + len(self.missing) + len(self.contradicted)
        if n == 0:
            return float("nan")
        return float(min(1.0, max(0.0, (len(self.correct) - penalty * len(self.contradicted)) / n)))


def assess(text: str, facts: Mapping[str, Any],
           aliases: Mapping[str, Sequence[str]] | None = None) -> FactReport:
    """Check ``text`` against ``facts`` by the rule in the module docstring."""
    norm = normalize_text(text)
    mentions = find_mentions(norm)
    by_start = {m.start: m for m in mentions}
    lower = norm.lower()
    correct, missing, contradicted = [], [], []
    for name, raw in facts.items():
        target = fact_number(raw)
        if target is None:
            (correct if _phrase_present(lower, str(raw)) else missing).append(name)
            continue
        names = default_aliases(name) + tuple((aliases or {}).get(name, ()))
        bound = [m for alias in names for m in bound_mentions(norm, alias, by_start)]
        wrong = [m for m in bound if not m.binds(target)]
        if wrong:
            contradicted.append((name, wrong[0].text.strip(), str(raw)))
        elif bound or any(m.states(target) for m in mentions):
            correct.append(name)
        else:
            missing.append(name)
    return FactReport(tuple(correct), tuple(missing), tuple(contradicted))


# ---------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class RuleBasedConfig:
    """Fields of ``{"kind": "rule_based", ...}``.

    Attributes:
      contradiction_penalty: shares of score a contradicted fact costs beyond its own (>= 0).
      aliases: fact name -> extra phrases that name it in bindings, e.g. ``{"width": ["base"]}``
        makes "the base is 5" a statement of the width.
      exclude: fact names not scored; ``"given"`` also excludes ``given[0]`` and ``given.x``.
      strip_answer: score only the reasoning (``reasoning_part``: the text before the answer flag,
        minus the last box), so restating a final answer that equals a fact earns nothing.
      answer_format: the refiner's answer line when an example does not name one.
      fallback_score: the checker's score for samples it cannot score (None: NaN).
    """

    contradiction_penalty: float = 1.0
    aliases: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    exclude: Sequence[str] = ()
    strip_answer: bool = True
    answer_format: str = "flag"
    fallback_score: float | None = None

    def __post_init__(self):
        p = self.contradiction_penalty
        if isinstance(p, bool) or not isinstance(p, (int, float)) or p < 0:
            raise ValueError(f"contradiction_penalty must be a number >= 0, got {p!r}")
        if not isinstance(self.aliases, Mapping) or not all(
                isinstance(v, (list, tuple)) and all(isinstance(a, str) and a.strip() for a in v)
                for v in self.aliases.values()):
            raise ValueError(f"aliases must map fact names to lists of non-empty strings, "
                             f"got {self.aliases!r}")
        if isinstance(self.exclude, str) or not all(isinstance(e, str) for e in self.exclude):
            raise ValueError(f"exclude must be a list of fact names, got {self.exclude!r}")
        if not isinstance(self.strip_answer, bool):
            raise ValueError(f"strip_answer must be a bool, got {self.strip_answer!r}")
        check_answer_format(self.answer_format)
        check_fallback_score(self.fallback_score)

    def scored_facts(self, facts: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in facts.items()
                if not any(k == e or k.startswith(e + "[") or k.startswith(e + ".") for e in self.exclude)}


# ---------------------------------------------------------------------------------------------
# Checker


class RuleBasedChecker:
    """Thinking reward = ``assess(...).score(penalty)``; ``details[i]`` is the ``FactReport``."""

    def __init__(self, config: RuleBasedConfig = RuleBasedConfig()):
        self.config = config
        self.stats = SupervisionStats()

    def check_one(self, reasoning: str, example: Any) -> FactReport | None:
        """The report, or None when the example has no facts to score."""
        facts = self.config.scored_facts(as_visual_example(example).facts)
        if not facts:
            return None
        text = reasoning_part(reasoning) if self.config.strip_answer else reasoning
        return assess(text, facts, self.config.aliases)

    def check(self, reasonings: Sequence[str], examples: Sequence[Any]) -> CheckResult:
        if len(reasonings) != len(examples):  # a caller bug, not a per-sample failure
            raise ValueError(f"check: {len(reasonings)} reasonings for {len(examples)} examples")
        n = len(reasonings)
        scores = np.full(n, fallback_value(self.config.fallback_score), np.float32)
        fallback = np.ones(n, bool)
        reasons: list[str | None] = [None] * n
        details: list[Any] = [None] * n
        for i, (text, example) in enumerate(zip(reasonings, examples)):
            try:
                report = self.check_one(text if isinstance(text, str) else "", example)
            except Exception as err:  # noqa: BLE001 - a bad example must not stop training
                reasons[i], details[i] = ERROR, f"{type(err).__name__}: {err}"
                continue
            if report is None:
                reasons[i] = NO_FACTS
                continue
            scores[i] = report.score(self.config.contradiction_penalty)
            fallback[i], details[i] = False, report
        self.stats.add("items", n)
        for reason in reasons:
            if reason is not None:
                self.stats.add(f"fallback.{reason}")
        return CheckResult(scores, fallback, tuple(reasons), tuple(details))

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Refiner

_SECTION = re.compile(r"^\s*(goal|observation|reasoning|conclusion)\s*:\s*", re.IGNORECASE | re.MULTILINE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")


def hint_sections(hint: str) -> dict[str, str]:
    """``{"goal", "observation", "reasoning", "conclusion"}`` of a Goal/Observation/... hint; a hint
    without those headings is all ``reasoning``."""
    marks = list(_SECTION.finditer(hint))
    if not marks:
        return {"reasoning": hint.strip()}
    out = {}
    for m, nxt in zip(marks, marks[1:] + [None]):
        key = m.group(1).lower()
        out[key] = (out.get(key, "") + " " + hint[m.end():nxt.start() if nxt else len(hint)]).strip()
    if marks[0].start() > 0 and hint[:marks[0].start()].strip():
        out["reasoning"] = (hint[:marks[0].start()].strip() + " " + out.get("reasoning", "")).strip()
    return out


def _fact_value_text(value: Any) -> str:
    return str(value) if not isinstance(value, float) else repr(value)


def facts_sentence(facts: Mapping[str, Any]) -> str:
    """'width = 3; height = 5; given: 6 and 8; relation: corresponding' (list elements grouped)."""
    groups: dict[str, list[Any]] = {}
    for name, value in facts.items():
        base = re.sub(r"\[\d+\]$", "", name)
        groups.setdefault(base, []).append((name != base, value))
    parts = []
    for base, items in groups.items():
        label = base.replace("_", " ").replace(".", " ")
        values = [_fact_value_text(v) for _, v in items]
        if items[0][0] or fact_number(items[0][1]) is None:  # a list, or a categorical fact
            listed = ", ".join(values[:-1]) + " and " + values[-1] if len(values) > 1 else values[0]
            parts.append(f"{label}: {listed}")
        else:
            parts.append(f"{label} = {values[0]}")
    return "; ".join(parts)


def keep_consistent(text: str, facts: Mapping[str, Any],
                    aliases: Mapping[str, Sequence[str]] | None) -> tuple[str, int]:
    """``text`` without the sentences that contradict a fact, and how many were dropped."""
    sentences = [s for s in _SENTENCE_END.split(text.strip()) if s.strip()]
    kept = [s for s in sentences if not assess(s, facts, aliases).contradicted]
    return " ".join(kept), len(sentences) - len(kept)


class RuleBasedRefiner:
    """Grounded Goal / Observation / Reasoning / Conclusion rationale built from the facts."""

    def __init__(self, config: RuleBasedConfig = RuleBasedConfig()):
        self.config = config
        self.stats = SupervisionStats()

    def refine_one(self, example: Any) -> str:
        ex = as_visual_example(example)
        fmt = check_answer_format(ex.answer_format or self.config.answer_format)
        sections = {k: strip_final_answer(v) for k, v in hint_sections(strip_final_answer(ex.hint)).items()}
        facts = ex.facts
        dropped = 0
        for key in ("observation", "reasoning", "conclusion"):
            if sections.get(key):
                sections[key], n = keep_consistent(sections[key], facts, self.config.aliases)
                dropped += n
        if dropped:
            self.stats.add("dropped_sentences", dropped)
        shown = facts_sentence(facts)
        observation = " ".join(part for part in (
            ex.description, f"In the image: {shown}." if shown else "", sections.get("observation", ""))
            if part)
        lines = [f"Goal: {sections.get('goal') or ex.question or 'Answer the question.'}"]
        if observation:
            lines.append(f"Observation: {observation}")
        if sections.get("reasoning"):
            lines.append(f"Reasoning: {sections['reasoning']}")
        if sections.get("conclusion"):
            lines.append(f"Conclusion: {sections['conclusion']}")
        return with_answer_line("\n".join(lines), ex.answer, fmt)

    def refine(self, examples: Sequence[Any]) -> RefineResult:
        return refine_each(examples, self.refine_one, self.config.answer_format, self.stats)

    def close(self) -> None:
        pass


def make_rule_based(**fields: Any) -> VisualSupervision:
    """Factory entry for ``{"kind": "rule_based", ...}``; fields are ``RuleBasedConfig``'s."""
    config = config_from_fields(RuleBasedConfig, fields, "rule_based")
    return VisualSupervision(RuleBasedChecker(config), RuleBasedRefiner(config))
