"""Train: `python -m vrl_jax.train --config experiments/<name>.py[:variant] --workdir DIR [--config.key=value ...]`.

The config file's `get_config(variant)` builds the experiment; it is locked before overrides apply,
so an unknown key or a value of the wrong type fails at once, and `configs.validate` checks values
and combinations (naming the key) before any model is loaded or compiled. Rerunning the same command
on a workdir with checkpoints resumes it. The run ends with a report in `DIR/report/`.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (file.py[:variant])",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, report)")
_REPORT = flags.DEFINE_bool("report", True, "render the report when the run ends")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    import jax

    from vrl_jax import configs
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config experiments/default.py")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    try:
        configs.validate(config, jax.device_count())
    except configs.ConfigValidationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = _WORKDIR.value
    os.makedirs(workdir, exist_ok=True)
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        # A restarted (preempted, killed) run reuses the compiled steps instead of compiling again.
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=2, default=str)
    from vrl_jax.trainer import train
    final = train(config, workdir)
    for key, value in sorted(final.items()):
        print(f"{key}: {value:.4f}")
    if _REPORT.value and jax.process_index() == 0:
        from vrl_jax.report import make_report
        print(f"report: {make_report([workdir])}")
    return 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
