"""Chroma engine: each batch as one Chroma propagation, hits grouped by charon's demultiplexer.

All photons of a batch go into one ``GPUPhotons`` with ``evidx`` set to their
event slot; Chroma's flat hits (channel + evidx per hit) are grouped with a
counting sort (:func:`charon.scheduler.demux.group_by_slot`) instead of
Chroma's per-event boolean masks.

Chroma's random streams depend on queue position, so with this engine an
event's hits do depend on its batch (statistically equivalent, not bitwise);
charon's own engines do not have that limitation.
"""

from __future__ import annotations

import time

import numpy as np

from ..geometry.chroma_import import import_chroma
from ..photons import HitBatch, PhotonBatch
from ..scheduler.demux import group_by_slot
from .base import Engine, EngineConfig


class ChromaEngine(Engine):
    name = "chroma"
    nthreads_per_block = 64
    max_blocks = 1024

    def __init__(self, detector, config: EngineConfig, chroma_detector):
        super().__init__(detector, config)
        import_chroma()
        from chroma import gpu
        from chroma.gpu.detector import GPUDetector

        self._context = gpu.create_cuda_context(config.device)
        self.gpu_detector = GPUDetector(chroma_detector)
        self.rng_states = gpu.get_rng_states(self.nthreads_per_block * self.max_blocks, seed=config.seed)

    def propagate(self, batch: PhotonBatch, keep_photons: bool = False) -> HitBatch:
        from chroma.event import Photons
        from chroma.gpu.photon import GPUPhotons

        t = batch.table
        t0 = time.perf_counter()
        photons = Photons(
            pos=np.ascontiguousarray(t[0:3].T),
            dir=np.ascontiguousarray(t[3:6].T),
            pol=np.ascontiguousarray(t[6:9].T),
            wavelengths=np.ascontiguousarray(t[9]),
            t=np.ascontiguousarray(t[10]),
            flags=np.asarray(batch.flags, np.uint32),
            evidx=np.asarray(batch.slot, np.uint32),
        )
        gpu_photons = GPUPhotons(photons)
        t1 = time.perf_counter()
        gpu_photons.propagate(self.gpu_detector, self.rng_states, nthreads_per_block=self.nthreads_per_block,
                              max_blocks=self.max_blocks, max_steps=self.config.max_steps)  # fmt: skip
        hits = gpu_photons.get_flat_hits(self.gpu_detector)
        t2 = time.perf_counter()
        order, offsets = group_by_slot(np.asarray(hits.evidx), batch.n_events)
        table = np.empty((8, len(order)), np.float32)
        table[0:3] = np.asarray(hits.dir, np.float32)[order].T
        table[3:6] = np.asarray(hits.pol, np.float32)[order].T
        table[6] = np.asarray(hits.wavelengths, np.float32)[order]
        table[7] = np.asarray(hits.t, np.float32)[order]
        out = HitBatch(np.asarray(hits.channel, np.uint32)[order], table, np.asarray(hits.flags, np.uint32)[order],
                       offsets)  # fmt: skip
        self.last_times.copy_in = t1 - t0
        self.last_times.propagate = t2 - t1
        self.last_times.demux = time.perf_counter() - t2
        return out

    def close(self) -> None:
        ctx = getattr(self, "_context", None)
        if ctx is not None and hasattr(ctx, "pop"):
            ctx.pop()
