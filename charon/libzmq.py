"""libzmq's C functions, as ctypes functions numba can call, from the library pyzmq's backend is linked with.

pyzmq's wheels bundle libzmq (a pyzmq built on a system libzmq links that one); calling the same
library keeps one context, one set of I/O threads and one ``zmq_msg_t`` layout for both. Pointers are
passed as integers (``size_t``: same width and calling convention on Linux), which numba passes as is.
Used by the compiled intake (:mod:`charon.intake`) and the compiled load generator
(:mod:`charon.load_pump`).
"""

from __future__ import annotations

import ctypes
import ctypes.util

MSG_BYTES = 64  # sizeof(zmq_msg_t) in libzmq 4.x


def _load(path):
    try:
        return ctypes.CDLL(path)
    except OSError:
        return None


def _libzmq():
    try:
        from zmq.backend.cython import _zmq

        return _load(_zmq.__file__)
    except (ImportError, AttributeError):
        return None


LIB = _libzmq()
LIBC = _load(ctypes.util.find_library("c"))


def function(lib, name: str, restype, *argtypes):
    """``lib``'s function ``name`` with its C signature set; None when the library or the symbol is missing.

    A new function object each time (``lib[name]``, not ``lib.name``, which ctypes caches and shares): a
    caller's signature never changes another's."""
    if lib is None:
        return None
    try:
        f = lib[name]
    except AttributeError:
        return None
    f.restype, f.argtypes = restype, list(argtypes)
    return f
