"""CPU engine: the shared device functions compiled with numba, parallel over photons."""

from __future__ import annotations

import functools
import time

import numba
import numpy as np

from ..kernels import build
from ..kernels.bvh import STACK_SIZE
from ..kernels.rng import RNG_STATE_SIZE
from ..photons import N_ROWS, HitBatch, PhotonBatch
from ..scheduler.demux import gather_hits
from .base import Engine, EngineConfig
from .tables import kernel_tables

# error_model="numpy": 0/0 gives NaN as on the GPU (Chroma's normal-incidence quirk relies on it).
cpu_jit = numba.njit(error_model="numpy", nogil=True)


@functools.lru_cache(maxsize=1)
def cpu_kernels():
    """Device functions for the CPU, plus the batch driver. Compiled on first call."""
    k = build(cpu_jit)
    propagate_photon = k.propagate_photon
    hit_channel = k.hit_channel

    @numba.njit(parallel=True, nogil=True, error_model="numpy")
    def propagate_batch(table, flags, last_hit, channel, slot, event_id, first_index, offsets, seed, max_steps,
                        tri_channel, node_lo, node_hi, node_first, node_count, v0, e1, e2,
                        tri_inner, tri_outer, tri_surface, mat_n, mat_abs, mat_sca,
                        reem_prob, reem_wl_cdf, grid_wl, reem_t, reem_t_cdf,
                        surf_detect, surf_absorb, surf_rdiff, surf_rspec):  # fmt: skip
        n = table.shape[1]
        chunk = 256
        n_chunks = (n + chunk - 1) // chunk
        for c in numba.prange(n_chunks):
            # Scratch once per chunk, not per photon.
            stack = np.empty(STACK_SIZE, np.int32)
            stack_t = np.empty(STACK_SIZE, np.float32)
            rng = np.empty(RNG_STATE_SIZE, np.uint32)
            for i in range(c * chunk, min(n, (c + 1) * chunk)):
                propagate_photon(i, table, flags, last_hit, slot, event_id, first_index, offsets, seed, max_steps,
                                 node_lo, node_hi, node_first, node_count, v0, e1, e2,
                                 tri_inner, tri_outer, tri_surface, mat_n, mat_abs, mat_sca,
                                 reem_prob, reem_wl_cdf, grid_wl, reem_t, reem_t_cdf,
                                 surf_detect, surf_absorb, surf_rdiff, surf_rspec,
                                 stack, stack_t, rng)  # fmt: skip
                channel[i] = hit_channel(flags, last_hit, tri_channel, i)

    k.propagate_batch = propagate_batch
    return k


class CPUEngine(Engine):
    name = "cpu"

    def __init__(self, detector, config: EngineConfig | None = None):
        super().__init__(detector, config or EngineConfig())
        self.tables = kernel_tables(detector)
        self._kernels = cpu_kernels()
        self._last = np.empty(0, np.int32)  # [capacity] scratch, grown geometrically
        self._channel = np.empty(0, np.int32)

    def _scratch(self, n: int):
        if self._last.shape[0] < n:
            cap = max(n, 2 * self._last.shape[0])
            self._last = np.empty(cap, np.int32)
            self._channel = np.empty(cap, np.int32)
        return self._last[:n], self._channel[:n]

    def warm_up(self) -> None:
        b = PhotonBatch.from_events([np.zeros((N_ROWS, 0), np.float32)], [0])
        self.propagate(b)

    def propagate(self, batch: PhotonBatch, keep_photons: bool = False) -> HitBatch:
        # Propagation is in place on the host: the final state is always kept.
        n = batch.n_photons
        last, channel = self._scratch(n)
        t0 = time.perf_counter()
        self._kernels.propagate_batch(
            batch.table, batch.flags, last, channel, batch.slot, batch.event_id, batch.first_index, batch.offsets,
            np.uint32(self.config.seed & 0xFFFFFFFF), self.config.max_steps, self.tables.tri_channel,
            *self.tables.geometry_args(),
        )  # fmt: skip
        t1 = time.perf_counter()
        hits = gather_hits(batch.table, batch.flags, channel, batch.offsets)
        t2 = time.perf_counter()
        self.last_times.propagate = t1 - t0
        self.last_times.demux = t2 - t1
        return hits
