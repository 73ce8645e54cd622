"""Cold cost of a one-event batch's assembly: Python/numpy (the batcher) against numba, after a 15 ms pause."""
import time, numpy as np, numba
from charon.scheduler.batcher import Batcher, HostBuffer
from charon.scheduler.queue import make_queue
from charon.scheduler.request import EventRequest
from charon.photons import N_ROWS

rows = [np.random.rand(1000).astype(np.float32) for _ in range(N_ROWS)]
flags = np.zeros(1000, np.uint32)
dst = np.empty((N_ROWS + 1, 1 << 16), np.float32)

@numba.njit(nogil=True, cache=False)
def copy12(dst, n, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, f):
    for i in range(n):
        dst[0, i] = a0[i]; dst[1, i] = a1[i]; dst[2, i] = a2[i]; dst[3, i] = a3[i]; dst[4, i] = a4[i]
        dst[5, i] = a5[i]; dst[6, i] = a6[i]; dst[7, i] = a7[i]; dst[8, i] = a8[i]; dst[9, i] = a9[i]
        dst[10, i] = a10[i]; dst[11, i] = numba.float32(0.0) if f[i] == 0 else numba.float32(1.0)
    return n

@numba.njit(nogil=True, cache=False)
def one(x):
    return x.shape[0]

copy12(dst, 1000, *rows, flags); one(flags)
b = Batcher(make_queue("fcfs"), 5_000_000); buf = HostBuffer()

def py():
    r = EventRequest(0, 1000, rows, None, (0, 1000), None, time.monotonic()); b.add(r)
    t = time.perf_counter(); s = b.take(); b.assemble(s, buf); return time.perf_counter() - t

def jit():
    t = time.perf_counter(); copy12(dst, 1000, *rows, flags); return time.perf_counter() - t

def jit1():
    t = time.perf_counter(); one(flags); return time.perf_counter() - t

def npcopy():
    t = time.perf_counter()
    for k in range(N_ROWS):
        dst[k, :1000] = rows[k]
    return time.perf_counter() - t

for name, f in [("python take+assemble", py), ("numba copy, 14 args", jit), ("numba call, 1 arg", jit1), ("11 numpy row copies", npcopy)]:
    hot = np.median([f() for _ in range(2000)]) * 1e6
    cold = []
    for _ in range(60):
        time.sleep(0.015); cold.append(f())
    print(f"{name:24s} hot {hot:7.1f} us   after 15 ms sleep: median {np.median(cold)*1e6:7.1f} p90 {np.percentile(cold, 90)*1e6:7.1f} us")

import ctypes
from numba import cfunc, types, carray
sig = types.int64(types.CPointer(types.CPointer(types.float32)), types.int64)

@cfunc(sig, nopython=True)
def copy_ptrs(ptrs, n):
    dst = carray(ptrs[0], (12, 1 << 16))
    for k in range(11):
        src = carray(ptrs[k + 1], n)
        for i in range(n):
            dst[k, i] = src[i]
    return n

fn = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64)(copy_ptrs.address)
ptrs = np.array([dst.ctypes.data] + [r.ctypes.data for r in rows], np.uint64)
pp = ptrs.ctypes.data
fn(pp, 1000)
assert np.array_equal(dst[3, :1000], rows[3])

def cf():
    t = time.perf_counter(); fn(pp, 1000); return time.perf_counter() - t

def cf_with_ptrs():
    t = time.perf_counter()
    p = np.array([dst.ctypes.data] + [r.ctypes.data for r in rows], np.uint64)
    fn(p.ctypes.data, 1000); return time.perf_counter() - t

for name, f in [("cfunc via ctypes", cf), ("cfunc + pointer table", cf_with_ptrs)]:
    hot = np.median([f() for _ in range(2000)]) * 1e6
    cold = []
    for _ in range(60):
        time.sleep(0.015); cold.append(f())
    print(f"{name:24s} hot {hot:7.1f} us   after 15 ms sleep: median {np.median(cold)*1e6:7.1f} p90 {np.percentile(cold, 90)*1e6:7.1f} us")
