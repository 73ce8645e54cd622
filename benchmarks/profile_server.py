"""Where the server's host time goes under load: run charon-batch in-process, drive it with charon-bench.

    python benchmarks/profile_server.py --engine cuda|cpu|null [--profile] [--switch-interval S] [--engine-lanes L]

`null` answers every batch with no hits at once (no engine work), which
separates the socket loop's own cost from its interplay with the engine
thread. --profile prints the socket loop's top functions (cProfile inflates
absolute times; read the shares).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import socket
import subprocess
import sys
import threading
import time

from charon.engines.base import StageTimes
from charon.photons import empty_hits
from charon.server import BatchServer, ServerConfig


class NullEngine:
    name = "null"

    def __init__(self):
        self.last_times = StageTimes()

    def warm_up(self):
        pass

    def propagate(self, batch, keep_photons=False):
        return empty_hits(batch.n_events)

    def close(self):
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="cuda")
    ap.add_argument("--detector", default="demo")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--switch-interval", type=float, default=None)
    ap.add_argument("--intake", default="python", help="the server's --intake (python or compiled)")
    ap.add_argument("--engine-lanes", type=int, default=1, help="the server's --engine-lanes (CUDA)")
    ap.add_argument("--bench-args", default="--clients 256 --load-procs 6 --events 400000 --duration 10 --event-size 1000")
    a = ap.parse_args()
    if a.switch_interval:
        sys.setswitchinterval(a.switch_interval)
    with socket.socket() as p:
        p.bind(("127.0.0.1", 0))
        mport = p.getsockname()[1]
    cfg = ServerConfig(bind="tcp://127.0.0.1:0", engine=a.engine if a.engine != "null" else "cpu", detector=a.detector,
                       metrics_port=mport, log_level="WARNING", intake=a.intake, engine_lanes=a.engine_lanes)
    srv = BatchServer(cfg, engine_factory=NullEngine if a.engine == "null" else None)
    prof = cProfile.Profile()

    def run():
        if a.profile:
            prof.enable()
        srv.serve_forever()
        if a.profile:
            prof.disable()

    th = threading.Thread(target=run)
    th.start()
    while srv.address is None or not srv.started.is_set():
        time.sleep(0.05)
    out = subprocess.run([sys.executable, "-m", "charon.bench", "--address", srv.address, "--metrics-url",
                          f"http://127.0.0.1:{mport}/metrics", "--no-progress", *a.bench_args.split()],
                         capture_output=True, text=True)
    print(f"engine={a.engine} profile={a.profile} switch={sys.getswitchinterval()}: " + out.stdout.strip().splitlines()[-1])
    srv.stop()
    th.join()
    if a.profile:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        pstats.Stats(prof).sort_stats("cumulative").print_stats("charon", 30)  # the loop's own steps, inclusive


if __name__ == "__main__":
    main()
