"""Bounding-volume hierarchy: host-side build and device-side nearest-hit traversal.

Build (numpy, fully vectorised, O(T log T) from one sort): triangles are ordered
along a 63-bit Morton curve of their box centres, grouped ``leaf_size`` at a
time into leaves, and leaves grouped ``branch`` at a time into parents, level by
level up to one root (the wide, Morton-ordered layout Chroma also uses). Nodes
are stored root first, children of a node contiguous.

Node encoding:
    node_count[n] > 0: internal, children are nodes node_first[n] .. +count-1
    node_count[n] < 0: leaf, triangles node_first[n] .. +(-count)-1 in BVH order

Triangles are stored in BVH order with their original index in ``tri_id``;
the traversal returns BVH-order positions, so excluding the last-hit
triangle costs no extra load.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .intersect import BOX_MISS, NO_HIT

STACK_SIZE = 64  # entries of the per-ray traversal stack
_INV_BIG = 1e30  # stands in for 1/0 in the slab test; float32 holds it
_TINY = 1e-30  # direction components below this are taken as 0: their inverse would overflow float32


@dataclass(frozen=True)
class BVH:
    node_lo: np.ndarray  # [N, 3] float32, mm, box lower corners
    node_hi: np.ndarray  # [N, 3] float32, mm, box upper corners
    node_first: np.ndarray  # [N] int32, first child node or first triangle
    node_count: np.ndarray  # [N] int32, >0 children, <0 -triangles (leaf)
    tri_v0: np.ndarray  # [T, 3] float32, mm, first vertex, BVH order
    tri_e1: np.ndarray  # [T, 3] float32, mm, v1 - v0
    tri_e2: np.ndarray  # [T, 3] float32, mm, v2 - v0
    tri_id: np.ndarray  # [T] int32, original triangle index
    max_stack: int  # deepest the traversal stack can get
    build_seconds: float

    @property
    def n_nodes(self) -> int:
        return int(self.node_count.shape[0])


def _spread_bits(x: np.ndarray) -> np.ndarray:
    """Insert two zero bits between each of the low 21 bits (for 3-d Morton codes)."""
    x = x.astype(np.uint64) & np.uint64(0x1FFFFF)
    x = (x | (x << np.uint64(32))) & np.uint64(0x1F00000000FFFF)
    x = (x | (x << np.uint64(16))) & np.uint64(0x1F0000FF0000FF)
    x = (x | (x << np.uint64(8))) & np.uint64(0x100F00F00F00F00F)
    x = (x | (x << np.uint64(4))) & np.uint64(0x10C30C30C30C30C3)
    x = (x | (x << np.uint64(2))) & np.uint64(0x1249249249249249)
    return x


def morton_codes(points: np.ndarray) -> np.ndarray:
    """[n] uint64 Morton codes of [n, 3] points, 21 bits per axis over their bounding box."""
    lo = points.min(axis=0)
    span = np.maximum(points.max(axis=0) - lo, 1e-30)
    q = np.clip(((points - lo) / span) * (2**21 - 1), 0, 2**21 - 1).astype(np.uint64)
    return (_spread_bits(q[:, 0]) << np.uint64(2)) | (_spread_bits(q[:, 1]) << np.uint64(1)) | _spread_bits(q[:, 2])


def build_bvh(vertices: np.ndarray, triangles: np.ndarray, leaf_size: int = 4, branch: int = 4) -> BVH:
    """Build the BVH of a mesh. ``vertices`` [V, 3] mm, ``triangles`` [T, 3] indices."""
    t_start = time.perf_counter()
    vertices = np.asarray(vertices, dtype=np.float32)
    triangles = np.asarray(triangles, dtype=np.int64)
    T = len(triangles)
    v0 = vertices[triangles[:, 0]]
    v1 = vertices[triangles[:, 1]]
    v2 = vertices[triangles[:, 2]]
    lo = np.minimum(np.minimum(v0, v1), v2)
    hi = np.maximum(np.maximum(v0, v1), v2)
    order = np.argsort(morton_codes(0.5 * (lo + hi)), kind="stable")
    lo, hi = lo[order], hi[order]
    # Pad boxes a little: the edge tolerance of the triangle test reaches just outside them.
    pad = 1e-5 + 1e-6 * np.abs(np.concatenate([lo, hi])).max()

    starts = np.arange(0, T, leaf_size)
    level_lo = np.minimum.reduceat(lo, starts, axis=0) - pad
    level_hi = np.maximum.reduceat(hi, starts, axis=0) + pad
    level_first = starts
    level_count = -np.diff(np.append(starts, T))  # negative: leaf
    levels = [(level_lo, level_hi, level_first, level_count)]
    while len(levels[-1][0]) > 1:
        clo, chi = levels[-1][0], levels[-1][1]
        n = len(clo)
        starts = np.arange(0, n, branch)
        levels.append(
            (
                np.minimum.reduceat(clo, starts, axis=0),
                np.maximum.reduceat(chi, starts, axis=0),
                starts,
                np.diff(np.append(starts, n)),
            )
        )
    levels.reverse()  # root first
    offsets = np.cumsum([0] + [len(lv[0]) for lv in levels])
    node_first = []
    for i, (_, _, first, count) in enumerate(levels):
        # Internal nodes point into the next level: shift to its global offset.
        node_first.append(first + (offsets[i + 1] if i + 1 < len(levels) else 0))
    depth = len(levels)
    bvh = BVH(
        node_lo=np.ascontiguousarray(np.concatenate([lv[0] for lv in levels]), dtype=np.float32),
        node_hi=np.ascontiguousarray(np.concatenate([lv[1] for lv in levels]), dtype=np.float32),
        node_first=np.concatenate(node_first).astype(np.int32),
        node_count=np.concatenate([lv[3] for lv in levels]).astype(np.int32),
        tri_v0=np.ascontiguousarray(v0[order]),
        tri_e1=np.ascontiguousarray((v1 - v0)[order]),
        tri_e2=np.ascontiguousarray((v2 - v0)[order]),
        tri_id=order.astype(np.int32),
        max_stack=(branch - 1) * depth + 1,
        build_seconds=0.0,
    )
    if bvh.max_stack > STACK_SIZE:
        raise ValueError(f"BVH too deep for the traversal stack ({bvh.max_stack} > {STACK_SIZE})")
    object.__setattr__(bvh, "build_seconds", time.perf_counter() - t_start)
    return bvh


def make_traverse(jit, ray_triangle, ray_box):
    @jit
    def inverse_direction(d):
        """float32 1/d, with a finite stand-in where d is 0 or too small for float32 to hold 1/d.

        The stand-in's sign does not matter: along an axis the ray does not move, the slab is
        either always or never crossed, and the slab test takes min/max of its two distances."""
        if abs(d) < _TINY:
            return np.float32(_INV_BIG)
        return np.float32(1.0 / d)

    @jit
    def nearest_hit(ox, oy, oz, dx, dy, dz, last, node_lo, node_hi, node_first, node_count, v0, e1, e2, stack, stack_t):
        """Nearest triangle (BVH-order index, distance) along the ray, skipping ``last``; (-1, inf) if none.

        ``stack`` int32 [STACK_SIZE] and ``stack_t`` float32 [STACK_SIZE] are scratch owned by the caller.
        Children are visited nearest box first so the best distance shrinks early. Boxes are tested
        in float32 (see :mod:`charon.kernels.intersect`), triangles in float64.
        """
        ix = inverse_direction(dx)
        iy = inverse_direction(dy)
        iz = inverse_direction(dz)
        fx = np.float32(ox)
        fy = np.float32(oy)
        fz = np.float32(oz)
        best_t = NO_HIT
        best = -1
        t_root = ray_box(fx, fy, fz, ix, iy, iz, node_lo, node_hi, 0)
        if t_root == BOX_MISS:
            return best, best_t
        stack[0] = 0
        stack_t[0] = t_root
        sp = 1
        while sp > 0:
            sp -= 1
            if stack_t[sp] >= best_t:
                continue
            nd = stack[sp]
            c = node_count[nd]
            f = node_first[nd]
            if c < 0:
                for k in range(f, f - c):
                    if k == last:
                        continue
                    t = ray_triangle(ox, oy, oz, dx, dy, dz, v0, e1, e2, k)
                    if t < best_t:
                        best_t = t
                        best = k
            else:
                base = sp
                for ch in range(f, f + c):
                    tb = ray_box(fx, fy, fz, ix, iy, iz, node_lo, node_hi, ch)
                    if tb < best_t:
                        # insertion keeps [base, sp) sorted far-to-near: nearest popped first
                        j = sp
                        while j > base and stack_t[j - 1] < tb:
                            stack[j] = stack[j - 1]
                            stack_t[j] = stack_t[j - 1]
                            j -= 1
                        stack[j] = ch
                        stack_t[j] = tb
                        sp += 1
        return best, best_t

    return nearest_hit


def brute_force_nearest(bvh: BVH, origin: np.ndarray, direction: np.ndarray, last: int = -1):
    """Reference: nearest hit by testing every triangle (numpy, float64). Returns (k, t)."""
    from .reference import ray_triangles_ref

    t = ray_triangles_ref(origin, direction, bvh.tri_v0, bvh.tri_e1, bvh.tri_e2)
    if 0 <= last < len(t):
        t[last] = math.inf
    k = int(np.argmin(t))
    return (k, float(t[k])) if np.isfinite(t[k]) else (-1, math.inf)
