"""Engine throughput: photons/s per call size, time split by stage, BVH build time.

    python benchmarks/engine_bench.py --engine cpu --detector demo --sizes 1e4,1e5
    python benchmarks/engine_bench.py --engine cuda --detector demo,large --sizes 1e4,1e5,1e6,5e6
    python benchmarks/engine_bench.py --engine cuda --detector demo --sizes 46000 --lanes 2 --pipeline 400

Photons: events of 1000 photons from random points inside r < 1.5 m (or 0.6 of
the PMT radius for `large`), wavelengths 350-500 nm. Prints one table row per
(detector, size) and writes JSON with --json.

With ``--pipeline N`` (CUDA) each size is also run as N batches back to back
through ``--lanes`` lanes, as the shared engine's thread drives them: a batch
is launched as soon as a lane is free, the oldest collected first. That gives
the GPU's own ceiling in events/s at that batch size, with no sockets and no
front ends in the way. For CUDA the header gives the propagation kernel's
registers and local memory per thread.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import statistics
import time

import numpy as np

from charon.engines import create_engine
from charon.engines.base import EngineConfig
from charon.geometry import resolve_detector
from charon.kernels.bvh import build_bvh
from charon.photons import PhotonBatch
from charon.sources import random_event


def make_batch(n: int, event_size: int, rng, radius: float) -> PhotonBatch:
    sizes = [event_size] * (n // event_size) + ([n % event_size] if n % event_size else [])
    tables = [random_event(s, rng, radius=radius) for s in sizes]
    return PhotonBatch.from_events(tables, np.arange(len(tables)))


def pipelined(eng, batches: list, n_batches: int) -> dict:
    """Run ``n_batches`` launches over ``len(batches)`` pinned batches, one per lane, oldest finished first."""
    inflight: collections.deque = collections.deque()
    busy = 0.0
    t0 = time.perf_counter()
    for i in range(n_batches):
        if len(inflight) == len(batches):
            eng.finish(inflight.popleft())
            busy += eng.last_times.busy
        inflight.append(eng.launch(batches[i % len(batches)]))
    while inflight:
        eng.finish(inflight.popleft())
        busy += eng.last_times.busy
    wall = time.perf_counter() - t0
    n = batches[0].n_photons
    return dict(batches=n_batches, wall_s=wall, photons_per_s=n * n_batches / wall, busy_fraction=busy / wall,
                batch_ms=wall / n_batches * 1e3)


def pinned_copies(eng, batch: PhotonBatch, k: int) -> list:
    """``k`` copies of ``batch`` in the engine's pinned memory: one per lane, since a launch reads its
    host memory late."""
    out = []
    for _ in range(k):
        table = eng.host_alloc(batch.table.size, np.float32).reshape(batch.table.shape)
        flags = eng.host_alloc(batch.n_photons, np.uint32)
        table[...], flags[...] = batch.table, batch.flags
        out.append(PhotonBatch(table, flags, batch.slot, batch.offsets, batch.event_id, batch.first_index))
    return out


def kernel_resources(eng) -> dict:
    """Registers and local memory per thread of the CUDA propagation kernel (empty for other engines)."""
    k = getattr(eng, "k", None)
    kernel = getattr(k, "propagate_kernel", None)
    if kernel is None:
        return {}
    try:  # one compiled signature: numba answers {signature: value}
        regs, local = kernel.get_regs_per_thread(), kernel.get_local_mem_per_thread()
    except Exception as exc:  # the simulator, or a numba-cuda without these queries
        return dict(error=repr(exc))
    one = (lambda v: next(iter(v.values())) if isinstance(v, dict) and len(v) == 1 else v)  # noqa: E731
    return dict(regs_per_thread=one(regs), local_bytes_per_thread=one(local))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="cpu")
    ap.add_argument("--detector", default="demo", help="comma-separated detector names/paths")
    ap.add_argument("--sizes", default="1e4,1e5", help="photons per call, comma-separated")
    ap.add_argument("--event-size", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--lanes", type=int, default=1, help="CUDA lanes (--engine-lanes)")
    ap.add_argument("--pipeline", type=int, default=0, help="also run N batches back to back through the lanes")
    ap.add_argument("--min-blocks", type=int, default=0, help="CUDA: the propagation kernel's launch bound "
                    "(blocks per SM; 0: the compiler's choice)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    for name in args.detector.split(","):
        t0 = time.perf_counter()
        det = resolve_detector(name)
        t_det = time.perf_counter() - t0
        bvh = build_bvh(det.vertices, det.triangles)
        radius = 0.6 * float(np.linalg.norm(det.channel_position, axis=1).max()) if det.n_channels else 500.0
        print(f"# {name}: {det.n_triangles} triangles, {det.n_channels} channels; detector build {t_det:.2f} s, "
              f"BVH build {bvh.build_seconds:.2f} s ({bvh.n_nodes} nodes)", flush=True)  # fmt: skip
        sizes = [int(float(s)) for s in args.sizes.split(",")]
        config = EngineConfig(seed=1, max_batch_photons=max(sizes), lanes=args.lanes,
                              min_blocks_per_sm=args.min_blocks)
        eng = create_engine(args.engine, det, config)
        t0 = time.perf_counter()
        eng.warm_up()
        resources = kernel_resources(eng)
        print(f"# {args.engine} warm-up (compile) {time.perf_counter() - t0:.1f} s; kernel {resources}", flush=True)
        rng = np.random.default_rng(0)
        for n in sizes:
            batch = make_batch(n, args.event_size, rng, radius)
            walls, stages, hits = [], [], 0
            alloc = getattr(eng, "host_alloc", None)  # pinned memory, as the server's batcher uses
            table = alloc(batch.table.size, np.float32).reshape(batch.table.shape) if alloc else np.empty_like(batch.table)
            flags = alloc(n, np.uint32) if alloc else np.empty_like(batch.flags)
            for _ in range(args.repeat):
                table[...] = batch.table
                flags[...] = batch.flags
                b = PhotonBatch(table, flags, batch.slot, batch.offsets, batch.event_id, batch.first_index)
                t0 = time.perf_counter()
                h = eng.propagate(b)
                walls.append(time.perf_counter() - t0)
                stages.append(eng.last_times)
                hits = h.n_hits
                eng.last_times = type(eng.last_times)()
            wall = statistics.median(walls)
            st = stages[walls.index(sorted(walls)[len(walls) // 2])]
            row = dict(detector=name, engine=args.engine, photons=n, wall_s=wall, photons_per_s=n / wall, hits=hits,
                       copy_in_s=st.copy_in, propagate_s=st.propagate, demux_s=st.demux, copy_out_s=st.copy_out,
                       n_triangles=det.n_triangles, bvh_build_s=bvh.build_seconds, **resources)  # fmt: skip
            print(f"{name:8s} {args.engine:5s} {n:>9d} photons  {wall * 1e3:9.2f} ms  {n / wall / 1e6:8.3f} Mphot/s  "
                  f"in {st.copy_in * 1e3:7.2f}  prop {st.propagate * 1e3:9.2f}  demux {st.demux * 1e3:7.3f}  "
                  f"out {st.copy_out * 1e3:7.3f} ms  hits {hits}", flush=True)  # fmt: skip
            if args.pipeline and hasattr(eng, "launch"):
                copies = [b]
                copies += pinned_copies(eng, batch, args.lanes - 1)
                pipelined(eng, copies, 2 * args.lanes)  # settle
                pipe = pipelined(eng, copies, args.pipeline)
                row["pipeline"] = dict(lanes=args.lanes, **pipe)
                per_event = pipe["wall_s"] / (args.pipeline * max(1, batch.n_events)) * 1e6
                print(f"{'':8s} pipelined x{args.pipeline} over {args.lanes} lane(s): {pipe['batch_ms']:.3f} ms/batch, "
                      f"{pipe['photons_per_s'] / 1e6:.1f} Mphot/s, {per_event:.2f} us/event, "
                      f"busy {pipe['busy_fraction']:.2f}", flush=True)  # fmt: skip
            rows.append(row)
        eng.close()
    meta = dict(date=time.strftime("%Y-%m-%d"), host=platform.node(), machine=platform.processor() or platform.machine())
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
