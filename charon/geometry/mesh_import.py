"""Import a triangle mesh (STL and the other formats trimesh reads).

Material/surface assignment for an imported mesh, since a mesh file carries no
optics: every connected body becomes one solid and one readout channel
(located at the body's centroid) with a perfectly detecting surface; water on
both sides. So an STL of photodetector shapes is a working detector at once;
anything finer should be built with :class:`DetectorBuilder` or converted.
"""

from __future__ import annotations

import numpy as np
import trimesh

from .builder import DetectorBuilder
from .detector import Detector, DetectorError
from .optics import MaterialTable, SurfaceTable, constant_surface, water


def load_mesh_detector(
    path: str,
    medium: MaterialTable | None = None,
    surface: SurfaceTable | None = None,
) -> Detector:
    try:
        mesh = trimesh.load_mesh(path, process=True)
    except Exception as exc:  # trimesh raises many types for unreadable files
        raise DetectorError("<file>", f"cannot read mesh {path!r}: {exc}") from exc
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise DetectorError("triangles", f"mesh {path!r} has no triangles")
    medium = medium or water()
    surface = surface or constant_surface("detector", detect=1.0)
    b = DetectorBuilder()
    for body in mesh.split(only_watertight=False):
        c = np.asarray(body.centroid)
        b.add_solids(np.asarray(body.vertices) - c, body.faces, c[None, :], medium, medium, surface, channel_type=1)
    return b.build()
