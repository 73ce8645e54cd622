"""Wire codec for the ChAR0N protocol (both client dialects; see docs/protocol.md).

Requests (frame 0 is an ASCII header; numeric frames are raw little-endian
arrays, no padding, one value per photon)::

    [PING]                                   -> [PONG] (or [ACK], --ping-reply)
    [DETECTOR_INFO]                          -> [DETECTOR_INFO, x f32[C], y f32[C], z f32[C], type i32[C]]
    [RUN_BEGIN, output_filename utf-8]       -> [ACK]
    [RUN_END]                                -> [ACK]
    [PHOTONDATA, meta u32[2] = (event_id, n),
     x, y, z, dx, dy, dz, polx, poly, polz, wavelength, t   (f32[n] each)
     (, flags u32[n])]                       -> 13 frames: dialect A (ratpac-two), 14: dialect B (ChAR0N)

Replies to PHOTONDATA::

    compact (dialect A):  [SIM_COMPLETE, event_id u32, channel u32[H], time f32[H], wavelength f32[H]]
    full    (dialect B):  [SIM_COMPLETE, event_id u32, channel u32[H], dx, dy, dz, polx, poly, polz,
                           wavelength, time (f32[H] each), flags u32[H]]
    async:                [SIM_COMPLETE_ASYNC, event_id u32]
    failure:              [SIM_FAILED, event_id u32, reason utf-8]
    unknown header:       [UNKNOWN_REQUEST]

Every frame is validated (count, byte length, dtype multiple, agreement with
``n``) *before* any ``frombuffer``; then the values are checked in one pass
(finite, non-zero direction and polarization, positive wavelength). A
malformed request raises :class:`RequestError`, which carries the event id
(``0xFFFFFFFF`` when the meta frame itself is unreadable) and a reason naming
the frame and the problem.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import numba
import numpy as np
import xxhash

from .photons import ROW_NAMES, HitBatch

PING = b"PING"
PONG = b"PONG"
ACK = b"ACK"
DETECTOR_INFO = b"DETECTOR_INFO"
PHOTONDATA = b"PHOTONDATA"
RUN_BEGIN = b"RUN_BEGIN"
RUN_END = b"RUN_END"
SIM_COMPLETE = b"SIM_COMPLETE"
SIM_COMPLETE_ASYNC = b"SIM_COMPLETE_ASYNC"
SIM_FAILED = b"SIM_FAILED"
UNKNOWN_REQUEST = b"UNKNOWN_REQUEST"
NO_WORKERS = b"NO_WORKERS"

UNKNOWN_EVENT = 0xFFFFFFFF  # event id used in SIM_FAILED when the meta frame is unreadable
FRAMES_COMPACT_REQUEST = 13
FRAMES_FULL_REQUEST = 14


class Layout(enum.Enum):
    COMPACT = "compact"
    FULL = "full"


class RequestError(ValueError):
    def __init__(self, event_id: int, reason: str):
        super().__init__(reason)
        self.event_id = event_id
        self.reason = reason


@dataclass
class PhotonData:
    event_id: int
    n: int
    rows: list  # 11 float32 [n] arrays (zero-copy views of the frames), ROW_NAMES order
    flags: np.ndarray | None  # [n] uint32 (dialect B) or None (dialect A)
    layout: Layout  # the reply layout the client's dialect expects

    @property
    def key(self) -> tuple[int, int]:
        """Resend candidates share (event_id, n); :func:`payload_digest` decides, only on such a collision."""
        return (self.event_id, self.n)


def payload_digest(rows, flags) -> int:
    """xxh3-64 of the photon arrays (and flags): identifies a resent copy of a request.

    Computed lazily, only when two requests share (event_id, n_photons), so the
    common path pays no hashing pass over the photons.
    """
    h = xxhash.xxh3_64()
    for r in rows:
        h.update(r)
    if flags is not None:
        h.update(flags)
    return h.intdigest()



@numba.njit(cache=False, nogil=True)
def _check_values(x, y, z, dx, dy, dz, px, py, pz, wl, t):
    """One pass over the photons: 0 if fine, else (code, first bad index)."""
    for i in range(x.shape[0]):
        v = x[i] + y[i] + z[i] + dx[i] + dy[i] + dz[i] + px[i] + py[i] + pz[i] + wl[i] + t[i]
        if not np.isfinite(v):
            return 1, i
        if dx[i] * dx[i] + dy[i] * dy[i] + dz[i] * dz[i] < 1e-12:
            return 2, i
        if px[i] * px[i] + py[i] * py[i] + pz[i] * pz[i] < 1e-12:
            return 3, i
        if wl[i] <= 0:
            return 4, i
    return 0, -1


_VALUE_PROBLEMS = {
    1: "non-finite value (NaN or inf) in photon {i}",
    2: "zero-length direction vector in photon {i}",
    3: "zero-length polarization vector in photon {i}",
    4: "non-positive wavelength in photon {i}",
}


META = struct.Struct("<II")  # a PHOTONDATA meta frame: u32 event id, u32 photon count
# dtype objects, not strings: np.frombuffer parses a dtype string on every call (0.37 -> 0.17 us a row).
_F4, _U4 = np.dtype("<f4"), np.dtype("<u4")


def warm_up() -> None:
    """Compile the value check for the arrays requests arrive as (writable float32, from zmq.Frames).

    Servers call this before they accept requests, so that the first client does not wait for numba.
    """
    one = [np.ones(1, _F4) for _ in range(11)]
    _check_values(*one)


def decode_photondata(frames, max_photons: int) -> PhotonData:
    """Validate and decode a PHOTONDATA request (frames[0] == PHOTONDATA). Raises RequestError.

    Sizes are checked with ``len()`` (bytes and zmq.Frame alike) before any ``frombuffer``.
    """
    nf = len(frames)
    meta = frames[1] if nf > 1 else b""
    lm = len(meta)
    event_id = int.from_bytes(bytes(memoryview(meta)[:4]), "little") if lm >= 4 else UNKNOWN_EVENT
    if nf != FRAMES_COMPACT_REQUEST and nf != FRAMES_FULL_REQUEST:
        raise RequestError(event_id, f"PHOTONDATA needs 13 or 14 frames, got {nf}")
    if lm != 8:
        raise RequestError(event_id, f"meta frame must be 8 bytes (u32 event_id, u32 n_photons), got {lm}")
    event_id, n = META.unpack_from(meta)
    if n > max_photons:
        raise RequestError(event_id, f"event has {n} photons, over the limit of {max_photons} per event")
    data = frames[2:]
    nbytes = 4 * n
    for k, f in enumerate(data):
        lf = len(f)
        if lf != nbytes:
            name = ROW_NAMES[k] if k < 11 else "flags"
            if lf % 4:
                raise RequestError(event_id, f"frame '{name}' has {lf} bytes, not a multiple of 4")
            raise RequestError(event_id, f"frame '{name}' has {lf // 4} values, meta says n_photons={n}")
    rows = [np.frombuffer(f, _F4) for f in data[:11]]
    flags = np.frombuffer(data[11], _U4) if nf == FRAMES_FULL_REQUEST else None
    if n:
        code, i = _check_values(*rows)
        if code:
            raise RequestError(event_id, _VALUE_PROBLEMS[code].format(i=i))
    layout = Layout.FULL if flags is not None else Layout.COMPACT
    return PhotonData(event_id, n, rows, flags, layout)


def u32(value: int) -> bytes:
    return int(value).to_bytes(4, "little")


def encode_hits(event_id: int, hits: HitBatch, layout: Layout) -> list:
    """Reply frames for one event's hits. Array frames are zero-copy views where contiguous."""
    t = hits.table
    ch = np.ascontiguousarray(hits.channel, dtype="<u4")
    if layout is Layout.COMPACT:
        return [SIM_COMPLETE, u32(event_id), ch, np.ascontiguousarray(t[7]), np.ascontiguousarray(t[6])]
    return [SIM_COMPLETE, u32(event_id), ch, *(np.ascontiguousarray(t[r]) for r in range(8)),
            np.ascontiguousarray(hits.flags, dtype="<u4")]  # fmt: skip


def decode_full_hits(frames) -> HitBatch:
    """One event's hits from a full-layout SIM_COMPLETE (12 frames; a worker's reply to the router).

    Every frame's length is checked against the channel frame's before any ``frombuffer``; raises ValueError.
    """
    if len(frames) != 12 or bytes(frames[0]) != SIM_COMPLETE:
        raise ValueError(f"not a full-layout SIM_COMPLETE ({len(frames)} frames)")
    nbytes = len(frames[2])
    if nbytes % 4:
        raise ValueError(f"channel frame has {nbytes} bytes, not a multiple of 4")
    for k, f in enumerate(frames[3:], start=3):
        if len(f) != nbytes:
            raise ValueError(f"frame {k} has {len(f)} bytes, the channel frame {nbytes}")
    n = nbytes // 4
    table = np.empty((8, n), np.float32)  # [8, H] float32: dx,dy,dz; polx,poly,polz; wavelength nm; time ns
    for r in range(8):
        table[r] = np.frombuffer(frames[3 + r], _F4)
    return HitBatch(np.frombuffer(frames[2], _U4).copy(), table, np.frombuffer(frames[11], _U4).copy(),
                    np.array([0, n], np.int64))  # fmt: skip


def encode_failed(event_id: int, reason: str) -> list:
    return [SIM_FAILED, u32(event_id), reason.encode("utf-8", "replace")]


def encode_detector_info(channel_position: np.ndarray, channel_type: np.ndarray) -> list:
    p = np.asarray(channel_position, dtype="<f4")
    return [DETECTOR_INFO, *(np.ascontiguousarray(p[:, i]).tobytes() for i in range(3)),
            np.asarray(channel_type, dtype="<i4").tobytes()]  # fmt: skip
