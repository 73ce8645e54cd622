"""Server-side run output (ChAR0N's asynchronous mode): hits written to ROOT files with uproot.

Between ``[RUN_BEGIN, filename]`` and ``[RUN_END]`` a client's PHOTONDATA is
answered at once with ``[SIM_COMPLETE_ASYNC, event_id]``; the events still go
through normal batching, and their hits are written to
``DIR/<name>.charon.ntuple.root`` with two trees, as the ChAR0N client reads
them back (PROTOCOL.md, dialect B):

* ``detinfo``: one entry per channel: ``pmt_x, pmt_y, pmt_z`` (f32), ``pmt_type`` (i32)
* ``output``: one entry per event: ``event_id`` (u32) and jagged ``channel_id`` (u32),
  ``time, wavelength, u, v, w, pol_x, pol_y, pol_z`` (f32), ``flag`` (u32),
  each with its counter branch (``nchannel_id``, ``ntime``, ...)

Events are buffered and written in baskets of many events (one ``extend`` per
basket, built from offsets with ``ak.unflatten``: no per-event loop).

:class:`RunBook` keeps one socket loop's open runs (a server's, a ``--procs`` front
end's or the router's): the loop tells it what happens to a run's events and it
owns the files. A file is locked (``flock``) while its run is open, so two runs
that reduce to the same name (``a/out.root`` and ``b/out.root``), in one process or
in several sharing the directory, never write one file at once: the later one is
refused with a reason, except that a run with no events yet gives its file up to a
later RUN_BEGIN of the same name (a client that resent RUN_BEGIN from a new socket,
as ratpac-two's Lazy Pirate does after a timeout, or restarted).

A client that dies without RUN_END would leave its run open until the server stops:
the file unfinished (ROOT's directory is written at close), its name locked and its
writer thread alive. So a run whose client has sent nothing for ``idle_seconds``
(``--output-idle-seconds``), with none of its events in flight, is closed as if
RUN_END had come (:meth:`RunBook.close_idle`). A client that was only slow is told
so: its later PHOTONDATA is refused with the reason, and its RUN_END is acknowledged
when nothing of it was refused, since the file then holds all it sent.

Nothing slow runs on the loop: baskets are compressed and written on each file's
writer thread, and so is a run's end (its last basket and the file's close). The
writer thread then posts the run back and writes a byte to :attr:`RunBook.wake_fd`,
which the loop polls with its sockets and answers with :meth:`RunBook.collect_closed`
(the RUN_END reply). So one client's RUN_END never stalls the others' events.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import protocol as P
from .photons import HitBatch

try:
    import fcntl
except ImportError:  # not POSIX: files are not locked
    fcntl = None

log = logging.getLogger("charon.output")

SUFFIX = ".charon.ntuple.root"
FORGET_SECONDS = 86_400.0  # a closed run's stand-in (a few hundred bytes) outlives its client's silence this long
JAGGED_F32 = ("time", "wavelength", "u", "v", "w", "pol_x", "pol_y", "pol_z")
# branch types of the ``output`` tree, as uproot's mktree takes them
OUTPUT_TYPES = {"event_id": "uint32", "channel_id": "var * uint32", **{k: "var * float32" for k in JAGGED_F32},
                "flag": "var * uint32"}  # fmt: skip
# hit-table row of each float branch (see charon.photons: dx,dy,dz,polx,poly,polz,wavelength,time)
_ROW = {"u": 0, "v": 1, "w": 2, "pol_x": 3, "pol_y": 4, "pol_z": 5, "wavelength": 6, "time": 7}


class RunOutputError(ValueError):
    pass


def output_path(directory: str, requested: str) -> str:
    """``DIR/<name>.charon.ntuple.root`` for a RUN_BEGIN filename, never outside ``directory``.

    The name loses any directory part (either slash) and its ``.root``/``.ntuple`` suffixes.
    """
    if "\x00" in requested:
        raise RunOutputError("output filename contains a NUL byte")
    name = requested.replace("\\", "/").rsplit("/", 1)[-1]
    while True:
        stripped = name.removesuffix(".root").removesuffix(".ntuple")
        if stripped == name:
            break
        name = stripped
    if name in ("", ".", ".."):
        raise RunOutputError(f"output filename {requested!r} leaves no usable name")
    path = os.path.join(os.path.abspath(directory), name + SUFFIX)
    if os.path.dirname(path) != os.path.abspath(directory):  # belt and braces
        raise RunOutputError(f"output filename {requested!r} escapes the output directory")
    return path


@dataclass(eq=False)
class Run:
    """One client's open run: its file, the events not yet written, the RUN_END waiting for them."""

    name: str
    path: str
    error: str | None = None  # set when the file could not be created (or was given to a later run)
    pending: set = field(default_factory=set)  # the loop's tokens of events accepted, not yet written
    end_envelope: list | None = None  # RUN_END requester, answered once pending == 0
    lost: list = field(default_factory=list)  # event ids that failed in the engine
    written: int = 0
    writer: "RunWriter | None" = None
    last_request: float = field(default_factory=time.monotonic)  # the client's latest RUN_BEGIN or PHOTONDATA
    end_reply: list | None = None  # the RUN_END reply, once the file is closed
    closed_idle: "Run | None" = None  # set on the stand-in of a run closed by RunBook.close_idle: that run
    refused: int = 0  # on such a stand-in: the client's PHOTONDATA refused since

    @property
    def idle(self) -> bool:
        """Nothing accepted yet: its file may go to a later run of the same name."""
        return not self.pending and not self.written and not self.lost


class RunWriter:
    """One run's ROOT file. Baskets are compressed and written on a thread of the writer's own.

    Writing a basket of 1000 events costs ~30 ms (20 hits an event) to ~200 ms (200 hits) on a
    2-core machine, 85 % of it zlib, which releases the GIL: on the socket loop that would stall
    every client for as long. ``add`` only appends; a full basket goes to the thread through a
    short queue, which makes the loop wait only when the disk falls behind by more than
    ``queue_baskets`` baskets. A failed write is kept in ``error`` and later baskets are dropped
    (their events are counted in ``unwritten``), so the run can report what its file lacks.
    ``close_async`` ends the run on the thread too (the last basket, then the file's close) and
    calls ``done`` there; ``close`` waits for all of it, for a loop that is stopping.
    """

    def __init__(self, path: str, channel_position: np.ndarray, channel_type: np.ndarray, basket_events: int,
                 queue_baskets: int = 2):  # fmt: skip
        import uproot  # optional dependency: only needed with --output-dir

        self.path = path
        self.basket_events = basket_events
        self.error: str | None = None
        self.unwritten = 0  # events in baskets dropped after a failed write
        self._lock = _lock(path)
        try:
            self._file = uproot.recreate(path)
        except BaseException:
            self._lock.close()
            raise
        pos = np.asarray(channel_position, np.float32)
        self._file["detinfo"] = {
            "pmt_x": pos[:, 0].copy(),
            "pmt_y": pos[:, 1].copy(),
            "pmt_z": pos[:, 2].copy(),
            "pmt_type": np.asarray(channel_type, np.int32),
        }
        self._file.mktree("output", OUTPUT_TYPES)
        self._ids: list[int] = []
        self._hits: list[HitBatch] = []  # owned by the batch results they view, never reused
        self._baskets: queue.Queue = queue.Queue(maxsize=queue_baskets)
        self._closing = False
        self._thread = threading.Thread(target=self._write_baskets, name="charon-run-writer", daemon=True)
        self._thread.start()

    def add(self, event_id: int, hits: HitBatch) -> None:
        self._ids.append(event_id)
        self._hits.append(hits)
        if len(self._ids) >= self.basket_events:
            self.flush()

    def flush(self) -> None:
        """Hand the events added so far to the writer thread as one basket."""
        if self._ids:
            self._baskets.put((self._ids, self._hits))
            self._ids, self._hits = [], []

    def _write_baskets(self) -> None:
        while True:
            basket = self._baskets.get()
            if callable(basket):  # close_async's last item: close here, then tell the loop
                try:
                    self._close_file()
                except Exception as exc:
                    self.error = self.error or f"closing {self.path} failed: {exc}"
                    log.error("%s", self.error)
                finally:
                    basket()
                return
            ids, hits = basket
            if self.error is not None:
                self.unwritten += len(ids)
                continue
            try:
                self._file["output"].extend(_basket_arrays(ids, hits))
            except Exception as exc:  # disk full, file removed, ...: the run reports it at its end
                self.error = f"writing {self.path} failed: {exc}"
                self.unwritten += len(ids)
                log.error("%s", self.error)

    def close_async(self, done: Callable[[], None]) -> None:
        """Write what is left and close the file on the writer thread, then call ``done()`` there."""
        self._closing = True
        self.flush()
        self._baskets.put(done)

    def close(self) -> None:
        """Write what is left and close the file, waiting for it (also after ``close_async``)."""
        if not self._closing and self._thread.is_alive():
            self.close_async(lambda: None)
        self._thread.join()
        self._close_file()  # nothing left to do once the thread has closed it

    def _close_file(self) -> None:
        if self._file is None:
            return
        try:
            self._file.close()
        finally:
            self._file = None
            self._lock.close()  # releases the flock


def _basket_arrays(ids: list[int], parts: list[HitBatch]) -> dict:
    """One ``extend`` of the output tree: jagged branches built from offsets, no per-event loop."""
    import awkward as ak

    hits = HitBatch.concat_slots(parts)
    counts = np.diff(hits.offsets)
    data = {"event_id": np.asarray(ids, np.uint32), "channel_id": ak.unflatten(hits.channel, counts)}
    for name, row in _ROW.items():
        data[name] = ak.unflatten(np.ascontiguousarray(hits.table[row]), counts)
    data["flag"] = ak.unflatten(hits.flags, counts)
    return data


def _lock(path: str):
    """An open handle on ``path`` holding an exclusive flock, or RunOutputError if another run holds it.

    Opened for append, so that a refused run truncates nothing."""
    handle = open(path, "ab")
    if fcntl is not None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RunOutputError(f"{path} is being written by another open run (the same name from another "
                                 "client or process); end that run first or choose another name") from None
    return handle


class RunBook:
    """The open runs of one socket loop, keyed by the identity of the client socket that began each.

    ``reply(envelope, frames)`` sends on the loop's socket. ``channels()`` gives the
    detector's channel positions [C, 3] float32 (mm) and types [C] int32 for the
    ``detinfo`` tree, or raises RunOutputError when they are not known (yet).
    Tokens are whatever the loop uses to tell its in-flight events apart. The loop polls
    :attr:`wake_fd` (readable when a run's file has been closed on its writer thread) and
    then calls :meth:`collect_closed`, which sends those runs' RUN_END replies.
    """

    def __init__(self, directory: str, basket_events: int, reply: Callable, channels: Callable,
                 idle_seconds: float = 0.0, on_close_idle: Callable[[], None] = lambda: None):  # fmt: skip
        self.directory = directory
        self.basket_events = basket_events
        self.idle_seconds = idle_seconds  # close a run whose client is silent this long (0: never)
        self._on_close_idle = on_close_idle  # counts each such close (the loop's metric)
        self._next_idle_check = 0.0
        self._reply = reply
        self._channels = channels
        self.runs: dict[bytes, Run] = {}  # open run of each client identity
        self.closing: list[Run] = []  # ended runs not yet answered: waiting for events, or for their file's close
        self._closed: queue.SimpleQueue = queue.SimpleQueue()  # runs whose writer thread has closed the file
        self.wake_fd, self._wake_w = os.pipe()  # a byte per closed run; the loop polls the read end
        os.set_blocking(self.wake_fd, False)

    def run_of(self, envelope) -> Run | None:
        """The run of a PHOTONDATA's client, noting the request (see :meth:`close_idle`). A run whose
        ``error`` is set refuses the event; the caller sends the refusal."""
        run = self.runs.get(bytes(envelope[0]))
        if run is not None:
            run.last_request = time.monotonic()
            if run.closed_idle is not None:
                run.refused += 1
        return run

    def close_idle(self, now: float | None = None) -> None:
        """Close the runs whose client has sent nothing for ``idle_seconds`` and has no event in flight.

        Called on every turn of the loop; it looks at most a few times a second. A closed run leaves a
        stand-in that refuses the client's later PHOTONDATA with the reason (were it forgotten, they would be
        served synchronously, which a client in a run does not expect); it is forgotten after
        ``FORGET_SECONDS`` of silence, as is a run whose file could not be created."""
        if self.idle_seconds <= 0:
            return
        now = time.monotonic() if now is None else now
        if now < self._next_idle_check:
            return
        self._next_idle_check = now + min(1.0, self.idle_seconds / 4)
        for identity, run in list(self.runs.items()):
            silent = now - run.last_request
            if run.pending or silent < self.idle_seconds:
                continue
            if run.writer is None:  # a stand-in, or a run without a file: nothing to close
                if silent >= max(self.idle_seconds, FORGET_SECONDS):
                    del self.runs[identity]
                continue
            log.warning("run %s: no request from its client for %.0f s: closing %s with %d events as if RUN_END "
                        "had come (--output-idle-seconds)", run.name, now - run.last_request, run.path,
                        run.written)  # fmt: skip
            self.runs[identity] = Run(
                name=run.name, path=run.path, written=run.written, last_request=now, closed_idle=run,
                error=f"run {run.name!r} was closed after {self.idle_seconds:g} s without a request from its "
                f"client (--output-idle-seconds); {run.path} holds the {run.written} events sent before; "
                "send RUN_BEGIN to start a new run")  # fmt: skip
            run.end_envelope = []
            self._end_or_wait(run)
            self._on_close_idle()

    def begin(self, envelope, filename: bytes) -> None:
        """RUN_BEGIN: always acknowledged; a file that cannot be created fails the run's events instead."""
        identity = bytes(envelope[0])
        previous = self.runs.pop(identity, None)
        if previous is not None and previous.closed_idle is None:  # a second RUN_BEGIN ends the first, unanswered
            previous.end_envelope = []
            self._end_or_wait(previous)
        name = filename.decode("utf-8", "replace")
        run = Run(name=name, path="")
        try:
            run.path = output_path(self.directory, name)
            position, kind = self._channels()
            self._take_over_idle(run.path, name)
            run.writer = RunWriter(run.path, position, kind, self.basket_events)
            log.info("run %s: writing %s", name, run.path)
        except Exception as exc:  # reported on this run's PHOTONDATA and RUN_END
            run.error = f"cannot create the output file for {name!r}: {exc}"
            log.warning("run %s: %s", name, run.error)
        self.runs[identity] = run
        self._reply(envelope, [P.ACK])

    def _take_over_idle(self, path: str, name: str) -> None:
        for holder in self.runs.values():
            if holder.path == path and holder.writer is not None and holder.idle:
                holder.writer.close()
                holder.writer = None
                holder.error = f"its file was given to a later RUN_BEGIN for {name!r} before any event arrived"
                log.info("run %s: an idle run's file given to a later RUN_BEGIN of the same name", name)

    def accepted(self, run: Run, token) -> None:
        run.pending.add(token)

    def write_now(self, run: Run, event_id: int, hits: HitBatch) -> None:
        """An event that needs no simulation (no photons)."""
        run.writer.add(event_id, hits)
        run.written += 1

    def finished(self, run: Run, token, event_id: int, hits: HitBatch | None, error: str | None = None) -> None:
        """An accepted event is done: its hits are written, or it is counted lost."""
        run.pending.discard(token)
        if error is not None or hits is None:
            run.lost.append(event_id)
            log.warning("run %s: event %d lost: %s", run.name, event_id, error)
        elif run.writer is not None:
            run.writer.add(event_id, hits)
            run.written += 1
        if not run.pending and run.end_envelope is not None:
            self._close(run)

    def end(self, envelope) -> str | None:
        """RUN_END: acknowledged once the run's events are written; else the reason to fail it with."""
        run = self.runs.pop(bytes(envelope[0]), None)
        if run is None:
            waiting = [r for r in self.closing if r.end_envelope]
            if len(waiting) == 1:  # a Lazy-Pirate resend of the RUN_END we are still completing
                waiting[0].end_envelope = envelope
                return None
            return "RUN_END without an open run: no RUN_BEGIN from this client"
        if run.closed_idle is not None and not run.refused:  # a slow client, not a dead one: it lost nothing
            closed = run.closed_idle
            if closed in self.closing:
                closed.end_envelope = envelope  # answered once its file is closed
            else:
                self._reply(envelope, closed.end_reply)
            return None
        if run.error is not None:
            return run.error
        run.end_envelope = envelope
        self._end_or_wait(run)
        return None

    def _end_or_wait(self, run: Run) -> None:
        self.closing.append(run)
        if not run.pending:
            self._close(run)

    def _close(self, run: Run) -> None:
        """The run's events are all in: its file is finished on the writer thread, and answered when closed."""
        if run.writer is None:
            self._answer(run)
            return

        def done():  # on the writer thread
            self._closed.put(run)
            os.write(self._wake_w, b"\0")

        run.writer.close_async(done)

    def collect_closed(self) -> None:
        """Answer the runs whose files were closed (call when :attr:`wake_fd` is readable)."""
        try:
            while os.read(self.wake_fd, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                run = self._closed.get_nowait()
            except queue.Empty:
                return
            run.writer.close()  # the thread has returned: this only joins it
            self._answer(run)

    def _answer(self, run: Run) -> None:
        if run in self.closing:
            self.closing.remove(run)
        failed = None
        if run.writer is not None:
            if run.writer.error is not None:
                failed = f"{run.writer.error}; {run.writer.unwritten} of {run.written} events are not in the file"
                run.written -= run.writer.unwritten
        log.info("run %s: %d events written to %s%s", run.name, run.written, run.path,
                 f", {len(run.lost)} lost: {run.lost[:20]}" if run.lost else "")  # fmt: skip
        run.end_reply = [P.ACK] if failed is None else P.encode_failed(P.UNKNOWN_EVENT, failed)
        if run.end_envelope:
            self._reply(run.end_envelope, run.end_reply)

    def close_all(self, unwritten: Callable[[Run], list] = lambda run: []) -> None:
        """Loop stop: keep what was written readable and say which events were lost
        (``unwritten(run)``: the event ids of its tokens still pending)."""
        for run in list(self.closing):  # ended: wait for their files, then say so as usual
            if run.writer is not None and not run.pending:
                run.writer.close()
                self._answer(run)
        for run in list(self.runs.values()) + list(self.closing):
            if run.writer is None:
                continue
            run.writer.close()
            log.warning("run %s: stopping with the run open: %d events written to %s; lost (not simulated "
                        "or not written): %s%s", run.name, run.written - run.writer.unwritten, run.path,
                        sorted(unwritten(run)) + run.lost,
                        f"; {run.writer.error}" if run.writer.error else "")  # fmt: skip
        self.runs.clear()
        self.closing.clear()
        if self._wake_w >= 0:
            os.close(self.wake_fd)
            os.close(self._wake_w)
            self.wake_fd = self._wake_w = -1
