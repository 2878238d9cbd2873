"""Readers for the datasets users have on disk, all producing one `Example` record.

Three schemas are understood, in the containers their projects ship them in:
- `maye`: MAYE's JSONL (`question` with a literal `<image>`, `answer`, `solution`, `id`, and `image`
  relative to the JSONL's directory); also the record schema of the synthetic data.
- `easyr1`: hiyouga/geometry3k as EasyR1 reads it (`problem`, `answer`, `images` as a list of
  `{bytes, path}`), usually parquet.
- `dyme`: DyME's JSON arrays (`question` or `question_wo_prompt`, `answer` maybe prefixed by the
  "Answer:" flag, `hint`, `image`, optional `visual_fact`, `direct_answers`, `human_or_machine`).
Images stay on disk (or as encoded bytes) until the pipeline decodes them. A broken sample is
reported to a `FaultCounter` with its file and line (or array/row index) and skipped.
"""
from __future__ import annotations

import ast
import dataclasses
import io
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from vrl_jax.data.faults import FaultCounter
from vrl_jax.errors import UserError

SCHEMAS = ("maye", "easyr1", "dyme")
DYME_ANSWER_FLAG = "Answer:"

# MAYE's split files, as its README lays out `datasets/<name>/`.
MAYE_SPLIT_FILES = {
    "geometry3k": {"train": "geometry3k_rl_v0.jsonl", "validation": "geometry3k_validation_v0.jsonl",
                   "test": "geometry3k_test_v0.jsonl"},
    "mm_math": {"train": "mm_math_rl_v0.jsonl", "validation": "mm_math_validation_v0.jsonl",
                "test": "math_verse_test_v0.jsonl"},
}


@dataclasses.dataclass(frozen=True, eq=False)
class ImageRef:
    """An image not yet decoded: a file path, encoded bytes, or (from tfds) a uint8 array [H, W, C]."""

    path: str | None = None
    data: bytes | None = dataclasses.field(default=None, repr=False)
    array: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def describe(self) -> str:
        if self.path is not None:
            return self.path
        if self.data is not None:
            return f"<{len(self.data)} encoded bytes>"
        return f"<array {None if self.array is None else self.array.shape}>"


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One dataset sample in the project's common schema.

    `answer` is the bare gold answer (e.g. "20"), `solution` a reference solution ending in the
    answer in its dataset's convention (`\\boxed{20}` for MAYE/EasyR1, `Answer: 20` for DyME),
    `hint` DyME's rationale (empty elsewhere), `source` where the sample was read (`file:line`).
    """

    id: str
    question: str
    images: tuple[ImageRef, ...]
    answer: str
    solution: str
    hint: str = ""
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    source: str = ""


class DataFileError(UserError, ValueError):
    """A data file that cannot be read as a whole (not one bad sample): the message names the file."""


class MissingDataError(UserError, FileNotFoundError):
    """A data file that does not exist."""


class SampleFault(Exception):
    """Raised inside a record converter; the loader records it as a fault of `kind` and skips."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


# ---------------------------------------------------------------------------------------------
# Images


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL mode to RGB; transparent pixels become white, as transformers' convert_rgb."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(ref: ImageRef, max_side: int | None = None) -> Image.Image:
    """Decodes `ref` to an RGB PIL image whose longer side is at most `max_side`.

    `thumbnail` asks the decoder for a reduced draft first (JPEG decodes at 1/2..1/8 scale), so a
    huge photo is not materialised at full size; other formats are decoded once and shrunk here.
    Raises `SampleFault` (`missing_image` / `corrupt_image`) with the cause.
    """
    try:
        if ref.array is not None:
            image = Image.fromarray(np.asarray(ref.array, dtype=np.uint8))
        elif ref.data is not None:
            image = Image.open(io.BytesIO(ref.data))
        elif ref.path is not None:
            image = Image.open(ref.path)
        else:
            raise SampleFault("missing_image", "image reference holds neither a path nor bytes")
        if max_side is not None and max(image.size) > max_side:
            image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC, reducing_gap=2.0)
        image.load()
        return to_rgb(image)
    except FileNotFoundError as err:
        raise SampleFault("missing_image", f"image file not found: {ref.describe()}") from err
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise SampleFault("corrupt_image", f"cannot decode image {ref.describe()}: {err}") from err


# ---------------------------------------------------------------------------------------------
# Containers: yield (where, raw record) pairs; a line that is not a JSON object is a fault.


# utf-8-sig: a byte-order mark (editors on Windows write one) is not part of the first record.
_ENCODING = "utf-8-sig"


def _read_jsonl(path: str, faults: FaultCounter) -> Iterator[tuple[str, Any]]:
    # newline="\n": a record ends at a line feed only, so a stray carriage return inside a record neither
    # splits it nor shifts the line numbers and columns of what follows (CRLF endings still work).
    with open(path, encoding=_ENCODING, newline="\n") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:  # lineno is 1 within one line; colno counts characters from 1
                faults.record("malformed_record", where, f"invalid JSON at column {err.colno}: {err.msg}")


def _read_json_array(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding=_ENCODING) as f:
        try:
            records = json.load(f)
        except json.JSONDecodeError as err:
            # One broken array cannot be split into samples: the whole file is unusable.
            raise DataFileError(f"{path}:{err.lineno}:{err.colno}: invalid JSON array: {err.msg}") from err
    if not isinstance(records, list):
        raise DataFileError(f"{path}: expected a JSON array of records, got a {type(records).__name__}")
    for index, record in enumerate(records):
        yield f"{path}[{index}]", record


def _read_parquet(path: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq  # only parquet users pay for the import

    for row, record in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path}#row{row}", record


def _container(path: str) -> str:
    """'jsonl', 'json' or 'parquet', from the extension and, for .json, the first character."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        return "parquet"
    if ext == ".jsonl":
        return "jsonl"
    if ext == ".json":
        with open(path, encoding=_ENCODING) as f:
            head = f.read(4096).lstrip()
        return "json" if head.startswith("[") else "jsonl"
    raise DataFileError(f"{path}: unknown data file extension {ext!r}; expected .jsonl, .json or .parquet")


def _read_records(path: str, faults: FaultCounter) -> Iterator[tuple[str, Any]]:
    container = _container(path)
    if container == "parquet":
        return _read_parquet(path)
    if container == "json":
        return _read_json_array(path)
    return _read_jsonl(path, faults)


def detect_schema(keys: Sequence[str], path: str = "<records>") -> str:
    """Names the schema ('maye', 'easyr1' or 'dyme') a record with these keys belongs to."""
    keys = set(keys)
    if "problem" in keys:
        return "easyr1"
    if keys & {"question_wo_prompt", "hint", "human_or_machine", "direct_answers", "visual_fact"}:
        return "dyme"
    if "question" in keys:
        return "maye"
    raise DataFileError(f"{path}: cannot tell the dataset format from the record keys {sorted(keys)}; "
                        f"set data.source (or pass format=) to one of {SCHEMAS}")


# ---------------------------------------------------------------------------------------------
# Schemas: one raw record -> Example, raising SampleFault.


def _text_field(record: Mapping, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise SampleFault("missing_field", f"field {key!r} is missing")
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise SampleFault("bad_field", f"field {key!r} must be a string or number, got {type(value).__name__}")
    return str(value)


def _image_path(relative: str, base_dir: str) -> ImageRef:
    path = relative if os.path.isabs(relative) else os.path.join(base_dir, relative)
    if not os.path.exists(path):
        raise SampleFault("missing_image", f"image file not found: {path}")
    return ImageRef(path=path)


def _meta(record: Mapping, consumed: set[str], schema: str) -> dict:
    """Keeps every field the schema did not consume (family, level, choices, ...) for later use."""
    meta = dict(record.get("meta") or {}) if isinstance(record.get("meta"), Mapping) else {}
    meta.update({k: v for k, v in record.items() if k not in consumed and k != "meta"})
    meta["format"] = schema
    return meta


def _maye_example(record: Mapping, where: str, base_dir: str, fallback_id: str) -> Example:
    question = _text_field(record, "question")
    answer = _text_field(record, "answer")
    image = _text_field(record, "image")
    solution = _text_field(record, "solution", required=False) or f"\\boxed{{{answer}}}"
    return Example(
        id=_text_field(record, "id", required=False) or fallback_id, question=question,
        images=(_image_path(image, base_dir),), answer=answer, solution=solution,
        meta=_meta(record, {"question", "answer", "image", "solution", "id"}, "maye"), source=where)


def _easyr1_image(item: Any, base_dir: str) -> ImageRef:
    if isinstance(item, Mapping):
        if item.get("bytes"):
            return ImageRef(data=bytes(item["bytes"]))
        if item.get("path"):
            return _image_path(item["path"], base_dir)
        raise SampleFault("missing_image", "image entry has neither 'bytes' nor 'path'")
    if isinstance(item, (bytes, bytearray)):
        return ImageRef(data=bytes(item))
    if isinstance(item, str):
        return _image_path(item, base_dir)
    raise SampleFault("bad_field", f"image entry must be a {{bytes, path}} dict, bytes or a path, "
                                   f"got {type(item).__name__}")


def _easyr1_example(record: Mapping, where: str, base_dir: str, fallback_id: str) -> Example:
    problem = _text_field(record, "problem")
    answer = _text_field(record, "answer")
    images = record.get("images") or []
    if not isinstance(images, (list, tuple)):
        raise SampleFault("bad_field", f"field 'images' must be a list, got {type(images).__name__}")
    return Example(
        id=_text_field(record, "id", required=False) or fallback_id, question=problem,
        images=tuple(_easyr1_image(item, base_dir) for item in images), answer=answer,
        solution=f"\\boxed{{{answer}}}",
        meta=_meta(record, {"problem", "answer", "images", "id"}, "easyr1"), source=where)


def _dyme_example(record: Mapping, where: str, base_dir: str, fallback_id: str,
                  hint_field: str) -> Example:
    # DyME's collectors rename `question` to `question_wo_prompt` after templating; accept both.
    key = "question_wo_prompt" if record.get("question_wo_prompt") is not None else "question"
    question = _text_field(record, key)
    answer = _text_field(record, "answer").strip()
    if answer.startswith(DYME_ANSWER_FLAG):
        answer = answer[len(DYME_ANSWER_FLAG):].strip()
    meta = _meta(record, {"question", "question_wo_prompt", "prompt", "answer", "image", "hint", "id"},
                 "dyme")
    if isinstance(record.get("direct_answers"), str):
        try:  # DyME calls eval() on this field; a literal parser cannot run code.
            meta["direct_answers"] = list(ast.literal_eval(record["direct_answers"]))
        except (ValueError, SyntaxError, TypeError) as err:
            raise SampleFault("bad_field",
                              f"field 'direct_answers' is not a Python list literal: {err}") from err
    image = _text_field(record, "image", required=False)
    return Example(
        id=_text_field(record, "id", required=False) or fallback_id, question=question,
        images=(_image_path(image, base_dir),) if image else (), answer=answer,
        solution=f"{DYME_ANSWER_FLAG} {answer}", hint=_text_field(record, hint_field, required=False),
        meta=meta, source=where)


# ---------------------------------------------------------------------------------------------
# Public loaders


def load_examples(
    path: str | os.PathLike,
    *,
    format: str | None = None,  # noqa: A002 - the user-facing name of the option
    faults: FaultCounter | None = None,
    image_root: str | os.PathLike | None = None,
    hint_field: str = "hint",
    keep_machine_generated: bool = False,
    max_prompt_length: int | None = None,
    prompt_length_fn: Callable[[Example], int] | None = None,
) -> list[Example]:
    """Reads a .jsonl, .json (array or lines) or .parquet file into `Example`s.

    Args:
      path: the data file.
      format: 'maye', 'easyr1' or 'dyme'; detected from the first record's keys when None.
      faults: counts skipped samples; a fresh `FaultCounter()` when None. Checked once the whole
        file is read, so a file with too many broken samples raises `TooManyFaultsError`.
      image_root: directory relative image paths are joined to (default: the file's directory).
      hint_field: DyME field used as the hint ('visual_fact' in DyME's A-OKVQA variant).
      keep_machine_generated: keep DyME records whose `human_or_machine` is not 0 (DyME drops them).
      max_prompt_length, prompt_length_fn: skip samples whose `prompt_length_fn(example)` (e.g. token
        count of the rendered prompt) exceeds `max_prompt_length`; both or neither.
    """
    path = os.fspath(path)
    if format is not None and format not in SCHEMAS:
        raise ValueError(f"format={format!r} is not one of {SCHEMAS}")
    if (max_prompt_length is None) != (prompt_length_fn is None):
        raise ValueError("max_prompt_length and prompt_length_fn must be given together")
    if not os.path.isfile(path):
        raise MissingDataError(f"data file not found: {path}")
    faults = FaultCounter() if faults is None else faults
    base_dir = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    schema = format
    examples = []
    for index, (where, record) in enumerate(_read_records(path, faults)):
        if not isinstance(record, Mapping):
            faults.record("malformed_record", where, f"expected a JSON object, got {type(record).__name__}")
            continue
        schema = schema or detect_schema(record.keys(), path)
        if schema == "dyme" and not keep_machine_generated and record.get("human_or_machine", 0) != 0:
            continue  # a filter, as in DyME, not a fault
        fallback_id = f"{stem}-{index}"
        try:
            if schema == "maye":
                example = _maye_example(record, where, base_dir, fallback_id)
            elif schema == "easyr1":
                example = _easyr1_example(record, where, base_dir, fallback_id)
            else:
                example = _dyme_example(record, where, base_dir, fallback_id, hint_field)
            if prompt_length_fn is not None and (n := prompt_length_fn(example)) > max_prompt_length:
                raise SampleFault("prompt_too_long", f"prompt has {n} tokens, limit {max_prompt_length}")
        except SampleFault as fault:
            faults.record(fault.kind, where, fault.detail)
            continue
        faults.ok()
        examples.append(example)
    faults.check(final=True)
    return examples


def maye_split_path(root: str | os.PathLike, dataset: str, split: str) -> str:
    """Path of a MAYE split file; `root` is MAYE's `datasets/` directory or `datasets/<dataset>/`."""
    if dataset not in MAYE_SPLIT_FILES:
        raise ValueError(f"unknown MAYE dataset {dataset!r}; expected one of {sorted(MAYE_SPLIT_FILES)}")
    files = MAYE_SPLIT_FILES[dataset]
    if split not in files:
        raise ValueError(f"unknown split {split!r} for {dataset}; expected one of {sorted(files)}")
    root = os.fspath(root)
    nested = os.path.join(root, dataset, files[split])
    return nested if os.path.exists(nested) else os.path.join(root, files[split])


def load_maye_split(root: str | os.PathLike, dataset: str, split: str, **kwargs) -> list[Example]:
    """Loads MAYE's geometry3k or mm_math split ('train', 'validation' or 'test') from its layout."""
    return load_examples(maye_split_path(root, dataset, split), format="maye", **kwargs)
