"""Which files and functions one GRPO step runs: the loop's reading map, measured rather than written by hand.

  python tools/trace_step.py [--config experiments/default.py:smoke] [--json FILE] [--config.KEY=VALUE ...]

Runs the train command (`vrl_jax.train`) for one RL step, with no SFT stage and no evaluation, in a temporary
workdir. A Python profiler is on while `trainer.Loop.rl_step` runs. That first step traces its jitted programs, so
the Python inside `jax.jit` is listed too: the sampler's decode loop, the loss, the optimizer.
- One line per vrl_jax file, in the order the step first entered it, with the functions called there (nested
  functions and lambdas only in the JSON).
- `models/` (the network) is summarised apart.
- Files entered only by the data pipeline's prefetch threads (preparing the next batch while the step runs) are
  marked "(background)".
- The last line is the count. `--json FILE` also writes {file: {"functions": [...], "background": bool}}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "vrl_jax") + os.sep
SMOKE = "experiments/default.py:smoke"
# One RL step of the config as given: no SFT stage, no evaluation, no export, no report.
ONE_STEP = ("--config.sft.steps=0", "--config.rl_steps=1", "--config.eval.at_start=False",
            "--config.eval.splits=()", "--config.checkpoint.export_hf=False", "--noreport")


class Recorder:
    """Calls into vrl_jax source files while `on`: per file, the functions in first-call order and
    whether only a background thread entered it."""

    def __init__(self):
        self.on = False
        self.main = threading.get_ident()
        self.files: dict[str, dict] = {}

    def __call__(self, frame, event, arg):
        if event != "call" or not self.on:
            return
        path = frame.f_code.co_filename
        if not path.startswith(PACKAGE):
            return
        entry = self.files.setdefault(os.path.relpath(path, ROOT), {"functions": [], "background": True})
        name = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)  # qualname: Python >= 3.11
        if name not in entry["functions"]:
            entry["functions"].append(name)
        if threading.get_ident() == self.main:
            entry["background"] = False


def trace_one_step(config: str, workdir: str, overrides: list[str]) -> dict[str, dict]:
    from vrl_jax import train, trainer
    from vrl_jax.errors import run_cli

    recorder, rl_step = Recorder(), trainer.Loop.rl_step

    def traced(self, *args, **kwargs):
        recorder.on = not recorder.files  # the first RL step only
        try:
            return rl_step(self, *args, **kwargs)
        finally:
            recorder.on = False

    trainer.Loop.rl_step = traced
    sys.setprofile(recorder)
    threading.setprofile(recorder)
    try:
        code = run_cli(train.main, "tools/trace_step.py",
                             ["--config", config, "--workdir", workdir, *ONE_STEP, *overrides])
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
        trainer.Loop.rl_step = rl_step
    if code or not recorder.files:
        raise SystemExit(code or "tools/trace_step.py: the run made no RL step")
    return recorder.files


def summary(files: dict[str, dict]) -> list[str]:
    model = [f for f in files if f.startswith("vrl_jax/models/")]
    loop = [f for f in files if f not in model]
    background = [f for f in loop if files[f]["background"]]
    lines = [f"{f}{' (background)' if files[f]['background'] else ''}: "
             f"{', '.join(n for n in files[f]['functions'] if '<locals>' not in n)}" for f in loop]
    lines.append(f"vrl_jax/models/ (the network): {len(model)} files: {', '.join(os.path.basename(f) for f in model)}")
    lines.append(f"files: {len(loop) - len(background)} outside models/ in the step's own thread, "
                 f"{len(background)} more in the data pipeline's background threads, {len(model)} in models/")
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tools/trace_step.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=SMOKE, help=f"the experiment, FILE.py[:variant] (default {SMOKE})")
    parser.add_argument("--json", help="also write the trace to this file")
    args, overrides = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory(prefix="trace_step_") as workdir:
        files = trace_one_step(args.config, workdir, overrides)
    print(f"one GRPO step of {args.config}: the vrl_jax functions it ran, by file, in first-call order")
    for line in summary(files):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(files, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main(sys.argv[1:]))
