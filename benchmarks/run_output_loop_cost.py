"""Socket-loop CPU per event spent on run output (--output-dir): baskets written inline vs on the writer thread.

    python benchmarks/run_output_loop_cost.py [--events 1000] [--rounds 5] [--hits 20,200]

"inline" builds and extends each basket on the calling thread, as the socket loop did before the
writer thread; "thread" is ``RunWriter.add`` as the loop calls it now. Only the calling thread's CPU is
counted (``time.thread_time``): the writer thread's Python work (awkward arrays, uproot's bookkeeping)
still holds the GIL, so the loop's real cost lies between the "thread" figure and the same write with
compression off (uproot.recreate(..., compression=None)), which the script also prints.

It also times what a RUN_END costs the loop when the run's last basket is nearly full
(``--events`` - 1 events): "run_end_sync" is ``RunWriter.close`` (the loop waited for that basket
and the file's close until the fifteenth session), "run_end_async" is ``close_async``, which
leaves both to the writer thread. Wall time on the calling thread, in ms.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

import numpy as np


def main(argv=None) -> list[dict]:
    import uproot

    from charon import run_output
    from charon.photons import HitBatch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1000, help="events per basket (default 1000)")
    ap.add_argument("--rounds", type=int, default=5, help="baskets per mode (default 5)")
    ap.add_argument("--hits", default="20,200", help="mean hits per event, comma-separated (default 20,200)")
    ap.add_argument("--pause", type=float, default=0.6, help="seconds between baskets: the clients' pace")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for mean in (int(h) for h in args.hits.split(",")):
            evs = [HitBatch(rng.integers(0, 53, n).astype(np.uint32), rng.random((8, n), dtype=np.float32),
                            rng.integers(0, 4096, n).astype(np.uint32), np.array([0, n], np.int64))
                   for n in rng.poisson(mean, args.events)]  # fmt: skip
            ids = list(range(args.events))
            for mode in ("inline", "thread", "uncompressed"):
                w = run_output.RunWriter(os.path.join(d, f"{mode}{mean}.charon.ntuple.root"),
                                         rng.random((53, 3), dtype=np.float32), np.zeros(53, np.int32), args.events)
                if mode == "uncompressed":  # a stand-in file without compression: the GIL-held part of a write
                    w._file.close()
                    w._file = uproot.recreate(w.path, compression=None)
                    w._file.mktree("output", run_output.OUTPUT_TYPES)
                cpu = 0.0
                for _ in range(args.rounds):
                    t = time.thread_time()
                    if mode == "thread":
                        for i, h in enumerate(evs):
                            w.add(i, h)
                    else:
                        w._file["output"].extend(run_output._basket_arrays(ids, evs))
                    cpu += time.thread_time() - t
                    time.sleep(args.pause)
                w.close()
                us = 1e6 * cpu / (args.rounds * args.events)
                rows.append(dict(hits=mean, mode=mode, loop_us_per_event=us))
                print(f"{mean:4d} hits/event  {mode:12s}: {us:7.1f} us of the calling thread's CPU per event")
            for mode in ("run_end_sync", "run_end_async"):
                w = run_output.RunWriter(os.path.join(d, f"{mode}{mean}.charon.ntuple.root"),
                                         rng.random((53, 3), dtype=np.float32), np.zeros(53, np.int32), args.events)
                for i, h in enumerate(evs[:-1]):
                    w.add(i, h)
                closed = threading.Event()
                t = time.perf_counter()
                if mode == "run_end_sync":
                    w.close()
                else:
                    w.close_async(closed.set)
                ms = 1e3 * (time.perf_counter() - t)
                if mode == "run_end_async":
                    closed.wait()
                    w.close()
                rows.append(dict(hits=mean, mode=mode, loop_ms_at_run_end=ms))
                print(f"{mean:4d} hits/event  {mode:13s}: {ms:7.2f} ms of the calling thread at RUN_END")
    return rows


if __name__ == "__main__":
    main()
