"""Does the order the CUDA kernel takes photons in change its time? A probe before sorting them on the device.

    python benchmarks/photon_order.py --detector demo --sizes 46000,1000000 --lanes 2 --pipeline 200

A warp runs 32 consecutive photons. Photons of one point source go every way, so the 32 threads walk 32
different paths down the BVH: their loads do not coalesce and the warp waits for its longest walk. Here
the same photons run in four orders, each batch's time measured back to back as in ``engine_bench.py
--pipeline``:

* ``as-drawn``: events of ``--event-size`` photons, each a point source (``random_event``), in the order
  the source drew them: what a client sends;
* ``event-sorted``: each event's photons sorted by a direction bin (8 x 8 x 8 over dx, dy, dz): a warp
  holds one origin and nearby directions;
* ``one-event``: the whole batch as one event, the sources' photons in drawn order (origins mixed only
  where events meet);
* ``one-event-sorted``: that event sorted by the direction bin across all sources: a warp holds nearby
  directions from different origins, which is what a sort on the device over a whole batch would give.

Sorting changes which random numbers a photon draws (its key is its index in its event), not the physics,
so hit counts agree within their statistical spread; only times are compared.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from engine_bench import kernel_resources, make_batch, pinned_copies, pipelined

from charon.engines import create_engine
from charon.engines.base import EngineConfig
from charon.geometry import resolve_detector
from charon.photons import PhotonBatch


def direction_bin(table: np.ndarray) -> np.ndarray:
    """[n] int: 8 levels of each direction cosine (rows 3-5), as one 9-bit key."""
    q = np.clip(((table[3:6] + 1.0) * 4.0).astype(np.int64), 0, 7)  # [3, n]
    return q[0] * 64 + q[1] * 8 + q[2]


def variants(batch: PhotonBatch) -> dict:
    """The four orders of ``batch``'s photons (see the module docstring), as PhotonBatches."""
    n, off = batch.n_photons, batch.offsets
    key = direction_bin(batch.table)
    within = np.concatenate([off[s] + np.argsort(key[off[s] : off[s + 1]], kind="stable")
                             for s in range(batch.n_events)])  # fmt: skip
    across = np.argsort(key, kind="stable")

    def reorder(perm, as_one):
        table, flags = np.ascontiguousarray(batch.table[:, perm]), np.ascontiguousarray(batch.flags[perm])
        if as_one:
            return PhotonBatch.from_events([table], [0])
        return PhotonBatch(table, flags, batch.slot, batch.offsets, batch.event_id, batch.first_index)

    ident = np.arange(n)
    return {"as-drawn": reorder(ident, False), "event-sorted": reorder(within, False),
            "one-event": reorder(ident, True), "one-event-sorted": reorder(across, True)}  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", default="demo")
    ap.add_argument("--sizes", default="46000,1000000", help="photons per batch, comma-separated")
    ap.add_argument("--event-size", type=int, default=1000)
    ap.add_argument("--lanes", type=int, default=2)
    ap.add_argument("--pipeline", type=int, default=200, help="batches back to back per variant")
    ap.add_argument("--rounds", type=int, default=2, help="passes over the variants, alternating")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    det = resolve_detector(a.detector)
    sizes = [int(float(s)) for s in a.sizes.split(",")]
    eng = create_engine("cuda", det, EngineConfig(seed=1, max_batch_photons=max(sizes), lanes=a.lanes))
    eng.warm_up()
    print(f"# {a.detector}: kernel {kernel_resources(eng)}", flush=True)
    radius = 0.6 * float(np.linalg.norm(det.channel_position, axis=1).max()) if det.n_channels else 500.0
    rows = []
    for n in sizes:
        batch = make_batch(n, a.event_size, np.random.default_rng(0), radius)
        runs = {name: pinned_copies(eng, b, a.lanes) for name, b in variants(batch).items()}
        for r in range(a.rounds):
            for name, copies in runs.items():
                pipelined(eng, copies, 2 * a.lanes)  # settle
                hits = eng.propagate(copies[0]).n_hits
                pipe = pipelined(eng, copies, a.pipeline)
                us = pipe["wall_s"] / (a.pipeline * n) * 1e9  # ns per photon
                rows.append(dict(photons=n, order=name, round=r, hits=hits, ns_per_photon=us, **pipe))
                print(f"{n:>9d} {name:>17s} round {r}: {pipe['batch_ms']:8.3f} ms/batch, {us:7.2f} ns/photon, "
                      f"busy {pipe['busy_fraction']:.2f}, hits {hits}", flush=True)  # fmt: skip
    eng.close()
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(date=time.strftime("%Y-%m-%d"), rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
