"""Metric writers: JSONL in the workdir (always), TensorBoard, and Weights & Biases when asked for.

Layout of a workdir written here:
  metrics.jsonl              one object per write: {"step", "split", "kind", "time", <metric>: float}
  texts.jsonl                free text (e.g. the reflective-correct example): {"step", "split", "tag", "text"}
  samples/<split>_<step>.jsonl  one object per sample completion of an evaluation
  tensorboard/               tensorboardX event files (tag `<key>` for split "train", else `<split>/<key>`;
                             tensorboardX turns characters TensorBoard rejects, e.g. space, "@", "=", into "_")

Only process 0 writes; every method is a no-op elsewhere, so callers need not branch.

Resume: pass the restored step as `resume_step`. Lines with step > resume_step are dropped from the
JSONL files (a crash may also have left a torn last line: dropped too), sample files of later steps
are deleted, and TensorBoard is told to purge events from resume_step + 1 on. The trainer must save a
checkpoint only after writing that step's metrics, or the rerun step appears twice. A fresh run
(`resume_step=None`) in a workdir that already has logs moves them aside (`*.prev`) instead of
appending to another run's history.

Workdirs in a bucket (`gs://bucket/run`): every file goes through `etils.epath` (`vrl_jax/storage.py`).
Objects cannot be appended to, so there the JSONL files are kept in memory and each upload rewrites the
whole object: on `flush()` (the trainer flushes before every checkpoint, so a resume finds every row up
to its step), on `close()`, and on a write at least `REMOTE_UPLOAD_SECONDS` after the previous upload (so
a crash loses at most that much). TensorBoard events go through epath too (`_EpathRecordWriter`), and
W&B keeps its local files in its default directory (`./wandb`, or `WANDB_DIR`), not in the bucket.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import time
from typing import Any, Mapping, Sequence

import numpy as np
from etils import epath

from vrl_jax.evaluation.paired import OUTCOMES_DIR
from vrl_jax.storage import is_remote, write_text_atomic

METRICS_FILE = "metrics.jsonl"
TEXTS_FILE = "texts.jsonl"
SAMPLES_DIR = "samples"
SAMPLE_FIELDS = ("prompt", "image_id", "response", "reward", "correct")
_SAMPLE_RE = re.compile(r"^(?P<split>.+)_(?P<step>\d+)\.jsonl$")
REMOTE_UPLOAD_SECONDS = 60.0  # a bucket's JSONL files are rewritten at most this often between flushes


def _jsonable(value: Any) -> Any:
    """Plain JSON values from numpy/jax scalars and arrays; NaN/inf become null (strict JSON)."""
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    arr = np.asarray(value)
    if arr.ndim > 0:
        return [_jsonable(v) for v in arr.tolist()]
    item = arr.item()
    if isinstance(item, float) and not math.isfinite(item):
        return None
    return item


def _truncate_jsonl(path: epath.Path, resume_step: int) -> int:
    """Keep lines whose step <= resume_step; returns how many were dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    with path.open() as f:
        for line in f:
            try:
                row = json.loads(line)
                keep = int(row["step"]) <= resume_step
            except (ValueError, KeyError, TypeError):
                keep = False  # a torn line from a crash mid-write
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    write_text_atomic(path, "".join(kept))  # a crash here leaves either the old or the new file
    return dropped


class _AppendedFile:
    """A local JSONL file, appended line by line and flushed after each, so a killed job keeps every line."""

    def __init__(self, path: epath.Path):
        self._f = path.open("a", encoding="utf-8")

    def write(self, line: str) -> None:
        self._f.write(line)
        self._f.flush()

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class _RewrittenObject:
    """A JSONL object in a bucket, which cannot be appended to: its lines (those already there, then the new
    ones) are kept in memory and the whole object is uploaded again by `flush()` (and by a write when
    `REMOTE_UPLOAD_SECONDS` have passed since the last upload). Each upload is atomic."""

    def __init__(self, path: epath.Path):
        self._path = path
        self._text = io.StringIO()
        self._text.write(path.read_text(encoding="utf-8") if path.exists() else "")  # new lines go after these
        self._dirty, self._uploaded = False, time.monotonic()

    def write(self, line: str) -> None:
        self._text.write(line)
        self._dirty = True
        if time.monotonic() - self._uploaded >= REMOTE_UPLOAD_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._dirty:
            self._path.write_text(self._text.getvalue(), encoding="utf-8")
            self._dirty, self._uploaded = False, time.monotonic()

    def close(self) -> None:
        self.flush()


class _EpathRecordWriter:
    """tensorboardX's record-writer interface (`write`, `flush`, `close`) over etils.epath, for an event
    file in a bucket: the events are kept in memory and the whole file is uploaded on each flush
    (tensorboardX flushes every 120 s and on `flush()` / `close()`), as tensorboardX's own gs:// writer does,
    but through the path layer orbax and the JSONL files use (gcsfs or tensorflow, not google-cloud-storage)."""

    def __init__(self, path: str):
        self._path, self._buffer, self._uploaded = epath.Path(path), io.BytesIO(), -1

    def write(self, data: bytes) -> None:
        self._buffer.write(data)

    def flush(self) -> None:
        if self._buffer.tell() != self._uploaded:
            self._path.write_bytes(self._buffer.getvalue())
            self._uploaded = self._buffer.tell()

    def close(self) -> None:
        self.flush()


class _EpathRecordWriterFactory:
    def open(self, path: str) -> _EpathRecordWriter:
        return _EpathRecordWriter(path)

    def directory_check(self, path: str) -> None:
        pass  # a bucket has no directories to create


def _tensorboard_writer(logdir: epath.Path, purge_step: int | None):
    from tensorboardX import SummaryWriter
    if is_remote(logdir):
        # tensorboardX picks a writer by the scheme before "://"; its gs:// writer needs google-cloud-storage.
        from tensorboardX import record_writer
        record_writer.register_writer_factory(str(logdir).split("://", 1)[0], _EpathRecordWriterFactory())
    return SummaryWriter(logdir=str(logdir), purge_step=purge_step)


class MetricWriter:
    """Writes metrics of one run.

    Args:
      workdir: the run's directory (created if missing).
      process_index: `jax.process_index()`; only 0 writes.
      resume_step: the step restored from a checkpoint, or None for a fresh run.
      tensorboard: also write TensorBoard events (tensorboardX).
      wandb: log to Weights & Biases; needs `pip install wandb` (extra `vrl_jax[wandb]`).
      wandb_project, run_name, config: passed to `wandb.init` (`config` is a plain dict).
    """

    def __init__(self, workdir: str | os.PathLike, *, process_index: int = 0, resume_step: int | None = None,
                 tensorboard: bool = True, wandb: bool = False, wandb_project: str | None = None,
                 run_name: str | None = None, config: Mapping[str, Any] | None = None):
        self.workdir = epath.Path(workdir)
        self.active = process_index == 0
        self._tb = None
        self._wandb = None
        self._files: dict[str, Any] = {}
        if not self.active:
            return
        if wandb:
            # Checked before anything is written, so a misconfigured run fails at once.
            try:
                import wandb as wandb_module
            except ImportError as exc:
                raise RuntimeError(
                    "Weights & Biases logging is enabled but the `wandb` package is not installed: "
                    "`pip install wandb` (or `pip install vrl_jax[wandb]`), or disable wandb logging"
                ) from exc
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._prepare(resume_step)
        jsonl = _RewrittenObject if is_remote(self.workdir) else _AppendedFile
        self._files = {name: jsonl(self.workdir / name) for name in (METRICS_FILE, TEXTS_FILE)}
        if tensorboard:
            self._tb = _tensorboard_writer(self.workdir / "tensorboard",
                                           None if resume_step is None else resume_step + 1)
        if wandb:
            self._wandb = self._init_wandb(wandb_module, resume_step, wandb_project, run_name, config)

    def _prepare(self, resume_step: int | None) -> None:
        samples = self.workdir / SAMPLES_DIR
        if resume_step is None:
            for name in (METRICS_FILE, TEXTS_FILE):
                path = self.workdir / name
                if path.exists() and path.stat().length:
                    path.replace(path.with_name(name + ".prev"))
            return
        for name in (METRICS_FILE, TEXTS_FILE):
            _truncate_jsonl(self.workdir / name, resume_step)
        if samples.is_dir():
            for path in samples.iterdir():
                m = _SAMPLE_RE.match(path.name)
                if m and int(m["step"]) > resume_step:
                    path.unlink()

    def _init_wandb(self, wandb_module, resume_step, project, run_name, config):
        # The run id is kept in the workdir so that a resumed job continues the same W&B run.
        id_file = self.workdir / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if resume_step is not None and id_file.exists() else None
        run = wandb_module.init(project=project, name=run_name, config=dict(config or {}),
                                dir=None if is_remote(self.workdir) else str(self.workdir), id=run_id,
                                resume="allow" if run_id else None)
        id_file.write_text(run.id)
        return run

    # ---- writing ------------------------------------------------------------------------------

    def write(self, step: int, metrics: Mapping[str, Any], *, split: str = "train", kind: str = "step") -> None:
        """One JSONL object `{"step", "split", "kind", "time", **metrics}` plus TensorBoard/W&B scalars.

        kind: "step" (per generation step), "epoch" (epoch summaries), "eval" (an evaluation).
        """
        if not self.active:
            return
        values = {str(k): _jsonable(v) for k, v in metrics.items()}
        for reserved in ("step", "split", "kind", "time"):
            values.pop(reserved, None)
        row = {"step": int(step), "split": split, "kind": kind, "time": round(time.time(), 3), **values}
        self._files[METRICS_FILE].write(json.dumps(row) + "\n")
        tags = {(k if split == "train" else f"{split}/{k}"): v for k, v in values.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for tag, v in tags.items():
                self._tb.add_scalar(tag, v, global_step=int(step))
        if self._wandb is not None:
            self._wandb.log(tags, step=int(step))

    def write_text(self, step: int, tag: str, text: str, *, split: str = "train") -> None:
        """A piece of text (e.g. `reflection_outputs/Reflection-Correct`) to texts.jsonl, TensorBoard, W&B."""
        if not self.active:
            return
        self._files[TEXTS_FILE].write(json.dumps({"step": int(step), "split": split, "tag": tag, "text": text}) + "\n")
        if self._tb is not None:
            self._tb.add_text(tag, text, global_step=int(step))
        if self._wandb is not None:
            import wandb as wandb_module
            self._wandb.log({tag: wandb_module.Table(columns=["text"], data=[[text]])}, step=int(step))

    def write_samples(self, split: str, step: int, samples: Sequence[Mapping[str, Any]]) -> epath.Path | None:
        """Sample completions of one evaluation to `samples/<split>_<step>.jsonl` (overwritten).

        Each sample needs `prompt`, `image_id`, `response`, `reward`, `correct`; extra fields are kept.
        Returns the path (None off process 0).
        """
        if not self.active:
            return None
        for i, sample in enumerate(samples):
            missing = [k for k in SAMPLE_FIELDS if k not in sample]
            if missing:
                raise KeyError(f"sample {i} lacks {missing}; each needs {list(SAMPLE_FIELDS)}")
        return self._write_rows(SAMPLES_DIR, split, step, samples)

    def write_outcomes(self, split: str, step: int, rows: Sequence[Mapping[str, Any]]) -> epath.Path | None:
        """Every problem's score per setting at one evaluation (`Evaluator.evaluate_split`'s outcome rows) to
        `outcomes/<split>_<step>.jsonl` (overwritten): what `paired.paired_change` compares between
        evaluations. Returns the path (None off process 0)."""
        if not self.active:
            return None
        return self._write_rows(OUTCOMES_DIR, split, step, rows)

    def _write_rows(self, folder: str, split: str, step: int, rows: Sequence[Mapping[str, Any]]) -> epath.Path:
        """`rows` as JSON lines to `<folder>/<split>_<step>.jsonl`, replaced atomically."""
        if not re.fullmatch(r"[A-Za-z0-9._-]+", split):
            raise ValueError(f"split {split!r} must be a plain name (letters, digits, '.', '_', '-')")
        path = self.workdir / folder / f"{split}_{int(step)}.jsonl"
        path.parent.mkdir(exist_ok=True)
        write_text_atomic(path, "".join(json.dumps(_jsonable(dict(r)), ensure_ascii=False) + "\n" for r in rows))
        return path

    def flush(self) -> None:
        for f in self._files.values():
            f.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self.active:
            return
        for f in self._files.values():
            f.close()
        self._files = {}
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        self.active = False

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """Rows of `<workdir>/metrics.jsonl`; for a repeated (step, split, kind) the last row wins, with
    the earlier row's other keys kept (a step may be logged in several writes)."""
    path = epath.Path(workdir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{workdir}: no {METRICS_FILE} (not a vrl_jax workdir, or nothing logged yet)")
    rows: dict[tuple, dict] = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
                key = (int(row["step"]), row.get("split", "train"), row.get("kind", "step"))
            except (ValueError, KeyError, TypeError):
                continue  # torn line
            rows.setdefault(key, {}).update(row)
    return [rows[k] for k in sorted(rows, key=lambda k: (k[0], str(k[1]), str(k[2])))]
