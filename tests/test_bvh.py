import math

import numba
import numpy as np
import pytest
import trimesh

from charon.kernels.bvh import STACK_SIZE, brute_force_nearest, build_bvh, morton_codes


def _random_soup(rng, n):
    centres = rng.uniform(-100, 100, size=(n, 1, 3))
    verts = (centres + rng.normal(scale=8.0, size=(n, 3, 3))).reshape(-1, 3)
    return verts.astype(np.float32), np.arange(3 * n).reshape(n, 3)


@pytest.fixture(scope="module")
def trace(cpu):
    nearest_hit = cpu.nearest_hit

    @numba.njit
    def trace(origins, dirs, last, lo, hi, first, count, v0, e1, e2):
        n = origins.shape[0]
        tri = np.empty(n, np.int64)
        dist = np.empty(n)
        stack = np.empty(STACK_SIZE, np.int32)
        stack_t = np.empty(STACK_SIZE, np.float32)
        for i in range(n):
            o = origins[i]
            d = dirs[i]
            tri[i], dist[i] = nearest_hit(o[0], o[1], o[2], d[0], d[1], d[2], last[i],
                                          lo, hi, first, count, v0, e1, e2, stack, stack_t)  # fmt: skip
        return tri, dist

    def run(bvh, origins, dirs, last=None):
        last = np.full(len(origins), -1, np.int64) if last is None else last
        return trace(origins, dirs, last, bvh.node_lo, bvh.node_hi, bvh.node_first, bvh.node_count,
                     bvh.tri_v0, bvh.tri_e1, bvh.tri_e2)  # fmt: skip

    return run


def _rays(rng, n, spread=150.0):
    o = rng.uniform(-spread, spread, size=(n, 3))
    d = rng.normal(size=(n, 3))
    return o, d / np.linalg.norm(d, axis=1, keepdims=True)


@pytest.mark.parametrize("n_tri,leaf,branch", [(1, 4, 4), (7, 4, 4), (500, 4, 4), (3000, 2, 8), (3000, 8, 2)])
def test_nearest_hit_matches_brute_force_on_random_soups(trace, rng, n_tri, leaf, branch):
    verts, tris = _random_soup(rng, n_tri)
    bvh = build_bvh(verts, tris, leaf_size=leaf, branch=branch)
    origins, dirs = _rays(rng, 400)
    # Aim half the rays at triangle centres so every mesh size gets hits.
    aim = verts[tris[rng.integers(0, n_tri, 200)]].mean(axis=1)
    dirs[:200] = (aim - origins[:200]) / np.linalg.norm(aim - origins[:200], axis=1, keepdims=True)
    got_k, got_t = trace(bvh, origins, dirs)
    n_hit = 0
    for i in range(len(origins)):
        k, t = brute_force_nearest(bvh, origins[i], dirs[i])
        if k < 0:
            assert got_k[i] == -1 and math.isinf(got_t[i])
        else:
            n_hit += 1
            assert got_t[i] == pytest.approx(t, rel=1e-9, abs=1e-9)
            # Ties between coincident triangles are allowed: same distance is what matters.
            assert got_k[i] == k or abs(brute_force_nearest(bvh, origins[i], dirs[i])[1] - got_t[i]) < 1e-9
    assert n_hit >= 150  # the test actually exercised hits


def test_last_hit_triangle_is_skipped_and_closed_mesh_is_exited(trace, rng):
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=500.0)
    bvh = build_bvh(mesh.vertices, mesh.faces)
    origins = np.zeros((300, 3))
    _, dirs = _rays(rng, 300)
    k1, t1 = trace(bvh, origins, dirs)
    assert np.all(k1 >= 0) and np.all((t1 > 490) & (t1 <= 500.001))
    # From the wall point, excluding the wall triangle, the ray going outward hits nothing.
    hit_points = origins + t1[:, None] * dirs
    k2, t2 = trace(bvh, hit_points, dirs, last=k1.astype(np.int64))
    assert np.all(k2 == -1)
    # Going back inward it crosses the sphere once more on the far side (distance ~ a chord).
    k3, t3 = trace(bvh, hit_points, -dirs, last=k1.astype(np.int64))
    assert np.all(k3 >= 0) and np.all(t3 > 900)
    for i in range(0, 300, 30):
        k, t = brute_force_nearest(bvh, hit_points[i], -dirs[i], last=int(k1[i]))
        assert t3[i] == pytest.approx(t, rel=1e-9)


def test_bvh_structure_covers_every_triangle_once(rng):
    verts, tris = _random_soup(rng, 1000)
    bvh = build_bvh(verts, tris)
    leaves = bvh.node_count < 0
    covered = np.concatenate([np.arange(f, f - c) for f, c in zip(bvh.node_first[leaves], bvh.node_count[leaves])])
    np.testing.assert_array_equal(np.sort(covered), np.arange(1000))
    np.testing.assert_array_equal(np.sort(bvh.tri_id), np.arange(1000))
    # Every node's box contains its children's boxes.
    for n in np.flatnonzero(~leaves):
        ch = slice(bvh.node_first[n], bvh.node_first[n] + bvh.node_count[n])
        assert np.all(bvh.node_lo[ch] >= bvh.node_lo[n]) and np.all(bvh.node_hi[ch] <= bvh.node_hi[n])
    assert bvh.max_stack <= STACK_SIZE


def test_morton_codes_order_nearby_points_together():
    pts = np.array([[0, 0, 0], [1, 1, 1], [0.01, 0, 0], [0.99, 1, 1]], float)
    order = np.argsort(morton_codes(pts))
    assert set(order[:2]) == {0, 2} and set(order[2:]) == {1, 3}



def test_float32_box_tests_open_every_box_at_detector_scale(trace, rng):
    """Boxes are tested in float32 (kernels/intersect.py). Separate triangles 9-10 m from the origin, rays
    from up to 19 m away aimed just inside a corner: the corner is where the triangle touches its leaf's
    box, so a box that float32 wrongly reports missed loses the only hit along the ray. Rays along the
    axes and with components too small for float32's inverse take the slab test's stand-ins."""
    n = 2000
    centres = rng.normal(size=(n, 3))
    centres *= rng.uniform(9000.0, 9500.0, size=(n, 1)) / np.linalg.norm(centres, axis=1, keepdims=True)
    verts = (centres[:, None, :] + rng.normal(scale=20.0, size=(n, 3, 3))).astype(np.float32)
    bvh = build_bvh(verts.reshape(-1, 3), np.arange(3 * n).reshape(n, 3))
    v = verts.astype(np.float64)
    pick = rng.integers(0, n, 400)
    eps = 10.0 ** rng.uniform(-7, -4, size=(400, 1))  # barycentric distance from the corner
    corner = rng.integers(0, 3, 400)
    w = np.full((400, 3), 0.0)
    w[:] = eps / 2
    w[np.arange(400), corner] = 1.0 - eps[:, 0]
    targets = np.einsum("ij,ijk->ik", w, v[pick])
    origins = -targets * rng.uniform(0.0, 1.0, size=(400, 1))  # through the centre: up to 19 m of ray
    dirs = (targets - origins) / np.linalg.norm(targets - origins, axis=1, keepdims=True)
    axes = np.repeat(np.concatenate([np.eye(3), -np.eye(3)]), 20, axis=0)  # components exactly 0
    ax_orig = v[pick[:120]].mean(axis=1) - 50.0 * axes  # 50 mm in front of a centroid, looking at it
    tiny = axes.copy()
    tiny[tiny == 0] = rng.choice([1e-35, -1e-35, 1e-200, 5e-324], size=int((tiny == 0).sum()))
    origins = np.concatenate([origins, ax_orig, ax_orig])
    dirs = np.concatenate([dirs, axes, tiny])
    got_k, got_t = trace(bvh, origins, dirs)
    for i in range(len(origins)):
        k, t = brute_force_nearest(bvh, origins[i], dirs[i])
        assert k >= 0  # every ray is aimed at a triangle
        assert got_k[i] >= 0 and got_t[i] == pytest.approx(t, rel=1e-9, abs=1e-9), (i, origins[i], dirs[i])
