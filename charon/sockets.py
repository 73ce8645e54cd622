"""Multipart receive and send with the least Python per message (every hop of every event uses them)."""

from __future__ import annotations

import math
import select

import zmq

_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
# pyzmq's Socket.send is a Python wrapper (routing_id and group, for draft sockets only) around the
# backend's compiled send, which it calls with keywords. Calling the backend's directly, positionally,
# takes a 4 kB frame from ~1.6 to ~0.7 us; the copy threshold is applied there, so nothing else changes.
_send = zmq.backend.Socket.send


def recv_message(sock) -> list:
    """One multipart message as zmq.Frames, without blocking (raises zmq.Again when none).

    Following ``Frame.more`` instead of ``recv_multipart`` (a getsockopt per part,
    enum flag arithmetic) takes a 14-part PHOTONDATA from ~22 to ~8 us; the
    frames are used zero-copy by numpy.
    """
    recv = sock.recv
    f = recv(_NOBLOCK, copy=False)
    parts = [f]
    while f.more:
        f = recv(0, copy=False)
        parts.append(f)
    return parts


def send_message(sock, parts: list, copy: bool = True) -> None:
    """Send a multipart message with plain-int flags (send_multipart re-derives enum flags per part).

    ``copy=False`` sends large frames zero-copy (pyzmq still copies those under
    ``sock.copy_threshold``, 64 kB by default); their buffers must then stay
    untouched until sent."""
    for f in parts[:-1]:
        _send(sock, f, _SNDMORE, copy)
    _send(sock, parts[-1], 0, copy)


def poll(poller: zmq.Poller, timeout_ms: float) -> dict:
    """``dict(poller.poll(timeout_ms))`` for a fractional timeout too, waiting in the kernel rather than spinning.

    ZeroMQ's poll counts whole milliseconds, so a batch due in 0.3 ms would wait a
    whole one. (On the H100 hosts this changed no measured figure: the front ends'
    lateness there came from busy or descheduled loops, benchmarks/RESULTS.md,
    twelfth session; it applies the configured wait as given.) For a fractional
    timeout the sockets are first polled without waiting, which reads their
    ZMQ_EVENTS and so re-arms their notification fds; then ``select()`` sleeps
    on those fds for exactly the timeout, and a message arriving meanwhile makes
    its fd readable and ends the sleep. (The fifth session's sub-millisecond wait spun through ``poll(0)`` and
    short sleeps, which cost more than it saved.)

    Plain file descriptors registered with the poller (a pipe's read end) are waited on as they are.

    It may return empty before the timeout (an fd also signals commands other than
    a message); callers loop, as the server's does.
    """
    if timeout_ms <= 0:
        return dict(poller.poll(0))
    if timeout_ms == int(timeout_ms):
        return dict(poller.poll(int(timeout_ms)))
    events = dict(poller.poll(0))
    if events:
        return events
    try:
        select.select([s if isinstance(s, int) else s.FD for s, _ in poller.sockets], [], [], timeout_ms / 1e3)
    except ValueError:  # an fd beyond select()'s FD_SETSIZE: ZeroMQ's poll, rounded up
        return dict(poller.poll(math.ceil(timeout_ms)))
    return dict(poller.poll(0))
