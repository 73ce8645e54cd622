"""Native names for charon's long-lived threads, so `top -H` and /proc show which one is busy."""

from __future__ import annotations

import ctypes
import sys

_PR_SET_NAME = 15


def set_native_thread_name(name: str) -> bool:
    """Name the calling OS thread (Linux prctl; at most 15 bytes). False where not supported.

    Python 3.12 names only the Python-level thread; per-thread CPU accounting
    (benchmarks/cpu_by_process.py) reads the kernel's name."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols: libc's prctl, no library search
        return libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
