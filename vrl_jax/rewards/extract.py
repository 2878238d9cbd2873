"""Finding the final answer inside a model response: the last ``\\boxed{}`` or the text after a flag.

Every function here is linear in the length of its input (no backtracking regexes), so a hostile
response cannot stall the judge before it even reaches the comparison.
"""
from __future__ import annotations

import re

# `\boxed` and `\fbox` both mark a final answer in MATH-style solutions.
_BOX_START = re.compile(r"\\(?:boxed|fbox)\b")


def _match_braces(text: str, open_at: int) -> int | None:
    """Index just past the brace that closes ``text[open_at] == "{"``, or None if unbalanced."""
    depth = 0
    i = open_at
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n:  # an escaped brace `\{` does not open or close a group
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def boxed_spans(text: str) -> list[tuple[int, int, str | None]]:
    """Every top-level ``\\boxed`` in order, as ``(start, end, content)``.

    ``content`` is the brace-matched argument of ``\\boxed{...}``, or the single token of the
    ``\\boxed 5`` form (which ends at whitespace, ``$`` or a sentence end). A box whose brace
    never closes (a response truncated mid-answer) has ``content=None`` and ends the scan.
    Boxes nested inside another box are part of the outer one's content.
    """
    spans: list[tuple[int, int, str | None]] = []
    pos = 0
    while True:
        m = _BOX_START.search(text, pos)
        if m is None:
            return spans
        j = m.end()
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            end = _match_braces(text, j)
            if end is None:
                spans.append((m.start(), len(text), None))
                return spans
            spans.append((m.start(), end, text[j + 1:end - 1]))
            pos = end
        elif j > m.end() and j < len(text):
            # `\boxed 5`: the argument is one token, as in MATH's reference solutions.
            k = j
            while k < len(text) and not text[k].isspace() and text[k] not in "$,;":
                k += 1
            token = text[j:k].rstrip(".")
            spans.append((m.start(), k, token if token else None))
            pos = max(k, m.end())
        else:
            pos = m.end()


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\boxed x``) in ``text``; None if there is none.

    An unclosed last box yields None: the response stopped before finishing its answer, and an
    earlier box is an abandoned attempt, not the final answer.
    """
    spans = boxed_spans(text)
    if not spans:
        return None
    content = spans[-1][2]
    return content.strip() if content is not None else None


def _flag_pattern(flag: str) -> re.Pattern[str]:
    """``Answer:`` also matches the markdown forms ``**Answer:**`` and ``Answer**:``."""
    word = re.escape(flag.rstrip(":").strip())
    colon = r"\**\s*:" if flag.rstrip().endswith(":") else ""
    return re.compile(word + colon, re.IGNORECASE)


def _last_flag_end(text: str, flag: str) -> int | None:
    last = None
    for m in _flag_pattern(flag).finditer(text):
        last = m
    return None if last is None else last.end()


def _first_line(text: str) -> str | None:
    for line in text.split("\n"):
        line = line.strip().strip("*_").strip()
        if line:
            return line
    return None


def after_flag(text: str, flag: str) -> str | None:
    """The first non-empty line after the last ``flag`` (case-insensitive), markdown stripped.

    Returns None when the flag does not occur or nothing follows it.
    """
    end = _last_flag_end(text, flag)
    return None if end is None else _first_line(text[end:])


def extract_answer(text: str, flag: str | None = "Answer:") -> tuple[str | None, str]:
    """The final answer of a response and where it came from.

    Returns ``(answer, source)`` with ``source`` one of ``"boxed"``, ``"flag"`` or ``"none"``
    (answer None). Whichever of the last box and the last flag comes later in the text wins: a
    response ends with its final answer, and an earlier box is an intermediate result.
    """
    spans = boxed_spans(text)
    flag_end = _last_flag_end(text, flag) if flag else None
    if flag_end is not None and (not spans or flag_end >= spans[-1][1]):
        flagged = _first_line(text[flag_end:])
        if flagged is not None:
            return flagged, "flag"
    if spans and spans[-1][2] is not None:
        return spans[-1][2].strip(), "boxed"
    return None, "none"
