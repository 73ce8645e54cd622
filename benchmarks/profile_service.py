"""Where the shared engine's thread spends its time under load (``charon-batch --procs N``).

    python benchmarks/profile_service.py --bench-args "--clients 256 --load-procs 4 --events 1000000 --duration 10" \\
        -- --engine cuda --detector demo --procs 3

Runs the ``--procs`` launcher in this process with the engine service's loop
under cProfile (or, with --front-end, the first front-end process), drives it
with charon-bench from a subprocess, then stops the launcher and prints the top
functions (cProfile inflates absolute times; read the shares).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import signal
import socket
import subprocess
import sys
import threading
import time

from charon import cli
from charon.bench import scrape
from charon.engine_service import EngineService


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench-args", default="--clients 256 --load-procs 4 --events 1000000 --duration 10 "
                    "--event-size 1000")  # fmt: skip
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--sort", default="tottime")
    ap.add_argument("--front-end", action="store_true",
                    help="profile the first front-end process instead of the engine service")
    ap.add_argument("server", nargs=argparse.REMAINDER, help="-- charon-batch flags (must include --procs N)")
    a = ap.parse_args()
    server = a.server[1:] if a.server[:1] == ["--"] else a.server
    prof = cProfile.Profile()
    loop = EngineService._loop

    def profiled(self):
        prof.enable()
        try:
            loop(self)
        finally:
            prof.disable()

    fe_stats = None
    if a.front_end:
        import tempfile

        fe_stats = tempfile.mktemp(suffix=".prof")
        popen = subprocess.Popen
        started = []

        def popen_first_profiled(cmd, *args, **kw):
            if not started and cmd[1:3] == ["-m", "charon.cli"] and "--engine-service" in cmd:
                cmd = [cmd[0], "-m", "cProfile", "-o", fe_stats, *cmd[1:]]
                started.append(cmd)
            return popen(cmd, *args, **kw)

        subprocess.Popen = popen_first_profiled
    else:
        EngineService._loop = profiled
    port, mport = _free_port(), _free_port()
    n = int(server[server.index("--procs") + 1])
    argv = ["--bind", f"tcp://127.0.0.1:{port}", "--metrics-port", str(mport), "--log-level", "WARNING", *server]
    urls = ",".join(f"http://127.0.0.1:{mport + i}/metrics" for i in range(n + 1))

    def drive():
        deadline = time.monotonic() + 600
        while True:  # the front ends' and the engine's metrics answer once all have started
            try:
                scrape(urls.split(","))
                break
            except OSError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        out = subprocess.run([sys.executable, "-m", "charon.bench", "--address", f"tcp://127.0.0.1:{port}",
                              "--metrics-url", urls, "--no-progress", *a.bench_args.split()],
                             capture_output=True, text=True)  # fmt: skip
        print(out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-2000:], flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=drive, daemon=True).start()
    rc = cli.batch_main(argv)
    if fe_stats is None:
        pstats.Stats(prof).sort_stats(a.sort).print_stats(a.top)
    else:
        for _ in range(100):  # the front end writes its profile as it exits
            if os.path.exists(fe_stats) and os.path.getsize(fe_stats) > 0:
                break
            time.sleep(0.2)
        pstats.Stats(fe_stats).sort_stats(a.sort).print_stats(a.top)
    return rc


if __name__ == "__main__":
    sys.exit(main())
