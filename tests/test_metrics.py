"""The C heap's account (MallocCollector): what it reads, and that it follows real allocations."""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from charon.metrics import MallocCollector, _mallinfo2

glibc = pytest.mark.skipif(_mallinfo2() is None, reason="needs glibc >= 2.33 (mallinfo2)")


def _values(registry: CollectorRegistry) -> dict:
    return {s.name: s.value for fam in registry.collect() for s in fam.samples}


def test_fields_map_to_the_named_gauges():
    info = SimpleNamespace(arena=1000, hblkhd=300, uordblks=700, fordblks=250, keepcost=5)
    r = CollectorRegistry()
    MallocCollector(r, read=lambda: info)
    assert _values(r) == {"process_malloc_in_use_bytes": 1000.0, "process_malloc_free_bytes": 250.0,
                          "process_malloc_arena_bytes": 1000.0, "process_malloc_mmap_bytes": 300.0}  # fmt: skip


def test_nothing_exposed_without_mallinfo2():
    r = CollectorRegistry()
    c = MallocCollector(r)
    c._read = None  # as on musl or an old glibc
    assert _values(r) == {}


@glibc
def test_in_use_follows_blocks_malloced_and_freed():
    """Blocks of 64 kB (under glibc's mmap threshold: they come from the arenas) raise the in-use figure by
    at least their size, and freeing them takes it back down, into the allocator's free bytes or to the system."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    r = CollectorRegistry()
    MallocCollector(r)
    before = _values(r)["process_malloc_in_use_bytes"]
    blocks = [libc.malloc(64 * 1024) for _ in range(256)]  # 16 MB
    assert all(blocks)
    try:
        held = _values(r)["process_malloc_in_use_bytes"]
        assert held - before >= 16 * 2**20 * 0.99
    finally:
        for b in blocks:
            libc.free(b)
    after = _values(r)["process_malloc_in_use_bytes"]
    assert held - after >= 16 * 2**20 * 0.99


# ---------------------------------------------------------------- threads' CPU time and wait for a CPU
def _schedstat_readable() -> bool:
    import os

    return os.path.exists(f"/proc/self/task/{os.getpid()}/schedstat")


schedstat = pytest.mark.skipif(not _schedstat_readable(), reason="needs Linux's /proc/<pid>/task/<tid>/schedstat")


def test_thread_times_read_schedstat_sum_threads_of_one_name_and_skip_the_unreadable(tmp_path):
    from charon.metrics import read_thread_times

    for tid, comm, stat in ((11, "python3", "2000000000 500000000 7\n"), (12, "ZMQbg/IO/0", "300000000 1000000 4\n"),
                            (13, "ZMQbg/IO/0", "100000000 3000000 2\n"), (14, "gone", None)):  # fmt: skip
        d = tmp_path / str(tid)
        d.mkdir()
        (d / "comm").write_text(comm + "\n")
        if stat is not None:
            (d / "schedstat").write_text(stat)
    got = read_thread_times(str(tmp_path), names={11: "MainThread"})
    assert got.keys() == {"MainThread", "ZMQbg/IO/0"}  # Python's name where it has one; 14 had ended
    assert got["MainThread"] == pytest.approx((2.0, 0.5))
    assert got["ZMQbg/IO/0"] == pytest.approx((0.4, 0.004))
    assert read_thread_times(str(tmp_path / "nowhere")) == {}


def test_thread_times_collector_exposes_both_counters_by_thread():
    from charon.metrics import ThreadTimesCollector

    r = CollectorRegistry()
    ThreadTimesCollector(r, read=lambda: {"MainThread": (1.5, 0.25), "ZMQbg/IO/0": (0.5, 0.0)})
    got = {(s.name, s.labels["thread"]): s.value for fam in r.collect() for s in fam.samples}
    assert got == {("process_thread_cpu_seconds_total", "MainThread"): 1.5,
                   ("process_thread_cpu_seconds_total", "ZMQbg/IO/0"): 0.5,
                   ("process_thread_wait_seconds_total", "MainThread"): 0.25,
                   ("process_thread_wait_seconds_total", "ZMQbg/IO/0"): 0.0}  # fmt: skip
    r2 = CollectorRegistry()
    ThreadTimesCollector(r2, read=dict)  # nothing readable: nothing exposed
    assert list(r2.collect()) == []


@schedstat
def test_a_busy_thread_counts_its_cpu_time_under_its_python_name():
    import threading
    import time

    from charon.metrics import read_thread_times

    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass

    th = threading.Thread(target=spin, name="spinner")
    th.start()
    try:
        time.sleep(0.1)  # the main thread sleeps: the spinner has the GIL and a CPU
        cpu = read_thread_times().get("spinner", (0.0, 0.0))[0]
    finally:
        stop.set()
        th.join()
    assert 0.03 < cpu < 5  # seconds, not nanoseconds or ticks
    assert "spinner" not in read_thread_times()


@schedstat
def test_processes_sharing_one_cpu_each_wait_for_it():
    """Two spinning processes on one CPU each run about half the time and wait the other half: the wait the
    server's threads would show when the host's other work takes their cores."""
    import os
    import subprocess
    import sys
    import time

    from charon.metrics import read_thread_times

    cpu = min(os.sched_getaffinity(0))
    procs = [subprocess.Popen([sys.executable, "-c", "import os, time\n"
                               f"os.sched_setaffinity(0, {{{cpu}}})\nt = time.monotonic()\n"
                               "while time.monotonic() - t < 0.6: pass"]) for _ in range(2)]  # fmt: skip
    try:
        time.sleep(0.45)
        times = [sum(read_thread_times(f"/proc/{p.pid}/task", names={}).values(), ()) for p in procs]
    finally:
        for p in procs:
            p.wait(10)
    for cpu_s, wait_s in times:
        # Each spun for ~0.4 s of wall time on the shared CPU: both figures well above nothing (the start of
        # Python itself, before the pinning, ran anywhere).
        assert cpu_s > 0.05 and wait_s > 0.05
