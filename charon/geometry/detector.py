"""The detector model: a triangle mesh with per-triangle materials and surfaces.

Everything is flat arrays so that the same data feeds the CPU and the CUDA
engines without conversion, and so that the on-disk format
(:mod:`charon.geometry.detector_file`) is a plain ``.npz`` with one key per field.

Conventions (see ``docs/detector-format.md``):

* "outer" is the side the right-hand normal ``cross(v1-v0, v2-v1)`` points to.
* ``surface == -1`` means no optical surface: the boundary is a plain
  dielectric interface handled with Fresnel's equations.
* ``solid_channel[s] == -1`` means solid ``s`` is not a readout channel.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np


class DetectorError(ValueError):
    """A detector definition is invalid. The message names the offending key."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"detector key {key!r}: {problem}")
        self.key = key
        self.problem = problem


# Keys that must be present in every detector file, in documentation order.
REQUIRED_KEYS = (
    "vertices",
    "triangles",
    "inner_material",
    "outer_material",
    "surface",
    "solid",
    "solid_channel",
    "channel_position",
    "channel_type",
    "wavelength",
    "material_names",
    "material_refractive_index",
    "material_absorption_length",
    "material_scattering_length",
    "surface_names",
    "surface_detect",
    "surface_absorb",
    "surface_reflect_diffuse",
    "surface_reflect_specular",
)
# Re-emission keys: all or none.
REEMISSION_KEYS = (
    "material_reemission_prob",
    "material_reemission_wavelength_cdf",
    "material_reemission_time_cdf",
    "reemission_time",
)
ALL_KEYS = REQUIRED_KEYS + REEMISSION_KEYS


@dataclass(frozen=True)
class Detector:
    vertices: np.ndarray  # [V, 3] float32, mm
    triangles: np.ndarray  # [T, 3] int32, vertex indices, CCW seen from the outer side
    inner_material: np.ndarray  # [T] int32, material index on the inner side
    outer_material: np.ndarray  # [T] int32, material index on the outer side
    surface: np.ndarray  # [T] int32, surface index or -1
    solid: np.ndarray  # [T] int32, solid id the triangle belongs to
    solid_channel: np.ndarray  # [S] int32, channel id of each solid or -1
    channel_position: np.ndarray  # [C, 3] float32, mm
    channel_type: np.ndarray  # [C] int32
    wavelength: np.ndarray  # [W] float32, nm, strictly increasing: grid of all tables
    material_names: np.ndarray  # [M] str
    material_refractive_index: np.ndarray  # [M, W] float32
    material_absorption_length: np.ndarray  # [M, W] float32, mm
    material_scattering_length: np.ndarray  # [M, W] float32, mm (Rayleigh)
    surface_names: np.ndarray  # [K] str
    surface_detect: np.ndarray  # [K, W] float32, probability
    surface_absorb: np.ndarray  # [K, W] float32, probability
    surface_reflect_diffuse: np.ndarray  # [K, W] float32, probability
    surface_reflect_specular: np.ndarray  # [K, W] float32, probability
    # Optional scintillator re-emission (all four or none).
    material_reemission_prob: np.ndarray | None = None  # [M, W] float32
    material_reemission_wavelength_cdf: np.ndarray | None = None  # [M, W] float32, CDF over `wavelength`
    material_reemission_time_cdf: np.ndarray | None = None  # [M, R] float32, CDF over `reemission_time`
    reemission_time: np.ndarray | None = None  # [R] float32, ns, increasing

    # ------------------------------------------------------------------ sizes
    @property
    def n_triangles(self) -> int:
        return int(self.triangles.shape[0])

    @property
    def n_channels(self) -> int:
        return int(self.channel_position.shape[0])

    @property
    def n_materials(self) -> int:
        return int(self.material_names.shape[0])

    @property
    def has_reemission(self) -> bool:
        return self.material_reemission_prob is not None

    def fingerprint(self) -> bytes:
        """16-byte digest of every array (names, shapes, dtypes, values): two detectors
        with equal fingerprints propagate identically. Used by the router to refuse a
        worker whose detector differs."""
        import xxhash

        h = xxhash.xxh3_128()
        for name, a in sorted(self.arrays().items()):
            h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
            h.update(np.ascontiguousarray(a).tobytes() if a.dtype.kind == "U" else np.ascontiguousarray(a))
        return h.digest()

    def arrays(self) -> dict[str, np.ndarray]:
        """The detector as a ``{key: array}`` dict (optional keys omitted when absent)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    # ------------------------------------------------------------- creation
    @classmethod
    def from_arrays(cls, arrays: dict) -> "Detector":
        """Coerce dtypes, then validate. Raises :class:`DetectorError`."""
        missing = [k for k in REQUIRED_KEYS if k not in arrays]
        if missing:
            raise DetectorError(missing[0], "missing")
        unknown = sorted(set(arrays) - set(ALL_KEYS))
        if unknown:
            raise DetectorError(unknown[0], "unknown key")
        present = [k for k in REEMISSION_KEYS if k in arrays]
        if present and len(present) != len(REEMISSION_KEYS):
            absent = [k for k in REEMISSION_KEYS if k not in arrays]
            raise DetectorError(absent[0], f"re-emission keys must be given all together: have {present}, missing {absent}")
        kw = {}
        for f in fields(cls):
            if f.name not in arrays:
                continue
            a = np.asarray(arrays[f.name])
            kw[f.name] = _coerce(f.name, a)
        det = cls(**kw)
        det.validate()
        return det

    # ----------------------------------------------------------- validation
    def validate(self) -> None:
        """Check shapes, index ranges, finiteness and probabilities.

        Raises :class:`DetectorError` naming the first offending key.
        """
        V = _shape(self, "vertices", 2, last=3)[0]
        T = _shape(self, "triangles", 2, last=3)[0]
        if V == 0:
            raise DetectorError("vertices", "empty")
        if T == 0:
            raise DetectorError("triangles", "empty")
        _finite(self, "vertices")
        _in_range(self, "triangles", 0, V - 1)
        W = _shape(self, "wavelength", 1)[0]
        if W == 0:
            raise DetectorError("wavelength", "empty")
        _finite(self, "wavelength")
        if W > 1 and not np.all(np.diff(self.wavelength) > 0):
            raise DetectorError("wavelength", "must be strictly increasing")
        if self.wavelength[0] <= 0:
            raise DetectorError("wavelength", "must be positive")
        M = _shape(self, "material_names", 1)[0]
        if M == 0:
            raise DetectorError("material_names", "empty")
        K = _shape(self, "surface_names", 1)[0]
        for key in ("inner_material", "outer_material", "surface", "solid"):
            if _shape(self, key, 1)[0] != T:
                raise DetectorError(key, f"length {getattr(self, key).shape[0]} != number of triangles {T}")
        _in_range(self, "inner_material", 0, M - 1)
        _in_range(self, "outer_material", 0, M - 1)
        _in_range(self, "surface", -1, K - 1)
        S = _shape(self, "solid_channel", 1)[0]
        if S == 0:
            raise DetectorError("solid_channel", "empty")
        _in_range(self, "solid", 0, S - 1)
        C = _shape(self, "channel_position", 2, last=3)[0]
        _finite(self, "channel_position")
        if _shape(self, "channel_type", 1)[0] != C:
            raise DetectorError("channel_type", f"length {self.channel_type.shape[0]} != number of channels {C}")
        _in_range(self, "solid_channel", -1, C - 1)
        for key in ("material_refractive_index", "material_absorption_length", "material_scattering_length"):
            _table(self, key, M, W)
            if np.any(getattr(self, key) <= 0):
                raise DetectorError(key, "must be > 0")
        for key in ("surface_detect", "surface_absorb", "surface_reflect_diffuse", "surface_reflect_specular"):
            _table(self, key, K, W)
            _probability(self, key)
        if K:
            total = self.surface_detect + self.surface_absorb + self.surface_reflect_diffuse + self.surface_reflect_specular
            bad = np.argwhere(total > 1 + 1e-5)
            if len(bad):
                k, w = bad[0]
                raise DetectorError(
                    "surface_detect+surface_absorb+surface_reflect_diffuse+surface_reflect_specular",
                    f"detect+absorb+reflect_diffuse+reflect_specular = {total[k, w]:.6g} > 1 "
                    f"for surface {str(self.surface_names[k])!r} at {self.wavelength[w]:g} nm",
                )
        if self.has_reemission:
            _table(self, "material_reemission_prob", M, W)
            _probability(self, "material_reemission_prob")
            _table(self, "material_reemission_wavelength_cdf", M, W)
            _cdf(self, "material_reemission_wavelength_cdf", self.material_reemission_prob)
            R = _shape(self, "reemission_time", 1)[0]
            if R < 2:
                raise DetectorError("reemission_time", "needs at least 2 points")
            _finite(self, "reemission_time")
            if not np.all(np.diff(self.reemission_time) > 0) or self.reemission_time[0] < 0:
                raise DetectorError("reemission_time", "must be non-negative and strictly increasing")
            _table(self, "material_reemission_time_cdf", M, R)
            _cdf(self, "material_reemission_time_cdf", self.material_reemission_prob)


_DTYPES = {
    "vertices": np.float32,
    "triangles": np.int32,
    "inner_material": np.int32,
    "outer_material": np.int32,
    "surface": np.int32,
    "solid": np.int32,
    "solid_channel": np.int32,
    "channel_position": np.float32,
    "channel_type": np.int32,
    "reemission_time": np.float32,
    "wavelength": np.float32,
}


def _coerce(key: str, a: np.ndarray) -> np.ndarray:
    if key.endswith("_names"):
        if a.dtype.kind not in "U":
            raise DetectorError(key, f"must be an array of str, got dtype {a.dtype}")
        return a
    want = _DTYPES.get(key, np.float32)
    if a.dtype.kind not in "iuf" or (want is np.int32 and a.dtype.kind == "f"):
        raise DetectorError(key, f"has dtype {a.dtype}, expected {np.dtype(want).name}")
    if want is np.int32 and a.size and (a.max() > np.iinfo(np.int32).max or a.min() < np.iinfo(np.int32).min):
        raise DetectorError(key, "values do not fit in int32")
    return np.ascontiguousarray(a, dtype=want)


def _shape(det, key, ndim, last=None):
    a = getattr(det, key)
    if a.ndim != ndim or (last is not None and a.shape[-1] != last):
        want = f"[N, {last}]" if last is not None else ("[N]" if ndim == 1 else f"{ndim}-d")
        raise DetectorError(key, f"shape {a.shape}, expected {want}")
    return a.shape


def _finite(det, key):
    if not np.all(np.isfinite(getattr(det, key))):
        raise DetectorError(key, "contains non-finite values")


def _in_range(det, key, lo, hi):
    a = getattr(det, key)
    if a.size and (a.min() < lo or a.max() > hi):
        bad = a[(a < lo) | (a > hi)].flat[0]
        raise DetectorError(key, f"index {bad} out of range [{lo}, {hi}]")


def _table(det, key, rows, cols):
    a = getattr(det, key)
    if a.shape != (rows, cols):
        raise DetectorError(key, f"shape {a.shape}, expected ({rows}, {cols})")
    _finite(det, key)


def _probability(det, key):
    a = getattr(det, key)
    if a.size and (a.min() < 0 or a.max() > 1):
        raise DetectorError(key, "probabilities must lie in [0, 1]")


def _cdf(det, key, prob):
    a = getattr(det, key)
    _probability(det, key)
    if a.shape[1] > 1 and np.any(np.diff(a, axis=1) < 0):
        raise DetectorError(key, "CDF must be non-decreasing")
    emitting = np.any(prob > 0, axis=1)
    if np.any(np.abs(a[emitting, -1] - 1) > 1e-4):
        raise DetectorError(key, "CDF must end at 1 for every material with re-emission")
