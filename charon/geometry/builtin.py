"""Built-in detectors, selectable by name (``--detector demo``).

* ``demo``: Chroma-demo-like water sphere: a black wall of radius 2.5 m and 53
  PMTs (10-inch, R7081-HQE photocathode, glass interior) on a 2 m radius,
  about 350k triangles. The server's default.
* ``large``: a 9 m water sphere with 4000 PMTs, about 5.2 million triangles,
  for benchmarks.
* ``sphere``: a 1 m water sphere whose wall is one channel with a detecting
  surface: small and fast, for smoke tests.
"""

from __future__ import annotations

import functools

import numpy as np
import trimesh

from .builder import DetectorBuilder
from .detector import Detector
from .optics import (
    MaterialTable,
    SurfaceTable,
    black_surface,
    constant_surface,
    glass,
    r7081hqe_photocathode,
    water,
)

PMT_RADIUS_MM = 126.5  # R7081: 10-inch bulb


def fibonacci_sphere(n: int, radius: float) -> np.ndarray:
    """[n, 3] points spread evenly on a sphere (golden-angle spiral)."""
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    r = np.sqrt(1 - z * z)
    phi = np.pi * (3 - np.sqrt(5)) * i
    return radius * np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


@functools.lru_cache(maxsize=8)
def _icosphere(subdivisions: int, radius: float):
    m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return np.asarray(m.vertices), np.asarray(m.faces)


def sphere_detector(
    radius: float = 1000.0,
    medium: MaterialTable | None = None,
    wall_surface: SurfaceTable | None = None,
    wall_is_channel: bool = True,
    subdivisions: int = 4,
) -> Detector:
    """One medium inside a spherical wall; the wall is optionally one channel.

    The outside is the same medium, so only the wall's surface matters.
    Used by the known-answer tests (PHYSICS.md) and the ``sphere`` built-in.
    """
    medium = medium or water()
    wall_surface = wall_surface or constant_surface("detector", detect=1.0)
    b = DetectorBuilder()
    v, f = _icosphere(subdivisions, radius)
    b.add_solids(v, f, np.zeros((1, 3)), medium, medium, wall_surface, channel_type=1 if wall_is_channel else None)
    return b.build()


def pmt_sphere_detector(
    n_pmts: int,
    pmt_ring_radius: float,
    wall_radius: float,
    pmt_subdivisions: int,
    wall_subdivisions: int,
) -> Detector:
    b = DetectorBuilder()
    h2o, cathode = water(), r7081hqe_photocathode()
    wv, wf = _icosphere(wall_subdivisions, wall_radius)
    b.add_solids(wv, wf, np.zeros((1, 3)), h2o, h2o, black_surface())
    pv, pf = _icosphere(pmt_subdivisions, PMT_RADIUS_MM)
    b.add_solids(pv, pf, fibonacci_sphere(n_pmts, pmt_ring_radius), glass(), h2o, cathode, channel_type=1)
    return b.build()


def demo() -> Detector:
    return pmt_sphere_detector(53, 2000.0, 2500.0, pmt_subdivisions=4, wall_subdivisions=6)


def large() -> Detector:
    return pmt_sphere_detector(4000, 9000.0, 9500.0, pmt_subdivisions=3, wall_subdivisions=6)


def sphere() -> Detector:
    return sphere_detector()


BUILTIN = {"demo": demo, "large": large, "sphere": sphere}


def builtin_detector(name: str) -> Detector:
    try:
        return BUILTIN[name]()
    except KeyError:
        raise KeyError(f"unknown built-in detector {name!r}; choose one of {sorted(BUILTIN)}") from None
