"""Where the host's CPU goes while a command runs: CPU share per process and thread.

    python benchmarks/cpu_by_process.py --start 4 --window 5 -- python3 -m charon.bench ...

Runs the command, and over [start, start + window] seconds reads utime + stime
of every descendant process and each of its threads from /proc (Linux only),
then prints the busiest threads, a sum per process role and the machine's total
busy cores. It answers "is the host saturated, and by whom" for the serving
benchmarks (issue 5); it is a benchmark helper, not part of charon.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

CLK = os.sysconf("SC_CLK_TCK")


def _children() -> dict[int, int]:
    """pid -> ppid for every process on the machine."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    s = f.read()
                out[int(d)] = int(s[s.rindex(")") + 2:].split()[1])
            except (OSError, ValueError):
                pass
    return out


def _descendants(root: int) -> list[int]:
    parent = _children()
    keep = {root}
    changed = True
    while changed:
        changed = False
        for p, pp in parent.items():
            if pp in keep and p not in keep:
                keep.add(p)
                changed = True
    return sorted(keep)


def _ticks(path: str) -> tuple[str, int]:
    with open(path) as f:
        s = f.read()
    comm = s[s.index("(") + 1:s.rindex(")")]
    fields = s[s.rindex(")") + 2:].split()
    return comm, int(fields[11]) + int(fields[12])  # utime + stime


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return "?"
    return " ".join(a.decode(errors="replace") for a in args if a)


def _role(pid: int) -> str:
    text = _cmdline(pid)
    for key in ("--upstream", "charon.bench", "charon-bench", "multiprocessing", "--procs", "charon.cli", "charon-batch"):
        if key in text:
            i = text.find(key)
            return text[max(0, i - 10):i + 60]
    return text[:70]


def _preempted(path: str) -> int:
    """Involuntary context switches so far: times the thread was runnable but taken off its core."""
    with open(path) as f:
        for line in f:
            if line.startswith("nonvoluntary_ctxt_switches"):
                return int(line.split()[1])
    return 0


def snapshot(root: int) -> dict[tuple[int, int], tuple[str, int, int]]:
    out = {}
    for pid in _descendants(root):
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                comm, t = _ticks(f"/proc/{pid}/task/{tid}/stat")
                out[(pid, int(tid))] = (comm, t, _preempted(f"/proc/{pid}/task/{tid}/status"))
        except OSError:
            pass
    return out


def runnable() -> int:
    """Threads runnable right now, machine-wide (/proc/stat procs_running)."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("procs_running"):
                return int(line.split()[1])
    return 0


def machine_busy() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", type=float, default=2.0, help="seconds after the trigger process appears to begin the window")
    ap.add_argument("--trigger", default="multiprocessing",
                    help="the window starts once a descendant whose command line contains this appears "
                         "(charon-bench's load processes); '' to time from launch")
    ap.add_argument("--window", type=float, default=5.0, help="length of the measured window, seconds")
    ap.add_argument("--top", type=int, default=25, help="threads to list")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- command to run")
    a = ap.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    proc = subprocess.Popen(cmd)
    while a.trigger and proc.poll() is None and not any(a.trigger in _cmdline(p) for p in _descendants(proc.pid)[1:]):
        time.sleep(0.2)
    time.sleep(a.start)
    s0, m0, t0 = snapshot(proc.pid), machine_busy(), time.perf_counter()
    samples = []  # runnable threads, every 20 ms: above the core count, someone waits for a core
    while time.perf_counter() < t0 + a.window:
        samples.append(runnable())
        time.sleep(0.02)
    s1, m1, t1 = snapshot(proc.pid), machine_busy(), time.perf_counter()
    dt = t1 - t0
    rows = []
    by_pid: dict[int, float] = {}
    preempt_by_pid: dict[int, float] = {}
    for key, (comm, t, nv) in s1.items():
        before = s0.get(key, (comm, 0, 0))
        d = (t - before[1]) / CLK / dt
        rows.append((d, key[0], key[1], comm))
        preempt_by_pid[key[0]] = preempt_by_pid.get(key[0], 0.0) + (nv - before[2]) / dt
    rows.sort(reverse=True)
    for d, pid, _, _ in rows:
        by_pid[pid] = by_pid.get(pid, 0.0) + d
    ncpu = os.cpu_count()
    over = sum(1 for x in samples if x > ncpu) / max(1, len(samples))
    lines = [f"# window {dt:.1f} s; machine busy cores {(m1[0] - m0[0]) / max(1, m1[1] - m0[1]) * ncpu:.2f} of {ncpu}",
             f"# descendants busy cores {sum(by_pid.values()):.2f}",
             f"# runnable threads (every 20 ms): mean {sum(samples) / max(1, len(samples)):.1f}, "
             f"max {max(samples, default=0)}, more than {ncpu} in {100 * over:.0f} % of samples",
             f"# involuntary context switches: {sum(preempt_by_pid.values()):.0f} /s",
             "", "## per process (cores, involuntary switches /s)"]
    for pid, d in sorted(by_pid.items(), key=lambda kv: -kv[1]):
        if d >= 0.01:
            lines.append(f"{d:6.2f} {preempt_by_pid.get(pid, 0.0):8.0f}  pid {pid:<7d} {_role(pid)}")
    lines += ["", "## busiest threads (cores)"]
    for d, pid, tid, comm in rows[: a.top]:
        lines.append(f"{d:6.2f}  pid {pid:<7d} tid {tid:<7d} {comm}")
    print("\n".join(lines), flush=True)
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
