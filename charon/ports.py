"""Free local TCP ports for the processes a launcher or a benchmark starts."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux; a common default elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port_range(k: int, tries: int = 200) -> int:
    """A base port p with p .. p+k-1 all free now on every address (metrics of --procs/--gpus workers use
    p + i, served on 0.0.0.0). Drawn below the ephemeral range: a port handed out by the kernel for
    ``bind(0)`` can be taken again by any outgoing connection before the server binds it."""
    import random

    lo, hi = _ephemeral_ports()
    if lo - k > 10_000:
        bottom, top = 10_000, lo - k
    elif 65_536 - k > hi + 1:  # the range starts low: above it
        bottom, top = hi + 1, 65_536 - k
    else:  # the range covers nearly every port: anywhere, and hope
        bottom, top = 1024, 65_536 - k
    for _ in range(tries):
        base = random.randrange(bottom, top)
        socks = []
        try:
            for i in range(k):
                s = socket.socket()
                socks.append(s)
                s.bind(("0.0.0.0", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {k} consecutive free ports found")
