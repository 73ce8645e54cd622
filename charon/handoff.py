"""Photons handed from a front end to the shared engine through shared memory (``--handoff shm``).

Why: behind ``--procs`` every front-end batch (~12 events, ~580 kB of photons at
1000 photons per event) used to cross the internal socket and then be copied
again into the shared engine's merge buffer, on the one thread that also
launches the GPU. Measured on the H200 host, that transfer and the queueing
around it were ~2 ms of an event's ~7 ms in the server (benchmarks/RESULTS.md).
With shared memory a front end assembles each batch straight into a segment
under /dev/shm (the copy out of the request frames it makes anyway); the engine
maps the segment once, registers it as pinned memory on a GPU and copies the
photons to the device from there. The socket message carries only the batch's
per-event arrays and the segment's name.

Segment layout (one per front-end host buffer; a buffer that must grow gets a
new segment and retires the old one, never resizes it)::

    byte 0                      rows   [N_ROWS + 1, n] float32  a batch of n photons: its table's rows (stride n),
                                                                then its flags [n] uint32 as one more row
    (N_ROWS + 1) * cap * 4      slot   [cap] int32              the front end's own; the engine numbers merged slots

(scheduler/batcher.py HostBuffer, whose words this is.) A batch always starts at
byte 0 of its segment, so ``cap`` (from the message, checked against the
segment's size) and ``n`` locate everything. Flags right after the table let the
engine copy a front-end batch to the device in one 2D copy.

Names are ``charon-<launcher pid>-<front-end pid>-<k>``: the launcher removes
whatever a killed front end left behind (:func:`remove_leftovers`), and a starting
launcher removes the segments of process trees that were killed whole
(:func:`remove_orphans`). Segments are
sized with ``posix_fallocate``, so a full /dev/shm (Docker's default is 64 MB)
is an error at creation, not a SIGBUS at the first write; the front end then
falls back to sending photons over the socket.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import logging
import mmap
import os
import re

import numpy as np

from .scheduler.batcher import HostBuffer, buffer_words

log = logging.getLogger("charon.handoff")

SHM_DIR = "/dev/shm"
NAME_RE = re.compile(r"charon-\d+-\d+-\d+\Z")
_numbers = itertools.count()  # thread-safe in CPython: front ends run as threads in tests


def segment_bytes(cap: int) -> int:
    return 4 * buffer_words(cap)


def available(directory: str = SHM_DIR) -> bool:
    """Whether shared-memory hand-off can work here at all (Linux, a writable /dev/shm)."""
    return hasattr(os, "posix_fallocate") and os.path.isdir(directory) and os.access(directory, os.W_OK)


class Segment:
    """A named, mapped shared-memory file."""

    def __init__(self, name: str, mm: mmap.mmap, path: str | None):
        self.name = name
        self.mm = mm
        self.nbytes = len(mm)
        self.path = path  # set in the creating process, which removes it

    @classmethod
    def create(cls, nbytes: int, directory: str = SHM_DIR) -> "Segment":
        """A new segment of ``nbytes``; OSError (e.g. ENOSPC) when /dev/shm cannot hold it."""
        name = f"charon-{os.getppid()}-{os.getpid()}-{next(_numbers)}"
        path = os.path.join(directory, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)  # reserve the pages now: ENOSPC here, not SIGBUS on a write
            mm = mmap.mmap(fd, nbytes)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return cls(name, mm, path)

    @classmethod
    def attach(cls, name: str, directory: str = SHM_DIR) -> "Segment":
        """Map another process's segment; ValueError naming the problem."""
        if not NAME_RE.match(name):
            raise ValueError(f"{name[:80]!r} is not a charon shared-memory segment name")
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise ValueError(f"cannot open shared-memory segment {name}: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                raise ValueError(f"shared-memory segment {name} is empty")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(name, mm, None)

    def array(self, dtype, offset: int, count: int) -> np.ndarray:
        return np.frombuffer(self.mm, dtype, count, offset)

    def unlink(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.path = None

    def close(self) -> None:
        """Remove the name (creator) and unmap; the mapping outlives this while arrays still view it."""
        self.unlink()
        with contextlib.suppress(BufferError):  # views alive: the mapping goes with the last of them
            self.mm.close()


def words(seg: Segment, cap: int) -> np.ndarray:
    """The [(N_ROWS + 2) * cap] float32 words of a segment laid out as a batch buffer for ``cap`` photons
    (scheduler/batcher.py HostBuffer: a batch of n as [N_ROWS + 1, n] rows from word 0, table then flags)."""
    if segment_bytes(cap) > seg.nbytes:
        raise ValueError(f"a batch buffer of {cap} photons needs {segment_bytes(cap)} bytes; "
                         f"segment {seg.name} has {seg.nbytes}")  # fmt: skip
    return seg.array(np.float32, 0, buffer_words(cap))


class SharedHostBuffer(HostBuffer):
    """A front end's batch buffer in a shared-memory segment (private memory if /dev/shm is full).

    ``on_retire(name)`` is called when a grown buffer drops its old segment, so the
    engine can unmap it; that only happens while the buffer is free (its batch answered)."""

    def __init__(self, on_retire=None, directory: str = SHM_DIR):
        super().__init__()
        self.segment: Segment | None = None
        self._on_retire = on_retire
        self._directory = directory

    def reserve(self, n: int, limit: int) -> None:
        if n <= self.capacity:
            return
        cap = min(max(n, 2 * self.capacity, 1024), max(limit, n))
        old = self.segment
        try:
            seg = Segment.create(segment_bytes(cap), self._directory)
        except OSError as exc:
            log.warning("no shared memory for a batch of %d photons (%s); this buffer's photons go over the "
                        "socket", cap, exc)  # fmt: skip
            seg = None
        self.words = np.empty(buffer_words(cap), np.float32) if seg is None else words(seg, cap)
        self.segment, self.capacity = seg, cap
        if old is not None:
            old.close()
            if self._on_retire is not None:
                self._on_retire(old.name)

    def close(self) -> None:
        if self.segment is not None:
            self.segment.close()
            self.segment = None


def remove_leftovers(launcher_pid: int | None = None, child_pid: int | None = None, directory: str = SHM_DIR) -> int:
    """Remove the segments of this launcher's front ends (of one, with ``child_pid``) that a killed
    front end left behind; returns how many. The shared engine may keep a removed one mapped."""
    pid = os.getpid() if launcher_pid is None else launcher_pid
    pattern = f"charon-{pid}-{child_pid}-*" if child_pid is not None else f"charon-{pid}-*"
    removed = 0
    for path in glob.glob(os.path.join(directory, pattern)):
        with contextlib.suppress(OSError):
            os.unlink(path)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_orphans(directory: str = SHM_DIR) -> tuple[int, int]:
    """Remove segments whose launcher and front end are both gone; returns (how many, bytes).

    A launcher removes what its own killed front ends leave (:func:`remove_leftovers`), but
    when the whole process tree is killed at once (the OOM killer, a batch system's SIGKILL
    of the job, ``kill -9`` of the process group) nothing does, and /dev/shm is memory:
    each such crash would keep up to a batch buffer per front end (~260 MB at 5e6 photons)
    until the host reboots. A starting launcher calls this. A segment of a live server
    always has a live creator, and another user's cannot be removed (/dev/shm is sticky)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return 0, 0
    removed, size = 0, 0
    for name in names:
        if not NAME_RE.match(name):
            continue
        launcher, front_end = (int(x) for x in name.split("-")[1:3])
        if _alive(launcher) or _alive(front_end):
            continue
        path = os.path.join(directory, name)
        with contextlib.suppress(OSError):
            nbytes = os.stat(path).st_size
            os.unlink(path)
            removed, size = removed + 1, size + nbytes
    return removed, size
