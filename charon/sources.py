"""Photon sources for tests, benchmarks and the load generator."""

from __future__ import annotations

import numpy as np

from .photons import N_ROWS


def point_source(n: int, rng: np.random.Generator, position=(0.0, 0.0, 0.0), wavelength=420.0, time=0.0) -> np.ndarray:
    """[N_ROWS, n] float32 photons: isotropic directions, random transverse polarization."""
    table = np.empty((N_ROWS, n), np.float32)
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    p = np.cross(d, rng.normal(size=(n, 3)))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    table[0:3] = np.asarray(position, np.float32)[:, None]
    table[3:6] = d.T
    table[6:9] = p.T
    table[9] = wavelength
    table[10] = time
    return table


def random_event(n: int, rng: np.random.Generator, radius: float = 1500.0) -> np.ndarray:
    """A point source at a random place inside a sphere of ``radius`` mm, wavelengths 350..500 nm."""
    pos = rng.normal(size=3)
    pos *= radius * rng.random() ** (1 / 3) / np.linalg.norm(pos)
    t = point_source(n, rng, position=pos)
    t[9] = rng.uniform(350.0, 500.0, n)
    return t
