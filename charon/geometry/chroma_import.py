"""Chroma detectors: loading (pickle or ``module:function``) and conversion to a charon Detector.

Chroma is optional: only this module and :mod:`charon.engines.chroma` import
it, and only when asked. The attributes used are those of Chroma's flattened
``Detector`` (Python-3 Chroma, BenLand100/chroma, as ChAR0N uses it):

* ``mesh.vertices`` [V,3], ``mesh.triangles`` [T,3], ``solid_id`` [T]
* ``material1_index`` (inside), ``material2_index`` (outside), ``surface_index`` (-1: none) [T]
* ``unique_materials``, ``unique_surfaces``: Material / Surface objects whose
  properties are ``[n, 2]`` arrays of (wavelength nm, value)
* ``solid_id_to_channel_index`` [S], ``channel_index_to_solid_id`` [C],
  ``channel_index_to_channel_type`` [C] (optional)

Channel positions are the centroids of each channel solid's vertices (Chroma
stores none), which is what DETECTOR_INFO reports.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys

import numpy as np

from .detector import Detector
from .optics import STANDARD_GRID

CHROMA_NEEDED = (
    "this needs Chroma (the GPU optical-photon simulator) importable as `chroma`; it is not installed here. "
    "charon runs without Chroma: use --engine cpu or --engine cuda with a built-in detector (demo, large, sphere) "
    "or a charon detector file (.npz), made once with `charon-convert` on a machine that has Chroma."
)

MATERIAL_PROPS = ("refractive_index", "absorption_length", "scattering_length")
SURFACE_PROPS = ("detect", "absorb", "reflect_diffuse", "reflect_specular")
# Defaults for a property a Chroma object leaves unset, with the reason they are safe.
_MATERIAL_DEFAULTS = {"refractive_index": 1.0, "absorption_length": 1e9, "scattering_length": 1e9}


class ChromaUnavailable(RuntimeError):
    pass


def import_chroma():
    """Import Chroma or raise :class:`ChromaUnavailable` with the way to run without it."""
    try:
        return importlib.import_module("chroma")
    except ImportError as exc:
        raise ChromaUnavailable(CHROMA_NEEDED) from exc


def load_chroma_detector(spec: str):
    """A Chroma Detector from a pickle file or from ``module:function`` (called with no arguments)."""
    import_chroma()
    if os.path.exists(spec):
        with open(spec, "rb") as fh:
            return pickle.load(fh)  # noqa: S301 - the operator's own detector file, as ChAR0N loads it
    if ":" in spec:
        mod, func = spec.split(":", 1)
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        return getattr(importlib.import_module(mod), func)()
    raise ValueError(f"{spec!r} is neither a file nor module:function")


def _table(obj, prop: str, grid: np.ndarray, default: float, report: list, what: str) -> np.ndarray:
    """A Chroma property resampled onto ``grid`` (clamped linear interpolation, as Chroma does)."""
    value = getattr(obj, prop, None)
    if value is None:
        report.append(f"{what} {obj.name!r}: {prop} not set, using {default:g}")
        return np.full(len(grid), default, np.float32)
    a = np.asarray(value, dtype=np.float64)
    if a.ndim == 0:
        return np.full(len(grid), float(a), np.float32)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"{what} {obj.name!r}: {prop} has shape {a.shape}, expected [n, 2] (wavelength, value)")
    order = np.argsort(a[:, 0])
    return np.interp(grid, a[order, 0], a[order, 1]).astype(np.float32)


def _nonempty(v) -> bool:
    if v is None:
        return False
    try:
        a = np.asarray(v, dtype=object)
        if a.size == 0:
            return False
        return bool(np.any(np.asarray(v, dtype=np.float64) != 0)) if a.dtype != object else True
    except (TypeError, ValueError):
        return bool(v)


def from_chroma(det, grid: np.ndarray = STANDARD_GRID) -> tuple[Detector, list[str]]:
    """Convert a Chroma Detector. Returns the charon Detector and a report of what charon cannot model."""
    if getattr(det, "mesh", None) is None and hasattr(det, "flatten"):
        det.flatten()
    report: list[str] = []
    grid = np.asarray(grid, np.float32)
    vertices = np.asarray(det.mesh.vertices, np.float32)
    triangles = np.asarray(det.mesh.triangles, np.int32)
    solid = np.asarray(det.solid_id, np.int32)
    S = int(solid.max()) + 1 if solid.size else 0
    s2c = np.full(S, -1, np.int32)
    given = np.asarray(getattr(det, "solid_id_to_channel_index", np.zeros(0)), np.int32)[:S]
    s2c[: len(given)] = given
    c2s = np.asarray(getattr(det, "channel_index_to_solid_id", np.zeros(0)), np.int32)
    C = len(c2s)
    # Channel position: centroid of the channel solid's vertices.
    tri_centroid = vertices[triangles].mean(axis=1)
    sums = np.zeros((S, 3))
    np.add.at(sums, solid, tri_centroid)
    counts = np.bincount(solid, minlength=S)
    positions = (sums[c2s] / np.maximum(counts[c2s], 1)[:, None]).astype(np.float32)
    ctype = np.asarray(getattr(det, "channel_index_to_channel_type", np.zeros(C)), np.int32)
    if len(ctype) != C:
        ctype = np.zeros(C, np.int32)

    materials = list(det.unique_materials)
    arrays = {
        "vertices": vertices,
        "triangles": triangles,
        "inner_material": np.asarray(det.material1_index, np.int32),
        "outer_material": np.asarray(det.material2_index, np.int32),
        "surface": np.asarray(det.surface_index, np.int32),
        "solid": solid,
        "solid_channel": s2c,
        "channel_position": positions,
        "channel_type": ctype,
        "wavelength": grid,
        "material_names": np.array([m.name for m in materials], dtype=str),
    }
    for prop in MATERIAL_PROPS:
        arrays[f"material_{prop}"] = np.stack(
            [_table(m, prop, grid, _MATERIAL_DEFAULTS[prop], report, "material") for m in materials]
        )
    reemit = [_nonempty(getattr(m, "reemission_prob", None)) for m in materials]
    if any(reemit):
        arrays["material_reemission_prob"] = np.stack(
            [_table(m, "reemission_prob", grid, 0.0, [], "material") for m in materials]
        )
        cdfs = []
        for m, r in zip(materials, reemit):
            if r and getattr(m, "reemission_cdf", None) is not None:
                cdf = np.clip(_table(m, "reemission_cdf", grid, 1.0, report, "material"), 0, 1)
                cdf = np.maximum.accumulate(cdf)
                cdf = cdf / cdf[-1] if cdf[-1] > 0 else np.ones_like(cdf)
            else:
                cdf = np.ones(len(grid), np.float32)
            cdfs.append(cdf)
        arrays["material_reemission_wavelength_cdf"] = np.stack(cdfs).astype(np.float32)
        # Chroma's single-component model re-emits without delay.
        arrays["reemission_time"] = np.array([0.0, 1.0], np.float32)
        arrays["material_reemission_time_cdf"] = np.ones((len(materials), 2), np.float32)
    for m in materials:
        for prop in ("comp_reemission_prob", "comp_reemission_wvl_cdf", "comp_reemission_times",
                     "comp_reemission_time_cdf", "comp_absorption_length"):  # fmt: skip
            if _nonempty(getattr(m, prop, None)):
                report.append(f"material {m.name!r}: {prop} (multi-component re-emission) not modelled; dropped")

    surfaces = [s for s in det.unique_surfaces if s is not None]
    arrays["surface_names"] = np.array([s.name for s in surfaces], dtype=str).reshape(len(surfaces))
    for prop in SURFACE_PROPS:
        rows = [_table(s, prop, grid, 0.0, report, "surface") for s in surfaces]
        arrays[f"surface_{prop}"] = np.stack(rows) if rows else np.zeros((0, len(grid)), np.float32)
    for s in surfaces:
        model = getattr(s, "model", 0) or 0
        if model != 0:
            report.append(f"surface {s.name!r}: model {model} (thin-film/WLS/dichroic) not modelled; "
                          "converted with the default model's probabilities")  # fmt: skip
        for prop in ("reemit", "eta", "k", "reemission_cdf", "thickness"):
            if _nonempty(getattr(s, prop, None)):
                report.append(f"surface {s.name!r}: {prop} not modelled; dropped")
        if getattr(s, "transmissive", 0):
            report.append(f"surface {s.name!r}: transmissive flag not modelled; dropped")
    total = sum(arrays[f"surface_{p}"] for p in SURFACE_PROPS) if surfaces else None
    if total is not None and np.any(total > 1 + 1e-5):
        k = int(np.argwhere(total > 1 + 1e-5)[0][0])
        report.append(f"surface {surfaces[k].name!r}: probabilities sum above 1; scaled down to 1")
        scale = np.maximum(total, 1.0)
        for p in SURFACE_PROPS:
            arrays[f"surface_{p}"] = (arrays[f"surface_{p}"] / scale).astype(np.float32)
    return Detector.from_arrays(arrays), report


def convert_main(argv=None) -> int:
    """charon-convert SOURCE -o detector.npz"""
    import argparse

    from .detector_file import save_detector

    ap = argparse.ArgumentParser(prog="charon-convert", description="Convert a Chroma detector (pickle or "
                                 "module:function) into a charon detector file (.npz).")  # fmt: skip
    ap.add_argument("source", help="pickled Chroma Detector, or module:function returning one")
    ap.add_argument("-o", "--output", required=True, help="charon detector file to write (.npz)")
    a = ap.parse_args(argv)
    try:
        det = load_chroma_detector(a.source)
        converted, report = from_chroma(det)
        save_detector(converted, a.output)
    except ChromaUnavailable as exc:
        print(f"charon-convert: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"charon-convert: cannot convert {a.source!r}: {exc}", file=sys.stderr)
        return 1
    for line in report:
        print(f"not modelled: {line}")
    print(f"wrote {a.output}: {converted.n_triangles} triangles, {converted.n_materials} materials, "
          f"{converted.n_channels} channels")  # fmt: skip
    return 0
