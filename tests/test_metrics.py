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
