"""A fake `gs://` file system for tests: an in-memory object store behind fsspec's "gs"/"gcs" protocols.

etils.epath (and so orbax) reaches `gs://` through fsspec's "gcs" file system when tensorflow is not
installed; `install()` registers this class under that name (gcsfs, the real one, is not installed here and
there is no network). It keeps Google Cloud Storage's object model, so code that only works on a local disk
fails here as it would on a bucket:
  - an object is written whole when its file is closed (nothing is visible while it is being written);
  - there is no append: opening in "a" mode raises, as objects are immutable;
  - directories are not objects: `mkdir` creates nothing, and a "directory" exists only while some object
    name starts with it (an emptied directory is gone);
  - rename is copy then delete (fsspec's `mv`), object by object.
What it cannot show: tensorstore (orbax's array writer) has its own GCS driver that never goes through
fsspec, so a full orbax save or restore of arrays on `gs://` is not possible here.
"""
from __future__ import annotations

import io

import fsspec
from etils.epath import backend as epath_backend
from fsspec.spec import AbstractFileSystem

PROTOCOLS = ("gs", "gcs")


class _Upload(io.BytesIO):
    """A file opened for writing: its bytes become the object when it is closed."""

    def __init__(self, fs: "FakeGCS", key: str):
        super().__init__()
        self._fs, self._key = fs, key

    def close(self) -> None:
        if not self.closed:
            self._fs.objects[self._key] = self.getvalue()
        super().close()


class FakeGCS(AbstractFileSystem):
    protocol = PROTOCOLS
    root_marker = ""
    # One store for every instance (fsspec caches one instance per set of arguments), reset by `install`.
    objects: dict[str, bytes] = {}  # "bucket/name" -> contents
    buckets: set[str] = set()
    opened_modes: list[str] = []

    def __init__(self, *args, **kwargs):
        kwargs.pop("finalize_on_close", None)  # etils passes it to gcsfs
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for p in PROTOCOLS:
            path = path.removeprefix(f"{p}://")
        return path.rstrip("/")

    def _is_dir(self, key: str) -> bool:
        return key in self.buckets or any(k.startswith(key + "/") for k in self.objects)

    def info(self, path, **kwargs):
        key = self._strip_protocol(path)
        if key in self.objects:
            return {"name": key, "size": len(self.objects[key]), "type": "file"}
        if self._is_dir(key):
            return {"name": key, "size": 0, "type": "directory"}
        raise FileNotFoundError(path)

    def ls(self, path, detail=True, **kwargs):
        key = self._strip_protocol(path)
        if key in self.objects:
            entries = [self.info(key)]
        elif self._is_dir(key):
            children = {k[len(key) + 1:].split("/", 1)[0] for k in self.objects if k.startswith(key + "/")}
            entries = [self.info(f"{key}/{c}") for c in sorted(children)]
        else:
            raise FileNotFoundError(path)
        return entries if detail else [e["name"] for e in entries]

    def mkdir(self, path, create_parents=True, **kwargs):
        key = self._strip_protocol(path)
        if "/" not in key:
            self.buckets.add(key)  # only buckets are made; a "folder" appears with its first object

    def makedirs(self, path, exist_ok=False):
        self.mkdir(path)

    def rmdir(self, path):
        pass  # nothing to remove: directories are not objects

    def _open(self, path, mode="rb", **kwargs):
        key = self._strip_protocol(path)
        self.opened_modes.append(mode)
        if "a" in mode or "+" in mode:
            raise NotImplementedError(f"{path}: objects in a bucket cannot be appended to or updated (mode {mode!r})")
        if "r" in mode:
            if key not in self.objects:
                raise FileNotFoundError(path)
            return io.BytesIO(self.objects[key])
        if key.split("/", 1)[0] not in self.buckets:
            raise FileNotFoundError(f"{path}: no such bucket")
        return _Upload(self, key)

    def cp_file(self, path1, path2, **kwargs):
        src = self._strip_protocol(path1)
        if self._is_dir(src):
            return  # a directory has no object of its own: its objects are copied one by one
        if src not in self.objects:
            raise FileNotFoundError(path1)
        self.objects[self._strip_protocol(path2)] = self.objects[src]

    def rm(self, path, recursive=False, maxdepth=None):
        key = self._strip_protocol(path)
        doomed = [k for k in self.objects if k == key or (recursive and k.startswith(key + "/"))]
        if not doomed and not (recursive and self._is_dir(key)):
            raise FileNotFoundError(path)
        for k in doomed:
            del self.objects[k]

    def rm_file(self, path):
        self.rm(path)

    # -- for tests ---------------------------------------------------------------------------------

    def text(self, uri: str) -> str:
        return self.objects[self._strip_protocol(uri)].decode("utf-8")

    def names(self, prefix: str = "") -> list[str]:
        prefix = self._strip_protocol(prefix)
        return sorted(k for k in self.objects if k.startswith(prefix))


def install() -> FakeGCS:
    """Registers a fresh FakeGCS for "gs://" and "gcs://" and returns it (undo with `uninstall`)."""
    for p in PROTOCOLS:
        fsspec.register_implementation(p, FakeGCS, clobber=True)
    FakeGCS.objects, FakeGCS.buckets, FakeGCS.opened_modes = {}, {"bucket"}, []
    FakeGCS.clear_instance_cache()
    epath_backend.fsspec_backend._get_filesystem.cache_clear()  # etils keeps the file system it made
    return fsspec.filesystem("gcs")


def uninstall() -> None:
    from fsspec.registry import _registry
    for p in PROTOCOLS:
        _registry.pop(p, None)
    FakeGCS.clear_instance_cache()
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
