"""How much would a compiled front end save? The receive path per request, in Python and compiled.

    python benchmarks/recv_floor.py --requests 20000 --event-size 1000 --batch 50

A front end's first steps for each PHOTONDATA request are: receive its 14 parts (the ROUTER's
identity, the header, meta and 11 rows of 4-byte values), check the values, and copy the rows
into the batch. charon does that in Python (``sockets.recv_message``, ``protocol.decode_photondata``,
``batcher.assemble``: zmq.Frames, 11 ``frombuffer`` views, one numba call for the check, one
concatenation per row and batch). The compiled arm does the same work in one numba function that
calls libzmq's C API (the library pyzmq loaded, on the pyzmq socket's ``underlying`` handle): each
part is received into a ``zmq_msg_t``, and its values are checked and copied into the batch table in
one pass while they are in cache. The difference between the two is the most a compiled receive
path could save per request; what both pay is libzmq's own cost per part, which no front end
written against this protocol avoids. Each arm is also timed receiving only (no check, no copy).

Requests are queued in full before each timed drain (sent by a DEALER over TCP loopback, as
clients do), so the figures are the receiving side's CPU per request, not transport latency.
A benchmark helper, not part of charon.
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np
import zmq

from charon import protocol as P
from charon.client import photondata_frames
from charon.intake import _C
from charon.sockets import recv_message
from charon.sources import random_event

# libzmq's message functions, as the compiled intake finds them (the library pyzmq loaded).
_init, _recv, _data, _size, _more, _close = _C
_DONTWAIT = int(zmq.DONTWAIT)


@numba.njit(nogil=True)
def compiled_drain(sock, msg, table, n_requests, touch):
    """Receive ``n_requests`` PHOTONDATA requests (ROUTER side: identity first) from the socket at address
    ``sock``; with ``touch``, check every value (as ``protocol._check_values``) and copy the rows into
    ``table`` [11, photons] float32 end to end, from its start again whenever the next would not fit.
    Returns (requests, bad values)."""
    p = msg.ctypes.data  # a zmq_msg_t (64 bytes) reused for every part
    got = 0
    bad = 0
    col = 0
    while got < n_requests:
        _init(p)
        if _recv(p, sock, _DONTWAIT) < 0:
            _close(p)
            break
        part = 0
        n = 0
        while True:
            size = _size(p)
            if touch and part >= 3:
                row = numba.carray(_data(p), size).view(np.float32)
                n = row.shape[0]
                r = part - 3
                for i in range(n):
                    v = row[i]
                    if not np.isfinite(v):
                        bad += 1
                    table[r, col + i] = v
            more = _more(p)
            _close(p)
            if not more:
                break
            _init(p)
            _recv(p, sock, 0)
            part += 1
        col += n
        if col + n > table.shape[1]:  # the batch is full: the next one reuses the buffer, as a front end's does
            col = 0
        got += 1
    return got, bad


def python_drain(sock, table, n_requests, touch, batch):
    """The same with charon's own functions: recv_message, decode_photondata, and one concatenation per row
    for each ``batch`` requests (as ``batcher.assemble``)."""
    rows, col = [], 0
    for _ in range(n_requests):
        frames = recv_message(sock)
        if touch:
            rows.append(P.decode_photondata(frames[1:], 1 << 30).rows)
            if len(rows) == batch:
                n = sum(len(r[0]) for r in rows)
                for k, parts in enumerate(zip(*rows)):
                    np.concatenate(parts, out=table[k, col : col + n])
                col = col + n if col + 2 * n <= table.shape[1] else 0
                rows = []
    return n_requests


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20000, help="requests per timed drain")
    ap.add_argument("--event-size", type=int, default=1000, help="photons per request")
    ap.add_argument("--batch", type=int, default=50, help="requests per batch assembled (Python arm)")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args(argv)
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for s in (router, dealer):
        s.setsockopt(zmq.RCVHWM, 0)
        s.setsockopt(zmq.SNDHWM, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    pool = [photondata_frames(k, random_event(a.event_size, np.random.default_rng(k))) for k in range(64)]
    table = np.zeros((11, a.batch * a.event_size), np.float32)  # [11, photons] float32: one batch, reused
    msg = np.zeros(64, np.uint8)  # zmq_msg_t is 64 bytes in libzmq 4.x
    compiled_drain(router.underlying, msg, table, 0, True)  # compile

    def fill():
        for k in range(a.requests):
            dealer.send_multipart(pool[k % len(pool)], copy=False)
        while router.getsockopt(zmq.EVENTS) & zmq.POLLIN == 0:
            time.sleep(0.01)
        time.sleep(0.5 + a.requests * 5e-5)  # let the I/O thread queue them all (~50 us each at most)

    results = {}
    for rep in range(a.repeat):
        for name, touch in (("python", True), ("compiled", True), ("python, receive only", False),
                            ("compiled, receive only", False)):  # fmt: skip
            fill()
            t = time.perf_counter()
            if name.startswith("python"):
                got = python_drain(router, table, a.requests, touch, a.batch)
            else:
                got, bad = compiled_drain(router.underlying, msg, table, a.requests, touch)
                assert bad == 0
            us = (time.perf_counter() - t) / a.requests * 1e6
            assert got == a.requests, (name, got)
            results.setdefault(name, []).append(us)
    print(f"{a.requests} requests of {a.event_size} photons, 14 parts each; us per request, best of {a.repeat}")
    for name, v in results.items():
        print(f"  {name:<24} {min(v):8.2f}   (all: {', '.join(f'{x:.2f}' for x in v)})")
    saving = min(results["python"]) - min(results["compiled"])
    print(f"  compiled saves {saving:.2f} us per request ({saving / min(results['python']):.0%} of this path)")
    router.close(0)
    dealer.close(0)
    ctx.term()
    return results


if __name__ == "__main__":
    main()
