"""Plain numpy references of the device functions, vectorised over many inputs.

Written independently of the kernels (vector algebra with numpy, not the
scalar code paths), they are what the tests compare every kernel against.
"""

from __future__ import annotations

import numpy as np

from ..geometry.optics import STANDARD_GRID

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK = 0xFFFFFFFF


def philox4x32_ref(key, ctr):
    """Philox4x32-10 on arrays: ``key`` [n, 2], ``ctr`` [n, 4] -> [n, 4] uint32."""
    k = np.array(key, dtype=np.uint64).reshape(-1, 2).copy()
    c = np.array(ctr, dtype=np.uint64).reshape(-1, 4).copy()
    for _ in range(10):
        p0 = np.uint64(_M0) * c[:, 0]
        p1 = np.uint64(_M1) * c[:, 2]
        c = np.stack(
            [
                (p1 >> np.uint64(32)) ^ c[:, 1] ^ k[:, 0],
                p1 & np.uint64(_MASK),
                (p0 >> np.uint64(32)) ^ c[:, 3] ^ k[:, 1],
                p0 & np.uint64(_MASK),
            ],
            axis=1,
        )
        k = (k + np.array([_W0, _W1], dtype=np.uint64)) & np.uint64(_MASK)
    return c.astype(np.uint32)


def uniforms_ref(seed: int, event_id: int, photon_index: int, n: int) -> np.ndarray:
    """The first ``n`` uniforms of one photon's stream."""
    blocks = (n + 3) // 4
    ctr = np.zeros((blocks, 4), np.uint64)
    ctr[:, 0] = photon_index
    ctr[:, 1] = np.arange(blocks)
    words = philox4x32_ref(np.tile([seed, event_id], (blocks, 1)), ctr).reshape(-1)[:n]
    return (words.astype(np.float64) + 1.0) * 2.0**-32


def ray_triangles_ref(origin, direction, v0, e1, e2, edge_tol=1e-6, t_min=1e-6) -> np.ndarray:
    """Distance from one ray to each of many triangles (inf where missed), float64."""
    o = np.asarray(origin, np.float64)
    d = np.asarray(direction, np.float64)
    v0 = np.asarray(v0, np.float64)
    e1 = np.asarray(e1, np.float64)
    e2 = np.asarray(e2, np.float64)
    p = np.cross(d, e2)
    det = np.einsum("ij,ij->i", e1, p)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # det ~ 0: inf, masked below
        inv = 1.0 / det
        s = o - v0
        u = np.einsum("ij,ij->i", s, p) * inv
        q = np.cross(s, e1)
        v = (q @ d) * inv
        t = np.einsum("ij,ij->i", e2, q) * inv
        # u + v is inf - inf for a ray parallel to a triangle's plane (det == 0): masked by det != 0
        ok = (
            (det != 0)
            & (u >= -edge_tol)
            & (u <= 1 + edge_tol)
            & (v >= -edge_tol)
            & (u + v <= 1 + edge_tol)
            & (t > t_min)
        )
    return np.where(ok, t, np.inf)


def interp_grid_ref(table, row, wavelength):
    return np.interp(wavelength, STANDARD_GRID.astype(np.float64), np.asarray(table[row], np.float64))


def sample_cdf_ref(x, cdf_row, u):
    """Inverse CDF by linear interpolation (cdf strictly increasing where it matters)."""
    return np.interp(u, np.asarray(cdf_row, np.float64), np.asarray(x, np.float64))


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _basis(a):
    """Same perpendicular choice as the kernels: cross with x unless a is nearly along x."""
    ref = np.where(np.abs(a[:, :1]) < 0.9, [[1.0, 0, 0]], [[0, 1.0, 0]])
    b = _unit(np.cross(a, ref))
    return b, np.cross(a, b)


def around_ref(a, cos_t, phi):
    b, c = _basis(a)
    sin_t = np.sqrt(np.maximum(0, 1 - cos_t**2))
    return cos_t[:, None] * a + (np.cos(phi) * sin_t)[:, None] * b + (np.sin(phi) * sin_t)[:, None] * c


def isotropic_ref(u1, u2):
    c = 1 - 2 * u1
    s = np.sqrt(np.maximum(0, 1 - c * c))
    return np.stack([s * np.cos(2 * np.pi * u2), s * np.sin(2 * np.pi * u2), c], axis=1)


def random_transverse_ref(d, u):
    b, c = _basis(d)
    phi = 2 * np.pi * u
    return np.cos(phi)[:, None] * b + np.sin(phi)[:, None] * c


def rayleigh_ref(d, e, u1, u2, u3):
    c = np.clip(2 * np.cos((np.arccos(1 - 2 * u1) - 2 * np.pi) / 3), -1, 1)
    nd = _unit(around_ref(e, c, 2 * np.pi * u2))
    p = e - c[:, None] * nd
    norm = np.linalg.norm(p, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        pol = np.where((norm < 1e-6)[:, None], random_transverse_ref(nd, u3), p / norm[:, None])
    return nd, pol


def lambertian_ref(n, u1, u2):
    return _unit(around_ref(n, np.sqrt(u1), 2 * np.pi * u2))


def mirror_ref(d, n):
    return d - 2 * np.einsum("ij,ij->i", d, n)[:, None] * n


def fresnel_ref(d, e, n, n1, n2, u_pol, u_refl):
    """Returns (reflected [k] bool, new_dir [k,3], new_pol [k,3]); n points into the incoming medium."""
    cos_i = np.minimum(1.0, -np.einsum("ij,ij->i", d, n))
    ti = np.arccos(cos_i)
    sin_t = np.sin(ti) * n1 / n2
    tir = sin_t > 1
    tt = np.arcsin(np.minimum(sin_t, 1))
    ipn = np.cross(d, n)
    norm = np.linalg.norm(ipn, axis=1)
    ipn = np.where((norm < 1e-6)[:, None], _unit(e), ipn / np.where(norm < 1e-6, 1, norm)[:, None])
    s_pol = u_pol < np.einsum("ij,ij->i", e, ipn) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(s_pol, -np.sin(ti - tt) / np.sin(ti + tt), np.tan(ti - tt) / np.tan(ti + tt))
        reflect = tir | (u_refl < r * r)
    eta = n1 / n2
    k = eta * cos_i - np.cos(tt)
    refr = _unit(eta * d + k[:, None] * n)
    new_d = np.where(reflect[:, None], mirror_ref(d, n), refr)
    new_e = np.where(s_pol[:, None], ipn, _unit(np.cross(ipn, new_d)))
    return reflect, new_d, new_e


def fresnel_reflectance(theta_i, n1, n2, f_s):
    """Average reflectance f_s·Rs + (1 - f_s)·Rp (1 beyond the critical angle): the known answer."""
    sin_t = np.sin(theta_i) * n1 / n2
    if sin_t >= 1:
        return 1.0
    tt = np.arcsin(sin_t)
    rs = (np.sin(theta_i - tt) / np.sin(theta_i + tt)) ** 2
    rp = (np.tan(theta_i - tt) / np.tan(theta_i + tt)) ** 2
    return f_s * rs + (1 - f_s) * rp


def hit_offsets_ref(hit_channel, photon_offsets):
    """Per-event loop: what the scan-based demultiplexer must reproduce."""
    index, counts = [], []
    for a, b in zip(photon_offsets[:-1], photon_offsets[1:]):
        sel = [i for i in range(a, b) if hit_channel[i] >= 0]
        index += sel
        counts.append(len(sel))
    return np.array(index, np.int64), np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def photon_slots_ref(photon_offsets):
    """Each photon's slot: slot s repeated for its offsets[s + 1] - offsets[s] photons."""
    offsets = np.asarray(photon_offsets, np.int64)
    return np.repeat(np.arange(len(offsets) - 1, dtype=np.int32), np.diff(offsets))
