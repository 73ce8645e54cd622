"""Optical processes, one device function each (PHYSICS.md, "Processes" and step 5).

All functions take and return scalars (vectors as 3 floats) so they compile
unchanged for the CPU and for CUDA; random numbers come in as arguments, so
each function is a pure function and can be checked against the numpy
reference in :mod:`charon.kernels.reference`.
"""

from __future__ import annotations

import math

from ..geometry.optics import GRID_SIZE, GRID_START_NM, GRID_STEP_NM

TWO_PI = 2.0 * math.pi
SPEED_OF_LIGHT = 299.792458  # mm / ns


def make_physics(jit):
    @jit
    def interp_grid(table, row, wavelength):
        """Linear interpolation of ``table[row, :]`` on the standard 5 nm grid, clamped."""
        x = (wavelength - GRID_START_NM) / GRID_STEP_NM
        if x <= 0.0:
            return float(table[row, 0])
        if x >= GRID_SIZE - 1:
            return float(table[row, GRID_SIZE - 1])
        i = int(x)
        f = x - i
        return float(table[row, i]) * (1.0 - f) + float(table[row, i + 1]) * f

    @jit
    def sample_cdf(x, cdf, row, u):
        """Inverse-CDF sample of ``cdf[row, :]`` tabulated at ``x[:]``, linear between points."""
        n = x.shape[0]
        lo = 0
        hi = n - 1
        if u <= cdf[row, 0]:
            return float(x[0])
        while hi - lo > 1:  # smallest hi with cdf[hi] >= u
            mid = (lo + hi) // 2
            if cdf[row, mid] >= u:
                hi = mid
            else:
                lo = mid
        c0 = float(cdf[row, lo])
        c1 = float(cdf[row, hi])
        f = (u - c0) / (c1 - c0) if c1 > c0 else 0.0
        return float(x[lo]) + f * (float(x[hi]) - float(x[lo]))

    @jit
    def normalize(x, y, z):
        inv = 1.0 / math.sqrt(x * x + y * y + z * z)
        return x * inv, y * inv, z * inv

    @jit
    def cross(ax, ay, az, bx, by, bz):
        return ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx

    @jit
    def any_perpendicular(ax, ay, az):
        """A unit vector perpendicular to unit vector a."""
        if abs(ax) < 0.9:
            px, py, pz = cross(ax, ay, az, 1.0, 0.0, 0.0)
        else:
            px, py, pz = cross(ax, ay, az, 0.0, 1.0, 0.0)
        return normalize(px, py, pz)

    @jit
    def around(ax, ay, az, cos_t, phi):
        """Unit vector at polar angle acos(cos_t) about unit axis a, azimuth phi."""
        bx, by, bz = any_perpendicular(ax, ay, az)
        cx, cy, cz = cross(ax, ay, az, bx, by, bz)
        sin_t = math.sqrt(max(0.0, 1.0 - cos_t * cos_t))
        cp = math.cos(phi) * sin_t
        sp = math.sin(phi) * sin_t
        return (
            cos_t * ax + cp * bx + sp * cx,
            cos_t * ay + cp * by + sp * cy,
            cos_t * az + cp * bz + sp * cz,
        )

    @jit
    def isotropic(u1, u2):
        cos_t = 1.0 - 2.0 * u1
        sin_t = math.sqrt(max(0.0, 1.0 - cos_t * cos_t))
        phi = TWO_PI * u2
        return sin_t * math.cos(phi), sin_t * math.sin(phi), cos_t

    @jit
    def random_transverse(dx, dy, dz, u):
        """Random unit polarization perpendicular to direction d."""
        bx, by, bz = any_perpendicular(dx, dy, dz)
        cx, cy, cz = cross(dx, dy, dz, bx, by, bz)
        phi = TWO_PI * u
        c = math.cos(phi)
        s = math.sin(phi)
        return c * bx + s * cx, c * by + s * cy, c * bz + s * cz

    @jit
    def rayleigh(dx, dy, dz, ex, ey, ez, u1, u2, u3):
        """Rayleigh scatter: new (direction, polarization).

        cos(theta) to the old polarization has pdf 3/4 (1 - c^2) (inverse CDF in
        closed form, as Chroma); the new polarization is the old one's part
        transverse to the new direction.
        """
        c = 2.0 * math.cos((math.acos(1.0 - 2.0 * u1) - TWO_PI) / 3.0)
        c = min(1.0, max(-1.0, c))
        nx, ny, nz = around(ex, ey, ez, c, TWO_PI * u2)
        nx, ny, nz = normalize(nx, ny, nz)
        px = ex - c * nx
        py = ey - c * ny
        pz = ez - c * nz
        norm = math.sqrt(px * px + py * py + pz * pz)
        if norm < 1e-6:
            px, py, pz = random_transverse(nx, ny, nz, u3)
        else:
            px /= norm
            py /= norm
            pz /= norm
        return nx, ny, nz, px, py, pz

    @jit
    def lambertian(nx, ny, nz, u1, u2):
        """Diffuse reflection direction about unit normal n (pdf of cos = 2 cos)."""
        x, y, z = around(nx, ny, nz, math.sqrt(u1), TWO_PI * u2)
        return normalize(x, y, z)

    @jit
    def mirror(dx, dy, dz, nx, ny, nz):
        """Reflect vector d about the plane with unit normal n."""
        k = 2.0 * (dx * nx + dy * ny + dz * nz)
        return dx - k * nx, dy - k * ny, dz - k * nz

    @jit
    def fresnel(dx, dy, dz, ex, ey, ez, nx, ny, nz, n1, n2, u_pol, u_refl):
        """Dielectric boundary with polarization (PHYSICS.md step 5).

        ``n`` points back into the incoming medium. Returns
        (reflected, new direction, new polarization).
        """
        cos_i = min(1.0, -(dx * nx + dy * ny + dz * nz))
        theta_i = math.acos(cos_i)
        sin_t = math.sin(theta_i) * n1 / n2
        tir = sin_t > 1.0
        theta_t = math.asin(min(sin_t, 1.0))
        px, py, pz = cross(dx, dy, dz, nx, ny, nz)
        norm = math.sqrt(px * px + py * py + pz * pz)
        if norm < 1e-6:
            px, py, pz = normalize(ex, ey, ez)
        else:
            px /= norm
            py /= norm
            pz /= norm
        proj = ex * px + ey * py + ez * pz
        s_pol = u_pol < proj * proj
        # At exactly normal incidence both ratios are 0/0 = NaN and the photon
        # transmits (Chroma's behaviour, kept for equivalence).
        if s_pol:
            r = -math.sin(theta_i - theta_t) / math.sin(theta_i + theta_t) if theta_i + theta_t != 0.0 else math.nan
        else:
            den = math.tan(theta_i + theta_t)
            r = math.tan(theta_i - theta_t) / den if den != 0.0 else math.nan
        reflect = tir or u_refl < r * r
        if reflect:
            ox, oy, oz = mirror(dx, dy, dz, nx, ny, nz)
        else:
            eta = n1 / n2
            k = eta * cos_i - math.cos(theta_t)
            ox, oy, oz = normalize(eta * dx + k * nx, eta * dy + k * ny, eta * dz + k * nz)
        if s_pol:
            qx, qy, qz = px, py, pz
        else:
            cx, cy, cz = cross(px, py, pz, ox, oy, oz)
            qx, qy, qz = normalize(cx, cy, cz)
        return reflect, ox, oy, oz, qx, qy, qz

    return (
        interp_grid,
        sample_cdf,
        normalize,
        cross,
        isotropic,
        random_transverse,
        rayleigh,
        lambertian,
        mirror,
        fresnel,
    )
