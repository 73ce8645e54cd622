"""Device functions, written once and compiled for each target.

Each module exposes a ``make_*(jit)`` factory: calling it with ``numba.njit``
gives CPU functions, with ``numba.cuda.jit(device=True)`` CUDA device
functions. :func:`build` assembles the full set for one target. Launch logic
(threads, grids, streams, scratch allocation) lives in :mod:`charon.engines`.

Where a photon goes next, in module order: ``rng`` (its random stream) ->
``bvh`` + ``intersect`` (the next triangle) -> ``physics`` (what happens there)
-> ``propagate`` (the step loop) -> ``compact`` (is it a hit) -> ``scatter``
(hits grouped by event, GPU).
"""

from __future__ import annotations

from types import SimpleNamespace

from .bvh import make_traverse
from .compact import make_compact
from .intersect import make_intersect
from .physics import make_physics
from .propagate import make_propagate
from .rng import make_rng


def build(jit) -> SimpleNamespace:
    k = SimpleNamespace()
    k.philox4x32, k.rng_init, k.uniform = make_rng(jit)
    k.ray_triangle, k.ray_box = make_intersect(jit)
    k.nearest_hit = make_traverse(jit, k.ray_triangle, k.ray_box)
    (
        k.interp_grid,
        k.sample_cdf,
        k.normalize,
        k.cross,
        k.isotropic,
        k.random_transverse,
        k.rayleigh,
        k.lambertian,
        k.mirror,
        k.fresnel,
    ) = make_physics(jit)
    k.propagate_photon = make_propagate(jit, k)
    (k.hit_channel,) = make_compact(jit)
    return k
