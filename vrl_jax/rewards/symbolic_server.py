"""Server process that runs math-verify under a wall clock; started by ``symbolic.SymbolicChecker``.

Run as a script (``runpy.run_path`` on this file, READ_FD WRITE_FD CONFIG_JSON last in argv), not
through ``multiprocessing``, so that starting it never re-imports the caller's ``__main__`` and the
caller's threads (JAX, grain) are never forked.

Layout: this server imports math-verify once, warms it, and forks worker processes from itself,
so a replacement worker costs a fork (milliseconds), not an import (about a second). Each worker
runs one check at a time under a SIGALRM deadline; a worker stuck in C code, which no signal can
interrupt (Math-Verify issues #63, #65), is killed by the server at the hard deadline.
The server itself never computes, so it always answers.
"""
from __future__ import annotations

import collections
import ctypes
import json
import logging
import os
import signal
import sys
import time
from multiprocessing.connection import Connection, wait

# A worker that has not answered by soft deadline x HARD_FACTOR + HARD_SLACK_S is killed.
HARD_FACTOR = 1.25
HARD_SLACK_S = 0.1


class _Deadline(BaseException):
    """Raised by SIGALRM inside a worker; a BaseException so library `except Exception` misses it."""


def _on_alarm(signum, frame):
    raise _Deadline()


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when the server dies (best effort elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _extraction_config(targets: tuple[str, ...]) -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    known = {"latex": LatexExtractionConfig, "expr": ExprExtractionConfig}
    return [known[t]() for t in targets]


def _check(first: str, second: str, float_rounding: int, targets: tuple[str, ...]) -> bool:
    """``verify(parse(first), parse(second))``; math-verify's own signal timeouts are off."""
    from math_verify import parse, verify

    config = _extraction_config(tuple(targets))
    a = parse(first, config, parsing_timeout=None)
    b = parse(second, config, parsing_timeout=None)
    return bool(verify(a, b, float_rounding=float_rounding, timeout_seconds=None))


def _worker_loop(conn: Connection, timeout_s: float) -> None:
    signal.signal(signal.SIGALRM, _on_alarm)
    while True:
        try:
            first, second, float_rounding, targets = conn.recv()
        except (EOFError, OSError):
            return
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            out = ("ok", _check(first, second, float_rounding, targets), "")
        except _Deadline:
            out = ("timeout", False, f"math-verify did not finish within {timeout_s:g} s")
        except BaseException as exc:  # noqa: BLE001 - any library failure is a verdict, not a crash
            out = ("error", False, f"{type(exc).__name__}: {exc}"[:300])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        conn.send(out)


class _Worker:
    """A forked worker process and the server's end of its pipe."""

    def __init__(self, pid: int, conn: Connection):
        self.pid = pid
        self.conn = conn

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        self.conn.close()


def _fork_worker(timeout_s: float, inherited: list[Connection]) -> _Worker:
    import multiprocessing

    ours, theirs = multiprocessing.Pipe()
    pid = os.fork()
    if pid == 0:  # the worker: keep only its own pipe end open
        code = 0
        try:
            ours.close()
            for c in inherited:
                c.close()
            _die_with_parent()
            _worker_loop(theirs, timeout_s)
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    theirs.close()
    return _Worker(pid, ours)


def _run(pool: list[_Worker], tasks: list, cfg: dict, control: list[Connection]) -> list:
    """Spread ``tasks`` over the pool; kill and replace any worker past its hard deadline."""
    timeout_s = cfg["timeout_s"]
    hard_s = timeout_s * HARD_FACTOR + HARD_SLACK_S
    results: list = [None] * len(tasks)
    pending = collections.deque(enumerate(tasks))
    busy: dict[int, tuple[int, float]] = {}

    def replace(wi: int) -> None:
        pool[wi].kill()
        others = [w.conn for j, w in enumerate(pool) if j != wi]
        pool[wi] = _fork_worker(timeout_s, others + control)

    while pending or busy:
        for wi in range(len(pool)):
            if wi not in busy and pending:
                ti, task = pending.popleft()
                try:
                    pool[wi].conn.send(task)
                    busy[wi] = (ti, time.monotonic() + hard_s)
                except OSError:
                    results[ti] = ("error", False, "worker pipe broken")
                    replace(wi)
        if not busy:
            continue
        by_conn = {pool[wi].conn: wi for wi in busy}
        next_deadline = min(d for _, d in busy.values())
        for conn in wait(list(by_conn), timeout=max(0.0, next_deadline - time.monotonic())):
            wi = by_conn[conn]
            ti, _ = busy.pop(wi)
            try:
                results[ti] = conn.recv()
            except (EOFError, OSError):
                results[ti] = ("error", False, "worker died")
                replace(wi)
        now = time.monotonic()
        for wi, (ti, deadline) in list(busy.items()):
            if now >= deadline:
                results[ti] = ("timeout", False, f"killed after {hard_s:.2f} s (stuck outside Python)")
                del busy[wi]
                replace(wi)
    return results


def serve(read_fd: int, write_fd: int, cfg: dict) -> None:
    """Answer ``("check", [(first, second, float_rounding, targets), ...])`` requests until EOF or ``("close",)``."""
    requests, replies = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    # Ctrl-C in the terminal reaches the whole process group; the client decides when this server stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)
    _check("$\\frac{1}{2}$", "$0.5$", 6, ("latex", "expr"))  # compile math-verify's regexes once, pre-fork
    control = [requests, replies]
    pool: list[_Worker] = []
    for _ in range(cfg["workers"]):
        pool.append(_fork_worker(cfg["timeout_s"], [w.conn for w in pool] + control))
    replies.send(("ready",))
    try:
        while True:
            try:
                msg = requests.recv()
            except (EOFError, OSError):
                return
            if msg[0] == "close":
                return
            replies.send(("results", _run(pool, msg[1], cfg, control)))
    finally:
        for w in pool:
            w.kill()


if __name__ == "__main__":
    serve(int(sys.argv[-3]), int(sys.argv[-2]), json.loads(sys.argv[-1]))
