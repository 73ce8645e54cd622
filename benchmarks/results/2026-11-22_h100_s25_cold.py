import time, numpy as np
a = np.random.rand(1000).astype(np.float32); out = np.empty(1000, np.float32)
def op():
    t = time.perf_counter()
    for _ in range(12): np.concatenate([a], out=out)
    return time.perf_counter() - t
def run(gap, mode):
    ts = []
    for i in range(60):
        t0 = time.perf_counter()
        if mode == "sleep": time.sleep(gap)
        else:
            while time.perf_counter() - t0 < gap: pass
        ts.append(op())
    return np.median(ts) * 1e6
print("hot", run(0, "spin"))
for gap in (0.0001, 0.001, 0.005, 0.015):
    print(gap, "spin", run(gap, "spin"), "sleep", run(gap, "sleep"))
