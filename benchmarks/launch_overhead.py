"""Fixed cost per CUDA batch: host time in launch() and finish(), and device stage times.

    python benchmarks/launch_overhead.py --detector demo --sizes 1e3,1e4,6e4,2.5e5

The batches are the ones charon-bench sends (1000-photon events from
``random_event``, radius 1.5 m), merged the way the shared engine merges them
(strided rows of a [11, capacity] buffer) and, for comparison, contiguous.
Medians over --repeat calls.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from charon.engine_service import MergeBuffer, decode_batch, encode_batch
from charon.engines import create_engine
from charon.engines.base import EngineConfig
from charon.geometry import resolve_detector
from charon.photons import PhotonBatch
from charon.sources import random_event


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", default="demo")
    ap.add_argument("--sizes", default="1e3,1e4,6e4,2.5e5")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    det = resolve_detector(args.detector)
    cap = max(sizes)
    eng = create_engine("cuda", det, EngineConfig(seed=1, max_batch_photons=cap))
    eng.warm_up()
    rng = np.random.default_rng(0)
    print("photons layout    launch_ms finish_ms wall_ms | copy_in propagate demux copy_out (device ms)")
    for n in sizes:
        tables = [random_event(1000, rng) for _ in range(max(1, n // 1000))]
        batch = PhotonBatch.from_events(tables, np.arange(len(tables)))
        buf = MergeBuffer(cap, eng.host_alloc)
        frames = encode_batch(1, batch)
        buf.append(decode_batch([bytes(memoryview(f)) for f in frames[1:]])[1])
        for layout, photons in (("strided", buf.seal(contiguous=False).photons), ("contig", batch)):
            rows = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                h = eng.launch(photons)
                t1 = time.perf_counter()
                while not eng.ready(h):
                    pass
                t2 = time.perf_counter()
                eng.finish(h)
                t3 = time.perf_counter()
                t = eng.last_times
                rows.append((t1 - t0, t3 - t2, t3 - t0, t.copy_in, t.propagate, t.demux, t.copy_out))
            med = [1e3 * statistics.median(c) for c in zip(*rows)]
            print(f"{batch.n_photons:>7} {layout:8} {med[0]:9.3f} {med[1]:9.3f} {med[2]:7.3f} | "
                  f"{med[3]:7.3f} {med[4]:9.3f} {med[5]:5.3f} {med[6]:8.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
