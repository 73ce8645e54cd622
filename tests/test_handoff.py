"""Shared-memory hand-off of photons from a front end to the shared engine (charon/handoff.py)."""

import errno
import logging
import os

import numpy as np
import pytest

from charon import handoff
from charon.handoff import Segment, SharedHostBuffer, remove_leftovers, remove_orphans, segment_bytes, words
from charon.photons import N_ROWS
from processes import gone_pids

needs_shm = pytest.mark.skipif(not handoff.available(), reason="needs a writable /dev/shm (Linux)")


@needs_shm
def test_buffer_lives_in_a_segment_the_engine_side_can_map():
    buf = SharedHostBuffer()
    try:
        buf.reserve(100, 10_000)
        seg = buf.segment
        assert seg is not None and handoff.NAME_RE.match(seg.name)
        assert seg.name.startswith(f"charon-{os.getppid()}-{os.getpid()}-")
        assert buf.capacity == 1024 and seg.nbytes == segment_bytes(1024)
        n = 100
        rows = buf.rows(n)  # as the batcher assembles a batch: table rows, then the flags' bits
        rows[:N_ROWS] = np.arange(N_ROWS * n, dtype=np.float32).reshape(N_ROWS, n)
        rows[N_ROWS].view(np.uint32)[:] = np.arange(n, dtype=np.uint32) * 3
        other = Segment.attach(seg.name)  # what the engine's process does
        w = words(other, buf.capacity)
        assert len(w) == (N_ROWS + 2) * buf.capacity
        seen = w[: (N_ROWS + 1) * n].reshape(N_ROWS + 1, n)
        np.testing.assert_array_equal(seen[:N_ROWS], np.arange(N_ROWS * n, dtype=np.float32).reshape(N_ROWS, n))
        np.testing.assert_array_equal(seen[N_ROWS].view(np.uint32), np.arange(n, dtype=np.uint32) * 3)
        del w, seen
        other.close()
    finally:
        buf.close()
    assert not os.path.exists(os.path.join(handoff.SHM_DIR, seg.name))


@needs_shm
def test_growing_retires_the_old_segment():
    retired = []
    buf = SharedHostBuffer(on_retire=retired.append)
    try:
        buf.reserve(10, 1 << 20)
        first = buf.segment.name
        buf.reserve(5000, 1 << 20)  # no larger than needed... but at least double
        assert buf.capacity == 5000 and buf.segment.name != first
        assert retired == [first]
        assert not os.path.exists(os.path.join(handoff.SHM_DIR, first))
        buf.reserve(4000, 1 << 20)  # fits: nothing changes
        assert retired == [first]
    finally:
        buf.close()


@needs_shm
def test_full_shm_falls_back_to_private_memory(monkeypatch, caplog):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    before = set(os.listdir(handoff.SHM_DIR))
    buf = SharedHostBuffer()
    with caplog.at_level(logging.WARNING, "charon.handoff"):
        buf.reserve(100, 1000)
    assert buf.segment is None and buf.capacity == 1000
    assert buf.words.shape == ((N_ROWS + 2) * 1000,) and buf.rows(1000).shape == (N_ROWS + 1, 1000)
    assert "No space left" in caplog.text
    assert set(os.listdir(handoff.SHM_DIR)) == before  # the half-made file was removed


@pytest.mark.parametrize("name, message", [
    ("../etc/passwd", "not a charon shared-memory segment name"),
    ("charon-1-2", "not a charon shared-memory segment name"),
    ("charon-1-2-3/x", "not a charon shared-memory segment name"),
    ("charon-999999999-1-1", "cannot open shared-memory segment"),
])  # fmt: skip
@needs_shm
def test_attach_rejects_bad_or_missing_names(name, message):
    with pytest.raises(ValueError, match=message):
        Segment.attach(name)


@needs_shm
def test_attach_rejects_empty_segment_and_words_check_the_size():
    path = os.path.join(handoff.SHM_DIR, f"charon-{os.getppid()}-{os.getpid()}-987654")
    open(path, "wb").close()
    try:
        with pytest.raises(ValueError, match="is empty"):
            Segment.attach(os.path.basename(path))
    finally:
        os.unlink(path)
    seg = Segment.create(segment_bytes(100))
    try:
        assert len(words(seg, 100)) == (N_ROWS + 2) * 100
        with pytest.raises(ValueError, match="needs .* bytes"):
            words(seg, 101)
    finally:
        seg.close()


@needs_shm
def test_remove_leftovers_takes_only_this_launchers_segments():
    mine = [Segment.create(64) for _ in range(2)]  # named charon-<our parent>-<us>-k
    try:
        parent, me = os.getppid(), os.getpid()
        assert remove_leftovers(launcher_pid=parent, child_pid=me + 1) == 0  # another front end: none
        assert remove_leftovers(launcher_pid=parent + 1) == 0  # another launcher: none
        assert remove_leftovers(launcher_pid=parent, child_pid=me) == 2
        assert not any(os.path.exists(os.path.join(handoff.SHM_DIR, s.name)) for s in mine)
    finally:
        for s in mine:
            s.close()


def test_remove_orphans_takes_only_segments_whose_launcher_and_front_end_are_both_gone(tmp_path):
    """A whole process tree killed at once leaves its segments; a starting launcher removes those, and
    only those: a segment with a live launcher or a live front end belongs to a running server."""
    d1, d2 = gone_pids(2)
    names = {f"charon-{d1}-{d2}-0": True, f"charon-{d1}-{d2}-7": True,  # both gone: removed
             f"charon-{d1}-{os.getpid()}-0": False,  # its front end is alive
             f"charon-{os.getpid()}-{d2}-0": False,  # its launcher is alive (it removes its front ends' own)
             f"charon-{d1}-{d2}-x": False, f"other-{d1}-{d2}-0": False}  # not a charon segment name  # fmt: skip
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(b"\0" * (100 + i))
    assert remove_orphans(str(tmp_path)) == (2, 100 + 101)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, gone in names.items() if not gone)
    assert remove_orphans(str(tmp_path / "missing")) == (0, 0)


def test_server_config_and_cli_refuse_an_unknown_handoff():
    from charon.cli import batch_parser
    from charon.server import ServerConfig

    with pytest.raises(ValueError, match="--handoff must be auto, shm or socket"):
        ServerConfig(handoff="pipe").validate()
    for mode in ("auto", "shm", "socket"):
        ServerConfig(handoff=mode).validate()
    with pytest.raises(SystemExit):
        batch_parser().parse_args(["--handoff", "pipe"])
