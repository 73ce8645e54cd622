"""Light-load A/B in-process: the engine driven by its thread (charon today) or by the socket loop itself
(launch in the loop, poll(0) + ready() once the batch is due: no thread hand-off), and the batcher's
one-slot path or the general one (e1ed73c). Per-event traces as in the twenty-fifth session's turns.py.

--asm old imports .s26/old_batcher.py, made from the general batcher as it was (not kept here, it is in git):
    git show e1ed73c:charon/scheduler/batcher.py | sed 's/from \.\.photons/from charon.photons/;
        s/from \.queue/from charon.scheduler.queue/; s/from \.request/from charon.scheduler.request/' > .s26/old_batcher.py"""
import socket, subprocess, sys, threading, time, collections, argparse, json, os
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".s26")
from profile_server import NullEngine
import charon.server as S
from charon.server import BatchServer, ServerConfig
from charon.engine_thread import EngineThread, BatchResult, SlotsResult

ap = argparse.ArgumentParser()
ap.add_argument("--engine", default="null")
ap.add_argument("--lanes", type=int, default=2)
ap.add_argument("--drive", default="thread", choices=["thread", "loop"])
ap.add_argument("--spin-frac", type=float, default=0.8, help="loop drive: sleep until this share of the mean batch time, then spin")
ap.add_argument("--asm", default="new", choices=["old", "new"])
ap.add_argument("--tag", default="run")
ap.add_argument("--trace", default=None)
ap.add_argument("--json-out", default=None)
ap.add_argument("--bench-args", default="--clients 64 --load-procs 1 --events 300000 --duration 10 --event-size 1000 --client-mode req --think-ms exp:1000")
a = ap.parse_args()
if a.asm == "old":
    import old_batcher
    import charon.scheduler.batcher as B
    B.assemble = old_batcher.assemble
pc = time.perf_counter


class NullAsync(NullEngine):
    """The null engine with the asynchronous interface (launch/ready/finish)."""
    lanes = (0, 1)
    def launch(self, batch, keep_photons=False):
        return batch
    def ready(self, h):
        return True
    def finish(self, h):
        return self.propagate(h)


class LoopEngine(EngineThread):
    """Runs the engine's asynchronous calls from the socket loop: no thread, no hand-off."""
    spin_frac = a.spin_frac
    def start(self, timeout=None):
        self.engine = self._factory()
        self.engine.warm_up()
        self.lanes = max(1, len(getattr(self.engine, "lanes", ())))
        self.max_in_flight = self.lanes
        self.running = collections.deque()
        self.mean = None
        return self.engine
    def submit(self, batch):
        self.in_flight += 1
        self.last_submitted = batch.photons.n_photons
        if not self.running:
            self.busy.start()
        t0 = pc()
        self.running.append((batch, self.engine.launch(batch.photons), t0))
    def due_ms(self):
        if not self.running:
            return None
        return (self.running[0][2] + self.spin_frac * (self.mean or 0.0) - pc()) * 1e3
    def check(self):
        while self.running and self.engine.ready(self.running[0][1]):
            batch, h, t0 = self.running.popleft()
            hits = self.engine.finish(h)
            dt = pc() - t0
            dev = getattr(self.engine.last_times, "busy", 0.0) or 0.0  # device time (CUDA events): not inflated by a late check
            self.mean = dev if self.mean is None else 0.95 * self.mean + 0.05 * dev
            if not self.running:
                self.busy.stop()
            self.results.append(BatchResult(batch, [SlotsResult(batch.slots, hits, None)], dt, self.engine.last_times.snapshot()))
    def poll_results(self):
        pass
    def stop(self, timeout=30.0):
        self.engine.close()
        self.wake_socket.close(0)


with socket.socket() as p:
    p.bind(("127.0.0.1", 0)); mport = p.getsockname()[1]
cfg = ServerConfig(bind="tcp://127.0.0.1:0", engine="cpu" if a.engine == "null" else a.engine, detector="demo",
                   metrics_port=mport, log_level="WARNING", engine_lanes=a.lanes)
factory = None
if a.engine == "null":
    factory = NullAsync if a.drive == "loop" else NullEngine
srv = BatchServer(cfg, engine_factory=factory)
if a.drive == "loop":
    S.EngineThread = LoopEngine
    orig_turn, orig_pt = srv._turn, srv._poll_timeout_ms
    def turn(events, read=True, draining=False):
        et = srv.engine_thread
        et.check()
        if et.results:
            srv._collect_results()
        orig_turn(events, read, draining)
    def pt():
        t = orig_pt()
        d = srv.engine_thread.due_ms()
        return t if d is None else min(t, max(0.0, d))
    srv._turn, srv._poll_timeout_ms = turn, pt
trace = []
if a.trace:
    orig_demux = srv._demux
    mono = time.monotonic
    def demux(res):
        t_col = mono()
        orig_demux(res)
        t_end = mono()
        for part in res.parts:
            for slot in part.slots:
                r = slot.request
                trace.append((r.arrival, res.batch.dispatched, t_col, t_end, res.engine_seconds, len(res.batch.slots)))
    srv._demux = demux
th = threading.Thread(target=srv.serve_forever); th.start()
while srv.address is None or not srv.started.is_set(): time.sleep(0.05)
time.sleep(0.5)
jp = f"/tmp/drive_{os.getpid()}.json"
out = subprocess.run([sys.executable, "-m", "charon.bench", "--address", srv.address, "--metrics-url",
                      f"http://127.0.0.1:{mport}/metrics", "--no-progress", "--json", jp, *a.bench_args.split()],
                     capture_output=True, text=True)
srv.stop(); th.join()
try:
    r = json.load(open(jp))["batched"]
except Exception:
    print(out.stdout[-3000:], out.stderr[-3000:]); raise
lat = r["latency_ms"]
if a.json_out:
    import shutil; shutil.copy(jp, a.json_out)
if a.trace:
    import numpy as np
    t = np.array(trace)
    np.savez_compressed(a.trace, trace=t)
    srv_ms = 1e3 * (t[:, 3] - t[:, 0]); wait = 1e3 * (t[:, 1] - t[:, 0]); trip = 1e3 * (t[:, 2] - t[:, 1])
    eng = 1e3 * t[:, 4]; post = 1e3 * (t[:, 3] - t[:, 2])
    print(f"  trace: {len(t)} events; server>3ms {(srv_ms > 3).mean():.4f} >10ms {(srv_ms > 10).mean():.4f}")
    for name, v in [("server", srv_ms), ("wait", wait), ("roundtrip", trip), ("engine", eng), ("trip-engine", trip - eng), ("post", post)]:
        q = np.percentile(v, [50, 90, 99, 99.9])
        print(f"  {name:12s} p50/90/99/99.9 {q[0]:.3f}/{q[1]:.3f}/{q[2]:.3f}/{q[3]:.3f}")
bound = cfg.max_wait_ms + 2e3 * (r.get("batch_seconds_mean") or 0)
sl = r.get("server_latency_ms") or {}
print(f"[{a.tag}] engine={a.engine} lanes={a.lanes} drive={a.drive} spin_frac={a.spin_frac} asm={a.asm}: ev/s {r['events_per_s']:.0f} "
      f"p50/p95/p99 {lat['p50']:.2f}/{lat['p95']:.2f}/{lat['p99']:.2f} bound {bound:.2f} within {lat['p99'] < bound} "
      f"srv p50/p99 {sl.get('p50', 0):.2f}/{sl.get('p99', 0):.2f} batch_ms {1e3*(r.get('batch_seconds_mean') or 0):.3f} "
      f"host_us/ev {r.get('host_us_per_event', 0):.0f} over3 {r.get('latency_share_over_ms', {}).get('3')}", flush=True)
