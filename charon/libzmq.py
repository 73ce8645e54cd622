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


def message_functions():
    """(zmq_msg_init, zmq_msg_recv, zmq_msg_data, zmq_msg_size, zmq_msg_more, zmq_msg_close), or None when any
    is missing. ``zmq_msg_data`` returns a uint8 pointer, which ``numba.carray`` wraps without a copy."""
    size_t, c_int = ctypes.c_size_t, ctypes.c_int
    fns = (function(LIB, "zmq_msg_init", c_int, size_t),
           function(LIB, "zmq_msg_recv", c_int, size_t, size_t, c_int),
           function(LIB, "zmq_msg_data", ctypes.POINTER(ctypes.c_uint8), size_t),
           function(LIB, "zmq_msg_size", size_t, size_t), function(LIB, "zmq_msg_more", c_int, size_t),
           function(LIB, "zmq_msg_close", c_int, size_t))  # fmt: skip
    return None if any(f is None for f in fns) else fns


MESSAGE = message_functions()  # shared by the compiled intake and load loop: the same signatures
