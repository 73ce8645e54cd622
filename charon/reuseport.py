"""One TCP port served by several front-end processes, the kernel spreading client connections.

``charon-batch --procs N`` needs N processes to receive from the same address.
Behind a ``zmq.proxy`` every client message crosses two more sockets and the
proxy's I/O threads (on the H200 host: ~65 us of CPU per 1000-photon event and
a hop each way). Instead, each front end opens its own listening socket with
``SO_REUSEPORT`` on the same port and hands it to its ZeroMQ ROUTER
(``ZMQ_USE_FD``); Linux then assigns each incoming TCP connection to one of the
listeners (by a hash of the connection's addresses). A client keeps its
connection, so all its requests and replies stay with one front end; a client
whose front end dies reconnects (ZeroMQ does so by itself) and lands on a live
one.

``SO_REUSEPORT`` lets any process of the same user join the port, which would
let a second charon-batch started by mistake on the same port silently take a
share of the clients. :func:`reserve` therefore first binds the port *without*
the option (fails if anything holds it) and then keeps a bound, never-listening
member of the group for the launcher's lifetime: a second launcher's check then
fails with "Address already in use" (tested), and no connection is ever routed
to the reservation, since only listening sockets receive connections.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

AVAILABLE = hasattr(socket, "SO_REUSEPORT")


def parse_tcp(endpoint: str) -> tuple[str, int]:
    """'tcp://HOST:PORT' -> (host, port); HOST may be '*', a name, an IPv4 or a [bracketed] IPv6 address."""
    if not endpoint.startswith("tcp://"):
        raise ValueError(f"a shared port needs a tcp:// address, got {endpoint!r}")
    rest = endpoint[len("tcp://"):]
    if ";" in rest:
        raise ValueError(f"source-address syntax is not supported with a shared port: {endpoint!r}")
    parts = urlsplit("//" + rest)
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        raise ValueError(f"no valid port in {endpoint!r}")
    host = parts.hostname or "*"
    return host, port


def _addrinfo(host: str, port: int):
    family_host = None if host in ("*", "") else host
    family, _, _, _, sockaddr = socket.getaddrinfo(family_host, port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0]  # raises when unresolvable
    return family, sockaddr


def _socket(family: int, reuseaddr: bool, reuseport: bool) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    if reuseaddr:  # as libzmq does: a restarted server binds over its old connections in TIME_WAIT
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return s


def reserve(endpoint: str) -> tuple[socket.socket, str]:
    """Check that the port is free, then hold it for a group of shared listeners.

    Returns the reservation (keep it open while the front ends run) and the
    endpoint with the actual port (port 0 picks a free one)."""
    if not AVAILABLE:
        raise OSError("SO_REUSEPORT is not available on this system")
    host, port = parse_tcp(endpoint)
    family, sockaddr = _addrinfo(host, port)
    # Linux lets two sockets share a port when both set SO_REUSEADDR and neither listens, or
    # when both set SO_REUSEPORT (same user). The probe sets only the first and the
    # reservation only the second: so the probe fails on any socket that holds the port
    # (another launcher's reservation or listeners, or any other server), and the front
    # ends' listeners (both options) can join the reservation.
    probe = _socket(family, reuseaddr=True, reuseport=False)
    try:
        probe.bind(sockaddr)  # raises EADDRINUSE when anything, another charon-batch included, holds it
        port = probe.getsockname()[1]
    finally:
        probe.close()
    hold = _socket(family, reuseaddr=False, reuseport=True)
    try:
        hold.bind((sockaddr[0], port, *sockaddr[2:]))
    except OSError:
        hold.close()
        raise
    return hold, tcp_endpoint(host, port)


def tcp_endpoint(host: str, port: int) -> str:
    """The inverse of :func:`parse_tcp`: 'tcp://HOST:PORT', an IPv6 address in brackets."""
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def listener(endpoint: str, backlog: int = 1024) -> int:
    """A listening socket on ``endpoint`` that shares the port with the other front ends.

    Returns its file descriptor, owned by the caller from now on (ZeroMQ closes it
    with the socket it is given to through ``ZMQ_USE_FD``)."""
    if not AVAILABLE:
        raise OSError("SO_REUSEPORT is not available on this system")
    host, port = parse_tcp(endpoint)
    if port == 0:
        raise ValueError("a shared port must be given explicitly (the launcher resolves port 0)")
    family, sockaddr = _addrinfo(host, port)
    s = _socket(family, reuseaddr=True, reuseport=True)
    try:
        s.bind(sockaddr)
        s.listen(backlog)
    except OSError:
        s.close()
        raise
    return s.detach()


def bind_shared(sock, endpoint: str) -> str:
    """Bind a ZeroMQ socket to ``endpoint``'s port, shared with the group its launcher reserved.

    The socket listens on a :func:`listener` given to it through ``ZMQ_USE_FD``. Returns the bound endpoint."""
    import os

    import zmq

    fd = listener(endpoint)
    sock.setsockopt(zmq.USE_FD, fd)
    try:
        sock.bind(endpoint)
    except BaseException:
        os.close(fd)  # not yet the socket's: ours to close
        raise
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)
