"""Hit selection: which photons are hits and on which channel.

A photon is a hit when it ended with SURFACE_DETECT on a triangle whose solid
is a channel (PHYSICS.md, "Hits"). Selection is a per-photon device function;
grouping hits by event (scan + scatter) is in :mod:`charon.kernels.scatter`
for the GPU and :mod:`charon.scheduler.demux` on the host.
"""

from __future__ import annotations

from ..photons import SURFACE_DETECT


def make_compact(jit):
    @jit
    def hit_channel(flags, last_hit, tri_channel, i):
        """Channel id of photon ``i`` if it is a hit, else -1."""
        tri = last_hit[i]
        if (flags[i] & SURFACE_DETECT) == 0 or tri < 0:
            return -1
        return tri_channel[tri]

    return (hit_channel,)
