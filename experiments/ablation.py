r"""The DyME comparison on the synthetic benchmark: SFT, GRPO, SFT then GRPO, and DyME from the same
tiny random model, equal budgets of optimizer steps, several seeds.

  for a in sft grpo sft_grpo dyme; do for s in 0 1 2; do
    python -m vrl_jax.train --config experiments/ablation.py:$a,$s --workdir workdirs/ablation/$a-$s
  done; done
  python -m vrl_jax.report --workdir workdirs/ablation/* --out workdirs/ablation/report

The variant is `algorithm,seed`. Every run has the same total number of optimizer steps
(`BUDGET`); SFT then GRPO splits it. The name groups the seeds in the report.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location("default", os.path.join(os.path.dirname(__file__), "default.py"))
_default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_default)

BUDGET = 120  # optimizer steps per run
ALGORITHMS = ("sft", "grpo", "sft_grpo", "dyme")


def get_config(arg: str | None = None):
    algorithm, _, seed = (arg or "sft_grpo,0").partition(",")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"experiments/ablation.py: algorithm {algorithm!r} not in {ALGORITHMS}")
    c = _default.get_config({"sft_grpo": None}.get(algorithm, algorithm))
    c.seed = int(seed or 0)
    c.name = f"ablation_{algorithm}"
    c.data.synthgeo.seed = 0  # the same data for every run; the seed varies model init, order and sampling
    c.eval.max_examples = 64
    if algorithm == "sft":
        c.sft.steps, c.rl_steps = BUDGET, 0
    elif algorithm == "grpo":
        c.sft.steps, c.rl_steps = 0, BUDGET
    elif algorithm == "sft_grpo":
        c.sft.steps, c.rl_steps = BUDGET * 2 // 3, BUDGET // 3
    else:
        c.sft.steps, c.rl_steps = 0, BUDGET
    return c
