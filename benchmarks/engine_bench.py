"""Engine throughput: photons/s per call size, time split by stage, BVH build time.

    python benchmarks/engine_bench.py --engine cpu --detector demo --sizes 1e4,1e5
    python benchmarks/engine_bench.py --engine cuda --detector demo,large --sizes 1e4,1e5,1e6,5e6

Photons: events of 1000 photons from random points inside r < 1.5 m (or 0.6 of
the PMT radius for `large`), wavelengths 350-500 nm. Prints one table row per
(detector, size) and writes JSON with --json.
"""

from __future__ import annotations

import argparse
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="cpu")
    ap.add_argument("--detector", default="demo", help="comma-separated detector names/paths")
    ap.add_argument("--sizes", default="1e4,1e5", help="photons per call, comma-separated")
    ap.add_argument("--event-size", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
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
        eng = create_engine(args.engine, det, EngineConfig(seed=1, max_batch_photons=max(sizes)))
        t0 = time.perf_counter()
        eng.warm_up()
        print(f"# {args.engine} warm-up (compile) {time.perf_counter() - t0:.1f} s", flush=True)
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
                       n_triangles=det.n_triangles, bvh_build_s=bvh.build_seconds)  # fmt: skip
            rows.append(row)
            print(f"{name:8s} {args.engine:5s} {n:>9d} photons  {wall * 1e3:9.2f} ms  {n / wall / 1e6:8.3f} Mphot/s  "
                  f"in {st.copy_in * 1e3:7.2f}  prop {st.propagate * 1e3:9.2f}  demux {st.demux * 1e3:7.3f}  "
                  f"out {st.copy_out * 1e3:7.3f} ms  hits {hits}", flush=True)  # fmt: skip
        eng.close()
    meta = dict(date=time.strftime("%Y-%m-%d"), host=platform.node(), machine=platform.processor() or platform.machine())
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
