"""A launcher's child processes end with it.

``charon-batch --procs N`` and ``--gpus`` start child processes (front ends,
GPU workers, per-GPU launchers) and restart any that dies. If the launcher
itself dies without running its clean-up (SIGKILL, an OOM kill), its children
used to live on: a ``--procs`` front end kept listening on the shared port with
no engine behind it, so the kernel kept handing it clients whose events went
nowhere, and a restarted launcher had to share the port with it. Each child
therefore asks the kernel (Linux ``PR_SET_PDEATHSIG``) for SIGTERM when its
launcher ends, and stops as it does on any SIGTERM: it stops receiving, and a
launcher among them stops its own children in turn.

The kernel sends the signal when the *thread* that started the child ends; the
launchers start and restart their children from their main thread only
(``cli._supervise``), which lives as long as the process.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def end_with_parent(parent_pid: int) -> bool:
    """Ask for SIGTERM when ``parent_pid`` (this process's parent) ends. Returns False where the kernel
    offers no such request (not Linux); the caller then lives on as before.

    Raises ``SystemExit`` when the parent is already gone (it died before the request was made, so
    the signal would never come)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent_pid:  # re-parented already: the launcher died before the request
        raise SystemExit(f"charon: launcher {parent_pid} is gone; not starting")
    return True
