"""Helpers for tests about processes."""

import subprocess
import sys


def gone_pids(k: int) -> list[int]:
    """Pids of k processes that have exited (and been reaped): what a killed process tree leaves in names."""
    procs = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(k)]
    for p in procs:
        p.wait(30)
    return [p.pid for p in procs]
