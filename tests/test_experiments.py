"""Every experiment file runs: each `experiments/*.py` (found by glob) and each variant its docstring
lists, on a stand-in that keeps the whole recipe except its size (`vrl_jax/standin.py`).

Variant convention: the plain file (`get_config(None)`) always runs, plus every token
`experiments/<file>.py:<variant>` in the file's own docstring that names the file itself
(shell placeholders such as `:$a,$s` are not tokens). A new file or a new listed variant is covered
without editing this test.

One stand-in run per variant: 1 SFT step where the recipe has SFT, 2 RL steps where it has RL, and
the evaluations its schedule gives (at least one), all in one worker process on one CPU device
(`tests/experiment_worker.py`: one JAX start, one compilation cache for the module). The tests check
the recipe's behaviour in what the runs wrote, not only that they ended.
"""

from __future__ import annotations

import ast
import glob
import json
import math
import os
import queue
import re
import shlex
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tests.experiment_worker import RESULT_PREFIX
from vrl_jax import configs, standin
from tests.xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py")))
RUN_TIMEOUT_S = 900


def listed_variants(path: str) -> list[str]:
    """`file.py` and `file.py:<variant>` for each variant token of the file's docstring, in order."""
    name = os.path.basename(path)
    with open(path, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    out = [name]
    for variant in re.findall(r"experiments/" + re.escape(name) + r":([A-Za-z0-9_][A-Za-z0-9_,.-]*)", doc):
        if f"{name}:{variant}" not in out:
            out.append(f"{name}:{variant}")
    return out


VARIANTS = [v for path in EXPERIMENTS for v in listed_variants(path)]


def recipe(variant: str):
    return standin.load_experiment(os.path.join(ROOT, "experiments", variant))


def flat(c, prefix="") -> dict:
    out = {}
    for key, value in c.items():
        if hasattr(value, "items"):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_variants_are_found_by_glob_and_docstring():
    assert {"default.py", "geo.py", "mmmath.py", "dyme.py", "ablation.py"} <= {os.path.basename(p) for p in
                                                                              EXPERIMENTS}
    assert {"default.py:smoke", "geo.py:tiny", "ablation.py:start", "ablation.py:dyme,0"} <= set(VARIANTS)
    assert not any("$" in v for v in VARIANTS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_experiment_config_validates(variant):
    configs.validate(recipe(variant), num_devices=1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_standin_changes_only_size_and_path_keys(variant, tmp_path):
    """The stand-in differs from the recipe only in `standin.SIZE_KEYS`, and keeps its kind of run."""
    c = recipe(variant)
    s = standin.apply_overrides(c, standin.standin_overrides(c, str(tmp_path)))
    before, after = flat(c), flat(s)
    assert set(before) == set(after)
    changed = sorted(k for k in before if before[k] != after[k])
    assert changed and all(standin.is_size_key(k) for k in changed), changed
    assert (s.sft.steps > 0) == (c.sft.steps > 0) and (s.rl_steps > 0) == (c.rl_steps + c.rl_epochs > 0)
    assert (s.advantage.num_whiten_shards > 1) == (c.advantage.num_whiten_shards > 1)
    assert (s.num_mini > 1) == (c.num_mini > 1) and (s.num_micro > s.num_mini) == (c.num_micro > c.num_mini)
    configs.validate(s, num_devices=1)


def test_size_keys_are_sizes_and_paths_only():
    """Written out here, so that widening what a stand-in may change is a visible change of this test."""
    assert standin.SIZE_KEYS == (
        "model.path", "data.train", "data.eval.*", "data.synthgeo.train", "data.synthgeo.val",
        "data.synthgeo.test", "data.length_buckets", "data.patch_buckets", "sft.steps", "sft.batch_size",
        "sft.max_target_tokens", "rl_steps", "rl_epochs", "prompts_per_step", "num_micro", "num_mini",
        "rollout.max_new_tokens", "eval.max_new_tokens", "eval.batch_size", "advantage.num_whiten_shards")


def test_standin_cli_explains_a_missing_file_or_variant(tmp_path, capsys):
    assert standin.main([str(tmp_path / "nope.py"), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no config file" in err and "nope.py" in err
    assert standin.main([os.path.join(ROOT, "experiments", "geo.py:huge"), str(tmp_path)]) == 2
    assert "unknown variant 'huge'" in capsys.readouterr().err
    assert not os.listdir(tmp_path)  # nothing was written


def test_apply_overrides_refuses_recipe_keys(tmp_path):
    c = recipe("geo.py")
    with pytest.raises(ValueError, match="loss.kl_coef"):
        standin.apply_overrides(c, {"model.path": str(tmp_path), "loss.kl_coef": 0.0})


# -- the runs ----------------------------------------------------------------------------------------


def cli_env(cache_dir: str) -> dict:
    """One CPU device (conftest's 8 would need batches of 8), and the module's compilation cache."""
    return {**os.environ, "XLA_FLAGS": xla_flags(), "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
            "JAX_COMPILATION_CACHE_DIR": cache_dir, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


class Worker:
    """`tests/experiment_worker.py` in one subprocess: one JAX start and compilation cache for every run."""

    def __init__(self, cache_dir: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.experiment_worker"], cwd=ROOT,
                                     env=cli_env(cache_dir), text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def run(self, spec: str, root: str, workdir: str, **options) -> tuple[dict, str]:
        self.proc.stdin.write(json.dumps({"spec": spec, "root": root, "workdir": workdir, **options}) + "\n")
        self.proc.stdin.flush()
        log, deadline = [], time.time() + RUN_TIMEOUT_S
        while True:
            try:
                line = self.lines.get(timeout=max(1.0, deadline - time.time()))
            except queue.Empty:
                pytest.fail(f"{spec}: no result within {RUN_TIMEOUT_S} s:\n" + "".join(log[-50:]))
            if line is None:
                pytest.fail(f"{spec}: the worker died:\n" + "".join(log[-80:]))
            if line.startswith(RESULT_PREFIX):
                return json.loads(line[len(RESULT_PREFIX):]), "".join(log)
            log.append(line)

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def standin_root(tmp_path_factory):
    return standin.prepare(str(tmp_path_factory.mktemp("standin")))


@pytest.fixture(scope="module")
def cache_dir(session_jax_cache):
    return session_jax_cache


@pytest.fixture(scope="module")
def worker(cache_dir):
    w = Worker(cache_dir)
    yield w
    w.close()


TIMES: dict[str, tuple[int, int, int, float, float]] = {}


@pytest.fixture(scope="module", autouse=True)
def time_table():
    """Prints (with `pytest -s`) what each run did and took: SFT steps, RL steps, evaluations, wall and CPU s."""
    yield
    if TIMES:
        print("\n| variant | SFT steps | RL steps | evaluations | wall s | CPU s |\n|---|---|---|---|---|---|")
        for variant, (sft, rl, evals, wall, cpu) in TIMES.items():
            print(f"| {variant} | {sft} | {rl} | {evals} | {wall:.1f} | {cpu:.1f} |")
        total = [sum(t[i] for t in TIMES.values()) for i in (3, 4)]
        print(f"| all | | | | {total[0]:.1f} | {total[1]:.1f} |")


def rows_of(workdir: str, split: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def assert_same_rows(workdir: str, other: str) -> None:
    """The two runs logged the same metrics (wall-clock keys aside)."""
    volatile = ("time", "speed/", "compile/")
    for split in ("train", "eval", "epoch"):
        a, b = ([{k: v for k, v in r.items() if not k.startswith(volatile)} for r in rows_of(w, split)]
                for w in (workdir, other))
        assert a == b and (a or split != "train"), split


def expected_eval_steps(c) -> list[int]:
    """The trainer's documented schedule: at the start (eval.at_start), at the SFT -> RL boundary, at the
    end, and every eval.every_steps steps."""
    total = c.sft.steps + c.rl_steps
    steps = {0} if c.eval.at_start else set()
    steps |= {s for s in range(1, total + 1) if s in (c.sft.steps, total) or
              (c.eval.every_steps and s % c.eval.every_steps == 0)}
    return sorted(steps)


def eval_splits(c) -> list[str]:
    if c.data.source == "synthgeo":
        return [s for s in c.eval.splits if s in ("val", "test_iid", "test_ood")]
    return [s for s, path in c.data.eval.items() if path]


# MAYE's metric names (`acc/<Split> Set Epoch Accuracy pass@k Temperature=T`), written out here.
SETTING_LABELS = {"low": "pass@1 Temperature=0.01", "medium": "pass@1 Temperature=0.6",
                  "high": "pass@{k} Temperature=1.0"}
SPLIT_TITLES = {"val": "Validation", "test": "Test", "test_iid": "Test_iid", "test_ood": "Test_ood"}


RUNS: dict[str, tuple[str, dict]] = {}  # variant -> (workdir, worker reply) of its uninterrupted run


def run_variant(worker, root: str, variant: str, workdir: str, **options) -> dict:
    reply, log = worker.run(os.path.join("experiments", variant), root, workdir, **options)
    assert reply["ok"], reply.get("error", "") + "\n--- log ---\n" + log[-4000:]
    if not options:
        RUNS[variant] = (workdir, reply)
    return reply


@pytest.mark.parametrize("variant", VARIANTS)
def test_experiment_runs_its_recipe(variant, worker, standin_root, tmp_path):
    c = recipe(variant)
    s = standin.standin_config(c, standin_root)
    workdir = str(tmp_path / "run")
    reply = run_variant(worker, standin_root, variant, workdir)

    train, evals = rows_of(workdir, "train"), rows_of(workdir, "eval")
    sft = [r for r in train if r["stage"] == 0.0]
    rl = [r for r in train if r["stage"] == 1.0]
    TIMES[variant] = (len(sft), len(rl), len(evals), reply["seconds"], reply["cpu_seconds"])
    # The steps the stand-in asked for, and evaluations on the recipe's schedule (at least one).
    assert len(sft) == (standin.SFT_STEPS if c.sft.steps else 0)
    assert len(rl) == (standin.RL_STEPS if c.rl_steps or c.rl_epochs else 0)
    assert [r["step"] for r in train] == list(range(1, len(train) + 1))
    assert [r["step"] for r in evals] == expected_eval_steps(s) and evals
    if sft:
        assert all(r["sft/loss"] > 0 for r in sft)

    # Evaluation: every split under every setting of the recipe, with its pass@k, under MAYE's names.
    k = c.eval.pass_k
    for split in eval_splits(s):
        title = SPLIT_TITLES.get(split, split.capitalize())
        for setting in c.eval.settings:
            key = f"acc/{title} Set Epoch Accuracy " + SETTING_LABELS[setting].format(k=k)
            assert all(key in r for r in evals), (key, sorted(evals[0]))
        assert all(r[f"eval/{split}/num_problems"] > 0 for r in evals)
    others = {"low", "medium", "high"} - set(c.eval.settings)
    assert not any(SETTING_LABELS[o].format(k=k) in key for o in others for key in evals[-1] if "Epoch" in key)
    if c.checkpoint.best_metric:  # the checkpoint ranking names a metric the evaluation writes
        assert c.checkpoint.best_metric in evals[-1]
    # The samples' prompts are rendered with the recipe's template.
    from vrl_jax.data.prompts import get_template
    instruction = max(get_template(c.data.template).text.split("{question}"), key=len).strip()
    samples = [json.loads(line) for f in glob.glob(os.path.join(workdir, "samples", "*.jsonl")) for line in open(f)]
    assert samples and all(instruction in smp["prompt"] for smp in samples)

    if rl:
        check_rl(c, s, rl, reply["probe"])
    check_trainable_parts(c, standin_root, workdir)


def check_rl(c, s, rl, probe):
    """What the RL steps logged and computed, by the recipe's algorithm, rewards, KL and batch layout."""
    from vrl_jax.evaluation.metrics import REWARD_ALIASES
    assert probe["credit"] == [[c.algorithm, c.advantage.estimator, c.rollout.num_samples]] * len(rl)
    for r in rl:
        # Every reward component of the recipe is logged, and the score is their weighted sum.
        for name in c.rewards.weights:
            assert f"rews/{REWARD_ALIASES.get(name, name)}_rewards" in r, (name, sorted(r))
        # Updates per generation step: one per mini-batch and PPO epoch (MAYE: several).
        assert r["update/updates"] == s.num_mini * s.ppo_epochs
        assert math.isfinite(r["loss/loss"])
    if c.algorithm == "reinforce_pp":  # MAYE: token-level REINFORCE++ credit, one sample per prompt
        assert probe["advantage_ndim"] == [2] * len(rl)
    if "language" in c.rewards.weights:
        assert all("rews/language_rewards" in r for r in rl)  # MAYE's name for it
    if "maye_penalty" in c.rewards.overrides:
        # The stand-in's 8 tokens never reach EOS: MAYE replaces every score by its penalty.
        penalty = c.rewards.overrides["maye_penalty"]
        assert all(r["rews/maye_penalty_rewards"] == 1.0 and r["rews/scores"] == pytest.approx(penalty) for r in rl)
    if c.loss.kl_coef:
        assert all("loss/kl_loss" in r for r in rl)
        # The KL reference is the policy RL starts from (after an SFT stage, its result): at the first RL
        # step the rollout policy is the reference, up to rounding (MAYE's training/kl, sampler vs reference),
        # and so is the update's forward unless LoRA dropout perturbs it.
        assert abs(rl[0]["training/kl"]) < 1e-5
        if not c.model.lora.dropout:
            assert abs(rl[0]["training/kl_token_mean"]) < 1e-5
        assert rl[-1]["loss/kl_loss"] > 0  # the policy has moved away from the reference by step 2
    else:
        assert all(r.get("loss/kl_loss", 0.0) == 0.0 for r in rl)
    if c.algorithm == "dyme":
        for r in rl:
            shares = [r[f"dyme/{m}_share"] for m in ("memorize", "explore", "skip")]
            assert sum(shares) == pytest.approx(1.0)
            # A random model is never right: every group memorizes the reference, through the NLL term.
            assert r["dyme/memorize_share"] == 1.0 and r["loss/sft_loss"] > 0


def check_trainable_parts(c, root, workdir):
    """The exported policy changed exactly in the parts the recipe trains (vision tower, connector, LLM)."""
    from safetensors.numpy import load_file
    with open(os.path.join(workdir, "export", "config.json")) as f:
        assert json.load(f)["model_type"] == c.model.tiny.family  # the stand-in has the recipe's architecture
    start = load_file(os.path.join(standin.model_dir(root, c.model.tiny.family), "model.safetensors"))
    end = load_file(os.path.join(workdir, "export", "model.safetensors"))
    assert set(start) == set(end)

    def part(name):  # Qwen-VL (visual.*, Qwen3-VL's DeepStack mergers) and LLaVA-OneVision (vision_tower.*,
        # projector and image_newline)
        if "visual.merger" in name or "visual.deepstack_merger" in name or \
                name.startswith(("multi_modal_projector.", "image_newline")):
            return "connector"
        return "vit" if "visual." in name or name.startswith("vision_tower.") else "llm"

    changed = {p: False for p in ("vit", "connector", "llm")}
    for name in start:
        changed[part(name)] |= not np.array_equal(start[name], end[name])
    parts = configs.trained_parts(c, "any")  # SFT's parts (`sft.train_*`) and RL's (`optim.train_*`)
    assert changed == {"vit": parts["train_vit"], "connector": parts["train_connector"], "llm": parts["train_llm"]}


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_answers_score_as_correct(variant, standin_root):
    """The recipe's reward set and judge accept its own reference answers in the format its template and
    SFT targets ask for (`\\boxed{}` or DyME's `Answer:` line), on data in the recipe's format."""
    from vrl_jax.data.formats import load_examples
    from vrl_jax.rewards import RewardSet
    from vrl_jax.run_setup import reward_spec
    c = recipe(variant)
    source = "maye" if c.data.source == "synthgeo" else c.data.source  # synthgeo is read as MAYE jsonl
    examples = load_examples(standin.data_file(standin_root, source, "val"), format=source)
    flag = c.dyme.answer_format == "flag" or c.data.template == "dyme_answer"
    dicts = [{"id": e.id, "answer": e.answer, "solution": e.solution, "hint": e.hint} for e in examples]
    right = [f"{e.hint}\n" + (f"Answer: {e.answer}" if flag else f"\\boxed{{{e.answer}}}") for e in examples]
    wrong = [f"{e.hint}\n" + ("Answer: 987654" if flag else "\\boxed{987654}") for e in examples]
    n = len(examples)
    with RewardSet(reward_spec(c)) as rewards:
        ok = rewards(right, dicts, lengths=np.full(n, 20), truncated=np.zeros(n, bool))
        bad = rewards(wrong, dicts, lengths=np.full(n, 20), truncated=np.zeros(n, bool))
    assert ok["accuracy"].tolist() == [1.0] * n and bad["accuracy"].tolist() == [0.0] * n
    assert (ok["total"] > bad["total"]).all()


def test_standin_command_runs_the_recipe_through_the_train_cli(worker, standin_root, cache_dir, tmp_path, capsys):
    """`python -m vrl_jax.standin` prints a `python -m vrl_jax.train` command of `--config.*` overrides; run as a
    user would, it does exactly what the worker's in-process run of the same stand-in did."""
    variant = "mmmath.py"
    if variant not in RUNS:
        run_variant(worker, standin_root, variant, str(tmp_path / "worker"))
    workdir = str(tmp_path / "cli")
    assert standin.main([os.path.join("experiments", variant), standin_root, "--workdir", workdir]) == 0
    command = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    assert command[:3] == ["python", "-m", "vrl_jax.train"] and all(a.startswith("--") for a in command[3:])
    out = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=cli_env(cache_dir), capture_output=True,
                         text=True, timeout=RUN_TIMEOUT_S)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert_same_rows(workdir, RUNS[variant][0])
