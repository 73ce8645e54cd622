"""The batcher: coalesce queued events into one batch, splitting an event that does not fit.

A batch is a list of slots ``(request, first_photon, count)``; its photons are
copied into one host buffer, contiguous per slot, so the engine sees a single
``[11, n]`` table and the demultiplexer gets per-slot offsets for free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from charon.photons import N_ROWS, PhotonBatch, split_rows
from charon.scheduler.queue import RequestQueue
from charon.scheduler.request import EventRequest


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


def buffer_words(cap: int) -> int:
    """4-byte words of a batch buffer for ``cap`` photons (see :class:`HostBuffer`)."""
    return (N_ROWS + 2) * cap


def batch_rows(words: np.ndarray, n: int) -> np.ndarray:
    """The ``[N_ROWS + 1, n]`` float32 rows of a batch of ``n`` photons at the start of a buffer's words."""
    return words[: (N_ROWS + 1) * n].reshape(N_ROWS + 1, n)


class HostBuffer:
    """Grow-only host storage for one batch; engines may supply pinned memory via ``alloc``.

    One block of ``(N_ROWS + 2) * capacity`` 4-byte words. A batch of n photons is
    laid out from word 0 as ``[N_ROWS + 1, n]``: the table's rows, then the flags'
    bits as one more row (:func:`batch_rows`), so that an engine copies table and
    flags to the device as one block (``PhotonBatch.rows``: one copy per batch,
    or per front-end batch in the shared engine, instead of two). The slot numbers
    follow at word ``(N_ROWS + 1) * capacity``. A front end's shared-memory segment
    (handoff.py) is such a buffer, which the shared engine reads back from n alone."""

    def __init__(self, alloc=np.empty):
        self._alloc = alloc
        self.capacity = 0
        self.words = np.empty(0, np.float32)  # [(N_ROWS + 2) * capacity] float32 (flags and slots as bits)

    def reserve(self, n: int, limit: int) -> None:
        if n <= self.capacity:
            return
        cap = min(max(n, 2 * self.capacity, 1024), max(limit, n))
        self.words = self._alloc(buffer_words(cap), np.float32)
        self.capacity = cap

    def rows(self, n: int) -> np.ndarray:
        """[N_ROWS + 1, n] float32: the table of a batch of n photons, then its flags' bits."""
        return batch_rows(self.words, n)

    def slot(self, n: int) -> np.ndarray:
        """[n] int32: the slot numbers' region (after the rows of a full buffer)."""
        at = (N_ROWS + 1) * self.capacity
        return self.words[at : at + n].view(np.int32)


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


_zeros = np.zeros(1 << 16, np.uint32)  # the flags of requests that carry none (dialect A); grown, never written
_zeros.flags.writeable = False


def _no_flags(k: int) -> np.ndarray:
    global _zeros
    if k > len(_zeros):
        _zeros = np.zeros(max(k, 2 * len(_zeros)), np.uint32)
        _zeros.flags.writeable = False
    return _zeros[:k]


def assemble(slots: list[Slot], buf: HostBuffer, limit: int) -> Batch:
    """Copy the slots' photons into ``buf``: one concatenation per row over all slots.

    Not one copy per slot and row: at 1000-photon events numpy's per-call overhead
    (~1 us) was most of the cost, twelve calls per event; now it is twelve per batch."""
    counts = np.fromiter((s.count for s in slots), np.int64, len(slots))
    offsets = np.zeros(len(slots) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    n = int(offsets[-1])
    buf.reserve(n, limit)
    rows_block = buf.rows(n)  # [N_ROWS + 1, n]: the table, then the flags' bits
    table, flags = split_rows(rows_block)
    columns, flag_parts = [], []  # per slot: its N_ROWS row arrays (views of the request's frames), its flags
    for s in slots:
        req = s.request
        if s.count == req.n:
            columns.append(req.rows)
            f = req.flags
        else:  # a piece of a split event
            a, b = s.start, s.start + s.count
            columns.append([row[a:b] for row in req.rows])
            f = None if req.flags is None else req.flags[a:b]
        flag_parts.append(_no_flags(s.count) if f is None else f)
    if slots:
        for r, parts in enumerate(zip(*columns)):
            np.concatenate(parts, out=table[r])
        np.concatenate(flag_parts, out=flags)
    slot = buf.slot(n)
    slot[:] = np.repeat(np.arange(len(slots), dtype=np.int32), counts)
    photons = PhotonBatch(
        table=table,
        flags=flags,
        slot=slot,
        offsets=offsets,
        event_id=np.fromiter((s.request.event_id for s in slots), np.uint32, len(slots)),
        first_index=np.fromiter((s.start for s in slots), np.uint32, len(slots)),
        rows=rows_block,
    )
    return Batch(slots, photons, buf)
