r"""The DyME comparison on the synthetic benchmark: SFT, GRPO, SFT then GRPO, and DyME from the same
start, equal budgets of optimizer steps, three seeds.

  python -m vrl_jax.train --config experiments/ablation.py:start --workdir workdirs/ablation/start
  for s in 0 1 2; do for a in sft grpo sft_grpo dyme; do
    python -m vrl_jax.train --config experiments/ablation.py:$a,$s --workdir workdirs/ablation/$a-$s
  done; done
  python -m vrl_jax.report --workdir workdirs/ablation/*/ --out workdirs/ablation/report

(`tools/ablation.sh` runs exactly this, two runs at a time.) One arm of each kind, seed 0:
`experiments/ablation.py:start`, `experiments/ablation.py:sft,0`, `experiments/ablation.py:grpo,0`,
`experiments/ablation.py:dyme,0`; `experiments/ablation.py` alone is `sft_grpo,0`.

Why a shared start: DyME's claim is about small *pretrained* models that are weak at the task, and a
random model never answers correctly, so reward-only RL would have nothing to learn from. The
`start` run gives every arm the same weak model: the tiny Qwen2.5-VL after WARMUP SFT steps
(a few percent accuracy), exported as an HF directory that the arms load through `model.path`
(override it with `--config.model.path=...` if the workdir lives elsewhere). Its final evaluation
is every arm's step-0 point, so the arms skip their own.

The variant is `algorithm,seed`: every arm takes BUDGET optimizer steps (SFT then GRPO splits them
2:1), with the prompt template, data, rewards and hyperparameters of `default.py` as they were when the
README's ablation figures were measured (3000 training problems, RL at 1e-4 without a KL term; `_common`
pins them). DyME memorizes the
hint followed by `\boxed{X}` (`dyme.answer_format = "boxed"`), the answer format SFT's solutions and
the accuracy judge use, so no arm is scored on a format another was not taught. Every arm is evaluated
on all 200 test_iid and 200 test_ood problems at pass@1, T=0.6 (MAYE's "medium" setting). The seed varies the
data order and the sampling; the data itself is the same for every run.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location("default", os.path.join(os.path.dirname(__file__), "default.py"))
_default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_default)

WARMUP = 500  # SFT steps of the shared start: pass@1 (T=0.6) ~8%, pass@8 (T=1.0) ~30%: mixed groups for RL
BUDGET = 120  # optimizer steps per arm: GRPO's training accuracy rises ~5 points over ~150 steps here
START_DIR = "workdirs/ablation/start/export"
ALGORITHMS = ("sft", "grpo", "sft_grpo", "dyme")


def _common(c):
    c.data.synthgeo.seed = 0  # the same data for every run
    # default.py's settings when the README's figures were measured (it has since moved to more data and RL
    # at 3e-4 with a KL term)
    c.data.synthgeo.train = 3000
    c.optim.learning_rate, c.loss.kl_coef = 1e-4, 0.0
    c.data.template = "plain"
    c.eval.splits = ("test_iid", "test_ood")
    c.eval.max_examples = 200  # all of each test split
    c.eval.batch_size = 50  # 50 images of <= 64 patches fit the largest patch bucket (4096)
    c.eval.settings = ("medium",)  # pass@1 at T=0.6, MAYE's "medium" setting
    c.checkpoint.every_steps = 40
    c.mesh.cpu_devices = 1  # one CPU device, as measured (default.py now splits the host in two)
    c.model.unroll_layers = False  # the layer scan, as measured (default.py now unrolls its 4 layers)
    return c


def get_config(arg: str | None = None):
    if arg == "start":
        c = _common(_default.get_config("sft"))
        c.name = "ablation_start"
        c.sft.steps = WARMUP
        c.eval.settings = ("medium", "high")  # the start's pass@8 says how much RL can sharpen
        c.eval.at_start = False  # a random model scores 0
        return c
    algorithm, _, seed = (arg or "sft_grpo,0").partition(",")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"experiments/ablation.py: variant {arg!r}: expected 'start' or ALGORITHM,SEED with "
                         f"ALGORITHM in {ALGORITHMS}")
    c = _common(_default.get_config({"sft_grpo": None}.get(algorithm, algorithm)))
    c.seed = int(seed or 0)
    c.name = f"ablation_{algorithm}"
    c.model.path = START_DIR
    c.eval.at_start = False
    if algorithm == "dyme":
        c.data.template = "plain"
        c.data.length_buckets = (96, 128)
        c.dyme.answer_format = "boxed"
    if algorithm == "sft":
        c.sft.steps, c.rl_steps = BUDGET, 0
    elif algorithm == "sft_grpo":
        c.sft.steps, c.rl_steps = BUDGET * 2 // 3, BUDGET // 3
    else:
        c.sft.steps, c.rl_steps = 0, BUDGET
    return c
