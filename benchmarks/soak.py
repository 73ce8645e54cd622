"""Does a server's memory stay flat over millions of events? A soak run with the server's footprint sampled.

    python benchmarks/soak.py --minutes 10 --interval 15 --json soak.json \\
        --bench "--clients 64 --client-mode dealer --in-flight 4 --event-size 1000 --load-procs 2" \\
        -- --engine cpu --detector demo --procs 2

Starts charon-batch with the flags after ``--`` (as ``charon-bench --spawn-server`` does), drives it
with charon-bench for ``--minutes`` (or ``--events``) in a separate process, and every ``--interval`` seconds reads, for
every process of the server (the launcher and what it started; Linux /proc): resident memory, open
file descriptors and threads; the server's shared-memory segments under /dev/shm; and the events
answered so far (``charon_events_total``); and, from each process's metrics endpoint, the C heap's own
account (``process_malloc_in_use_bytes`` and ``process_malloc_free_bytes``, glibc), which tells memory
still in use from free memory the allocator keeps. A production server runs for weeks: memory that grows
with the events served ends it, however slowly. The summary fits resident memory against events
answered over the run after ``--settle`` (its first part, while buffers and caches reach their
working size) and states the growth per million events. A benchmark helper, not part of charon.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_by_process import _descendants  # noqa: E402

from charon.bench import merged, scrape_each, spawned_server  # noqa: E402
from charon.handoff import NAME_RE, SHM_DIR  # noqa: E402


_STATUS_KB = ("VmRSS", "RssAnon", "RssShmem")  # /proc/PID/status lines read, in kB


def footprint(pid: int) -> dict | None:
    """Resident MB (all, and its anonymous and shared-memory parts), open fds and threads of one process;
    None once it is gone.

    The parts matter: a front end's batch buffers are /dev/shm segments of fixed size (handoff.py),
    and its RSS counts only the pages it has touched, so RSS rises towards their size as larger
    batches come (``rss_shmem_mb``) without anything leaking. Growth of ``rss_anon_mb`` is the heap's."""
    try:
        with open(f"/proc/{pid}/status") as f:
            kb = {k: int(v.split()[0]) for k, _, v in (ln.partition(":") for ln in f) if k in _STATUS_KB}
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except (OSError, IndexError, ValueError):
        return None
    return {"rss_mb": kb.get("VmRSS", 0) / 1024,
            "rss_anon_mb": kb.get("RssAnon", 0) / 1024, "rss_shmem_mb": kb.get("RssShmem", 0) / 1024,
            "fds": fds, "threads": threads}  # fmt: skip


def shm_mb() -> tuple[int, float]:
    """(count, MB) of charon's shared-memory segments (handoff.py's names and directory)."""
    try:
        names = [n for n in os.listdir(SHM_DIR) if NAME_RE.match(n)]
    except OSError:
        return 0, 0.0
    size = 0
    for n in names:
        try:
            size += os.stat(os.path.join(SHM_DIR, n)).st_blocks * 512
        except OSError:
            pass
    return len(names), size / 2**20


def growth(samples: list[dict], settle: float) -> dict:
    """Least-squares slope of the server's resident MB against events answered, over the samples after the
    first ``settle`` share of the run; MB per million events, and the first and last RSS of that span."""
    if len(samples) < 3:
        return {"mb_per_million_events": None, "samples": len(samples)}
    t_end = samples[-1]["t"]
    span = [s for s in samples if s["t"] >= settle * t_end]
    if len(span) < 3:
        span = samples[-3:]
    ev = np.array([s["events"] for s in span], float)
    rss = np.array([s["rss_mb"] for s in span], float)
    if ev[-1] - ev[0] <= 0:
        return {"mb_per_million_events": None, "samples": len(span)}
    slope = float(np.polyfit(ev / 1e6, rss, 1)[0])

    def fitted(key):  # MB per million events of another summed figure, if every sample of the span has it
        v = [s.get(key) for s in span]
        return float(np.polyfit(ev / 1e6, np.array(v, float), 1)[0]) if None not in v else None

    # Which process grew: each one's resident MB over the span (a restarted process is a new pid).
    first, last = span[0].get("rss_mb_by_pid", {}), span[-1].get("rss_mb_by_pid", {})
    by_pid = {p: round(last[p] - first[p], 2) for p in first if p in last}
    # The C heap's account (process_malloc_*_bytes, summed over the endpoints): in use grows with a
    # leak or growing buffers, free with fragmentation; either shows in RSS.
    return {"mb_per_million_events": slope, "anon_mb_per_million_events": fitted("rss_anon_mb"),
            "malloc_in_use_mb_per_million_events": fitted("malloc_in_use_mb"),
            "malloc_free_mb_per_million_events": fitted("malloc_free_mb"),
            "samples": len(span), "events": float(ev[-1] - ev[0]),
            "rss_first_mb": float(rss[0]), "rss_last_mb": float(rss[-1]),
            "fds": [span[0]["fds"], span[-1]["fds"]], "threads": [span[0]["threads"], span[-1]["threads"]],
            "shm_mb": [span[0]["shm_mb"], span[-1]["shm_mb"]], "rss_growth_mb_by_pid": by_pid}  # fmt: skip


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("give the server's flags after --")
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="how long the load runs (default 10)")
    ap.add_argument("--events", type=float, default=3e6,
                    help="events to send at most (charon-bench keeps a record of each: default 3e6)")
    ap.add_argument("--interval", type=float, default=15.0, help="seconds between samples (default 15)")
    ap.add_argument("--settle", type=float, default=0.2,
                    help="share of the run left out of the fit while buffers reach their size (default 0.2)")
    ap.add_argument("--bench", default="--clients 64 --client-mode dealer --in-flight 4 --event-size 1000",
                    help="charon-bench flags for the load (its --address, --duration and --events are set here)")
    ap.add_argument("--json", help="write the samples and the summary here")
    a = ap.parse_args(argv[:cut])
    server_args = argv[cut + 1:]
    me = os.getpid()
    samples = []

    def save(samples, summary):
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"server_args": server_args, "bench": a.bench, "samples": samples, "summary": summary}, f,
                          indent=1)  # fmt: skip
    with spawned_server(server_args) as (address, murl):
        load = subprocess.Popen([sys.executable, "-m", "charon.bench", "--address", address, "--no-progress",
                                 "--duration", str(a.minutes * 60), "--events", str(int(a.events)), *shlex.split(a.bench)],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        t0 = time.monotonic()
        print(f"{'t s':>7} {'events':>10} {'RSS MB':>8} {'anon MB':>8} {'shmem MB':>8} {'max proc MB':>11} {'fds':>5} "
              f"{'threads':>7} {'shm MB':>7}")  # fmt: skip
        try:
            while True:
                done = load.poll() is not None
                # The server's processes now: the launcher and its descendants (a restarted one has a new pid).
                pids = set(_descendants(me)) - {me} - set(_descendants(load.pid))
                by_pid = {p: f for p in sorted(pids) if (f := footprint(p)) is not None}
                each = list(by_pid.values())
                n_shm, mb_shm = shm_mb()
                endpoints = scrape_each(murl)  # each serving process's figures (front ends, shared engine)
                s = {"t": round(time.monotonic() - t0, 1), "events": merged(endpoints).get("charon_events_total", 0.0),
                     "rss_mb": sum(f["rss_mb"] for f in each), "rss_max_mb": max((f["rss_mb"] for f in each), default=0),
                     "rss_anon_mb": sum(f["rss_anon_mb"] for f in each),
                     "rss_shmem_mb": sum(f["rss_shmem_mb"] for f in each),
                     "fds": sum(f["fds"] for f in each), "threads": sum(f["threads"] for f in each),
                     "processes": len(each), "shm_segments": n_shm, "shm_mb": mb_shm,
                     "rss_mb_by_pid": {str(p): round(f["rss_mb"], 2) for p, f in by_pid.items()},
                     "rss_anon_mb_by_pid": {str(p): round(f["rss_anon_mb"], 2) for p, f in by_pid.items()}}  # fmt: skip
                # The C heap's account, where the endpoints give it (glibc), beside each endpoint's RSS: growth
                # in neither in_use nor free (arena) is outside malloc, e.g. CPython's own object arenas.
                for name in ("malloc_in_use", "malloc_free", "malloc_arena", "malloc_mmap", "resident_memory"):
                    mb = [e[f"process_{name}_bytes"] / 2**20 for e in endpoints if f"process_{name}_bytes" in e]
                    if mb and len(mb) == len(endpoints):
                        s[f"{name}_mb"] = sum(mb)
                        s[f"{name}_mb_by_endpoint"] = [round(v, 2) for v in mb]
                samples.append(s)
                print(f"{s['t']:>7.0f} {s['events']:>10.0f} {s['rss_mb']:>8.1f} {s['rss_anon_mb']:>8.1f} "
                      f"{s['rss_shmem_mb']:>8.1f} {s['rss_max_mb']:>11.1f} {s['fds']:>5d} {s['threads']:>7d} "
                      f"{s['shm_mb']:>7.1f}", flush=True)  # fmt: skip
                save(samples, None)  # after every sample: a run cut short keeps what it measured
                # Done: the load has ended, or its time is up and no event came since the last sample
                # (charon-bench then works through its records, ~1 min for 20 M events: not the server's time).
                if done or (s["t"] > a.minutes * 60 and len(samples) > 1 and s["events"] == samples[-2]["events"]):
                    break
                time.sleep(max(0.0, a.interval - (time.monotonic() - t0 - s["t"])))
        finally:
            try:
                out = load.communicate(timeout=180)[0]
            except subprocess.TimeoutExpired:
                load.terminate()
                out = load.communicate()[0]
    summary = growth(samples, a.settle)
    summary["load_report"] = out.strip().splitlines()[-3:] if out else []
    print(json.dumps(summary, indent=1))
    save(samples, summary)
    return 0 if load.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
