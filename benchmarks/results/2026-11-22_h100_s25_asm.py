import time, numpy as np
from charon.scheduler.batcher import Batcher, HostBuffer
from charon.scheduler.queue import make_queue
from charon.scheduler.request import EventRequest
from charon.photons import N_ROWS
rows = [np.random.rand(1000).astype(np.float32) for _ in range(N_ROWS)]
b = Batcher(make_queue("fcfs"), 5_000_000)
buf = HostBuffer()
ts = []
for i in range(3000):
    r = EventRequest(i, 1000, rows, None, (i, 1000), None, time.monotonic())
    b.add(r)
    t = time.perf_counter(); s = b.take(); bt = b.assemble(s, buf); ts.append(time.perf_counter() - t)
ts = np.array(ts[100:]) * 1e6
print("take+assemble hot us: median", np.median(ts), "p90", np.percentile(ts, 90))
ts = []
for i in range(50):
    time.sleep(0.015)
    r = EventRequest(i, 1000, rows, None, (i, 1000), None, time.monotonic())
    b.add(r)
    t = time.perf_counter(); s = b.take(); bt = b.assemble(s, buf); ts.append(time.perf_counter() - t)
ts = np.array(ts) * 1e6
print("after 15 ms sleep us: median", np.median(ts), "p90", np.percentile(ts, 90))
ts = []
for i in range(50):
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.015: pass
    r = EventRequest(i, 1000, rows, None, (i, 1000), None, time.monotonic())
    b.add(r)
    t = time.perf_counter(); s = b.take(); bt = b.assemble(s, buf); ts.append(time.perf_counter() - t)
ts = np.array(ts) * 1e6
print("after 15 ms spin us: median", np.median(ts), "p90", np.percentile(ts, 90))
import zmq
ctx = zmq.Context(); s1 = ctx.socket(zmq.PULL); s1.bind("inproc://x"); pl = zmq.Poller(); pl.register(s1, zmq.POLLIN)
ts = []
for i in range(50):
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.015: pl.poll(0)
    r = EventRequest(i, 1000, rows, None, (i, 1000), None, time.monotonic())
    b.add(r)
    t = time.perf_counter(); s = b.take(); bt = b.assemble(s, buf); ts.append(time.perf_counter() - t)
ts = np.array(ts) * 1e6
print("after 15 ms poll(0) spin us: median", np.median(ts), "p90", np.percentile(ts, 90))
