"""Report: plots and MAYE-protocol tables from synthetic workdirs (two groups x two seeds), and the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vrl_jax.evaluation import report
from vrl_jax.evaluation.passk import MAYE_SETTINGS, TRAIN_ACCURACY_KEY
from vrl_jax.evaluation.writers import MetricWriter

GROUPS = {"grpo": 0.30, "dyme": 0.45}  # base accuracy per group
SEEDS = (0, 1)
EPOCHS = 4
STEPS_PER_EPOCH = 2
ACC_KEYS = [s.metric_key(split) for split in ("val", "test") for s in MAYE_SETTINGS]


def _write_run(workdir: Path, name: str, seed: int) -> dict:
    """Writes a run; returns {key: {epoch: value}} of the accuracy it logged, and train series."""
    rng = np.random.default_rng([list(GROUPS).index(name), seed])
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"name": name, "seed": seed}))
    logged = {k: {} for k in ACC_KEYS + [TRAIN_ACCURACY_KEY]}
    logged["response/response_lengths"] = {}
    with MetricWriter(workdir, tensorboard=False) as w:
        for epoch in range(EPOCHS + 1):
            step = epoch * STEPS_PER_EPOCH
            if epoch:
                for s in range(step - STEPS_PER_EPOCH + 1, step + 1):
                    length = 300 + 20 * s + rng.normal() * 5
                    logged["response/response_lengths"][s] = length
                    train = {"response/response_lengths": length, "response/length_clip_ratio": 0.01 * s,
                             "reflection_analysis/reflection_ratio": 0.01 * s + 0.001 * seed,
                             "reflection_analysis/correct_ratio_in_reflection_texts": 0.4,
                             "reflection_words/wait": float(s), "reflection_words/verify": 2.0,
                             "training/entropy": 0.5 - 0.01 * s, "training/kl": 0.001 * s, "rews/scores": 0.3}
                    if name == "dyme":
                        train.update({"dyme/memorize_share": 0.2, "dyme/explore_share": 0.5,
                                      "dyme/skip_share": 0.3})
                    w.write(s, train)
                acc = GROUPS[name] + 0.05 * epoch + rng.uniform(-0.02, 0.02)
                logged[TRAIN_ACCURACY_KEY][epoch] = acc
                w.write(step, {TRAIN_ACCURACY_KEY: acc, "epoch": epoch}, kind="epoch")
            for split in ("val", "test"):
                values = {}
                for setting in MAYE_SETTINGS:
                    key = setting.metric_key(split)
                    values[key] = GROUPS[name] + 0.03 * epoch + 0.2 * (setting.k > 1) + rng.uniform(-0.05, 0.05)
                    logged[key][epoch] = values[key]
                w.write(step, {**values, "epoch": epoch}, split=split, kind="eval")
    return logged


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    logged, dirs = {}, []
    for name in GROUPS:
        for seed in SEEDS:
            wd = root / f"{name}_seed{seed}"
            logged[(name, seed)] = _write_run(wd, name, seed)
            dirs.append(wd)
    return root, dirs, logged


def _tables(md: str) -> dict:
    """{section title: {group: [cells]}} for every markdown table under a '### ' heading."""
    out, title = {}, None
    for line in md.splitlines():
        if line.startswith("### "):
            title = line[4:].strip()
            out[title] = {}
        elif line.startswith("## "):
            title = None
        elif title and line.startswith("| ") and not line.startswith("| group"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[title][cells[0]] = cells[1:]
    return out


def _pm(values) -> str:
    arr = np.asarray(values) * 100
    return f"{arr.mean():.2f} ± {arr.std(ddof=1):.2f}"


def test_report_files_and_numbers(runs, tmp_path):
    root, dirs, logged = runs
    md_path = report.make_report(dirs, out=tmp_path / "out")
    assert md_path == tmp_path / "out" / "report.md"
    pngs = {p.name for p in (tmp_path / "out").glob("*.png")}
    # Present metrics get a figure, absent ones (health/*) do not.
    assert pngs == {"accuracy.png", "response_length.png", "reflection_ratios.png", "reflection_words.png",
                    "entropy_kl.png", "rewards.png", "dyme_modes.png"}
    for name in pngs:
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = md_path.read_text()
    tables = _tables(md)
    for key in ACC_KEYS + [TRAIN_ACCURACY_KEY]:
        title = key.removeprefix("acc/").replace(" Set Epoch Accuracy", "")
        assert set(tables[title]) == set(GROUPS), title
        for name in GROUPS:
            per_seed = [logged[(name, s)][key] for s in SEEDS]
            trained = [[v for e, v in sorted(d.items()) if e > 0] for d in per_seed]
            expected = [str(len(SEEDS)), str(EPOCHS),
                        _pm([d[0] for d in per_seed]) if 0 in per_seed[0] else "–",
                        _pm([np.mean(t) for t in trained]), _pm([max(t) for t in trained]),
                        _pm([t[-1] for t in trained])]
            assert tables[title][name] == expected, (title, name)
    # Table order follows MAYE: Training, then Validation, then Test.
    order = [line for line in md.splitlines() if line.startswith("### ")]
    assert order[0] == "### Training" and order[1].startswith("### Validation") and order[-1].startswith("### Test")
    # Dynamics: the last step's response length, mean ± std over the two seeds.
    section = md.split("## Training dynamics")[1].split("## ")[0].splitlines()
    header = next(line for line in section if line.startswith("| group"))
    col = [c.strip() for c in header.strip("|").split("|")].index("response/response_lengths")
    row = next(line for line in section if line.startswith("| grpo |"))
    last = [logged[("grpo", s)]["response/response_lengths"][EPOCHS * STEPS_PER_EPOCH] for s in SEEDS]
    assert [c.strip() for c in row.strip("|").split("|")][col] == f"{np.mean(last):.4g} ± {np.std(last, ddof=1):.2g}"
    assert "![accuracy](accuracy.png)" in md


def test_grouping_rules(tmp_path):
    assert report.group_name(Path("runs/grpo_seed3"), r"/(\w+?)_seed") == "grpo"
    assert report.group_name(Path("runs/grpo-lr1e-6"), r"lr[\d.e-]+") == "lr1e-6"
    with pytest.raises(ValueError, match="does not match workdir runs/x"):
        report.group_name(Path("runs/x"), r"seed\d")
    wd = tmp_path / "maye-s2"
    wd.mkdir()
    assert report.group_name(wd) == "maye"  # no config.json: directory name without the seed suffix
    (wd / "config.json").write_text(json.dumps({"name": "maye_geo3k"}))
    assert report.group_name(wd) == "maye_geo3k"


def test_regex_groups_one_run_each(runs, tmp_path):
    _, dirs, logged = runs
    # Grouping by seed instead of by name: two groups of two runs (grpo and dyme mixed).
    md = report.make_report(dirs, out=tmp_path / "o", group=r"seed(\d)", plots=False).read_text()
    assert not list((tmp_path / "o").glob("*.png")) and "## Figures" not in md
    table = _tables(md)["Validation pass@1 Temperature=0.01"]
    assert set(table) == {"0", "1"} and table["0"][0] == "2"
    key = ACC_KEYS[0]
    maxes = [max(v for e, v in logged[(n, 0)][key].items() if e > 0) for n in GROUPS]
    assert table["0"][4] == _pm(maxes)


def test_cli_subprocess(runs, tmp_path):
    root, dirs, _ = runs
    # Default --out: the first workdir's report/.
    proc = subprocess.run([sys.executable, "-m", "vrl_jax.report", "--workdir", *map(str, dirs)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    assert (dirs[0] / "report" / "report.md").exists() and (dirs[0] / "report" / "accuracy.png").exists()
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "vrl_jax.report", "--workdir", str(dirs[0]), str(empty)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert str(empty) in proc.stderr and "metrics.jsonl" in proc.stderr


def test_accuracy_axis_is_decided_by_eval_rows(runs, tmp_path):
    loaded = report.load_runs([str(d) for d in runs[1]])
    assert report.accuracy_axis(loaded) == "epoch"  # eval rows carry epochs
    # A trainer run that evaluates every N steps: eval rows without epoch, epoch rows with one.
    wd = tmp_path / "by_step"
    with MetricWriter(str(wd), tensorboard=False) as w:
        w.write(0, {MAYE_SETTINGS[0].metric_key("val"): 0.0}, split="eval", kind="eval")
        w.write(3, {TRAIN_ACCURACY_KEY: 0.5, "epoch": 1}, split="epoch", kind="epoch")
        w.write(4, {MAYE_SETTINGS[0].metric_key("val"): 0.5}, split="eval", kind="eval")
    assert report.accuracy_axis(report.load_runs([str(wd)])) == "step"


def test_long_training_curves_are_smoothed_over_their_raw_points():
    """A noisy rising series: the moving average keeps the trend (its ends near the true line) and
    removes most of the noise; short series are left alone."""
    from vrl_jax.evaluation.report import smooth, smoothing_window
    rs = np.random.RandomState(0)
    steps = np.arange(120)
    truth = 0.10 + 0.001 * steps
    noisy = truth + rs.normal(0, 0.03, steps.size)
    window = smoothing_window(steps.size)
    assert window == 13 and smoothing_window(12) == 1
    smoothed = smooth(noisy, window)
    assert smoothed.shape == noisy.shape
    assert np.abs(smoothed - truth)[10:-10].std() < 0.4 * np.abs(noisy - truth).std()
    assert smoothed[-10:].mean() - smoothed[:10].mean() > 0.08  # the rise survives
    np.testing.assert_allclose(smooth([1.0, 2.0, 3.0, 10.0], 3), [1.5, 2.0, 5.0, 6.5])


def test_a_series_zero_at_every_step_gets_no_panel_and_is_named(tmp_path, monkeypatch):
    """A KL reward the recipe does not use, and reflection words no response wrote: no panel (no figure when
    every panel of it is flat), one line naming them; a series that is zero in one run only is plotted."""
    for seed in (0, 1):
        with MetricWriter(tmp_path / f"run_s{seed}", tensorboard=False) as w:
            for s in range(1, 4):
                w.write(s, {"rews/scores": 0.1 * s, "rews/kl_reward": 0.0, "reflection_words/wait": 0.0,
                            "reflection_words/verify": 0.0, "training/kl": 0.01 * s * seed})
    drawn = {}
    real = report.plot_panels

    def record(path, title, groups, keys, **kw):
        drawn[path.name] = list(keys)
        return real(path, title, groups, keys, **kw)

    monkeypatch.setattr(report, "plot_panels", record)
    md = report.make_report([tmp_path / "run_s0", tmp_path / "run_s1"], out=tmp_path / "out").read_text()
    assert drawn["rewards.png"] == ["rews/scores"] and "reflection_words.png" not in drawn
    assert drawn["entropy_kl.png"] == ["training/kl"]  # zero in seed 0 only
    (line,) = [x for x in md.splitlines() if x.startswith("Not plotted, zero at every step: ")]
    assert set(line.split(": ", 1)[1].split(", ")) == {"`rews/kl_reward`", "`reflection_words/wait`",
                                                        "`reflection_words/verify`"}
