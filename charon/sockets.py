"""Multipart receive and send with the least Python per message (every hop of every event uses them)."""

from __future__ import annotations

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
