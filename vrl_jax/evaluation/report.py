"""Report over runs: PNG curves and a markdown summary in MAYE's protocol (reference §3.6).

    python -m vrl_jax.report --workdir RUN [RUN ...] [--out DIR] [--group REGEX] [--no-plots]

Runs are grouped (one group = one method/config, several seeds): by `--group REGEX` (searched in the
workdir path; the first capture group, else the whole match, names the group), else by `name` in the
run's `config.json`, else by the directory name with a trailing seed suffix ("_seed3", "-s3") removed.

Accuracy (every `acc/...` key, e.g. `acc/Test Set Epoch Accuracy pass@1 Temperature=0.01`) is indexed
by the row's `epoch` field (completed epochs; 0 = before training), else by `step`. Per run, the mean
and the max over epochs >= 1 are taken; the table shows their mean ± std (ddof 1) over the group's
runs, in %, plus epoch 0 ("vanilla") where logged and the last epoch. Other curves are per generation
step from the `train` split, drawn as the mean over runs with a ±std band.

Workdirs and `--out` may be local or in a bucket (`gs://bucket/run`): files are read and written through
`etils.epath`, as the trainer writes them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from typing import Sequence

import numpy as np
from etils import epath

from vrl_jax.errors import UserError, bucket_client_missing
from vrl_jax.evaluation.evaluator import parse_breakdown_key
from vrl_jax.evaluation.paired import change_markdown
from vrl_jax.evaluation.writers import METRICS_FILE, read_metrics
from vrl_jax.storage import is_remote

_SEED_SUFFIX = re.compile(r"(?:[-_.](?:seed|s)|seed)[-_]?\d+$", re.IGNORECASE)

# (file, title, exact keys or "prefix/" entries) for the per-step figures.
FIGURES = (
    ("response_length.png", "Response length", ("response/response_lengths", "response/length_clip_ratio")),
    ("reflection_ratios.png", "Reflection ratios", ("reflection_analysis/",)),
    ("reflection_words.png", "Reflection words (count per step)", ("reflection_words/",)),
    ("entropy_kl.png", "Entropy and KL", ("training/entropy", "training/full_entropy", "training/kl",
                                          "training/kl_token_mean", "training/approx_policy_kl")),
    ("rewards.png", "Rewards", ("rews/",)),
    ("health.png", "Optimisation health", ("health/", "training/clipfrac", "training/ratios",
                                           "training/grad_norm", "training/lr")),
    ("dyme_modes.png", "DyME mode shares", ("dyme/",)),
)
# Keys summarised at the last logged step in the dynamics table.
DYNAMICS_KEYS = ("response/response_lengths", "reflection_analysis/reflection_ratio",
                 "reflection_analysis/correct_ratio_in_reflection_texts", "training/entropy", "training/kl",
                 "health/zero_variance_groups")


@dataclasses.dataclass
class Run:
    workdir: epath.Path
    group: str
    rows: list


def _config(workdir: epath.Path) -> dict:
    path = workdir / "config.json"
    if not path.exists():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{workdir}: config.json is not valid JSON: {exc}") from exc
    return cfg if isinstance(cfg, dict) else {}


def group_name(workdir: epath.Path, regex: str | None = None) -> str:
    """The group of a run (see the module docstring)."""
    if regex is not None:
        m = re.search(regex, str(workdir))
        if m is None:
            raise ValueError(f"--group {regex!r} does not match workdir {workdir}")
        return m.group(1) if m.groups() else m.group(0)
    name = _config(workdir).get("name")
    if isinstance(name, str) and name:
        return name
    # A local path is resolved first, so "." and a symlink name the directory they stand for.
    name = workdir.name if is_remote(workdir) else os.path.basename(os.path.realpath(workdir))
    return _SEED_SUFFIX.sub("", name) or name


def load_runs(workdirs: Sequence[str | os.PathLike], group: str | None = None) -> list[Run]:
    runs = []
    for wd in workdirs:
        wd = epath.Path(wd)
        if not (wd / METRICS_FILE).exists():
            raise FileNotFoundError(f"{wd}: no {METRICS_FILE} here; pass the workdir of a run (the folder "
                                    "holding metrics.jsonl)")
        runs.append(Run(wd, group_name(wd, group), read_metrics(wd)))
    return runs


def by_group(runs: Sequence[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    return groups


def series(run: Run, key: str, *, split: str | None = None, x: str = "step") -> dict[float, float]:
    """{x: value} for `key` over the run's rows (optionally one split); x = "epoch" uses the row's
    epoch (falling back to step). Null (non-finite) values are skipped; a repeated x keeps the last."""
    out = {}
    for row in run.rows:
        if key not in row or row[key] is None or (split is not None and row.get("split") != split):
            continue
        xv = row.get("epoch", row["step"]) if x == "epoch" else row["step"]
        out[float(xv)] = float(row[key])
    return out


# ---- accuracy summary -------------------------------------------------------------------------


def accuracy_keys(runs: Sequence[Run]) -> list[str]:
    """Every `acc/...` key present, ordered Training, Validation, Test, then the rest, then by name."""
    keys = {k for run in runs for row in run.rows for k in row if k.startswith("acc/")}
    order = ("Training", "Validation", "Test")
    return sorted(keys, key=lambda k: (next((i for i, s in enumerate(order) if s in k), len(order)), k))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


@dataclasses.dataclass
class AccuracySummary:
    """Per group, over its runs: (mean, std) of each run's mean/max/last over epochs >= 1, and of
    epoch 0 where logged. `epochs` = (min, max) epochs >= 1 per run."""

    runs: int
    epochs: tuple
    mean: tuple
    max: tuple
    last: tuple
    vanilla: tuple | None


def summarize_accuracy(runs: Sequence[Run], key: str) -> AccuracySummary | None:
    """MAYE's table numbers for one key over one group's runs; None when no run logged the key."""
    means, maxes, lasts, vanilla, n_epochs = [], [], [], [], []
    for run in runs:
        s = series(run, key, x="epoch")
        if 0.0 in s:
            vanilla.append(s[0.0])
        trained = [s[e] for e in sorted(s) if e > 0]
        if trained:
            means.append(float(np.mean(trained)))
            maxes.append(max(trained))
            lasts.append(trained[-1])
            n_epochs.append(len(trained))
    if not means and not vanilla:
        return None
    nan = (math.nan, math.nan)
    return AccuracySummary(
        runs=len(means), epochs=(min(n_epochs), max(n_epochs)) if n_epochs else (0, 0),
        mean=_mean_std(means) if means else nan, max=_mean_std(maxes) if maxes else nan,
        last=_mean_std(lasts) if lasts else nan, vanilla=_mean_std(vanilla) if vanilla else None)


def fmt_pct(pair: tuple | None, runs: int) -> str:
    """`(0.4123, 0.0101)` -> "41.23 ± 1.01" in %, the std only with 2+ runs; "–" when missing."""
    if pair is None or math.isnan(pair[0]):
        return "–"
    mean, std = pair
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if runs > 1 else f"{100 * mean:.2f}"


def _title(key: str) -> str:
    return key.removeprefix("acc/").replace(" Set Epoch Accuracy", "")


def accuracy_markdown(groups: dict[str, list[Run]]) -> str:
    lines = []
    for key in accuracy_keys([r for runs in groups.values() for r in runs]):
        lines += [f"### {_title(key)}", "", f"`{key}`", "",
                  "| group | runs | epochs | epoch 0 | mean over epochs | max over epochs | last epoch |",
                  "|---|---|---|---|---|---|---|"]
        for name, runs in groups.items():
            s = summarize_accuracy(runs, key)
            if s is None:
                continue
            lo, hi = s.epochs
            epochs = f"{lo}" if lo == hi else f"{lo}–{hi}"
            vanilla_runs = sum(0.0 in series(r, key, x="epoch") for r in runs)
            lines.append(f"| {name} | {s.runs} | {epochs} | {fmt_pct(s.vanilla, vanilla_runs)} | "
                         f"{fmt_pct(s.mean, s.runs)} | {fmt_pct(s.max, s.runs)} | {fmt_pct(s.last, s.runs)} |")
        lines.append("")
    return "\n".join(lines)


def dynamics_markdown(groups: dict[str, list[Run]]) -> str:
    present = [k for k in DYNAMICS_KEYS if any(series(r, k, split="train") for rs in groups.values() for r in rs)]
    if not present:
        return ""
    lines = ["## Training dynamics at the last logged step", "",
             "Mean ± std over runs (raw units).", "",
             "| group | " + " | ".join(present) + " |", "|---" * (len(present) + 1) + "|"]
    for name, runs in groups.items():
        cells = []
        for key in present:
            last = [s[max(s)] for s in (series(r, key, split="train") for r in runs) if s]
            if not last:
                cells.append("–")
                continue
            mean, std = _mean_std(last)
            cells.append(f"{mean:.4g} ± {std:.2g}" if len(last) > 1 else f"{mean:.4g}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def breakdown_markdown(groups: dict[str, list[Run]]) -> str:
    """Accuracy per value of each `eval.breakdown` field (synthgeo's family, modality): the first and the
    last evaluation of each run, in %, as the mean over the group's runs. Where RL helps and where it hurts."""
    keys = sorted({k for rs in groups.values() for r in rs for row in r.rows for k in row
                   if parse_breakdown_key(k) is not None})
    tables: dict[tuple, list[str]] = {}
    for key in keys:
        split, field, value, label = parse_breakdown_key(key)
        if label != "num_problems":
            tables.setdefault((split, field), [])
            if label not in tables[(split, field)]:
                tables[(split, field)].append(label)
    if not tables:
        return ""
    lines = ["## Accuracy by record field", "",
             "In %, first -> last evaluation of each run (mean over the group's runs); problems in parentheses.", ""]
    for (split, field), labels in tables.items():
        lines += [f"### {split} by {field}", "", f"| group | {field} | " + " | ".join(labels) + " |",
                  "|---|---|" + "---|" * len(labels)]
        values = sorted({parse_breakdown_key(k)[2] for k in keys if parse_breakdown_key(k)[:2] == (split, field)})
        for name, runs in groups.items():
            for value in values:
                prefix = f"eval/{split}/{field}/{value}/"
                count = [s[max(s)] for s in (series(r, prefix + "num_problems") for r in runs) if s]
                cells = []
                for label in labels:
                    curves = [s for s in (series(r, prefix + label) for r in runs) if s]
                    first = np.mean([s[min(s)] for s in curves]) if curves else math.nan
                    last = np.mean([s[max(s)] for s in curves]) if curves else math.nan
                    cells.append("–" if not curves else f"{100 * first:.1f} -> {100 * last:.1f}")
                problems = f" ({int(count[0])})" if count else ""
                lines.append(f"| {name} | {value}{problems} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# ---- plots -----------------------------------------------------------------------------------------


def _select(keys: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """Keys equal to a pattern, or under a "prefix/" pattern in logging order (MAYE's ratio order)."""
    out = []
    for p in patterns:
        matched = [k for k in keys if k.startswith(p)] if p.endswith("/") else [p] if p in keys else []
        out += [k for k in matched if k not in out]
    return out


def _band(runs: Sequence[Run], key: str, split: str | None, x: str, scale: float):
    per_run = [series(r, key, split=split, x=x) for r in runs]
    xs = sorted({xv for s in per_run for xv in s})
    mean, std = [], []
    for xv in xs:
        vals = np.asarray([s[xv] for s in per_run if xv in s]) * scale
        mean.append(vals.mean())
        std.append(vals.std(ddof=1) if vals.size > 1 else 0.0)
    return np.asarray(xs), np.asarray(mean), np.asarray(std)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average of a 1-D series, the window shrinking at the ends (no padding values):
    [n] -> [n]."""
    values = np.asarray(values, np.float64)
    n, half = values.size, max(window, 1) // 2
    csum = np.concatenate([[0.0], np.cumsum(values)])
    lo, hi = np.maximum(np.arange(n) - half, 0), np.minimum(np.arange(n) + half + 1, n)
    return (csum[hi] - csum[lo]) / (hi - lo)


def smoothing_window(points: int) -> int:
    """An odd window of about a tenth of the series (1 = no smoothing for 12 points or fewer)."""
    return 1 if points <= 12 else 2 * max(points // 20, 1) + 1


def plot_panels(path: epath.Path, title: str, groups: dict[str, list[Run]], keys: Sequence[str], *,
                split: str | None, x: str, xlabel: str, scale: float = 1.0, ylabel: str = "",
                titles: dict | None = None) -> epath.Path:
    """One panel per key, one colour per group: the mean over its runs, shaded ±std. A long, noisy series
    (a training curve of more than 12 steps) is drawn as its raw points plus a moving average
    (`smoothing_window`), so a trend shows through per-step noise without hiding it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.2 * nrows + 0.7), squeeze=False,
                             layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, keys):
        for i, (name, runs) in enumerate(groups.items()):
            xs, mean, std = _band(runs, key, split, x, scale)
            if not xs.size:
                continue
            c = colors[i % len(colors)]
            window = smoothing_window(xs.size)
            label = f"{name} (n={len(runs)})" + (f", {window}-step average" if window > 1 else "")
            if window > 1:
                ax.scatter(xs, mean, color=c, s=4, alpha=0.35, lw=0)
                mean, std = smooth(mean, window), smooth(std, window)
            ax.plot(xs, mean, color=c, lw=1.6, marker="o" if xs.size <= 12 else None, ms=3, label=label)
            ax.fill_between(xs, mean - std, mean + std, color=c, alpha=0.2, lw=0)
        ax.set_title((titles or {}).get(key, key), fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs and steps are whole numbers
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    legend = {}  # label -> handle, over all panels: a group may be missing from the first one
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    handles, labels = list(legend.values()), list(legend)
    fig.suptitle(title, fontsize=11)
    if handles:
        fig.legend(handles, labels, loc="outside upper right", fontsize=8, ncols=min(4, len(labels)))
    with path.open("wb") as f:  # a file object: matplotlib cannot open a gs:// path itself
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path


def make_report(workdirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None,
                group: str | None = None, plots: bool = True) -> epath.Path:
    """Writes `report.md` and (unless `plots=False`) the PNGs into `out` (default `<first workdir>/report`);
    returns the path of report.md."""
    if not workdirs:
        raise ValueError("no workdirs given")
    runs = load_runs(workdirs, group)
    groups = by_group(runs)
    out = epath.Path(out) if out is not None else epath.Path(workdirs[0]) / "report"
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    acc = accuracy_keys(runs)
    if acc and plots:
        unit = accuracy_axis(runs)
        figures.append(plot_panels(out / "accuracy.png", f"Accuracy per {unit} (mean ± std over runs)", groups, acc,
                                   split=None, x="epoch", xlabel=unit, scale=100.0, ylabel="accuracy (%)",
                                   titles={k: _title(k) for k in acc}))
    train_keys = [k for k in dict.fromkeys(k for r in runs for row in r.rows if row.get("split") == "train"
                                           for k in row) if k not in acc]
    # A series that is zero at every step of every run (a KL reward the recipe does not use, a reflection
    # word nobody wrote) gets no panel; the report names them.
    flat = [k for k in dict.fromkeys(k for _, _, patterns in FIGURES for k in _select(train_keys, patterns))
            if not any(v != 0 for r in runs for v in series(r, k, split="train").values())]
    for fname, title, patterns in FIGURES:
        keys = [k for k in _select(train_keys, patterns) if k not in flat]
        if keys and plots:
            prefixes = [p for p in patterns if p.endswith("/")]
            short = {k: next((k[len(p):] for p in prefixes if k.startswith(p)), k) for k in keys}
            figures.append(plot_panels(out / fname, title, groups, keys, split="train", x="step",
                                       xlabel="generation step", titles=short))
    md = ["# vrl_jax report", "", "## Runs", "", "| group | workdir | last step | rows |", "|---|---|---|---|"]
    for name, grp in groups.items():
        for r in grp:
            last = max((row["step"] for row in r.rows), default="–")
            md.append(f"| {name} | `{r.workdir}` | {last} | {len(r.rows)} |")
    md += ["", "## Accuracy (MAYE Table 3 protocol)", "",
           "In %: for each run, the mean / max / last value over epochs >= 1 (epoch 0 = before training, "
           "MAYE's \"Vanilla\"); shown as mean ± std (ddof 1) over the group's runs.", ""]
    md.append(accuracy_markdown(groups) if acc else "No `acc/...` metrics logged yet.\n")
    md.append(change_markdown(groups))
    md.append(breakdown_markdown(groups))
    md.append(dynamics_markdown(groups))
    if figures:
        md += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures] + [""]
        if flat:
            md += ["Not plotted, zero at every step: " + ", ".join(f"`{k}`" for k in flat), ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path


def accuracy_axis(runs) -> str:
    """"epoch", or "step" when the runs' eval rows carry no epoch (evaluation every N steps). Only eval
    rows decide: the trainer's epoch rows (training accuracy) always carry an epoch."""
    eval_rows = [row for r in runs for row in r.rows if row.get("split") == "eval"]
    return "step" if eval_rows and not any("epoch" in row for row in eval_rows) else "epoch"


PROG = "python -m vrl_jax.report"


def check_inputs(workdirs: Sequence[str], group: str | None, out: str | None) -> None:
    """Every --workdir is a run directory, --group a regular expression that names each and --out no
    file, before any plot is drawn; raises `UserError` naming the argument."""
    for flag, path in [("--workdir", wd) for wd in workdirs] + ([("--out", out)] if out is not None else []):
        try:
            epath.Path(path).exists()
        except ImportError as exc:  # a bucket whose client library (gcsfs for gs://) is not installed
            raise bucket_client_missing(path, flag, exc) from exc
    if out is not None and epath.Path(out).exists() and not epath.Path(out).is_dir():
        raise UserError(f"--out {out} is a file; name the folder to write report.md and the figures to.")
    for wd in workdirs:
        if not epath.Path(wd).is_dir():
            raise UserError(f"--workdir {wd}: no such directory; pass the workdir of a training run (the "
                            f"folder holding {METRICS_FILE}, config.json and checkpoints/).")
    if group is not None:
        try:
            re.compile(group)
        except re.error as exc:
            raise UserError(f"--group {group!r} is not a regular expression: {exc}") from exc
    try:
        load_runs(workdirs, group)
    except (FileNotFoundError, ValueError) as exc:  # no metrics.jsonl, a --group that misses, a broken config.json
        raise UserError(f"{exc}") from exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", nargs="+", required=True, help="run directories holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="output folder (default: <first workdir>/report)")
    parser.add_argument("--group", default=None, help="regex on the workdir path; group 1 names the group")
    parser.add_argument("--no-plots", action="store_true", help="write report.md only")
    args = parser.parse_args(argv)
    check_inputs(args.workdir, args.group, args.out)
    path = make_report(args.workdir, args.out, args.group, plots=not args.no_plots)
    figures = path.read_text().count("](")  # one markdown image link per figure written
    print(f"wrote {path} and {figures} figures")
    return 0
