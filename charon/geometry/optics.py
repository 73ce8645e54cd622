"""Optical property tables and Chroma's standard wavelength grid.

Chroma resamples every property onto a 5 nm grid from 60 to 995 nm (188
points) with clamping at the ends, and interpolates linearly on that grid at
run time. charon does the same so that both stages of interpolation match.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import numpy as np

# Chroma's standard wavelength grid: 60..995 nm in 5 nm steps (188 points).
GRID_START_NM = 60.0
GRID_STEP_NM = 5.0
GRID_SIZE = 188
STANDARD_GRID = (GRID_START_NM + GRID_STEP_NM * np.arange(GRID_SIZE)).astype(np.float32)  # [188] nm


def resample(x: np.ndarray, y: np.ndarray, grid: np.ndarray = STANDARD_GRID) -> np.ndarray:
    """Linear interpolation of ``y(x)`` onto ``grid``, clamped to the end values.

    ``y`` may be [W] or [M, W]; the result is float32 [len(grid)] or [M, len(grid)].
    """
    y = np.asarray(y, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    if y.ndim == 1:
        return np.interp(grid, x, y).astype(np.float32)
    return np.stack([np.interp(grid, x, row) for row in y]).astype(np.float32)


def _read_csv(name: str) -> np.ndarray:
    with resources.files("charon.geometry.data").joinpath(name).open("r") as fh:
        return np.loadtxt(fh, delimiter=",", comments="#", ndmin=2)


@dataclass(frozen=True)
class MaterialTable:
    name: str
    wavelength: np.ndarray  # [W] nm
    refractive_index: np.ndarray  # [W]
    absorption_length: np.ndarray  # [W] mm
    scattering_length: np.ndarray  # [W] mm


@dataclass(frozen=True)
class SurfaceTable:
    name: str
    wavelength: np.ndarray  # [W] nm
    detect: np.ndarray  # [W]
    absorb: np.ndarray  # [W]
    reflect_diffuse: np.ndarray  # [W]
    reflect_specular: np.ndarray  # [W]


def water() -> MaterialTable:
    """Pure water (WCSim values, as the Chroma demo detector uses)."""
    t = _read_csv("water.csv")
    return MaterialTable("water", t[:, 0], t[:, 1], t[:, 2], t[:, 3])


def glass() -> MaterialTable:
    """PMT glass: n = 1.49, scattering length 1e6 mm, tabulated absorption."""
    t = _read_csv("glass.csv")
    ones = np.ones_like(t[:, 0])
    return MaterialTable("glass", t[:, 0], 1.49 * ones, t[:, 1], 1e6 * ones)


def vacuum() -> MaterialTable:
    w = np.array([60.0, 995.0])
    return MaterialTable("vacuum", w, np.ones(2), np.full(2, 1e6), np.full(2, 1e6))


def r7081hqe_photocathode() -> SurfaceTable:
    """Chroma demo photocathode: detect = QE, absorb = QE, reflect_diffuse = 1 - 2 QE."""
    t = _read_csv("pmt_qe_r7081hqe.csv")
    qe = t[:, 1]
    return SurfaceTable("r7081hqe_photocathode", t[:, 0], qe, qe, 1 - 2 * qe, np.zeros_like(qe))


def black_surface() -> SurfaceTable:
    w = np.array([60.0, 995.0])
    return SurfaceTable("black", w, np.zeros(2), np.ones(2), np.zeros(2), np.zeros(2))


def constant_material(name: str, n: float, absorption_length: float, scattering_length: float) -> MaterialTable:
    w = np.array([60.0, 995.0])
    return MaterialTable(name, w, np.full(2, n), np.full(2, absorption_length), np.full(2, scattering_length))


def constant_surface(name: str, detect=0.0, absorb=0.0, reflect_diffuse=0.0, reflect_specular=0.0) -> SurfaceTable:
    w = np.array([60.0, 995.0])
    return SurfaceTable(
        name, w, np.full(2, detect), np.full(2, absorb), np.full(2, reflect_diffuse), np.full(2, reflect_specular)
    )


def tabulate(materials: list[MaterialTable], surfaces: list[SurfaceTable], grid=STANDARD_GRID) -> dict:
    """Resample material and surface tables onto one grid, as detector-file arrays."""
    out = {
        "wavelength": np.asarray(grid, dtype=np.float32),
        "material_names": np.array([m.name for m in materials], dtype=str),
        "surface_names": np.array([s.name for s in surfaces], dtype=str).reshape(len(surfaces)),
    }
    for key in ("refractive_index", "absorption_length", "scattering_length"):
        out[f"material_{key}"] = np.stack([resample(m.wavelength, getattr(m, key), grid) for m in materials])
    for key in ("detect", "absorb", "reflect_diffuse", "reflect_specular"):
        rows = [resample(s.wavelength, getattr(s, key), grid) for s in surfaces]
        out[f"surface_{key}"] = np.stack(rows) if rows else np.zeros((0, len(grid)), np.float32)
    return out
