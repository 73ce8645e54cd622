"""Does this host take its CPUs away? One spinning process per CPU, recording every gap in its clock.

    python benchmarks/hiccups.py --seconds 15 --json hiccups.json

Each process is pinned to one CPU and reads the monotonic clock in a tight loop (~0.1 us a turn). A gap
longer than ``--threshold-ms`` between two reads is time the process did not run. Its own wait for a CPU
(Linux schedstat ``run_delay``) says whether the guest's scheduler ran something else there; a gap with
no such wait was taken beneath the guest (a virtual machine's CPU descheduled by its hypervisor, which
``steal`` in /proc/stat counts in sum) or by the kernel's own work (interrupts). Run it on an idle host:
it takes every CPU it is given. A server's latency tail made of stalls of the same length and rate as
these gaps is the host's, not the server's (benchmarks/RESULTS.md, twenty-seventh session).
A benchmark helper, not part of charon.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from charon.bench import host_steal_s, process_wait_s  # noqa: E402
from charon.cpus import parse_cpus  # noqa: E402


def meter(cpu: int | None, seconds: float, threshold_ms: float, out=None, started=None) -> dict:
    """Spin on ``cpu`` (None: where the kernel puts it) for ``seconds``; every gap over ``threshold_ms``
    between two clock reads, as (its start, time.time()'s clock, s; its length, s), and the process's wait
    for a CPU meanwhile. Put on ``out`` (a queue) as well as returned; ``started`` (a semaphore) is released
    as the watch begins."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    thr = int(threshold_ms * 1e6)
    clock = time.perf_counter_ns
    starts, lengths = [], []  # [gaps] ns on perf_counter's clock, ns
    wait0 = process_wait_s()
    unix0, t0 = time.time(), clock()
    end = t0 + int(seconds * 1e9)
    last = t0
    if started is not None:
        started.release()
        last = clock()
    while last < end:
        t = clock()
        if t - last > thr:
            starts.append(last)
            lengths.append(t - last)
        last = t
    res = dict(cpu=cpu, seconds=(last - t0) * 1e-9, wait_s=process_wait_s() - wait0,
               gap_start_unix=[unix0 + (s - t0) * 1e-9 for s in starts], gap_s=[g * 1e-9 for g in lengths])
    if out is not None:
        out.put(res)
    return res


def summary(per_cpu: list[dict], steal_s: float | None) -> dict:
    gaps = np.concatenate([np.asarray(c["gap_s"], float) for c in per_cpu]) if per_cpu else np.zeros(0)
    spun = sum(c["seconds"] for c in per_cpu)
    return dict(cpus=len(per_cpu), cpu_seconds=spun,
                gaps_over_1ms_per_cpu_s=float((gaps > 1e-3).sum() / spun) if spun else 0.0,
                gaps_over_5ms_per_cpu_s=float((gaps > 5e-3).sum() / spun) if spun else 0.0,
                gap_ms_max=float(gaps.max() * 1e3) if gaps.size else 0.0,
                gap_share=float(gaps.sum() / spun) if spun else 0.0,  # of the spun time, lost in gaps
                guest_wait_ms=1e3 * sum(c["wait_s"] for c in per_cpu),  # the guest's scheduler ran others
                host_steal_ms=None if steal_s is None else 1e3 * steal_s)  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=15.0, help="how long each CPU is watched (default 15)")
    ap.add_argument("--cpus", default=None, help="Linux CPU list to watch, e.g. 0-15 (default: every CPU this "
                    "process may run on)")  # fmt: skip
    ap.add_argument("--threshold-ms", type=float, default=0.2, help="shortest gap recorded (default 0.2 ms)")
    ap.add_argument("--json", help="write every gap and the summary here")
    a = ap.parse_args(argv)
    cpus = sorted(parse_cpus(a.cpus) or os.sched_getaffinity(0))
    ctx = mp.get_context("spawn")
    q, started = ctx.Queue(), ctx.Semaphore(0)
    steal0 = host_steal_s()
    procs = [ctx.Process(target=meter, args=(c, a.seconds, a.threshold_ms, q, started)) for c in cpus]
    for p in procs:
        p.start()
    for _ in procs:
        started.acquire(timeout=120)
    print(f"hiccups: watching {len(procs)} CPUs for {a.seconds:g} s", file=sys.stderr, flush=True)
    per_cpu = sorted((q.get(timeout=a.seconds + 120) for _ in procs), key=lambda c: c["cpu"])
    for p in procs:
        p.join()
    steal1 = host_steal_s()
    s = summary(per_cpu, None if steal0 is None or steal1 is None else steal1 - steal0)
    print(json.dumps(s, indent=1))
    for c in per_cpu:
        g = np.asarray(c["gap_s"]) * 1e3
        print(f"cpu {c['cpu']:3d}: gaps over 1 ms {int((g > 1).sum()):4d}, over 5 ms {int((g > 5).sum()):3d}, "
              f"max {g.max() if g.size else 0:6.2f} ms, lost {g.sum():7.1f} ms, guest wait {1e3 * c['wait_s']:6.1f} ms")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(summary=s, per_cpu=per_cpu), fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
