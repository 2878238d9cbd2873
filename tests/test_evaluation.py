"""Evaluation scheme: reflection metrics, pass@k, step metrics and epoch sums, writers, progress."""
import io
import itertools
import json
import math
import struct
import sys
import types
from fractions import Fraction
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vrl_jax.evaluation import metrics as M
from vrl_jax.evaluation import passk as P
from vrl_jax.evaluation import reflection as R
from vrl_jax.evaluation.progress import Progress, format_duration
from vrl_jax.evaluation.writers import MetricWriter, read_metrics
from vrl_jax.rl.losses import SumCount

# ---- reflection -------------------------------------------------------------------------------------

TEXTS = [
    "Wait, let me verify this. I will check again: yes.",                 # 0 both: wait, verify, check again
    "Awaiting the result, we are verifying it.",                           # 1 substring only: wait, verify
    "Let me recheck again. Rethinking: the answer is 5.",                  # 2 word: recheck; substring: +check again, rethink
    "The answer is 12.",                                                   # 3 none
    "Not yet sure. Re-evaluate: the re-evaluation gives 3. Wait wait.",   # 4 yet, re-evaluate, wait x2
    "Reevaluation shows the Yeti is big.",                                 # 5 reevaluation; substring: +yet (Yeti)
    "Simple: 7.",                                                          # 6 none
]
CORRECT = [False, True, False, True, False, True, False]


def _word_counts(**nonzero):
    return tuple(nonzero.get(w, 0) for w in R.REFLECTION_WORDS)


def test_reflection_words_are_mayes_fifteen():
    assert len(R.REFLECTION_WORDS) == 15 and len(set(R.REFLECTION_WORDS)) == 15
    assert R.REFLECTION_WORDS[0] == "re-check" and R.REFLECTION_WORDS[-1] == "yet"
    assert {"reevaluation", "check again", "think again", "try again", "verify", "wait"} <= set(R.REFLECTION_WORDS)


def test_reflection_word_boundary_hand_counted():
    a = R.analyze_reflection(TEXTS, CORRECT)  # default: whole words, case-insensitive
    counts = a.counts
    # Reflective: 0, 2, 4, 5 ("Rethinking", "recheck again" and "Awaiting"/"verifying" do not count).
    assert a.reflective.tolist() == [True, False, True, False, True, True, False]
    assert (counts.n, counts.n_correct, counts.n_reflective, counts.n_reflective_correct) == (7, 3, 4, 1)
    assert counts.word_counts == _word_counts(**{"re-evaluate": 1, "recheck": 1, "reevaluation": 1,
                                                 "check again": 1, "verify": 1, "wait": 3, "yet": 1})
    assert a.example == 5  # the only reflective correct response
    r = R.ratios(counts)
    assert r == pytest.approx({"reflection_ratio": 4 / 7, "reflection_ratio_in_correct_answers": 1 / 3,
                               "reflection_ratio_in_incorrect_answers": 3 / 4,
                               "correct_ratio_in_reflection_texts": 1 / 4,
                               "correct_ratio_in_no_reflection_texts": 2 / 3})


def test_reflection_substring_mode_is_mayes_rule():
    a = R.analyze_reflection(TEXTS, CORRECT, match="substring")
    counts = a.counts
    assert a.reflective.tolist() == [True, True, True, False, True, True, False]
    assert (counts.n, counts.n_correct, counts.n_reflective, counts.n_reflective_correct) == (7, 3, 5, 2)
    # "reevaluate" is not a substring of "reevaluation" (…ate vs …ati…), so it stays 0 here too.
    assert counts.word_counts == _word_counts(**{"re-evaluate": 1, "recheck": 1, "reevaluation": 1, "rethink": 1,
                                                 "check again": 2, "verify": 2, "wait": 4, "yet": 2})
    assert a.example == 1
    assert R.ratios(counts) == pytest.approx({
        "reflection_ratio": 5 / 7, "reflection_ratio_in_correct_answers": 2 / 3,
        "reflection_ratio_in_incorrect_answers": 3 / 4, "correct_ratio_in_reflection_texts": 2 / 5,
        "correct_ratio_in_no_reflection_texts": 1 / 2})
    # Float accuracy rewards are read as MAYE does: correct where == 1.
    assert R.reflection_counts(TEXTS, np.where(CORRECT, 1.0, 0.5), match="substring") == counts


def test_reflection_metrics_keys_and_zero_denominators():
    m = R.reflection_metrics(R.reflection_counts(["no words here"], [False]))
    assert set(m) == {R.RATIO_PREFIX + k for k in R.RATIO_NAMES} | {R.WORD_PREFIX + w for w in R.REFLECTION_WORDS}
    assert m["reflection_analysis/reflection_ratio"] == 0.0
    assert m["reflection_analysis/reflection_ratio_in_correct_answers"] == 0.0  # N+ = 0
    assert m["reflection_analysis/correct_ratio_in_reflection_texts"] == 0.0    # N_ref = 0
    assert m["reflection_analysis/correct_ratio_in_no_reflection_texts"] == 0.0  # N+ - N_ref+ = 0 of 1
    assert R.ratios(R.ReflectionCounts.zeros()) == dict.fromkeys(R.RATIO_NAMES, 0.0)
    with pytest.raises(ValueError, match="match"):
        R.word_counts_per_response(["x"], match="fuzzy")
    with pytest.raises(ValueError, match="shape"):
        R.reflection_counts(["a", "b"], [True])


def test_reflection_pooling_differs_from_averaging_ratios():
    a = R.reflection_counts(["Wait, 2."], [True])
    b = R.reflection_counts(["4.", "5.", "6, wait."], [True, True, False])
    pooled = a + b
    assert (pooled.n, pooled.n_correct, pooled.n_reflective, pooled.n_reflective_correct) == (4, 3, 2, 1)
    assert pooled.word_counts == _word_counts(wait=2)
    r = R.ratios(pooled)
    assert r["reflection_ratio_in_correct_answers"] == pytest.approx(1 / 3)
    assert r["reflection_ratio"] == pytest.approx(1 / 2)
    # MAYE averages per-rank ratios: (1 + 0) / 2 and (1 + 1/3) / 2 — not the pooled values.
    ra, rb = R.ratios(a), R.ratios(b)
    assert (ra["reflection_ratio_in_correct_answers"] + rb["reflection_ratio_in_correct_answers"]) / 2 == 0.5
    assert (ra["reflection_ratio"] + rb["reflection_ratio"]) / 2 == pytest.approx(2 / 3)
    # The all-gather layout: a [P, 4 + W] stack sums back to the pool; sum() starts from 0.
    stacked = np.stack([a.to_array(), b.to_array()])
    assert stacked.shape == (2, 19) and stacked.dtype == np.int64
    assert R.ReflectionCounts.from_array(stacked) == pooled == sum([a, b])
    with pytest.raises(ValueError, match="word lists"):
        a + R.ReflectionCounts.zeros(("wait",))


# ---- pass@k -----------------------------------------------------------------------------------------


def _brute_pass_at_k(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_subset_enumeration():
    ns, cs, ks, expected = [], [], [], []
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                ns.append(n), cs.append(c), ks.append(k), expected.append(_brute_pass_at_k(n, c, k))
    got = [P.pass_at_k([n], [c], k)[0] for n, c, k in zip(ns, cs, ks)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_pass_at_k_large_n_against_exact_binomials():
    for n, c, k in [(200, 3, 50), (2048, 7, 8), (3000, 10, 500), (5000, 1, 1)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert P.pass_at_k([n], [c], k)[0] == pytest.approx(float(exact), rel=1e-12)
    # C(3000, 500) overflows float64; the product form never forms it.
    with pytest.raises(OverflowError):
        float(math.comb(3000, 500))


def test_pass_at_k_edge_cases_and_vectorised():
    n = np.array([8, 8, 8, 8, 5])
    c = np.array([0, 8, 1, 3, 5])
    np.testing.assert_array_equal(P.pass_at_k(n[:4], c[:4], 8), [0.0, 1.0, 1.0, 1.0])  # k = n: any correct
    np.testing.assert_allclose(P.pass_at_k(n, c, 1), c / n)                            # pass@1 = c / n
    assert P.mean_pass_at_k(n, c, 1) == pytest.approx(np.mean(c / n))
    assert P.pass_at_k([4, 4], [0, 4], 2).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="at least k"):
        P.pass_at_k(n, c, 8)
    with pytest.raises(ValueError, match="c <= n"):
        P.pass_at_k([3], [4], 1)
    with pytest.raises(ValueError, match="k must be"):
        P.pass_at_k([3], [1], 0)


def test_any_of_k_and_passk_metrics():
    correct = np.array([[0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 1]], bool)
    assert P.any_of_k(correct).tolist() == [False, True, True]
    m = P.passk_metrics(correct, ks=(1, 2, 4, 8))
    assert set(m) == {"pass@1", "pass@2", "pass@4", "any@4", "mean_correct"}  # k=8 > n skipped
    assert m["pass@1"] == pytest.approx((0 + 1 / 4 + 1) / 3)
    assert m["pass@2"] == pytest.approx((0 + 1 / 2 + 1) / 3)  # 1 - C(3,2)/C(4,2) = 1/2
    assert m["pass@4"] == m["any@4"] == pytest.approx(2 / 3)  # n == k: the estimator is any-of-k
    assert m["mean_correct"] == pytest.approx(5 / 12)
    assert P.setting_accuracy(correct[:, :1]) == pytest.approx(1 / 3)


def test_maye_generation_settings():
    assert [(s.k, s.temperature, s.top_p, s.max_tokens) for s in P.MAYE_SETTINGS] == [
        (1, 0.01, 0.001, 2048), (1, 0.6, 1.0, 2048), (8, 1.0, 1.0, 2048)]
    keys = [s.metric_key(split) for split in ("val", "test") for s in P.MAYE_SETTINGS]
    assert keys == [
        "acc/Validation Set Epoch Accuracy pass@1 Temperature=0.01",
        "acc/Validation Set Epoch Accuracy pass@1 Temperature=0.6",
        "acc/Validation Set Epoch Accuracy pass@8 Temperature=1.0",
        "acc/Test Set Epoch Accuracy pass@1 Temperature=0.01",
        "acc/Test Set Epoch Accuracy pass@1 Temperature=0.6",
        "acc/Test Set Epoch Accuracy pass@8 Temperature=1.0",
    ]
    assert P.MAYE_LOW.metric_key("Validation") == keys[0]


# ---- step metrics and epoch sums --------------------------------------------------------------------


def test_step_metrics_hand_computed():
    acc = np.array([1, 0, 1, 0, 0, 0], np.float32)
    fmt = np.array([1, 1, 0, 0, 1, 0], np.float32)
    total = acc + 0.5 * fmt                                   # [1.5, .5, 1, 0, .5, 0]
    m = M.step_metrics(
        rewards={"accuracy": acc, "maye_format": fmt, "custom": fmt * 2, "total": total},
        response_lengths=np.array([10, 20, 30, 40, 50, 16]), max_tokens=40,
        stopped=np.array([1, 1, 1, 0, 0, 1], bool), group_size=3, modes=np.array([1, 0]),
        kl_per_sequence=np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]), kl_reward=np.full(6, -0.1),
        update={"loss": SumCount(jnp.array([2.0, 4.0]), jnp.array([2.0, 2.0])), "pg_loss": np.array([1.0, 2.0]),
                "clip_frac": jnp.float32(0.25), "sampled_token_entropy": 0.7, "kl": 0.05, "custom": 3.0},
        lr=1e-6, grad_norm=jnp.float32(2.0), temperature=1.0,
        timings={"sample": 2.0, "update": 4.0, "score": 1.0}, rollout_tokens=1000, update_tokens=2000,
        num_devices=4, generation_step=7, gradient_step=224, epoch=3)
    std0, std1 = 0.5, math.sqrt(1 / 12)  # ddof-1 std of [1.5, .5, 1] and [0, .5, 0]
    expected = {
        "rews/scores": 3.5 / 6, "rews/acc_rewards": 1 / 3, "rews/format_rewards": 0.5, "rews/custom_rewards": 1.0,
        "rews/kl_reward": -0.1, "rews/rlhf_reward": 3.5 / 6 - 0.1, "health/accuracy": 1 / 3,
        "response/response_lengths": 160 / 6, "response/tokens_mean": 166 / 6, "response/response_length_max": 50.0,
        "response/length_clip_ratio": 2 / 6, "training/num_stop_tokens": 4.0, "response/no_stop_ratio": 2 / 6,
        "training/kl": 0.35, "health/reward_std": (std0 + std1) / 2, "health/zero_variance_groups": 0.5,
        "health/zero_std_reward_groups": 0.0, "health/all_correct_groups": 0.0, "health/all_wrong_groups": 0.5,
        "dyme/memorize_share": 0.5, "dyme/explore_share": 0.5, "dyme/skip_share": 0.0,
        "loss/loss": 1.5, "loss/policy_loss": 1.5, "training/clipfrac": 0.25, "training/entropy": 0.7,
        "training/kl_token_mean": 0.05, "update/custom": 3.0, "training/lr": 1e-6, "training/grad_norm": 2.0,
        "training/temperature": 1.0, "time/sample": 2.0, "time/update": 4.0, "time/score": 1.0,
        "time/step": 7.0, "speed/sample_tokens_per_second": 500.0,
        "speed/tokens_per_second_per_gpu_trajectory": 125.0, "speed/update_tokens_per_second": 500.0,
        "speed/tokens_per_second_per_gpu_ppo": 125.0, "generation_steps": 7.0, "gradient_steps": 224.0,
        "epoch": 3.0,
    }
    assert set(m) == set(expected)
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, rel=1e-6), k
    assert all(type(v) is float for v in m.values())


def test_step_metrics_use_mayes_definitions():
    """training/lr is the next update's rate and training/grad_norm the last update's norm (MAYE reads
    them after its mini-batch loop); response/response_lengths is MAYE's last-valid-index mean."""
    m = M.step_metrics(
        rewards={"total": np.ones(3), "accuracy": np.ones(3)}, response_lengths=np.array([0, 1, 8]), max_tokens=8,
        update={"learning_rate": 2e-6, "next_learning_rate": 1e-6, "grad_norm": 3.0, "grad_norm_last": 5.0,
                "max_abs_ratio_minus_1_first_update": 0.02, "kl_loss": 0.4})
    assert m["training/lr"] == 1e-6 and m["training/lr_last_update"] == 2e-6
    assert m["training/grad_norm"] == 5.0 and m["training/grad_norm_mean"] == 3.0
    assert m["training/max_abs_ratio_minus_1_first_update"] == 0.02 and m["loss/kl_loss"] == 0.4
    assert m["response/response_lengths"] == pytest.approx(7 / 3)  # max(len - 1, 0): 0, 0, 7
    assert m["response/tokens_mean"] == 3.0 and m["response/length_clip_ratio"] == pytest.approx(1 / 3)
    assert not any(k.startswith("update/") for k in m)


def test_step_metrics_defaults_and_errors():
    m = M.step_metrics(rewards={"accuracy": np.array([1.0, 0.5]), "total": np.array([1.0, 0.5])},
                       response_lengths=[3, 4], max_tokens=4)
    assert m["health/accuracy"] == 0.5  # 0.5 is not correct: correct means accuracy == 1
    assert m["response/length_clip_ratio"] == 0.5
    assert not any(k.startswith(("health/zero", "dyme/", "time/", "speed/")) for k in m)
    with pytest.raises(KeyError, match="total"):
        M.step_metrics(rewards={"accuracy": np.ones(2)}, response_lengths=[1, 2], max_tokens=4)
    with pytest.raises(ValueError, match="expected 2"):
        M.step_metrics(rewards={"total": np.ones(2)}, correct=[True], response_lengths=[1, 2], max_tokens=4)
    with pytest.raises(ValueError, match="groups of 4"):
        M.step_metrics(rewards={"total": np.ones(6)}, correct=np.ones(6, bool), response_lengths=np.ones(6),
                       max_tokens=4, group_size=4)


def test_epoch_accumulator_update_reset_and_dict_round_trip():
    acc = M.EpochAccumulator.create(["len", "kl"])
    acc = acc.update(correct=[True, False, True], values={"len": [10, 20, 30]})
    acc = acc.update(correct=np.array([1.0, 0.0]), values={"len": 5.0, "kl": 0.2}, weight=2)
    res = acc.result()
    assert res[P.TRAIN_ACCURACY_KEY] == pytest.approx(3 / 5)
    assert res["epoch_mean/len"] == pytest.approx((60 + 10) / 5)
    assert res["epoch_mean/kl"] == pytest.approx(0.2)
    assert res["epoch/samples"] == 5.0
    # A checkpoint round trip: to a dict, through jax arrays (what a restore may hand back), and back.
    state = jax.tree.map(jnp.asarray, acc.to_dict())
    restored = M.EpochAccumulator.from_dict(state)
    assert restored.result() == pytest.approx(res)
    assert restored.correct.dtype == np.int64 and restored.sums["len"].dtype == np.float64
    assert len(jax.tree.leaves(restored)) == 2 + 2 * 2
    # The restored accumulator continues exactly like the original.
    step = {"correct": [True], "values": {"len": [1.0]}}
    assert restored.update(**step).result() == pytest.approx(acc.update(**step).result())
    # Pooling two processes = summing their counts.
    merged = acc.merge(acc)
    assert merged.result()[P.TRAIN_ACCURACY_KEY] == pytest.approx(3 / 5) and int(merged.samples) == 10
    fresh = acc.reset()
    assert fresh.result() == {P.TRAIN_ACCURACY_KEY: 0.0, "epoch/samples": 0.0, "epoch_mean/len": 0.0,
                              "epoch_mean/kl": 0.0}
    assert set(fresh.sums) == {"len", "kl"}
    with pytest.raises(KeyError, match="declare"):
        acc.update(values={"other": 1.0})


# ---- writers ----------------------------------------------------------------------------------------


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _tb_scalars(logdir):
    """(tag, step, value) of every scalar in the TFRecord event files under `logdir`."""
    from tensorboardX.proto import event_pb2
    out = []
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.append((v.tag, event.step, v.simple_value))
    return out


def test_writer_jsonl_tensorboard_samples_texts(tmp_path):
    with MetricWriter(tmp_path, config={"name": "x"}) as w:
        w.write(1, {"rews/scores": np.float32(0.5), "training/kl": jnp.array(2.0), "bad": float("nan"), "n": 3})
        w.write(2, {P.MAYE_LOW.metric_key("val"): 0.25, "epoch": 1}, split="val", kind="eval")
        w.write_text(1, "reflection_outputs/Reflection-Correct 1", "Wait, 4.")
        path = w.write_samples("val", 2, [{"prompt": "p", "image_id": "img7", "response": "r", "reward": np.float32(1),
                                           "correct": np.bool_(True), "extra": [1, 2]}])
        with pytest.raises(KeyError, match="image_id"):
            w.write_samples("val", 2, [{"prompt": "p", "response": "r", "reward": 0, "correct": False}])
    rows = _lines(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["split"], r["kind"]) for r in rows] == [(1, "train", "step"), (2, "val", "eval")]
    assert rows[0]["rews/scores"] == 0.5 and rows[0]["training/kl"] == 2.0 and rows[0]["n"] == 3
    assert rows[0]["bad"] is None  # NaN is written as null: strict JSON
    assert rows[1]["acc/Validation Set Epoch Accuracy pass@1 Temperature=0.01"] == 0.25
    assert path == tmp_path / "samples" / "val_2.jsonl"
    assert _lines(path) == [{"prompt": "p", "image_id": "img7", "response": "r", "reward": 1.0, "correct": True,
                             "extra": [1, 2]}]
    assert _lines(tmp_path / "texts.jsonl") == [{"step": 1, "split": "train",
                                                 "tag": "reflection_outputs/Reflection-Correct 1", "text": "Wait, 4."}]
    scalars = _tb_scalars(tmp_path / "tensorboard")
    assert ("rews/scores", 1, 0.5) in scalars and ("training/kl", 1, 2.0) in scalars
    # tensorboardX replaces characters TensorBoard does not allow in tags (space, @, =) with "_".
    assert ("val/acc/Validation_Set_Epoch_Accuracy_pass_1_Temperature_0.01", 2, 0.25) in scalars


def write_five_steps(workdir) -> None:
    """Steps 1-5 of a run's metrics, texts and samples (what a resume then cuts back)."""
    with MetricWriter(workdir, tensorboard=False) as w:
        for step in range(1, 6):
            w.write(step, {"x": step})
            w.write_text(step, "t", str(step))
            w.write_samples("test", step, [])


def test_writer_resume_drops_later_steps(tmp_path):
    write_five_steps(tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "x"')  # torn line from a crash mid-write
    with MetricWriter(tmp_path, resume_step=3, tensorboard=False) as w:
        assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [1, 2, 3]
        w.write(4, {"x": 40})
    assert [(r["step"], r["x"]) for r in _lines(tmp_path / "metrics.jsonl")] == [(1, 1), (2, 2), (3, 3), (4, 40)]
    assert [r["step"] for r in _lines(tmp_path / "texts.jsonl")] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["test_1.jsonl", "test_2.jsonl",
                                                                          "test_3.jsonl"]
    # A fresh run in the same workdir starts a new history; the old one is kept aside.
    with MetricWriter(tmp_path, tensorboard=False) as w:
        w.write(1, {"x": -1})
    assert _lines(tmp_path / "metrics.jsonl")[0]["x"] == -1 and len(_lines(tmp_path / "metrics.jsonl")) == 1
    assert len(_lines(tmp_path / "metrics.jsonl.prev")) == 4


def test_read_metrics_merges_repeated_steps(tmp_path):
    with MetricWriter(tmp_path, tensorboard=False) as w:
        w.write(1, {"a": 1.0, "b": 1.0})
        w.write(1, {"b": 2.0, "c": 3.0})       # a second write of the same step (e.g. reflection metrics)
        w.write(1, {"a": 9.0}, split="val", kind="eval")
    rows = read_metrics(tmp_path)
    assert [(r["split"], r.get("a"), r.get("b"), r.get("c")) for r in rows] == [
        ("train", 1.0, 2.0, 3.0), ("val", 9.0, None, None)]
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        read_metrics(tmp_path / "nowhere")


def test_writer_only_process_zero_writes(tmp_path):
    w = MetricWriter(tmp_path / "run", process_index=1, wandb=True)  # wandb never imported off process 0
    w.write(1, {"x": 1.0})
    w.write_text(1, "t", "x")
    assert w.write_samples("val", 1, [{"bad": 1}]) is None
    w.close()
    assert not (tmp_path / "run").exists()


def test_wandb_missing_is_an_error_only_when_enabled(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(RuntimeError, match="pip install wandb"):
        MetricWriter(tmp_path / "a", wandb=True)
    assert not (tmp_path / "a").exists()  # failed before writing anything
    with MetricWriter(tmp_path / "b", wandb=False, tensorboard=False) as w:
        w.write(1, {"x": 1.0})
    assert (tmp_path / "b" / "metrics.jsonl").exists()


def test_wandb_used_when_installed(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        id = "abc123"

        def log(self, data, step):
            calls.append(("log", dict(data), step))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or FakeRun(),
                                 Table=lambda columns, data: ("table", columns, data))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with MetricWriter(tmp_path, wandb=True, tensorboard=False, wandb_project="p", run_name="r",
                      config={"lr": 1e-6}) as w:
        w.write(3, {"x": 1.5, "flag": True}, split="val")
    assert calls[0][0] == "init" and calls[0][1]["project"] == "p" and calls[0][1]["config"] == {"lr": 1e-6}
    assert calls[1] == ("log", {"val/x": 1.5}, 3) and calls[-1] == ("finish",)
    assert (tmp_path / "wandb_run_id.txt").read_text() == "abc123"
    # A resumed writer continues the same W&B run.
    calls.clear()
    MetricWriter(tmp_path, wandb=True, tensorboard=False, resume_step=3).close()
    assert calls[0][1]["id"] == "abc123" and calls[0][1]["resume"] == "allow"


# ---- progress ---------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_progress_plain_lines_every_n_steps():
    out, clock = io.StringIO(), FakeClock()
    p = Progress(25, desc="train", log_every=10, stream=out, clock=clock)
    for step in range(1, 26):
        clock.t += 2.0
        p.update(1, {"rews/acc_rewards": 0.5, "unshown": 1.0})
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # steps 10, 20 and the last (25)
    assert lines[0] == "train 10/25 (40.0%) | 2.00 s/it | elapsed 20s | ETA 30s | acc=0.5"
    assert lines[-1].startswith("train 25/25 (100.0%)") and "ETA 0s" in lines[-1]
    assert "\r" not in out.getvalue()


def test_progress_resume_eta_disabled_and_tty():
    clock = FakeClock()
    p = Progress(30, initial=10, stream=io.StringIO(), clock=clock, log_every=1)
    assert p.eta() is None
    clock.t += 10.0
    p.update(5)
    assert p.eta() == pytest.approx(15 * 2.0)  # 5 steps in 10 s since the resume, 15 left
    silent = io.StringIO()
    q = Progress(3, stream=silent, enabled=False, log_every=1)
    q.update(3)
    assert silent.getvalue() == ""
    bar = io.StringIO()
    with Progress(4, desc="eval", stream=bar, tty=True, keys={"acc": "accuracy"}) as b:
        b.update(2, {"accuracy": 0.75})
    assert "eval" in bar.getvalue() and "acc=0.75" in bar.getvalue() and "\r" in bar.getvalue()


def test_format_duration():
    assert [format_duration(s) for s in (7.2, 65, 3725, None, -1, float("inf"))] == [
        "7s", "1m05s", "1h02m05s", "?", "?", "?"]


def test_evaluator_gives_the_reward_set_lengths_and_truncation():
    """MAYE's reward set (maye_penalty needs `lengths` and `truncated`) scores evaluation samples: the
    sampler's lengths and ~stopped reach it; the samples' prompt is the whole user turn."""
    import types

    from vrl_jax.data.pipeline import Batch
    from vrl_jax.evaluation.evaluator import Evaluator, settings_from_names
    from vrl_jax.rewards import RewardSet
    from vrl_jax.sampling.sampler import SampleOutput

    class Tokenizer:
        def batch_decode(self, rows, skip_special_tokens=True):
            return ["\\boxed{4}" if row and row[0] == 1 else "\\boxed{5}" for row in rows]

    def sampler(params, inputs, key, temperature=1.0, top_p=1.0):
        tokens = np.array([[1, 2, 0], [3, 2, 0]], np.int32)  # row 0 stops after 2 tokens, row 1 runs out
        return SampleOutput(tokens=tokens, logprobs=np.zeros((2, 3), np.float32), mask=np.array([[1, 1, 0], [1, 1, 1]]),
                            lengths=np.array([2, 3], np.int32), stopped=np.array([True, False]))

    spec = {"weights": {"accuracy": 1.0, "maye_penalty": 1.0}, "overrides": {"maye_penalty": -0.1},
            "params": {"maye_penalty": {"min_response_length": 1}}}
    calls = []
    with RewardSet(spec) as rewards:
        def recording(texts, examples, **kw):
            calls.append(kw)
            return rewards(texts, examples, **kw)
        ev = Evaluator(None, types.SimpleNamespace(tokenizer=Tokenizer()), recording,
                       settings_from_names(["low"], 1, 3), stop_ids=[2], pad_id=0)
        ev.samplers = {1: sampler}
        messages = [{"role": "user", "content": [{"type": "text", "text": "Q: "}, {"type": "image"},
                                                  {"type": "text", "text": "what is 2+2?"}]}]
        examples = [{"id": f"p{i}", "prompt_messages": messages, "answer": "4", "solution": "\\boxed{4}"}
                    for i in range(2)]
        batch = Batch(inputs=None, examples=examples, valid=np.array([True, True]), epoch=0)
        metrics, samples, _ = ev.evaluate_split(None, [batch], jax.random.key(0), "val", keep_samples=2)
    assert calls[0]["lengths"].tolist() == [2, 3] and calls[0]["truncated"].tolist() == [False, True]
    assert metrics["acc/Validation Set Epoch Accuracy pass@1 Temperature=0.01"] == 0.5
    assert [s["prompt"] for s in samples] == ["Q: <image>what is 2+2?"] * 2
