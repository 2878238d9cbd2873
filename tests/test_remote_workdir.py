"""A workdir in a bucket (`gs://bucket/run`): every writer goes through etils.epath, so the files land under that
URI, never in a local `gs:/bucket/run` (what pathlib and os.path make of it).

The bucket is `fake_gcs.FakeGCS`, an in-memory object store registered as fsspec's "gs" file system, which is
where etils.epath sends `gs://` when tensorflow is not installed (gcsfs, the real client, is not installed and
there is no network). It keeps a bucket's object model: no append, objects written whole on close, no empty
directories, rename = copy + delete. What these tests prove: the code reaches the bucket only through epath
and only with operations an object store has; the local directory stays clean. What they cannot prove:
authentication and latency of real GCS, and orbax's array files (tensorstore's own GCS driver), so a full
orbax save/restore on gs:// is not run here.
"""
import json
import os
import sys
import types

import fake_gcs
import numpy as np
import pytest
from etils import epath
from test_evaluation import _tb_scalars, write_five_steps
from test_report import _write_run

from vrl_jax.evaluation import report
from vrl_jax.checkpointing import Checkpointer, Restored
from vrl_jax.errors import UserError, ensure_writable_dir
from vrl_jax.evaluation import writers
from vrl_jax.evaluation.writers import MetricWriter, read_metrics

RUN = "gs://bucket/run"


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    """The fake bucket `gs://bucket`, with the current directory in tmp_path so that a stray local write
    (a `gs:` folder) would show."""
    monkeypatch.chdir(tmp_path)
    fs = fake_gcs.install()
    yield fs
    fake_gcs.uninstall()
    assert not (tmp_path / "gs:").exists(), "something wrote gs://... as a local path"


def _rows(fs, uri):
    return [json.loads(line) for line in fs.text(uri).splitlines()]


def test_metric_writer_writes_every_file_into_the_bucket(gcs, tmp_path, monkeypatch):
    with MetricWriter(RUN, config={"name": "x"}) as w:
        w.write(1, {"rews/scores": np.float32(0.5), "n": 3})
        w.write(2, {"acc/x": 0.25}, split="val", kind="eval")
        w.write_text(1, "reflective_correct_sample", "Wait, 4.")
        path = w.write_samples("val", 2, [{"prompt": "p", "image_id": "i", "response": "r", "reward": 1.0,
                                           "correct": True}])
        w.flush()
        assert [r["step"] for r in _rows(gcs, f"{RUN}/metrics.jsonl")] == [1, 2]  # on flush, before close
    assert str(path) == f"{RUN}/samples/val_2.jsonl"
    assert _rows(gcs, f"{RUN}/samples/val_2.jsonl")[0]["image_id"] == "i"
    assert _rows(gcs, f"{RUN}/texts.jsonl") == [{"step": 1, "split": "train", "tag": "reflective_correct_sample",
                                                 "text": "Wait, 4."}]
    assert [r["step"] for r in read_metrics(RUN)] == [1, 2]
    assert not any("a" in m for m in gcs.opened_modes)  # objects are rewritten, never appended to
    # TensorBoard events went through epath into the bucket: copied out, they hold the scalars.
    events = gcs.names(f"{RUN}/tensorboard/events.out.tfevents.")
    assert len(events) == 1
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / os.path.basename(events[0])).write_bytes(gcs.objects[events[0]])
    assert {("rews/scores", 1, 0.5), ("val/acc/x", 2, 0.25)} <= set(_tb_scalars(tmp_path / "tb"))
    # Between flushes a write uploads once REMOTE_UPLOAD_SECONDS have passed (here at once).
    monkeypatch.setattr(writers, "REMOTE_UPLOAD_SECONDS", 0.0)
    w = MetricWriter(RUN, resume_step=2, tensorboard=False)
    w.write(3, {"n": 4})
    assert [r["step"] for r in _rows(gcs, f"{RUN}/metrics.jsonl")] == [1, 2, 3]
    w.close()


def test_resume_in_the_bucket_drops_later_rows_and_samples(gcs):
    write_five_steps(RUN)
    metrics = fake_gcs.FakeGCS._strip_protocol(f"{RUN}/metrics.jsonl")
    gcs.objects[metrics] += b'{"step": 6, "x"'  # a torn last line
    with MetricWriter(RUN, resume_step=3, tensorboard=False) as w:
        assert [r["step"] for r in _rows(gcs, f"{RUN}/metrics.jsonl")] == [1, 2, 3]
        w.write(4, {"x": 40})
    assert [(r["step"], r["x"]) for r in _rows(gcs, f"{RUN}/metrics.jsonl")] == [(1, 1), (2, 2), (3, 3), (4, 40)]
    assert [r["step"] for r in _rows(gcs, f"{RUN}/texts.jsonl")] == [1, 2, 3]
    assert [os.path.basename(n) for n in gcs.names(f"{RUN}/samples/")] == [f"test_{s}.jsonl" for s in (1, 2, 3)]
    # A fresh run sets the old history aside.
    with MetricWriter(RUN, tensorboard=False) as w:
        w.write(1, {"x": -1})
    assert [r["x"] for r in _rows(gcs, f"{RUN}/metrics.jsonl")] == [-1]
    assert len(_rows(gcs, f"{RUN}/metrics.jsonl.prev")) == 4


def test_wandb_keeps_its_local_files_out_of_the_bucket_path(gcs, monkeypatch):
    """W&B writes its own files with the local file system: not into `gs:/bucket/run`, but its default
    directory; the run id the resume needs is kept in the bucket."""
    inits = []

    class FakeRun:
        id = "abc123"

        def finish(self):
            pass
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: inits.append(kw) or FakeRun()))
    MetricWriter(RUN, wandb=True, tensorboard=False).close()
    MetricWriter(RUN, wandb=True, tensorboard=False, resume_step=3).close()
    assert inits[0]["dir"] is None and inits[1]["id"] == "abc123"
    assert gcs.text(f"{RUN}/wandb_run_id.txt") == "abc123"


def test_report_reads_and_writes_in_the_bucket(gcs, tmp_path, capsys):
    """The same runs written locally and in the bucket give the same report (up to the workdir paths)."""
    names = [("grpo", 0), ("grpo", 1), ("dyme", 0)]
    for name, seed in names:
        _write_run(tmp_path / f"{name}_seed{seed}", name, seed)
        _write_run(epath.Path(f"gs://bucket/runs/{name}_seed{seed}"), name, seed)
    local = report.make_report([tmp_path / f"{n}_seed{s}" for n, s in names], out=tmp_path / "out")
    assert report.main(["--workdir"] + [f"gs://bucket/runs/{n}_seed{s}" for n, s in names]
                       + ["--out", "gs://bucket/report"]) == 0
    assert "wrote gs://bucket/report/report.md" in capsys.readouterr().out
    remote = gcs.text("gs://bucket/report/report.md")
    assert remote == local.read_text().replace(f"{tmp_path}/", "gs://bucket/runs/")
    pngs = gcs.names("gs://bucket/report/")
    assert sorted(os.path.basename(p) for p in pngs if p.endswith(".png")) == sorted(
        p.name for p in (tmp_path / "out").glob("*.png"))
    assert all(gcs.objects[p].startswith(b"\x89PNG") for p in pngs if p.endswith(".png"))


def _orbax_lists_buckets_without_the_gcs_api(monkeypatch):
    """orbax asks google-cloud-storage (not installed, no network) whether a bucket has a hierarchical
    namespace before listing steps; this fake bucket has none."""
    from orbax.checkpoint._src.path import gcs_utils
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)


def _step(root: epath.Path, step: int, *, committed=True, files=("state/_METADATA", "data/process_0-of-1.json",
                                                                  "extra/metadata")):
    """The files of a step as orbax leaves them in a bucket: written in place, complete once `commit_success.txt`
    is there (the array data itself is not needed for the bookkeeping)."""
    (root / str(step) / "_CHECKPOINT_METADATA").write_text(json.dumps({"custom_metadata": {"config_fingerprint": "fp"}}))
    for name in files:
        (root / str(step) / name).write_text("{}")
    if committed:
        (root / str(step) / "commit_success.txt").write_text("ok")


def test_checkpoint_bookkeeping_in_the_bucket(gcs, monkeypatch):
    _orbax_lists_buckets_without_the_gcs_api(monkeypatch)
    root = epath.Path(f"{RUN}/checkpoints")
    _step(root, 1)
    _step(root, 2)
    _step(root, 3, files=("state/_METADATA",))  # step 3 lost its data-state and extra files
    with Checkpointer(str(root), fingerprint="fp") as ck:
        assert ck.all_steps() == [1, 2, 3] and ck.check_config() == 3
        # A save that failed in a bucket leaves `<step>/` without commit_success.txt (no temporary name there).
        _step(root, 4, committed=False)
        assert ck.discard_unfinished() == ["4"]
        assert not gcs.names(f"{root}/4/")
        # The newest step is damaged: set aside inside the bucket, and step 2 restored (the arrays' read is
        # tensorstore's, which has its own GCS client: stood in for here).
        monkeypatch.setattr(Checkpointer, "restore", lambda self, step, **kw: Restored(step, "state", None, {}))
        restored, damaged = ck.restore_latest_intact(abstract_state=None)
        assert restored.step == 2 and [(d.step, d.set_aside_as) for d in damaged] == [(3, f"{root}/damaged_step_3")]
        assert "lacks data/process_0-of-1.json, extra/metadata" in damaged[0].reason
        assert ck.all_steps() == [1, 2]
    assert gcs.names(f"{root}/damaged_step_3/") and not gcs.names(f"{root}/3/")


def test_a_bucket_workdir_is_probed_not_created(gcs, monkeypatch):
    monkeypatch.setitem(sys.modules, "google.cloud.storage", types.ModuleType("google.cloud.storage"))
    ensure_writable_dir(RUN, "--workdir")
    assert gcs.objects == {}  # the probe object was written and deleted
    assert any(m.startswith("w") for m in gcs.opened_modes)

    def refuse(self, path, mode="rb", **kwargs):
        raise PermissionError(f"403 {path}: caller does not have storage.objects.create access")
    monkeypatch.setattr(fake_gcs.FakeGCS, "_open", refuse)
    with pytest.raises(UserError, match=r"--workdir gs://bucket/run: cannot write there: PermissionError: 403 .*"
                                        r"Check the bucket's name and that this machine's credentials"):
        ensure_writable_dir(RUN, "--workdir")


def test_a_bucket_workdir_without_its_client_libraries(tmp_path, monkeypatch):
    """Here neither gcsfs nor google-cloud-storage is installed: the user is told what to install."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"need google-cloud-storage .*pip install -e \"\.\[gcs\]\""):
        ensure_writable_dir(RUN, "--workdir")
    monkeypatch.setitem(sys.modules, "google.cloud.storage", types.ModuleType("google.cloud.storage"))
    with pytest.raises(UserError, match=r"cannot reach gs:// from this machine: .*gcsfs.*pip install -e \"\.\[gcs\]\""):
        ensure_writable_dir(RUN, "--workdir")
    with pytest.raises(UserError, match=r"--workdir gs://bucket/run: cannot reach gs:// .*pip install -e \"\.\[gcs\]\""):
        report.check_inputs([RUN], None, None)
    assert os.listdir(tmp_path) == []
