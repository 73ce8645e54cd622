"""GPU demultiplexing: exclusive scan of the hit indicator, then scatter into event order.

Photons of a batch are contiguous per event slot, so the exclusive scan ``pos``
of ``is_hit`` gives each hit its output index and ``pos[photon_offsets]`` the
per-event hit offsets (stable, no atomics). Numpy reference:
:func:`charon.scheduler.demux.hit_offsets`.

These are global kernels (GPU only); ``cuda`` is a module global so that the
CUDA simulator can stand in for it.
"""

from __future__ import annotations

import numpy as np

from ..engines.cuda_compat import ensure_numpy_compat

ensure_numpy_compat()

from numba import cuda, int32  # noqa: E402


def make_scatter(block: int):

    @cuda.jit
    def block_scan(x, out, block_sums, n):
        """Exclusive scan of x[0:n] within each block of ``block`` elements; block totals to block_sums."""
        sh = cuda.shared.array(block, int32)
        tid = cuda.threadIdx.x
        i = cuda.blockIdx.x * block + tid
        v = x[i] if i < n else 0
        sh[tid] = v
        cuda.syncthreads()
        off = 1
        while off < block:  # Hillis-Steele inclusive scan in shared memory
            t = sh[tid - off] if tid >= off else 0
            cuda.syncthreads()
            sh[tid] += t
            cuda.syncthreads()
            off *= 2
        if i < n:
            out[i] = sh[tid] - v
        if tid == block - 1:
            block_sums[cuda.blockIdx.x] = sh[tid]

    @cuda.jit
    def add_block_offsets(out, block_offsets, n):
        i = cuda.grid(1)
        if i < n:
            out[i] += block_offsets[i // block]

    @cuda.jit
    def event_offsets(pos, photon_offsets, hit_offsets, n_events):
        s = cuda.grid(1)
        if s <= n_events:
            hit_offsets[s] = pos[photon_offsets[s]]

    @cuda.jit
    def scatter_hits(table, flags, channel, pos, out_f, out_u, n):
        """out_f [8, n_hits] (dx..time rows), out_u [2, n_hits] (channel, flags), flattened.

        The hit total is read here from ``pos[n]`` rather than passed in, so the host
        queues the whole batch without waiting for it (one synchronisation per batch)."""
        i = cuda.grid(1)
        n_hits = pos[n]
        if i < n and channel[i] >= 0:
            j = pos[i]
            for r in range(8):
                out_f[r * n_hits + j] = table[3 + r, i]
            out_u[j] = channel[i]
            out_u[n_hits + j] = flags[i]

    class Scan:
        """Multi-level exclusive scan with scratch preallocated for ``capacity`` elements."""

        def __init__(self, capacity: int):
            self.levels = []
            n = capacity
            while True:
                nb = (n + block - 1) // block
                self.levels.append(cuda.device_array(max(nb, 1), np.int32))
                if nb <= 1:
                    break
                n = nb
            self.tmp = [cuda.device_array(len(lv), np.int32) for lv in self.levels]

        kernels = (block_scan, add_block_offsets)

        def __call__(self, x, out, n, stream, level=0, launch=None):
            """``launch(kernel, grid, block, *args)`` replaces numba's dispatch (the engine's prebound launches)."""
            nb = (n + block - 1) // block
            sums = self.levels[level]
            if launch is None:
                block_scan[nb, block, stream](x, out, sums, n)
            else:
                launch(block_scan, nb, block, x, out, sums, n)
            if nb > 1:
                scanned = self.tmp[level]
                self(sums, scanned, nb, stream, level + 1, launch)
                if launch is None:
                    add_block_offsets[(n + 255) // 256, 256, stream](out, scanned, n)
                else:
                    launch(add_block_offsets, (n + 255) // 256, 256, out, scanned, n)

    return Scan, event_offsets, scatter_hits
