import numpy as np

from ..event import Photons

SURFACE_DETECT = 0x1 << 2
CALLS = []  # (n_photons, evidx) of every propagate call, for the tests


class GPUPhotons:
    def __init__(self, photons, ncopies=1):
        self.p = Photons(photons.pos.copy(), photons.dir.copy(), photons.pol.copy(), photons.wavelengths.copy(),
                         photons.t.copy(), photons.last_hit_triangles.copy(), photons.flags.copy(),
                         photons.weights.copy(), photons.evidx.copy())

    def propagate(self, gpu_geometry, rng_states, nthreads_per_block=256, max_blocks=1024, max_steps=10, **kw):
        assert len(rng_states) >= nthreads_per_block * max_blocks
        CALLS.append((len(self.p), self.p.evidx.copy()))
        hit = self.p.dir[:, 2] > 0
        self.p.flags[hit] |= SURFACE_DETECT
        self.p.t[hit] += 1.0

    def get_flat_hits(self, gpu_detector, target_flag=SURFACE_DETECT, **kw):
        idx = np.flatnonzero(self.p.flags & target_flag)
        np.random.default_rng(len(idx)).shuffle(idx)  # GPU compaction order
        p = self.p
        channel = (idx % gpu_detector.n_channels).astype(np.int32)
        return Photons(p.pos[idx], p.dir[idx], p.pol[idx], p.wavelengths[idx], p.t[idx], p.last_hit_triangles[idx],
                       p.flags[idx], p.weights[idx], p.evidx[idx], channel)
