"""The first -> last evaluation compared problem by problem (`evaluation.paired`): the change, its standard
error clustered by problem, the console lines and the report's table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from vrl_jax.evaluation.paired import (change_lines, change_markdown, clustered_se, group_changes, paired_change,
                                       points, pooled_change, read_outcomes, run_changes)
from vrl_jax.evaluation.report import make_report
from vrl_jax.evaluation.writers import MetricWriter

LOW = "pass@1 Temperature=0.6"


def reference_clustered_se(diffs, clusters):
    """The sandwich formula written out with a dict and loops (independent of the vectorized version)."""
    mean = sum(diffs) / len(diffs)
    sums = {}
    for d, c in zip(diffs, clusters):
        sums[c] = sums.get(c, 0.0) + (d - mean)
    g = len(sums)
    return math.sqrt(g / (g - 1) * sum(v * v for v in sums.values())) / len(diffs)


def test_clustered_se_against_the_formula_and_singletons_give_the_usual_standard_error():
    rng = np.random.default_rng(0)
    diffs = rng.integers(-1, 2, size=50).astype(float)
    clusters = rng.integers(0, 12, size=50).tolist()
    assert clustered_se(diffs, clusters) == pytest.approx(reference_clustered_se(diffs, clusters), rel=1e-12)
    assert clustered_se(diffs, range(50)) == pytest.approx(diffs.std(ddof=1) / math.sqrt(50), rel=1e-12)
    assert math.isnan(clustered_se(diffs, [0] * 50))  # one problem: no estimate of the spread between problems


def test_repeating_every_problem_does_not_make_the_change_look_surer():
    """Each problem asked twice with the same outcome is no new evidence: the clustered SE stays, the naive
    one (items as independent) would shrink by sqrt(2)."""
    diffs = np.array([1.0, 0.0, -1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    twice = np.repeat(diffs, 2)
    assert clustered_se(twice, np.repeat(np.arange(8), 2)) == pytest.approx(clustered_se(diffs, np.arange(8)))
    assert clustered_se(twice, np.arange(16)) < 0.75 * clustered_se(diffs, np.arange(8))


def test_under_no_change_about_5_percent_of_runs_land_beyond_2_standard_errors():
    """Two evaluations of one unchanged policy (each problem solved with its own probability; 3 items per
    problem): |change| > 2 SE in about 5% of 2000 simulated pairs of evaluations. Items taken as
    independent would call far more of them real."""
    rng = np.random.default_rng(1)
    problems = np.repeat(np.arange(60), 3)
    beyond, naive_beyond = 0, 0
    for _ in range(2000):
        p = rng.beta(0.5, 2.0, size=60)[problems]
        # The items of one problem share their outcome (a repeat with another picture), drawn per evaluation.
        first = (rng.random(60) < p[::3]).repeat(3).astype(float)
        second = (rng.random(60) < p[::3]).repeat(3).astype(float)
        d = second - first
        se = clustered_se(d, problems)
        beyond += abs(d.mean()) > 2 * se if se > 0 else 0
        naive = d.std(ddof=1) / math.sqrt(len(d))
        naive_beyond += abs(d.mean()) > 2 * naive if naive > 0 else 0
    assert 0.03 < beyond / 2000 < 0.08
    assert naive_beyond / 2000 > 0.2


def test_paired_change_pairs_by_id_whatever_the_order_and_skips_unpaired_items():
    first = [{"id": "a", "problem": "x", LOW: 0.0}, {"id": "b", "problem": "y", LOW: 1.0},
             {"id": "c", "problem": "z", LOW: 0.0}, {"id": "gone", "problem": "w", LOW: 1.0}]
    second = [{"id": "c", "problem": "z", LOW: 1.0}, {"id": "a", "problem": "x", LOW: 1.0},
              {"id": "b", "problem": "y", LOW: 1.0}, {"id": "new", "problem": "v", LOW: 0.0}]
    c = paired_change(first, second, LOW)
    assert (c.before, c.after, c.items, c.problems) == (pytest.approx(1 / 3), 1.0, 3, 3)
    assert c.delta == pytest.approx(2 / 3)
    assert c.se == pytest.approx(np.std([1.0, 1.0, 0.0], ddof=1) / math.sqrt(3))
    assert paired_change(first, second, "pass@8 Temperature=1.0") is None


def _evaluations(workdir, scores_by_step):
    w = MetricWriter(str(workdir), tensorboard=False)
    for step, scores in scores_by_step.items():
        w.write(step, {f"acc/Test Set Epoch Accuracy {LOW}": float(np.mean(scores))}, split="eval", kind="eval")
        w.write_outcomes("test", step, [{"id": f"i{n}", "problem": f"p{n // 2}", LOW: s}
                                        for n, s in enumerate(scores)])
    w.close()


def test_a_run_s_outcome_files_give_the_console_lines_and_the_report_table(tmp_path):
    wd = tmp_path / "run"
    _evaluations(wd, {10: [0, 0, 1, 0, 0, 0], 20: [1, 1, 1, 0, 1, 1], 15: [0, 1, 0, 0, 0, 0]})
    assert sorted(read_outcomes(wd)["test"]) == [10, 15, 20]
    (change,) = run_changes(wd)  # first (10) -> last (20); 15 lies between
    assert (change.first_step, change.last_step) == (10, 20)
    d = np.array([1, 1, 0, 0, 1, 1], float)
    assert change.change.delta == pytest.approx(d.mean())
    assert change.change.se == pytest.approx(reference_clustered_se(d, [0, 0, 1, 1, 2, 2]))
    assert change_lines(wd) == [f"test {LOW}, step 10 -> 20: 16.7 -> 83.3: +66.7 ± "
                                f"{100 * change.change.se:.1f} points (6 items, 3 problems)"]
    text = make_report([str(wd)], out=tmp_path / "out", plots=False).read_text()
    assert "## What training changed, problem by problem" in text
    assert f"| test | {LOW} | 10 -> 20 | 16.7 -> 83.3 | +66.7 ± {100 * change.change.se:.1f}" in text
    assert "| 6 (3) |" in text


def test_a_split_evaluated_once_has_no_change(tmp_path):
    _evaluations(tmp_path / "once", {10: [0, 1]})
    assert run_changes(tmp_path / "once") == [] and change_lines(tmp_path / "once") == []
    assert change_markdown({"g": []}) == ""
    assert json.loads((tmp_path / "once" / "outcomes" / "test_10.jsonl").read_text().splitlines()[1]) == {
        "id": "i1", "problem": "p0", LOW: 1}


def test_readme_paired_command(tmp_path):
    """The README's command on two evaluate-style outcome files; a missing file and a malformed line are one
    paragraph naming them, without a traceback."""
    import shlex

    from tests.test_cli_commands import ok, readme, run
    command, = readme("python -m vrl_jax.evaluation.paired")
    _evaluations(tmp_path / "run", {10: [0, 0, 1, 0, 0, 0], 20: [1, 1, 1, 0, 1, 1]})
    for step, name in ((10, "before"), (20, "after")):
        written = tmp_path / "run" / "outcomes" / f"test_{step}.jsonl"
        (tmp_path / f"{name}.outcomes.jsonl").write_text(written.read_text())
    out = ok(run(shlex.split(command), tmp_path)).stdout
    (change,) = run_changes(tmp_path / "run")
    se = 100 * change.change.se
    assert out.splitlines() == [f"{LOW}: 16.7 -> 83.3: +66.7 ± {se:.1f} points (6 items, 3 problems)"]
    # Two pairs (another seed's evaluations, here the same files): their mean change and each pair's.
    out = ok(run(shlex.split(command) + ["before.outcomes.jsonl", "after.outcomes.jsonl"], tmp_path)).stdout
    assert out.splitlines() == [f"{LOW}: mean of 2 pairs: 16.7 -> 83.3: +66.7 ± {se:.1f} points (6 items, "
                                "3 problems); per pair +66.7, +66.7"]
    odd = run(shlex.split(command) + ["before.outcomes.jsonl"], tmp_path)
    assert odd.returncode == 2 and "3 files given: expected pairs" in odd.stderr and "Traceback" not in odd.stderr
    (tmp_path / "after.outcomes.jsonl").write_text('{"id": "i0", "' + LOW + '": 1}\nnot json\n')
    bad = run(shlex.split(command), tmp_path)
    assert bad.returncode == 2 and "after.outcomes.jsonl:2: expected a JSON object" in bad.stderr
    assert "Traceback" not in bad.stderr
    (tmp_path / "after.outcomes.jsonl").unlink()
    gone = run(shlex.split(command), tmp_path)
    assert gone.returncode == 2 and "after.outcomes.jsonl: cannot read it" in gone.stderr


def _rows(scores, problems=None):
    return [{"id": f"i{n}", "problem": f"p{n // 2 if problems is None else problems[n]}", LOW: float(s)}
            for n, s in enumerate(scores)]


def test_pooled_change_averages_each_item_over_the_runs_then_clusters_by_problem():
    rng = np.random.default_rng(2)
    problems = rng.integers(0, 9, size=24).tolist()
    pairs = [(_rows(rng.integers(0, 2, 24), problems), _rows(rng.integers(0, 2, 24), problems)) for _ in range(3)]
    pairs[2][1].pop(5)  # an item one run lacks counts in none
    ids = [f"i{n}" for n in range(24) if n != 5]
    per_item = {i: [] for i in ids}
    for before, after in pairs:
        b = {r["id"]: r[LOW] for r in before}
        for r in after:
            if r["id"] in per_item:
                per_item[r["id"]].append(r[LOW] - b[r["id"]])
    mean_diffs = [sum(v) / len(v) for v in per_item.values()]
    pooled = pooled_change(pairs, LOW)
    c = pooled.change
    assert c.items == 23 and c.delta == pytest.approx(sum(mean_diffs) / 23)
    assert c.se == pytest.approx(reference_clustered_se(mean_diffs, [problems[n] for n in range(24) if n != 5]))
    assert c.delta == pytest.approx(np.mean(pooled.per_pair))  # the same items in every pair
    for (before, after), d in zip(pairs, pooled.per_pair):
        kept = [r for r in after if r["id"] != "i5"]
        assert d == pytest.approx(paired_change(before, kept, LOW).delta)
    # One pair is paired_change; a run pooled with its own copy is no new evidence.
    assert pooled_change(pairs[:1], LOW).change == paired_change(*pairs[0], LOW)
    assert pooled_change([pairs[0], pairs[0]], LOW).change == pytest.approx(paired_change(*pairs[0], LOW))
    assert pooled_change(pairs, "pass@8 Temperature=1.0") is None and pooled_change([], LOW) is None
    # Changes in points: a mean of +3, -1 and -2 is no change (in floats -1e-18), printed as such.
    assert np.mean([0.03, -0.01, -0.02]) < 0 and points(np.mean([0.03, -0.01, -0.02])) == "+0.0"
    assert points(-0.025) == "-2.5"


def test_pooled_over_three_unchanged_runs_about_5_percent_land_beyond_2_standard_errors():
    """Three runs of an unchanged policy on the same 60 problems (3 items each), each run's evaluations drawn
    anew: the mean change lands beyond 2 SE in about 5% of 1000 simulated triples."""
    rng = np.random.default_rng(3)
    problems = np.repeat(np.arange(60), 3)
    beyond = 0
    for _ in range(1000):
        p = rng.beta(0.5, 2.0, size=60)
        pairs = [tuple(_rows((rng.random(60) < p).repeat(3), problems) for _ in range(2)) for _ in range(3)]
        c = pooled_change(pairs, LOW).change
        beyond += abs(c.delta) > 2 * c.se if c.se > 0 else 0
    assert 0.025 < beyond / 1000 < 0.085


def test_a_group_of_runs_gets_its_mean_change_in_the_report(tmp_path):
    _evaluations(tmp_path / "g_s0", {10: [0, 0, 1, 0, 0, 0], 20: [1, 1, 1, 0, 1, 1]})
    _evaluations(tmp_path / "g_s1", {10: [0, 1, 1, 0, 0, 0], 20: [0, 1, 1, 0, 0, 1]})
    _evaluations(tmp_path / "g_s2", {10: [0, 0, 0, 0, 0, 0], 30: [1, 0, 0, 0, 0, 0]})  # other steps: not pooled
    (pooled, per_run), = group_changes([tmp_path / "g_s0", tmp_path / "g_s1"])
    d = np.array([[1, 1, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1]], float)
    assert per_run == pytest.approx(tuple(d.mean(axis=1)))
    assert pooled.change.delta == pytest.approx(d.mean())
    assert pooled.change.se == pytest.approx(reference_clustered_se(d.mean(axis=0), [0, 0, 1, 1, 2, 2]))
    assert group_changes([tmp_path / "g_s0", tmp_path / "g_s2"]) == []
    text = make_report([str(tmp_path / "g_s0"), str(tmp_path / "g_s1")], out=tmp_path / "out", plots=False).read_text()
    assert (f"| g | mean of 2 runs (+66.7, +16.7) | test | {LOW} | 10 -> 20 | 25.0 -> 66.7 | +41.7 ± "
            f"{100 * pooled.change.se:.1f}") in text
