"""The shared engine: one engine (one CUDA context) propagating the batches of several front-end processes.

Why it exists: one Python socket loop tops out near 15k events/s (receiving,
decoding, batching and replying cost tens of microseconds per event), far below
what one GPU propagates. ``charon-batch --procs N`` therefore runs N front-end
processes, each the ordinary server loop (socket -> decode -> queue -> batch ->
demux -> reply), and this service in the launcher process, holding the only
engine. A front end hands every batch it forms to the service at once; the
batches that arrive while the engine runs make up its next merged batch, so the
engine sees one stream of large batches however many front ends feed it:
continuous batching across processes. With ``--handoff shm`` (handoff.py) a
front end's photons stay in its shared-memory segment and the CUDA engine copies
them to the device from there (``PhotonBatch.pieces``); photons that came over the
socket, or any photons for an engine that does not gather, are copied into the
merge buffer (pinned memory on a GPU).
Processes sharing a GPU through separate CUDA contexts would instead time-slice
it and each form smaller batches.

Wire layout (internal; a DEALER in each front end, the ROUTER here; ipc on one host)::

    front end -> service
      HELLO [, probe]                        answered ENGINE, name (utf-8) [, mode, reason]
          probe        utf-8 name of a small shared-memory segment (handoff.py): the service
                       answers mode b"shm" when it could map it, else b"socket" and the reason
      BATCH, head, table, flags, offsets, event_id, first_index     photons in the message
          head         <QIQ: batch id (u64, the front end's own), n_events E (u32), n_photons n (u64)
          table        [11 * n] float32, rows as PhotonBatch.table (x, y, z mm ... t ns)
          flags        [n] uint32
          offsets      [E + 1] int64, photons of slot s are offsets[s]:offsets[s + 1]
          event_id     [E] uint32
          first_index  [E] uint32
      BATCHSHM, body, segment                photons in shared memory
          body         <QIQQ4x head (32 bytes): batch id, E, n, cap (photons the segment is laid
                       out for); then offsets [E + 1] int64, event_id [E] uint32, first_index [E]
                       uint32, so exactly 32 + 16 * E + 8 bytes
          segment      utf-8 name of the front end's segment; the batch starts at its byte 0
                       (table [11, n] float32, then flags [n] uint32: handoff.py)
      RELEASE, segment                       the front end retired that segment: unmap it once unused
    service -> front end
      HITS, body [, failed, error]
          body         <QIQd4x head (32 bytes): batch id, E, n_hits H, engine seconds of the merged
                       call; then offsets [E + 1] int64 (hits of slot s are offsets[s]:offsets[s + 1]),
                       channel [H] uint32, flags [H] uint32, table [8 * H] float32 (rows as
                       HitBatch.table), so exactly 32 + 8 * (E + 1) + 40 * H bytes
          failed       [E] uint8, 1 where the engine failed on that slot (its hits are empty);
                       with error (utf-8, the engine's error), sent only when some slot failed
      REFUSED, head (<Q batch id), reason (utf-8): a malformed BATCH, answered instead of crashing

The per-batch arrays of BATCHSHM and HITS travel in one frame behind their head: every
batch crosses the engine's single thread, where each frame costs a receive or a send
call (a few microseconds each on the GPU hosts). The heads are padded to 32 bytes so
that the int64 offsets after them keep their alignment.

Every frame's length is checked against its head before ``np.frombuffer``; a
segment's name, size and the batch's extent in it are checked before it is
mapped or viewed.
An engine error on a merged batch is isolated here, first per front-end batch
and then by bisecting its slots, so only the failing events are reported failed.
"""

from __future__ import annotations

import collections
import logging
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import zmq

from .cpus import pin
from .engine_thread import BatchResult, SlotsResult
from .engines.base import EngineError, StageTimes
from .handoff import Segment, SharedHostBuffer, available as shm_available, words
from .metrics import BusyClock, Metrics
from .photons import N_ROWS, HitBatch, PhotonBatch, Piece, empty_hits, split_rows
from .scheduler.batcher import HostBuffer, batch_rows
from .sockets import recv_message, send_message
from .threads import set_native_thread_name

log = logging.getLogger("charon.engine_service")

HELLO, ENGINE, BATCH, HITS, REFUSED = b"HELLO", b"ENGINE", b"BATCH", b"HITS", b"REFUSED"
BATCH_SHM, RELEASE = b"BATCHSHM", b"RELEASE"
MAX_SEGMENTS_PER_PEER = 64  # a front end keeps max_in_flight buffers; grown ones are released
_BATCH_HEAD = struct.Struct("<QIQ")
_SHM_HEAD = struct.Struct("<QIQQ4x")  # 32 bytes, then the batch's per-event arrays
_HITS_HEAD = struct.Struct("<QIQd4x")  # 32 bytes, then the hits
_ID = struct.Struct("<Q")


# ------------------------------------------------------------------ codec
_ITEMSIZE = {np.float32: 4, np.uint32: 4, np.int64: 8, np.uint8: 1}  # np.dtype(t).itemsize without the lookup


def _buffer(frame) -> memoryview:
    return frame.buffer if isinstance(frame, zmq.Frame) else memoryview(frame)


def _array(frame, dtype, count: int, name: str) -> np.ndarray:
    buf = _buffer(frame)
    want = count * _ITEMSIZE[dtype]
    if buf.nbytes != want:
        raise ValueError(f"{name} frame has {buf.nbytes} bytes, expected {want}")
    return np.frombuffer(buf, dtype)


def encode_batch(batch_id: int, photons: PhotonBatch) -> list:
    n, E = photons.n_photons, photons.n_events
    table = photons.table if photons.table.flags.c_contiguous else np.ascontiguousarray(photons.table)
    return [BATCH, _BATCH_HEAD.pack(batch_id, E, n), table.reshape(-1), photons.flags[:n],
            np.ascontiguousarray(photons.offsets, np.int64), photons.event_id, photons.first_index]  # fmt: skip


def encode_batch_shm(batch_id: int, photons: PhotonBatch, buffer: SharedHostBuffer) -> list:
    """A batch assembled in ``buffer``'s segment (at its start): only its name and the per-event arrays travel."""
    E = photons.n_events
    body = np.empty(_SHM_HEAD.size + 16 * E + 8, np.uint8)
    _SHM_HEAD.pack_into(body, 0, batch_id, E, photons.n_photons, buffer.capacity)
    a = _SHM_HEAD.size
    b = a + 8 * (E + 1)
    body[a:b].view(np.int64)[:] = photons.offsets
    body[b : b + 4 * E].view(np.uint32)[:] = photons.event_id
    body[b + 4 * E :].view(np.uint32)[:] = photons.first_index
    return [BATCH_SHM, body, buffer.segment.name.encode()]


def _frame_count(frames, kind: str, count: int) -> None:
    """A message has ``count`` frames after its kind, or ValueError."""
    if len(frames) != count:
        raise ValueError(f"{kind} has {len(frames) + 1} frames, expected {count + 1}")


def _head(frames, kind: str, count: int, head: struct.Struct) -> tuple:
    """Check a message's frame count (``count`` after its kind) and head size; the unpacked head."""
    _frame_count(frames, kind, count)
    buf = _buffer(frames[0])
    if buf.nbytes != head.size:
        raise ValueError(f"{kind} head has {buf.nbytes} bytes, expected {head.size}")
    return head.unpack(buf)


def _counts(offsets: np.ndarray, n: int) -> np.ndarray:
    """Photons per slot [E] int64, after checking that ``offsets`` run from 0 to ``n`` without decreasing.

    The counts serve both the check and the merge's slot numbering, on the thread every batch passes through."""
    counts = offsets[1:] - offsets[:-1]  # np.diff, without its generality's overhead
    if offsets[0] != 0 or offsets[-1] != n or (len(counts) and counts.min() < 0):
        raise ValueError("offsets are not a non-decreasing 0..n_photons sequence")
    return counts


def _slots(frames, E: int, n: int):
    """(offsets [E+1] int64, counts [E] int64, event_id [E] uint32, first_index [E] uint32), checked."""
    offsets = _array(frames[0], np.int64, E + 1, "offsets")
    return (offsets, _counts(offsets, n), _array(frames[1], np.uint32, E, "event_id"),
            _array(frames[2], np.uint32, E, "first_index"))  # fmt: skip


def _body(frames, kind: str, count: int, head: struct.Struct, parts: Callable[..., tuple], what: str):
    """The unpacked head of a message whose first frame (after its kind) is a head and then ``parts``,
    and the arrays of those parts. ``parts(*head)`` gives ((dtype, count), ...); ``what`` names them
    for the error. The frame count and the body's exact length are checked before any view is made."""
    _frame_count(frames, kind, count)
    buf = _buffer(frames[0])
    if buf.nbytes < head.size:
        raise ValueError(f"{kind} body has {buf.nbytes} bytes, shorter than its {head.size}-byte head")
    values = head.unpack_from(buf)
    layout = parts(*values)
    want = head.size + sum(_ITEMSIZE[t] * k for t, k in layout)
    if buf.nbytes != want:
        raise ValueError(f"{kind} body has {buf.nbytes} bytes, expected {want} (head, then {what})")
    arrays, at = [], head.size
    for t, k in layout:
        arrays.append(np.frombuffer(buf, t, k, at))
        at += _ITEMSIZE[t] * k
    return values, arrays


def _shm_parts(batch_id, E, n, cap):
    return (np.int64, E + 1), (np.uint32, E), (np.uint32, E)


def _hits_parts(batch_id, E, H, seconds):
    return (np.int64, E + 1), (np.uint32, 2 * H), (np.float32, 8 * H)


def decode_batch_shm(frames, segment_for) -> tuple[int, "SubBatch"]:
    """frames after the BATCHSHM kind -> (batch id, SubBatch viewing the segment).

    ``segment_for(name)`` maps (or finds) the named segment and returns its :class:`MappedSegment`;
    everything in the message is checked before it is called. ValueError names the problem."""
    (batch_id, E, n, cap), (offsets, event_id, first_index) = _body(
        frames, "BATCHSHM", 2, _SHM_HEAD, _shm_parts, "offsets [E+1] int64, event_id and first_index [E] uint32")
    if n > cap:
        raise ValueError(f"BATCHSHM has {n} photons in a buffer laid out for {cap}")
    counts = _counts(offsets, n)
    name = bytes(_buffer(frames[1])).decode("utf-8", "replace")
    mapped = segment_for(name)
    rows = batch_rows(mapped.words(cap), n)  # [N_ROWS + 1, n]: table, then flags
    sub = SubBatch(b"", batch_id, *split_rows(rows), offsets, event_id, first_index,
                   counts=counts, mapped=mapped, rows=rows)  # fmt: skip
    return batch_id, sub


def decode_batch(frames) -> tuple[int, "SubBatch"]:
    """frames after the BATCH kind -> (batch id, SubBatch of read-only views). ValueError names the problem."""
    batch_id, E, n = _head(frames, "BATCH", 6, _BATCH_HEAD)
    table = _array(frames[1], np.float32, N_ROWS * n, "table").reshape(N_ROWS, n)
    flags = _array(frames[2], np.uint32, n, "flags")
    offsets, counts, event_id, first_index = _slots(frames[3:], E, n)
    return batch_id, SubBatch(b"", batch_id, table, flags, offsets, event_id, first_index, counts=counts)


def encode_hits(batch_id: int, hits: HitBatch, failed: np.ndarray | None, error: str, seconds: float) -> list:
    """``failed`` [E] bool, or None when no slot failed (then neither it nor the error travels)."""
    E, H = len(hits.offsets) - 1, hits.n_hits
    a = _HITS_HEAD.size
    b = a + 8 * (E + 1)
    c = b + 8 * H
    body = np.empty(c + 32 * H, np.uint8)
    _HITS_HEAD.pack_into(body, 0, batch_id, E, H, seconds)
    body[a:b].view(np.int64)[:] = hits.offsets
    words = body[b:c].view(np.uint32)  # channel [H], then flags [H]
    words[:H] = hits.channel
    words[H:] = hits.flags
    body[c:].view(np.float32).reshape(8, H)[:] = hits.table
    frames = [HITS, body]
    if failed is not None and failed.any():
        frames += [failed.astype(np.uint8), error.encode()]
    return frames


def decode_hits(frames) -> tuple[int, HitBatch, np.ndarray | None, str, float]:
    """frames after the HITS kind -> (batch id, hits, failed [E] bool or None when none failed, error,
    engine seconds)."""
    n_frames = 3 if len(frames) == 3 else 1
    (batch_id, E, H, seconds), (offsets, words, table) = _body(
        frames, "HITS", n_frames, _HITS_HEAD, _hits_parts,
        "offsets [E+1] int64, channel and flags [H] uint32, table [8*H] float32")  # fmt: skip
    hits = HitBatch(words[:H], table.reshape(8, H), words[H:], offsets)
    if n_frames == 1:
        return batch_id, hits, None, "", seconds
    failed = _array(frames[1], np.uint8, E, "failed").astype(bool)
    return batch_id, hits, failed, bytes(_buffer(frames[2])).decode("utf-8", "replace"), seconds


# ---------------------------------------------------------------- service
@dataclass
class SubBatch:
    """One front end's batch, as received (views on the zmq frames, which stay untouched)."""

    peer: bytes  # the front end's routing identity
    batch_id: int
    table: np.ndarray  # [N_ROWS, n] float32
    flags: np.ndarray  # [n] uint32
    offsets: np.ndarray  # [E+1] int64
    event_id: np.ndarray  # [E] uint32
    first_index: np.ndarray  # [E] uint32
    frames: list = field(default_factory=list)  # keeps the zero-copy frames alive
    failed: np.ndarray | None = None  # [E] bool, set only when the engine failed on part of it
    arrival: float = 0.0  # perf_counter() when the service received it
    error: str = ""
    mapped: "MappedSegment | None" = None  # the shared-memory segment its photons are in (BATCHSHM)
    counts: np.ndarray | None = None  # [E] int64, photons per slot (np.diff(offsets)), set by both decoders
    rows: np.ndarray | None = None  # [N_ROWS + 1, n] float32: table then flags' bits, in a segment (BATCHSHM)

    @property
    def n_photons(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_events(self) -> int:
        return len(self.offsets) - 1

    def photons(self, a: int, b: int) -> PhotonBatch:
        """Slots ``a:b`` as a PhotonBatch of copies (to retry a failed merged call on part of it)."""
        whole = PhotonBatch(self.table, self.flags, np.zeros(0, np.int32), self.offsets, self.event_id,
                            self.first_index)  # fmt: skip
        return whole.slot_range(a, b)


class MappedSegment:
    """A front end's segment as the service holds it: mapped, registered with the engine, in use by
    ``refs`` sub-batches; unmapped once the front end released it and no sub-batch uses it."""

    def __init__(self, peer: bytes, segment: Segment, token=None):
        self.peer, self.segment, self.token = peer, segment, token
        self.refs = 0
        self.released = False
        self._cap = -1
        self._words = None

    def words(self, cap: int) -> np.ndarray:
        if cap != self._cap:  # ValueError when the segment is too small for cap
            self._words, self._cap = words(self.segment, cap), cap
        return self._words


@dataclass
class MergedBatch:
    slots: list[SubBatch]  # in slot order; sub-batch k owns merged slots base_k : base_k + E_k
    photons: PhotonBatch
    buffer: "MergeBuffer"


class MergeBuffer:
    """Preallocated ``[N_ROWS, capacity]`` storage that sub-batches are copied into as they arrive.

    Rows keep the capacity as their stride so a sub-batch can be appended before the
    batch's final size is known; engines that need a contiguous table get a copy
    (``Engine.strided_rows``)."""

    def __init__(self, capacity: int, alloc=np.empty, max_events: int = 0, gather: bool = False):
        self.capacity = capacity
        # An engine that gathers (CUDA) copies sub-batches already in registered shared memory
        # straight to the device: no host copy here, and no slot numbers (it derives them from
        # the offsets). Others get every photon copied in and every slot numbered.
        self.gather = gather
        self.max_events = max_events  # 0: no limit; 1: one event per engine call (ChAR0N-style comparison)
        host = HostBuffer(alloc)
        host.reserve(capacity, capacity)
        # Rows of stride capacity, the flags' bits as the last: any column range is one block (Piece.rows).
        self.rows = host.rows(capacity)  # [N_ROWS + 1, capacity] float32
        self.table, self.flags = split_rows(self.rows)  # [N_ROWS, capacity] float32, [capacity] uint32
        self.slot = host.slot(capacity)  # [capacity] int32
        self.subs: list[SubBatch] = []
        self.pieces: list[Piece] = []  # gather: where columns 0..n are
        self.n = 0  # photons copied in so far
        self.n_events = 0

    def fits(self, sub: SubBatch) -> bool:
        if self.max_events and self.subs and self.n_events + sub.n_events > self.max_events:
            return False
        return self.n + sub.n_photons <= self.capacity

    def append(self, sub: SubBatch) -> None:
        a, n = self.n, sub.n_photons
        if self.gather and sub.mapped is not None:
            self.pieces.append(Piece(a, sub.rows))  # BATCHSHM always has its rows
        else:
            self.table[:, a : a + n] = sub.table
            self.flags[a : a + n] = sub.flags
            if self.gather:
                self.pieces.append(Piece(a, self.rows[:, a : a + n]))
        if not self.gather:  # an engine that gathers numbers the slots itself, from the offsets
            self.slot[a : a + n] = np.repeat(np.arange(self.n_events, self.n_events + sub.n_events, dtype=np.int32),
                                             sub.counts)  # fmt: skip
        self.subs.append(sub)
        self.n += n
        self.n_events += sub.n_events

    def seal(self, contiguous: bool) -> MergedBatch:
        n, subs = self.n, self.subs
        offsets = np.zeros(self.n_events + 1, np.int64)
        e = 0
        for s in subs:
            offsets[e + 1 : e + s.n_events + 1] = s.offsets[1:] + offsets[e]
            e += s.n_events
        table = self.table[:, :n]
        photons = PhotonBatch(
            table=np.ascontiguousarray(table) if contiguous else table,
            flags=self.flags[:n],
            # Empty for an engine that gathers: it derives slots from the offsets (kernels/slots.py),
            # and an empty array fails loudly where a filled one would be expected.
            slot=self.slot[:0] if self.gather else self.slot[:n],
            offsets=offsets,
            event_id=np.concatenate([s.event_id for s in subs]),
            first_index=np.concatenate([s.first_index for s in subs]),
            # With pieces, table holds only the columns copied here: an engine that gathers reads pieces.
            pieces=list(self.pieces) if self.gather else None,
            rows=None if contiguous or self.gather else self.rows[:, :n],
        )
        return MergedBatch(subs, photons, self)

    def reset(self) -> None:
        self.subs, self.pieces, self.n, self.n_events = [], [], 0, 0


class _Done:
    """A synchronous engine's call, already run: its hits or its exception."""

    __slots__ = ("hits", "exc")

    def __init__(self, hits=None, exc=None):
        self.hits, self.exc = hits, exc


@dataclass
class _Running:
    batch: MergedBatch
    handle: object  # the engine's launch handle, or _Done
    t0: float  # perf_counter at launch
    device_seconds: float | None = None  # busy seconds by the engine's own timing (CUDA events), if it has one
    compute_seconds: float | None = None  # of which the kernels alone (StageTimes.compute_busy)
    n_photons: int = 0
    n_events: int = 0


class EngineService:
    """Owns the engine; merges front ends' batches into one engine call at a time.

    One thread does everything: receiving and merging, launching, polling the GPU,
    replying. The CUDA engine's :meth:`launch` queues a whole batch and returns, so
    the thread merges the next batch while the GPU runs, and no second Python thread
    competes for the GIL between the many short driver calls of a launch (with an
    engine thread, each of those waits for the busy socket thread: measured 2x slower
    batches on the H200 host). Engines without ``launch`` (CPU, Chroma) run inline.
    """

    # Seconds between GPU polls while a batch runs and no message arrives. A sleep of 50 us
    # lasts ~100-160 us on Linux, a delay on every batch's completion, but it leaves a shared
    # core to the front ends. On CPUs of its own (--engine-cpus) the thread polls without
    # sleeping: nothing else wants that core.
    spin_sleep = 50e-6

    def __init__(self, engine_factory, address: str, max_batch_photons: int, context: zmq.Context | None = None,
                 max_batch_events: int = 0, cpus: set[int] | None = None):  # fmt: skip
        self.ctx = context or zmq.Context.instance()
        self.cpus = cpus  # the serving thread's own CPUs (--engine-cpus), else those of the starting thread
        if cpus is not None:
            self.spin_sleep = 0.0
        self.busy = BusyClock()
        self.metrics = Metrics(self.busy)  # engine-side figures; the front ends count events
        self.max_batch_photons = int(max_batch_photons)
        self.max_batch_events = int(max_batch_events)
        self._factory = engine_factory
        self._address = address
        self._acted = 0  # messages handled, batches launched or collected: a pass that changed it worked
        self.address: str | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self.engine = None
        self._thread = threading.Thread(target=self._serve, name="charon-engine-service", daemon=True)

    def start(self, timeout: float | None = None):
        """Start the serving thread; it builds and warms the engine (compiles kernels), then binds.
        Returns the engine once the service accepts batches."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise EngineError("the shared engine did not start in time")
        if self._startup_error is not None:
            raise self._startup_error
        return self.engine

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------ thread
    def _serve(self) -> None:
        set_native_thread_name("charon-engine")
        try:
            self.engine = self._factory()
            self.engine.warm_up()
            alloc = getattr(self.engine, "host_alloc", None) or np.empty
            # Batches launched and not yet collected: the CUDA engine's lanes, else one at a time.
            self._lanes = len(getattr(self.engine, "lanes", ())) or 1
            gather = bool(getattr(self.engine, "gathers_pieces", False))
            self._borrow = bool(getattr(self.engine, "lends_hits", False))
            self._free = [MergeBuffer(self.max_batch_photons, alloc, self.max_batch_events, gather)
                          for _ in range(self._lanes + 1)]  # fmt: skip
            self._segments: dict[tuple[bytes, str], MappedSegment] = {}  # (front end, name) -> mapped
            self._per_peer: collections.Counter = collections.Counter()
            h = self.metrics.handoff_batches  # the labelled children, looked up once
            self._handoff_count = {False: h.labels("socket"), True: h.labels("shm")}
            self._building = self._free.pop()
            self._waiting: collections.deque[SubBatch] = collections.deque()  # did not fit the building batch
            self._running: collections.deque[_Running] = collections.deque()  # in launch order
            self.socket = self.ctx.socket(zmq.ROUTER)
            for opt, v in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0)):
                self.socket.setsockopt(opt, v)
            self.socket.bind(self._address)
            self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
            # Pinned only now, after the engine (numba's CPU workers, the CUDA driver) and ZeroMQ
            # (I/O threads start with the first socket) started their threads, which inherit this
            # thread's CPUs: those stay with the others, and this core is for this thread alone.
            pin(self.cpus)
        except BaseException as exc:  # reported to the starting thread
            self._startup_error = exc
            self._ready.set()
            return
        log.info("shared %s engine on %s, merged batches of up to %d photons", self.engine.name, self.address,
                 self.max_batch_photons)  # fmt: skip
        self._ready.set()
        try:
            self._loop()
        finally:
            self.socket.close(0)
            for m in list(self._segments.values()):
                self._unmap(m)
            self.engine.close()

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        m = self.metrics
        while not self._stop.is_set():
            events = poller.poll(0 if self._running else 100)
            t0 = time.perf_counter()
            acted = self._acted
            # The GPU first: finished batches are collected and the next launched before
            # anything else, so the GPU idles for no more than one pass of this loop.
            self._advance()
            if events:
                for _ in range(256):  # bounded, so that stopping is noticed
                    try:
                        frames = recv_message(self.socket)
                    except zmq.Again:
                        break
                    self._acted += 1
                    self._handle(frames)
                    # Between messages, not after a burst of them (measured: the GPU idled for
                    # whole bursts when it was checked once per 64 messages).
                    self._advance(within_burst=True)
            self._advance()
            if self._acted != acted:
                # Passes that received, launched or collected something: the thread's work. The
                # others only waited or polled the GPU (a pinned thread spins through them), so
                # work / wall time says how close this thread is to limiting the GPU.
                work = time.perf_counter() - t0
                m.host_seconds.inc(work)
                m.engine_thread_seconds.inc(work)
            elif self._running and self.spin_sleep:
                time.sleep(self.spin_sleep)

    def _advance(self, within_burst: bool = False) -> None:
        """Collect finished batches (in launch order), launching the building batch as each frees a lane.

        Within a burst of messages a free lane is not filled at once: the rest of the
        burst is merged first, so that a lone first message does not become a batch."""
        running = self._running
        while running and self._engine_ready(running[0].handle):
            self._acted += 1
            if len(running) == 1 and self._building.subs and self._lanes > 1:
                # The GPU has nothing else to run: the building batch goes to the free lane before
                # this one's hits are copied out and answered, not after (the GPU would idle meanwhile).
                self._launch()
            done = running.popleft()
            results = self._collect(done)
            self._launch_if_free()
            self._reply(done, results)
        if not within_burst:
            self._launch_if_free()

    def _launch_if_free(self) -> None:
        running = self._running
        if not self._building.subs or len(running) >= self._lanes:
            return
        # Behind a running batch, launch only once the building batch is as large as the one
        # ahead of it. Launching whatever had arrived (measured on the H200) shrank the batches
        # until the per-batch host work saturated this thread, and throughput halved.
        if running and self._building.n < running[-1].batch.photons.n_photons:
            return
        self._launch()

    def _handle(self, frames) -> None:
        peer, kind = frames[0].bytes, frames[1].bytes if len(frames) > 1 else b""
        if kind == HELLO:
            self._hello(peer, frames[2:])
            return
        if kind == RELEASE:
            self._release(peer, frames[2:])
            return
        if kind not in (BATCH, BATCH_SHM):
            log.warning("shared engine: unexpected message %r from a front end", kind[:16])
            return
        try:
            if kind == BATCH:
                batch_id, sub = decode_batch(frames[2:])
            else:
                batch_id, sub = decode_batch_shm(frames[2:], lambda name: self._segment(peer, name))
            if sub.n_photons > self.max_batch_photons:
                raise ValueError(f"{sub.n_photons} photons exceed the shared engine's batch of "
                                 f"{self.max_batch_photons}")  # fmt: skip
        except ValueError as exc:
            head = _buffer(frames[2]) if len(frames) > 2 else b""
            bid = _ID.unpack(bytes(head[:8]))[0] if len(head) >= 8 else 0
            log.error("shared engine refused a batch: %s", exc)
            self.socket.send_multipart([peer, REFUSED, _ID.pack(bid), str(exc).encode()])
            return
        sub.peer, sub.frames, sub.arrival = peer, frames, time.perf_counter()
        if sub.mapped is not None:
            sub.mapped.refs += 1
        self._handoff_count[sub.mapped is not None].inc()
        if not self._waiting and self._building.fits(sub):
            self._building.append(sub)  # copied now, while the engine runs the previous batch
        else:
            self._waiting.append(sub)

    # ---------------------------------------------------- shared memory
    def _hello(self, peer: bytes, rest: list) -> None:
        """Answer a front end; with a probe segment, say whether its photons can come through shared memory."""
        answer = [peer, ENGINE, self.engine.name.encode()]
        if rest:
            try:
                probe = Segment.attach(bytes(_buffer(rest[0])).decode("utf-8", "replace"))
                probe.close()
                answer += [b"shm", b""]
            except ValueError as exc:
                log.warning("shared engine: a front end's photons come over the socket: %s", exc)
                answer += [b"socket", str(exc).encode()]
        self.socket.send_multipart(answer)

    def _segment(self, peer: bytes, name: str) -> MappedSegment:
        m = self._segments.get((peer, name))
        if m is not None:
            return m
        if self._per_peer[peer] >= MAX_SEGMENTS_PER_PEER:
            raise ValueError(f"a front end may have {MAX_SEGMENTS_PER_PEER} shared-memory segments mapped; "
                             "RELEASE the ones it retired")  # fmt: skip
        t0 = time.perf_counter()
        seg = Segment.attach(name)
        token = None
        register = getattr(self.engine, "register_host", None)
        if register is not None:
            try:  # pinned, so that the device copies run asynchronously straight from it
                token = register(np.frombuffer(seg.mm, np.uint8))
            except Exception as exc:  # pageable still works, the copies are just slower
                log.warning("shared engine: could not pin segment %s (%s); copying from pageable memory", name, exc)
        m = self._segments[(peer, name)] = MappedSegment(peer, seg, token)
        self._per_peer[peer] += 1
        self.metrics.handoff_segments_mapped.inc()
        self.metrics.handoff_pin_seconds.inc(time.perf_counter() - t0)
        return m

    def _release(self, peer: bytes, rest: list) -> None:
        name = bytes(_buffer(rest[0])).decode("utf-8", "replace") if len(rest) == 1 else ""
        m = self._segments.get((peer, name))
        if m is None:
            log.warning("shared engine: RELEASE of a segment this front end never used: %r", name[:80])
            return
        m.released = True
        if m.refs == 0:
            self._unmap(m)

    def _unmap(self, m: MappedSegment) -> None:
        t0 = time.perf_counter()
        if self._segments.pop((m.peer, m.segment.name), None) is not None:
            self._per_peer[m.peer] -= 1
        if m.token is not None:
            try:
                self.engine.unregister_host(m.token)
            except Exception as exc:
                log.warning("shared engine: unpinning segment %s failed: %s", m.segment.name, exc)
        m._words = None
        m.segment.close()
        self.metrics.handoff_pin_seconds.inc(time.perf_counter() - t0)

    def _done_with(self, sub: SubBatch) -> None:
        m = sub.mapped
        if m is not None:
            m.refs -= 1
            if m.released and m.refs == 0:
                self._unmap(m)

    # ------------------------------------------------------------ engine
    def _launch(self) -> None:
        self._acted += 1
        buf = self._building
        batch = buf.seal(contiguous=not getattr(self.engine, "strided_rows", False))
        if not self._running:
            self.busy.start()
        t0 = time.perf_counter()
        launch = getattr(self.engine, "launch", None)
        try:
            handle = launch(batch.photons) if launch else _Done(self.engine.propagate(batch.photons))
        except Exception as exc:
            handle = _Done(exc=exc)
        self._running.append(_Running(batch, handle, t0))
        self._building = self._free.pop()
        while self._waiting and self._building.fits(self._waiting[0]):
            self._building.append(self._waiting.popleft())

    def _engine_ready(self, handle) -> bool:
        return isinstance(handle, _Done) or self.engine.ready(handle)

    def _collect(self, running: _Running) -> list[tuple[SubBatch, HitBatch]]:
        """Hits of each front-end batch; on an engine error, each is retried alone and bisected."""
        subs, handle = running.batch.slots, running.handle
        try:
            if isinstance(handle, _Done):
                if handle.exc is not None:
                    raise handle.exc
                hits = handle.hits
            elif self._borrow:  # pinned and reused: _reply encodes each front end's share before the next collect
                hits = self.engine.finish(handle, borrow=True)
            else:
                hits = self.engine.finish(handle)
            lt = self.engine.last_times
            running.device_seconds = lt.busy if lt.total > 0 else None
            running.compute_seconds = lt.compute_busy if lt.total > 0 else None
        except Exception as exc:
            log.warning("engine error on a merged batch of %d front-end batches: %r", len(subs), exc)
            out = [(s, self._isolate(s, 0, s.n_events)) for s in subs]
        else:
            out, base = [], 0
            for s in subs:
                out.append((s, hits.slot_range(base, base + s.n_events)))
                base += s.n_events
        if not self._running:  # the last batch in flight (the collected one has left the deque)
            self.busy.stop()
        # The hits are copies and the sub-batches keep their own frames: the buffer is free again.
        running.n_photons, running.n_events = running.batch.photons.n_photons, running.batch.photons.n_events
        running.batch.buffer.reset()
        self._free.append(running.batch.buffer)
        return out

    def _isolate(self, sub: SubBatch, a: int, b: int) -> HitBatch:
        try:
            return self.engine.propagate(sub.photons(a, b))
        except Exception as exc:
            if b - a == 1:
                if sub.failed is None:
                    sub.failed = np.zeros(sub.n_events, bool)
                sub.failed[a] = True
                sub.error = f"engine error: {exc!r}"
                return empty_hits(1)
            m = (a + b) // 2
            return HitBatch.concat_slots([self._isolate(sub, a, m), self._isolate(sub, m, b)])

    def _reply(self, running: _Running, results) -> None:
        merged = running.batch
        seconds = time.perf_counter() - running.t0
        n_hits = sum(hits.n_hits for _sub, hits in results)
        self._record(running, seconds, n_hits)  # before the replies, so that whoever they wake sees it counted
        for sub, hits in results:
            send_message(self.socket, [sub.peer, *encode_hits(sub.batch_id, hits, sub.failed, sub.error, seconds)])
            self._done_with(sub)
            self.metrics.engine_residence_seconds.observe(time.perf_counter() - sub.arrival)
        log.info("merged batch: %d front-end batches, %d events, %d photons, %d hits, %.1f ms launch to collect",
                 len(merged.slots), running.n_events, running.n_photons, n_hits, seconds * 1e3)  # fmt: skip

    def _record(self, running: _Running, seconds: float, n_hits: int) -> None:
        """The engine-side figures of one merged batch (the front ends count the events)."""
        photons = running.n_photons
        m = self.metrics
        m.batches.inc()
        m.photons.inc(photons)
        m.hits.inc(n_hits)
        m.batch_photons.observe(photons)
        m.batch_seconds.observe(seconds)
        # Device time where the engine measures it (CUDA events), else the call's wall time.
        m.engine_seconds.inc(running.device_seconds if running.device_seconds is not None else seconds)
        if running.compute_seconds is not None:
            m.engine_compute_seconds.inc(running.compute_seconds)
        m.max_batch_seen = max(photons, m.max_batch_seen)
        m.batch_photons_max.set(m.max_batch_seen)


# -------------------------------------------------------------- front end
class ServiceLink:
    """A front end's handle on the shared engine, with :class:`EngineThread`'s interface."""

    remote = True  # the service records engine metrics for the merged batches
    pipelined = True  # batches are handed over as soon as they waited max_wait_ms; the service merges them
    max_in_flight = 8
    lanes = 1  # the service fills the shared engine's lanes itself (its own size rule)
    last_submitted = 0

    def __init__(self, ctx: zmq.Context, address: str, start_timeout: float = 600.0, handoff: str = "auto"):
        if handoff not in ("auto", "shm", "socket"):
            raise ValueError(f"handoff must be auto, shm or socket, not {handoff!r}")
        self.handoff = handoff  # as asked; self.shm says what start() agreed with the service
        self.shm = False
        self._shared: list[SharedHostBuffer] = []
        self.sock = ctx.socket(zmq.DEALER)
        for opt, v in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0)):
            self.sock.setsockopt(opt, v)
        self.sock.connect(address)
        self.address = address
        self.wake_socket = self.sock
        self.results: collections.deque[BatchResult] = collections.deque()
        self.in_flight = 0
        self._pending: dict[int, object] = {}
        self._next_id = 0
        self._start_timeout = start_timeout

    def due_ms(self) -> float | None:
        """A result from the service wakes the socket loop (:attr:`wake_socket`)."""
        return None

    def start(self, timeout: float | None = None):
        probe, why = None, "/dev/shm is not usable here"
        if self.handoff != "socket" and shm_available():
            try:  # the service answers whether it can map this process's segments
                probe = Segment.create(4096)
            except OSError as exc:
                why = f"cannot create a shared-memory segment: {exc}"
        if probe is None and self.handoff == "shm":
            raise EngineError(f"--handoff shm: {why}")
        try:
            self.sock.send_multipart([HELLO] + ([probe.name.encode()] if probe is not None else []))
            if not self.sock.poll(int(1000 * (timeout or self._start_timeout))):
                raise EngineError(f"the shared engine at {self.address} did not answer")
            frames = self.sock.recv_multipart()
        finally:
            if probe is not None:
                probe.close()
        if frames[0] != ENGINE or len(frames) not in (2, 4):
            raise EngineError(f"unexpected answer from the shared engine at {self.address}: {frames[0][:16]!r}")
        self.shm = probe is not None and len(frames) == 4 and frames[2] == b"shm"
        if probe is not None and not self.shm:
            why = frames[3].decode("utf-8", "replace") if len(frames) == 4 else "it does not support it"
            if self.handoff == "shm":
                raise EngineError(f"--handoff shm: the shared engine cannot map this front end's memory: {why}")
            log.info("photons go to the shared engine over the socket: %s", why)
        return SimpleNamespace(name=f"{frames[1].decode()} (shared, {self.address}, photons by "
                                    f"{'shared memory' if self.shm else 'socket'})")  # fmt: skip

    def host_buffer(self) -> HostBuffer:
        if not self.shm:
            return HostBuffer()
        buf = SharedHostBuffer(on_retire=self._retire)
        self._shared.append(buf)
        return buf

    def _retire(self, name: str) -> None:
        self.sock.send_multipart([RELEASE, name.encode()])

    def submit(self, batch) -> None:
        self.in_flight += 1
        self._next_id += 1
        self._pending[self._next_id] = batch
        buf = batch.buffer
        if isinstance(buf, SharedHostBuffer) and buf.segment is not None:
            send_message(self.sock, encode_batch_shm(self._next_id, batch.photons, buf))
        else:  # large frames go zero-copy; the buffer is not reused before its HITS come back
            send_message(self.sock, encode_batch(self._next_id, batch.photons), copy=False)

    def poll_results(self) -> None:
        while True:
            try:
                frames = recv_message(self.sock)
            except zmq.Again:
                return
            kind = frames[0].bytes
            if kind == HITS:
                try:
                    batch_id, hits, failed, error, seconds = decode_hits(frames[1:])
                except ValueError as exc:  # a bug in the service; its batch stays unanswered, clients retry
                    log.error("malformed HITS from the shared engine: %s", exc)
                    continue
                batch = self._pending.pop(batch_id, None)
                if batch is None or len(batch.slots) != len(hits.offsets) - 1:
                    log.error("HITS from the shared engine for unknown batch %d or with the wrong events", batch_id)
                    if batch is not None:
                        self._pending[batch_id] = batch
                    continue
                self.results.append(BatchResult(batch, _parts(batch.slots, hits, failed, error), seconds,
                                                StageTimes()))  # fmt: skip
            elif kind == REFUSED and len(frames) == 3 and len(frames[1].bytes) == _ID.size:
                batch_id = _ID.unpack(frames[1].bytes)[0]
                batch = self._pending.pop(batch_id, None)
                if batch is None:
                    log.error("REFUSED from the shared engine for unknown batch %d", batch_id)
                    continue
                reason = frames[2].bytes.decode("utf-8", "replace")
                self.results.append(BatchResult(batch, [SlotsResult(batch.slots, None, f"shared engine: {reason}")],
                                                0.0, StageTimes()))  # fmt: skip
            else:
                log.warning("unexpected message from the shared engine: %r", kind[:16])

    def stop(self, timeout: float = 30.0) -> None:
        if self._pending:
            log.warning("stopping with %d batch(es) still at the shared engine", len(self._pending))
        self.sock.close(0)
        for buf in self._shared:
            buf.close()


def _parts(slots: list, hits: HitBatch, failed: np.ndarray | None, error: str) -> list[SlotsResult]:
    """Runs of consecutive slots that succeeded (with their hits) or failed (with the error)."""
    if failed is None or not failed.any():
        return [SlotsResult(slots, hits, None)]
    parts, a = [], 0
    edges = np.flatnonzero(np.diff(failed.astype(np.int8))) + 1
    for b in [*edges.tolist(), len(slots)]:
        parts.append(SlotsResult(slots[a:b], None, error) if failed[a] else SlotsResult(slots[a:b],
                                                                                         hits.slot_range(a, b), None))
        a = b
    return parts
