"""Time the socket loop's turns one by one at light load; optionally spin in poll (Python) first."""
import socket, subprocess, sys, threading, time, collections, argparse, json, os
sys.path.insert(0, "benchmarks")
from profile_server import NullEngine
from charon.server import BatchServer, ServerConfig
import charon.server as S
import charon.sockets as SK

ap = argparse.ArgumentParser()
ap.add_argument("--engine", default="null")
ap.add_argument("--lanes", type=int, default=1)
ap.add_argument("--spin-us", type=float, default=0)
ap.add_argument("--timing", action="store_true")
ap.add_argument("--tag", default="run")
ap.add_argument("--trace", default=None, help="write per-event times (npz) here")
ap.add_argument("--json-out", default=None)
ap.add_argument("--bench-args", default="--clients 64 --load-procs 1 --events 300000 --duration 10 --event-size 1000 --client-mode req --think-ms exp:1000")
a = ap.parse_args()
with socket.socket() as p:
    p.bind(("127.0.0.1", 0)); mport = p.getsockname()[1]
cfg = ServerConfig(bind="tcp://127.0.0.1:0", engine="cpu" if a.engine == "null" else a.engine, detector="demo",
                   metrics_port=mport, log_level="WARNING", engine_lanes=a.lanes)
srv = BatchServer(cfg, engine_factory=NullEngine if a.engine == "null" else None)
acc = collections.defaultdict(lambda: [0, 0.0])
pc = time.perf_counter

def timed(name, fn):
    def w(*x, **k):
        t = pc(); r = fn(*x, **k); d = pc() - t
        e = acc[name]; e[0] += 1; e[1] += d
        return r
    return w

if a.spin_us > 0:
    base_poll = SK.poll
    spin_s = a.spin_us / 1e6
    def spin_poll(poller, timeout_ms):
        if timeout_ms <= 0:
            return dict(poller.poll(0))
        t0 = pc()
        lim = min(spin_s, timeout_ms / 1e3)
        while True:
            ev = poller.poll(0)
            if ev:
                return dict(ev)
            el = pc() - t0
            if el >= lim:
                break
        return base_poll(poller, timeout_ms - el * 1e3)
    S.poll = spin_poll

if a.timing:
    for name in ["_turn", "_collect_results", "_maybe_dispatch", "_handle", "_demux", "_finish", "_accept_photondata",
                 "_handle_photondata", "_reply", "_poll_timeout_ms", "_record_batch"]:
        setattr(srv, name, timed(name, getattr(srv, name)))
    S.poll = timed("poll", S.poll)
    S.recv_message = timed("recv_message", S.recv_message)
    orig_open = srv._open
    def op():
        orig_open()
        et = srv.engine_thread
        et.poll_results = timed("poll_results", et.poll_results)
        et.submit = timed("submit", et.submit)
        srv.batcher.take = timed("take", srv.batcher.take)
        srv.batcher.assemble = timed("assemble", srv.batcher.assemble)
        srv.batcher.add = timed("add", srv.batcher.add)
    srv._open = op
trace = []
if a.trace:
    orig_demux = srv._demux
    mono = time.monotonic
    def demux(res):
        t_col = mono()
        orig_demux(res)
        t_end = mono()
        tm = res.times
        for part in res.parts:
            for slot in part.slots:
                r = slot.request
                trace.append((r.arrival, res.batch.dispatched, t_col, t_end, res.engine_seconds,
                              getattr(tm, "propagate", 0.0), getattr(tm, "busy", 0.0), len(res.batch.slots)))
    srv._demux = demux
th = threading.Thread(target=srv.serve_forever); th.start()
while srv.address is None or not srv.started.is_set(): time.sleep(0.05)
time.sleep(0.5)
acc.clear()
jp = f"/tmp/turns_{os.getpid()}.json"
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
    eng = 1e3 * t[:, 4]; post = 1e3 * (t[:, 3] - t[:, 2]); prop = t[:, 5]
    slow = srv_ms > 3
    print(f"  trace: {len(t)} events; server>3ms {slow.mean():.4f} >10ms {(srv_ms > 10).mean():.4f}")
    for name, v in [("server", srv_ms), ("wait", wait), ("roundtrip", trip), ("engine", eng), ("trip-engine", trip - eng), ("post", post), ("propagate(ms)", prop)]:
        q = np.percentile(v, [50, 90, 99, 99.9])
        print(f"  {name:14s} p50/90/99/99.9 {q[0]:.3f}/{q[1]:.3f}/{q[2]:.3f}/{q[3]:.3f}  mean of slow {v[slow].mean() if slow.any() else 0:.3f}")
bound = cfg.max_wait_ms + 2e3 * (r.get("batch_seconds_mean") or 0)
print(f"[{a.tag}] engine={a.engine} lanes={a.lanes} spin_us={a.spin_us} timing={a.timing}: ev/s {r['events_per_s']:.0f} "
      f"p50/p95/p99 {lat['p50']:.2f}/{lat['p95']:.2f}/{lat['p99']:.2f} bound {bound:.2f} host_us/ev {r.get('host_us_per_event', 0):.0f} "
      f"batch_ms {1e3*(r.get('batch_seconds_mean') or 0):.2f} wait_ms {r.get('dispatch_wait_ms_mean') or 0:.2f} "
      f"server_ms {r.get('server_latency_ms_mean') or 0:.2f} over_ms {r.get('latency_share_over_ms')} server_over {r.get('server_latency_share_over_ms')}")
if a.timing:
    n = acc["_finish"][0] or 1
    for k, (c, t) in sorted(acc.items(), key=lambda kv: -kv[1][1]):
        print(f"  {k:20s} calls/ev {c/n:5.2f} us/call {1e6*t/max(c,1):8.1f} us/ev {1e6*t/n:8.1f}")
