"""The engine thread: runs batches off the socket loop, so that the loop never blocks.

One batch at a time, or with the CUDA engine's ``--engine-lanes L`` up to L at
once, each on its own stream, finished in launch order.

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
    times: object  # the engine's StageTimes of this call (a snapshot)


class EngineThread:
    """Runs the engine in this process. The server polls :attr:`wake_socket` and then
    takes :attr:`results`; :class:`charon.engine_service.ServiceLink` offers the same
    interface for an engine shared by several processes."""

    remote = False  # engine metrics are recorded by the server itself
    pipelined = False  # a second batch is queued behind the running one only when full
    # While a batch runs and a lane is free, the thread waits for a new batch and looks at the GPU in
    # between: first after lane_poll seconds, then after 1/lane_poll_share of the batch's time so far.
    # A finished batch is noticed at most that late (~6 % of its time), and a long batch costs tens of
    # wake-ups, not one per lane_poll, each taking the GIL from the socket loop. (On the H100 a saturated
    # process with 2 lanes served 0-11 % fewer events than with 1, by host, with either way of waking;
    # benchmarks/RESULTS.md, sixteenth session.)
    lane_poll = 50e-6
    lane_poll_share = 16

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
        # Batches the engine runs at once: the CUDA engine's lanes (--engine-lanes), each with its own
        # stream, else 1. Set once the engine exists (start()); one more, full, may wait behind them.
        self.lanes = 1
        self.max_in_flight = 2
        self.last_submitted = 0  # photons of the latest batch submitted (main thread only)
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
        self.last_submitted = batch.photons.n_photons
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
        return host_buffer(self.engine)

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
        if hasattr(self.engine, "launch"):
            self.lanes = max(1, len(getattr(self.engine, "lanes", ())))
        self.max_in_flight = self.lanes + 1
        self._ready.set()
        try:
            if self.lanes > 1:
                self._run_lanes(notify)
            else:
                while (batch := self._inbox.get()) is not None:
                    self.busy.start()
                    t0 = time.perf_counter()
                    parts = self._run_bisect(batch.slots, batch)
                    dt = time.perf_counter() - t0
                    self.busy.stop()
                    self.results.append(BatchResult(batch, parts, dt, self.engine.last_times.snapshot()))
                    notify.send(b"")
        finally:
            try:
                self.engine.close()
            finally:
                notify.close(0)

    def _run_lanes(self, notify) -> None:
        """Several batches on the GPU at once, one per lane, finished in launch order.

        A batch submitted while another runs is launched at once on a free lane
        (the server submits it only when it is as large as the one ahead:
        server.py), instead of waiting for the running one to finish."""
        running: collections.deque = collections.deque()  # (batch, launch handle, t0), in launch order
        stopping = False
        while running or not stopping:
            while not stopping and len(running) < self.lanes:
                if running:  # look for a batch for a while, then at the GPU again
                    timeout = max(self.lane_poll, (time.perf_counter() - running[0][2]) / self.lane_poll_share)
                else:  # nothing on the GPU: sleep until a batch comes
                    timeout = None
                try:
                    batch = self._inbox.get(timeout=timeout)
                except queue.Empty:
                    break
                if batch is None:
                    stopping = True
                    break
                if not running:
                    self.busy.start()
                t0 = time.perf_counter()
                running.append((batch, launch(self.engine, batch), t0))
            if not running:
                continue
            batch, handle, t0 = running[0]
            if handle is not None and len(running) < self.lanes and not stopping and not self.engine.ready(handle):
                continue  # a lane is free: keep listening for a batch while this one runs
            running.popleft()
            parts = finish(self.engine, batch, handle)
            if not running:
                self.busy.stop()
            self.results.append(BatchResult(batch, parts, time.perf_counter() - t0, self.engine.last_times.snapshot()))
            notify.send(b"")

    def _run_bisect(self, slots, batch: Batch | None) -> list[SlotsResult]:
        return run_bisect(self.engine, slots, batch)

    def due_ms(self) -> float | None:
        """The socket loop need not look at the engine on its own: a result wakes it (:attr:`wake_socket`)."""
        return None


def host_buffer(engine) -> HostBuffer:
    """A batch buffer in the engine's host memory (pinned, for the CUDA engine) where it offers some."""
    alloc = getattr(engine, "host_alloc", None)
    return HostBuffer(alloc) if alloc else HostBuffer()


def launch(engine, batch: Batch):
    """Launch a batch on a free lane of an asynchronous engine; None when the launch failed (:func:`finish`
    then runs it through the bisecting path, which reports per event)."""
    try:
        return engine.launch(batch.photons)
    except Exception as exc:
        log.warning("engine launch failed on %d event(s): %r", len(batch.slots), exc)
        return None


def finish(engine, batch: Batch, handle) -> list[SlotsResult]:
    """A launched batch's results (waits for the GPU); where its launch (``handle`` None) or finish failed,
    the batch's events run again, bisected until the failing ones are isolated."""
    if handle is not None:
        try:
            return [SlotsResult(batch.slots, engine.finish(handle), None)]
        except Exception as exc:
            log.warning("engine error on %d event(s): %r", len(batch.slots), exc)
    return run_bisect(engine, batch.slots, None)


def run_bisect(engine, slots, batch: Batch | None) -> list[SlotsResult]:
    """Run a batch; on an engine error, split it in halves until the failing events are isolated."""
    if batch is None:  # a half: rebuild from the requests (the failed call may have overwritten the buffer)
        batch = assemble(slots, HostBuffer(), sum(s.count for s in slots))
    try:
        return [SlotsResult(slots, engine.propagate(batch.photons), None)]
    except Exception as exc:
        log.warning("engine error on %d event(s): %r", len(slots), exc)
        if len(slots) == 1:
            return [SlotsResult(slots, None, f"engine error: {exc!r}")]
        h = len(slots) // 2
        return run_bisect(engine, slots[:h], None) + run_bisect(engine, slots[h:], None)
