"""The engine thread: runs batches one at a time so the socket loop never blocks.

A thread, not a process: the engines release the GIL (numba ``nogil`` on the
CPU, asynchronous CUDA calls on the GPU), so a thread overlaps fully with the
socket loop while sharing the batch buffers without copies or pickling. The
CUDA context is created in this thread, which owns it for its lifetime.
Results are handed back through a deque plus a one-byte wake-up on an inproc
ZeroMQ socket, so the loop sleeps in a single ``poll``.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass

import zmq

from .metrics import BusyClock
from .photons import HitBatch
from .scheduler.batcher import Batch, HostBuffer, Slot, assemble
from .threads import set_native_thread_name

log = logging.getLogger("charon.engine")


@dataclass
class SlotsResult:
    slots: list[Slot]
    hits: HitBatch | None  # grouped by slot; None when these slots failed
    error: str | None


@dataclass
class BatchResult:
    batch: Batch
    parts: list[SlotsResult]  # one part unless the batch had to be bisected
    engine_seconds: float
    times: object  # the engine's StageTimes of the last call


class EngineThread:
    """Runs the engine in this process. The server polls :attr:`wake_socket` and then
    takes :attr:`results`; :class:`charon.engine_service.ServiceLink` offers the same
    interface for an engine shared by several processes."""

    remote = False  # engine metrics are recorded by the server itself
    pipelined = False  # a second batch is queued behind the running one only when full
    max_in_flight = 2

    def __init__(self, ctx: zmq.Context, engine_factory, busy: BusyClock):
        self._factory = engine_factory
        self._ctx = ctx
        self._notify_address = f"inproc://charon-engine-{id(self)}"
        self.wake_socket = ctx.socket(zmq.PULL)
        self.wake_socket.bind(self._notify_address)
        self._inbox: queue.Queue = queue.Queue()
        self.results: collections.deque[BatchResult] = collections.deque()
        self.busy = busy
        self.engine = None
        self.in_flight = 0  # batches submitted and not yet collected (main thread only)
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="charon-engine", daemon=True)

    def start(self, timeout: float | None = None):
        self._thread.start()
        self._ready.wait(timeout)
        if self._startup_error is not None:
            raise self._startup_error
        return self.engine

    def submit(self, batch: Batch) -> None:
        self.in_flight += 1
        self._inbox.put(batch)

    def poll_results(self) -> None:
        """Consume the wake-ups; the results are already in :attr:`results`."""
        while self.wake_socket.poll(0):
            self.wake_socket.recv()

    def stop(self, timeout: float = 30.0) -> None:
        self._inbox.put(None)
        self._thread.join(timeout)
        self.wake_socket.close(0)

    def host_buffer(self) -> HostBuffer:
        alloc = getattr(self.engine, "host_alloc", None)
        return HostBuffer(alloc) if alloc else HostBuffer()

    # ------------------------------------------------------------- thread
    def _run(self):
        set_native_thread_name("charon-engine")
        notify = self._ctx.socket(zmq.PUSH)
        notify.connect(self._notify_address)
        try:
            self.engine = self._factory()
            self.engine.warm_up()
        except BaseException as exc:  # reported to the starting thread
            self._startup_error = exc
            self._ready.set()
            notify.close(0)
            return
        self._ready.set()
        try:
            while (batch := self._inbox.get()) is not None:
                self.busy.start()
                t0 = time.perf_counter()
                parts = self._run_bisect(batch.slots, batch)
                dt = time.perf_counter() - t0
                self.busy.stop()
                self.results.append(BatchResult(batch, parts, dt, self.engine.last_times))
                notify.send(b"")
        finally:
            try:
                self.engine.close()
            finally:
                notify.close(0)

    def _run_bisect(self, slots, batch: Batch | None) -> list[SlotsResult]:
        """Run a batch; on an engine error, split it in halves until the failing events are isolated."""
        if batch is None:  # a half: rebuild from the requests (the failed call may have overwritten the buffer)
            batch = assemble(slots, HostBuffer(), sum(s.count for s in slots))
        try:
            return [SlotsResult(slots, self.engine.propagate(batch.photons), None)]
        except Exception as exc:
            log.warning("engine error on %d event(s): %r", len(slots), exc)
            if len(slots) == 1:
                return [SlotsResult(slots, None, f"engine error: {exc!r}")]
            h = len(slots) // 2
            return self._run_bisect(slots[:h], None) + self._run_bisect(slots[h:], None)
