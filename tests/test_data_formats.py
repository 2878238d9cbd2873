"""Dataset loaders, fault accounting, image loading and prompt templates, on tiny fixtures."""
import io
import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vrl_jax.data import formats, prompts
from vrl_jax.data.faults import FaultCounter, TooManyFaultsError
from vrl_jax.data.formats import Example, ImageRef, SampleFault, load_examples, load_image

# ---------------------------------------------------------------------------------------------
# Fixture writers: each exact on-disk format, with tiny PNGs.


def png_bytes(size=(6, 4), color=(10, 20, 30), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path, size=(6, 4), color=(10, 20, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(png_bytes(size, color))


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def maye_record(i, image=None):
    return {"question": f"<image>In the figure, find $x_{i}$.", "answer": str(20 + i),
            "solution": f"\\boxed{{{20 + i}}}", "id": f"geometry3k_{i}",
            "image": image or f"geometry3k_images/geometry3k_{i}.png"}


def write_maye(dir_, name="geometry3k_rl_v0.jsonl", n=3):
    for i in range(n):
        write_png(os.path.join(dir_, f"geometry3k_images/geometry3k_{i}.png"), color=(i, 0, 0))
    path = os.path.join(dir_, name)
    write_lines(path, [json.dumps(maye_record(i)) for i in range(n)])
    return path


# ---------------------------------------------------------------------------------------------
# Loaders


def test_maye_jsonl_resolves_images_next_to_the_file(tmp_path, monkeypatch):
    path = write_maye(str(tmp_path / "geometry3k"))
    monkeypatch.chdir(tmp_path)  # relative to the JSONL's directory, not the working directory
    examples = load_examples(path)
    assert [e.id for e in examples] == ["geometry3k_0", "geometry3k_1", "geometry3k_2"]
    first = examples[1]
    assert first.question == "<image>In the figure, find $x_1$."
    assert (first.answer, first.solution, first.hint) == ("21", "\\boxed{21}", "")
    assert first.images[0].path == str(tmp_path / "geometry3k/geometry3k_images/geometry3k_1.png")
    assert first.source == f"{path}:2"
    assert first.meta["format"] == "maye"
    assert load_image(first.images[0]).getpixel((0, 0)) == (1, 0, 0)


def test_maye_extra_fields_go_to_meta_and_solution_defaults_to_boxed_answer(tmp_path):
    write_png(str(tmp_path / "a.png"))
    record = {"question": "<image>Count.", "answer": 7, "image": "a.png", "family": "count",
              "level": 1, "meta": {"generator_version": "1"}}
    write_lines(str(tmp_path / "s.jsonl"), [json.dumps(record)])
    (example,) = load_examples(tmp_path / "s.jsonl")
    assert (example.answer, example.solution, example.id) == ("7", "\\boxed{7}", "s-0")
    assert example.meta == {"family": "count", "level": 1, "generator_version": "1", "format": "maye"}


@pytest.mark.parametrize("dataset,split,name", [
    ("geometry3k", "validation", "geometry3k_validation_v0.jsonl"),
    ("mm_math", "test", "math_verse_test_v0.jsonl"),
])
def test_maye_split_layout(tmp_path, dataset, split, name):
    write_maye(str(tmp_path / "datasets" / dataset), name=name, n=2)
    from_datasets = formats.load_maye_split(tmp_path / "datasets", dataset, split)
    from_dataset_dir = formats.load_maye_split(tmp_path / "datasets" / dataset, dataset, split)
    assert [e.id for e in from_datasets] == [e.id for e in from_dataset_dir] == ["geometry3k_0", "geometry3k_1"]
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        formats.load_maye_split(tmp_path / "datasets", dataset, "dev")


def write_easyr1_parquet(path, image_dir):
    write_png(os.path.join(image_dir, "p.png"), color=(0, 255, 0))
    image_type = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({
        "images": pa.array([[{"bytes": png_bytes(color=(1, 2, 3)), "path": None}],
                            [{"bytes": None, "path": "p.png"}]], type=image_type),
        "problem": ["<image>Find $y$.", "Given <image>, find the area."],
        "answer": ["48", "12.5"],
        "id": pa.array([3, 4], type=pa.int64()),
        "choices": [["12", "48", "6", "24"], ["1", "2", "12.5", "4"]],
        "ground_truth": ["B", "C"],
    })
    pq.write_table(table, path)


def test_easyr1_parquet_with_image_bytes_and_paths(tmp_path):
    path = str(tmp_path / "test-00000-of-00001.parquet")
    write_easyr1_parquet(path, str(tmp_path))
    examples = load_examples(path)
    assert [e.id for e in examples] == ["3", "4"]
    assert examples[0].question == "<image>Find $y$."
    assert (examples[0].answer, examples[0].solution) == ("48", "\\boxed{48}")
    assert examples[0].meta["choices"] == ["12", "48", "6", "24"] and examples[0].meta["ground_truth"] == "B"
    assert load_image(examples[0].images[0]).getpixel((0, 0)) == (1, 2, 3)
    assert load_image(examples[1].images[0]).getpixel((0, 0)) == (0, 255, 0)
    assert examples[1].source == f"{path}#row1"


def dyme_records():
    return [
        {"question": "What year has the highest value?", "answer": "2017", "hint": "<SUMMARY>...", "image": "c.png",
         "human_or_machine": 0},
        {"question": "machine-made question", "answer": "3", "hint": "", "image": "c.png", "human_or_machine": 1},
        {"question_wo_prompt": "What vehicle is this?", "prompt": "Your task ...", "answer": "Answer: cab",
         "direct_answers": "['cab', 'taxi', 'cab']", "visual_fact": "{\"description\": \"a yellow car\"}",
         "hint": "It is yellow.", "image": "c.png"},
        {"question": "Natalia sold clips to 48 friends ...", "answer": "72", "hint": "48/2 = 24 ... #### 72"},
    ]


def test_dyme_json_array(tmp_path):
    write_png(str(tmp_path / "c.png"))
    path = tmp_path / "train_high.json"
    path.write_text(json.dumps(dyme_records()))
    examples = load_examples(path)
    assert [e.question for e in examples] == [
        "What year has the highest value?", "What vehicle is this?", "Natalia sold clips to 48 friends ..."]
    chart, vqa, gsm = examples
    assert (chart.answer, chart.solution, chart.hint) == ("2017", "Answer: 2017", "<SUMMARY>...")
    assert chart.source == f"{path}[0]"
    assert (vqa.answer, vqa.meta["direct_answers"]) == ("cab", ["cab", "taxi", "cab"])
    assert gsm.images == () and gsm.answer == "72"
    with_machine = load_examples(path, keep_machine_generated=True)
    assert len(with_machine) == 4
    visual = load_examples(path, hint_field="visual_fact")
    assert visual[1].hint == "{\"description\": \"a yellow car\"}"


def test_dyme_direct_answers_are_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    records = [{"question": "q", "answer": "a", "hint": "h",
                "direct_answers": f"__import__('pathlib').Path({str(marker)!r}).touch()"}]
    records += [{"question": f"q{i}", "answer": "a", "hint": "h"} for i in range(30)]
    (tmp_path / "d.json").write_text(json.dumps(records))
    faults = FaultCounter(max_share=0.1)
    examples = load_examples(tmp_path / "d.json", faults=faults)
    assert len(examples) == 30 and not marker.exists()
    assert faults.counts == {"bad_field": 1}
    assert faults.examples[0].where == f"{tmp_path / 'd.json'}[0]"


def test_format_detection_and_override(tmp_path):
    write_png(str(tmp_path / "a.png"))
    # MAYE schema in a JSON array, and an EasyR1 schema in JSONL.
    (tmp_path / "m.json").write_text(json.dumps([maye_record(0, image="a.png")]))
    assert load_examples(tmp_path / "m.json")[0].meta["format"] == "maye"
    write_lines(str(tmp_path / "e.jsonl"), [json.dumps({"problem": "<image>p", "answer": "1", "images": ["a.png"]})])
    assert load_examples(tmp_path / "e.jsonl")[0].meta["format"] == "easyr1"
    # A synthetic record with a hint looks like DyME; format= decides.
    record = dict(maye_record(0, image="a.png"), hint="a rationale")
    write_lines(str(tmp_path / "h.jsonl"), [json.dumps(record)])
    assert load_examples(tmp_path / "h.jsonl")[0].solution == "Answer: 20"
    forced = load_examples(tmp_path / "h.jsonl", format="maye")[0]
    assert forced.solution == "\\boxed{20}" and forced.meta["hint"] == "a rationale"
    write_lines(str(tmp_path / "u.jsonl"), [json.dumps({"text": "x"})])
    with pytest.raises(ValueError, match=r"u\.jsonl: cannot tell the dataset format .*\['text'\]"):
        load_examples(tmp_path / "u.jsonl")
    with pytest.raises(ValueError, match="format='llava' is not one of"):
        load_examples(tmp_path / "m.json", format="llava")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"x\.csv: unknown data file extension '\.csv'"):
        load_examples(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_examples(tmp_path / "nope.jsonl")


def test_broken_json_array_names_file_and_line(tmp_path):
    (tmp_path / "bad.json").write_text('[\n {"question": "q",\n  "answer": }\n]')
    with pytest.raises(ValueError, match=r"bad\.json:3:\d+: invalid JSON array"):
        load_examples(tmp_path / "bad.json")


def test_malformed_jsonl_lines_report_their_own_line_and_json_column(tmp_path):
    """A stray carriage return inside a record (copied from a Windows tool) used to split the record in
    two: its fault named the wrong column and every later line was off by one. A UTF-8 byte-order mark
    used to make the first record malformed."""
    write_png(str(tmp_path / "a.png"))
    good = [json.dumps(maye_record(i, image="a.png")) for i in range(3)]
    bad_cr = '{"question": "<image>x\ry", "answer": }'
    bad_col = '  {"question": "<image>é", "answer": 3,, "image": "a.png"}'
    path = tmp_path / "c.jsonl"
    path.write_bytes(("\ufeff" + "\r\n".join([good[0], bad_cr, good[1], bad_col, good[2]]) + "\r\n").encode())
    faults = FaultCounter(max_share=0.5)
    examples = load_examples(path, faults=faults)
    assert [e.id for e in examples] == ["geometry3k_0", "geometry3k_1", "geometry3k_2"]
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:3", f"{path}:5"]
    expected = {}
    for line in (bad_cr, bad_col):
        try:
            json.loads(line)
        except json.JSONDecodeError as err:
            expected[line] = f"invalid JSON at column {err.colno}: {err.msg}"
    assert [(f.where, f.detail) for f in faults.examples] == [(f"{path}:2", expected[bad_cr]),
                                                              (f"{path}:4", expected[bad_col])]
    assert "column 23" in expected[bad_cr] and "column 40" in expected[bad_col]  # 1-based, in characters


# ---------------------------------------------------------------------------------------------
# Per-sample faults


def write_faulty_maye(tmp_path):
    """20 good lines plus: a missing image (line 3), a malformed line (5), a missing answer (8)."""
    for i in range(20):
        write_png(str(tmp_path / f"im/{i}.png"))
    lines = [json.dumps(maye_record(i, image=f"im/{i}.png")) for i in range(20)]
    lines.insert(2, json.dumps(maye_record(90, image="im/missing.png")))
    lines.insert(4, '{"question": "<image>q", "answer": ')
    broken = maye_record(91, image="im/0.png")
    del broken["answer"]
    lines.insert(7, json.dumps(broken))
    path = str(tmp_path / "f.jsonl")
    write_lines(path, lines)
    return path


def test_faulty_samples_are_reported_with_file_and_line_and_skipped(tmp_path, caplog):
    path = write_faulty_maye(tmp_path)
    faults = FaultCounter(max_share=0.2)
    with caplog.at_level(logging.WARNING):
        examples = load_examples(path, faults=faults)
    assert len(examples) == 20 and faults.num_ok == 20
    assert faults.counts == {"missing_image": 1, "malformed_record": 1, "missing_field": 1}
    by_kind = {f.kind: f for f in faults.examples}
    assert by_kind["missing_image"].where == f"{path}:3" and "missing.png" in by_kind["missing_image"].detail
    assert by_kind["malformed_record"].where == f"{path}:5"
    assert by_kind["missing_field"].where == f"{path}:8" and "'answer'" in by_kind["missing_field"].detail
    assert f"{path}:5: malformed_record" in caplog.text


def test_fault_share_exceeded_stops_the_run(tmp_path):
    path = write_faulty_maye(tmp_path)  # 3 faults in 23 samples = 13%
    with pytest.raises(TooManyFaultsError, match=r"3 of 23 samples were faulty \(13\.0%\)") as err:
        load_examples(path, faults=FaultCounter(max_share=0.1))
    assert f"{path}:3: missing_image" in str(err.value)


def test_overlong_prompt_is_a_fault(tmp_path):
    write_png(str(tmp_path / "a.png"))
    lines = [json.dumps(dict(maye_record(i, image="a.png"), question="<image>" + "x" * n))
             for i, n in enumerate([5, 50, 10])]
    write_lines(str(tmp_path / "p.jsonl"), lines)
    faults = FaultCounter(max_share=0.5)
    examples = load_examples(tmp_path / "p.jsonl", faults=faults, max_prompt_length=20,
                             prompt_length_fn=lambda e: len(e.question))
    assert [e.id for e in examples] == ["geometry3k_0", "geometry3k_2"]
    assert faults.counts == {"prompt_too_long": 1}
    assert faults.examples[0].where.endswith("p.jsonl:2") and "57" in faults.examples[0].detail
    with pytest.raises(ValueError, match="given together"):
        load_examples(tmp_path / "p.jsonl", max_prompt_length=20)


def test_fault_counter_limits_and_kinds():
    counter = FaultCounter(max_share=0.1, min_seen=10)
    counter.record("corrupt_image", "a.jsonl:1", "bad")
    counter.ok(3)  # 25% faulty but only 4 seen: a run is not stopped by its first bad sample
    with pytest.raises(TooManyFaultsError):
        counter.check(final=True)
    counter.ok(6)  # 1 of 10 = 10%: at the limit, allowed
    with pytest.raises(TooManyFaultsError, match="2 of 11"):
        counter.record("corrupt_image", "a.jsonl:12", "bad")
    with pytest.raises(ValueError, match="unknown fault kind 'typo'"):
        FaultCounter().record("typo", "x", "y")
    with pytest.raises(ValueError, match="max_share"):
        FaultCounter(max_share=1.5)


# ---------------------------------------------------------------------------------------------
# Images


def test_corrupt_and_missing_images_raise_sample_faults(tmp_path):
    with pytest.raises(SampleFault) as err:
        load_image(ImageRef(data=b"\x89PNG\r\n\x1a\nnot really a png"))
    assert err.value.kind == "corrupt_image"
    truncated = png_bytes(size=(64, 64))[:-30]
    with pytest.raises(SampleFault) as err:
        load_image(ImageRef(data=truncated))
    assert err.value.kind == "corrupt_image"
    with pytest.raises(SampleFault) as err:
        load_image(ImageRef(path=str(tmp_path / "gone.png")))
    assert err.value.kind == "missing_image" and "gone.png" in err.value.detail


def blend_over_white(rgb, alpha):
    return tuple(round(c * alpha / 255 + 255 * (1 - alpha / 255)) for c in rgb)


def test_image_modes_become_rgb():
    gray = load_image(ImageRef(data=png_bytes(mode="L", color=77)))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (77, 77, 77)

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 30, 60] + [0] * 762)
    buf = io.BytesIO()
    palette.save(buf, format="PNG")
    assert load_image(ImageRef(data=buf.getvalue())).getpixel((0, 0)) == (200, 30, 60)

    rgba = png_bytes(mode="RGBA", color=(200, 100, 0, 128))
    got = load_image(ImageRef(data=rgba)).getpixel((0, 0))
    assert np.abs(np.subtract(got, blend_over_white((200, 100, 0), 128))).max() <= 1

    transparent_palette = Image.new("P", (4, 4), 0)
    transparent_palette.putpalette([5, 6, 7] + [0] * 765)
    buf = io.BytesIO()
    transparent_palette.save(buf, format="PNG", transparency=0)
    assert load_image(ImageRef(data=buf.getvalue())).getpixel((0, 0)) == (255, 255, 255)

    gray_alpha = png_bytes(mode="LA", color=(0, 0))
    assert load_image(ImageRef(data=gray_alpha)).getpixel((0, 0)) == (255, 255, 255)

    array = np.full((3, 5, 3), 9, dtype=np.uint8)
    assert load_image(ImageRef(array=array)).size == (5, 3)


@pytest.mark.parametrize("fmt,size,expected", [
    ("JPEG", (3000, 2000), (480, 320)),
    ("PNG", (1200, 3000), (192, 480)),
])
def test_huge_images_are_downscaled_on_load(tmp_path, fmt, size, expected):
    path = str(tmp_path / f"big.{fmt.lower()}")
    Image.new("RGB", size, (120, 40, 200)).save(path, format=fmt)
    image = load_image(ImageRef(path=path), max_side=480)
    assert image.size == expected and image.mode == "RGB"
    assert np.abs(np.subtract(image.getpixel((10, 10)), (120, 40, 200))).max() <= 3
    assert load_image(ImageRef(path=path), max_side=None).size == size


# ---------------------------------------------------------------------------------------------
# Prompt templates


def example(question, n_images=1):
    return Example(id="e", question=question, images=tuple(ImageRef(data=b"") for _ in range(n_images)),
                   answer="1", solution="\\boxed{1}")


def test_maye_prompt_text_and_image_position():
    messages = prompts.build_messages(example("<image>In the figure, find $x$."), "maye_cot")
    assert messages == [{"role": "user", "content": [
        {"type": "image"},
        {"type": "text", "text": "In the figure, find $x$.\nSolve the above mathematics problem, write out "
         "the solution process according to the question, and use the same LaTeX format as the question "
         "in the solution process. Please display the final answer in the format \\boxed{}."}]}]
    verbatim = prompts.build_messages(example("<image>In the figure, find $x$."), "maye_cot_verbatim")
    assert verbatim[0]["content"][0] == {"type": "image"}
    assert verbatim[0]["content"][1]["text"].startswith("<image>In the figure, find $x$.\nSolve the above")


def test_r1_think_prompt_trims_and_appends_instruction():
    (message,) = prompts.build_messages(example("  <image>Find $y$.  \n"), "r1_think")
    assert message["content"] == [{"type": "image"}, {"type": "text", "text": (
        "Find $y$. You FIRST think about the reasoning process as an internal monologue and then provide "
        "the final answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final "
        "answer MUST BE put in \\boxed{}.")}]


def test_dyme_prompt_puts_images_first():
    (message,) = prompts.build_messages(example("How many bars?"), "dyme_answer")
    assert message["content"] == [{"type": "image"}, {"type": "text", "text": (
        "Your task is to answer the question below. Give step by step thinking before you answer, and when "
        "you're ready to answer, please use the format \"Answer: ..\"\n\nQuestion:\n\nHow many bars?")}]
    (text_only,) = prompts.build_messages(example("What is 6*7?", n_images=0), "dyme_answer")
    assert [item["type"] for item in text_only["content"]] == ["text"]


def test_image_tags_become_image_items_in_place():
    content = prompts.user_content("Compare <image> with <image>.", 2)
    assert content == [{"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "text", "text": " with "},
                       {"type": "image"}, {"type": "text", "text": "."}]
    with pytest.raises(SampleFault, match="2 <image> tags but the sample has 1 images"):
        prompts.user_content("Compare <image> with <image>.", 1)


def test_templates_from_config_and_errors():
    template = prompts.get_template({"name": "mine", "text": "Q: {question}\nA:", "system": "Be brief."})
    messages = prompts.build_messages(example("<image>2+2?"), template)
    assert messages[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    assert messages[1]["content"] == [{"type": "text", "text": "Q: "}, {"type": "image"},
                                      {"type": "text", "text": "2+2?\nA:"}]
    with pytest.raises(ValueError, match="unknown prompt template 'cot'"):
        prompts.get_template("cot")
    with pytest.raises(ValueError, match=r"must contain \{question\} exactly once, found 0"):
        prompts.PromptTemplate("broken", "no field")
    with pytest.raises(ValueError, match=r"unknown fields \['txt'\]"):
        prompts.get_template({"name": "x", "txt": "{question}"})


# ---------------------------------------------------------------------------------------------
# tensorflow-datasets builder (optional extra)


def test_tfds_builder_round_trip(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from vrl_jax.data import tfds_geometry3k

    manual = tmp_path / "datasets" / "geometry3k"
    write_maye(str(manual), "geometry3k_rl_v0.jsonl", n=4)
    write_maye(str(manual), "geometry3k_validation_v0.jsonl", n=2)
    write_maye(str(manual), "geometry3k_test_v0.jsonl", n=3)
    tfds_geometry3k.build(tmp_path / "datasets", tmp_path / "tfds")
    source = tfds.data_source(tfds_geometry3k.NAME, data_dir=str(tmp_path / "tfds"), split="train")
    assert len(source) == 4
    examples = sorted(tfds_geometry3k.TfdsExamples(source), key=lambda e: e.id)
    expected = load_examples(manual / "geometry3k_rl_v0.jsonl")
    for got, want in zip(examples, expected, strict=True):
        assert (got.id, got.question, got.answer, got.solution) == (want.id, want.question, want.answer,
                                                                    want.solution)
        np.testing.assert_array_equal(np.asarray(load_image(got.images[0])),
                                      np.asarray(load_image(want.images[0])))
    assert len(tfds_geometry3k.data_source(tmp_path / "tfds", "test")) == 3


def test_the_data_line_counts_distinct_problems_where_the_data_names_them(tmp_path):
    """Synthgeo repeats a problem with other pictures and wordings (its grid family has six at level 0), so
    the run's data line says how many distinct problems a split holds; data that names no problem gets none."""
    from vrl_jax.data.synthgeo import GeneratorConfig, export_dataset
    from vrl_jax.run_setup import data_sizes
    export_dataset(str(tmp_path), {"train": 30, "val": 0, "test_iid": 0, "test_ood": 0},
                   GeneratorConfig(families=("grid",), levels=(0,)), formats=("maye",), progress=False)
    path = tmp_path / "maye_train.jsonl"
    keys = {json.loads(line)["meta"]["semantic_key"] for line in path.read_text().splitlines()}
    assert 1 < len(keys) < 30
    examples = load_examples(str(path))
    assert data_sizes({"train": examples, "val": examples[:3]}) == (
        f"30 train ({len(keys)} distinct problems), 3 val ({len({e.meta['semantic_key'] for e in examples[:3]})} "
        "distinct problems)")
    write_maye(tmp_path / "plain", n=3)
    plain = load_examples(str(tmp_path / "plain" / "geometry3k_rl_v0.jsonl"))
    assert data_sizes({"train": plain, "test": []}) == "3 train, 0 test"
