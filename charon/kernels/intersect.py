"""Ray-primitive tests: Möller–Trumbore triangles and slab boxes.

Tolerances follow Chroma (PHYSICS.md): barycentric edge tolerance 1e-6 and
hits closer than 1e-6 mm ignored, so a photon sitting on the triangle it just
crossed does not hit it again.

The triangle test is float64: its distance is where the photon goes. The slab
test only decides which boxes to open, and runs in float32 on float32 inputs
(the box corners are stored so): a traversal makes several box tests per
triangle test, and on a GPU each float64 one also pays six float32-to-float64
conversions, which run at a quarter of float64's rate. It stays exact enough
to open every box it must: the boxes are padded (``bvh.build_bvh``) by more
than the float32 rounding of ``corner - origin`` at the detector's scale
(pad ~1e-6 of the largest coordinate, rounding ~6e-8 of it), and both the
slab distances and the pad scale with the same ``1 / |direction component|``.
"""

from __future__ import annotations

import math

import numpy as np

EDGE_TOL = 1e-6  # barycentric slack at triangle edges
T_MIN = 1e-6  # mm: nearer hits are ignored
NO_HIT = math.inf
BOX_MISS = np.float32(np.inf)  # the slab test's miss, float32 so its result stays float32
_F32_ZERO = np.float32(0.0)


def make_intersect(jit):
    @jit
    def ray_triangle(ox, oy, oz, dx, dy, dz, v0, e1, e2, k):
        """Distance along the ray to triangle ``k`` (rows of v0, e1=v1-v0, e2=v2-v0), or inf."""
        e1x = e1[k, 0]
        e1y = e1[k, 1]
        e1z = e1[k, 2]
        e2x = e2[k, 0]
        e2y = e2[k, 1]
        e2z = e2[k, 2]
        # p = d x e2
        px = dy * e2z - dz * e2y
        py = dz * e2x - dx * e2z
        pz = dx * e2y - dy * e2x
        det = e1x * px + e1y * py + e1z * pz
        if det == 0.0:
            return NO_HIT
        inv = 1.0 / det
        sx = ox - v0[k, 0]
        sy = oy - v0[k, 1]
        sz = oz - v0[k, 2]
        u = (sx * px + sy * py + sz * pz) * inv
        if u < -EDGE_TOL or u > 1.0 + EDGE_TOL:
            return NO_HIT
        # q = s x e1
        qx = sy * e1z - sz * e1y
        qy = sz * e1x - sx * e1z
        qz = sx * e1y - sy * e1x
        v = (dx * qx + dy * qy + dz * qz) * inv
        if v < -EDGE_TOL or u + v > 1.0 + EDGE_TOL:
            return NO_HIT
        t = (e2x * qx + e2y * qy + e2z * qz) * inv
        if t <= T_MIN:
            return NO_HIT
        return t

    @jit
    def ray_box(ox, oy, oz, ix, iy, iz, lo, hi, n):
        """float32 entry distance of the ray into box ``n`` (clamped at 0), or inf if missed.

        Every argument is float32 (``lo``, ``hi`` [N, 3] float32, mm): ``ix, iy, iz`` are the
        inverse direction components, finite stand-ins for 1/0 (``bvh.inverse_direction``).
        """
        t0 = (lo[n, 0] - ox) * ix
        t1 = (hi[n, 0] - ox) * ix
        tmin = min(t0, t1)
        tmax = max(t0, t1)
        t0 = (lo[n, 1] - oy) * iy
        t1 = (hi[n, 1] - oy) * iy
        tmin = max(tmin, min(t0, t1))
        tmax = min(tmax, max(t0, t1))
        t0 = (lo[n, 2] - oz) * iz
        t1 = (hi[n, 2] - oz) * iz
        tmin = max(tmin, min(t0, t1))
        tmax = min(tmax, max(t0, t1))
        if tmax < _F32_ZERO or tmin > tmax:
            return BOX_MISS
        return max(tmin, _F32_ZERO)

    return ray_triangle, ray_box
