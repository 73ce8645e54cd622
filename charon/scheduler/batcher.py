"""The batcher: coalesce queued events into one batch, splitting an event that does not fit.

A batch is a list of slots ``(request, first_photon, count)``; its photons are
copied into one host buffer, contiguous per slot, so the engine sees a single
``[11, n]`` table and the demultiplexer gets per-slot offsets for free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..photons import N_ROWS, PhotonBatch
from .queue import RequestQueue
from .request import EventRequest


@dataclass
class Slot:
    request: EventRequest
    start: int  # index within the event of the first photon in this slot
    count: int


@dataclass
class Batch:
    slots: list[Slot]
    photons: PhotonBatch
    buffer: "HostBuffer"
    dispatched: float = 0.0  # time.monotonic() when handed to the engine (latency metrics)


class HostBuffer:
    """Grow-only host storage for one batch; engines may supply pinned memory via ``alloc``."""

    def __init__(self, alloc=np.empty):
        self._alloc = alloc
        self.capacity = 0
        self.table = np.empty(0, np.float32)  # [N_ROWS * capacity] float32, viewed as [N_ROWS, n]
        self.flags = np.empty(0, np.uint32)  # [capacity]
        self.slot = np.empty(0, np.int32)  # [capacity]

    def reserve(self, n: int, limit: int) -> None:
        if n <= self.capacity:
            return
        cap = min(max(n, 2 * self.capacity, 1024), max(limit, n))
        self.table = self._alloc(N_ROWS * cap, np.float32)
        self.flags = self._alloc(cap, np.uint32)
        self.slot = self._alloc(cap, np.int32)
        self.capacity = cap


class Batcher:
    def __init__(self, queue: RequestQueue, max_batch_photons: int, max_batch_events: int = 0):
        self.queue = queue
        self.max_batch_photons = int(max_batch_photons)
        self.max_batch_events = int(max_batch_events)  # 0: no limit; 1: ChAR0N-style one event per call
        self.queued_photons = 0  # photons waiting (not yet dispatched)

    def add(self, req: EventRequest) -> None:
        self.queue.push(req)
        self.queued_photons += req.n

    def take(self) -> list[Slot]:
        """Choose the slots of the next batch (FCFS order from the queue policy)."""
        slots, total = [], 0
        while total < self.max_batch_photons:
            if self.max_batch_events and len(slots) >= self.max_batch_events:
                break
            req = self.queue.peek()
            if req is None:
                break
            take = min(req.n - req.dispatched, self.max_batch_photons - total)
            slots.append(Slot(req, req.dispatched, take))
            req.dispatched += take
            total += take
            if req.dispatched == req.n:
                self.queue.pop()
        self.queued_photons -= total
        return slots

    def assemble(self, slots: list[Slot], buf: HostBuffer) -> Batch:
        return assemble(slots, buf, self.max_batch_photons)


def assemble(slots: list[Slot], buf: HostBuffer, limit: int) -> Batch:
    """Copy the slots' photons into ``buf``: one row copy per slot and frame, no per-photon loop."""
    counts = np.fromiter((s.count for s in slots), np.int64, len(slots))
    offsets = np.zeros(len(slots) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    n = int(offsets[-1])
    buf.reserve(n, limit)
    table = buf.table[: N_ROWS * n].reshape(N_ROWS, n)
    flags = buf.flags[:n]
    for s, a, b in zip(slots, offsets[:-1].tolist(), offsets[1:].tolist()):
        req = s.request
        rows = req.rows
        if s.count != req.n:  # a piece of a split event
            rows = [row[s.start : s.start + s.count] for row in rows]
        for r in range(N_ROWS):
            table[r, a:b] = rows[r]
        if req.flags is None:
            flags[a:b] = 0
        else:
            flags[a:b] = req.flags[s.start : s.start + s.count]
    slot = buf.slot[:n]
    slot[:] = np.repeat(np.arange(len(slots), dtype=np.int32), counts)
    photons = PhotonBatch(
        table=table,
        flags=flags,
        slot=slot,
        offsets=offsets,
        event_id=np.fromiter((s.request.event_id for s in slots), np.uint32, len(slots)),
        first_index=np.fromiter((s.start for s in slots), np.uint32, len(slots)),
    )
    return Batch(slots, photons, buf)
