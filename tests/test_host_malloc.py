"""vrl_jax/host_malloc.py: the environment it re-executes with, and what the re-execution does to malloc."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from vrl_jax import host_malloc
from vrl_jax.host_malloc import huge_page_environment


def test_environment_adds_the_tunable_after_the_users_own():
    assert huge_page_environment({}, (2, 36), "madvise")["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    env = huge_page_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b"}, (2, 39), "always")
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "A": "b",
                   "VRL_JAX_HUGE_PAGES_REEXECUTED": "1"}


@pytest.mark.parametrize("environ, glibc, thp", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise"),  # the user's choice wins
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1:glibc.malloc.hugetlb=2"}, (2, 36), "madvise"),
    ({"VRL_JAX_HUGE_PAGES": "0"}, (2, 36), "madvise"),
    ({"VRL_JAX_HUGE_PAGES": "off"}, (2, 36), "always"),
    ({}, (2, 34), "madvise"),  # glibc without the tunable
    ({}, None, "madvise"),  # not glibc
    ({}, (2, 36), "never"),
    ({}, (2, 36), None),  # no /sys/kernel/mm/transparent_hugepage
    ({"VRL_JAX_HUGE_PAGES_REEXECUTED": "1"}, (2, 36), "madvise"),  # re-executed once, GLIBC_TUNABLES lost since
])
def test_environment_is_left_alone(environ, glibc, thp):
    assert huge_page_environment(environ, glibc, thp) is None


def test_describe_says_what_this_process_runs_with():
    assert host_malloc.describe({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}).startswith("huge pages on")
    assert host_malloc.describe({"GLIBC_TUNABLES": "a=1:glibc.malloc.hugetlb=0"}).startswith("huge pages off")
    assert host_malloc.describe({"VRL_JAX_HUGE_PAGES": "0"}) == "huge pages off (VRL_JAX_HUGE_PAGES=0)"
    assert host_malloc.describe({}).startswith("huge pages off (")


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    (tmp_path / "enabled").write_text("always [madvise] never\n")
    assert host_malloc.thp_mode(str(tmp_path / "enabled")) == "madvise"
    assert host_malloc.thp_mode(str(tmp_path / "missing")) is None


# Calls reexec_with_huge_pages(), then maps a 256 MiB buffer through malloc three times (write it, free
# it), counting minor page faults: glibc serves it with mmap and returns it with munmap, so without huge
# pages every round faults all 65536 of its 4 KiB pages in again.
PROBE = textwrap.dedent("""
    import ctypes, json, os, resource, sys
    print(json.dumps({"start": os.getpid(), "argv": sys.argv[1:]}), flush=True)
    from vrl_jax.host_malloc import reexec_with_huge_pages
    reexec_with_huge_pages()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size, faults = 256 << 20, []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffer = libc.malloc(size)
        ctypes.memset(buffer, 1, size)
        libc.free(buffer)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"end": os.getpid(), "faults": faults, "tunables": os.environ.get("GLIBC_TUNABLES")}))
""")


def run_probe(**env):
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "VRL_JAX_HUGE_PAGES")}
    out = subprocess.run([sys.executable, "-c", PROBE, "--flag", "a b"], env={**environ, **env},
                         capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.skipif(sys.platform != "linux" or (host_malloc.glibc_version() or (0,)) < host_malloc.MIN_GLIBC
                    or host_malloc.thp_mode() not in ("always", "madvise"),
                    reason="needs Linux, glibc >= 2.35 and transparent huge pages")
def test_reexecution_keeps_pid_and_arguments_and_stops_refaulting_large_buffers():
    pages = (256 << 20) // 4096
    *starts, end = run_probe()
    assert len(starts) == 2, starts  # the script ran twice: once as started, once re-executed
    assert starts[0] == starts[1] == {"start": end["end"], "argv": ["--flag", "a b"]}
    assert end["tunables"] == "glibc.malloc.hugetlb=1"
    assert max(end["faults"][1:]) < pages / 20, end  # 2 MiB pages: ~128 faults a round, not 65536

    *starts, end = run_probe(VRL_JAX_HUGE_PAGES="0")  # the opt-out: no re-execution, 4 KiB faults
    assert len(starts) == 1 and end["tunables"] is None
    assert min(end["faults"]) > 0.9 * pages, end
