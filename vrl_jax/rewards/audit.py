"""Audit the answer judge on a JSONL file: every verdict, agreement with expectations, throughput.

Usage::

    python -m vrl_jax.rewards.audit FILE.jsonl [--mode default|maye_compat|chartqa] [--timeout S]

Each line is ``{"prediction": str, "answer": str | [str, ...], "expected": bool (optional)}``.
Exit status: 0, or 2 for unreadable input or a bad option (the message names the file and line, or the
option), or 1 with ``--fail-on-disagreement`` when a verdict contradicts ``expected``.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import time
from typing import Any, Sequence

from vrl_jax.errors import UserError, run_cli
from vrl_jax.rewards.judge import MODES, PERCENT_POLICIES, UNANCHORED_POLICIES, AnswerJudge, JudgeConfig

PROG = "python -m vrl_jax.rewards.audit"
LINE_FORMAT = '{"prediction": str, "answer": str | [str, ...], "expected": true | false (optional)}'
# JudgeConfig's fields and the options that set them, so its complaints name what the user typed.
_FLAGS = {"mode": "--mode", "timeout_s": "--timeout", "workers": "--workers", "unanchored": "--unanchored",
          "percent": "--percent"}


@dataclasses.dataclass(frozen=True)
class AuditRecord:
    """One input line."""

    line: int
    prediction: str
    answer: str | list[str]
    expected: bool | None


class AuditInputError(UserError, ValueError):
    """Malformed input; the message names the file and line."""


def read_records(path: str) -> list[AuditRecord]:
    """Parse the JSONL file, raising ``AuditInputError`` naming ``path:line`` on the first bad line."""
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "no such file"
        raise AuditInputError(f"{path}: {what}; expected a JSONL file with one object per line: {LINE_FORMAT}")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditInputError(f"{path}: cannot read: {exc}") from exc
    records = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj: Any = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise AuditInputError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(obj, dict):
            raise AuditInputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for key in ("prediction", "answer"):
            if key not in obj:
                raise AuditInputError(f"{where}: missing field {key!r} (fields: {sorted(obj)})")
        if not isinstance(obj["prediction"], str):
            kind = type(obj["prediction"]).__name__
            raise AuditInputError(f"{where}: field 'prediction' must be a string, got {kind}")
        answer = obj["answer"]
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not (isinstance(answer, str) or (isinstance(answer, list) and answer
                                            and all(isinstance(a, str) for a in answer))):
            raise AuditInputError(f"{where}: field 'answer' must be a string, a number or a non-empty list of "
                                  f"strings, got {obj['answer']!r}")
        expected = obj.get("expected")
        if expected is not None and not isinstance(expected, bool):
            raise AuditInputError(f"{where}: field 'expected' must be true or false, got {expected!r}")
        records.append(AuditRecord(number, obj["prediction"], answer, expected))
    if not records:
        raise AuditInputError(f"{path} holds no record; expected one object per line: {LINE_FORMAT}")
    return records


def _short(text: str | None, width: int = 60) -> str:
    if text is None:
        return "-"
    text = text.replace("\n", "\\n")
    return repr(text if len(text) <= width else text[:width - 3] + "...")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vrl_jax.rewards.audit", description=__doc__.split("\n")[0])
    p.add_argument("file", help="JSONL with prediction, answer and optional expected")
    p.add_argument("--mode", choices=MODES, default="default")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds per symbolic check (default 2)")
    p.add_argument("--workers", type=int, default=1, help="math-verify worker processes")
    p.add_argument("--unanchored", choices=UNANCHORED_POLICIES, default="reject",
                   help="responses with neither box nor answer flag")
    p.add_argument("--percent", choices=PERCENT_POLICIES, default="either")
    p.add_argument("--show", choices=("all", "disagreements", "none"), default="all",
                   help="which verdicts to print")
    p.add_argument("--fail-on-disagreement", action="store_true")
    args = p.parse_args(argv)
    try:
        args.config = JudgeConfig(mode=args.mode, timeout_s=args.timeout, workers=args.workers,
                                  unanchored=args.unanchored, percent=args.percent)
    except ValueError as exc:
        flag = next((f for field, f in _FLAGS.items() if f"JudgeConfig.{field}" in str(exc)), None)
        p.error(f"{flag}: {exc}" if flag else str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    records = read_records(args.file)
    with AnswerJudge(args.config) as judge:
        t0 = time.perf_counter()
        judge.start()  # the server's one-off start-up is reported apart from the throughput
        startup = time.perf_counter() - t0
        t1 = time.perf_counter()
        verdicts = judge.judge_batch([r.prediction for r in records], [r.answer for r in records])
        elapsed = time.perf_counter() - t1
    with_expected = [(r, v) for r, v in zip(records, verdicts) if r.expected is not None]
    agree = sum(v.correct == r.expected for r, v in with_expected)
    for r, v in zip(records, verdicts):
        disagrees = r.expected is not None and v.correct != r.expected
        if args.show == "all" or (args.show == "disagreements" and disagrees):
            tail = "" if r.expected is None else f" expected={r.expected} {'DISAGREE' if disagrees else 'agree'}"
            print(f"[line {r.line}] {'CORRECT' if v.correct else 'WRONG  '} method={v.method:<11} "
                  f"extracted={_short(v.extracted)} normalized={_short(v.normalized)} "
                  f"gold={_short(v.gold_normalized)}{' detail=' + _short(v.detail) if v.detail else ''}{tail}")
    n = len(records)
    methods = collections.Counter(v.method for v in verdicts)
    print(f"samples: {n}  correct: {sum(v.correct for v in verdicts)}  mode: {args.mode}")
    print("methods: " + ", ".join(f"{m} {c}" for m, c in methods.most_common()))
    if with_expected:
        print(f"agreement with expected: {agree}/{len(with_expected)} ({100.0 * agree / len(with_expected):.1f}%)")
    rate = n / elapsed if elapsed > 0 else float("inf")
    print(f"throughput: {rate:.1f} samples/s ({elapsed:.3f} s for {n}; server start {startup:.2f} s not counted)")
    if args.fail_on_disagreement and agree < len(with_expected):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, PROG))
