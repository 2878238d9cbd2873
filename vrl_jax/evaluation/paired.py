"""Did training change the accuracy beyond noise? Two evaluations of the same problems, compared pairwise.

Each evaluation writes every problem's outcome per setting (`outcomes/<split>_<step>.jsonl`: the id, the
problem it poses, and a score in [0, 1] per setting: 0/1 for one sample, any-of-k for pass@k, and the share
of correct samples for `pass@1 from k samples`). Pairing the scores of the first and the last evaluation by
id removes the spread between problems from the comparison, which at a few hundred problems is most of it.

Items of one benchmark can repeat a problem (synthgeo draws a problem again with another picture or
wording: its `semantic_key`), so their differences are not independent; the standard error is clustered by
problem (the sandwich estimator with the G / (G - 1) correction; one item per problem gives the usual
std / sqrt(n)).

Several runs of one recipe (other seeds) evaluated on the same problems give a mean change (`pooled_change`):
each item's change averaged over the runs, its standard error clustered by problem the same way.
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
    pooled = pooled_change([(first, second)], setting)
    return None if pooled is None else pooled.change


class PooledChange(NamedTuple):
    change: PairedChange  # over the items every pair holds; delta = the mean of the per-pair deltas
    per_pair: tuple[float, ...]  # each pair's delta over those items


def pooled_change(pairs: Sequence[tuple[Sequence[Mapping], Sequence[Mapping]]], setting: str) -> PooledChange | None:
    """The mean change of `setting` over several (first, second) evaluations of the same problems (runs with
    other seeds, say), over the ids that every evaluation scores; None when they share none.

    Each item's change is averaged over the pairs first, then its standard error is clustered by problem: the
    runs share their problems, so their changes are not independent evidence. The runs' training is taken as
    given (the spread between seeds is not in the SE; `per_pair` shows it). One pair is `paired_change`.
    """
    keyed = [({r[ID]: r for r in a if setting in r}, {r[ID]: r for r in b if setting in r}) for a, b in pairs]
    if not keyed:
        return None
    ids = [i for i in keyed[0][1] if all(i in a and i in b for a, b in keyed)]
    if not ids:
        return None
    before = np.array([[a[i][setting] for i in ids] for a, _ in keyed], np.float64)  # [pairs, items]
    after = np.array([[b[i][setting] for i in ids] for _, b in keyed], np.float64)
    diffs = (after - before).mean(axis=0)
    problems = [keyed[0][1][i].get(PROBLEM, i) for i in ids]
    change = PairedChange(float(before.mean()), float(after.mean()), float(diffs.mean()),
                          clustered_se(diffs, problems), len(ids), len(set(map(str, problems))))
    return PooledChange(change, tuple(float(d) for d in (after - before).mean(axis=1)))


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


def settings_of(rows: Sequence[Mapping]) -> list[str]:
    """The settings outcome rows score, in their order."""
    return [k for k in dict.fromkeys(k for r in rows for k in r) if k not in (ID, PROBLEM)]


def first_and_last(workdir) -> dict[str, tuple[int, int, list[dict], list[dict]]]:
    """{split: (first step, last step, its rows then, its rows then)} for each split evaluated twice or more."""
    return {split: (min(by_step), max(by_step), by_step[min(by_step)], by_step[max(by_step)])
            for split, by_step in sorted(read_outcomes(workdir).items()) if len(by_step) >= 2}


def run_changes(workdir) -> list[RunChange]:
    """Each split's first -> last evaluation of one run, per setting (nothing for a split evaluated once)."""
    out = []
    for split, (first, last, rows_first, rows_last) in first_and_last(workdir).items():
        for setting in settings_of(rows_last):
            change = paired_change(rows_first, rows_last, setting)
            if change is not None:
                out.append(RunChange(split, setting, first, last, change))
    return out


def group_changes(workdirs: Sequence) -> list[tuple[RunChange, tuple[float, ...]]]:
    """The runs' mean first -> last change per split and setting (`pooled_change`), where every run evaluated
    the split at the same first and last step; with each run's own change."""
    runs = [first_and_last(w) for w in workdirs]
    if not runs:
        return []
    out = []
    for split, (first, last, _, rows_last) in runs[0].items():
        if not all(r.get(split, (None, None))[:2] == (first, last) for r in runs):
            continue
        for setting in settings_of(rows_last):
            pooled = pooled_change([r[split][2:] for r in runs], setting)
            if pooled is not None:
                out.append((RunChange(split, setting, first, last, pooled.change), pooled.per_pair))
    return out


def points(delta: float) -> str:
    """A change in signed points, one decimal: '+3.5'; a change that rounds to nothing is '+0.0', not '-0.0'."""
    return f"{round(100 * delta, 1) + 0.0:+.1f}"


def fmt_change(c: PairedChange) -> str:
    """'10.0 -> 13.5: +3.5 ± 2.6 points (200 items, 76 problems)'."""
    se = "nan" if math.isnan(c.se) else f"{100 * c.se:.1f}"
    return (f"{100 * c.before:.1f} -> {100 * c.after:.1f}: {points(c.delta)} ± {se} points "
            f"({c.items} items, {c.problems} problems)")


def change_lines(workdir) -> list[str]:
    """The console's summary of a run: one line per split and setting."""
    return [f"{r.split} {r.setting}, step {r.first_step} -> {r.last_step}: {fmt_change(r.change)}"
            for r in run_changes(workdir)]


def change_markdown(groups: Mapping[str, Sequence]) -> str:
    """The report's section: every run's (objects with a `workdir`) first -> last evaluation, paired."""
    def row(name: str, run: str, r: RunChange) -> str:
        c = r.change
        z = "" if math.isnan(c.se) or c.se == 0 else f" ({c.delta / c.se:+.1f} SE)"
        return (f"| {name} | {run} | {r.split} | {r.setting} | {r.first_step} -> {r.last_step} "
                f"| {100 * c.before:.1f} -> {100 * c.after:.1f} | {points(c.delta)} ± {100 * c.se:.1f}{z} "
                f"| {c.items} ({c.problems}) |")

    rows = []
    for name, runs in groups.items():
        for run in runs:
            rows += [row(name, f"`{run.workdir}`", r) for r in run_changes(run.workdir)]
        if len(runs) > 1:
            rows += [row(name, f"mean of {len(runs)} runs ({', '.join(map(points, per_run))})", r)
                     for r, per_run in group_changes([run.workdir for run in runs])]
    if not rows:
        return ""
    return "\n".join([
        "## What training changed, problem by problem", "",
        "Each run's first and last evaluation of a split, paired by problem (`outcomes/`): the change in points "
        "± its standard error, clustered by problem (items that repeat a problem are not independent "
        "evidence). A change beyond about 2 SE is unlikely to be sampling noise. A group of several runs also "
        "gets their mean change (each run's in brackets), its SE clustered by problem over the runs' "
        "item-wise mean change: the runs share the problems.", "",
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
    """`python -m vrl_jax.evaluation.paired BEFORE AFTER [BEFORE AFTER ...]`: the change of every setting the
    outcome files share, paired by problem (two checkpoints evaluated with `evaluate --out`, or two evaluations
    of a run). Several pairs (runs with other seeds) give their mean change and each pair's."""
    import argparse

    from vrl_jax.errors import UserError
    parser = argparse.ArgumentParser(prog=PROG, description=main.__doc__)
    parser.add_argument("files", nargs="+", metavar="BEFORE AFTER",
                        help="outcomes JSONL of an earlier and of a later evaluation; repeat the pair for more runs")
    args = parser.parse_args(argv)
    if len(args.files) % 2:
        raise UserError(f"{len(args.files)} files given: expected pairs, each an earlier evaluation's outcomes file "
                        f"then a later one's ({args.files[-1]} has no partner)")
    rows = [read_rows(path) for path in args.files]
    pairs = list(zip(rows[::2], rows[1::2]))
    changes = [(s, pooled_change(pairs, s)) for s in settings_of(rows[1])]
    changes = [(s, c) for s, c in changes if c is not None]
    if not changes:
        raise UserError(f"{', '.join(args.files)} share no problem id scored under the same setting: compare "
                        "evaluations of the same split")
    for setting, c in changes:
        if len(pairs) == 1:
            print(f"{setting}: {fmt_change(c.change)}")
        else:
            print(f"{setting}: mean of {len(pairs)} pairs: {fmt_change(c.change)}; per pair "
                  + ", ".join(map(points, c.per_pair)))
    return 0


if __name__ == "__main__":
    import sys

    from vrl_jax.errors import run_cli
    sys.exit(run_cli(main, PROG))
