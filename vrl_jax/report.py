"""`python -m vrl_jax.report --workdir DIR [DIR ...] [--out DIR] [--group REGEX]`: a run's (or a group of
runs') plots and tables. The report itself lives in `vrl_jax/evaluation/report.py`."""

import sys

from vrl_jax.errors import run_cli
from vrl_jax.evaluation.report import PROG, main

if __name__ == "__main__":
    sys.exit(run_cli(main, PROG))
