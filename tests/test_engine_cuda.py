"""CUDA engine: in numba's CUDA simulator on CI (tiny inputs), on a real GPU with CHARON_TEST_REAL_GPU=1.

Where bitwise equality with the CPU engine cannot hold: the GPU compiler
contracts multiply-adds into FMA instructions and its libdevice math functions
differ from the host libm by an ulp or so, so a photon whose fate sits on a
decision boundary can go another way. So on a real GPU the tests require
identical hits for a large majority of photons and statistical agreement for
the rest; what does hold exactly on every target is checked exactly: the
random streams (batch invariance, reruns) and the demultiplexer.
"""

import numpy as np
import pytest

from charon.engines.base import EngineConfig
from charon.engines.cpu import CPUEngine
from charon.engines.cuda_compat import ensure_numpy_compat
from charon.geometry.builtin import pmt_sphere_detector, sphere_detector
from charon.geometry.optics import constant_surface
from charon.kernels.reference import hit_offsets_ref
from charon.handoff import available as shm_available
from charon.photons import N_ROWS, PhotonBatch
from charon.sources import random_event

REAL_GPU = pytest.mark.gpu


def test_numpy_compat_shim_restores_row_stack(monkeypatch):
    monkeypatch.delattr(np, "row_stack", raising=False)
    assert ensure_numpy_compat() is True
    assert np.row_stack is np.vstack
    np.testing.assert_array_equal(np.row_stack([[1], [2]]), np.vstack([[1], [2]]))
    assert ensure_numpy_compat() is False  # present: left alone


@pytest.fixture(scope="module")
def tiny_det():
    wall = constant_surface("grey", detect=0.4, absorb=0.4, reflect_diffuse=0.2)
    return sphere_detector(500.0, wall_surface=wall, subdivisions=1)


@pytest.fixture(scope="module")
def cuda_engine_tiny(tiny_det):
    from charon.engines.cuda import CUDAEngine

    return CUDAEngine(tiny_det, EngineConfig(seed=5, max_batch_photons=4096))


def _batch(tables, ids):
    return PhotonBatch.from_events([t.copy() for t in tables], ids)


def test_cuda_kernels_match_cpu_engine_on_tiny_batch(cuda_engine_tiny, tiny_det):
    rng = np.random.default_rng(0)
    tables = [random_event(n, rng, radius=200.0) for n in (12, 0, 20)]
    gb, cb = _batch(tables, [3, 4, 5]), _batch(tables, [3, 4, 5])
    g = cuda_engine_tiny.propagate(gb, keep_photons=True)
    c = CPUEngine(tiny_det, EngineConfig(seed=5)).propagate(cb)
    np.testing.assert_array_equal(gb.flags, cb.flags)  # every photon's history, not only the hits
    np.testing.assert_allclose(gb.table, cb.table, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(g.offsets, c.offsets)
    np.testing.assert_array_equal(g.channel, c.channel)
    np.testing.assert_array_equal(g.flags, c.flags)
    np.testing.assert_allclose(g.table, c.table, rtol=1e-5, atol=1e-5)
    assert g.n_hits > 5


@pytest.mark.parametrize("seed", range(3))
def test_gpu_demux_matches_numpy_reference_exactly(cuda_engine_tiny, seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 40, size=rng.integers(1, 9))
    sizes[rng.random(len(sizes)) < 0.3] = 0
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(offsets[-1])
    table = rng.normal(size=(11, n)).astype(np.float32)
    flags = rng.integers(0, 2**31, n).astype(np.uint32)
    p = rng.random() if seed else 0.0  # seed 0: a batch with no hits at all
    channel = np.where(rng.random(n) < p, rng.integers(0, 50, n), -1).astype(np.int32)
    if len(sizes) > 2:  # an event with photons but no hits
        channel[offsets[1] : offsets[2]] = -1
    h = cuda_engine_tiny.demux_arrays(table, flags, channel, offsets)
    idx, off = hit_offsets_ref(channel, offsets)
    np.testing.assert_array_equal(h.offsets, off)
    np.testing.assert_array_equal(h.channel, channel[idx])
    np.testing.assert_array_equal(h.flags, flags[idx])
    np.testing.assert_array_equal(h.table, table[3:11, idx])


def test_gpu_scan_crosses_block_levels(cuda_engine_tiny):
    """More elements than one scan block squared: the multi-level path (block 8 simulated, 1024 real)."""
    from charon.engines.cuda import simulator

    n = 150 if simulator() else 1024 * 1024 + 5000
    rng = np.random.default_rng(9)
    channel = np.where(rng.random(n) < 0.5, 1, -1).astype(np.int32)
    offsets = np.array([0, n // 3, n // 3, n], np.int64)
    h = cuda_engine_tiny.demux_arrays(np.ones((11, n), np.float32), np.zeros(n, np.uint32), channel, offsets)
    np.testing.assert_array_equal(h.offsets, hit_offsets_ref(channel, offsets)[1])


# ---------------------------------------------------------------- real GPU only


@pytest.fixture(scope="module")
def gpu_pair():
    from charon.engines.cuda import CUDAEngine

    det = pmt_sphere_detector(40, 2000.0, 2500.0, pmt_subdivisions=2, wall_subdivisions=3)
    return det, CUDAEngine(det, EngineConfig(seed=11, max_batch_photons=1 << 20)), CPUEngine(det, EngineConfig(seed=11))


@REAL_GPU
def test_launch_bound_caps_registers_and_changes_no_hit(gpu_pair):
    """min_blocks_per_sm recompiles the propagation kernel under a launch bound: fewer registers per thread,
    the same arithmetic, so the same hits bit for bit."""
    from charon.engines.cuda import CUDAEngine

    det, gpu, _ = gpu_pair
    bound = CUDAEngine(det, EngineConfig(seed=11, max_batch_photons=1 << 16, min_blocks_per_sm=8))
    for e in (gpu, bound):
        e.warm_up()  # compiled, so that the kernels report their registers
    regs = [next(iter(e.k.propagate_kernel.get_regs_per_thread().values())) for e in (gpu, bound)]
    assert regs[1] <= 65536 // (8 * 128) < regs[0]  # 8 blocks of 128 threads: at most 64 registers each
    tables = [random_event(n, np.random.default_rng(4)) for n in (9_000, 3_000)]
    want, got = (e.propagate(_batch(tables, [3, 4])) for e in (gpu, bound))
    assert want.n_hits > 100
    for f in ("offsets", "channel", "table", "flags"):
        np.testing.assert_array_equal(getattr(want, f), getattr(got, f))


@REAL_GPU
def test_gpu_batch_invariance_and_rerun(gpu_pair):
    det, gpu, _ = gpu_pair
    rng = np.random.default_rng(1)
    a, b, c = (random_event(n, rng) for n in (20_000, 50_000, 7_000))
    alone = gpu.propagate(_batch([a], [17])).event(0)
    mixed = gpu.propagate(_batch([b, a, c], [5, 17, 9])).event(1)
    again = gpu.propagate(_batch([a], [17])).event(0)
    assert alone.n_hits > 100
    for x in (mixed, again):
        np.testing.assert_array_equal(alone.channel, x.channel)
        np.testing.assert_array_equal(alone.table, x.table)
        np.testing.assert_array_equal(alone.flags, x.flags)


@REAL_GPU
def test_gpu_agrees_with_cpu_engine(gpu_pair):
    det, gpu, cpu = gpu_pair
    rng = np.random.default_rng(2)
    tables = [random_event(10_000, rng) for _ in range(20)]
    g = gpu.propagate(_batch(tables, range(20)))
    c = cpu.propagate(_batch(tables, range(20)))
    # Same random streams: nearly every event has identical hits; the rest differ only through FMA/ulp effects.
    same = sum(np.array_equal(g.event(s).channel, c.event(s).channel) for s in range(20))
    assert same >= 15, same
    # Statistically: per-channel hit counts consistent (chi2 of two Poisson samples).
    gc = np.bincount(g.channel, minlength=det.n_channels).astype(float)
    cc = np.bincount(c.channel, minlength=det.n_channels).astype(float)
    m = (gc + cc) > 0
    chi2 = np.sum((gc[m] - cc[m]) ** 2 / (gc[m] + cc[m]))
    from scipy import stats

    assert chi2 < stats.chi2.ppf(0.9999, m.sum()), chi2
    assert abs(g.n_hits - c.n_hits) < 5 * np.sqrt(g.n_hits + c.n_hits)


def test_strided_rows_from_the_shared_engine_merge_buffer_match_contiguous(cuda_engine_tiny):
    """The shared engine hands the CUDA engine a [11, n] view of a [11, capacity] buffer (copied row by row)."""
    from charon.engine_service import MergeBuffer, decode_batch, encode_batch

    rng = np.random.default_rng(3)
    tables = [random_event(n, rng, radius=200.0) for n in (9, 14, 5)]
    buf = MergeBuffer(64)
    for ids in ([0, 1], [2]):
        frames = encode_batch(1, _batch([tables[i] for i in ids], ids))
        buf.append(decode_batch([bytes(memoryview(f)) for f in frames[1:]])[1])
    strided = buf.seal(contiguous=False).photons
    assert not strided.table.flags.c_contiguous
    got = cuda_engine_tiny.propagate(strided)
    want = cuda_engine_tiny.propagate(_batch(tables, [0, 1, 2]))
    np.testing.assert_array_equal(got.offsets, want.offsets)
    np.testing.assert_array_equal(got.channel, want.channel)
    np.testing.assert_array_equal(got.table, want.table)


def _gathered(engine, tables):
    """A merged batch as the shared engine gives it to the CUDA engine: events 1-2 in a front end's
    shared-memory segment (mapped and registered here as the service does), 0 and 3 sent over the
    socket and copied into the merge buffer; returns (photons, cleanup)."""
    from charon.engine_service import MappedSegment, MergeBuffer, decode_batch_shm, encode_batch_shm
    from charon.handoff import Segment, SharedHostBuffer

    shared = SharedHostBuffer()
    whole = _batch(tables[1:3], [1, 2])
    n = whole.n_photons
    shared.reserve(n, n)
    rows = shared.rows(n)  # as the batcher lays a batch out: table rows, then the flags' bits
    rows[:N_ROWS] = whole.table
    rows[N_ROWS].view(np.uint32)[:] = whole.flags
    photons = PhotonBatch(rows[:N_ROWS], rows[N_ROWS].view(np.uint32), whole.slot, whole.offsets, whole.event_id,
                          whole.first_index, rows=rows)  # fmt: skip
    seg = Segment.attach(shared.segment.name)
    mapped = MappedSegment(b"", seg, engine.register_host(np.frombuffer(seg.mm, np.uint8)))
    frames = [bytes(memoryview(f)) for f in encode_batch_shm(1, photons, shared)[1:]]
    shm_sub = decode_batch_shm(frames, lambda name: mapped)[1]
    buf = MergeBuffer(sum(t.shape[1] for t in tables), gather=True)
    for sub in (_socket_sub(tables[0], 0), shm_sub, _socket_sub(tables[3], 3)):
        buf.append(sub)

    def cleanup():
        engine.unregister_host(mapped.token)
        shared.close()

    return buf.seal(contiguous=False).photons, cleanup


def _socket_sub(table, eid):
    from charon.engine_service import decode_batch, encode_batch

    frames = encode_batch(1, _batch([table], [eid]))
    return decode_batch([bytes(memoryview(f)) for f in frames[1:]])[1]


def _gathered_and_contiguous(engine, tables):
    """Hits of the four events propagated as gathered pieces, and as one contiguous batch."""
    gathered, cleanup = _gathered(engine, tables)
    try:
        first = [tables[0].shape[1], tables[0].shape[1] + tables[1].shape[1] + tables[2].shape[1]]
        assert [p.first for p in gathered.pieces] == [0, *first]
        got = engine.propagate(gathered)
    finally:
        cleanup()
    return got, engine.propagate(_batch(tables, [0, 1, 2, 3]))


def _assert_same_hits(got, want):
    np.testing.assert_array_equal(got.offsets, want.offsets)
    np.testing.assert_array_equal(got.channel, want.channel)
    np.testing.assert_array_equal(got.table, want.table)
    np.testing.assert_array_equal(got.flags, want.flags)


@pytest.mark.skipif(not shm_available(), reason="needs a writable /dev/shm (Linux)")
def test_gathered_pieces_from_shared_memory_equal_a_contiguous_batch(cuda_engine_tiny):
    rng = np.random.default_rng(8)
    tables = [random_event(n, rng, radius=200.0) for n in (9, 14, 5, 7)]
    got, want = _gathered_and_contiguous(cuda_engine_tiny, tables)
    assert want.n_hits > 0
    _assert_same_hits(got, want)


def test_device_view_abi_is_numbas_c_contiguous_array_layout():
    from charon.engines.cuda_launch import DeviceView

    v = DeviceView(ptr=0x7F0000001000, shape=(11, 5), itemsize=4, dtype=np.dtype(np.float32))
    # meminfo, parent, size, itemsize, data, shape..., strides in bytes (row-major)
    assert v.abi() == [0, 0, 55, 4, 0x7F0000001000, 11, 5, 20, 4]
    assert DeviceView(16, (7,), 8, np.dtype(np.int64)).abi() == [0, 0, 7, 8, 16, 7, 8]


def test_prebound_launch_rewrites_only_what_changed_and_equals_a_full_rebuild():
    """A launch rewrites only the parameters of arguments that are not the previous launch's
    objects; the block the driver gets must still equal one laid out from scratch every time."""
    pytest.importorskip("cuda.bindings")
    from types import SimpleNamespace

    from charon.engines.base import EngineError
    from charon.engines.cuda_launch import DeviceView, PreboundKernel

    class ArrayType:  # what PreboundKernel reads of a numba array type
        def __init__(self, ndim):
            self.ndim, self.layout = ndim, "C"

    overload = SimpleNamespace(argument_types=[ArrayType(2), "int64", ArrayType(1), "int32"],
                               _codelibrary=SimpleNamespace(get_cufunc=lambda: SimpleNamespace(handle=7)))  # fmt: skip
    pk = PreboundKernel(SimpleNamespace(overloads={0: overload}), (None,) * 4, SimpleNamespace(handle=0))
    sent = []

    def launch(func, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        sent.append(pk._slots.copy())  # what the driver would read at this launch
        return (pk._ok,)

    pk._launch = launch
    f32, i64 = np.dtype(np.float32), np.dtype(np.int64)
    buf = DeviceView(0x1000, (100,), 8, i64)  # a long-lived buffer: the same object at every launch
    calls = [
        (DeviceView(0x9000, (11, 50), 4, f32), 50, buf, -1),
        (DeviceView(0x9000, (11, 70), 4, f32), 70, buf, -1),  # new table view and size
        (DeviceView(0x9000, (11, 70), 4, f32), 70, DeviceView(0x2000, (3,), 8, i64), 5),
        (DeviceView(0xA000, (11, 20), 4, f32), 20, buf, -1),  # back to the first buffer
    ]
    for args in calls:
        pk(4, 128, *args)
        np.testing.assert_array_equal(sent[-1], np.array(pk.params(args), np.uint64))
    assert int(sent[0][5 + 2 * 2]) == 50 and int(sent[-1][-1]) == (1 << 64) - 1  # the size; -1 as two's complement
    with pytest.raises(EngineError, match="3 arguments"):
        pk(1, 1, *calls[0][:3])


@REAL_GPU
def test_direct_driver_events_time_a_batch_like_numbas():
    """The engine's timing events (cuda_driver.py) against numba's own, around the same work."""
    from numba import cuda

    from charon.engines.cuda_driver import TimingEvent
    from charon.engines.cuda_launch import stream_handle

    stream = cuda.stream()
    raw = stream_handle(stream)
    mine, theirs = [TimingEvent(), TimingEvent()], [cuda.event(timing=True), cuda.event(timing=True)]
    d = cuda.device_array(1 << 24, np.float32)
    mine[0].record(raw)
    theirs[0].record(stream)
    d.copy_to_host(stream=stream)  # ~64 MB: a millisecond or more
    mine[1].record(raw)
    theirs[1].record(stream)
    mine[1].synchronize()
    stream.synchronize()
    assert mine[1].query() and theirs[1].query()
    ms, ref = mine[0].elapsed_time(mine[1]), theirs[0].elapsed_time(theirs[1])
    assert ms > 0.1 and abs(ms - ref) < 0.1 * ref + 0.05


@pytest.mark.parametrize("counts", [[5], [0, 3, 0, 0, 4, 1, 0], [1] * 40, [0, 0, 700, 0, 300]])
def test_photon_slots_kernel_matches_numpy_reference(counts):
    """Each photon's slot from the offsets (binary search per photon), empty slots anywhere."""
    from numba import cuda

    from charon.engines.cuda import cuda_kernels
    from charon.kernels.reference import photon_slots_ref

    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n, E = int(offsets[-1]), len(counts)
    d_slot = cuda.to_device(np.full(n + 3, -7, np.int32))  # longer than n: nothing past n is written
    cuda_kernels().photon_slots[(n + 255) // 256, 256](cuda.to_device(offsets), d_slot, E, n)
    got = d_slot.copy_to_host()
    want = photon_slots_ref(offsets)
    np.testing.assert_array_equal(got[:n], want)
    np.testing.assert_array_equal(want, np.searchsorted(offsets, np.arange(n), "right") - 1)
    assert (got[n:] == -7).all()


def test_scan_launch_hook_issues_every_level_and_matches_numpy():
    """The engine's prebound launches enter the scan through ``launch``: every level must go through it."""
    from numba import cuda

    from charon.engines.cuda import cuda_kernels, simulator

    k = cuda_kernels()
    block = 8 if simulator() else 1024  # the scan's block size (make_scatter)
    n = 3 * block * block + 5  # three levels
    x = np.random.default_rng(4).integers(0, 2, n).astype(np.int32)
    d_x, d_out = cuda.to_device(x), cuda.device_array(n, np.int32)
    seen = []
    stream = cuda.stream()

    def launch(kernel, grid, blk, *args):
        seen.append(kernel)
        kernel[grid, blk, stream](*args)

    k.Scan(n)(d_x, d_out, n, stream, launch=launch)
    stream.synchronize()
    np.testing.assert_array_equal(d_out.copy_to_host(), np.concatenate([[0], np.cumsum(x)[:-1]]))
    block_scan, add_offsets = k.Scan.kernels
    assert seen.count(block_scan) == 3 and seen.count(add_offsets) == 2


@REAL_GPU
def test_prebound_launches_equal_numbas_dispatch(monkeypatch, gpu_pair):
    """Driver-level launches (cuda_launch.py) must give bit-identical hits to numba's dispatcher,
    also after the device buffers grow (the parameter blocks are rebuilt)."""
    from charon.engines.cuda import CUDAEngine

    det = gpu_pair[0]
    fast = CUDAEngine(det, EngineConfig(seed=3, max_batch_photons=4096))
    fast.warm_up()
    assert fast.lanes[0]._pre is not None, "prebound launches were not enabled on a real GPU"
    monkeypatch.setenv("CHARON_CUDA_DISPATCH", "numba")
    slow = CUDAEngine(det, EngineConfig(seed=3, max_batch_photons=4096))
    slow.warm_up()
    assert slow.lanes[0]._pre is None
    rng = np.random.default_rng(5)
    for sizes in ((1000, 0, 3000), (50_000, 20_000, 7)):  # the second grows the buffers past 65536
        tables = [random_event(n, rng) for n in sizes]
        a = fast.propagate(_batch(tables, [4, 5, 6]), keep_photons=False)
        b = slow.propagate(_batch(tables, [4, 5, 6]))
        assert a.n_hits > 0
        np.testing.assert_array_equal(a.offsets, b.offsets)
        np.testing.assert_array_equal(a.channel, b.channel)
        np.testing.assert_array_equal(a.table, b.table)
        np.testing.assert_array_equal(a.flags, b.flags)
    assert fast.lanes[0]._pre is not None and fast.lanes[0].capacity >= 70_007
    # The copies' cached device pointers are the grown buffers', not the freed ones'.
    lane = fast.lanes[0]
    current = {id(a) for a in vars(lane).values() if hasattr(a, "__cuda_array_interface__")}
    assert lane._h2d._ptrs and set(lane._h2d._ptrs) <= current


def test_two_lanes_run_two_batches_in_flight_with_the_same_hits(tiny_det, cuda_engine_tiny):
    """Two lanes: a second batch is launched before the first is finished; each gives the hits it
    gives alone, a third launch is refused until a lane is free, and lanes are reused."""
    from charon.engines.base import EngineError
    from charon.engines.cuda import CUDAEngine

    eng = CUDAEngine(tiny_det, EngineConfig(seed=5, max_batch_photons=4096, lanes=2))
    rng = np.random.default_rng(6)
    ta, tb = [random_event(n, rng, radius=200.0) for n in (15, 9)], [random_event(11, rng, radius=200.0)]
    ha = eng.launch(_batch(ta, [1, 2]))
    hb = eng.launch(_batch(tb, [3]))
    with pytest.raises(EngineError, match="lanes are busy"):
        eng.launch(_batch(tb, [3]))
    got_a, got_b = eng.finish(ha), eng.finish(hb)
    for got, tables, ids in ((got_a, ta, [1, 2]), (got_b, tb, [3])):
        want = cuda_engine_tiny.propagate(_batch(tables, ids))
        np.testing.assert_array_equal(got.offsets, want.offsets)
        np.testing.assert_array_equal(got.channel, want.channel)
        np.testing.assert_array_equal(got.table, want.table)
    again = eng.finish(eng.launch(_batch(tb, [3])))  # a lane is free again
    np.testing.assert_array_equal(again.channel, got_b.channel)


class _StampedEvent:
    """A stand-in timing event at a known device time (seconds)."""

    def __init__(self, t):
        self.t = t

    def elapsed_time(self, later):  # milliseconds, negative when ``later`` is earlier, like CUDA's
        return (later.t - self.t) * 1e3


@pytest.mark.parametrize("intervals, busy", [
    ([(0, 10), (20, 25)], [10, 5]),  # apart: each counts whole
    ([(0, 10), (5, 12), (11, 20)], [10, 2, 8]),  # chained overlaps: only what extends the union
    ([(0, 10), (2, 4), (3, 15)], [10, 0, 5]),  # nested in the first: nothing new; the next is measured from 10
    ([(0, 10), (10, 10)], [10, 0]),
])
def test_busy_time_is_the_union_of_device_intervals(intervals, busy):
    """CUDAEngine._account sweeps batches in collection order; their busy shares sum to the union."""
    from types import SimpleNamespace

    from charon.engines.base import StageTimes
    from charon.engines.cuda import CUDAEngine

    eng = SimpleNamespace(last_times=StageTimes(), _latest=[None, None], _event_sets=[],
                          _sweep=lambda *a: CUDAEngine._sweep(eng, *a))  # fmt: skip
    got = []
    for a, b in intervals:
        ev = [_StampedEvent(a)] + [_StampedEvent(b)] * 6
        eng.last_times = StageTimes(propagate=b - a)
        CUDAEngine._account(eng, SimpleNamespace(events=ev))
        got.append(eng.last_times.busy)
    np.testing.assert_allclose(got, busy, atol=1e-12)
    assert len(eng._event_sets) == len(intervals) - 1  # every event set but the latest end's is reused


def test_compute_time_is_the_union_of_kernel_intervals_swept_apart_from_busy_time():
    """Each batch: busy (events 0 to 4) and compute (1 to 3) intervals. The two unions are swept apart (the
    batch that ends last differs between them), and an event set is reused only once neither sweep needs it."""
    from types import SimpleNamespace

    from charon.engines.base import StageTimes
    from charon.engines.cuda import CUDAEngine

    # (busy start, compute start, compute end, busy end): busy union [0, 40], compute union [2, 8] + [9, 15] + [26, 39]
    batches = [(0, 2, 8, 10), (5, 9, 11, 30), (11, 10, 15, 20), (25, 26, 39, 40)]
    eng = SimpleNamespace(last_times=StageTimes(), _latest=[None, None], _event_sets=[],
                          _sweep=lambda *a: CUDAEngine._sweep(eng, *a))  # fmt: skip
    got, reused = [], []
    for k, (a, c, d, b) in enumerate(batches):
        ev = [_StampedEvent(t) for t in (a, c, (c + d) / 2, d, b, b, b)]
        eng.last_times = StageTimes(copy_in=c - a, propagate=(d - c) / 2, demux=(d - c) / 2, copy_out=b - d)
        CUDAEngine._account(eng, SimpleNamespace(events=ev, k=k))
        got.append((eng.last_times.busy, eng.last_times.compute_busy))
        reused.append(len(eng._event_sets))
    np.testing.assert_allclose(got, [(10, 6), (20, 2), (0, 4), (10, 13)], atol=1e-12)
    assert sum(b for b, _c in got) == 40 and sum(c for _b, c in got) == 6 + 6 + 13
    # After the third batch the second ends last by busy time, the third by compute time: both kept.
    assert reused == [0, 1, 1, 3]
    assert [x.k for x in eng._latest] == [3, 3]


@REAL_GPU
def test_two_lanes_on_a_real_gpu_equal_one_lane(gpu_pair):
    from charon.engines.cuda import CUDAEngine

    det = gpu_pair[0]
    one = CUDAEngine(det, EngineConfig(seed=8, max_batch_photons=1 << 17))
    two = CUDAEngine(det, EngineConfig(seed=8, max_batch_photons=1 << 17, lanes=2))
    one.warm_up()
    two.warm_up()
    rng = np.random.default_rng(9)
    batches = [[random_event(n, rng) for n in sizes] for sizes in ((30_000, 1000), (500,), (60_000, 7, 2000))]
    handles, results, times = [], [], []
    for i, tables in enumerate(batches):  # always two in flight: launch, then finish the older one
        handles.append(two.launch(_batch(tables, range(10 * i, 10 * i + len(tables)))))
        if len(handles) == 2:
            results.append(two.finish(handles.pop(0)))
            times.append((two.last_times.total, two.last_times.busy))
    results.append(two.finish(handles.pop(0)))
    times.append((two.last_times.total, two.last_times.busy))
    total, busy = np.array(times).T
    assert np.all(total > 0) and np.all(busy >= 0) and np.all(busy <= total)
    for i, (tables, got) in enumerate(zip(batches, results)):
        want = one.propagate(_batch(tables, range(10 * i, 10 * i + len(tables))))
        # One lane: each batch starts after the one before ended, so nothing is overlap
        # (CUDA's elapsed time between them is negative and must clamp to zero).
        assert one.last_times.overlap == 0.0 and one.last_times.busy == one.last_times.total
        assert want.n_hits > 0
        np.testing.assert_array_equal(got.offsets, want.offsets)
        np.testing.assert_array_equal(got.channel, want.channel)
        np.testing.assert_array_equal(got.table, want.table)
        np.testing.assert_array_equal(got.flags, want.flags)


@REAL_GPU
@pytest.mark.skipif(not shm_available(), reason="needs a writable /dev/shm (Linux)")
def test_gathered_pieces_on_a_real_gpu_use_one_2d_copy_each(gpu_pair):
    """On the GPU the pieces go by cuMemcpy2DAsync from registered (pinned) shared memory: the engine's
    self-check of that copy passed, and large pieces give the hits of the contiguous batch."""
    _, gpu, _ = gpu_pair
    assert all(lane._h2d.two_d for lane in gpu.lanes)
    rng = np.random.default_rng(9)
    tables = [random_event(n, rng) for n in (3000, 20_000, 700, 9000)]
    got, want = _gathered_and_contiguous(gpu, tables)
    assert want.n_hits > 100
    _assert_same_hits(got, want)


@REAL_GPU
def test_a_batch_laid_out_as_one_block_of_rows_goes_in_one_copy(gpu_pair, monkeypatch):
    """A batch assembled as the batcher does (table rows, then the flags' bits: PhotonBatch.rows) is copied
    to the device in one call, and gives the hits and histories of the same batch given as table and flags."""
    from charon.photons import CHERENKOV
    from charon.scheduler.batcher import HostBuffer

    _, gpu, _ = gpu_pair
    rng = np.random.default_rng(10)
    tables = [random_event(n, rng) for n in (3000, 5000, 800)]
    flags = [np.where(rng.random(t.shape[1]) < 0.5, CHERENKOV, 0).astype(np.uint32) for t in tables]
    plain = PhotonBatch.from_events([t.copy() for t in tables], [4, 5, 6], flags=flags)
    n = plain.n_photons
    buf = HostBuffer()
    buf.reserve(n, n)
    rows = buf.rows(n)
    rows[:N_ROWS] = plain.table
    rows[N_ROWS].view(np.uint32)[:] = plain.flags
    blocked = PhotonBatch(rows[:N_ROWS], rows[N_ROWS].view(np.uint32), plain.slot, plain.offsets, plain.event_id,
                          plain.first_index, rows=rows)  # fmt: skip
    calls = []
    for lane in gpu.lanes:
        real = lane._h2d.rows
        monkeypatch.setattr(lane._h2d, "rows", lambda *a, _real=real: calls.append(a[3].shape) or _real(*a))
    got = gpu.propagate(blocked, keep_photons=True)
    assert calls == [(N_ROWS + 1, n)]
    want = gpu.propagate(plain, keep_photons=True)
    assert len(calls) == 1  # the plain batch went row by row, not through rows()
    assert want.n_hits > 50  # 95 on the H100 (seed 10)
    _assert_same_hits(got, want)
    np.testing.assert_array_equal(blocked.flags, plain.flags)  # every photon's history, copied back in place
    assert np.any(got.flags & CHERENKOV)  # the client's bits reached the device with the rows


@REAL_GPU
def test_borrowed_hits_are_the_owned_hits_in_the_lanes_pinned_buffers(gpu_pair):
    """finish(borrow=True), as the shared engine collects: the same hits, copied into the lane's pinned
    buffers (DMA, no driver staging) instead of fresh arrays."""
    _, gpu, _ = gpu_pair
    assert gpu.lends_hits
    rng = np.random.default_rng(12)
    tables = [random_event(n, rng) for n in (4000, 6000)]
    want = gpu.propagate(_batch(tables, [1, 2]))
    launch = gpu.launch(_batch(tables, [1, 2]))
    lane = launch.lane
    got = gpu.finish(launch, borrow=True)
    assert want.n_hits > 100
    _assert_same_hits(got, want)
    assert np.shares_memory(got.table, lane.h_out_f) and np.shares_memory(got.channel, lane.h_out_u)
    assert not np.shares_memory(want.table, lane.h_out_f)


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["thread", "loop", "auto"])
def test_one_process_server_with_two_lanes_answers_each_event_as_alone(tiny_det, cuda_engine_tiny, driver):
    """charon-batch --engine cuda --engine-lanes 2 without --procs: the engine thread, or the socket loop
    itself (--engine-driver loop), uses both lanes, and each event's hits are those of the event propagated
    alone (simulator here, the GPU on the device)."""
    from charon.client import DealerClient
    from charon.engines.cuda import CUDAEngine, simulator
    from charon.server import ServerConfig, run_in_thread

    def factory():
        eng = CUDAEngine(tiny_det, EngineConfig(seed=5, max_batch_photons=4096, lanes=2))
        if simulator():  # nothing to compile there, and its warm-up batch takes minutes on a loaded 2-core machine
            eng.warm_up = lambda: None
        return eng

    srv, th = run_in_thread(ServerConfig(bind="tcp://127.0.0.1:0", engine="cuda", seed=5, engine_lanes=2,
                                         max_batch_photons=4096, max_wait_ms=0.0, engine_driver=driver),
                            detector=tiny_det, engine_factory=factory)  # fmt: skip
    d = None
    try:
        assert srv.address, "the server did not start"
        d = DealerClient(srv.address)
        assert srv.engine_thread.lanes == 2
        from charon.engine_loop import LoopEngine

        assert isinstance(srv.engine_thread, LoopEngine) == (driver != "thread")  # auto: the loop, for one process
        rng = np.random.default_rng(17)
        tables = {i: random_event(int(rng.integers(5, 40)), rng, radius=200.0) for i in range(6)}
        for i, t in tables.items():
            d.submit(i, t)
        replies = {r.event_id: r for r in (d.recv(120_000) for _ in tables)}
        for i, t in tables.items():
            want = cuda_engine_tiny.propagate(_batch([t], [i])).event(0)
            np.testing.assert_array_equal(replies[i].hits["channel"], want.channel)
            np.testing.assert_array_equal(replies[i].hits["time"], want.table[7])
    finally:
        if d is not None:
            d.close()
        srv.stop()
        th.join(30)


def test_stage_times_snapshot_is_not_overwritten_by_the_next_batch():
    """The engine thread hands each batch's times to the socket loop, which reads them later: by then the
    engine has reused its own StageTimes for the next batch (with lanes, often)."""
    from charon.engines.base import StageTimes

    live = StageTimes(copy_in=1.0, propagate=2.0, overlap=0.5, compute_overlap=0.25, extra={"concurrent_copy_out": 3.0})
    kept = live.snapshot()
    live.propagate, live.overlap, live.extra["concurrent_copy_out"] = 9.0, 0.0, 0.0
    assert (kept.total, kept.busy, kept.compute_busy) == (3.0, 2.5, 1.75)
    assert kept.extra == {"concurrent_copy_out": 3.0}
