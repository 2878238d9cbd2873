"""Tests for vrl_jax.data.synthgeo: exact answers recomputed independently, determinism, honest
splits, the image being necessary, exports readable back, and the tiny tokenizer."""
from __future__ import annotations

import collections
import hashlib
import io
import json
import math
import re
from fractions import Fraction

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vrl_jax.data import synthgeo
from vrl_jax.data.synthgeo import (FAMILIES, GENERATOR_VERSION, SPLITS, ExactAnswer, GeneratorConfig,
                                   exact_sqrt, fingerprint, generate_item, generate_split, png_bytes)
from vrl_jax.data.synthgeo.__main__ import main as cli_main

# ---------------------------------------------------------------------------------------------
# Independent reference: parse the canonical answer string and recompute answers from parameters
# (or from the question text of a text twin), without the generator's own solving code.

ANSWER_RE = re.compile(r"^(-?)(?:\\frac\{(\d+)\}\{(\d+)\}|(\d+))?(?:\\sqrt\{(\d+)\})?(\\pi)?$")


def parse_answer(text: str) -> tuple[Fraction, int, bool]:
    """'\\frac{25}{4}\\pi' -> (25/4, 1, True); '2\\sqrt{13}' -> (2, 13, False)."""
    m = ANSWER_RE.match(text)
    assert m, f"answer {text!r} is not in canonical form"
    sign, num, den, whole, radicand, pi = m.groups()
    coef = Fraction(int(num), int(den)) if num else Fraction(int(whole)) if whole else Fraction(1)
    assert num is None or math.gcd(int(num), int(den)) == 1 and int(den) > 1, f"{text!r} not reduced"
    return (-coef if sign else coef), int(radicand or 1), pi is not None


def square_free(n: int) -> bool:
    return all(n % (k * k) for k in range(2, math.isqrt(n) + 1))


def matches(answer: str, expected) -> bool:
    """`expected` is ('rational', q), ('pi', q) for q*pi, or ('sqrt', n) for sqrt(n)."""
    coef, radicand, pi = parse_answer(answer)
    kind, value = expected
    if kind == "sqrt":
        return not pi and coef > 0 and square_free(radicand) and coef * coef * radicand == value
    return radicand == 1 and pi == (kind == "pi") and coef == value


EQUAL_RELATIONS = {"vertical", "corresponding", "alternate interior", "alternate exterior"}
SUPPLEMENTARY_RELATIONS = {"linear pair", "same-side interior", "same-side exterior"}


def expected_from_params(family: str, p: dict, layout: dict):
    if family == "count":
        drawn = sum(o[p["ask"]] == p["target"] for o in layout["objects"])
        assert drawn == p["count"] and len(layout["objects"]) == p["count"] + p["distractors"]
        return "rational", Fraction(drawn)
    if family == "rect":
        a, b = p["sides"]
        return "rational", Fraction(a * b if p["ask"] == "area" else a + a + b + b)
    if family == "rtri":
        x, y = p["given"]
        return "sqrt", x * x + y * y if p["unknown"] == "hypotenuse" else y * y - x * x
    if family == "tri_angle":
        return "rational", Fraction(180 - p["given"][0] - p["given"][1])
    if family == "parallel":
        # Rays at a crossing, counter-clockwise from the line's right-hand ray: 0, phi, 180, 180+phi.
        s, t = p["given"][1], p["unknown"][1]
        phi = p["alpha"] if s in (0, 2) else 180 - p["alpha"]
        rays = [0, phi, 180, 180 + phi, 360]
        x = rays[t + 1] - rays[t]
        assert x == (p["alpha"] if p["relation"] in EQUAL_RELATIONS else 180 - p["alpha"])
        return "rational", Fraction(x)
    if family == "circle":
        r = Fraction(p["value"], 2 if p["given"] == "diameter" else 1)
        return "pi", (r * r * Fraction(p["shaded"]) if p["ask"] == "area" else r + r)
    if family == "bar":
        v, i = p["values"], p["bars"]
        return "rational", Fraction({"value": lambda: v[i[0]], "max": lambda: max(v),
                                     "diff": lambda: v[i[0]] - v[i[1]], "sum": lambda: v[i[0]] + v[i[1]]}
                                    [p["ask"]]())
    if family == "grid":
        (ax, ay), (bx, by) = layout["a"], layout["b"]
        assert sorted((abs(bx - ax), abs(by - ay))) == p["legs"]
        return "sqrt", (bx - ax) ** 2 + (by - ay) ** 2
    raise AssertionError(f"no reference for family {family}")


def read_text_twin(question: str):
    """A blind reader: solves a question from its text alone, or returns None."""
    q = question
    if m := re.search(r"The picture shows (.*?)\. ", q):
        groups = re.findall(r"(\d+) (red|blue|green) (circle|square|triangle)", m.group(1))
        if t := re.search(r"(red|blue|green) shapes", q):
            return "rational", Fraction(sum(int(n) for n, c, _ in groups if c == t.group(1)))
        shape = re.search(r"(circle|square|triangle)s (are|in|shown)", q).group(1)
        return "rational", Fraction(sum(int(n) for n, _, s in groups if s == shape))
    if m := re.search(r"width (\d+) and height (\d+)", q):
        w, h = int(m.group(1)), int(m.group(2))
        return "rational", Fraction(w * h if "area" in q else 2 * (w + h))
    if m := re.search(r"legs of length (\d+) and (\d+)", q):
        return "sqrt", int(m.group(1)) ** 2 + int(m.group(2)) ** 2
    if m := re.search(r"a leg of length (\d+) and a hypotenuse of length (\d+)", q):
        return "sqrt", int(m.group(2)) ** 2 - int(m.group(1)) ** 2
    if m := re.search(r"measure (\d+) degrees and (\d+) degrees", q):
        return "rational", Fraction(180 - int(m.group(1)) - int(m.group(2)))
    if m := re.search(r"angle of (\d+) degrees and the angle x (?:are|form) (?:a )?([a-z -]+?)(?: angles)?\.", q):
        alpha, relation = int(m.group(1)), m.group(2)
        assert relation in EQUAL_RELATIONS | SUPPLEMENTARY_RELATIONS, relation
        return "rational", Fraction(alpha if relation in EQUAL_RELATIONS else 180 - alpha)
    if m := re.search(r"A circle has (radius|diameter) (\d+)", q):
        r = Fraction(int(m.group(2)), 2 if m.group(1) == "diameter" else 1)
        s = re.search(r"(\d+)/(\d+) of it is shaded", q)
        share = Fraction(int(s.group(1)), int(s.group(2))) if s else Fraction(1)
        return "pi", (share * r * r if "area" in q else 2 * r)
    if m := re.search(r"A bar chart shows (.*?)\. ", q):
        v = {k: int(n) for k, n in re.findall(r"([A-E]) = (\d+)", m.group(1))}
        rest = q[m.end():]
        if "largest" in rest or "tallest" in rest:
            return "rational", Fraction(max(v.values()))
        names = re.findall(r"bars? ([A-E])", rest)
        if "minus" in rest:
            return "rational", Fraction(v[names[0]] - v[names[1]])
        if len(names) == 2 or "and" in rest:
            names = re.findall(r"\b([A-E])\b", rest)
            return "rational", Fraction(v[names[0]] + v[names[1]])
        return "rational", Fraction(v[names[0]])
    if m := re.search(r"A = \((\d+), (\d+)\) and B = \((\d+), (\d+)\)", q):
        ax, ay, bx, by = map(int, m.groups())
        return "sqrt", (bx - ax) ** 2 + (by - ay) ** 2
    return None


@pytest.fixture(scope="module")
def sample_items():
    """48 items per family per split, half of them text twins."""
    config = GeneratorConfig(seed=7, text_fraction=0.5)
    return [item for split in SPLITS for item in generate_split(split, 48 * len(FAMILIES), config)]


# ---------------------------------------------------------------------------------------------
# Answers


def test_exact_answer_strings_by_hand():
    assert ExactAnswer(Fraction(25, 4), pi=True).latex() == "\\frac{25}{4}\\pi"
    assert ExactAnswer(Fraction(1), pi=True).latex() == "\\pi"
    assert ExactAnswer(Fraction(-3)).latex() == "-3"
    assert ExactAnswer(Fraction(0)).latex() == "0"
    assert exact_sqrt(52).latex() == "2\\sqrt{13}" and exact_sqrt(52).plain() == "2 sqrt(13)"
    assert exact_sqrt(25).latex() == "5" and exact_sqrt(2).latex() == "\\sqrt{2}"
    assert abs(exact_sqrt(72).as_float() - math.sqrt(72)) < 1e-12
    with pytest.raises(ValueError, match="square-free"):
        ExactAnswer(Fraction(1), radicand=8)


def test_answers_match_independent_recomputation(sample_items):
    seen = collections.Counter()
    for item in sample_items:
        expected = expected_from_params(item.family, item.meta["params"], item.meta["layout"])
        assert matches(item.answer, expected), (item.id, item.answer, expected)
        coef, radicand, pi = parse_answer(item.answer)
        value = float(coef) * math.sqrt(radicand) * (math.pi if pi else 1)
        assert abs(value - item.meta["answer_float"]) < 1e-6
        seen[item.family] += 1
    assert set(seen) == set(FAMILIES) and min(seen.values()) >= 150


def test_text_twins_are_solvable_from_the_question_alone(sample_items):
    twins = [item for item in sample_items if item.modality == "text"]
    assert len(twins) > 500
    for item in twins:
        assert matches(item.answer, read_text_twin(item.question)), (item.id, item.question, item.answer)


def test_drawn_triangles_have_the_stated_angles(sample_items):
    from vrl_jax.data.synthgeo.families import rtri, tri_angle

    def angle_at(v, p, q):
        a, b = p - v, q - v
        return math.degrees(math.acos(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)))

    for item in sample_items:
        params, layout = item.meta["params"], item.meta["layout"]
        if item.family == "tri_angle":
            v = tri_angle._vertices(params, layout, 112)
            alpha, beta = params["given"]
            measured = [angle_at(v[k], v[(k + 1) % 3], v[(k + 2) % 3]) for k in range(3)]
            np.testing.assert_allclose(measured, [alpha, beta, 180 - alpha - beta], atol=1e-6)
        elif item.family == "rtri":
            r, e1, e2 = rtri._vertices(params, layout, 112)
            assert abs(angle_at(r, e1, e2) - 90) < 1e-6
            sides = sorted(np.linalg.norm(d) for d in (e1 - r, e2 - r, e2 - e1))
            p, q = params["given"]
            true = sorted([p, q, math.hypot(p, q)] if params["unknown"] == "hypotenuse"
                          else [p, q, math.sqrt(q * q - p * p)])
            np.testing.assert_allclose(np.array(sides) / sides[-1], np.array(true) / true[-1], atol=1e-9)


def test_solutions_box_the_answer_and_hints_are_structured(sample_items):
    from math_verify import parse, verify

    for item in sample_items:
        assert item.solution.endswith(f"\\boxed{{{item.answer}}}.")
        assert item.hint.startswith("Goal: ") and "\nObservation: " in item.hint
        assert "\nReasoning: " in item.hint and "\nConclusion: " in item.hint
        assert "answer:" not in item.hint.lower()  # DyME's flag must occur once, after the hint
        assert set(item.visual_facts) == {"description", "objects", "quantities"}
    for item in sample_items[::25]:  # the judge agrees with the gold answer, and not with a wrong one
        gold = parse(f"${item.answer}$")
        assert verify(gold, parse(item.solution)), item.id
        coef, radicand, pi = parse_answer(item.answer)
        wrong = ExactAnswer(coef + 1, radicand=radicand, pi=pi).latex()
        assert not verify(gold, parse(f"\\boxed{{{wrong}}}")), (item.id, wrong)


def test_vision_questions_carry_no_numbers(sample_items):
    for item in sample_items:
        assert item.question.startswith("<image>")
        if item.modality == "vision":
            assert not re.search(r"\d", item.question), item.question
            assert read_text_twin(item.question) is None
        assert item.image.size == (112, 112) and item.image.mode == "RGB"


# ---------------------------------------------------------------------------------------------
# The image is necessary


def test_blind_model_cannot_solve_vision_items_but_text_twins_can_be_read():
    """A question-only predictor fit on train is no better than guessing each family's most common
    answer on vision items (chance), while a question-only reader solves every text twin."""
    fit = list(generate_split("train", 1200, GeneratorConfig(seed=3, text_fraction=0.5)))
    # Same pool of problems as `fit` (another seed of the train split): the lookup's best case.
    same_pool = list(generate_split("train", 1200, GeneratorConfig(seed=4, text_fraction=0.5)))
    held_out = [item for split in ("test_iid", "test_ood")
                for item in generate_split(split, 300, GeneratorConfig(seed=3, text_fraction=0.5))]
    by_question = collections.defaultdict(collections.Counter)
    by_family = collections.defaultdict(collections.Counter)
    for item in fit:
        by_question[item.question][item.answer] += 1
        by_family[item.family][item.answer] += 1

    def lookup(item):  # most common train answer for this exact question text
        counts = by_question.get(item.question) or by_family[item.family]
        return counts.most_common(1)[0][0]

    def accuracy(items, predict):
        return float(np.mean([predict(item) == item.answer for item in items]))

    def family_prior(item):
        return by_family[item.family].most_common(1)[0][0]

    for items, ceiling in ((same_pool, 0.25), (held_out, 0.08)):
        vision = [item for item in items if item.modality == "vision"]
        twins = [item for item in items if item.modality == "text"]
        assert len(vision) > 250 and len(twins) > 250
        assert accuracy(vision, lookup) <= min(accuracy(vision, family_prior) + 0.05, ceiling)
        assert all(read_text_twin(item.question) is None for item in vision)
        assert all(matches(item.answer, read_text_twin(item.question)) for item in twins)


# ---------------------------------------------------------------------------------------------
# Determinism, splits, frozen sets


def test_same_seed_gives_identical_records_and_image_bytes():
    config = GeneratorConfig(seed=11)
    for split in SPLITS:
        a, b = list(generate_split(split, 12, config)), list(generate_split(split, 12, config))
        assert [x.record("p") for x in a] == [y.record("p") for y in b]
        assert [png_bytes(x.image) for x in a] == [png_bytes(y.image) for y in b]
        # Item i does not depend on the items before it: evaluation sets are prefix-stable.
        assert generate_item(split, 7, config).record("p") == a[7].record("p")
    other = list(generate_split("train", 12, GeneratorConfig(seed=12)))
    assert [x.record("p") for x in other] != [x.record("p") for x in generate_split("train", 12, config)]


def test_splits_are_disjoint_by_semantic_key(sample_items):
    keys = collections.defaultdict(set)
    for item in sample_items:
        family, params = item.family, item.meta["params"]
        key = json.dumps([family, params], sort_keys=True, separators=(",", ":"))
        assert key == item.meta["semantic_key"]
        bucket = int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) % 100
        if item.split == "test_ood":
            assert FAMILIES[family].is_ood(params) and item.level == 3
        else:
            assert not FAMILIES[family].is_ood(params) and item.level in (0, 1, 2)
            assert bucket in {"train": range(80), "val": range(80, 90), "test_iid": range(90, 100)}[item.split]
        assert item.meta["difficulty"]["level"] == item.level
        assert item.meta["generator_version"] == GENERATOR_VERSION
        keys[item.split].add(key)
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            assert not keys[a] & keys[b], (a, b)


# Pinned for GENERATOR_VERSION "1": a change in sampling, wording or layout must bump the version.
PINNED = {
    "train": "206a191bbe87e08ffedb7b404ea61abad0ac4f2b1a3dfb0a54b939378e875187",
    "val": "1db13e48a804e67c4d293e7440d2d118e6fb0826af4c73b3e46b83589e210e0c",
    "test_iid": "6c220f1be4fbc23c37922f50469f862d2bee681bcc346b43882730d942e45a71",
    "test_ood": "33fe2745abbc781fc64b61cd84dde045bc42b7a99af9ab0403795f5e15ad24a4",
}


def test_frozen_sets_are_pinned_to_the_generator_version():
    assert GENERATOR_VERSION == "1", "new generator version: re-pin PINNED"
    for split in SPLITS:
        first = list(generate_split(split, 8))
        for item in first:  # the pinned records are right, not just unchanged
            expected = expected_from_params(item.family, item.meta["params"], item.meta["layout"])
            assert matches(item.answer, expected)
        assert fingerprint(first) == PINNED[split], split
    assert [x.id for x in synthgeo.frozen_split("val", 3)] == [f"synthgeo-v1-val-00000{i}" for i in range(3)]


# ---------------------------------------------------------------------------------------------
# Exports and CLI


def test_cli_exports_readable_in_all_three_formats(tmp_path):
    out = tmp_path / "ds"
    assert cli_main(["--out", str(out), "--train", "16", "--val", "8", "--test", "8", "--seed", "5",
                     "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generator_version"] == GENERATOR_VERSION and manifest["config"]["seed"] == 5
    assert {s: e["count"] for s, e in manifest["splits"].items()} == {
        "train": 16, "val": 8, "test_iid": 8, "test_ood": 8}
    assert "| test_ood | 8 |" in (out / "README.md").read_text()
    config = GeneratorConfig(seed=5)
    for split, n in (("train", 16), ("val", 8), ("test_iid", 8), ("test_ood", 8)):
        items = list(generate_split(split, n, config))
        assert manifest["splits"][split]["fingerprint"] == fingerprint(items)
        maye = [json.loads(line) for line in (out / f"maye_{split}.jsonl").read_text().splitlines()]
        dyme = json.loads((out / f"dyme_{split}.json").read_text())
        easyr1 = pq.read_table(out / f"easyr1_{split}.parquet").to_pylist()
        for item, m, d, e in zip(items, maye, dyme, easyr1, strict=True):
            pixels = np.asarray(item.image)
            assert (m["id"], m["question"], m["answer"], m["solution"]) == (
                item.id, item.question, item.answer, item.solution)
            assert np.array_equal(np.asarray(Image.open(out / m["image"])), pixels)
            assert m["meta"]["hint"] == item.hint and m["meta"]["params"] == item.meta["params"]
            assert (d["question"], d["answer"], d["hint"]) == (
                item.question[len("<image>"):], item.answer, item.hint)
            assert json.loads(d["visual_fact"]) == item.visual_facts
            assert np.array_equal(np.asarray(Image.open(out / d["image"])), pixels)
            assert (e["problem"], e["answer"]) == (item.question, item.answer)
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(e["images"][0]["bytes"]))), pixels)


def test_exports_load_through_the_project_readers(tmp_path):
    formats = pytest.importorskip("vrl_jax.data.formats")
    config = GeneratorConfig(seed=2)
    synthgeo.export_dataset(str(tmp_path), {"val": 8}, config, progress=False)
    items = list(generate_split("val", 8, config))
    for name, schema in (("maye_val.jsonl", "maye"), ("easyr1_val.parquet", "easyr1"), ("dyme_val.json", "dyme")):
        examples = formats.load_examples(tmp_path / name)  # format sniffed from the keys
        assert [ex.meta["format"] for ex in examples] == [schema] * 8
        for item, ex in zip(items, examples, strict=True):
            assert ex.id == item.id and ex.answer == item.answer
            assert ex.question == (item.question[len("<image>"):] if schema == "dyme" else item.question)
            assert np.array_equal(np.asarray(formats.load_image(ex.images[0])), np.asarray(item.image))
            if schema == "dyme":
                assert ex.hint == item.hint and ex.solution == f"Answer: {item.answer}"
            if schema == "maye":
                assert ex.solution == item.solution


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="unknown synthgeo family 'hexagon'"):
        GeneratorConfig(families=("hexagon",))
    with pytest.raises(ValueError, match="level 3 is reserved"):
        GeneratorConfig(levels=(3,))
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        generate_item("dev", 0)
    with pytest.raises(ValueError, match="text_fraction"):
        GeneratorConfig(text_fraction=1.5)
    with pytest.raises(RuntimeError, match="family 'grid' produced no test_iid problem"):
        generate_item("test_iid", 0, GeneratorConfig(families=("grid",), levels=(0,)))
    with pytest.raises(SystemExit):
        cli_main(["--out", "x", "--formats", "maye,csv"])


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_round_trip_special_ids_and_chat_template(tmp_path):
    from transformers import AutoTokenizer

    from vrl_jax.data.synthgeo.tokenizer import SPECIAL_TOKENS, build_tokenizer, special_token_ids

    items = list(generate_split("train", 160, GeneratorConfig(seed=1)))
    build_tokenizer(synthgeo.corpus_texts(items), tmp_path, vocab_size=600)
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "tokenizer_config.json").exists()
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert special_token_ids(tok) == {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    assert (tok.eos_token, tok.pad_token, tok.eos_token_id, tok.pad_token_id) == (
        "<|im_end|>", "<|endoftext|>", 2, 0)
    assert 300 < len(tok) <= 600
    for text in [items[0].solution, items[5].hint, items[9].question, "ünïcødé 中文 \\frac{25}{4}\\pi"]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
    assert tok.tokenize("12345") == list("12345")  # digits one by one, as Qwen2
    assert len(tok("Find the area of the rectangle.")["input_ids"]) <= 8  # the corpus compresses

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find x."}]}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                        "<|vision_start|><|image_pad|><|vision_end|>Find x.<|im_end|>\n<|im_start|>assistant\n")
    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": "x = 5"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_vision_id=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|>"
        "<|vision_end|>Picture 2: <|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n"
        "<|im_start|>assistant\nx = 5<|im_end|>\n")
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert ids.count(6) == 1 and ids[:1] == [1] and tok.decode(ids) == rendered
    with pytest.raises(ValueError, match="vocab_size must be >= 264"):
        build_tokenizer(["a"], tmp_path / "small", vocab_size=100)
