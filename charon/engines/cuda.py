"""CUDA engine: the shared device functions compiled with numba-cuda.

Per batch, on its lane's stream: photons copied in once from pinned host memory
into preallocated device buffers; one propagation launch runs every photon to
the end (hit selection fused in); an exclusive scan plus a scatter put the hits
in event order; only the hits and the per-event hit offsets come back. All of it
is queued at once (:meth:`CUDAEngine.launch`); the one host synchronisation
per batch (:meth:`CUDAEngine.finish`) reads the total hit count, which sizes
the copy-out. Stages are timed with CUDA events.

With ``lanes > 1`` each lane has its own buffers and its own stream, so a batch
launched while another runs starts at once: a small batch's device time is
dominated by its slowest photons (about 0.6 ms on the H200 for the last few
bounces, whatever the batch size), and the next batch fills the SMs that tail
leaves idle. Busy time is then the union of the batches' device intervals
(:meth:`CUDAEngine._account`), not their sum; compute time the union of their
kernels' intervals alone.
"""

from __future__ import annotations

import functools
import logging
import os

import numpy as np

from .cuda_compat import ensure_numpy_compat

ensure_numpy_compat()

from numba import cuda, float32, int32, uint32  # noqa: E402

try:  # a server launches small grids whenever load is light: by design, not a beginner's mistake
    from numba.cuda.core import config as _cuda_config

    _cuda_config.CUDA_LOW_OCCUPANCY_WARNINGS = 0
except ImportError:  # older numba-cuda layouts
    pass

from ..kernels import build  # noqa: E402
from ..kernels.bvh import STACK_SIZE  # noqa: E402
from ..kernels.rng import RNG_STATE_SIZE  # noqa: E402
from ..kernels.scatter import make_scatter  # noqa: E402
from ..kernels.slots import photon_slots  # noqa: E402
from ..photons import N_ROWS, HitBatch, PhotonBatch  # noqa: E402
from .base import Engine, EngineConfig, EngineError  # noqa: E402
from .cuda_driver import DirectCopy, TimingEvent  # noqa: E402
from .cuda_launch import DeviceView, PreboundKernel, stream_handle, view  # noqa: E402
from .tables import kernel_tables  # noqa: E402

THREADS_PER_BLOCK = 128
_U32 = np.dtype(np.uint32)


def simulator() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def gpu_available() -> bool:
    if simulator():
        return False
    try:
        return bool(cuda.is_available()) and len(cuda.gpus) > 0
    except Exception:
        return False


def _event():
    """A timing CUDA event: a direct driver event on a GPU (cuda_driver.py), numba's in the simulator."""
    return cuda.event() if simulator() else TimingEvent()


def _elapsed(a, b) -> float:
    """Seconds between two recorded events."""
    return a.elapsed_time(b) / 1e3


@functools.lru_cache(maxsize=4)
def cuda_kernels(min_blocks_per_sm: int = 0):
    """The kernels; ``min_blocks_per_sm`` > 0 compiles the propagation kernel with that launch bound."""
    k = build(cuda.jit(device=True))
    propagate_photon = k.propagate_photon
    hit_channel = k.hit_channel

    bound = {} if simulator() or min_blocks_per_sm <= 0 else {"launch_bounds": (THREADS_PER_BLOCK, min_blocks_per_sm)}

    @cuda.jit(**bound)  # the simulator's jit takes no launch bound (nor needs one)
    def propagate_kernel(table, flags, last_hit, channel, is_hit, slot, event_id, first_index, offsets, seed,
                         max_steps, tri_channel, node_lo, node_hi, node_first, node_count, v0, e1, e2,
                         tri_inner, tri_outer, tri_surface, mat_n, mat_abs, mat_sca,
                         reem_prob, reem_wl_cdf, grid_wl, reem_t, reem_t_cdf,
                         surf_detect, surf_absorb, surf_rdiff, surf_rspec):  # fmt: skip
        i = cuda.grid(1)
        n = table.shape[1]
        if i == 0:
            is_hit[n] = 0  # the scan's extra element: pos[n] becomes the hit total
        if i >= n:
            return
        stack = cuda.local.array(STACK_SIZE, int32)
        stack_t = cuda.local.array(STACK_SIZE, float32)
        rng = cuda.local.array(RNG_STATE_SIZE, uint32)
        propagate_photon(i, table, flags, last_hit, slot, event_id, first_index, offsets, seed, max_steps,
                         node_lo, node_hi, node_first, node_count, v0, e1, e2,
                         tri_inner, tri_outer, tri_surface, mat_n, mat_abs, mat_sca,
                         reem_prob, reem_wl_cdf, grid_wl, reem_t, reem_t_cdf,
                         surf_detect, surf_absorb, surf_rdiff, surf_rspec, stack, stack_t, rng)  # fmt: skip
        c = hit_channel(flags, last_hit, tri_channel, i)
        channel[i] = c
        is_hit[i] = 1 if c >= 0 else 0

    k.propagate_kernel = propagate_kernel
    block = 8 if simulator() else 1024  # small in the simulator: multi-level scans on tiny inputs
    k.Scan, k.event_offsets, k.scatter_hits = make_scatter(block)
    k.photon_slots = photon_slots
    return k


log = logging.getLogger("charon.engines.cuda")


class _Launch:
    """A batch queued on the stream: its lane, sizes and timing events (0: start, 1: copied in,
    2: propagated, 3: demultiplexed, 4: queued work done, 5-6: around the hits' copy-out)."""

    __slots__ = ("lane", "n", "E", "events")

    def __init__(self, lane, n, E, events):
        self.lane, self.n, self.E, self.events = lane, n, E, events


class _Lane:
    """One batch's device buffers, scan scratch, prebound launches and stream.

    Each lane has its own stream: a batch launched on one lane runs concurrently with
    the batch still finishing on another (copies on the copy engines, kernels on the SMs
    the other leaves free), and its hits are copied out on the same stream."""

    def __init__(self, engine: "CUDAEngine"):
        self.engine = engine
        self.k, self.config = engine.k, engine.config
        self.d_geometry, self.d_tri_channel = engine.d_geometry, engine.d_tri_channel
        self.stream = cuda.stream()  # copy-in, kernels and copy-out of this lane's batches
        self._h2d = None if simulator() else DirectCopy(self.stream)
        # What the timing events are recorded on: the raw handle for direct driver events.
        self._rec = self.stream if simulator() else stream_handle(self.stream)
        self._pre: dict | None = None
        self.capacity = 0
        self._reserve(min(int(self.config.max_batch_photons), 1 << 16))

    # ------------------------------------------------------------- buffers
    def _reserve(self, n: int):
        """Device buffers for ``n`` photons; grown only when a batch is larger than any before."""
        if n <= self.capacity:
            return
        cap = max(n, self.capacity * 2) if self.capacity else n
        cap = max(cap, 1)
        # [(N_ROWS + 1) * cap] float32: a batch of n is [N_ROWS + 1, n] rows, the table's and then its
        # flags' bits (uint32 views, _flags), as host buffers lay it out: one copy per block (PhotonBatch.rows)
        self.d_table = cuda.device_array((N_ROWS + 1) * cap, np.float32)
        self.d_slot = cuda.device_array(cap, np.int32)
        self.d_last = cuda.device_array(cap, np.int32)
        self.d_channel = cuda.device_array(cap, np.int32)
        self.d_is_hit = cuda.device_array(cap + 1, np.int32)
        self.d_pos = cuda.device_array(cap + 1, np.int32)
        self.d_event_id = cuda.device_array(cap, np.uint32)
        self.d_first_index = cuda.device_array(cap, np.uint32)
        self.d_offsets = cuda.device_array(cap + 1, np.int64)
        self.d_hit_offsets = cuda.device_array(cap + 1, np.int32)
        self.d_out_f = cuda.device_array(8 * cap, np.float32)
        self.d_out_u = cuda.device_array(2 * cap, np.uint32)
        self.h_total = cuda.pinned_array(1, np.int32)
        if not simulator():  # hits lent by finish(borrow=True): copied out by DMA, no driver staging
            self.h_out_f = cuda.pinned_array(8 * cap, np.float32)  # [8 * cap] float32
            self.h_out_u = cuda.pinned_array(2 * cap, np.uint32)  # [2 * cap] uint32: channel, then flags
            self.h_hit_offsets = cuda.pinned_array(cap + 1, np.int32)  # [cap + 1] int32
        self.scan = self.k.Scan(cap + 1)
        self.capacity = cap
        if self._h2d is not None:  # its cached pointers are the old buffers'
            self._h2d.forget()
        if self._pre is not None:  # the parameter blocks point at the old buffers
            self._pre = None
            self._bind()

    def _bind(self) -> None:
        """Prebound launches of every kernel, each checked against numba's marshalling of the same call."""
        n, E = min(self.capacity, 4096), 2
        try:
            pre = {}
            mine, numba_args = self._kernel_args(n, E, views=True), self._kernel_args(n, E, views=False)
            for name, args in mine.items():
                kernel = getattr(self.k, name)
                pre[kernel] = PreboundKernel(kernel, args, self.stream)
                pre[kernel].check(args, numba_args[name])
            sc = self.scan
            block_args = (self.d_is_hit, self.d_pos, sc.levels[0], n + 1)
            add_args = (self.d_pos, sc.tmp[0], n + 1)
            for kernel, args in zip(self.k.Scan.kernels, (block_args, add_args)):
                pre[kernel] = PreboundKernel(kernel, args, self.stream)
                pre[kernel].check(args)
        except Exception as exc:  # numba-cuda internals differ from what cuda_launch.py expects
            log.warning("CUDA engine: prebound kernel launches unavailable (%s); using numba's dispatcher", exc)
            self.engine._use_prebound = False
            return
        self._pre = pre

    def _kernel_args(self, n: int, E: int, views: bool) -> dict:
        """Arguments of the propagation and scatter kernels for a batch of n photons and E events;
        with ``views`` the batch-sized table is a DeviceView (prebound), else a numba slice."""
        if views:
            table = view(self.d_table, (N_ROWS, n))
            flags = DeviceView(table.ptr + 4 * N_ROWS * n, (n,), 4, _U32)
        else:
            table = self.d_table[: N_ROWS * n].reshape(N_ROWS, n)
            flags = self._flags(n)
        seed = np.uint32(self.config.seed & 0xFFFFFFFF)
        return {
            "propagate_kernel": (table, flags, self.d_last, self.d_channel, self.d_is_hit, self.d_slot,
                                 self.d_event_id, self.d_first_index, self.d_offsets, seed, self.config.max_steps,
                                 self.d_tri_channel, *self.d_geometry),
            "photon_slots": (self.d_offsets, self.d_slot, E, n),
            "event_offsets": (self.d_pos, self.d_offsets, self.d_hit_offsets, E),
            "scatter_hits": (table, flags, self.d_channel, self.d_pos, self.d_out_f, self.d_out_u, n),
        }  # fmt: skip

    def _flags(self, n: int):
        """[n] uint32 device view: the flags' row of a batch of n photons, right after its table."""
        return self.d_table[N_ROWS * n : (N_ROWS + 1) * n].view(np.uint32)

    def _run(self, kernel, grid: int, block: int, *args) -> None:
        pre = self._pre.get(kernel) if self._pre is not None else None
        if pre is not None:
            pre(grid, block, *args)
        else:
            kernel[grid, block, self.stream](*args)

    # ------------------------------------------------------------- batches
    def launch(self, batch: PhotonBatch, keep_photons: bool = False) -> "_Launch":
        """Queue the whole batch on the stream and return at once (asynchronous engine interface).

        ``batch``'s host memory must stay untouched until :meth:`finish`: the copy-in
        reads it asynchronously."""
        n, E = batch.n_photons, batch.n_events
        self._reserve(max(n, E))
        s = self.stream
        ev = self.engine._take_events()
        ev[0].record(self._rec)
        args = self._kernel_args(n, E, views=self._pre is not None)
        h2d = self._h2d
        pieces = batch.pieces
        if pieces is not None and keep_photons:
            raise EngineError("internal: keep_photons needs the photons in one table, not gathered pieces")
        if pieces is not None:  # the shared engine's merge: pieces in front ends' shared memory or its buffer
            if n:
                self._gather(pieces, n)
            if h2d is not None:
                h2d(self.d_event_id, np.ascontiguousarray(batch.event_id, np.uint32))
                h2d(self.d_first_index, np.ascontiguousarray(batch.first_index, np.uint32))
                h2d(self.d_offsets, np.ascontiguousarray(batch.offsets, np.int64))
            else:
                self.d_event_id[:E].copy_to_device(batch.event_id, stream=s)
                self.d_first_index[:E].copy_to_device(batch.first_index, stream=s)
                self.d_offsets[: E + 1].copy_to_device(batch.offsets, stream=s)
        elif h2d is not None:  # direct driver calls: the fixed cost per batch is mostly these copies' overhead
            if n and batch.rows is not None:  # table and flags in one block of rows: one copy
                h2d.rows(self.d_table, n, 0, batch.rows)
            elif n:
                for r in range(N_ROWS):  # device rows have stride n; host rows may be strided (merge buffer)
                    h2d(self.d_table, batch.table[r], r * n)
                h2d(self.d_table, batch.flags[:n], N_ROWS * n)
            h2d(self.d_event_id, np.ascontiguousarray(batch.event_id, np.uint32))
            h2d(self.d_first_index, np.ascontiguousarray(batch.first_index, np.uint32))
            h2d(self.d_offsets, np.ascontiguousarray(batch.offsets, np.int64))
        else:  # the simulator (CI)
            if n:
                d_table = args["propagate_kernel"][0]
                if batch.table.flags.c_contiguous:
                    d_table.copy_to_device(batch.table, stream=s)
                else:  # rows of a preallocated [11, capacity] buffer (the shared engine's merge)
                    for r in range(N_ROWS):
                        d_table[r].copy_to_device(batch.table[r], stream=s)
                self._flags(n).copy_to_device(np.ascontiguousarray(batch.flags), stream=s)
            self.d_event_id[:E].copy_to_device(batch.event_id, stream=s)
            self.d_first_index[:E].copy_to_device(batch.first_index, stream=s)
            self.d_offsets[: E + 1].copy_to_device(batch.offsets, stream=s)
        if n:  # slots from the offsets on the device: batch.slot is not read (a gathered batch has none)
            self._run(self.k.photon_slots, (n + 255) // 256, 256, *args["photon_slots"])
        ev[1].record(self._rec)
        blocks = max(1, (n + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK)
        self._run(self.k.propagate_kernel, blocks, THREADS_PER_BLOCK, *args["propagate_kernel"])
        ev[2].record(self._rec)
        self._scan_scatter(args, n, E)
        ev[3].record(self._rec)
        if keep_photons and n:
            if h2d is not None:
                for r in range(N_ROWS):
                    h2d.to_host(batch.table[r], self.d_table, r * n)
                h2d.to_host(batch.flags[:n], self.d_table, N_ROWS * n)
            else:
                args["propagate_kernel"][0].copy_to_host(batch.table, stream=s)
                self._flags(n).copy_to_host(batch.flags, stream=s)
        ev[4].record(self._rec)
        return _Launch(self, n, E, ev)

    def _gather(self, pieces: list, n: int) -> None:
        """Copy each piece (photons.Piece: table rows and flags' bits as one block of N_ROWS + 1 rows)
        to its columns of the device batch, laid out the same way: one 2D copy per piece."""
        h2d, s = self._h2d, self.stream
        if h2d is not None:
            for p in pieces:
                h2d.rows(self.d_table, n, p.first, p.rows)
            return
        d_rows = self.d_table[: (N_ROWS + 1) * n].reshape(N_ROWS + 1, n)  # the simulator (CI): row by row
        for p in pieces:
            k = p.rows.shape[1]
            for r in range(N_ROWS + 1):
                d_rows[r, p.first : p.first + k].copy_to_device(np.ascontiguousarray(p.rows[r]), stream=s)

    def ready(self, launch: "_Launch") -> bool:
        """True once the batch's GPU work is done (never blocks)."""
        query = getattr(launch.events[4], "query", None)  # the simulator runs synchronously
        return True if query is None else bool(query())

    def finish(self, launch: "_Launch", borrow: bool = False) -> HitBatch:
        """Wait for the batch, copy its hits out (sized by the hit total) and return them
        (``borrow``: in this lane's pinned buffers, valid until its next finish)."""
        ev = launch.events
        ev[4].synchronize()
        ev[5].record(self._rec)
        hits = self._copy_out(launch.n, launch.E, borrow)
        ev[6].record(self._rec)
        ev[6].synchronize()
        t = self.engine.last_times
        t.copy_in = _elapsed(ev[0], ev[1])
        t.propagate = _elapsed(ev[1], ev[2])
        t.demux = _elapsed(ev[2], ev[3])
        # Device time only: the gap between launch and finish (4 -> 5) is not engine work.
        # With several lanes the hits' copy-out (5 -> 6) runs on a copy engine while other
        # batches compute: it is reported apart, so that busy time stays the union of the
        # batches' compute intervals (0 -> 4) instead of counting that overlap twice.
        hits_out = _elapsed(ev[5], ev[6])
        serial = len(self.engine.lanes) == 1
        t.copy_out = _elapsed(ev[3], ev[4]) + (hits_out if serial else 0.0)
        t.extra["concurrent_copy_out"] = 0.0 if serial else hits_out
        return hits

    def _scan_scatter(self, args: dict, n: int, E: int) -> None:
        """Scan ``d_is_hit``, per-event hit offsets, scatter hits into event order; queue the total's read-back."""
        k, s = self.k, self.stream
        blocks = max(1, (n + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK)
        self.scan(self.d_is_hit, self.d_pos, n + 1, s, launch=self._run if self._pre is not None else None)
        self._run(k.event_offsets, max(1, (E + 256) // 256), 256, *args["event_offsets"])
        if n:
            self._run(k.scatter_hits, blocks, THREADS_PER_BLOCK, *args["scatter_hits"])
        if self._h2d is not None:
            self._h2d.to_host(self.h_total, self.d_pos, n)
        else:
            self.d_pos[n : n + 1].copy_to_host(self.h_total, stream=s)

    def _copy_out(self, n: int, E: int, borrow: bool = False) -> HitBatch:
        """The hits of a batch whose compute is done, on this lane's stream; with ``borrow`` (not in the
        simulator) into this lane's pinned buffers, which the next finish overwrites."""
        s = self.stream
        H = int(self.h_total[0])
        if borrow and self._h2d is not None:
            out_f, out_u, offsets = self.h_out_f[: 8 * H], self.h_out_u[: 2 * H], self.h_hit_offsets[: E + 1]
        else:  # owned by the caller; pageable, so the driver stages the copy through its own pinned memory
            out_f = np.empty(8 * H, np.float32)
            out_u = np.empty(2 * H, np.uint32)
            offsets = np.empty(E + 1, np.int32)
        d2h = self._h2d.to_host if self._h2d is not None else None
        if d2h is not None:
            d2h(out_f, self.d_out_f)
            d2h(out_u, self.d_out_u)
            d2h(offsets, self.d_hit_offsets)
        else:
            if H:
                self.d_out_f[: 8 * H].copy_to_host(out_f, stream=s)
                self.d_out_u[: 2 * H].copy_to_host(out_u, stream=s)
            self.d_hit_offsets[: E + 1].copy_to_host(offsets, stream=s)
        if self._h2d is not None:
            self._h2d.synchronize()
        else:
            s.synchronize()
        return HitBatch(channel=out_u[:H], table=out_f.reshape(8, H), flags=out_u[H:], offsets=offsets.astype(np.int64))

    def demux_arrays(self, table, flags, channel, photon_offsets) -> HitBatch:
        """Run only the GPU demultiplexer on host arrays (for testing it against the numpy reference)."""
        n, E = table.shape[1], len(photon_offsets) - 1
        self._reserve(max(n, E))
        s = self.stream
        d_table = self.d_table[: N_ROWS * n].reshape(N_ROWS, n)
        if n:
            d_table.copy_to_device(np.ascontiguousarray(table, np.float32), stream=s)
            self._flags(n).copy_to_device(np.ascontiguousarray(flags, np.uint32), stream=s)
            self.d_channel[:n].copy_to_device(np.asarray(channel, np.int32), stream=s)
        is_hit = np.zeros(n + 1, np.int32)
        is_hit[:n] = np.asarray(channel) >= 0
        self.d_is_hit[: n + 1].copy_to_device(is_hit, stream=s)
        self.d_offsets[: E + 1].copy_to_device(np.asarray(photon_offsets, np.int64), stream=s)
        self._scan_scatter(self._kernel_args(n, E, views=self._pre is not None), n, E)
        s.synchronize()
        return self._copy_out(n, E)



class CUDAEngine(Engine):
    name = "cuda"
    strided_rows = True
    # launch() copies a merged batch's pieces from where they are (PhotonBatch.pieces) and numbers the
    # slots from the offsets on the device (kernels/slots.py): it reads no batch.slot
    gathers_pieces = True
    # finish(launch, borrow=True) lends the hits in pinned buffers (see finish)
    lends_hits = True

    def __init__(self, detector, config: EngineConfig | None = None):
        super().__init__(detector, config or EngineConfig())
        if not (gpu_available() or simulator()):
            raise EngineError("--engine cuda needs numba-cuda and a usable CUDA GPU; use --engine cpu otherwise")
        if self.config.lanes < 1:
            raise EngineError("--engine-lanes must be >= 1")
        cuda.select_device(self.config.device)
        self.k = cuda_kernels(self.config.min_blocks_per_sm)
        self.stream = cuda.stream()  # geometry upload; each lane has its own stream for batches
        t = kernel_tables(detector)
        self.tables = t
        self.d_geometry = tuple(cuda.to_device(np.ascontiguousarray(a), stream=self.stream) for a in t.geometry_args())
        self.d_tri_channel = cuda.to_device(t.tri_channel, stream=self.stream)
        # Kernels launched through the driver once warm_up() has compiled and checked them
        # (cuda_launch.py); numba's dispatcher before that, in the simulator, or when
        # CHARON_CUDA_DISPATCH=numba asks for it.
        self._use_prebound = not simulator() and os.environ.get("CHARON_CUDA_DISPATCH", "prebound") != "numba"
        self._event_sets: list[list] = []  # timing-event sets of accounted batches, reused
        # The collected batches whose busy and compute intervals ended last (the two unions, _account).
        self._latest: list = [None, None]
        self.lanes = [_Lane(self) for _ in range(self.config.lanes)]
        self._free_lanes = list(reversed(self.lanes))
        self.stream.synchronize()
        if not simulator() and not self._check_2d_copy():
            log.warning("CUDA engine: cuMemcpy2DAsync did not copy as expected; gathered pieces go row by row")
            for lane in self.lanes:
                lane._h2d.two_d = False

    def _check_2d_copy(self) -> bool:
        """Copy a strided [3, 5] block into columns 2..7 of a [3, 9] device array and read it back."""
        lane = self.lanes[0]
        host = cuda.pinned_array((3, 8), np.float32)
        host[:] = np.arange(24, dtype=np.float32).reshape(3, 8)
        d = cuda.to_device(np.full(27, -1, np.float32))
        try:
            lane._h2d.rows(d, 9, 2, host[:, 1:6])
            lane.stream.synchronize()
        except Exception as exc:
            log.info("cuMemcpy2DAsync unavailable: %r", exc)
            return False
        finally:
            lane._h2d.forget()  # the cached pointer would keep this scratch array alive
        want = np.full((3, 9), -1, np.float32)
        want[:, 2:7] = host[:, 1:6]
        return bool(np.array_equal(d.copy_to_host().reshape(3, 9), want))

    def register_host(self, array: np.ndarray):
        """Pin host memory that batches will be copied from (a front end's shared-memory segment), so the
        copies run asynchronously. Returns the token for :meth:`unregister_host` (None: nothing to undo)."""
        if simulator():
            return None
        from cuda.bindings import driver

        ptr = array.ctypes.data
        (err,) = driver.cuMemHostRegister(ptr, array.nbytes, 0)
        if err != driver.CUresult.CUDA_SUCCESS:
            raise EngineError(f"cuMemHostRegister failed: {err}")
        return ptr

    def unregister_host(self, token) -> None:
        if token is None:
            return
        from cuda.bindings import driver

        (err,) = driver.cuMemHostUnregister(token)
        if err != driver.CUresult.CUDA_SUCCESS:
            raise EngineError(f"cuMemHostUnregister failed: {err}")

    def _take_events(self) -> list:
        return self._event_sets.pop() if self._event_sets else [_event() for _ in range(7)]

    def _account(self, launch: _Launch) -> None:
        """Busy time as the union of device intervals, swept in collection (= launch) order, twice.

        A batch's busy interval runs from its start event (0) to its done event (4); its compute
        interval from the end of its copy-in (1) to the end of its hit scatter (3). The start event
        is recorded when the host begins to queue the batch, so on an idle stream the busy interval
        also holds the host's time to queue the copies and launches: busy near 1 says a batch was
        always in flight. The compute intervals hold the kernels alone (and a kernel's wait for SMs
        another lane holds, which the union absorbs): their union is how long the SMs had work.

        Only the part after the latest end among batches collected before it is new
        time: ``overlap`` (``compute_overlap``) is the rest. Collection follows launch order, so the
        batches before it cover [their first start, latest end] without a gap that this
        one could straddle unless it started after that end (then overlap is 0)."""
        t = self.last_times
        t.overlap, first = self._sweep(0, launch, 0, 4)
        t.compute_overlap, second = self._sweep(1, launch, 1, 3)
        for done in {id(d): d for d in (first, second) if d is not None}.values():
            if all(done is not latest for latest in self._latest):  # no sweep measures from it any more
                self._event_sets.append(done.events)

    def _sweep(self, k: int, launch: _Launch, a: int, b: int) -> tuple:
        """Sweep ``k`` over intervals (events ``a`` to ``b``): (this batch's overlap with those before it,
        the batch this sweep no longer needs, or None)."""
        ev = launch.events
        latest = self._latest[k]
        if latest is None:
            self._latest[k] = launch
            return 0.0, None
        span = _elapsed(ev[a], ev[b])
        # Negative when this batch started after the latest one had ended: no overlap.
        overlap = min(max(_elapsed(ev[a], latest.events[b]), 0.0), max(span, 0.0))
        if _elapsed(latest.events[b], ev[b]) >= 0:  # this one ends last: it bounds the next overlap
            self._latest[k] = launch
            return overlap, latest
        return overlap, launch

    def host_alloc(self, n, dtype):
        """Pinned host memory: the batcher assembles batches straight into it."""
        return cuda.pinned_array(n, dtype=dtype)

    def warm_up(self) -> None:
        """Compile every kernel (2048 photons: the scan's second level too), then prebind them in every lane."""
        from ..sources import point_source

        b = PhotonBatch.from_events([point_source(2048, np.random.default_rng(0))], [0])
        self.propagate(b)
        for lane in self.lanes:
            if self._use_prebound and lane._pre is None:
                lane._bind()

    # ------------------------------------------------------------- batches
    def propagate(self, batch: PhotonBatch, keep_photons: bool = False) -> HitBatch:
        return self.finish(self.launch(batch, keep_photons))

    def launch(self, batch: PhotonBatch, keep_photons: bool = False) -> _Launch:
        """Queue the whole batch on a free lane and return at once (asynchronous engine interface).

        ``batch``'s host memory must stay untouched until :meth:`finish`: the copy-in
        reads it asynchronously. At most ``len(self.lanes)`` batches may be launched
        and not yet finished."""
        if not self._free_lanes:
            raise EngineError(f"internal: all {len(self.lanes)} CUDA lanes are busy; finish a batch first")
        lane = self._free_lanes.pop()
        try:
            return lane.launch(batch, keep_photons)
        except BaseException:
            self._free_lanes.append(lane)
            raise

    def ready(self, launch: _Launch) -> bool:
        """True once the batch's GPU work is done (never blocks)."""
        return launch.lane.ready(launch)

    def finish(self, launch: _Launch, borrow: bool = False) -> HitBatch:
        """Wait for the batch, copy its hits out (sized by the hit total) and return them.

        ``borrow=True`` (``lends_hits``): the hits view the lane's pinned buffers, copied
        by DMA instead of staged through the driver, and stay valid only until the next
        finish of any batch (lanes are reused in any order). The shared engine takes them so: it
        encodes every front end's share before it collects another batch."""
        try:
            hits = launch.lane.finish(launch, borrow)
            self._account(launch)
            return hits
        finally:
            self._free_lanes.append(launch.lane)

    def demux_arrays(self, table, flags, channel, photon_offsets) -> HitBatch:
        """Run only the GPU demultiplexer on host arrays (for testing it against the numpy reference)."""
        return self.lanes[0].demux_arrays(table, flags, channel, photon_offsets)

    def close(self) -> None:
        for lane in self.lanes:
            lane.stream.synchronize()
        self.stream.synchronize()
