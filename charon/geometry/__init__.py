"""Detector model, the ``.npz`` detector file, built-in detectors, mesh import."""

from __future__ import annotations

import os

from .builtin import BUILTIN, builtin_detector
from .detector import Detector, DetectorError
from .detector_file import load_detector, save_detector

MESH_SUFFIXES = (".stl", ".obj", ".ply", ".off", ".glb")


def resolve_detector(spec: str) -> Detector:
    """``--detector`` value: a built-in name, a ``.npz`` detector file, or a mesh file."""
    if spec in BUILTIN:
        return builtin_detector(spec)
    if not os.path.exists(spec):
        raise DetectorError("<file>", f"{spec!r} is neither a built-in detector {sorted(BUILTIN)} nor an existing file")
    if spec.lower().endswith(MESH_SUFFIXES):
        from .mesh_import import load_mesh_detector

        return load_mesh_detector(spec)
    return load_detector(spec)


__all__ = ["Detector", "DetectorError", "load_detector", "save_detector", "builtin_detector", "resolve_detector"]
