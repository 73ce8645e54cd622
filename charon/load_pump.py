"""Compiled load generator for charon-bench (``--load-driver compiled``): requests out, replies in, in numba.

charon-bench's load runs on the server's own host, and each Python load process spent ~46 us of its main
thread per event on sends, receives and timestamps (benchmarks/RESULTS.md, twenty-first session): CPU taken
from the server it measures. Here one numba function does a load process's whole loop through libzmq's C
API (:mod:`charon.libzmq`) on the pyzmq sockets' ``underlying`` handles: it sends each request, waits on
the sockets' notification fds with ``epoll_wait``, reads each reply's status and event id, and keeps the
send time and round trip in preallocated arrays. It returns to Python every ``slice_s`` so that the
progress bar moves; what goes over the wire is exactly what the Python loop sends.

Wire layout sent (PROTOCOL.md, dialect A; a DEALER adds the empty delimiter a REQ socket adds itself)::

    [(empty,) PHOTONDATA, meta u32[2] = (event_id, n), x, y, z, dx, dy, dz, polx, poly, polz, wavelength, t]

The eleven rows are zero-copy messages over the load process's photon pool (``zmq_msg_init_data`` with no
free function: the pool outlives the sockets). A reply counts as answered when its status frame is
exactly ``SIM_COMPLETE`` and its event id is one in flight, as in the Python loop; anything else counts as
failed. With client think times (``--think-ms``) the request that follows the k-th reply waits ``think[k]``
in a table of due times (one slot per request a client may hold), as the Python loop's heap does; the wait
is ``epoll_wait``'s, to the millisecond, which delays a send, never a measured round trip.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import select
import sys

import numba
import numpy as np
import zmq

from . import libzmq as Z
from . import protocol as P

N_ROWS = 11
# struct epoll_event: u32 events, then the u64 data whose low half is the fd (select.epoll registers so);
# glibc packs it on x86-64 only.
_PACKED = platform.machine() in ("x86_64", "AMD64")
EPOLL_EVENT_BYTES, EPOLL_DATA_OFFSET = (12, 4) if _PACKED else (16, 8)
MAX_EVENTS = 64  # fds taken per epoll_wait
CLOCK_MONOTONIC = 1  # time.monotonic's clock on Linux: the send times are compared with the parent's
# State (``LoadPump.state``, int64): requests sent, replies taken, failed replies, answered (kept) events,
# whether the first requests went out, requests waiting out a think time.
S_SENT, S_DONE, S_FAILED, S_ANSWERED, S_STARTED, S_LATER = range(6)


def _functions():
    size_t, c_int = ctypes.c_size_t, ctypes.c_int
    extra = (Z.function(Z.LIB, "zmq_send", c_int, size_t, size_t, size_t, c_int),
             Z.function(Z.LIB, "zmq_msg_init_data", c_int, size_t, size_t, size_t, size_t, size_t),
             Z.function(Z.LIB, "zmq_msg_send", c_int, size_t, size_t, c_int), Z.function(Z.LIB, "zmq_errno", c_int),
             Z.function(Z.LIBC, "clock_gettime", c_int, c_int, size_t),
             Z.function(Z.LIBC, "epoll_wait", c_int, c_int, size_t, c_int, c_int))  # fmt: skip
    return None if Z.MESSAGE is None or any(f is None for f in extra) else Z.MESSAGE + extra


_C = _functions()
AVAILABLE = _C is not None and sys.platform.startswith("linux")


def _make_pump():
    (msg_init, msg_recv, msg_data, msg_size, msg_more, msg_close,
     zmq_send, msg_init_data, msg_send, zmq_errno, clock_gettime, epoll_wait) = _C  # fmt: skip
    eintr = errno.EINTR
    sndmore, dontwait = int(zmq.SNDMORE), int(zmq.DONTWAIT)
    ok_status = np.frombuffer(P.SIM_COMPLETE, np.uint8).copy()
    ev_bytes, ev_data = EPOLL_EVENT_BYTES, EPOLL_DATA_OFFSET

    @numba.njit(cache=False)
    def now(ts):
        clock_gettime(CLOCK_MONOTONIC, ts.ctypes.data)
        return ts[0] + ts[1] * 1e-9

    @numba.njit(cache=False)
    def send_bytes(sock, address, size, flags):
        """One part, copied; retried when a signal interrupts it, so that a request is never cut in two."""
        while zmq_send(sock, address, size, flags) < 0 and zmq_errno() == eintr:
            pass

    @numba.njit(cache=False)
    def send(sock, i, dealer, sizes, first_id, pool, header, meta, msg, sent_at, ts):
        """Request ``i`` of this process: event ``first_id + i``, the first ``sizes[i]`` photons of the pool."""
        n = sizes[i]
        meta[0] = first_id + i
        meta[1] = n
        sent_at[i] = now(ts)  # as the Python loop: the round trip includes the send
        if dealer:
            send_bytes(sock, header.ctypes.data, 0, sndmore)
        send_bytes(sock, header.ctypes.data, header.size, sndmore)
        send_bytes(sock, meta.ctypes.data, 8, sndmore)
        base, row = pool.ctypes.data, pool.strides[0]
        p = msg.ctypes.data
        for r in range(N_ROWS):
            msg_init_data(p, base + r * row, 4 * n, 0, 0)
            while msg_send(p, sock, sndmore if r < N_ROWS - 1 else 0) < 0 and zmq_errno() == eintr:
                pass  # the message is still ours after a failed send: the same one is sent again

    @numba.njit(cache=False)
    def take(sock, msg):
        """One whole reply: (-2, False) when none is waiting, else (its event id or -1, status is SIM_COMPLETE)."""
        p = msg.ctypes.data
        msg_init(p)
        if msg_recv(p, sock, dontwait) < 0:
            msg_close(p)
            return -2, False
        j, eid, ok = 0, -1, False
        while True:
            size = msg_size(p)
            if not (j == 0 and size == 0):  # a DEALER's empty delimiter is not a part of the reply
                data = numba.carray(msg_data(p), size)
                if j == 0 and size == ok_status.size:
                    ok = True
                    for b in range(size):
                        if data[b] != ok_status[b]:
                            ok = False
                if j == 1 and size == 4:
                    eid = np.int64(data[0]) | (np.int64(data[1]) << 8) | (np.int64(data[2]) << 16)
                    eid |= np.int64(data[3]) << 24
                j += 1
            more = msg_more(p)
            msg_close(p)
            if not more:
                return eid, ok
            msg_init(p)
            msg_recv(p, sock, 0)  # the rest of a message is there once its first part is

    @numba.njit(cache=False)
    def drain(k, socks, dealer, sizes, first_id, pool, header, meta, msg, sent_at, ts, state,
              out_sent, out_rtt, out_photons, deadline, think, later_at, later_sock):  # fmt: skip
        """Every reply waiting on socket ``k``, each followed by the socket's next request while any is left,
        at once or after the client's think time (into a free slot of ``later_at``). A REQ socket holds
        one request, so it is read again only when its fd says so; a DEALER's is read until empty, after
        each send too (a send can take the fd's edge), whatever its depth."""
        sock = socks[k]
        n_events = sizes.shape[0]
        while True:
            eid, ok = take(sock, msg)
            if eid == -2:
                return
            t = now(ts)
            state[S_DONE] += 1
            i = eid - first_id
            if ok and 0 <= i < state[S_SENT] and sent_at[i] > 0.0:
                a = state[S_ANSWERED]
                out_sent[a] = sent_at[i]
                out_rtt[a] = t - sent_at[i]
                out_photons[a] = sizes[i]
                state[S_ANSWERED] = a + 1
                sent_at[i] = -1.0  # answered: a second reply for it counts as failed
            else:
                state[S_FAILED] += 1
            if state[S_SENT] + state[S_LATER] < n_events and t < deadline:
                pause = think[state[S_DONE] - 1]
                if pause > 0.0:  # the client works on its next event first
                    for j in range(later_at.shape[0]):
                        if later_at[j] < 0.0:
                            later_at[j] = t + pause
                            later_sock[j] = k
                            state[S_LATER] += 1
                            break
                else:
                    send(sock, state[S_SENT], dealer, sizes, first_id, pool, header, meta, msg, sent_at, ts)
                    state[S_SENT] += 1
            if not dealer:
                return

    @numba.njit(cache=False)
    def due(socks, dealer, sizes, first_id, pool, header, meta, msg, sent_at, ts, state, out_sent, out_rtt,
            out_photons, deadline, think, later_at, later_sock):  # fmt: skip
        """Send every request whose think time is over (none past the deadline); the time the next one is
        due, or +inf."""
        t = now(ts)
        nxt = np.inf
        for j in range(later_at.shape[0]):
            if later_at[j] < 0.0:
                continue
            if later_at[j] <= t:
                later_at[j] = -1.0
                state[S_LATER] -= 1
                if t < deadline:
                    k = later_sock[j]
                    send(socks[k], state[S_SENT], dealer, sizes, first_id, pool, header, meta, msg, sent_at, ts)
                    state[S_SENT] += 1
                    drain(k, socks, dealer, sizes, first_id, pool, header, meta, msg, sent_at, ts, state,
                          out_sent, out_rtt, out_photons, deadline, think, later_at, later_sock)  # fmt: skip
            else:
                nxt = min(nxt, later_at[j])
        return nxt

    @numba.njit(cache=False)
    def pump(socks, fd_sock, epfd, evbuf, dealer, depth, sizes, first_id, pool, header, meta, msg, sent_at, ts,
             state, out_sent, out_rtt, out_photons, deadline, until, think, later_at, later_sock):  # fmt: skip
        """Run the load until ``until`` (then return False) or until it is over: every request answered and
        none waiting out a think time, or ``deadline`` passed (True). The first call sends each socket's
        first ``depth`` requests."""
        n_events = sizes.shape[0]
        if state[S_STARTED] == 0:
            state[S_STARTED] = 1
            for k in range(socks.shape[0]):
                for _ in range(depth):
                    if state[S_SENT] < n_events:
                        send(socks[k], state[S_SENT], dealer, sizes, first_id, pool, header, meta, msg, sent_at, ts)
                        state[S_SENT] += 1
            for k in range(socks.shape[0]):  # replies may have come in while sending
                drain(k, socks, dealer, sizes, first_id, pool, header, meta, msg, sent_at, ts, state,
                      out_sent, out_rtt, out_photons, deadline, think, later_at, later_sock)  # fmt: skip
        max_events = evbuf.shape[0] // ev_bytes
        while True:
            nxt = np.inf
            if state[S_LATER] > 0:
                nxt = due(socks, dealer, sizes, first_id, pool, header, meta, msg, sent_at, ts, state, out_sent,
                          out_rtt, out_photons, deadline, think, later_at, later_sock)  # fmt: skip
            t = now(ts)
            if (state[S_DONE] >= state[S_SENT] and state[S_LATER] == 0) or t >= deadline:
                return True  # checked before waiting: no idle wait after the last reply in the timed span
            if t >= until:
                return False
            wait_ms = int((min(until, deadline, nxt) - t) * 1e3) + 1
            got = epoll_wait(epfd, evbuf.ctypes.data, max_events, wait_ms)
            for e in range(max(got, 0)):
                o = e * ev_bytes + ev_data
                fd = np.int64(evbuf[o]) | (np.int64(evbuf[o + 1]) << 8) | (np.int64(evbuf[o + 2]) << 16)
                k = fd_sock[fd] if fd < fd_sock.shape[0] else -1
                if k >= 0:
                    drain(k, socks, dealer, sizes, first_id, pool, header, meta, msg, sent_at, ts,
                          state, out_sent, out_rtt, out_photons, deadline, think, later_at, later_sock)  # fmt: skip
            if got == 0:  # a quiet wait: read every socket, so that an fd edge missed cannot stall a client
                for k in range(socks.shape[0]):
                    drain(k, socks, dealer, sizes, first_id, pool, header, meta, msg, sent_at, ts, state,
                          out_sent, out_rtt, out_photons, deadline, think, later_at, later_sock)  # fmt: skip

    return pump


_PUMP = None


def _compiled():
    global _PUMP
    if _PUMP is None:
        if not AVAILABLE:
            raise RuntimeError("the compiled load generator needs Linux and libzmq's C API through pyzmq")
        _PUMP = _make_pump()
    return _PUMP


class LoadPump:
    """One load process's sockets and their requests, driven by the compiled loop.

    ``sizes`` [n_events] int64, photons of each request; ``pool`` [11, >= max(sizes)] float32, the photons
    every request takes its first ``sizes[i]`` columns of (C-contiguous rows); ``think`` [n_events] float64 s
    or None, the pause after the k-th reply before its client's next request. After :meth:`run` returns True,
    :meth:`results` gives each answered event's send time (s, ``time.monotonic``'s clock), round trip (s) and
    photons."""

    def __init__(self, socks: list, dealer: bool, depth: int, sizes: np.ndarray, first_id: int, pool: np.ndarray,
                 think: np.ndarray | None = None):
        self._run = _compiled()
        self.socks = socks  # the pyzmq sockets: they own the handles
        self.handles = np.array([s.underlying for s in socks], np.uint64)  # [n_sockets] void* as integers
        self.dealer, self.depth, self.first_id = bool(dealer), int(depth), int(first_id)
        self.sizes = np.ascontiguousarray(sizes, np.int64)
        self.pool = np.ascontiguousarray(pool, np.float32)
        if self.pool.ndim != 2 or self.pool.shape[0] != N_ROWS or (self.sizes.size and self.sizes.max() > pool.shape[1]):
            raise ValueError(f"pool must be [11, >= the largest event], not {pool.shape}")
        self.think = np.zeros(self.sizes.size, np.float64) if think is None else np.ascontiguousarray(think, np.float64)
        if self.think.shape != self.sizes.shape or (self.think < 0).any() or not np.isfinite(self.think).all():
            raise ValueError(f"think must be [n_events] finite seconds >= 0, not shape {self.think.shape}")
        # A client holds at most ``depth`` requests, in flight or waiting out a think time: one slot each.
        self.later_at = np.full(len(socks) * self.depth, -1.0)  # [slots] s when due (time.monotonic), -1 free
        self.later_sock = np.zeros(len(socks) * self.depth, np.int64)  # [slots] socket index
        self.epoll = select.epoll()
        fds = [s.FD for s in socks]
        self.fd_sock = np.full(max(fds, default=0) + 1, -1, np.int64)  # [max fd + 1] socket index by fd
        for k, fd in enumerate(fds):
            self.fd_sock[fd] = k
            self.epoll.register(fd, select.EPOLLIN)
        self.evbuf = np.zeros(MAX_EVENTS * EPOLL_EVENT_BYTES, np.uint8)
        self.header = np.frombuffer(P.PHOTONDATA, np.uint8).copy()
        self.meta = np.zeros(2, np.uint32)
        self.msg = np.zeros(Z.MSG_BYTES, np.uint8)  # one zmq_msg_t, reused for every part
        self.ts = np.zeros(2, np.int64)  # struct timespec
        n = self.sizes.size
        self.sent_at = np.zeros(n, np.float64)  # [n_events] s, send time of each request in flight, -1 answered
        self.state = np.zeros(6, np.int64)
        self.out_sent = np.empty(n, np.float64)  # [answered] s
        self.out_rtt = np.empty(n, np.float64)  # [answered] s
        self.out_photons = np.empty(n, np.int64)  # [answered]

    def run(self, deadline: float, until: float) -> bool:
        """Drive the load until ``until`` (False) or until it is over (True); times on ``time.monotonic``'s clock."""
        return bool(self._run(self.handles, self.fd_sock, self.epoll.fileno(), self.evbuf, self.dealer, self.depth,
                              self.sizes, self.first_id, self.pool, self.header, self.meta, self.msg, self.sent_at,
                              self.ts, self.state, self.out_sent, self.out_rtt, self.out_photons, float(deadline),
                              float(until), self.think, self.later_at, self.later_sock))  # fmt: skip

    @property
    def sent(self) -> int:
        return int(self.state[S_SENT])

    @property
    def done(self) -> int:
        return int(self.state[S_DONE])

    @property
    def failed(self) -> int:
        return int(self.state[S_FAILED])

    def results(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a = int(self.state[S_ANSWERED])
        return self.out_sent[:a].copy(), self.out_rtt[:a].copy(), self.out_photons[:a].copy()

    def close(self) -> None:
        self.epoll.close()


def warm_up() -> None:
    """Compile the loop (a few seconds) before the load starts, with the types a real run passes."""
    pump = LoadPump([], True, 1, np.zeros(0, np.int64), 0, np.zeros((N_ROWS, 1), np.float32))
    try:
        pump.run(0.0, 0.0)
    finally:
        pump.close()
