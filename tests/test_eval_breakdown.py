"""`eval.breakdown`: accuracy per value of a record field (synthgeo's family and modality), in the
metrics, on the console and in the report. The end-to-end checks (a run's breakdown adds up to its
accuracy; the evaluate CLI's agrees with its samples) are in tests/test_train_e2e.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vrl_jax.data.formats import Example
from vrl_jax.errors import UserError
from vrl_jax.evaluation.evaluator import (MISSING, breakdown_lines, breakdown_metrics, check_breakdown, field_value,
                                          parse_breakdown_key)
from vrl_jax.evaluation.passk import MAYE_MEDIUM, GenerationSetting


def test_breakdown_metrics_against_a_hand_count():
    values = ["bar", "count", "bar", "grid", "bar"]
    hits = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]], bool)
    out = breakdown_metrics("test_iid", "family", values, hits, GenerationSetting("high", k=4, temperature=1.0, top_p=1.0))
    # bar: problems 0, 2, 4; any of 4 correct in 0 and 4; 3 of 12 samples correct.
    assert out["eval/test_iid/family/bar/pass@4 Temperature=1.0"] == pytest.approx(2 / 3)
    assert out["eval/test_iid/family/bar/pass@1 from 4 samples T=1.0"] == pytest.approx(3 / 12)
    assert out["eval/test_iid/family/bar/num_problems"] == 3
    assert out["eval/test_iid/family/count/pass@4 Temperature=1.0"] == 0.0
    assert out["eval/test_iid/family/grid/pass@1 from 4 samples T=1.0"] == 1.0
    assert len(out) == 9  # three values x (any-of-k, pass@1 from k, problems)
    one = breakdown_metrics("val", "modality", ["text", "vision"], np.array([[True], [False]]), MAYE_MEDIUM)
    assert one == {"eval/val/modality/text/pass@1 Temperature=0.6": 1.0, "eval/val/modality/text/num_problems": 1.0,
                   "eval/val/modality/vision/pass@1 Temperature=0.6": 0.0,
                   "eval/val/modality/vision/num_problems": 1.0}
    with pytest.raises(ValueError, match="2 values of 'family' for 3 problems"):
        breakdown_metrics("val", "family", ["a", "b"], np.zeros((3, 1), bool), MAYE_MEDIUM)


def test_field_values_come_from_meta_and_never_nest_the_key():
    assert field_value({"meta": {"family": "rtri", "level": 1}}, "level") == "1"
    assert field_value({"meta": {"problem_version": "Text Dominant/Lite"}}, "problem_version") == "Text Dominant_Lite"
    assert field_value({"meta": {}}, "family") == MISSING and field_value({}, "family") == MISSING
    key = "eval/test/problem_version/Text Dominant_Lite/pass@1 Temperature=0.6"
    assert parse_breakdown_key(key) == ("test", "problem_version", "Text Dominant_Lite", "pass@1 Temperature=0.6")
    for other in ("eval/test/num_problems", "eval/val/unbiased_pass@4 T=1.0", "acc/Test Set Epoch Accuracy pass@1"):
        assert parse_breakdown_key(other) is None


def test_console_lines_one_per_split_field_and_setting():
    metrics = {"acc/Validation Set Epoch Accuracy pass@1 Temperature=0.6": 0.5,
               **breakdown_metrics("val", "family", ["bar", "count", "bar", "count"],
                                   np.array([[1], [0], [1], [1]], bool), MAYE_MEDIUM)}
    assert breakdown_lines(metrics) == ["val by family, pass@1 Temperature=0.6: bar 100.0% (2) | count 50.0% (2)"]


def _example(i, **meta):
    return Example(id=f"e{i}", question="q", images=(), answer="1", solution="\\boxed{1}", meta=meta, source="x")


def test_a_field_no_example_has_is_named_with_the_fields_they_have():
    evals = {"val": [_example(0, family="bar", modality="text", format="maye"), _example(1, family="grid")]}
    check_breakdown(("family", "modality"), evals, "config.eval.breakdown")  # modality: in one example is enough
    with pytest.raises(UserError) as err:
        check_breakdown(("family", "famly"), evals, "--breakdown")
    assert str(err.value) == ("--breakdown: the val examples have no field 'famly'; their fields are "
                              "['family', 'modality']")
    check_breakdown(("famly",), {"val": []}, "--breakdown")  # an empty split has nothing to break down


def test_the_report_tables_the_first_and_last_evaluation_per_value(tmp_path):
    from vrl_jax.evaluation.report import make_report

    def run(name, first, last):
        wd = tmp_path / name
        wd.mkdir()
        rows = []
        for step, (bar, grid) in ((0, first), (10, last)):
            rows.append({"step": step, "split": "eval", "kind": "eval",
                         "acc/Test Set Epoch Accuracy pass@1 Temperature=0.6": (bar + grid) / 2,
                         **breakdown_metrics("test", "family", ["bar", "grid"], np.array([[bar], [grid]], bool),
                                             MAYE_MEDIUM)})
        (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (wd / "config.json").write_text(json.dumps({"name": "grpo"}))
        return str(wd)

    report = make_report([run("a", (0, 0), (1, 0)), run("b", (0, 1), (1, 1))], out=tmp_path / "out", plots=False)
    text = report.read_text()
    assert "### test by family" in text
    assert "| grpo | bar (1) | 0.0 -> 100.0 |" in text  # both runs: bar wrong at the start, right at the end
    assert "| grpo | grid (1) | 50.0 -> 50.0 |" in text  # run a: 0 -> 0, run b: 1 -> 1


def test_the_evaluator_pairs_each_problem_with_its_own_value_across_batches_and_padding():
    """Two batches, the second padded: the per-family figures are those of the problems that are correct,
    not shifted by a batch boundary or a padded row (the run in test_train_e2e scores 0 everywhere)."""
    import jax

    from vrl_jax.data.pipeline import Batch
    from vrl_jax.evaluation.evaluator import Evaluator, settings_from_names
    from vrl_jax.rewards import RewardSet
    from vrl_jax.sampling.sampler import SampleOutput

    class Tokenizer:  # token 1 answers 4 (right), token 3 answers 5 (wrong)
        def batch_decode(self, rows, skip_special_tokens=True):
            return ["\\boxed{4}" if row[0] == 1 else "\\boxed{5}" for row in rows]

    answers = {0: [1, 3, 1], 1: [3, 1, 1]}  # batch -> first token of each row; batch 1's last row is padding

    def sampler(params, inputs, key, temperature=1.0, top_p=1.0):
        tokens = np.array([[t, 2] for t in answers[inputs]], np.int32)
        return SampleOutput(tokens=tokens, logprobs=np.zeros((3, 2), np.float32), mask=np.ones((3, 2), np.int32),
                            lengths=np.full(3, 2, np.int32), stopped=np.ones(3, bool))

    def ex(i, family, problem=None):  # problem: synthgeo's semantic_key, where the data names problems
        meta = {"family": family, **({} if problem is None else {"semantic_key": problem})}
        return {"id": f"p{i}", "answer": "4", "solution": "\\boxed{4}", "meta": meta,
                "prompt_messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}]}

    batches = [Batch(inputs=0, examples=[ex(0, "bar"), ex(1, "bar"), ex(2, "grid", "g1")], valid=np.ones(3, bool),
                     epoch=0),
               Batch(inputs=1, examples=[ex(3, "grid", "g1"), ex(4, "count"), ex(5, "bar")],
                     valid=np.array([True, True, False]), epoch=0)]
    with RewardSet({"weights": {"accuracy": 1.0}}) as rewards:
        ev = Evaluator(None, type("P", (), {"tokenizer": Tokenizer()})(), rewards,
                       settings_from_names(["low"], 1, 2), stop_ids=[2], pad_id=0, breakdown=("family",))
        ev.samplers = {1: sampler}
        metrics, _, outcomes = ev.evaluate_split(None, batches, jax.random.key(0), "val")
    got = {k.split("/")[3]: v for k, v in metrics.items() if k.endswith("Temperature=0.01") and "/family/" in k}
    assert got == {"bar": 0.5, "grid": 0.5, "count": 1.0}  # bar: p0 right, p1 wrong; grid: p2 right, p3 wrong
    assert metrics["eval/val/family/bar/num_problems"] == 2  # p5 is padding
    # Each problem's own outcome, for the paired comparison between evaluations; p2 and p3 pose one problem.
    low = "pass@1 Temperature=0.01"
    assert outcomes == [{"id": "p0", "problem": "p0", low: 1.0}, {"id": "p1", "problem": "p1", low: 0.0},
                        {"id": "p2", "problem": "g1", low: 1.0}, {"id": "p3", "problem": "g1", low: 0.0},
                        {"id": "p4", "problem": "p4", low: 1.0}]
