"""The engine driven by the socket loop itself (``--engine-driver loop``, and ``auto``'s choice for one plain
process's CUDA engine): no engine thread, no hand-off.

With the engine thread (engine_thread.py) every batch crosses two threads twice:
the loop wakes the engine thread to launch it, the engine thread wakes the loop
with its results. On the H100 hosts those two wake-ups and the GIL between them
took ~0.15-0.19 ms of a light-load event at the median, with any engine, even
one that does nothing (benchmarks/RESULTS.md, twenty-fifth session, call 2).

Here the loop calls the CUDA engine's asynchronous interface (``launch``,
``ready``, ``finish``) directly: it launches a batch when it dispatches it, and
checks ``ready`` on each of its turns. So that it notices a finished batch at
once without a thread to wake it, it sleeps in ``poll`` only until
:attr:`LoopEngine.spin_share` of a batch's usual device time has passed, then
turns with a zero timeout until the batch is done (:meth:`LoopEngine.due_ms`):
it spends a CPU core while the GPU finishes a batch, which is what buys the
latency. Same results, same error handling (an engine error bisects the batch
to the events that cause it), same metrics as the engine thread.
"""

from __future__ import annotations

import collections
import time

from .engine_thread import BatchResult, finish, host_buffer, launch
from .metrics import BusyClock
from .scheduler.batcher import Batch, HostBuffer


class LoopEngine:
    """The engine, run from the socket loop; the interface :class:`~charon.engine_thread.EngineThread` offers
    the server, with :attr:`wake_socket` None: the loop calls :meth:`poll_results` on every turn and never
    sleeps past :meth:`due_ms`."""

    remote = False  # engine metrics are recorded by the server itself
    pipelined = False  # as the engine thread: a batch waits behind the running ones only when full
    wake_socket = None  # nothing wakes the loop: it looks at the GPU itself
    # Sleep in poll until this share of a batch's usual device time has passed, then turn without sleeping.
    # Why not 0 (turn from the launch on): on the H100 host both gave the same latency (benchmarks/RESULTS.md,
    # twenty-sixth session, call 1), and this spends ~a fifth of the CPU time.
    spin_share = 0.8
    # Weight of the latest batch in the usual device time (an exponential mean): the last ~20 batches count.
    mean_weight = 0.05

    def __init__(self, engine_factory, busy: BusyClock):
        self._factory = engine_factory
        self.busy = busy
        self.engine = None
        self.results: collections.deque[BatchResult] = collections.deque()
        self.in_flight = 0  # batches submitted and not yet collected
        self.lanes = 1
        self.max_in_flight = 2
        self.last_submitted = 0  # photons of the latest batch submitted
        self._running: collections.deque = collections.deque()  # (batch, launch handle or None, t0), launch order
        self._waiting: collections.deque[Batch] = collections.deque()  # submitted while every lane ran a batch
        self._device_s = 0.0  # usual device time of a batch, seconds (CUDA events; 0 until the first)

    def start(self, timeout: float | None = None):
        engine = self._factory()
        try:
            if not all(hasattr(engine, m) for m in ("launch", "ready", "finish")):
                raise ValueError(f"--engine-driver loop needs an engine with asynchronous calls (launch, ready, "
                                 f"finish: --engine cuda); {engine.name!r} has none: use --engine-driver thread")
            engine.warm_up()
        except BaseException:
            engine.close()
            raise
        self.engine = engine
        self.lanes = max(1, len(getattr(engine, "lanes", ())))
        self.max_in_flight = self.lanes + 1  # one more, full, is assembled while every lane runs
        return engine

    def host_buffer(self) -> HostBuffer:
        return host_buffer(self.engine)

    def submit(self, batch: Batch) -> None:
        self.in_flight += 1
        self.last_submitted = batch.photons.n_photons
        if len(self._running) < self.lanes:
            self._launch(batch)
        else:
            self._waiting.append(batch)

    def _launch(self, batch: Batch) -> None:
        if not self._running:
            self.busy.start()
        t0 = time.perf_counter()
        self._running.append((batch, launch(self.engine, batch), t0))

    def due_ms(self) -> float | None:
        """Milliseconds until the loop should look at the oldest running batch (0: at every turn), None when
        nothing runs."""
        if not self._running:
            return None
        t0 = self._running[0][2]
        return max(0.0, (t0 + self.spin_share * self._device_s - time.perf_counter()) * 1e3)

    def poll_results(self) -> None:
        """Finish the batches whose GPU work is done, in launch order, into :attr:`results`; a batch waiting
        for a lane is launched on the one freed."""
        while self._running:
            batch, handle, t0 = self._running[0]
            if handle is not None and not self.engine.ready(handle):
                return
            self._running.popleft()
            self._finish(batch, handle, t0)

    def _finish(self, batch: Batch, handle, t0: float) -> None:
        parts = finish(self.engine, batch, handle)
        dt = time.perf_counter() - t0
        times = self.engine.last_times.snapshot()
        if handle is not None and times.total > 0:
            w = self.mean_weight if self._device_s else 1.0
            self._device_s += w * (times.total - self._device_s)
        if self._waiting:  # the lane is free: keep the GPU fed before the results are demultiplexed
            self._launch(self._waiting.popleft())
        if not self._running:
            self.busy.stop()
        self.results.append(BatchResult(batch, parts, dt, times))

    def stop(self, timeout: float = 30.0) -> None:
        """Finish every batch submitted (their results stay in :attr:`results` for the server), then close
        the engine, as the engine thread does when it stops."""
        try:
            while self._running:
                batch, handle, t0 = self._running.popleft()
                self._finish(batch, handle, t0)  # finish waits for the GPU
        finally:
            self.engine.close()
