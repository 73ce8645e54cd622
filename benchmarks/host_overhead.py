"""Host-side cost of serving an event, excluding the engine, against a plain memory copy.

Per event: decode + validate the PHOTONDATA frames, de-duplication digest,
batch assembly (copy into the batch buffer), demultiplexing of the batch's
hits and encoding of the reply. Baseline: ``np.copyto`` of the same payload
bytes (11 float32 frames). No sockets: this is the server's own CPU work.

    python benchmarks/host_overhead.py --sizes 1e2,1e3,1e4,1e5 --batch-photons 1e6
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from charon import protocol as P
from charon.client import photondata_frames
from charon.photons import HitBatch
from charon.scheduler.batcher import Batcher, HostBuffer
from charon.scheduler.queue import FCFSQueue
from charon.scheduler.request import EventRequest, Route
from charon.sources import random_event


def bench(event_size: int, batch_photons: int, hit_fraction: float, repeat: int):
    rng = np.random.default_rng(0)
    n_events = max(1, batch_photons // event_size)
    payload = random_event(event_size, rng)
    frames = [photondata_frames(i, payload) for i in range(n_events)]
    buf = HostBuffer()
    best_host, best_copy = np.inf, np.inf
    src = [np.frombuffer(f, np.float32) for f in frames[0][2:]]
    dst = np.empty((11, event_size * n_events), np.float32)
    n_hits = int(hit_fraction * event_size)
    for _ in range(repeat):
        t0 = time.perf_counter()
        batcher = Batcher(FCFSQueue(), batch_photons)
        for f in frames:
            pd = P.decode_photondata(f, 10**9)
            batcher.add(EventRequest(pd.event_id, pd.n, pd.rows, pd.flags, pd.key, Route([b"id", b""], pd.layout), 0.0))
        batch = batcher.assemble(batcher.take(), buf)
        # Demux and encode as the server does for a batch with `hit_fraction` hits per photon.
        H = n_hits * n_events
        hits = HitBatch(np.zeros(H, np.uint32), np.zeros((8, H), np.float32), np.zeros(H, np.uint32),
                        np.arange(n_events + 1, dtype=np.int64) * n_hits)  # fmt: skip
        out = 0
        for s, slot in enumerate(batch.slots):
            slot.request.add_piece(slot.start, slot.count, hits.event(s))
            out += len(P.encode_hits(slot.request.event_id, slot.request.hits(), P.Layout.COMPACT))
        best_host = min(best_host, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for e in range(n_events):
            sl = slice(e * event_size, (e + 1) * event_size)
            for r in range(11):
                np.copyto(dst[r, sl], src[r])
        best_copy = min(best_copy, time.perf_counter() - t0)
    n = n_events * event_size
    return dict(event_size=event_size, events=n_events, host_us_per_event=best_host / n_events * 1e6,
                host_ns_per_photon=best_host / n * 1e9, copy_ns_per_photon=best_copy / n * 1e9,
                ratio=best_host / best_copy)  # fmt: skip


def main(argv=None):
    import gc

    gc.set_threshold(50_000, 20, 100)  # as charon-batch does
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e2,1e3,1e4,1e5")
    ap.add_argument("--batch-photons", default="1e6")
    ap.add_argument("--hit-fraction", type=float, default=0.02)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args(argv)
    print(f"{'photons/event':>13} {'events':>7} {'host us/event':>13} {'host ns/photon':>14} "
          f"{'copy ns/photon':>14} {'host/copy':>9}")  # fmt: skip
    for s in a.sizes.split(","):
        r = bench(int(float(s)), int(float(a.batch_photons)), a.hit_fraction, a.repeat)
        print(f"{r['event_size']:>13d} {r['events']:>7d} {r['host_us_per_event']:>13.1f} {r['host_ns_per_photon']:>14.2f} "
              f"{r['copy_ns_per_photon']:>14.2f} {r['ratio']:>9.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
