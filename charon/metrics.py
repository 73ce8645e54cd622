"""Prometheus metrics of the batching server and of the router (prometheus-client, a registry each)."""

from __future__ import annotations

import collections
import ctypes
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_PHOTON_BUCKETS = (1e2, 1e3, 1e4, 3e4, 1e5, 3e5, 1e6, 3e6, 5e6, 1e7)
_SECOND_BUCKETS = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
# charon_event_seconds (an event's time inside the server): every bound of _SECOND_BUCKETS (charon-bench reads
# the shares over 3, 10 and 30 ms at them), and more between 0.5 and 10 ms, where it lies below saturation, so
# that its percentiles can be read from the buckets to ~0.5 ms (bench.histogram_quantile), and about two per
# decade above. At 1000-photon events on an H100 host it runs 1-3 ms at light load, 5-70 ms at saturation and
# 1-3 s when a loaded server runs one event per call; the extra bounds cost each observation a few more
# comparisons (prometheus-client scans the bounds in order).
_EVENT_BUCKETS = (1e-4, 5e-4, 1e-3, 1.5e-3, 2e-3, 2.5e-3, 3e-3, 4e-3, 5e-3, 7.5e-3, 1e-2, 2e-2, 3e-2, 5e-2, 0.1, 0.2,
                  0.3, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0)


class BusyClock:
    """Fraction of wall time the engine was busy over a sliding window (default 10 s).

    Thread-safe: the engine thread records intervals, the metrics thread reads.
    """

    def __init__(self, window: float = 10.0):
        self.window = window
        self._lock = threading.Lock()
        self._intervals: collections.deque = collections.deque()
        self._busy_since: float | None = None
        self._start = time.monotonic()
        self.total_busy = 0.0

    def start(self):
        with self._lock:
            self._busy_since = time.monotonic()

    def stop(self):
        with self._lock:
            now = time.monotonic()
            if self._busy_since is not None:
                self._intervals.append((self._busy_since, now))
                self.total_busy += now - self._busy_since
            self._busy_since = None
            while self._intervals and self._intervals[0][1] < now - self.window:
                self._intervals.popleft()

    def fraction(self) -> float:
        with self._lock:
            now = time.monotonic()
            lo = max(now - self.window, self._start)
            busy = sum(max(0.0, b - max(a, lo)) for a, b in self._intervals)
            if self._busy_since is not None:
                busy += now - max(self._busy_since, lo)
            return busy / (now - lo) if now > lo else 0.0


class _Mallinfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc >= 2.33): bytes, summed over all of the process's arenas."""

    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip


def _mallinfo2():
    """glibc's ``mallinfo2`` as a ctypes function, or None (another C library, or glibc < 2.33)."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):
        return None
    fn.restype, fn.argtypes = _Mallinfo2, []
    return fn


class MallocCollector:
    """The C heap's own account (glibc's ``mallinfo2``, read when scraped): ``process_malloc_*_bytes``.

    Resident memory that grows with the events served is either memory still in use (something keeps
    allocations: a leak, or buffers that grow) or free memory the allocator holds on to (fragmentation).
    RSS cannot tell them apart, and Python's tracemalloc sees neither libzmq's nor numba's allocations;
    these figures can (benchmarks/RESULTS.md: memory over millions of events). They cost a pass over the
    allocator's arenas per scrape, nothing per event. Nothing is exposed on a C library without ``mallinfo2``.
    """

    def __init__(self, registry: CollectorRegistry | None = None, read=None):
        self._read = read if read is not None else _mallinfo2()
        if registry is not None:
            registry.register(self)

    def collect(self):
        if self._read is None:
            return
        m = self._read()
        for name, value, doc in (
            ("in_use", m.uordblks + m.hblkhd, "C heap bytes allocated and not freed (malloc'd blocks, mmapped ones "
             "included)"),
            ("free", m.fordblks, "C heap bytes freed but held by the allocator in its arenas (fragmentation when "
             "it grows)"),
            ("arena", m.arena, "C heap bytes the allocator took from the system for its arenas (not mmapped "
             "blocks)"),
            ("mmap", m.hblkhd, "C heap bytes in blocks mmapped one by one (large allocations)"),
        ):  # fmt: skip
            yield GaugeMetricFamily(f"process_malloc_{name}_bytes", doc, value=float(value))


def _thread_names() -> dict[int, str]:
    """Python's threads by native id: their names ("MainThread", the engine thread's, ...)."""
    return {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}


def read_thread_times(task_dir: str = "/proc/self/task", names: dict[int, str] | None = None) -> dict:
    """{thread: (cpu s, wait s)} of this process's threads from Linux's schedstat, summed by name; {} where
    unreadable. A thread's name is Python's for Python threads (``MainThread``, ...), else its ``comm``
    (``ZMQbg/IO/0``: libzmq's I/O threads). Wait is the kernel's ``run_delay``: time the thread was runnable
    and no CPU ran it. Threads that ended are not counted, so a sum can fall; read them as rates."""
    import os

    names = _thread_names() if names is None else names
    out: dict[str, tuple[float, float]] = {}
    try:
        tids = os.listdir(task_dir)
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"{task_dir}/{tid}/schedstat") as fh:
                cpu_ns, wait_ns = (int(x) for x in fh.read().split()[:2])
            name = names.get(int(tid))
            if name is None:
                with open(f"{task_dir}/{tid}/comm") as fh:
                    name = fh.read().strip()
        except (OSError, ValueError):  # the thread ended meanwhile, or no schedstat in this kernel
            continue
        c, w = out.get(name, (0.0, 0.0))
        out[name] = (c + cpu_ns * 1e-9, w + wait_ns * 1e-9)
    return out


class ThreadTimesCollector:
    """Each thread's CPU time and its wait for a CPU (Linux schedstat, read when scraped):
    ``process_thread_cpu_seconds_total`` and ``process_thread_wait_seconds_total``, labelled by thread.

    A latency tail can arise in the server's code or because a thread ready to run was not given a CPU: other
    processes on the host took the cores, or the thread was on a CPU being moved. The wait separates the two
    (benchmarks/RESULTS.md, twenty-seventh session). A CPU taken by the hypervisor (steal) is not counted in
    it. Costs two small file reads per thread per scrape, nothing per event."""

    def __init__(self, registry: CollectorRegistry | None = None, read=read_thread_times):
        self._read = read
        if registry is not None:
            registry.register(self)

    def collect(self):
        times = self._read()
        if not times:
            return
        cpu = CounterMetricFamily("process_thread_cpu_seconds", "CPU time of each of the process's threads "
                                  "(Linux schedstat; threads of one name summed)", labels=["thread"])  # fmt: skip
        wait = CounterMetricFamily("process_thread_wait_seconds", "Time each thread was ready to run and waited "
                                   "for a CPU (Linux schedstat run_delay)", labels=["thread"])  # fmt: skip
        for name, (c, w) in sorted(times.items()):
            cpu.add_metric([name], c)
            wait.add_metric([name], w)
        yield cpu
        yield wait


class Metrics:
    def __init__(self, busy: BusyClock):
        r = self.registry = CollectorRegistry()
        # process_resident_memory_bytes, process_open_fds, process_cpu_seconds_total, ... of the serving
        # process (Linux): each --procs front end, the shared engine and each --gpus worker has its own
        # endpoint, so an operator sees which process grows (benchmarks/RESULTS.md: memory over millions of events).
        ProcessCollector(registry=r)
        MallocCollector(registry=r)  # whether a growing RSS is memory in use or the allocator's free memory
        ThreadTimesCollector(registry=r)  # whether a thread waited for a CPU (a host's stalls) or worked
        self.events = Counter("charon_events", "Events answered with SIM_COMPLETE", registry=r)
        self.accepted = Counter("charon_accepted_events", "Events taken for simulation (queued); minus those "
                                "answered or failed: what a stop would drain", registry=r)  # fmt: skip
        self.photons = Counter("charon_photons", "Photons propagated", registry=r)
        self.hits = Counter("charon_hits", "Hits returned", registry=r)
        self.batches = Counter("charon_batches", "Engine calls (batches)", registry=r)
        self.failed = Counter("charon_failed", "Requests answered with SIM_FAILED or UNKNOWN_REQUEST", ["reason"],
                              registry=r)  # fmt: skip
        self.duplicates = Counter("charon_duplicate_requests", "Resent requests joined to one already queued or in flight",
                                  registry=r)  # fmt: skip
        self.queued_photons = Gauge("charon_queued_photons", "Photons waiting for a batch", registry=r)
        self.runs_closed_idle = Counter("charon_runs_closed_idle", "Runs (--output-dir) closed because their client "
                                        "sent nothing for --output-idle-seconds: clients that died mid-run",
                                        registry=r)  # fmt: skip
        self.batch_photons = Histogram("charon_batch_photons", "Photons per batch", buckets=_PHOTON_BUCKETS, registry=r)
        self.batch_seconds = Histogram("charon_batch_seconds", "Engine time per batch", buckets=_SECOND_BUCKETS,
                                       registry=r)  # fmt: skip
        self.busy_fraction = Gauge("charon_engine_busy_fraction", "Engine busy time / wall time, last 10 s", registry=r)
        self.busy_fraction.set_function(busy.fraction)
        self.engine_seconds = Counter("charon_engine_seconds", "Engine busy time (CUDA-event time on a GPU)", registry=r)
        # Busy time above counts from when the host begins to queue a batch; this, the kernels alone.
        self.engine_compute_seconds = Counter(
            "charon_engine_compute_seconds", "Engine time in its propagation and hit-demux stages alone (on a GPU: "
            "the union of the kernels' CUDA-event intervals, without copies or the host's queueing)", registry=r)
        self.host_seconds = Counter("charon_host_seconds", "Socket-loop CPU time: decode, batching, demux, encode",
                                    registry=r)  # fmt: skip
        self.batch_photons_max = Gauge("charon_batch_photons_max", "Largest batch so far", registry=r)
        self.max_batch_seen = 0
        # Where an event's latency goes: the server's share (the rest is transport and the client)
        # and, behind --procs, the shared engine's share of that.
        self.event_seconds = Histogram("charon_event_seconds", "Server-side time per event: PHOTONDATA accepted "
                                       "to SIM_COMPLETE sent", buckets=_EVENT_BUCKETS, registry=r)  # fmt: skip
        # The front end's share, split: waiting for a batch, then the engine's round trip
        # (behind --procs: transfer to the shared engine, merging, the GPU, and back).
        self.dispatch_wait_seconds = Histogram(
            "charon_dispatch_wait_seconds", "Per batch: its oldest event's wait from accepted to handed to the "
            "engine", buckets=_SECOND_BUCKETS, registry=r)  # fmt: skip
        self.engine_roundtrip_seconds = Histogram(
            "charon_engine_roundtrip_seconds", "Per batch: handed to the engine (or the shared engine) to its "
            "results taken back by the socket loop", buckets=_SECOND_BUCKETS, registry=r)  # fmt: skip
        self.handoff_batches = Counter("charon_handoff_batches", "Shared engine (--procs): front-end batches "
                                       "received, by how their photons came (shm or socket)", ["path"],
                                       registry=r)  # fmt: skip
        self.engine_thread_seconds = Counter(
            "charon_engine_thread_seconds", "Shared engine (--procs): time its thread spent receiving, merging, "
            "launching, collecting and answering batches (the rest it waited or polled the GPU)", registry=r)
        self.handoff_pin_seconds = Counter(
            "charon_handoff_pin_seconds", "Shared engine (--procs): time its thread spent mapping front ends' "
            "shared-memory segments and pinning them for the GPU, or undoing that (it stalls every front end)",
            registry=r)  # fmt: skip
        self.handoff_segments_mapped = Counter(
            "charon_handoff_segments_mapped", "Shared engine (--procs): front ends' segments mapped and pinned; "
            "a front end's buffer that grows brings a new one", registry=r)  # fmt: skip
        self.engine_residence_seconds = Histogram(
            "charon_engine_residence_seconds", "Shared engine (--procs): a front end's batch received to its hits "
            "sent", buckets=_SECOND_BUCKETS, registry=r)  # fmt: skip

    def serve(self, port: int, addr: str = "0.0.0.0"):
        return serve(self.registry, port, addr)


def serve(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0"):
    """Start the HTTP text endpoint of ``registry``; returns the server so it can be shut down."""
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server


def stop_serving(server) -> None:
    """Stop an endpoint from :func:`serve` and close its listening socket."""
    server.shutdown()
    server.server_close()


class RouterMetrics:
    """charon-router's own figures (``charon_router_*``; a worker's are its server's ``charon_*``).

    ``inflight`` and ``waiting`` are read when scraped, from the metrics thread: ``len()`` of the
    router's dict and deque, which the loop never holds half-changed."""

    def __init__(self, inflight, waiting, workers):
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # the router process's memory, descriptors and CPU, as a server's (Metrics)
        ThreadTimesCollector(registry=r)
        MallocCollector(registry=r)
        self.events = Counter("charon_router_events", "PHOTONDATA requests taken for a worker (resends joined to "
                              "one in flight not counted)", registry=r)  # fmt: skip
        self.replies = Counter("charon_router_replies", "Workers' answers passed on to clients or written to runs",
                               registry=r)  # fmt: skip
        self.duplicates = Counter("charon_router_duplicate_requests", "Resent requests joined to one in flight",
                                  registry=r)  # fmt: skip
        self.reassigned = Counter("charon_router_reassigned_requests", "Requests re-sent because their worker "
                                  "stopped heartbeating", registry=r)  # fmt: skip
        self.no_workers = Counter("charon_router_no_workers", "Requests answered NO_WORKERS", registry=r)
        self.runs_closed_idle = Counter("charon_router_runs_closed_idle", "Runs (--output-dir) closed because "
                                        "their client sent nothing for --output-idle-seconds", registry=r)  # fmt: skip
        self.host_seconds = Counter("charon_router_host_seconds", "Time the router's loop spent working (not "
                                    "waiting for messages)", registry=r)  # fmt: skip
        Gauge("charon_router_inflight_events", "Requests at workers, not yet answered",
              registry=r).set_function(inflight)  # fmt: skip
        Gauge("charon_router_waiting_events", "Requests waiting for a worker with room",
              registry=r).set_function(waiting)  # fmt: skip
        Gauge("charon_router_workers", "Workers registered and heartbeating", registry=r).set_function(workers)

    def serve(self, port: int, addr: str = "0.0.0.0"):
        return serve(self.registry, port, addr)
