"""charon-bench: load generator and report, batched serving against one event per engine call.

    charon-bench --spawn-server --clients 256 --events 20000 --event-size 1000 --compare-per-event \\
        --json out.json --plot out.png -- --engine cuda --detector demo --max-batch-photons 5e6

Flags after ``--`` go to the spawned ``charon-batch``. The load runs in one
thread with one socket per client and a poller (no thread per client, so the
generator itself is not the bottleneck); payloads are zero-copy slices of a
pre-generated photon pool, and every event id is unique (no resend joins).
Server-side figures (batch sizes, engine busy time, host time per event) are
read from the server's Prometheus endpoint before and after the run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import heapq
import json
import os
import selectors
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass

import numpy as np
import zmq
from prometheus_client.parser import text_string_to_metric_families

from . import protocol as P
from .cli import batch_parser, count
from .cpus import parse_cpus, pin
from .metrics import read_thread_times
from .ports import free_port, free_port_range
from .sockets import recv_message, send_message
from .sources import random_event


@dataclass
class BenchConfig:
    address: str | None = None
    metrics_url: str | None = None
    spawn_server: bool = False
    clients: int = 16
    client_mode: str = "req"
    in_flight: int = 4
    events: int = 2000
    event_size: str = "1000"
    duration: float | None = None
    compare_per_event: bool = False
    sweep_batch: str | None = None
    json: str | None = None
    plot: str | None = None
    trace: str | None = None  # .npz of every run's answered events (send time, round trip, load process)
    seed: int = 1
    timeout_s: float = 600.0
    progress: bool = True
    load_procs: int = 1
    server_cpus: str | None = None  # Linux CPU list ("0-15") for the spawned server, else any CPU
    load_cpus: str | None = None  # CPU list for the load processes, else any CPU
    # Niceness added to the load processes (0-19): on the server's own host the server's threads then
    # get the cores first, as when the clients run on other hosts; 0 shares them equally.
    load_nice: int = 0
    think_ms: str = "0"  # a client's pause between a reply and its next request: MS or exp:MEAN
    warmup: float = 1.0  # s after the first replies before the measured window opens (0: the whole run)
    # "python": the load loop in Python; "compiled": the same requests from a numba loop on libzmq's C API
    # (load_pump.py), so that the load takes less of the CPU it shares with the server on one host.
    load_driver: str = "python"
    # Each mode measured this many times, the modes alternating round after round, so that drift of the
    # host's speed (10-20 % between runs on the lent GPU hosts) hits every mode alike.
    rounds: int = 1
    # With --rounds: each mode's server is started once and kept for every round (the idle ones sleep in
    # poll while another is measured), instead of a fresh server per run: on a GPU host a start costs ~20 s.
    keep_servers: bool = False


LOAD_DRIVERS = ("python", "compiled")


def parse_sizes(spec: str):
    """'1000' (fixed) or 'lognormal:MEDIAN,SIGMA' -> function(rng, k) -> k sizes (>= 1)."""
    if spec.startswith("lognormal:"):
        med, sigma = (float(x) for x in spec.split(":", 1)[1].split(","))
        return lambda rng, k: np.maximum(1, rng.lognormal(np.log(med), sigma, k)).astype(np.int64)
    n = count(spec)
    return lambda rng, k: np.full(k, n, np.int64)


def parse_think(spec: str):
    """'0' (none), 'MS' (fixed) or 'exp:MEAN' (exponential) -> function(rng, k) -> k pauses in seconds.

    A ratpac-two client spends Geant4's time on the next event before it sends it, so real clients
    leave the server idle gaps; with none, every client sends again at once (a closed loop at saturation)."""
    try:
        if spec.startswith("exp:"):
            mean = float(spec[4:])
            if mean >= 0:
                return lambda rng, k: rng.exponential(mean / 1e3, k)
        else:
            ms = float(spec)
            if ms >= 0:
                return lambda rng, k: np.full(k, ms / 1e3)
    except ValueError:
        pass
    raise ValueError(f"--think-ms {spec!r}: give MS or exp:MEAN, milliseconds >= 0")


def scrape_each(url) -> list[dict]:
    """The server's metrics, one dict per endpoint (one per worker with --gpus, per process with --procs)."""
    if not url:
        return []
    out = []
    for u in [url] if isinstance(url, str) else url:
        text = urllib.request.urlopen(u, timeout=10).read().decode()
        one = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name.startswith("charon_handoff_batches"):  # kept per path: shm or socket
                    key = f"{s.name}:{s.labels.get('path', '')}"
                    one[key] = one.get(key, 0.0) + s.value
                elif s.name == "charon_event_seconds_bucket":  # kept per bound: the server's own latency tail
                    key = f"{s.name}:{s.labels.get('le', '')}"
                    one[key] = one.get(key, 0.0) + s.value
                elif s.name.startswith("process_thread_"):  # kept per thread: its CPU time and wait for a CPU
                    key = f"{s.name}:{s.labels.get('thread', '')}"
                    one[key] = one.get(key, 0.0) + s.value
                elif not s.labels or s.name.startswith("charon_failed"):
                    one[s.name] = one.get(s.name, 0.0) + s.value
        out.append(one)
    return out


def merged(per_endpoint: list[dict]) -> dict:
    """Metrics summed over endpoints (the largest batch: the maximum)."""
    out = {}
    for one in per_endpoint:
        for name, value in one.items():
            out[name] = max(out.get(name, 0.0), value) if name == "charon_batch_photons_max" else \
                out.get(name, 0.0) + value  # fmt: skip
    return out


def scrape(url) -> dict:
    """Sum the server's metrics over one or several endpoints."""
    return merged(scrape_each(url))


def popen_pinned(cmd: list[str], cpus: set[int] | None, **kw) -> subprocess.Popen:
    """Popen whose process (and its children) run on ``cpus`` only; any CPU for None."""
    if cpus is None:
        return subprocess.Popen(cmd, **kw)
    # The child inherits the affinity of the thread that starts it (no preexec_fn: not thread-safe).
    own = os.sched_getaffinity(0)
    pin(cpus)
    try:
        return subprocess.Popen(cmd, **kw)
    finally:
        pin(own)


def metrics_endpoints(server_args: list[str]) -> int:
    """How many metrics endpoints charon-batch started with ``server_args`` serves (on consecutive ports):
    with --procs N > 1, the N front ends and then the shared engine; with --gpus, that for each worker.

    Read as charon-batch itself reads its flags (a repeated flag: the last one counts)."""
    config = batch_parser().parse_args(server_args)
    per_worker = config.procs + 1 if config.procs > 1 else 1
    return per_worker * (len(config.gpus.split(",")) if config.gpus else 1)


def metrics_ports(server_args: list[str]) -> int:
    """Ports that charon-batch started with ``server_args`` serves metrics on: :func:`metrics_endpoints`,
    then, with --gpus behind local routers, theirs (not read here: the bench reads the servers' figures)."""
    config = batch_parser().parse_args(server_args)
    routers = config.gpus_routers if config.gpus and config.gpus_share == "router" else 0
    return metrics_endpoints(server_args) + routers


class ServerStartError(RuntimeError):
    """The spawned charon-batch exited before answering."""


@contextlib.contextmanager
def spawned_server(server_args: list[str], ready_timeout: float = 300.0, cpus: set[int] | None = None):
    """Start charon-batch on free loopback ports (on ``cpus`` only, when given, with every process it
    starts); yields (address, metrics URL or URLs)."""
    n_workers = metrics_endpoints(server_args)
    port, mport = free_port(), free_port_range(metrics_ports(server_args))  # workers serve metrics on mport + i
    cmd = [sys.executable, "-m", "charon.cli", "--bind", f"tcp://127.0.0.1:{port}", "--metrics-port", str(mport),
           "--log-level", "WARNING", *server_args]  # fmt: skip
    proc = popen_pinned(cmd, cpus)
    address = f"tcp://127.0.0.1:{port}"
    try:
        ctx = zmq.Context.instance()
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise ServerStartError(f"charon-batch exited with {proc.returncode}: {' '.join(cmd)}")
            s = ctx.socket(zmq.REQ)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(address)
            s.send(P.PING)
            ok = s.poll(1000)
            s.close(0)
            if ok:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("charon-batch did not answer PING")
        # With --gpus the router answers PING at once and each worker serves metrics on mport + i:
        # wait until every worker's endpoint answers.
        urls = [f"http://127.0.0.1:{mport + i}/metrics" for i in range(n_workers)]
        while True:
            try:
                scrape(urls)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise ServerStartError("charon-batch workers did not come up") from None
                time.sleep(0.2)
        yield address, urls[0] if n_workers == 1 else urls
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def _gc_paused():
    """No garbage collection inside: for a loop that makes no reference cycles (reference counting frees what it
    allocates), whose pauses would otherwise be counted as the server's latency."""
    gc.collect()
    gc.freeze()
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()
        gc.unfreeze()


START_TIMEOUT_S = 600.0  # how long a load process waits for the others to be ready (imports, compiling)


def _drive(cfg: BenchConfig, address: str, first_id: int, n_events: int, n_clients: int, seed: int, progress=None,
           start=None):
    """One load process: ``n_clients`` sockets on one poller. Returns raw figures for merging.

    ``start``: a barrier every load process waits at once its sockets are connected, so that they all begin
    together: a process that starts late (a slow import or compile on a busy host) would otherwise send its
    clients' first requests all at once inside the measured window. On the H100 hosts the starts were
    8-37 ms apart without it (benchmarks/RESULTS.md, twenty-seventh session); it is a safeguard."""
    socks, ctx = [], zmq.Context()
    try:
        try:
            rng = np.random.default_rng(seed)
            sizes = parse_sizes(cfg.event_size)(rng, n_events)
            think = parse_think(cfg.think_ms)(rng, n_events)  # [n_events] s, a client's pause after the k-th reply
            pool = random_event(int(sizes.max()), rng)  # [11, max] float32; events are zero-copy prefixes of its rows
            kind = zmq.REQ if cfg.client_mode == "req" else zmq.DEALER
            depth = 1 if cfg.client_mode == "req" else cfg.in_flight
            for _ in range(n_clients):
                s = ctx.socket(kind)
                s.setsockopt(zmq.LINGER, 0)
                socks.append(s)
                s.connect(address)
        except BaseException:
            if start is not None:
                start.abort()  # the others stop waiting for this one
            raise
        if start is not None:
            try:
                start.wait(START_TIMEOUT_S)
            except threading.BrokenBarrierError:
                raise RuntimeError(f"load process of events {first_id}..{first_id + n_events - 1}: another load "
                                   f"process failed, or was not ready within {START_TIMEOUT_S:g} s") from None
        wait0 = process_wait_s()
        drive = _drive_compiled if cfg.load_driver == "compiled" else _drive_python
        fig = drive(cfg, socks, depth, first_id, sizes, think, pool, progress)
        fig["wait_s"] = process_wait_s() - wait0  # the process's threads' wait for a CPU while it drove the load
        return fig
    finally:
        for s in socks:
            s.close(0)
        ctx.term()


def process_wait_s() -> float:
    """Seconds this process's threads have waited for a CPU (Linux schedstat; 0 where unreadable)."""
    return sum(w for _, w in read_thread_times().values())


def host_steal_s() -> float | None:
    """CPU time the hypervisor took from this host's CPUs so far (``steal`` of /proc/stat), s; None elsewhere."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK") if fields[0] == "cpu" and len(fields) > 8 else None
    except (OSError, ValueError):
        return None


def thread_times(before: dict, after: dict) -> dict:
    """{thread: {cpu_ms, wait_ms}} over a window, from two scrapes of one endpoint (threads of one name summed;
    a thread that ended in between is left out rather than counted negative)."""
    out = {}
    for key, v in after.items():
        if key.startswith("process_thread_cpu_seconds_total:"):
            name = key.split(":", 1)[1]
            wkey = f"process_thread_wait_seconds_total:{name}"
            cpu, wait = v - before.get(key, 0.0), after.get(wkey, 0.0) - before.get(wkey, 0.0)
            if cpu >= 0 and wait >= 0:
                out[name] = dict(cpu_ms=1e3 * cpu, wait_ms=1e3 * wait)
    return out


def _load_figures(sent, latencies, photons, failed: int, unanswered: int, t0, t1, cpu_s, main_cpu_s) -> dict:
    """A load process's raw figures, as :func:`run_load` merges them (either driver)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return dict(sent=sent, latencies=latencies, photons=photons, failed=failed, unanswered=unanswered,
                t0=t0, t1=t1, cpus=cpus, nice=os.nice(0) if hasattr(os, "nice") else 0,
                cpu_s=cpu_s, main_cpu_s=main_cpu_s)  # fmt: skip


def _drive_python(cfg: BenchConfig, socks: list, depth: int, first_id: int, sizes, think, pool, progress=None):
    """:func:`_drive`'s loop in Python, with the clients' think times."""
    n_events = sizes.shape[0]
    kind = zmq.REQ if cfg.client_mode == "req" else zmq.DEALER
    thinking = bool(think.any())
    later: list = []  # heap of (when, k, socket): clients thinking before their next request
    rows = [memoryview(np.ascontiguousarray(pool[r])).cast("B") for r in range(11)]
    # An event's 11 row frames, by photon count: zmq.Frames over the pool, built once and sent by
    # reference (no copy, and ~0.3 us a frame instead of ~0.7); the generator's CPU is taken from the
    # server's when they share a host. Bounded, for log-normal sizes with many distinct counts.
    row_frames: dict[int, list] = {}
    # Waiting on the sockets' notification fds with epoll costs per ready socket; zmq.Poller asks
    # every socket for its state on each call (~27 us for 43 sockets), which made it most of the
    # generator's main thread. The fds signal edges, not messages: every wake-up drains a socket
    # until Again, and after each send the socket is read again, so no reply is left unseen.
    selector = selectors.DefaultSelector()
    for s in socks:
        selector.register(s.FD, selectors.EVENT_READ, s)
    sent_at: dict[int, float] = {}
    sent_times, latencies, photons = [], [], []  # per answered event: monotonic send time s, round trip s, photons
    failed, next_i, done = 0, 0, 0
    # A collection pause in the loop below would hold replies unread and show up as the server's latency.
    with _gc_paused():
        t0 = time.monotonic()
        cpu0, main0 = time.process_time(), time.thread_time()  # all threads (ZeroMQ's I/O thread too); the main one
        deadline = t0 + (cfg.duration if cfg.duration else cfg.timeout_s)

        def send(s):
            nonlocal next_i
            i = next_i
            next_i += 1
            n = int(sizes[i])
            body = row_frames.get(n)
            if body is None:
                body = [zmq.Frame(r[: 4 * n], copy=False) for r in rows]
                if len(row_frames) < 4096:
                    row_frames[n] = body
            frames = [P.PHOTONDATA, P.META.pack(first_id + i, n), *body]
            if kind == zmq.DEALER:
                frames = [b""] + frames
            sent_at[first_id + i] = time.monotonic()
            send_message(s, frames, copy=False)

        for s in socks:
            for _ in range(depth):
                if next_i < n_events:
                    send(s)
        ready = socks  # a first pass over every socket: replies may have come in while sending
        while True:
            for s in ready:
                while True:
                    try:
                        msg = recv_message(s)
                    except zmq.Again:
                        break
                    except zmq.ZMQError as exc:  # a REQ socket with nothing asked (past the deadline)
                        if exc.errno == zmq.EFSM:
                            break
                        raise
                    if msg and len(msg[0]) == 0:
                        msg = msg[1:]
                    eid = int.from_bytes(msg[1].bytes, "little") if len(msg) > 1 and len(msg[1]) == 4 else -1
                    t = sent_at.pop(eid, None)
                    done += 1
                    if msg[0].bytes == P.SIM_COMPLETE and t is not None:
                        sent_times.append(t)
                        latencies.append(time.monotonic() - t)
                        photons.append(sizes[eid - first_id])
                    else:
                        failed += 1
                    if progress is not None and done % 64 == 0:
                        with progress.get_lock():
                            progress.value += 64
                    if next_i + len(later) < n_events and time.monotonic() < deadline:
                        if thinking:  # the client works on its next event first
                            heapq.heappush(later, (time.monotonic() + think[done - 1], done, s))
                        else:
                            send(s)
                    if kind == zmq.REQ:
                        break
            now = time.monotonic()
            if not (done < next_i or later) or now >= deadline:
                break  # checked before waiting: the last reply must not be followed by an idle wait in the timed span
            wait = min(1.0, deadline - now)
            if later:
                wait = min(wait, max(0.0, later[0][0] - now))
            ready = [key.data for key, _ in selector.select(wait)]
            if later:
                now = time.monotonic()
                while later and later[0][0] <= now:
                    s = heapq.heappop(later)[2]
                    if now < deadline:
                        send(s)
                    ready.append(s)  # a send can take the fd's edge: read the socket again
        t1 = time.monotonic()
        cpu1, main1 = time.process_time(), time.thread_time()
    selector.close()
    return _load_figures(sent_times, latencies, photons, failed, next_i - done, t0, t1, cpu1 - cpu0, main1 - main0)


def _drive_compiled(cfg: BenchConfig, socks: list, depth: int, first_id: int, sizes, think, pool, progress=None):
    """:func:`_drive`'s loop compiled (load_pump.py): the same requests, think times and figures."""
    from .load_pump import LoadPump

    pump = LoadPump(socks, cfg.client_mode != "req", depth, sizes, first_id, pool, think)
    reported = 0
    with _gc_paused():
        t0 = time.monotonic()
        cpu0, main0 = time.process_time(), time.thread_time()
        deadline = t0 + (cfg.duration if cfg.duration else cfg.timeout_s)
        while not pump.run(deadline, min(deadline, time.monotonic() + 0.05)):  # back here for the progress bar
            if progress is not None and pump.done - reported >= 64:
                with progress.get_lock():
                    progress.value += pump.done - reported
                reported = pump.done
        t1 = time.monotonic()
        cpu1, main1 = time.process_time(), time.thread_time()
    if progress is not None:
        with progress.get_lock():
            progress.value += pump.done - reported
    pump.close()
    return _load_figures(*pump.results(), pump.failed, pump.sent - pump.done, t0, t1, cpu1 - cpu0, main1 - main0)


def _drive_star(args):
    return _drive(*args, progress=_PROGRESS, start=_START)


_PROGRESS = _START = None


def _init_worker(counter, cpus=None, nice=0, driver="python", start=None):
    global _PROGRESS, _START
    _PROGRESS, _START = counter, start
    pin(cpus)
    if nice:
        os.nice(nice)
    if driver == "compiled":  # compiled in every load process at once, before any of them sends
        from .load_pump import warm_up

        warm_up()


def run_load(cfg: BenchConfig, address: str, metrics_url) -> dict:
    """Drive the server from ``cfg.load_procs`` processes; returns the mode's figures."""
    import multiprocessing as mp

    procs = max(1, min(cfg.load_procs, cfg.clients))
    per_clients = [cfg.clients // procs + (k < cfg.clients % procs) for k in range(procs)]
    per_events = [cfg.events // procs + (k < cfg.events % procs) for k in range(procs)]
    each_before = scrape_each(metrics_url)
    before = merged(each_before)
    steal0 = host_steal_s()
    # Load processes are spawned even when there is one, so that the progress bar, the
    # measurement and the code path are the same whatever --load-procs is.
    ctx = mp.get_context("spawn")
    counter = ctx.Value("q", 0)
    jobs = [(cfg, address, k * cfg.events, per_events[k], per_clients[k], cfg.seed + k) for k in range(procs)]
    # Every process takes one job (the pool has as many, and each holds its process at the barrier).
    init = (counter, parse_cpus(cfg.load_cpus), cfg.load_nice, cfg.load_driver, ctx.Barrier(procs))
    with ctx.Pool(procs, initializer=_init_worker, initargs=init) as pool:
        res = pool.map_async(_drive_star, jobs)
        bar = None
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.events, unit="ev", desc=f"{cfg.client_mode} x{cfg.clients}", leave=False)
        # The measured window opens --warmup s after the first replies, with a scrape of the server's
        # counters, so that client and server figures cover the same time; start-up transients
        # (connections, first batches, buffers growing) stay out of the steady state.
        t_first = t_window = None
        while not res.ready():
            res.wait(0.05)
            if t_first is None and counter.value > 0:
                t_first = time.monotonic()
            if t_window is None and t_first is not None and cfg.warmup > 0 and \
                    time.monotonic() >= t_first + cfg.warmup:  # fmt: skip
                t_window = time.monotonic()
                each_before = scrape_each(metrics_url)
                before = merged(each_before)
                steal0 = host_steal_s()
            if bar is not None:
                bar.n = min(counter.value, cfg.events)
                bar.refresh()
        if bar is not None:
            bar.close()
        parts = res.get()
    each_after = scrape_each(metrics_url)
    after = merged(each_after)
    steal1 = host_steal_s()

    def d(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    def cat(key):
        return np.concatenate([np.asarray(p[key], dtype=np.float64) for p in parts])

    sent, rtt, ph = cat("sent"), cat("latencies"), cat("photons")  # [answered] s, s, photons
    proc = np.concatenate([np.full(len(p["sent"]), k, np.int16) for k, p in enumerate(parts)])  # [answered]
    t_start, t_end = min(p["t0"] for p in parts), max(p["t1"] for p in parts)
    whole = _window_figures(sent, rtt, ph, t_start, t_end)
    # A run that ended within its warm-up is measured whole (t_window stayed None).
    t_open = t_window if t_window is not None else t_start
    fig = _window_figures(sent, rtt, ph, t_open, t_end)
    load_cpu, answered = sum(p["cpu_s"] for p in parts), max(1, rtt.size + sum(p["failed"] for p in parts))
    res = dict(
        events=fig["events"],
        failed=sum(p["failed"] for p in parts),  # over the whole run
        unanswered=sum(p["unanswered"] for p in parts),
        wall_s=fig["wall_s"],
        warmup_s=t_open - t_start,  # left out before the window; 0 when the run was measured whole
        # When each load process began sending, s after the first did: a spread start is a transient.
        load_starts_s=sorted(p["t0"] - t_start for p in parts),
        load_processes=procs,
        load_cpus=sorted(set().union(*(p["cpus"] for p in parts))),  # where the load ran
        load_nice=max(p["nice"] for p in parts),  # the load processes' niceness (--load-nice added to the bench's)
        events_per_s=fig["events_per_s"],
        photons_per_s=fig["photons_per_s"],
        latency_ms=fig["latency_ms"],
        whole_run=whole,
        # Share of the window's events slower than 3, 10 and 30 ms (SHARE_OVER_MS), beside the server's own (below).
        latency_share_over_ms=fig["share_over_ms"],
        # p99 of the events sent in each second of the run: where in the run the slow ones were.
        latency_p99_ms_by_second=_p99_by_second(sent - t_start, rtt),
        # What the load generator itself cost. On the server's host (no --load-cpus apart from
        # --server-cpus) it competes with the server for the same cores.
        load_cpu_cores=load_cpu / whole["wall_s"],
        load_cpu_us_per_event=1e6 * load_cpu / answered,
        load_main_thread_us_per_event=1e6 * sum(p["main_cpu_s"] for p in parts) / answered,
        # Where a tail can come from other than charon's code: the time the load processes' threads were ready
        # and waited for a CPU (whole run), and the CPU time the hypervisor took from this host in the window
        # (summed over its CPUs; None off Linux). The servers' own threads' waits are server_threads.
        load_wait_ms=1e3 * sum(p["wait_s"] for p in parts),
        host_steal_ms=None if steal0 is None or steal1 is None else 1e3 * (steal1 - steal0),
    )
    # Per-event records for --trace; main() takes them out before the figures are written as JSON.
    res["_trace"] = dict(sent=sent - t_start, rtt=rtt, photons=ph, proc=proc, window=np.float64(t_open - t_start),
                         start_unix=np.float64(t_start + time.time() - time.monotonic()))  # to line up with vmstat -t
    if metrics_url:
        nb = d("charon_batch_photons_count")
        res.update(
            # Each engine's busy share (several with --gpus): the mean, and each one's beside it.
            **engine_busy(each_before, each_after, fig["wall_s"]),
            # The max is the server's own gauge, over its life: with --keep-servers, every round so far.
            batch_photons=dict(mean=d("charon_batch_photons_sum") / nb if nb else 0.0,
                               max=after.get("charon_batch_photons_max", 0.0)),  # fmt: skip
            batches=nb,
            host_us_per_event=1e6 * d("charon_host_seconds_total") / max(d("charon_events_total"), 1),
            batch_seconds_mean=d("charon_batch_seconds_sum") / nb if nb else 0.0,
        )
        # Events answered per endpoint (front ends or workers; a shared engine's endpoint counts none):
        # how evenly the clients' connections were spread.
        res["events_by_endpoint"] = [a.get("charon_events_total", 0.0) - b.get("charon_events_total", 0.0)
                                     for a, b in zip(each_after, each_before)]  # fmt: skip
        # Each endpoint's threads: CPU time, and time ready to run but waiting for a CPU (a host's stall).
        res["server_threads"] = [thread_times(b, a) for a, b in zip(each_after, each_before)]
        res["server_wait_ms"] = sum(t["wait_ms"] for one in res["server_threads"] for t in one.values())
        res["front_end_busy_fraction"] = front_end_busy(each_before, each_after, res["events_by_endpoint"],
                                                        fig["wall_s"])  # fmt: skip
        ne, nr = d("charon_event_seconds_count"), d("charon_engine_residence_seconds_count")
        # Means only: the server's share of the latency, and (--procs) the shared engine's share of that.
        res["server_latency_ms_mean"] = 1e3 * d("charon_event_seconds_sum") / ne if ne else None
        # The server's tail beside the clients' (its histogram's 3, 10 and 30 ms bucket bounds, metrics.py):
        # events that spent over 3, 10 and 30 ms inside the server. A client-side tail that the server
        # does not share arose outside it.
        res["server_latency_share_over_ms"] = {
            ms: 1.0 - d(f"charon_event_seconds_bucket:{float(ms) / 1e3}") / ne for ms in SHARE_OVER_MS
        } if ne else None  # fmt: skip
        # Its percentiles, read from the same buckets (0.5 ms apart between 1 and 3 ms): beside the clients'
        # they say how much of a tail arose inside the server.
        res["server_latency_ms"] = server_latency_ms(before, after) if ne else None
        res["engine_residence_ms_mean"] = 1e3 * d("charon_engine_residence_seconds_sum") / nr if nr else None
        # --procs: how busy the shared engine's one thread was; near 1 it, not the GPU, sets the pace.
        res["engine_thread_busy_fraction"] = d("charon_engine_thread_seconds_total") / fig["wall_s"] if nr else None
        # The front end's share split per batch: its oldest event's wait for dispatch, and the
        # engine round trip (submit to results back in the socket loop).
        nw, nt = d("charon_dispatch_wait_seconds_count"), d("charon_engine_roundtrip_seconds_count")
        res["dispatch_wait_ms_mean"] = 1e3 * d("charon_dispatch_wait_seconds_sum") / nw if nw else None
        res["engine_roundtrip_ms_mean"] = 1e3 * d("charon_engine_roundtrip_seconds_sum") / nt if nt else None
        # --procs: the share of front-end batches whose photons reached the shared engine through shared memory.
        shm, sock = d("charon_handoff_batches_total:shm"), d("charon_handoff_batches_total:socket")
        res["handoff_shm_fraction"] = shm / (shm + sock) if shm + sock else None
        # --procs: how many front ends' batches each engine call merged (the engine thread's work goes per
        # front-end batch: a longer --max-wait-ms hands over fewer, larger ones).
        res["front_end_batches_per_engine_call"] = (shm + sock) / nb if shm + sock and nb else None
        # Segments the shared engine mapped and pinned in the window (front ends' buffers growing), and the
        # time its thread spent on that and on unpinning retired ones: all front ends wait meanwhile.
        res["handoff_segments_mapped"] = d("charon_handoff_segments_mapped_total") if shm else None
        res["handoff_pin_ms"] = 1e3 * d("charon_handoff_pin_seconds_total") if shm else None
    return res


def engine_busy(each_before: list[dict], each_after: list[dict], wall_s: float) -> dict:
    """The share of the window each engine was busy (device time on a GPU), over the endpoints that ran
    batches in it: a single server, a shared engine, or each GPU's worker or engine with --gpus (front ends
    behind a shared engine run none). ``engine_busy_fraction`` is their mean, so that it stays a fraction
    of one engine's time however many GPUs serve; an engine that ran no batch in the window is not counted."""
    ran = [(a, b) for a, b in zip(each_after, each_before)
           if a.get("charon_batches_total", 0.0) > b.get("charon_batches_total", 0.0)]  # fmt: skip

    def share(name):
        return [(a.get(name, 0.0) - b.get(name, 0.0)) / wall_s for a, b in ran]

    busy, compute = share("charon_engine_seconds_total"), share("charon_engine_compute_seconds_total")
    return dict(engine_busy_fraction=float(np.mean(busy)) if busy else 0.0, engine_busy_by_engine=busy,
                engine_compute_fraction=float(np.mean(compute)) if compute else 0.0, engines=len(busy))  # fmt: skip


def front_end_busy(each_before: list[dict], each_after: list[dict], events: list[float], wall_s: float) -> dict | None:
    """{mean, max} over the endpoints that answered events in the window (``events``, per endpoint: front ends,
    workers) of the share of it their socket loops spent working; None without such endpoints.

    Near 1, the front ends set the pace. Read it beside engine_busy_fraction, which counts time with any
    kernel running and so stays high while a GPU waits on its host. A shared engine answers no events
    and is left out (its thread's share is engine_thread_busy_fraction)."""
    fe = [(a.get("charon_host_seconds_total", 0.0) - b.get("charon_host_seconds_total", 0.0)) / wall_s
          for a, b, n in zip(each_after, each_before, events) if n > 0]  # fmt: skip
    return dict(mean=float(np.mean(fe)), max=float(max(fe))) if fe else None


def histogram_quantile(bounds, cumulative, q: float) -> float | None:
    """The ``q`` quantile (0-1) of a Prometheus histogram, as PromQL's ``histogram_quantile`` reads it: found
    in the bucket where the cumulative count reaches ``q`` of the total and interpolated linearly inside it
    (the first bucket from 0). ``bounds``: ascending upper bounds, the last +Inf; ``cumulative``: the count
    at or under each. A quantile in the +Inf bucket reads as the largest finite bound; None with no count."""
    total = cumulative[-1]
    if total <= 0:
        return None
    rank = q * total
    i = int(np.searchsorted(np.asarray(cumulative, float), rank, side="left"))
    if i >= len(bounds) - 1:  # the +Inf bucket: only its lower end is known
        return float(bounds[-2])
    lo, below = (0.0, 0.0) if i == 0 else (float(bounds[i - 1]), float(cumulative[i - 1]))
    inside = cumulative[i] - below
    return lo + (float(bounds[i]) - lo) * ((rank - below) / inside if inside > 0 else 1.0)


def server_latency_ms(before: dict, after: dict) -> dict:
    """p50, p95 and p99 (ms) of the events' time inside the server over a window, from the counts its
    ``charon_event_seconds`` histogram gained between two scrapes (summed over endpoints)."""
    prefix = "charon_event_seconds_bucket:"
    les = sorted((float(k[len(prefix):]), k) for k in after if k.startswith(prefix))
    bounds = [le for le, _ in les]
    cumulative = [after[k] - before.get(k, 0.0) for _, k in les]
    out = {}
    for p in ("p50", "p95", "p99"):
        v = histogram_quantile(bounds, cumulative, int(p[1:]) / 100)
        out[p] = None if v is None else 1e3 * v
    return out


# Latency thresholds whose shares of events the JSON reports, for the clients and inside the server: each
# must be a bucket bound of the server's charon_event_seconds histogram (metrics.py). 3 ms is near the p99
# bound at light load; 10 and 30 ms catch stalls.
SHARE_OVER_MS = ("3", "10", "30")


def _window_figures(sent, rtt, photons, t_open: float, t_end: float) -> dict:
    """Rates of the replies that came in within [t_open, t_end], latency of the events sent within it."""
    got = sent + rtt >= t_open
    lat = rtt[sent >= t_open] * 1e3
    share = {ms: float(np.mean(lat > int(ms))) if lat.size else 0.0 for ms in SHARE_OVER_MS}
    if not lat.size:
        lat = np.zeros(1)
    span = max(t_end - t_open, 1e-9)
    n = int(got.sum())
    return dict(events=n, wall_s=span, events_per_s=n / span, photons_per_s=float(photons[got].sum()) / span,
                latency_ms={q: float(np.percentile(lat, int(q[1:]))) for q in ("p50", "p95", "p99")},
                share_over_ms=share)  # fmt: skip


def _p99_by_second(sent_rel, rtt) -> list:
    if not rtt.size:
        return []
    sec = sent_rel.astype(np.int64)
    return [round(float(np.percentile(rtt[sec == k], 99)) * 1e3, 2) if (sec == k).any() else None
            for k in range(int(sec.max()) + 1)]  # fmt: skip


def median_run(runs: list[dict]) -> dict:
    """The run whose events/s is the median of ``runs`` (the lower of the middle two for an even count):
    a whole measured run, so that its figures belong together."""
    return sorted(runs, key=lambda r: r["events_per_s"])[(len(runs) - 1) // 2]


def speedup(rounds: dict) -> dict | None:
    """Batched over per-event events/s: each round's (the two measured minutes apart) and of the medians;
    None until both modes have a run."""
    batched, per_event = rounds.get("batched", []), rounds.get("per_event", [])
    pairs = [(b["events_per_s"], p["events_per_s"]) for b, p in zip(batched, per_event) if p["events_per_s"] > 0]
    if not pairs:
        return None
    return dict(by_round=[b / p for b, p in pairs],
                of_medians=median_run(batched)["events_per_s"] / median_run(per_event)["events_per_s"])  # fmt: skip


def with_p99_bound(res: dict, server_args: list[str]) -> dict:
    """Add the issue's latency bound for a spawned server: its --max-wait-ms plus two batch times (the
    mean wall time of one engine call, launch to results), and whether p99 stayed under it."""
    batch_s = res.get("batch_seconds_mean")
    if batch_s:
        max_wait = batch_parser().parse_args(server_args).max_wait_ms
        res["p99_bound_ms"] = max_wait + 2e3 * batch_s
        res["p99_within_bound"] = bool(res["latency_ms"]["p99"] < res["p99_bound_ms"])
    return res


def _plot(path: str, sweep: list[dict], per_event: dict | None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["max_batch_photons"] for r in sweep]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    ax[0].plot(x, [r["events_per_s"] for r in sweep], "o-", label="batched")
    if per_event:
        ax[0].axhline(per_event["events_per_s"], color="r", ls="--", label="one event per call")
    ax[0].set(xscale="log", yscale="log", xlabel="--max-batch-photons", ylabel="events / s", title="Throughput")
    ax[0].legend()
    ax[1].plot(x, [r.get("engine_busy_fraction", np.nan) for r in sweep], "o-", label="batched: busy")
    ax[1].plot(x, [r.get("engine_compute_fraction", np.nan) for r in sweep], "s:", label="batched: kernels alone")
    if per_event:
        ax[1].axhline(per_event.get("engine_busy_fraction", np.nan), color="r", ls="--", label="one event per call")
    ax[1].set(xscale="log", ylim=(0, 1.05), xlabel="--max-batch-photons", ylabel="engine time / wall",
              title="Engine occupancy")  # fmt: skip
    ax[1].legend()
    for p, st in (("p50", "o-"), ("p95", "s-"), ("p99", "^-")):
        ax[2].plot(x, [r["latency_ms"][p] for r in sweep], st, label=p)
    ax[2].set(xscale="log", yscale="log", xlabel="--max-batch-photons", ylabel="latency (ms)", title="Event latency")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def results_table(results: dict) -> str:
    """One line per mode (or per run); the latency split where the server reported it: means (ms) of a
    batch's oldest event's dispatch wait, the engine round trip and (--procs) the time inside the shared
    engine, then the p99 of an event's time inside the server ("srv p99", from its histogram's buckets).
    "busy" is the engine's, "kern" its kernels' alone, "fe busy" the busiest front end's socket loop."""
    split = any(r.get("engine_roundtrip_ms_mean") is not None for r in results.values())
    head = f"{'mode':>22} {'events/s':>10} {'Mphot/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} " \
           f"{'busy':>6} {'kern':>6} {'fe busy':>7} {'batch mean':>11} {'host us/ev':>10}"  # fmt: skip
    if split:
        head += f" {'wait':>6} {'trip':>6} {'resid':>6} {'srv p99':>7}"
    lines = [head]
    for mode, r in results.items():
        line = (
            f"{mode:>22} {r['events_per_s']:>10.1f} {r['photons_per_s'] / 1e6:>9.3f} {r['latency_ms']['p50']:>8.1f} "
            f"{r['latency_ms']['p95']:>8.1f} {r['latency_ms']['p99']:>8.1f} {r.get('engine_busy_fraction', 0):>6.2f} "
            f"{r.get('engine_compute_fraction', 0):>6.2f} "
            f"{(r.get('front_end_busy_fraction') or {}).get('max', 0):>7.2f} "
            f"{r.get('batch_photons', {}).get('mean', 0):>11.0f} {r.get('host_us_per_event', 0):>10.1f}"
        )  # fmt: skip
        if split:
            line += "".join(f" {r.get(k) or 0.0:>6.2f}" for k in ("dispatch_wait_ms_mean", "engine_roundtrip_ms_mean",
                                                                  "engine_residence_ms_mean"))  # fmt: skip
            line += f" {(r.get('server_latency_ms') or {}).get('p99') or 0.0:>7.2f}"
        lines.append(line)
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="charon-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--address", help="address of a running charon-batch (else --spawn-server)")
    ap.add_argument("--metrics-url", help="its Prometheus endpoint, e.g. http://host:9100/metrics; "
                    "several comma-separated (--procs front ends and the shared engine) are summed")
    ap.add_argument("--spawn-server", action="store_true", help="start charon-batch with the flags after --")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    ap.add_argument("--client-mode", choices=("req", "dealer"), default="req",
                    help="req: one event in flight per client (ratpac-two); dealer: --in-flight each")  # fmt: skip
    ap.add_argument("--in-flight", type=int, default=4, help="events in flight per dealer client (default 4)")
    ap.add_argument("--events", type=count, default=2000, help="events to send per mode (default 2000)")
    ap.add_argument("--event-size", default="1000", help="photons per event: N or lognormal:MEDIAN,SIGMA")
    ap.add_argument("--duration", type=float, help="stop sending after this many seconds")
    ap.add_argument("--warmup", type=float, default=1.0,
                    help="seconds after the first replies before measuring, so that start-up (connections, first "
                    "batches, buffers growing) is not counted; 0 measures everything; a shorter run is measured "
                    "whole (default 1)")
    ap.add_argument("--think-ms", default="0",
                    help="each client's pause between a reply and its next request, as Geant4's time per event "
                    "in ratpac-two: MS (fixed) or exp:MEAN (exponential); default 0, a closed loop at saturation")
    ap.add_argument("--compare-per-event", action="store_true",
                    help="also run against a server limited to one event per engine call, one call at a time "
                    "(--max-batch-events 1 --engine-lanes 1, ChAR0N's way; needs --spawn-server)")
    ap.add_argument("--sweep-batch", help="comma-separated --max-batch-photons values to sweep (needs --spawn-server)")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--plot", help="write a PNG of throughput, occupancy and latency against batch size")
    ap.add_argument("--trace", metavar="PATH.npz",
                    help="write every run's answered events here, to find where and in which load process the "
                         "slow ones were: arrays MODE_ROUND_sent (s after the load started), _rtt (s), "
                         "_photons, _proc (load process), _window (s the measured window opened)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--load-procs", type=int, default=max(1, (os.cpu_count() or 2) // 4),
                    help="processes generating the load, so that the generator is not the bottleneck "
                         "(default: a quarter of the CPUs)")  # fmt: skip
    ap.add_argument("--server-cpus", help="with --spawn-server: run the server on these CPUs only (Linux CPU list, "
                    "e.g. 0-15), so that it does not share cores with the load, as when clients run on other hosts")
    ap.add_argument("--load-cpus", help="run the load processes on these CPUs only (e.g. 16-31)")
    ap.add_argument("--load-nice", type=int, default=0, choices=range(0, 20), metavar="0-19",
                    help="raise the load processes' niceness by this much, so that on a shared host the server's "
                    "threads get the cores first, as when clients run on other hosts (default 0: equal shares)")
    ap.add_argument("--load-driver", choices=LOAD_DRIVERS, default="python",
                    help="python: the load loop in Python; compiled: the same requests and figures from a numba "
                    "loop on libzmq's C API, which takes less of the CPU the load shares with a server on the same "
                    "host (Linux). Default python")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every mode (batched, each --sweep-batch cap, per-event) this many times, the "
                    "modes alternating round after round, so that the host's drift hits them alike; each mode "
                    "reports its median run, the JSON every run and the speed-up of each round (default 1)")
    ap.add_argument("--keep-servers", action="store_true",
                    help="with --spawn-server: start each mode's server once and keep it for every round, "
                    "instead of a fresh one per run (saves ~20 s a run on a GPU host; the servers not being "
                    "measured stay idle beside the one that is)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    server_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    a = parser().parse_args(argv)
    cfg = BenchConfig(**{k: v for k, v in vars(a).items() if k in BenchConfig.__dataclass_fields__})
    if not cfg.spawn_server and not cfg.address:
        parser().error("give --address of a running server or --spawn-server")
    if cfg.rounds < 1:
        parser().error("--rounds must be at least 1")
    if (cfg.compare_per_event or cfg.sweep_batch or cfg.rounds > 1) and not cfg.spawn_server:
        parser().error("--compare-per-event, --sweep-batch and --rounds start their own servers: add --spawn-server")
    if cfg.keep_servers and not cfg.spawn_server:
        parser().error("--keep-servers keeps the servers it spawns between rounds: add --spawn-server")
    if cfg.server_cpus and not cfg.spawn_server:
        parser().error("--server-cpus pins a spawned server: add --spawn-server (or pin a running one with taskset)")
    try:
        parse_cpus(cfg.server_cpus), parse_cpus(cfg.load_cpus), parse_think(cfg.think_ms)
    except ValueError as exc:
        parser().error(str(exc))
    if cfg.load_driver == "compiled":
        from .load_pump import AVAILABLE

        if not AVAILABLE:
            parser().error("--load-driver compiled needs Linux and libzmq's C API through pyzmq; use python")
    if cfg.address:
        ping = zmq.Context.instance().socket(zmq.REQ)
        ping.setsockopt(zmq.LINGER, 0)
        ping.connect(cfg.address)
        ping.send(P.PING)
        ok = ping.poll(5000)
        ping.close(0)
        if not ok:
            print(f"charon-bench: no answer to PING from {cfg.address} within 5 s", file=sys.stderr)
            return 2
    results, sweep, rounds = {}, [], {}
    traces: dict[str, np.ndarray] = {}  # --trace: "MODE_ROUND_FIELD" -> array
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M"), host=os.uname().nodename, config=asdict(cfg),
                server_args=server_args)  # fmt: skip

    def save():  # after every run, so that a later failure keeps what was measured
        if cfg.trace:
            np.savez_compressed(cfg.trace, **traces)
        if cfg.json:
            extra = dict(rounds=rounds, speedup=speedup(rounds)) if cfg.rounds > 1 else {}
            with open(cfg.json, "w") as fh:
                json.dump(dict(meta=meta, **results, sweep=sweep, **extra), fh, indent=1)

    kept: dict[str, tuple] = {}  # --keep-servers: mode -> (address, metrics URL(s)) of its server

    def start(extra: list[str], stack: contextlib.ExitStack):
        for attempt in range(3):
            try:
                return stack.enter_context(spawned_server(server_args + extra, cpus=parse_cpus(cfg.server_cpus)))
            except ServerStartError as exc:  # e.g. a port taken between choosing and binding it
                if attempt == 2:
                    raise
                print(f"charon-bench: {exc}; retrying with other ports", file=sys.stderr)

    def measure(mode: str, extra: list[str], servers: contextlib.ExitStack) -> dict:
        if cfg.spawn_server:
            if cfg.keep_servers:
                if mode not in kept:
                    kept[mode] = start(extra, servers)
                addr, murl = kept[mode]
                res = run_load(cfg, addr, murl)
            else:
                with contextlib.ExitStack() as one:
                    addr, murl = start(extra, one)
                    res = run_load(cfg, addr, murl)
            res["server"] = addr  # which server process served the run (a fresh one per run unless kept)
            return with_p99_bound(res, server_args + extra)
        urls = cfg.metrics_url.split(",") if cfg.metrics_url and "," in cfg.metrics_url else cfg.metrics_url
        return run_load(cfg, cfg.address, urls)

    modes = [("batched", [])]
    for v in cfg.sweep_batch.split(",") if cfg.sweep_batch else []:
        modes.append((f"batched@{v}", ["--max-batch-photons", v]))
    if cfg.compare_per_event:
        # ChAR0N's way: one event per engine call and one call at a time (no second lane queued
        # behind the running call), whatever the batched server was given.
        modes.append(("per_event", ["--max-batch-events", "1", "--engine-lanes", "1"]))
    with contextlib.ExitStack() as servers:  # --keep-servers: every mode's server, stopped at the end
        for k in range(cfg.rounds):
            for mode, extra in modes:
                if cfg.rounds > 1:
                    print(f"charon-bench: round {k + 1} of {cfg.rounds}: {mode}", file=sys.stderr)
                r = measure(mode, extra, servers)
                for field, v in r.pop("_trace").items():
                    traces[f"{mode}_{k + 1}_{field}"] = v
                if mode.startswith("batched@"):
                    r["max_batch_photons"] = count(mode.split("@", 1)[1])
                rounds.setdefault(mode, []).append(r)
                results[mode] = median_run(rounds[mode])
                sweep[:] = [results[m] for m, _ in modes if m.startswith("batched@") and m in results]
                save()
    print(results_table(results))
    if "per_event" in results and results["per_event"]["events_per_s"] > 0:
        ratio = results["batched"]["events_per_s"] / results["per_event"]["events_per_s"]
        print(f"speed-up batched / per-event: {ratio:.1f}x")
    if cfg.rounds > 1:
        for mode, runs in rounds.items():
            each = ", ".join(f"{r['events_per_s']:.0f}" for r in runs)
            print(f"{mode}: events/s by round: {each}")
        if (su := speedup(rounds)) is not None:
            print(f"speed-up by round: {', '.join(f'{x:.1f}x' for x in su['by_round'])}; "
                  f"of the medians: {su['of_medians']:.1f}x")
    for mode, r in results.items():
        if "p99_bound_ms" in r:
            srv = (r.get("server_latency_ms") or {}).get("p99")
            print(f"{mode}: p99 {r['latency_ms']['p99']:.1f} ms against --max-wait-ms + 2 batch times = "
                  f"{r['p99_bound_ms']:.1f} ms: {'within' if r['p99_within_bound'] else 'over'}"
                  + (f" (inside the server: p99 {srv:.1f} ms)" if srv is not None else ""))  # fmt: skip
    if cfg.plot and sweep:
        _plot(cfg.plot, sweep, results.get("per_event"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
