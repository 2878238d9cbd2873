"""The grain pipeline: exact resume, per-process shards, per-epoch shuffling, static batches."""
import io
import itertools
import json

import numpy as np
import pytest
from PIL import Image

from vrl_jax.data import pipeline
from vrl_jax.data.faults import FaultCounter, TooManyFaultsError
from vrl_jax.data.formats import Example, ImageRef


def text_examples(n):
    return [Example(id=f"ex{i}", question=f"What is {i}+1?", images=(), answer=str(i + 1),
                    solution=f"\\boxed{{{i + 1}}}", source=f"data.jsonl:{i + 1}") for i in range(n)]


def png(color):
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), color).save(buf, format="PNG")
    return buf.getvalue()


def ids_encode(examples):
    """A stand-in for VLProcessor.encode that keeps what the tests need to check."""
    return [e["id"] for e in examples]


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def train(examples, **kwargs):
    kwargs = {"batch_size": 3, "seed": 7, "process_index": 0, "process_count": 1, "template": "plain", **kwargs}
    return pipeline.train_dataset(examples, ids_encode, **kwargs)


def test_resumed_iterator_yields_the_uninterrupted_batches_across_epochs():
    examples = text_examples(10)  # 3 batches per epoch, 1 example dropped per epoch
    uninterrupted = [b.inputs for b in take(iter(train(examples)), 8)]
    for stop in (2, 3, 5):  # mid-epoch, exactly at the boundary, in the second epoch
        first = iter(train(examples))
        before = [b.inputs for b in take(first, stop)]
        state = json.loads(json.dumps(first.get_state()))  # what a checkpoint stores
        resumed = iter(train(examples))
        resumed.set_state(state)
        assert before + [b.inputs for b in take(resumed, 8 - stop)] == uninterrupted


def test_epochs_are_fresh_permutations_and_deterministic_per_seed():
    examples = text_examples(32)
    batches = take(iter(train(examples, batch_size=8)), 12)  # 3 epochs of 4 batches
    epochs = [sum((b.inputs for b in batches[4 * e:4 * e + 4]), []) for e in range(3)]
    assert [b.epoch for b in batches] == [0] * 4 + [1] * 4 + [2] * 4
    for order in epochs:
        assert sorted(order) == sorted(e.id for e in examples)
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
    assert epochs[0] != [e.id for e in examples]  # actually shuffled
    again = take(iter(train(examples, batch_size=8)), 12)
    assert [b.inputs for b in again] == [b.inputs for b in batches]
    other_seed = take(iter(train(examples, batch_size=8, seed=8)), 4)
    assert sum((b.inputs for b in other_seed), []) != epochs[0]
    unshuffled = take(iter(train(examples, batch_size=8, shuffle=False)), 8)
    assert sum((b.inputs for b in unshuffled), []) == [e.id for e in examples] * 2


@pytest.mark.parametrize("num_examples", [12, 13])
def test_two_processes_see_disjoint_shards_covering_the_data(num_examples):
    examples = text_examples(num_examples)
    per_epoch = pipeline.train_batches_per_epoch(num_examples, batch_size=3, process_count=2)
    assert per_epoch == 2
    streams = [take(iter(train(examples, process_index=p, process_count=2)), 3 * per_epoch) for p in (0, 1)]
    seen_over_epochs = set()
    for epoch in range(3):
        shards = [sum((b.inputs for b in s[epoch * per_epoch:(epoch + 1) * per_epoch]), []) for s in streams]
        assert all(b.epoch == epoch for s in streams for b in s[epoch * per_epoch:(epoch + 1) * per_epoch])
        assert len(shards[0]) == len(shards[1]) == 6 and not set(shards[0]) & set(shards[1])
        assert len(set(shards[0]) | set(shards[1])) == 12
        seen_over_epochs |= set(shards[0]) | set(shards[1])
    # With 13 examples one is left out per epoch, a different one each time (with this seed).
    assert seen_over_epochs == {e.id for e in examples}


def test_finite_epochs_stop():
    batches = list(train(text_examples(7), batch_size=2, num_epochs=2))
    assert len(batches) == 2 * pipeline.train_batches_per_epoch(7, 2) == 6
    assert all(len(b.inputs) == 2 and b.valid.all() for b in batches)


@pytest.mark.parametrize("num_examples,batch_size,process_count", [(11, 4, 2), (2, 5, 3), (9, 3, 1)])
def test_evaluation_covers_every_example_exactly_once(num_examples, batch_size, process_count):
    examples = text_examples(num_examples)
    num_batches = pipeline.eval_num_batches(num_examples, batch_size, process_count)
    valid_ids = []
    for p in range(process_count):
        batches = list(pipeline.eval_dataset(examples, ids_encode, batch_size=batch_size, template="plain",
                                             process_index=p, process_count=process_count))
        assert len(batches) == num_batches  # every process runs the same number of steps
        for batch in batches:
            assert len(batch.inputs) == batch_size and batch.valid.shape == (batch_size,)
            valid_ids += [i for i, ok in zip(batch.inputs, batch.valid) if ok]
    assert sorted(valid_ids) == sorted(e.id for e in examples)  # each once, none twice


def test_batches_hold_contract_dicts_with_rgb_images_and_messages():
    examples = [Example(id=f"im{i}", question="<image>How many?", images=(ImageRef(data=png((i, 2, 3))),),
                        answer="2", solution="\\boxed{2}", hint="h", meta={"family": "count"}) for i in range(4)]
    seen = []

    def encode(batch_examples):
        seen.append(batch_examples)
        return len(batch_examples)

    batch = next(iter(pipeline.train_dataset(examples, encode, batch_size=2, seed=0, process_index=0,
                                             process_count=1, template="maye_cot", shuffle=False)))
    # Prefetching may already have encoded later batches: the first batch is one of those encoded.
    assert batch.inputs == 2 and any(batch.examples == s for s in seen)
    first = batch.examples[0]
    assert set(first) == {"id", "question", "prompt_messages", "images", "answer", "solution", "hint", "meta",
                          "source"}
    assert first["id"] == "im0" and first["meta"] == {"family": "count"} and first["hint"] == "h"
    assert first["question"] == "<image>How many?"  # the dataset's question, without the template
    assert first["images"][0].mode == "RGB" and first["images"][0].getpixel((0, 0)) == (0, 2, 3)
    assert first["prompt_messages"][0]["content"][0] == {"type": "image"}
    assert first["prompt_messages"][0]["content"][1]["text"].startswith("How many?\nSolve the above")


def test_corrupt_image_keeps_the_batch_size_and_is_masked():
    examples = text_examples(5)
    examples[2] = Example(id="broken", question="<image>q", images=(ImageRef(data=b"garbage"),), answer="1",
                          solution="\\boxed{1}", source="data.jsonl:3")
    faults = FaultCounter(max_share=0.5, min_seen=1)
    batches = list(pipeline.eval_dataset(examples, ids_encode, batch_size=4, template="plain",
                                         process_index=0, process_count=1, faults=faults))
    assert [list(b.valid) for b in batches] == [[True, True, False, True], [True, False, False, False]]
    assert batches[0].inputs[2] == "ex0"  # the slot holds a good example, masked out
    assert faults.counts == {"corrupt_image": 1} and faults.examples[0].where == "data.jsonl:3"
    with pytest.raises(TooManyFaultsError):
        list(pipeline.eval_dataset(examples, ids_encode, batch_size=4, template="plain", process_index=0,
                                   process_count=1, faults=FaultCounter(max_share=0.1, min_seen=1)))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="leave 2 per process, fewer than batch_size=3"):
        train(text_examples(5), process_count=2)
    with pytest.raises(ValueError, match="process_index=2, process_count=2"):
        train(text_examples(8), process_index=2, process_count=2)
    with pytest.raises(ValueError, match="no examples"):
        pipeline.eval_dataset([], ids_encode, batch_size=2, process_index=0, process_count=1)


def test_default_sharding_comes_from_jax():
    batches = take(iter(pipeline.train_dataset(text_examples(4), ids_encode, batch_size=4, seed=0,
                                               template="plain")), 1)
    assert sorted(batches[0].inputs) == [f"ex{i}" for i in range(4)]  # one process: all examples


def test_config_defaults_drive_the_pipeline():
    cfg = pipeline.default_config()
    cfg.batch_size, cfg.template = 2, "plain"
    ds = pipeline.train_dataset(text_examples(4), ids_encode, process_index=0, process_count=1, **cfg)
    assert len(next(iter(ds)).inputs) == 2


def test_bucket_helpers():
    assert [pipeline.pad_to_bucket(n, (128, 32, 64)) for n in (0, 1, 32, 33, 128)] == [32, 32, 32, 64, 128]
    with pytest.raises(ValueError, match=r"length 129 exceeds the largest bucket 128 \(buckets: \[32, 64, 128\]\)"):
        pipeline.pad_to_bucket(129, (32, 64, 128))
    assert pipeline.geometric_buckets(64, 1000) == (64, 128, 256, 512, 1000)
    assert pipeline.geometric_buckets(256, 256) == (256,)
    row = np.array([[5, 6, 7]])
    np.testing.assert_array_equal(pipeline.pad_to_length(row, 5, left=True), [[0, 0, 5, 6, 7]])
    np.testing.assert_array_equal(pipeline.pad_to_length(row, 4, value=-1), [[5, 6, 7, -1]])
    np.testing.assert_array_equal(pipeline.pad_to_length(row, 2, axis=0), [[5, 6, 7], [0, 0, 0]])
    with pytest.raises(ValueError, match="longer than 2"):
        pipeline.pad_to_length(row, 2)


def test_batches_per_epoch_matches_the_stream():
    # Unshuffled: grain's index shuffle costs milliseconds per call on tiny datasets (~6 ms at n=10).
    for n, b, p in itertools.product((9, 10, 17), (2, 4), (1, 2)):
        stream = take(iter(train(text_examples(n), batch_size=b, process_count=p, shuffle=False)), 30)
        per_epoch = pipeline.train_batches_per_epoch(n, b, p)
        assert [x.epoch for x in stream] == [i // per_epoch for i in range(30)]
        first_epoch = sum((x.inputs for x in stream[:per_epoch]), [])
        assert len(first_epoch) == per_epoch * b <= n // p


def test_dyme_refiners_read_the_question_the_pipeline_carries(tmp_path):
    """DyME's checker and refiner read `question_wo_prompt`: the raw question, not the templated
    prompt. The pipeline's dicts carry it, so the rule-based refiner's Goal and the HTTP prompts
    state the question (before, every Goal read "Answer the question.")."""
    from vrl_jax.data.formats import load_examples
    from vrl_jax.rewards.visual import as_visual_example, make_visual_supervision

    records = [{"question": "Which year had the highest sales?", "answer": "2017", "hint": "The 2017 bar is tallest.",
                "image": ""}, {"question": "What is 2+2?", "answer": "4", "hint": "Add them.", "image": ""}]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    examples = load_examples(str(path), format="dyme")
    batch = next(iter(pipeline.train_dataset(examples, ids_encode, batch_size=2, seed=0, process_index=0,
                                             process_count=1, template="dyme_answer", shuffle=False)))
    first = batch.examples[0]
    assert first["question"] == "Which year had the highest sales?"
    assert "Your task is to answer" in first["prompt_messages"][0]["content"][-1]["text"]
    assert as_visual_example(first).question == "Which year had the highest sales?"
    refined = make_visual_supervision({"kind": "rule_based"}).refiner.refine(batch.examples).texts
    assert refined[0].startswith("Goal: Which year had the highest sales?\n")
