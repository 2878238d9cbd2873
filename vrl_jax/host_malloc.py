"""Transparent huge pages for XLA:CPU's per-execution buffers, through glibc's malloc tunable.

XLA:CPU takes each execution's temporary buffer from the C allocator and frees it when the program
returns. For `benchmarks/train_step.py`'s step that buffer is 806 MB; glibc serves an allocation that
large with a fresh `mmap` and gives it back with `munmap`, so every step faults the whole buffer in
again, 4 KiB at a time: 206k page faults and 0.6-0.8 s of system time in a 2.2-2.5 s step (2-core
Zen 3). With `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35) malloc asks the kernel for
transparent huge pages on those mappings (`madvise`), and the same step takes under a thousand faults
and 0.12 s of system time. Nothing else changes: the same allocations, the same numbers.

glibc reads its tunables once, when a process starts, so the commands (`python -m vrl_jax.train`,
`python -m vrl_jax.evaluate`, the benchmarks) call `reexec_with_huge_pages()` first: it replaces the
process with itself (same pid, arguments and environment, the tunable added) before anything is
imported. It does nothing where it cannot help or was told not to: not Linux with glibc >= 2.35,
transparent huge pages set to `never`, `glibc.malloc.hugetlb` already in GLIBC_TUNABLES (a user's own
choice wins), or VRL_JAX_HUGE_PAGES=0.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "VRL_JAX_HUGE_PAGES"
REEXECUTED = "VRL_JAX_HUGE_PAGES_REEXECUTED"  # set on re-execution: never twice, even where glibc drops GLIBC_TUNABLES
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb


def glibc_version() -> tuple[int, ...] | None:
    """The running C library's version if it is glibc, else None (musl, macOS, Windows)."""
    name, version = platform.libc_ver()
    if name != "glibc" or not version:
        return None
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return None


def thp_mode(path: str = THP_ENABLED) -> str | None:
    """The kernel's transparent huge page mode (`always`, `madvise`, `never`), None where unreadable."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def _opted_out(environ: Mapping[str, str]) -> bool:
    return environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off")


def huge_page_environment(environ: Mapping[str, str], glibc: tuple[int, ...] | None,
                          thp: str | None) -> dict[str, str] | None:
    """The environment to re-execute with, or None to run as is.

    Appends `glibc.malloc.hugetlb=1` to GLIBC_TUNABLES (colon-separated, after any the user set) and marks
    the environment as re-executed, so a process whose GLIBC_TUNABLES is dropped (a setuid wrapper, glibc's
    secure mode) runs on rather than re-executing itself forever.
    """
    if _opted_out(environ) or REEXECUTED in environ:
        return None
    if glibc is None or glibc < MIN_GLIBC or thp not in ("always", "madvise"):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if any(item.split("=", 1)[0] == TUNABLE for item in tunables.split(":")):
        return None
    new = dict(environ)
    new["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
    new[REEXECUTED] = "1"
    return new


def describe(environ: Mapping[str, str] = os.environ) -> str:
    """One line for a run's start: whether this process's malloc asks for huge pages, and why not."""
    tunables = [item.split("=", 1) for item in environ.get("GLIBC_TUNABLES", "").split(":") if item]
    value = dict(item for item in tunables if len(item) == 2).get(TUNABLE)
    if value is not None:
        return f"huge pages {'on' if value != '0' else 'off'} (GLIBC_TUNABLES {TUNABLE}={value})"
    if _opted_out(environ):
        return f"huge pages off ({OPT_OUT}={environ[OPT_OUT]})"
    return "huge pages off (not started through a vrl_jax command, or no glibc >= 2.35 with transparent huge pages)"


def reexec_with_huge_pages() -> None:
    """Replace this process with itself under `huge_page_environment`; returns only if nothing to do.

    Call it from a command's `if __name__ == "__main__":` block, before heavy imports. The command line
    is `sys.orig_argv` (the interpreter's own flags and `-m module` included), run by `sys.executable`.
    """
    if sys.platform != "linux":
        return
    environ = huge_page_environment(os.environ, glibc_version(), thp_mode())
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
    except OSError:  # an interpreter that cannot be re-executed (embedded, deleted): run without
        return
