"""Compiled intake: PHOTONDATA requests taken off the client socket and checked in one numba pass.

A front end's first steps for each request are to receive its parts (the ROUTER's envelope, the
header, meta and 11 or 12 arrays), check the values, and keep the photons until a batch takes them.
In Python (``sockets.recv_message`` and ``protocol.decode_photondata``) that costs ~45 us per
1000-photon request on an H100 host, of which libzmq's own work is ~4 us
(``benchmarks/recv_floor.py``; benchmarks/RESULTS.md, twentieth session): the rest is a zmq.Frame per
part, a ``frombuffer`` per row and the check's dispatch. Here one numba function calls libzmq's C API
(the library pyzmq loaded, on the pyzmq socket's ``underlying`` handle) for many requests per call: each
part is received into a ``zmq_msg_t``, and a well-formed request's values are checked while they are
copied into the *arena*, a preallocated [12, capacity] float32 table (11 photon rows, then the flags'
bits), whose column slices become the requests' rows. Nothing else changes: the server's checks of
runs, resends, limits and the queue see the same ``PhotonData`` as from the Python decoder.

Anything that is not a well-formed, non-empty PHOTONDATA within ``max_photons`` (PING, RUN_BEGIN, a
malformed request, a value the check refuses, an event larger than the arena's free part) stops the
drain with its parts still held; :meth:`Intake.take` copies them out as plain ``bytes`` frames and the
server handles them with the Python decoder, so every error reply is the one it always gives. The
drain also stops when the arena is full; the next call starts a new arena, or reuses one no request
views any longer (counted by references: a request's rows keep their arena alive).

Wire layout handled on the fast path (a ROUTER socket; see protocol.py)::

    [identity, (empty delimiter,) PHOTONDATA, meta u32[2] = (event_id, n), 11 x f32[n] (, flags u32[n])]
"""

from __future__ import annotations

import logging
import sys

import numba
import numpy as np
import zmq

from . import libzmq as Z
from . import protocol as P

log = logging.getLogger(__name__)

MSG_BYTES = Z.MSG_BYTES
MAX_PARTS = 16  # parts held per message: a request's 14 and a two-part envelope
ID_BYTES = 256  # a ROUTER routing id is at most 255 bytes
N_ROWS = 11
_HEADER = np.frombuffer(P.PHOTONDATA, np.uint8).copy()

# Per request taken (``Intake.meta`` columns, int64):
M_KIND, M_EVENT, M_N, M_COL, M_ENV, M_IDLEN, M_FLAGS, M_PARTS = range(8)
# A request in the arena; a message left held for Python; a well-formed request held because the arena's free
# part is too small (Python starts another arena and places it there). A held message is always the last taken.
KIND_FAST, KIND_HELD, KIND_ROOM = 1, 2, 3


_C = Z.MESSAGE  # libzmq's message functions (charon.libzmq)
AVAILABLE = _C is not None and sys.platform.startswith("linux")


def _make_drain():
    msg_init, msg_recv, msg_data, msg_size, msg_more, msg_close = _C
    dontwait = int(zmq.DONTWAIT)

    @numba.njit(nogil=False, cache=False)
    def _check_copy(msgs, first, n, arena, bits, col, full):
        """Check the 11 rows of parts ``first..first+10`` (as protocol._check_values) and copy them, and the
        flags part after them when ``full``, into columns col..col+n of the arena. False at the first bad value."""
        for r in range(N_ROWS):
            src = numba.carray(msg_data(msgs[first + r].ctypes.data), 4 * n).view(np.float32)
            dst = arena[r, col : col + n]
            for i in range(n):
                dst[i] = src[i]
        x, y, z = arena[0, col : col + n], arena[1, col : col + n], arena[2, col : col + n]
        dx, dy, dz = arena[3, col : col + n], arena[4, col : col + n], arena[5, col : col + n]
        px, py, pz = arena[6, col : col + n], arena[7, col : col + n], arena[8, col : col + n]
        wl, t = arena[9, col : col + n], arena[10, col : col + n]
        for i in range(n):
            v = x[i] + y[i] + z[i] + dx[i] + dy[i] + dz[i] + px[i] + py[i] + pz[i] + wl[i] + t[i]
            if not np.isfinite(v):
                return False
            if dx[i] * dx[i] + dy[i] * dy[i] + dz[i] * dz[i] < 1e-12:
                return False
            if px[i] * px[i] + py[i] * py[i] + pz[i] * pz[i] < 1e-12:
                return False
            if wl[i] <= 0:
                return False
        if full:
            src = numba.carray(msg_data(msgs[first + N_ROWS].ctypes.data), 4 * n).view(np.uint32)
            dst = bits[col : col + n]
            for i in range(n):
                dst[i] = src[i]
        return True

    @numba.njit(nogil=False, cache=False)
    def drain(sock, msgs, arena, bits, col, max_photons, max_requests, meta, ids, header):
        """Take up to ``max_requests`` messages from the ROUTER socket at address ``sock``, arena columns from
        ``col``. Returns (messages taken, next free column). A message the fast path cannot place is the
        last one taken: its parts stay in ``msgs`` (``meta[k, M_PARTS]`` of them) for Python to read and close.

        msgs: [MAX_PARTS, MSG_BYTES] uint8, one zmq_msg_t per part; arena: [12, capacity] float32;
        bits: [capacity] uint32, the arena's last row; meta: [max_requests, 8] int64; ids: [max_requests,
        ID_BYTES] uint8, each message's routing id."""
        capacity = arena.shape[1]
        k = 0
        while k < max_requests:
            p0 = msgs[0].ctypes.data
            msg_init(p0)
            if msg_recv(p0, sock, dontwait) < 0:
                msg_close(p0)
                break
            parts = 1
            more = msg_more(p0)
            while more:  # the rest of the message: it is all there once its first part is
                j = parts if parts < MAX_PARTS else MAX_PARTS - 1
                pj = msgs[j].ctypes.data
                if parts >= MAX_PARTS:  # never a request charon knows: keep the count, drop the extra data
                    msg_close(pj)
                msg_init(pj)
                # The rest of a multipart message is always there; a signal (EINTR) may still interrupt the
                # call, and a part left unread would start the next "message". (-1 for good: the context ended.)
                for _ in range(1000):
                    if msg_recv(pj, sock, 0) >= 0:
                        break
                more = msg_more(pj)
                parts += 1
            held = parts if parts < MAX_PARTS else MAX_PARTS
            idlen = min(np.int64(msg_size(p0)), ID_BYTES - 1)
            ident = numba.carray(msg_data(p0), idlen)
            for i in range(idlen):
                ids[k, i] = ident[i]
            env = 2 if parts > 1 and msg_size(msgs[1].ctypes.data) == 0 else 1
            body = parts - env
            m = meta[k]
            m[M_ENV], m[M_IDLEN], m[M_PARTS] = env, idlen, parts
            m[M_KIND], m[M_FLAGS], m[M_N], m[M_EVENT], m[M_COL] = KIND_HELD, 0, 0, -1, col
            fast = False
            if (body == P.FRAMES_COMPACT_REQUEST or body == P.FRAMES_FULL_REQUEST) and msg_size(
                msgs[env].ctypes.data
            ) == header.shape[0]:
                h = numba.carray(msg_data(msgs[env].ctypes.data), header.shape[0])
                same = True
                for i in range(header.shape[0]):
                    same = same and h[i] == header[i]
                if same and msg_size(msgs[env + 1].ctypes.data) == 8:
                    mt = numba.carray(msg_data(msgs[env + 1].ctypes.data), 8).view(np.uint32)
                    event_id, n = np.int64(mt[0]), np.int64(mt[1])
                    sizes_ok = n > 0 and n <= max_photons
                    for r in range(env + 2, parts):
                        sizes_ok = sizes_ok and msg_size(msgs[r].ctypes.data) == 4 * n
                    full = body == P.FRAMES_FULL_REQUEST
                    if sizes_ok and col + n > capacity:
                        m[M_KIND], m[M_EVENT], m[M_N], m[M_FLAGS] = KIND_ROOM, event_id, n, full
                    elif sizes_ok:
                        if _check_copy(msgs, env + 2, n, arena, bits, col, full):
                            m[M_KIND], m[M_EVENT], m[M_N], m[M_FLAGS] = KIND_FAST, event_id, n, full
                            col += n
                            fast = True
            k += 1
            if fast:
                for j in range(held):
                    msg_close(msgs[j].ctypes.data)
            else:
                break  # held for Python
        return k, col

    @numba.njit(nogil=False, cache=False)
    def part_of(msgs, j, out):
        """Copy part ``j`` of the held message into ``out`` (its size, from :func:`part_size`)."""
        src = numba.carray(msg_data(msgs[j].ctypes.data), out.shape[0])
        for i in range(out.shape[0]):
            out[i] = src[i]

    @numba.njit(nogil=False, cache=False)
    def part_size(msgs, j):
        return msg_size(msgs[j].ctypes.data)

    @numba.njit(nogil=False, cache=False)
    def close_parts(msgs, held):
        for j in range(held):
            msg_close(msgs[j].ctypes.data)

    return drain, _check_copy, part_of, part_size, close_parts


def _photondata(arena, col, event_id, n, full) -> P.PhotonData:
    rows = arena[:N_ROWS, col : col + n]  # [11, n] float32 view: the request's photons
    flags = arena[N_ROWS, col : col + n].view(np.uint32) if full else None  # [n] uint32 or None (dialect A)
    return P.PhotonData(event_id, n, rows, flags, P.Layout.FULL if full else P.Layout.COMPACT)


class Intake:
    """Requests off one ROUTER socket (the server's client socket) through the compiled drain.

    :meth:`take` returns, per message, either ``(envelope, PhotonData)`` for a request checked into the
    arena, or ``(frames, None)`` for any other message, its frames as ``bytes``, to handle as ever.
    """

    def __init__(self, sock, max_photons: int, capacity: int = 1 << 18, max_requests: int = 256):
        if not AVAILABLE:
            raise RuntimeError("the compiled intake needs libzmq's C API through pyzmq, on Linux")
        self._drain, self._check_copy, self._part_of, self._part_size, self._close_parts = _make_drain()
        self.sock = sock
        self.max_photons = int(max_photons)
        # The arena holds at least one largest event, so any event can take the fast path.
        self.capacity = max(int(capacity), self.max_photons)
        self.max_requests = int(max_requests)
        self.msgs = np.zeros((MAX_PARTS, MSG_BYTES), np.uint8)  # [MAX_PARTS] zmq_msg_t, reused
        self.meta = np.zeros((self.max_requests, 8), np.int64)  # per message taken: see M_* columns
        self.ids = np.zeros((self.max_requests, ID_BYTES), np.uint8)  # per message: its routing id
        self._pool: list[np.ndarray] = []  # arenas, the current one first
        self._new_arena()

    def _new_arena(self) -> None:
        """Make the current arena one no request views (reused: its pages are already mapped), or a new one."""
        for i in range(len(self._pool)):
            # References: the pool's list and getrefcount's argument; any more are views (requests' rows, or
            # self.arena and its flags' row for the current one). No loop variable: enumerate's tuple counts too.
            if sys.getrefcount(self._pool[i]) <= 2:
                self._pool.insert(0, self._pool.pop(i))
                break
        else:
            a = np.zeros((N_ROWS + 1, self.capacity), np.float32)  # [12, capacity]: 11 photon rows, flags' bits
            self._pool.insert(0, a)
            log.debug("intake: %d arenas of %d photons", len(self._pool), self.capacity)
        self.arena = self._pool[0]
        self.bits = self.arena[N_ROWS].view(np.uint32)  # [capacity] uint32, the flags' row
        self.col = 0

    def warm_up(self) -> None:
        """Compile the drain (a server calls this before it accepts requests)."""
        self._drain(0, self.msgs, self.arena, self.bits, 0, 1, 0, self.meta, self.ids, _HEADER)  # takes nothing
        self._close_parts(self.msgs, 0)
        # Compiled without a call: a message that was never received is not one libzmq may be asked about.
        self._part_size.compile((numba.typeof(self.msgs), numba.int64))
        self._part_of.compile((numba.typeof(self.msgs), numba.int64, numba.typeof(np.zeros(1, np.uint8))))

    def take(self) -> list:
        """What is waiting on the socket (up to ``max_requests`` messages), in arrival order."""
        k, col = self._drain(self.sock.underlying, self.msgs, self.arena, self.bits, self.col, self.max_photons,
                             self.max_requests, self.meta, self.ids, _HEADER)  # fmt: skip
        self.col = col
        out = []
        arena, meta, ids = self.arena, self.meta, self.ids  # the arena the fast ones are in (a held one is last)
        for i in range(k):
            kind, event_id, n, c, env, idlen, full, parts = meta[i].tolist()
            identity = ids[i, :idlen].tobytes()
            envelope = [identity, b""] if env == 2 else [identity]
            if kind == KIND_FAST:
                out.append((envelope, _photondata(arena, c, event_id, n, full)))
            elif kind == KIND_ROOM and n <= self.capacity:
                out.append(self._place_held(envelope, event_id, n, env, full, parts))
            else:
                out.append((self._held_frames(parts), None))
        if self.capacity - self.col < self.capacity // 8:
            self._new_arena()
        return out

    def _place_held(self, envelope, event_id, n, env, full, parts):
        """The held request that did not fit the arena's free part: checked and copied into a fresh one."""
        self._new_arena()
        if self._check_copy(self.msgs, env + 2, n, self.arena, self.bits, 0, bool(full)):
            self._close_parts(self.msgs, parts)
            self.col = n
            return envelope, _photondata(self.arena, 0, event_id, n, full)
        return self._held_frames(parts), None  # a value the check refuses: the Python decoder names it

    def _held_frames(self, parts: int) -> list:
        """The held message's frames as bytes (its parts past MAX_PARTS as empty placeholders: only their count
        is known, and no request has that many), and its parts closed."""
        held = min(parts, MAX_PARTS)
        frames = []
        for j in range(held):
            b = np.empty(self._part_size(self.msgs, j), np.uint8)
            self._part_of(self.msgs, j, b)
            frames.append(b.tobytes())
        self._close_parts(self.msgs, held)
        if parts > MAX_PARTS:  # the last part held was overwritten by the ones after it
            frames[-1:] = [b""] * (parts - MAX_PARTS + 1)
        return frames
