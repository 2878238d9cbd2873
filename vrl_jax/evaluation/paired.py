"""Did training change the accuracy beyond noise? Two evaluations of the same problems, compared pairwise.

Each evaluation writes every problem's outcome per setting (`outcomes/<split>_<step>.jsonl`: the id, the
problem it poses, and a score in [0, 1] per setting: 0/1 for one sample, any-of-k for pass@k, and the share
of correct samples for `pass@1 from k samples`). Pairing the scores of the first and the last evaluation by
id removes the spread between problems from the comparison, which at a few hundred problems is most of it.

Items of one benchmark can repeat a problem (synthgeo draws a problem again with another picture or
wording: its `semantic_key`), so their differences are not independent; the standard error is clustered by
problem (the sandwich estimator with the G / (G - 1) correction; one item per problem gives the usual
std / sqrt(n)).
"""

from __future__ import annotations

import json
import math
from typing import Mapping, NamedTuple, Sequence

import numpy as np

OUTCOMES_DIR = "outcomes"
ID, PROBLEM = "id", "problem"  # the fields every outcome row has besides its settings' scores


class PairedChange(NamedTuple):
    before: float  # mean score of the paired items at the first evaluation
    after: float  # ... at the second
    delta: float  # after - before
    se: float  # standard error of delta, clustered by problem (nan with fewer than 2 problems)
    items: int  # items in both evaluations
    problems: int  # distinct problems among them (clusters)


def clustered_se(diffs: np.ndarray, clusters: Sequence) -> float:
    """Standard error of mean(diffs) with the items of one cluster correlated.

    diffs: float [n]; clusters: [n] hashable labels. Var = G / (G - 1) * sum_c (sum_{i in c} r_i)^2 / n^2,
    r_i = diffs_i - mean(diffs), G clusters. nan for G < 2.
    """
    diffs = np.asarray(diffs, np.float64)
    labels = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)[1]
    groups = int(labels.max()) + 1 if len(labels) else 0
    if groups < 2:
        return float("nan")
    per_cluster = np.bincount(labels, weights=diffs - diffs.mean(), minlength=groups)
    return float(np.sqrt(groups / (groups - 1) * np.sum(per_cluster ** 2)) / len(diffs))


def paired_change(first: Sequence[Mapping], second: Sequence[Mapping], setting: str) -> PairedChange | None:
    """The change of `setting`'s score between two evaluations' outcome rows, over the items both hold (by
    id) and score; None when they share none."""
    earlier = {r[ID]: r for r in first if setting in r}
    pairs = [(earlier[r[ID]], r) for r in second if setting in r and r[ID] in earlier]
    if not pairs:
        return None
    before = np.array([a[setting] for a, _ in pairs], np.float64)
    after = np.array([b[setting] for _, b in pairs], np.float64)
    problems = [b.get(PROBLEM, b[ID]) for _, b in pairs]
    return PairedChange(float(before.mean()), float(after.mean()), float((after - before).mean()),
                        clustered_se(after - before, problems), len(pairs), len(set(map(str, problems))))


def outcome_rows(ids: Sequence[str], problems: Sequence[str], scores: Mapping[str, np.ndarray]) -> list[dict]:
    """One row per problem: {"id", "problem", setting: score, ...}; scores: {setting: float [P]}."""
    return [{ID: i, PROBLEM: p, **{name: float(v[n]) for name, v in scores.items()}}
            for n, (i, p) in enumerate(zip(ids, problems))]


def read_outcomes(workdir) -> dict[str, dict[int, list[dict]]]:
    """{split: {step: outcome rows}} from `workdir/outcomes/<split>_<step>.jsonl` (local or gs://)."""
    from etils import epath
    folder = epath.Path(workdir) / OUTCOMES_DIR
    out: dict[str, dict[int, list[dict]]] = {}
    if not folder.exists():
        return out
    for path in folder.glob("*.jsonl"):
        split, _, step = path.stem.rpartition("_")
        if split and step.isdigit():
            out.setdefault(split, {})[int(step)] = [json.loads(line) for line in path.read_text().splitlines()
                                                    if line.strip()]
    return out


class RunChange(NamedTuple):
    split: str
    setting: str
    first_step: int
    last_step: int
    change: PairedChange


def run_changes(workdir) -> list[RunChange]:
    """Each split's first -> last evaluation of one run, per setting (nothing for a split evaluated once)."""
    out = []
    for split, by_step in sorted(read_outcomes(workdir).items()):
        if len(by_step) < 2:
            continue
        first, last = min(by_step), max(by_step)
        settings = [k for k in dict.fromkeys(k for r in by_step[last] for k in r) if k not in (ID, PROBLEM)]
        for setting in settings:
            change = paired_change(by_step[first], by_step[last], setting)
            if change is not None:
                out.append(RunChange(split, setting, first, last, change))
    return out


def fmt_change(c: PairedChange) -> str:
    """'10.0 -> 13.5: +3.5 ± 2.6 points (200 items, 76 problems)'."""
    se = "nan" if math.isnan(c.se) else f"{100 * c.se:.1f}"
    return (f"{100 * c.before:.1f} -> {100 * c.after:.1f}: {100 * c.delta:+.1f} ± {se} points "
            f"({c.items} items, {c.problems} problems)")


def change_lines(workdir) -> list[str]:
    """The console's summary of a run: one line per split and setting."""
    return [f"{r.split} {r.setting}, step {r.first_step} -> {r.last_step}: {fmt_change(r.change)}"
            for r in run_changes(workdir)]


def change_markdown(groups: Mapping[str, Sequence]) -> str:
    """The report's section: every run's (objects with a `workdir`) first -> last evaluation, paired."""
    rows = []
    for name, runs in groups.items():
        for run in runs:
            for r in run_changes(run.workdir):
                c = r.change
                z = "" if math.isnan(c.se) or c.se == 0 else f" ({c.delta / c.se:+.1f} SE)"
                rows.append(f"| {name} | `{run.workdir}` | {r.split} | {r.setting} | {r.first_step} -> {r.last_step} "
                            f"| {100 * c.before:.1f} -> {100 * c.after:.1f} | {100 * c.delta:+.1f} ± "
                            f"{100 * c.se:.1f}{z} | {c.items} ({c.problems}) |")
    if not rows:
        return ""
    return "\n".join([
        "## What training changed, problem by problem", "",
        "Each run's first and last evaluation of a split, paired by problem (`outcomes/`): the change in points "
        "± its standard error, clustered by problem (items that repeat a problem are not independent "
        "evidence). A change beyond about 2 SE is unlikely to be sampling noise.", "",
        "| group | run | split | setting | steps | first -> last (%) | change ± SE | items (problems) |",
        "|---|---|---|---|---|---|---|---|", *rows, ""])


PROG = "python -m vrl_jax.evaluation.paired"


def read_rows(path: str) -> list[dict]:
    """An outcomes file's rows; a missing file or a line that is not a JSON object with an id is a UserError
    naming the file and line."""
    from vrl_jax.errors import UserError
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror}). Expected an outcomes file: a run's "
                        f"{OUTCOMES_DIR}/<split>_<step>.jsonl or `evaluate --out OUT`'s OUT.outcomes.jsonl") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or ID not in row:
            raise UserError(f"{path}:{n}: expected a JSON object with an {ID!r} and one score per setting, "
                            f"got {line[:80]!r}")
        rows.append(row)
    return rows


def main(argv: Sequence[str]) -> int:
    """`python -m vrl_jax.evaluation.paired BEFORE AFTER`: the change of every setting the two outcome files
    share, paired by problem (two checkpoints evaluated with `evaluate --out`, or two evaluations of a run)."""
    import argparse

    from vrl_jax.errors import UserError
    parser = argparse.ArgumentParser(prog=PROG, description=main.__doc__)
    parser.add_argument("before", help="outcomes JSONL of the earlier evaluation")
    parser.add_argument("after", help="outcomes JSONL of the later evaluation")
    args = parser.parse_args(argv)
    before, after = read_rows(args.before), read_rows(args.after)
    settings = [k for k in dict.fromkeys(k for r in after for k in r) if k not in (ID, PROBLEM)]
    changes = [(s, paired_change(before, after, s)) for s in settings]
    changes = [(s, c) for s, c in changes if c is not None]
    if not changes:
        raise UserError(f"{args.before} and {args.after} share no problem id scored under the same setting: "
                        "compare two evaluations of the same split")
    for setting, c in changes:
        print(f"{setting}: {fmt_change(c)}")
    return 0


if __name__ == "__main__":
    import sys

    from vrl_jax.errors import run_cli
    sys.exit(run_cli(main, PROG))
