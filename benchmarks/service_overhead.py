"""The shared engine's thread: CPU time per merged batch, without the rest of the server.

    python benchmarks/service_overhead.py --engine cuda --front-ends 11 --events 7 --duration 8
    python benchmarks/service_overhead.py --engine null          # no GPU: a stand-in with a fixed device time

Why: behind ``charon-batch --procs N`` the shared engine's single thread receives
every front end's batch, launches the merged batch, collects it and answers each
front end. At small ``--max-batch-photons`` that thread saturates first (~1 ms per
merged batch measured on the H200 x2 host, benchmarks/RESULTS.md), so the GPU
idles. This drives a real :class:`EngineService` with ``--front-ends`` real
front-end links (:class:`ServiceLink`, photons through shared memory) from a
separate process, each keeping ``--depth`` batches of ``--events`` events in
flight, and reads the engine thread's own CPU time from /proc (Linux).

For a cProfile of the same thread under the whole server's load, see
``benchmarks/profile_service.py``.

``--engine null`` stands in for a GPU engine: ``launch`` returns at once and the
batch is ready ``--null-fixed-us + n * --null-ns-per-photon`` later, with
``--null-hits`` hits per event. It measures the service's own Python; ``cuda``
adds the driver calls.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from types import SimpleNamespace

import numpy as np

from charon.engines.base import EngineConfig, StageTimes
from charon.photons import N_ROWS, HitBatch, PhotonBatch

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class NullEngine:
    """A GPU engine's host interface with no GPU: fixed device time, preallocated hits."""

    name = "null"
    strided_rows = True
    gathers_pieces = True

    def __init__(self, lanes: int, fixed_s: float, s_per_photon: float, hits_per_event: int, max_events: int):
        self.lanes = [None] * lanes
        self.fixed_s, self.s_per_photon, self.hits_per_event = fixed_s, s_per_photon, hits_per_event
        H = hits_per_event * max_events
        # [8, H] float32 and [H] uint32: every batch's hits are views of these
        self._table, self._u = np.zeros((8, H), np.float32), np.zeros(H, np.uint32)
        self.last_times = StageTimes()
        self._free_at = 0.0

    def warm_up(self):
        pass

    def launch(self, batch: PhotonBatch):
        now = time.perf_counter()
        start = max(now, self._free_at)  # one device: batches run one after another
        busy = self.fixed_s + self.s_per_photon * batch.n_photons
        self._free_at = start + busy
        return SimpleNamespace(done=self._free_at, busy=busy, E=batch.n_events)

    def ready(self, handle) -> bool:
        return time.perf_counter() >= handle.done

    def finish(self, handle) -> HitBatch:
        while not self.ready(handle):
            pass
        E, h = handle.E, self.hits_per_event
        self.last_times = StageTimes(propagate=handle.busy)
        return HitBatch(self._u[: E * h], self._table[:, : E * h], self._u[: E * h],
                        np.arange(0, E * h + 1, h, dtype=np.int64))  # fmt: skip

    def propagate(self, batch):
        return self.finish(self.launch(batch))

    def close(self):
        pass


def _thread_cpu(name: str) -> float:
    """CPU seconds (user + system) of this process's thread whose kernel name is ``name``."""
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() != name:
                    continue
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / _TICK
        except OSError:
            continue
    raise RuntimeError(f"no thread named {name}")


def _time_sections() -> dict:
    """Wrap the engine service's steps (and the engine's launch/finish) with wall-clock timers."""
    from charon import engine_service as es

    spent: dict[str, float] = {}

    def timed(owner, attr, key):
        inner = getattr(owner, attr)
        spent[key] = 0.0

        def wrapper(*args, **kw):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kw)
            finally:
                spent[key] += time.perf_counter() - t0

        setattr(owner, attr, wrapper)

    timed(es, "recv_message", "recv")
    for attr in ("_handle", "_launch", "_engine_ready", "_collect", "_reply"):
        timed(es.EngineService, attr, attr.strip("_"))
    try:  # inside the CUDA engine's launch and finish: driver calls by kind
        from charon.engines import cuda, cuda_driver, cuda_launch
    except Exception:
        return spent
    timed(cuda._Lane, "launch", "cuda_launch")
    timed(cuda._Lane, "_gather", "cuda_gather")
    timed(cuda._Lane, "finish", "cuda_finish")
    timed(cuda._Lane, "_copy_out", "cuda_copy_out")
    timed(cuda_launch.PreboundKernel, "__call__", "cuda_kernel_launches")
    timed(cuda_driver.DirectCopy, "__call__", "cuda_copies_1d")
    timed(cuda_driver.DirectCopy, "rows", "cuda_copies_2d")
    timed(cuda_driver.TimingEvent, "record", "cuda_event_records")
    return spent


def _drive(address: str, front_ends: int, depth: int, events: int, photons: int, duration: float) -> None:
    """Front-end links in one process: each resubmits its batch as soon as its hits come back."""
    import logging

    import zmq

    from charon.engine_service import ServiceLink
    from charon.sources import random_event

    logging.getLogger("charon").setLevel(logging.ERROR)  # "stopping with batches at the engine" is expected

    ctx = zmq.Context()
    rng = np.random.default_rng(1)
    links, poller = [], zmq.Poller()
    for _ in range(front_ends):
        link = ServiceLink(ctx, address, handoff="shm")
        link.start(timeout=600)
        batches = []
        for _ in range(depth):
            buf = link.host_buffer()
            src = PhotonBatch.from_events([random_event(photons, rng) for _ in range(events)], np.arange(events))
            n = src.n_photons
            buf.reserve(n, n)
            table = buf.table[: N_ROWS * n].reshape(N_ROWS, n)
            table[:] = src.table
            buf.flags[:n] = 0
            ph = PhotonBatch(table, buf.flags[:n], buf.slot[:n], src.offsets, src.event_id, src.first_index)
            batches.append(SimpleNamespace(photons=ph, buffer=buf, slots=[None] * events))
        links.append(link)
        poller.register(link.sock, zmq.POLLIN)
        for b in batches:
            link.submit(b)
    t_end = time.perf_counter() + duration
    while time.perf_counter() < t_end:
        for sock, _ in poller.poll(100):
            link = next(k for k in links if k.sock is sock)
            link.poll_results()
            while link.results:
                r = link.results.popleft()
                link.in_flight -= 1
                link.submit(r.batch)
    for link in links:
        link.stop()
    ctx.term()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="null", choices=("null", "cpu", "cuda"),
                    help="null: a GPU stand-in with no driver (the service's own Python); cuda: the real engine")
    ap.add_argument("--detector", default="demo", help="built-in name or .npz file (cpu and cuda engines)")
    ap.add_argument("--front-ends", type=int, default=11, help="front-end links (one DEALER each)")
    ap.add_argument("--depth", type=int, default=2, help="batches each front end keeps in flight")
    ap.add_argument("--events", type=int, default=7, help="events per front-end batch")
    ap.add_argument("--photons", type=int, default=1000, help="photons per event")
    ap.add_argument("--max-batch-photons", type=float, default=1e5, help="the service's merged-batch cap")
    ap.add_argument("--lanes", type=int, default=2, help="batches launched and not yet collected (--engine-lanes)")
    ap.add_argument("--duration", type=float, default=6.0, help="seconds measured (after --warm seconds)")
    ap.add_argument("--warm", type=float, default=2.0, help="seconds of load before the measured window")
    ap.add_argument("--null-fixed-us", type=float, default=300.0, help="null engine: device time per batch")
    ap.add_argument("--null-ns-per-photon", type=float, default=12.0, help="null engine: device time per photon")
    ap.add_argument("--null-hits", type=int, default=150, help="hits per event (null engine)")
    ap.add_argument("--sections", action="store_true",
                    help="also time the thread's steps (receive, handle, launch, ready, collect, reply) per merged batch")
    ap.add_argument("--engine-cpus", default=None,
                    help="CPUs for the engine thread alone, as charon-batch --engine-cpus (the driving process and "
                         "every other thread run on the rest); the thread then polls without sleeping, so its CPU "
                         "time is its wall time: compare events/s and busy, not CPU per batch")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    from charon.engine_service import EngineService
    from charon.engines import create_engine
    from charon.geometry import resolve_detector

    cap = int(a.max_batch_photons)
    if a.engine == "null":
        def factory():
            return NullEngine(a.lanes, a.null_fixed_us * 1e-6, a.null_ns_per_photon * 1e-9, a.null_hits,
                              a.front_ends * a.depth * a.events)  # fmt: skip
    else:
        det = resolve_detector(a.detector)

        def factory():
            return create_engine(a.engine, det, EngineConfig(seed=1, max_batch_photons=cap, lanes=a.lanes))

    from charon.cpus import pin_all_threads, split_engine_cpus

    split = split_engine_cpus(a.engine_cpus)
    if split is not None:
        pin_all_threads(split[1])  # the driving process inherits the rest
    spent = _time_sections() if a.sections else None
    service = EngineService(factory, "tcp://127.0.0.1:*", cap, cpus=split[0] if split else None)
    engine = service.start(timeout=900)
    spawn = mp.get_context("spawn")
    p = spawn.Process(target=_drive, args=(service.address, a.front_ends, a.depth, a.events, a.photons,
                                           a.warm + a.duration + 30))  # fmt: skip
    p.start()
    m = service.metrics

    def sample():
        subs = sum(c._value.get() for c in m.handoff_batches._metrics.values())
        return (time.perf_counter(), _thread_cpu("charon-engine"), m.batches._value.get(), subs,
                m.photons._value.get(), m.engine_seconds._value.get())  # fmt: skip

    sections0 = {}

    deadline = time.monotonic() + 900
    while m.batches._value.get() == 0 and time.monotonic() < deadline:  # the driver's links are up
        time.sleep(0.1)
    time.sleep(a.warm)
    s0 = sample()
    sections0 = dict(spent or {})  # the window only: not the warm-up's compilation
    time.sleep(a.duration)
    s1 = sample()
    sections1 = dict(spent or {})
    d = [y - x for x, y in zip(s0, s1)]
    wall, cpu, merged, subs, photons, busy = d
    res = {
        "engine": engine.name, "front_ends": a.front_ends, "depth": a.depth, "events": a.events,
        "max_batch_photons": cap, "lanes": a.lanes,
        "merged_per_s": merged / wall, "subs_per_merged": subs / max(merged, 1),
        "photons_per_merged": photons / max(merged, 1), "events_per_s": subs * a.events / wall,
        "thread_cpu_fraction": cpu / wall, "thread_us_per_merged": 1e6 * cpu / max(merged, 1),
        "thread_us_per_sub": 1e6 * cpu / max(subs, 1), "busy_fraction": busy / wall,
    }  # fmt: skip
    if spent is not None:  # wall time inside each step during the window, per merged batch
        res.update({f"us_per_merged_{k}": 1e6 * (v - sections0[k]) / max(merged, 1) for k, v in sections1.items()})
    service.stop()
    service.join(30)
    p.join(a.warm + a.duration + 60)
    if p.is_alive():
        p.terminate()
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
