"""A tensorflow-datasets builder: a local MAYE-layout geometry3k copy -> ArrayRecord files.

The manual directory is MAYE's `datasets/geometry3k/` (or `datasets/`): the three split JSONLs and
`geometry3k_images/`. Building needs `pip install tensorflow-datasets` but no TensorFlow; reading
goes through `tfds.data_source` (random access, no TensorFlow), and `TfdsExamples` turns records
back into `Example`s for the grain pipeline. tfds is imported only inside these functions, so the
package never needs it.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

from vrl_jax.data.faults import FaultCounter
from vrl_jax.data.formats import Example, ImageRef, SampleFault, load_examples, load_image, maye_split_path

NAME = "geometry3k_maye"
BUILDER_VERSION = "1.0.0"
SPLITS = ("train", "validation", "test")
# Images are re-encoded once at build time: RGB, longer side capped like the pipeline's default.
MAX_IMAGE_SIDE = 2048


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError("the geometry3k tfds builder needs tensorflow-datasets: "
                          "pip install 'vrl_jax[tfds]'") from err
    return tfds


@functools.lru_cache(maxsize=None)
def builder_class() -> type:
    """The `GeneratorBasedBuilder` subclass; defined once, since tfds registers builders by name."""
    tfds = _tfds()

    class Geometry3kMaye(tfds.core.GeneratorBasedBuilder):
        """geometry3k as MAYE ships it (train 2101 / validation 300 / test 601)."""

        name = NAME
        VERSION = tfds.core.Version(BUILDER_VERSION)
        RELEASE_NOTES = {BUILDER_VERSION: "MAYE geometry3k_{rl,validation,test}_v0.jsonl with PNG images."}
        MANUAL_DOWNLOAD_INSTRUCTIONS = (
            "Place MAYE's geometry3k copy (geometry3k_rl_v0.jsonl, geometry3k_validation_v0.jsonl, "
            "geometry3k_test_v0.jsonl and geometry3k_images/) in the manual directory.")
        # tfds locates a checksums file next to a packaged builder's code through
        # `importlib_resources`, which tfds 4.9.10 does not declare; this builder downloads nothing.
        code_path = None

        def _info(self):
            features = tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "question": tfds.features.Text(),
                "answer": tfds.features.Text(),
                "solution": tfds.features.Text(),
                "image": tfds.features.Image(encoding_format="png"),
            })
            return tfds.core.DatasetInfo(builder=self, features=features,
                                         homepage="https://github.com/GAIR-NLP/MAYE")

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(maye_split_path(dl_manager.manual_dir, "geometry3k", split))
                    for split in SPLITS}

        def _generate_examples(self, path):
            faults = FaultCounter()
            for example in load_examples(path, format="maye", faults=faults):
                try:
                    # A PIL image, not an array: arrays would be encoded with tf.image.
                    image = load_image(example.images[0], MAX_IMAGE_SIDE)
                except SampleFault as fault:
                    faults.record(fault.kind, example.source, fault.detail)
                    continue
                yield example.id, {"id": example.id, "question": example.question,
                                   "answer": example.answer, "solution": example.solution, "image": image}
            faults.check(final=True)

    return Geometry3kMaye


def build(manual_dir: str | os.PathLike, data_dir: str | os.PathLike):
    """Writes `data_dir/geometry3k_maye/1.0.0/*.array_record` from the MAYE copy in `manual_dir`."""
    tfds = _tfds()
    builder = builder_class()(data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
    return builder


def data_source(data_dir: str | os.PathLike, split: str):
    """The random-access tfds data source of one split (records in tfds' hashed order)."""
    if split not in SPLITS:
        raise ValueError(f"unknown geometry3k split {split!r}; expected one of {SPLITS}")
    builder_class()  # registers the builder name with tfds
    return _tfds().data_source(NAME, data_dir=os.fspath(data_dir), split=split)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsExamples(Sequence):
    """A tfds data source seen as a sequence of `Example`s (for `pipeline.train_dataset`)."""

    def __init__(self, source, name: str = NAME):
        self._source = source
        self._name = name

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Example:
        if not 0 <= index < len(self):
            raise IndexError(f"{self._name}: index {index} out of range [0, {len(self)})")
        record = self._source[index]
        # tfds returns Text features as bytes and images as uint8 [H, W, 3].
        return Example(id=_text(record["id"]), question=_text(record["question"]),
                       images=(ImageRef(array=record["image"]),), answer=_text(record["answer"]),
                       solution=_text(record["solution"]), meta={"format": "maye", "tfds": self._name},
                       source=f"{self._name}[{index}]")
