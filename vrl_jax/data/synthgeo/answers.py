"""Exact answers: a rational coefficient times an optional square root and an optional pi.

Every synthgeo answer is computed from the problem's parameters with `fractions.Fraction`, never
from pixels, and written in one canonical LaTeX form so that the judge (math-verify) and the
string-match baselines see the same text for the same value.
"""
from __future__ import annotations

import dataclasses
import math
from fractions import Fraction


@dataclasses.dataclass(frozen=True)
class ExactAnswer:
    """The value `coef * sqrt(radicand) * (pi if pi else 1)`, with `radicand` square-free."""

    coef: Fraction
    radicand: int = 1
    pi: bool = False

    def __post_init__(self):
        if not isinstance(self.coef, Fraction):
            object.__setattr__(self, "coef", Fraction(self.coef))
        if self.radicand < 1 or square_part(self.radicand) != 1:
            raise ValueError(f"radicand must be a square-free integer >= 1, got {self.radicand}")

    @property
    def kind(self) -> str:
        """'integer', 'rational', 'sqrt' or 'pi': which judge features the answer exercises."""
        if self.pi:
            return "pi"
        if self.radicand != 1:
            return "sqrt"
        return "integer" if self.coef.denominator == 1 else "rational"

    def as_float(self) -> float:
        return float(self.coef) * math.sqrt(self.radicand) * (math.pi if self.pi else 1.0)

    def latex(self) -> str:
        """Canonical answer string, e.g. '28', '-3', '\\frac{25}{4}\\pi', '2\\sqrt{13}', '\\pi'."""
        sign = "-" if self.coef < 0 else ""
        magnitude = abs(self.coef)
        symbol = (f"\\sqrt{{{self.radicand}}}" if self.radicand != 1 else "") + ("\\pi" if self.pi else "")
        if magnitude == 0:
            return "0"
        if magnitude.denominator != 1:
            number = f"\\frac{{{magnitude.numerator}}}{{{magnitude.denominator}}}"
        elif magnitude == 1 and symbol:
            number = ""  # '\\pi', not '1\\pi'
        else:
            number = str(magnitude.numerator)
        return f"{sign}{number}{symbol}"

    def plain(self) -> str:
        """The same value in the ASCII notation the rationales use, e.g. '25/4 pi', '2 sqrt(13)'."""
        parts = []
        if self.coef != 1 or (self.radicand == 1 and not self.pi):
            parts.append(str(self.coef))
        if self.radicand != 1:
            parts.append(f"sqrt({self.radicand})")
        if self.pi:
            parts.append("pi")
        return " ".join(parts)


def square_part(n: int) -> int:
    """The largest k with k*k dividing n (n >= 1)."""
    if n < 1:
        raise ValueError(f"square_part needs n >= 1, got {n}")
    k, best = 2, 1
    while k * k <= n:
        while n % (k * k) == 0:
            n //= k * k
            best *= k
        k += 1
    return best


def exact_sqrt(n: int) -> ExactAnswer:
    """sqrt(n) for an integer n >= 0, simplified: sqrt(52) -> 2 sqrt(13), sqrt(25) -> 5."""
    if n < 0:
        raise ValueError(f"exact_sqrt needs n >= 0, got {n}")
    if n == 0:
        return ExactAnswer(Fraction(0))
    k = square_part(n)
    return ExactAnswer(Fraction(k), radicand=n // (k * k))


def sqrt_equation(name: str, n: int) -> str:
    """'x = sqrt(52) = 2 sqrt(13).', 'x = sqrt(100) = 10.' or 'x = sqrt(47).' (rationale wording)."""
    simplified = exact_sqrt(n).plain()
    root = f"sqrt({n})"
    return f"{name} = {root}." if simplified == root else f"{name} = {root} = {simplified}."
