"""User mistakes and how the command-line tools report them.

A mistake the user can fix (a path, a config key, a file's contents) raises `UserError` with a message
that names the thing and says what was expected. Every CLI runs its `main` through `run_cli`, which
prints such a message as one paragraph on stderr and exits with code 2, without a traceback. A bug
still shows its traceback. `--debug` on the command line, or `VRL_JAX_DEBUG=1`, shows the traceback
of a user error too.
"""

from __future__ import annotations

import errno
import os
import sys
import textwrap
from typing import Callable, Sequence

DEBUG_ENV = "VRL_JAX_DEBUG"
EXIT_USER_ERROR = 2

# OS errors that mean "the place the user chose cannot take the write", not a bug.
_USER_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted",
                errno.EFBIG: "the file is larger than this process may write (ulimit -f)"}


class UserError(Exception):
    """A mistake the user can fix; the message names the file, key or parameter and what was expected."""


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    argv = sys.argv if argv is None else argv
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def strip_debug_flag(argv: Sequence[str]) -> list[str]:
    return [a for a in argv if a != "--debug"]


def as_user_error(exc: BaseException) -> UserError | None:
    """The user-facing form of `exc`, or None if it is a bug. OS errors that mean the disk is full or a
    path is not writable are the user's to fix, wherever in the run they surface."""
    if isinstance(exc, UserError):
        return exc
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _USER_ERRNOS:
            where = e.filename or "a file in the run's directory"
            return UserError(f"cannot write {where}: {_USER_ERRNOS[e.errno]} ({e.strerror}). Free space or "
                             "choose a writable directory, then run the same command again: a run resumes "
                             "from its last complete checkpoint.")
    return None


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def report(error: UserError, prog: str) -> None:
    """One paragraph on stderr: `prog: error: ...`, wrapped to the terminal."""
    text = " ".join(str(error).split()) if "\n" not in str(error).strip() else str(error).strip()
    if "\n" in text:  # a message laid out by its author (a list of faults, a diff of keys) keeps its lines
        print(f"{prog}: error: {text}", file=sys.stderr)
    else:
        print(textwrap.fill(f"{prog}: error: {text}", width=100, break_long_words=False,
                            break_on_hyphens=False), file=sys.stderr)
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
