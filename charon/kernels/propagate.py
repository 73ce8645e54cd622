"""The propagation loop of one photon (PHYSICS.md, "One step of the propagation loop").

``propagate_photon`` runs one photon to a terminal state or ``max_steps``
and writes its final state back in place. It owns no launch logic: the CPU
engine calls it from a ``prange`` loop, the CUDA engine from a kernel, each
providing the per-photon scratch (traversal stack, RNG state).
"""

from __future__ import annotations

import math

import numpy as np

from ..photons import (
    BULK_ABSORB,
    BULK_REEMIT,
    NAN_ABORT,
    NO_HIT,
    RAYLEIGH_SCATTER,
    REFLECT_DIFFUSE,
    REFLECT_SPECULAR,
    SURFACE_ABSORB,
    SURFACE_DETECT,
)
from .physics import SPEED_OF_LIGHT


def make_propagate(jit, k):
    """``k`` is the namespace of already-built device functions (see :func:`charon.kernels.build`)."""
    rng_init = k.rng_init
    uniform = k.uniform
    nearest_hit = k.nearest_hit
    interp_grid = k.interp_grid
    sample_cdf = k.sample_cdf
    normalize = k.normalize
    cross = k.cross
    isotropic = k.isotropic
    random_transverse = k.random_transverse
    rayleigh = k.rayleigh
    lambertian = k.lambertian
    mirror = k.mirror
    fresnel = k.fresnel

    @jit
    def propagate_photon(
        i,
        table,  # [11, n] float32 photon table, updated in place
        flags,  # [n] uint32, updated in place
        last_hit,  # [n] int32 out: BVH-order index of the last triangle hit, or -1
        slot,  # [n] int32
        event_id,  # [E] uint32
        first_index,  # [E] uint32
        offsets,  # [E+1] int64
        seed,
        max_steps,
        node_lo,
        node_hi,
        node_first,
        node_count,
        v0,
        e1,
        e2,
        tri_inner,  # [T] int32, BVH order
        tri_outer,  # [T] int32, BVH order
        tri_surface,  # [T] int32, BVH order
        mat_n,  # [M, 188] refractive index on the standard grid
        mat_abs,  # [M, 188] mm
        mat_sca,  # [M, 188] mm
        reem_prob,  # [M, 188]
        reem_wl_cdf,  # [M, 188] CDF over grid_wl
        grid_wl,  # [188] nm
        reem_t,  # [R] ns
        reem_t_cdf,  # [M, R]
        surf_detect,  # [K, 188]
        surf_absorb,
        surf_rdiff,
        surf_rspec,
        stack,
        stack_t,
        rng,
    ):
        s = slot[i]
        rng_init(rng, seed, event_id[s], first_index[s] + (i - offsets[s]))
        px = float(table[0, i])
        py = float(table[1, i])
        pz = float(table[2, i])
        dx = float(table[3, i])
        dy = float(table[4, i])
        dz = float(table[5, i])
        ex = float(table[6, i])
        ey = float(table[7, i])
        ez = float(table[8, i])
        wl = float(table[9, i])
        t = float(table[10, i])
        fl = np.int64(flags[i])
        last = -1
        # Clients send unit vectors up to float32 rounding; distances assume exactly unit.
        dx, dy, dz = normalize(dx, dy, dz)
        ex, ey, ez = normalize(ex, ey, ez)
        for _ in range(max_steps):
            if (
                math.isnan(px)
                or math.isnan(py)
                or math.isnan(pz)
                or math.isnan(dx)
                or math.isnan(dy)
                or math.isnan(dz)
            ):
                fl |= NO_HIT | NAN_ABORT
                break
            tri, dist = nearest_hit(
                px, py, pz, dx, dy, dz, last, node_lo, node_hi, node_first, node_count, v0, e1, e2, stack, stack_t
            )
            if tri < 0:
                fl |= NO_HIT
                break
            # Right-hand normal cross(v1-v0, v2-v1) == cross(e1, e2): points to the outer side.
            nx, ny, nz = cross(e1[tri, 0], e1[tri, 1], e1[tri, 2], e2[tri, 0], e2[tri, 1], e2[tri, 2])
            nx, ny, nz = normalize(nx, ny, nz)
            if nx * dx + ny * dy + nz * dz < 0.0:  # arriving from the outer side
                m1 = tri_outer[tri]
                m2 = tri_inner[tri]
            else:  # from the inner side: flip so n points back into the incoming medium
                m1 = tri_inner[tri]
                m2 = tri_outer[tri]
                nx = -nx
                ny = -ny
                nz = -nz
            # --- bulk: absorption / scattering in material1 along the leg
            n1 = interp_grid(mat_n, m1, wl)
            d_abs = -interp_grid(mat_abs, m1, wl) * math.log(uniform(rng))
            d_sca = -interp_grid(mat_sca, m1, wl) * math.log(uniform(rng))
            if d_abs <= d_sca and d_abs <= dist:
                px += d_abs * dx
                py += d_abs * dy
                pz += d_abs * dz
                t += d_abs * n1 / SPEED_OF_LIGHT
                last = -1
                p_re = interp_grid(reem_prob, m1, wl)
                if p_re > 0.0 and uniform(rng) < p_re:
                    wl = sample_cdf(grid_wl, reem_wl_cdf, m1, uniform(rng))
                    t += sample_cdf(reem_t, reem_t_cdf, m1, uniform(rng))
                    dx, dy, dz = isotropic(uniform(rng), uniform(rng))
                    ex, ey, ez = random_transverse(dx, dy, dz, uniform(rng))
                    fl |= BULK_REEMIT
                    continue
                fl |= BULK_ABSORB
                break
            if d_sca < d_abs and d_sca <= dist:
                px += d_sca * dx
                py += d_sca * dy
                pz += d_sca * dz
                t += d_sca * n1 / SPEED_OF_LIGHT
                last = -1
                dx, dy, dz, ex, ey, ez = rayleigh(dx, dy, dz, ex, ey, ez, uniform(rng), uniform(rng), uniform(rng))
                fl |= RAYLEIGH_SCATTER
                continue
            px += dist * dx
            py += dist * dy
            pz += dist * dz
            t += dist * n1 / SPEED_OF_LIGHT
            last = tri
            # --- optical surface (default model)
            sf = tri_surface[tri]
            if sf >= 0:
                a = interp_grid(surf_absorb, sf, wl)
                d = interp_grid(surf_detect, sf, wl)
                rd = interp_grid(surf_rdiff, sf, wl)
                rs = interp_grid(surf_rspec, sf, wl)
                u = uniform(rng)
                if u < a:
                    fl |= SURFACE_ABSORB
                    break
                if u < a + d:
                    fl |= SURFACE_DETECT
                    break
                if u < a + d + rd:
                    dx, dy, dz = lambertian(nx, ny, nz, uniform(rng), uniform(rng))
                    ex, ey, ez = random_transverse(dx, dy, dz, uniform(rng))
                    fl |= REFLECT_DIFFUSE
                    continue
                if u < a + d + rd + rs:
                    dx, dy, dz = mirror(dx, dy, dz, nx, ny, nz)
                    ex, ey, ez = mirror(ex, ey, ez, nx, ny, nz)
                    fl |= REFLECT_SPECULAR
                    continue
            # --- dielectric boundary
            n2 = interp_grid(mat_n, m2, wl)
            reflected, dx, dy, dz, ex, ey, ez = fresnel(
                dx, dy, dz, ex, ey, ez, nx, ny, nz, n1, n2, uniform(rng), uniform(rng)
            )
            if reflected:
                fl |= REFLECT_SPECULAR
        table[0, i] = px
        table[1, i] = py
        table[2, i] = pz
        table[3, i] = dx
        table[4, i] = dy
        table[5, i] = dz
        table[6, i] = ex
        table[7, i] = ey
        table[8, i] = ez
        table[9, i] = wl
        table[10, i] = t
        flags[i] = fl
        last_hit[i] = last

    return propagate_photon
