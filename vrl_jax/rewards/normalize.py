"""Answer normalisation and exact rational comparison: the judge's fast, deterministic layer.

``normalize_answer`` turns an extracted answer such as ``x = \\dfrac{3}{4}\\text{ cm}`` into a
canonical string (``\\frac{3}{4}``) and records the percent and degree marks it removed.
``parse_number`` reads integers, decimals and simple fractions as ``fractions.Fraction`` so that
``0.5``, ``1/2`` and ``\\frac{1}{2}`` compare exactly; anything else is left to the symbolic layer.
"""
from __future__ import annotations

import dataclasses
import re
from fractions import Fraction

# Longest digit run read exactly; longer runs are left to the (time-limited) symbolic layer.
MAX_DIGITS = 100

_WRAPPERS = (r"\displaystyle", r"\left", r"\right", r"\!", r"\,", r"\;", r"\:", r"\quad", r"\qquad")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_DEGREE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\circ\b|\\degree\b|\bdeg(?:ree)?s?\b\.?", re.IGNORECASE)
_PERCENT = re.compile(r"\\%|%|\bper\s?cent(?:age)?\b|\bpct\b", re.IGNORECASE)
# Units a geometry/arithmetic answer may carry. Matched only as whole words at the end.
# Units a geometry/arithmetic answer may carry, matched only at the end. One-letter units must be
# set off by a space ("5 m"), since "2h" or "3x" may be an expression.
_UNITS = (
    "mm|cm|dm|km|in|inch|inches|ft|feet|foot|yd|yard|yards|mi|mile|miles|meter|meters|metre|metres|"
    "millimeter|millimeters|centimeter|centimeters|kilometer|kilometers|unit|units|sq|square|cubic|"
    "kg|mg|gram|grams|lb|lbs|pound|pounds|oz|ml|liter|liters|litre|litres|sec|second|seconds|"
    "min|minute|minutes|hr|hrs|hour|hours|day|days|week|weeks|year|years|dollar|dollars|cents|"
    "people|persons|students|rad|radians"
)
_ONE_LETTER_UNITS = "m|g|l|s|h"
_TRAILING_UNIT = re.compile(
    r"(?:(?<=[\d\s}])(?:" + _UNITS + r")|(?<=\s)(?:" + _ONE_LETTER_UNITS + r"))(?![A-Za-z])"
    r"(?:\s*\^\s*\{?\s*[23]\s*\}?)?\.?\s*$",
    re.IGNORECASE,
)
_VARIABLE_PREFIX = re.compile(r"^\s*[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?\s*=\s*(?=\S)")
_THOUSANDS = re.compile(r"[+-]?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?")
_THOUSANDS_SPACE = re.compile(r"[+-]?[1-9]\d{0,2}(?: \d{3})+(?:\.\d+)?")
_INT = re.compile(r"[+-]?\d+")
_DEC = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)")
_FRAC_LATEX = re.compile(r"([+-]?)\\frac\s*(?:\{([^{}]+)\}|(\d))\s*(?:\{([^{}]+)\}|(\d))")
_FRAC_SLASH = re.compile(r"([+-]?\d+(?:\.\d+)?)\s*/\s*([+-]?\d+(?:\.\d+)?)")


@dataclasses.dataclass(frozen=True)
class NormalizedAnswer:
    """An answer string in canonical form and the marks stripped from it."""

    text: str
    percent: bool = False
    degree: bool = False


@dataclasses.dataclass(frozen=True)
class Number:
    """An exactly represented number: ``kind`` is "int", "frac" or "dec" (written with a point)."""

    value: Fraction
    kind: str


def _unwrap_braces(s: str) -> str:
    """Drop redundant outer ``{...}`` groups: ``{{3}}`` -> ``3``."""
    while len(s) >= 2 and s[0] == "{" and s[-1] == "}":
        depth = 0
        for i, ch in enumerate(s):
            depth += ch == "{"
            depth -= ch == "}"
            if depth == 0 and i < len(s) - 1:
                return s  # the first group closes before the end: `{a}{b}` is not one group
        s = s[1:-1].strip()
    return s


def _strip_boxes(s: str) -> str:
    """``\\boxed{\\boxed{3}}`` and ``\\fbox{3}`` -> ``3`` when the whole string is one box."""
    while True:
        m = re.match(r"\\(?:boxed|fbox)\s*(\{.*\})\s*$", s, re.DOTALL)
        if not m:
            return s
        inner = _unwrap_braces(m.group(1))
        if inner == m.group(1):
            return s
        s = inner


def normalize_answer(answer: str) -> NormalizedAnswer:
    """Canonical form of an extracted answer.

    Removes math delimiters, spacing commands, ``\\left``/``\\right``, ``\\text{}`` wrappers,
    trailing units, a leading ``x =``, thousands separators (``1,000``, ``1{,}000``,
    ``1 000``) and trailing punctuation; rewrites ``\\dfrac``/``\\tfrac``/``\\cfrac`` as
    ``\\frac``; strips degree marks (``^\\circ``, ``°``, "degrees") and percent marks
    (``\\%``, "percent"), recording that it did.
    """
    s = answer.strip().replace(r"\$", "")
    for delim in ("$", r"\(", r"\)", r"\[", r"\]"):
        s = s.replace(delim, " " if delim != "$" else "")
    s = re.sub(r",\\!\s*", ",", s)  # `1,\!000` is LaTeX for a thousands separator
    for w in _WRAPPERS:
        # `(?<!\\)`: in `\\ ` or `\\,` the backslash pair is a matrix row break, not a command.
        end = r"(?![A-Za-z])" if w[-1].isalpha() else ""  # `\left` is not the start of `\leftarrow`
        s = re.sub(r"(?<!\\)" + re.escape(w) + end, " " if w.startswith(r"\q") else "", s)
    s = re.sub(r"(?<!\\)\\ ", " ", s).replace("~", " ").replace("\u2212", "-")
    s = re.sub(r"\\[dtc]frac(?![A-Za-z])", r"\\frac", s)
    s = _strip_boxes(s.strip())
    # \text{...} first loses its command so that unit and percent words inside become plain words.
    for _ in range(3):
        s = _TEXT_CMD.sub(r" \1 ", s)
    degree = bool(_DEGREE.search(s))
    s = _DEGREE.sub(" ", s)
    percent = bool(_PERCENT.search(s))
    s = _PERCENT.sub(" ", s)
    s = s.strip().rstrip(".;,").strip()
    previous = None
    while previous != s:  # "5 cm^2." then "5 cm" then "5"
        previous = s
        stripped = _TRAILING_UNIT.sub("", s).strip()
        if stripped and any(ch.isdigit() or ch == "\\" for ch in stripped):
            s = stripped.rstrip(".;,").strip()
    s = _VARIABLE_PREFIX.sub("", s) if s.count("=") == 1 else s
    s = _unwrap_braces(re.sub(r"\s+", " ", s.replace("{,}", ",")).strip())
    # Separators are removed only from a lone number: in "(2,12)" or "1, 234" the comma separates items.
    if _THOUSANDS.fullmatch(s) or _THOUSANDS_SPACE.fullmatch(s):
        s = s.replace(",", "").replace(" ", "")
    single = re.fullmatch(r"\(([^(),]*)\)", s)  # "(3)" is 3, but "(1, 2)" is a point
    if single:
        s = single.group(1).strip()
    return NormalizedAnswer(text=s, percent=percent, degree=degree)


def _read_plain(s: str) -> Number | None:
    """An integer or decimal literal, with no other characters."""
    s = s.strip()
    if len(s) > MAX_DIGITS + 2:
        return None
    if _INT.fullmatch(s):
        return Number(Fraction(int(s)), "int")
    if _DEC.fullmatch(s):
        return Number(Fraction(s), "dec")
    return None


def _ratio(num: Number | None, den: Number | None, sign: str) -> Number | None:
    if num is None or den is None or den.value == 0:
        return None
    kind = "dec" if "dec" in (num.kind, den.kind) else "frac"
    value = num.value / den.value
    return Number(-value if sign == "-" else value, kind)


def parse_number(text: str) -> Number | None:
    """Read an integer, decimal, ``a/b`` or ``\\frac{a}{b}`` (``\\frac13`` too) exactly.

    Returns None for anything else (symbols, roots, sums, lists), so the caller can hand those
    to the symbolic layer instead of guessing.
    """
    s = text.replace(" ", "")
    plain = _read_plain(s)
    if plain is not None:
        return plain
    m = _FRAC_LATEX.fullmatch(s)
    if m:
        sign, num_braced, num_digit, den_braced, den_digit = m.groups()
        return _ratio(_read_plain(num_braced or num_digit or ""), _read_plain(den_braced or den_digit or ""), sign)
    m = _FRAC_SLASH.fullmatch(s)
    if m:
        return _ratio(_read_plain(m.group(1)), _read_plain(m.group(2)), "+")
    return None


def percent_candidates(value: Fraction, is_percent: bool, policy: str) -> tuple[Fraction, ...]:
    """The values a number may stand for under a percent policy.

    ``"either"`` (math-verify and MAYE): ``25%`` stands for 25 or 0.25; ``"fraction"``: only
    0.25; ``"strip"``: only 25. A number written without ``%`` always stands for itself.
    """
    if not is_percent:
        return (value,)
    if policy == "fraction":
        return (value / 100,)
    if policy == "strip":
        return (value,)
    return (value, value / 100)


def numbers_match(pred: Number, gold: Number, rel_tol: Fraction, abs_tol: Fraction) -> bool:
    """Exact equality for integers and fractions; a tolerance only when a decimal is involved.

    The tolerance is ``max(abs_tol, rel_tol * |gold|)``, computed in rationals, so ``0.1 + 0.2``
    style float error never enters.
    """
    if pred.kind != "dec" and gold.kind != "dec":
        return pred.value == gold.value
    return abs(pred.value - gold.value) <= max(abs_tol, rel_tol * abs(gold.value))
