"""Assemble a :class:`Detector` from solids (mesh + materials + surface + channel)."""

from __future__ import annotations

import numpy as np

from .detector import Detector
from .optics import MaterialTable, SurfaceTable, tabulate


class DetectorBuilder:
    """Collects solids; each may be placed many times at once (vectorised tiling).

    Materials and surfaces are registered by name on first use.
    """

    def __init__(self):
        self._materials: dict[str, tuple[int, MaterialTable]] = {}
        self._surfaces: dict[str, tuple[int, SurfaceTable]] = {}
        self._vertices: list[np.ndarray] = []
        self._triangles: list[np.ndarray] = []
        self._tri_inner: list[np.ndarray] = []
        self._tri_outer: list[np.ndarray] = []
        self._tri_surface: list[np.ndarray] = []
        self._tri_solid: list[np.ndarray] = []
        self._solid_channel: list[np.ndarray] = []
        self._channel_position: list[np.ndarray] = []
        self._channel_type: list[np.ndarray] = []
        self._n_vertices = 0
        self._n_solids = 0
        self._n_channels = 0

    def _material(self, m: MaterialTable) -> int:
        if m.name not in self._materials:
            self._materials[m.name] = (len(self._materials), m)
        return self._materials[m.name][0]

    def _surface(self, s: SurfaceTable | None) -> int:
        if s is None:
            return -1
        if s.name not in self._surfaces:
            self._surfaces[s.name] = (len(self._surfaces), s)
        return self._surfaces[s.name][0]

    def add_solids(
        self,
        vertices: np.ndarray,  # [v, 3] mesh of one solid, mm, CCW seen from outside
        faces: np.ndarray,  # [f, 3] int
        offsets: np.ndarray,  # [n, 3] mm: one copy of the solid per row
        inner: MaterialTable,
        outer: MaterialTable,
        surface: SurfaceTable | None,
        channel_type: int | None = None,
    ) -> None:
        """Place ``len(offsets)`` copies of one mesh; each becomes a solid.

        With ``channel_type`` set, each copy is also a readout channel located at its offset.
        """
        vertices = np.asarray(vertices, dtype=np.float64)
        faces = np.asarray(faces, dtype=np.int64)
        offsets = np.atleast_2d(np.asarray(offsets, dtype=np.float64))
        n, nv, nf = len(offsets), len(vertices), len(faces)
        verts = (vertices[None, :, :] + offsets[:, None, :]).reshape(-1, 3)
        tris = (faces[None, :, :] + (self._n_vertices + nv * np.arange(n))[:, None, None]).reshape(-1, 3)
        solids = self._n_solids + np.arange(n)
        self._vertices.append(verts)
        self._triangles.append(tris)
        self._tri_inner.append(np.full(n * nf, self._material(inner)))
        self._tri_outer.append(np.full(n * nf, self._material(outer)))
        self._tri_surface.append(np.full(n * nf, self._surface(surface)))
        self._tri_solid.append(np.repeat(solids, nf))
        if channel_type is None:
            self._solid_channel.append(np.full(n, -1))
        else:
            self._solid_channel.append(self._n_channels + np.arange(n))
            self._channel_position.append(offsets)
            self._channel_type.append(np.full(n, channel_type))
            self._n_channels += n
        self._n_vertices += n * nv
        self._n_solids += n

    def build(self) -> Detector:
        materials = [m for _, m in sorted(self._materials.values(), key=lambda t: t[0])]
        surfaces = [s for _, s in sorted(self._surfaces.values(), key=lambda t: t[0])]
        arrays = tabulate(materials, surfaces)
        arrays.update(
            vertices=np.concatenate(self._vertices),
            triangles=np.concatenate(self._triangles),
            inner_material=np.concatenate(self._tri_inner),
            outer_material=np.concatenate(self._tri_outer),
            surface=np.concatenate(self._tri_surface),
            solid=np.concatenate(self._tri_solid),
            solid_channel=np.concatenate(self._solid_channel),
            channel_position=np.concatenate(self._channel_position) if self._channel_position else np.zeros((0, 3)),
            channel_type=np.concatenate(self._channel_type) if self._channel_type else np.zeros(0, np.int32),
        )
        return Detector.from_arrays(arrays)
