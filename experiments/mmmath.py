r"""MAYE's mm_math5k recipe (text-dominant math with images): REINFORCE++ as in `geo.py`.

  python -m vrl_jax.train --config experiments/mmmath.py --workdir workdirs/mmmath \
      --config.model.path=ckpt/qwen25vl7b --config.data.train=datasets/mm_math/mm_math_rl_v0.jsonl

Same hyper-parameters as geo.py (MAYE's launch script); 30 epochs of 5,000 problems at 896 prompts
per step is 150 steps (paper Sec. 5.1); validation on 100 problems and test on 100 MathVerse problems.
"""

import importlib.util
import os

from vrl_jax.configs import base_config

_spec = importlib.util.spec_from_file_location("geo", os.path.join(os.path.dirname(__file__), "geo.py"))
_geo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_geo)


def get_config(arg: str | None = None):
    if arg:
        raise ValueError(f"experiments/mmmath.py takes no variant, got {arg!r}")
    c = _geo.maye_recipe(base_config(), "mm_math")
    c.name = "maye_mmmath"
    c.model.path = "ckpt/qwen2.5-vl-7b-instruct"
    c.data.eval = {"val": "datasets/mm_math/mm_math_validation_v0.jsonl",
                   "test": "datasets/mm_math/math_verse_test_v0.jsonl"}
    c.rl_steps = 150
    c.eval.every_steps = 5  # every epoch (5000 / 896 ~ 5.6 steps)
    return c
