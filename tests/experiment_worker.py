"""Runs experiment stand-ins for `test_experiments.py` one after another in this one process (one JAX
start; compiled programs shared through the persistent compilation cache the test points it to), on
one CPU device.

Protocol: one JSON request per stdin line, `{"spec": "experiments/geo.py:tiny", "root": STANDIN_DIR,
"workdir": DIR}`; the reply is one stdout line `RESULT_PREFIX + json` with `ok`, `seconds`, `probe` (what the credit
assignment was called with, per RL step) and, on failure, `error` (the traceback). Everything else on
stdout is the run's own log.
"""

from __future__ import annotations

import json
import sys
import time
import traceback

RESULT_PREFIX = "@@experiment-result "


def probed_credit(probe: dict):
    """`algorithms.credit`, recording (algorithm, estimator, samples per prompt) and the advantages' rank."""
    from vrl_jax.rl import algorithms
    credit = algorithms.credit

    def wrapped(cfg, total, correct, **kw):
        out = credit(cfg, total, correct, **kw)
        probe["credit"].append([cfg.algorithm, cfg.estimator, cfg.num_samples])
        probe["advantage_ndim"].append(int(out.advantages.ndim))
        return out
    return credit, wrapped


def run(spec: str, root: str, workdir: str) -> dict:
    """The stand-in of `spec` in `workdir`."""
    from vrl_jax import standin
    from vrl_jax.evaluation.report import make_report
    from vrl_jax.rl import algorithms
    from vrl_jax.trainer import train
    t0, cpu0 = time.perf_counter(), time.process_time()
    config = standin.standin_config(standin.load_experiment(spec), root)
    probe = {"credit": [], "advantage_ndim": []}
    original, algorithms.credit = probed_credit(probe)
    try:
        final = train(config, workdir).metrics  # as `python -m vrl_jax.train` does: train, then report
    finally:
        algorithms.credit = original
    make_report([workdir], plots=False)  # the tables from the recipe's metrics; plots: test_report.py
    return {"ok": True, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0,
            "final": final, "probe": probe}


def main() -> int:
    for line in sys.stdin:
        request = json.loads(line)
        t0 = time.perf_counter()
        try:
            reply = run(**request)
        except BaseException:  # noqa: BLE001 - a failing recipe is a result, not the worker's end
            reply = {"ok": False, "seconds": time.perf_counter() - t0, "error": traceback.format_exc()}
        print(RESULT_PREFIX + json.dumps(reply, default=float), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
