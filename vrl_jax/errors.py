"""User mistakes and how the command-line tools report them.

A mistake the user can fix (a path, a config key, a file's contents) raises `UserError` with a message
that names the thing and says what was expected. Every CLI runs its `main` through `run_cli`, which
prints such a message as one paragraph on stderr and exits with code 2, without a traceback. A bug
still shows its traceback. `--debug` on the command line, or `VRL_JAX_DEBUG=1`, shows the traceback
of a user error too.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import textwrap
import warnings
from typing import Callable, Sequence

from vrl_jax.storage import is_remote

DEBUG_ENV = "VRL_JAX_DEBUG"
EXIT_USER_ERROR = 2

# OS errors that mean "the place the user chose cannot take the write", not a bug.
_USER_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted",
                errno.EFBIG: "the file is larger than this process may write (ulimit -f)"}


# tensorstore (orbax's array store) reports OS errors as ValueError text: '... [os_error_code='28']'.
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='(\d+)'")
_TENSORSTORE_PATH = re.compile(r'(?:Failed writing|local file): "([^"]+)"')
ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax writes a checkpoint under <step>.orbax-checkpoint-tmp, then renames


class UserError(Exception):
    """A mistake the user can fix; the message names the file, key or parameter and what was expected."""


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    argv = sys.argv if argv is None else argv
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def strip_debug_flag(argv: Sequence[str]) -> list[str]:
    return [a for a in argv if a != "--debug"]


def as_user_error(exc: BaseException) -> UserError | None:
    """The user-facing form of `exc`, or None if it is a bug. OS errors that mean the disk is full or a
    path is not writable are the user's to fix, wherever in the run they surface (including tensorstore's,
    which orbax raises as ValueError when a checkpoint cannot be written)."""
    if isinstance(exc, UserError):
        return exc
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _USER_ERRNOS:
            return _write_error(e.filename or "a file in the run's directory", e.errno, e.strerror)
        m = _TENSORSTORE_ERRNO.search(str(e)) if isinstance(e, ValueError) else None
        if m and int(m.group(1)) in _USER_ERRNOS:
            path = _TENSORSTORE_PATH.search(str(e))
            where = path.group(1) if path else "a checkpoint file"
            if ORBAX_TMP_SUFFIX in where:
                where = f"the checkpoint {where.split(ORBAX_TMP_SUFFIX)[0]}"
            return _write_error(where, int(m.group(1)), os.strerror(int(m.group(1))))
    return None


def _write_error(where: str, code: int, strerror: str | None) -> UserError:
    return UserError(f"cannot write {where}: {_USER_ERRNOS[code]} ({strerror}). Free space or choose a writable "
                     "directory, then run the same command again: a run resumes from its last complete checkpoint.")


class _HideUserErrors(logging.Filter):
    """Drops log records (orbax logs a failed background save from every thread, with tracebacks) whose
    error is a user error: the CLI reports it once, as one paragraph."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and as_user_error(exc) is not None:
            return False
        m = _TENSORSTORE_ERRNO.search(record.getMessage())
        return not (m and int(m.group(1)) in _USER_ERRNOS)


def _is_late_callback(unraisable) -> bool:
    """tensorstore completing a write after orbax closed the event loop that awaited it: orbax stops
    waiting at the first failed write of a save, and each later one reports 'Event loop is closed' from
    `call_soon_threadsafe`, with no bearing on the failure, which is reported on its own."""
    exc, frames, tb = unraisable.exc_value, [], unraisable.exc_traceback
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed" and "call_soon_threadsafe" in frames


def hide_logged_user_errors(loggers: Sequence[str] = ("absl", "asyncio", "")) -> None:
    """Keeps a failed write (a full disk) to the one paragraph the CLI prints: installs `_HideUserErrors`
    on `loggers` (absl's, which orbax uses; asyncio's, which reports the writes orbax stopped awaiting;
    the root) and drops tensorstore's late callbacks into orbax's closed event loop
    (`_is_late_callback`). Once per process; nothing is hidden with --debug."""
    if debug_requested():
        return
    for name in loggers:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _HideUserErrors) for f in logger.filters):
            logger.addFilter(_HideUserErrors())
    # The writes orbax abandoned are garbage-collected at exit, unawaited.
    warnings.filterwarnings("ignore", message=r"coroutine '.*write_fragment' was never awaited",
                            category=RuntimeWarning)
    previous = sys.unraisablehook
    if getattr(previous, "_vrl_jax", False):
        return

    def hook(unraisable):
        if not _is_late_callback(unraisable):
            previous(unraisable)
    hook._vrl_jax = True
    sys.unraisablehook = hook


def ensure_writable_dir(path: str, what: str) -> None:
    """Creates `path` if needed and checks that a file can be written in it, so that a read-only or
    full location is reported before a run spends minutes on setup. `what` names the flag or key.
    A bucket (`gs://bucket/run`) has no directories to create: a small object is written there and deleted,
    which finds a missing bucket, credentials or permission, and a missing client library, just as early."""
    if is_remote(path):
        _ensure_writable_bucket(path, what)
        return
    import tempfile
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        known = _USER_ERRNOS.get(e.errno)
        reason = known or ("it is not a directory" if e.errno in (errno.ENOTDIR, errno.EEXIST) else e.strerror)
        raise UserError(f"{what} {path}: cannot write there: {reason}. Choose a writable directory.") from e


def bucket_client_missing(path: str, what: str, error: ImportError) -> UserError:
    """The error for a bucket URI that etils.epath has no client library for here (its ImportError)."""
    return UserError(f"{what} {path}: cannot reach {path.split('://')[0]}:// from this machine: {error}. Checkpoints "
                     "and logs reach a bucket through etils.epath, which uses gcsfs or tensorflow for gs://, and orbax "
                     "asks google-cloud-storage about the bucket: `pip install -e \".[gcs]\"` installs both.")


def _ensure_writable_bucket(path: str, what: str) -> None:
    """The libraries a bucket needs, then a probe object written and deleted (one name per process: every
    host of a multi-host run probes at once)."""
    import uuid

    from etils import epath
    if path.startswith("gs://"):
        try:
            import google.cloud.storage  # noqa: F401 - orbax asks it about the bucket whenever it lists steps
        except ImportError as e:
            raise UserError(f"{what} {path}: checkpoints in a gs:// bucket need google-cloud-storage (orbax lists "
                            "their steps with it): `pip install -e \".[gcs]\"` (google-cloud-storage and gcsfs).") from e
    probe = epath.Path(path) / f".write-test-{uuid.uuid4().hex}"
    try:
        probe.write_text("")
        probe.unlink()
    except ImportError as e:
        raise bucket_client_missing(path, what, e) from e
    except Exception as e:  # noqa: BLE001 - a missing bucket, credentials or permission: no common type across clients
        raise UserError(f"{what} {path}: cannot write there: {type(e).__name__}: {e}. Check the bucket's name and "
                        "that this machine's credentials may write to it.") from e


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def report(error: UserError, prog: str) -> None:
    """One paragraph on stderr: `prog: error: ...`, wrapped to the terminal. A message laid out by its
    author in lines (a list of faults, a diff of keys) keeps its lines; each is wrapped on its own."""
    text = str(error).strip()
    lines = text.splitlines() if "\n" in text else [" ".join(text.split())]
    lines[0] = f"{prog}: error: {lines[0]}"
    for line in lines:
        indent = " " * (len(line) - len(line.lstrip()))
        print(textwrap.fill(line, width=100, subsequent_indent=indent + ("  " if indent else ""),
                            break_long_words=False, break_on_hyphens=False), file=sys.stderr)
    print(f"(run with --debug or {DEBUG_ENV}=1 to see a traceback)", file=sys.stderr)


def run_cli(main: Callable[[list[str]], int | None], prog: str, argv: Sequence[str] | None = None) -> int:
    """Runs `main(argv)` (argv without `--debug`) and turns user errors into exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    try:
        return int(main(strip_debug_flag(argv)) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - sorted into user errors and bugs below
        user = as_user_error(exc)
        if user is None or debug:
            raise
        report(user, prog)
        return EXIT_USER_ERROR
