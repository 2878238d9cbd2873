"""Where a run's files live: a local directory or a bucket (`gs://bucket/run`), through `etils.epath`.

Every writer of the workdir (metrics, samples, TensorBoard, checkpoint bookkeeping, the report) goes through
`etils.epath`, the path layer orbax uses, so a `gs://` workdir is written under that URI instead of a local
`gs:/bucket/run` (what `pathlib` and `os.path` make of it). epath reaches `gs://` through tensorflow's gfile
when tensorflow is installed, else through fsspec's gcsfs (`pip install gcsfs`).

Object stores differ from a disk in two ways that the writers handle here:
  - an object is written whole, and appears only once its upload completes: writing it directly is already
    atomic, so the local "write a temporary file, then rename" is not needed (and a rename there is a copy
    plus a delete);
  - there is no append: a growing file (metrics.jsonl) is rewritten whole (see `evaluation/writers.py`).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported by errors.py, which every command loads first: no import of etils here
    from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URI of an object store (`gs://`, `s3://`, ...) rather than a local path."""
    return "://" in os.fspath(path)


def write_text_atomic(path: epath.Path, text: str) -> None:
    """Writes `text` to `path` so that a reader sees the old or the new contents, never half: locally a
    temporary file `<name>.tmp` replaced onto `path` (a crash or a full disk leaves the old file); on an object
    store one upload, atomic by itself."""
    if is_remote(path):
        path.write_text(text, encoding="utf-8")
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
