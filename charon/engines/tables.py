"""Detector data laid out for the kernels: BVH order, standard wavelength grid."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..geometry import Detector
from ..geometry.optics import STANDARD_GRID, resample
from ..kernels.bvh import BVH, build_bvh


@dataclass(frozen=True)
class KernelTables:
    bvh: BVH
    tri_inner: np.ndarray  # [T] int32, BVH order
    tri_outer: np.ndarray  # [T] int32, BVH order
    tri_surface: np.ndarray  # [T] int32, BVH order
    tri_channel: np.ndarray  # [T] int32, BVH order, channel id or -1
    mat_n: np.ndarray  # [M, 188] float32
    mat_abs: np.ndarray  # [M, 188] float32, mm
    mat_sca: np.ndarray  # [M, 188] float32, mm
    reem_prob: np.ndarray  # [M, 188] float32 (zeros without re-emission)
    reem_wl_cdf: np.ndarray  # [M, 188] float32
    grid_wl: np.ndarray  # [188] float32, nm
    reem_t: np.ndarray  # [R] float32, ns
    reem_t_cdf: np.ndarray  # [M, R] float32
    surf_detect: np.ndarray  # [K, 188] float32
    surf_absorb: np.ndarray
    surf_rdiff: np.ndarray
    surf_rspec: np.ndarray

    def geometry_args(self) -> tuple:
        """Arguments of ``propagate_photon`` after ``max_steps``, in order."""
        b = self.bvh
        return (
            b.node_lo, b.node_hi, b.node_first, b.node_count, b.tri_v0, b.tri_e1, b.tri_e2,
            self.tri_inner, self.tri_outer, self.tri_surface,
            self.mat_n, self.mat_abs, self.mat_sca,
            self.reem_prob, self.reem_wl_cdf, self.grid_wl, self.reem_t, self.reem_t_cdf,
            self.surf_detect, self.surf_absorb, self.surf_rdiff, self.surf_rspec,
        )  # fmt: skip


def _grid(det: Detector, table: np.ndarray) -> np.ndarray:
    """Resample a [rows, W] table from the detector's grid onto the standard grid (Chroma's first stage)."""
    if table.shape[0] == 0:  # keep a row so the kernels always see a 2-d array
        return np.zeros((1, len(STANDARD_GRID)), np.float32)
    return np.ascontiguousarray(resample(det.wavelength, table))


def kernel_tables(det: Detector, bvh: BVH | None = None) -> KernelTables:
    bvh = bvh or build_bvh(det.vertices, det.triangles)
    order = bvh.tri_id
    M = det.n_materials
    if det.has_reemission:
        reem_prob = _grid(det, det.material_reemission_prob)
        reem_wl_cdf = _grid(det, det.material_reemission_wavelength_cdf)
        reem_t = det.reemission_time
        reem_t_cdf = det.material_reemission_time_cdf
    else:
        reem_prob = np.zeros((M, len(STANDARD_GRID)), np.float32)
        reem_wl_cdf = np.ones((M, len(STANDARD_GRID)), np.float32)
        reem_t = np.array([0.0, 1.0], np.float32)
        reem_t_cdf = np.ones((M, 2), np.float32)
    return KernelTables(
        bvh=bvh,
        tri_inner=np.ascontiguousarray(det.inner_material[order]),
        tri_outer=np.ascontiguousarray(det.outer_material[order]),
        tri_surface=np.ascontiguousarray(det.surface[order]),
        tri_channel=np.ascontiguousarray(det.solid_channel[det.solid[order]]),
        mat_n=_grid(det, det.material_refractive_index),
        mat_abs=_grid(det, det.material_absorption_length),
        mat_sca=_grid(det, det.material_scattering_length),
        reem_prob=reem_prob,
        reem_wl_cdf=reem_wl_cdf,
        grid_wl=STANDARD_GRID.copy(),
        reem_t=np.ascontiguousarray(reem_t, np.float32),
        reem_t_cdf=np.ascontiguousarray(reem_t_cdf, np.float32),
        surf_detect=_grid(det, det.surface_detect),
        surf_absorb=_grid(det, det.surface_absorb),
        surf_rdiff=_grid(det, det.surface_reflect_diffuse),
        surf_rspec=_grid(det, det.surface_reflect_specular),
    )
