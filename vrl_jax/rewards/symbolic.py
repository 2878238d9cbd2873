"""The judge's symbolic layer: math-verify in a server process with a wall-clock limit.

math-verify's own timeouts use ``signal.alarm``: they fail outside the main thread (Math-Verify
issues #50, #55; verl#5635 scored every sample 0 that way) and cannot interrupt C code (#63, #65).
``SymbolicChecker`` therefore runs it in ``symbolic_server.py``, whose workers are killed at a hard
deadline, so a check returns within about 1.25 x ``timeout_s`` from any thread, whatever the input.
``pathological_reason`` rejects the known hang patterns before they cost a timeout at all.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import threading
import weakref
from multiprocessing.connection import Connection
from typing import NamedTuple, Sequence

from vrl_jax.rewards import symbolic_server

_SERVER_PATH = os.path.abspath(symbolic_server.__file__)
# run_path rather than `python symbolic_server.py`, which would put this package's directory first on
# the server's sys.path, where a module named like a standard one would shadow it.
_BOOT = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"

# Inputs known to stall sympy (power towers, factorial chains, huge literals).
_PATHOLOGICAL = (
    (re.compile(r"\^\s*\{[^{}]*\^"), "nested exponent"),
    (re.compile(r"\^\s*\(?\s*[\w.]+\s*\)?\s*\^"), "chained exponent"),
    (re.compile(r"\^\s*\{?\s*\d{5,}"), "exponent with 5 or more digits"),
    (re.compile(r"!\s*!\s*!"), "repeated factorial"),
    (re.compile(r"\d{4,}\s*!"), "factorial of a number with 4 or more digits"),
    (re.compile(r"\d{200,}"), "digit string of 200 or more digits"),
)


def pathological_reason(text: str) -> str | None:
    """Why ``text`` would likely stall a symbolic check, or None if it looks safe."""
    for pattern, reason in _PATHOLOGICAL:
        if pattern.search(text):
            return reason
    return None


EXTRACTION_TARGETS = ("latex", "expr")


class Check(NamedTuple):
    """One request: is ``parse(first)`` equal to ``parse(second)`` under ``verify``'s rules?

    ``first`` is math-verify's gold argument. ``targets`` names the extraction configs ("latex",
    "expr"), ``float_rounding`` the decimal places compared.
    """

    first: str
    second: str
    float_rounding: int = 6
    targets: tuple[str, ...] = EXTRACTION_TARGETS


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """Outcome of one check: ``status`` is "ok", "timeout" or "error"; ``equal`` is False unless ok."""

    status: str
    equal: bool
    detail: str = ""


def _shutdown(proc: subprocess.Popen, conn: Connection | None, owner_pid: int) -> None:
    if os.getpid() != owner_pid:  # a forked copy of the client must not stop its parent's server
        return
    try:
        if conn is not None:
            conn.send(("close",))
            conn.close()
        proc.wait(timeout=2)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()


class SymbolicChecker:
    """``verify(parse(first), parse(second))`` for many checks, never longer than a wall clock.

    Args:
      timeout_s: soft limit per check (the worker's own alarm); the hard kill comes at
        ``1.25 * timeout_s + 0.1`` s.
      workers: worker processes checking in parallel.
      startup_timeout_s: how long to wait for the server to import math-verify.

    The server starts on the first check and stops on ``close()`` (or when this object is
    collected). A server that stops answering is killed and restarted on the next call.
    """

    def __init__(self, timeout_s: float = 2.0, workers: int = 1, startup_timeout_s: float = 120.0):
        if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"SymbolicChecker: timeout_s must be a positive number of seconds, got {timeout_s!r}")
        if not (isinstance(workers, int) and workers >= 1):
            raise ValueError(f"SymbolicChecker: workers must be an integer >= 1, got {workers!r}")
        self._cfg = {"timeout_s": float(timeout_s), "workers": workers}
        self._startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen | None = None
        self._requests: Connection | None = None
        self._replies: Connection | None = None
        self._finalizer = None
        self._owner_pid = os.getpid()
        self._lock = threading.Lock()  # one request at a time on the pipe, whichever thread asks

    @property
    def timeout_s(self) -> float:
        return self._cfg["timeout_s"]

    def start(self) -> None:
        """Start the server now (it otherwise starts on the first check); raises if it cannot."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self.close()
                self._start()

    def _start(self) -> None:
        to_server_r, to_server_w = os.pipe()
        to_client_r, to_client_w = os.pipe()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, _SERVER_PATH, str(to_server_r), str(to_client_w), json.dumps(self._cfg)],
                pass_fds=(to_server_r, to_client_w), stdin=subprocess.DEVNULL, close_fds=True)
        finally:
            os.close(to_server_r)
            os.close(to_client_w)
        self._requests = Connection(to_server_w, readable=False)
        self._replies = Connection(to_client_r, writable=False)
        self._owner_pid = os.getpid()
        self._finalizer = weakref.finalize(self, _shutdown, self._proc, self._requests, self._owner_pid)
        if not self._replies.poll(self._startup_timeout_s):
            self.close()
            raise RuntimeError(f"math-verify server did not start within {self._startup_timeout_s} s")
        self._replies.recv()

    def close(self) -> None:
        """Stop the server process (a later check starts a new one)."""
        if self._finalizer is not None:
            self._finalizer()
        if self._replies is not None:
            self._replies.close()
        self._proc = self._requests = self._replies = self._finalizer = None

    def __enter__(self) -> "SymbolicChecker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_many(self, checks: Sequence[Check]) -> list[CheckResult]:
        """One ``CheckResult`` per check, in order. Never raises."""
        if not checks:
            return []
        try:
            payload = [_validated(Check(*c)) for c in checks]
        except (TypeError, ValueError) as exc:
            return [CheckResult("error", False, str(exc))] * len(checks)
        with self._lock:
            return self._send(payload)

    def _send(self, payload: list[Check]) -> list[CheckResult]:
        if self._proc is not None and self._owner_pid != os.getpid():
            # Forked (e.g. into a data-loader worker): the pipes belong to the parent's server.
            self._finalizer.detach()
            self._proc = self._requests = self._replies = self._finalizer = None
        try:
            if self._proc is None or self._proc.poll() is not None:
                self.close()
                self._start()
            self._requests.send(("check", payload))
            rounds = math.ceil(len(payload) / self._cfg["workers"])
            budget = rounds * (self.timeout_s * symbolic_server.HARD_FACTOR + symbolic_server.HARD_SLACK_S) + 10.0
            if not self._replies.poll(budget):
                self.close()
                return [CheckResult("timeout", False, "math-verify server stopped answering")] * len(payload)
            _, raw = self._replies.recv()
            return [CheckResult(*r) for r in raw]
        except Exception as exc:  # noqa: BLE001 - a broken server is a verdict, never a crash
            self.close()
            return [CheckResult("error", False, f"math-verify server: {type(exc).__name__}: {exc}")] * len(payload)

    def check(self, first: str, second: str, float_rounding: int = 6,
              targets: tuple[str, ...] = EXTRACTION_TARGETS) -> CheckResult:
        return self.check_many([Check(first, second, float_rounding, targets)])[0]


def _validated(check: Check) -> Check:
    targets = tuple(check.targets)
    if not targets or any(t not in EXTRACTION_TARGETS for t in targets):
        raise ValueError(f"Check.targets: expected a non-empty subset of {EXTRACTION_TARGETS}, got {targets!r}")
    return Check(str(check.first), str(check.second), int(check.float_rounding), targets)
