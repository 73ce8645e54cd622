"""Each physics device function against its numpy reference, on the same random inputs."""

import numba
import numpy as np
import pytest

from charon.geometry.optics import STANDARD_GRID
from charon.kernels import reference as ref


def _unit(v):
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _transverse(rng, d):
    return _unit(np.cross(d, rng.normal(size=d.shape)))


@pytest.fixture(scope="module")
def vec(cpu):
    """Vectorise scalar device functions over rows (so the tests call the compiled kernels)."""
    rayleigh, lambertian, isotropic = cpu.rayleigh, cpu.lambertian, cpu.isotropic
    fresnel, interp_grid, sample_cdf = cpu.fresnel, cpu.interp_grid, cpu.sample_cdf

    @numba.njit
    def rayleigh_many(d, e, u):
        out = np.empty((d.shape[0], 6))
        for i in range(d.shape[0]):
            out[i] = rayleigh(d[i, 0], d[i, 1], d[i, 2], e[i, 0], e[i, 1], e[i, 2], u[i, 0], u[i, 1], u[i, 2])
        return out[:, :3], out[:, 3:]

    @numba.njit
    def lambertian_many(n, u):
        out = np.empty((n.shape[0], 3))
        for i in range(n.shape[0]):
            out[i] = lambertian(n[i, 0], n[i, 1], n[i, 2], u[i, 0], u[i, 1])
        return out

    @numba.njit
    def isotropic_many(u):
        out = np.empty((u.shape[0], 3))
        for i in range(u.shape[0]):
            out[i] = isotropic(u[i, 0], u[i, 1])
        return out

    @numba.njit
    def fresnel_many(d, e, n, n1, n2, u):
        refl = np.empty(d.shape[0], np.bool_)
        nd = np.empty((d.shape[0], 3))
        ne = np.empty((d.shape[0], 3))
        for i in range(d.shape[0]):
            r, a, b, c, x, y, z = fresnel(d[i, 0], d[i, 1], d[i, 2], e[i, 0], e[i, 1], e[i, 2],
                                            n[i, 0], n[i, 1], n[i, 2], n1, n2, u[i, 0], u[i, 1])  # fmt: skip
            refl[i] = r
            nd[i] = (a, b, c)
            ne[i] = (x, y, z)
        return refl, nd, ne

    @numba.njit
    def interp_many(table, row, wl):
        out = np.empty(wl.shape[0])
        for i in range(wl.shape[0]):
            out[i] = interp_grid(table, row, wl[i])
        return out

    @numba.njit
    def sample_many(x, cdf, row, u):
        out = np.empty(u.shape[0])
        for i in range(u.shape[0]):
            out[i] = sample_cdf(x, cdf, row, u[i])
        return out

    class V:
        pass

    v = V()
    v.rayleigh, v.lambertian, v.isotropic, v.fresnel = rayleigh_many, lambertian_many, isotropic_many, fresnel_many
    v.interp, v.sample = interp_many, sample_many
    return v


def test_rayleigh_matches_reference(vec, rng):
    d = _unit(rng.normal(size=(2000, 3)))
    e = _transverse(rng, d)
    u = rng.random((2000, 3))
    nd, ne = vec.rayleigh(d, e, u)
    rd, re = ref.rayleigh_ref(d, e, u[:, 0], u[:, 1], u[:, 2])
    np.testing.assert_allclose(nd, rd, atol=1e-12)
    np.testing.assert_allclose(ne, re, atol=1e-12)


def test_lambertian_and_isotropic_match_reference(vec, rng):
    n = _unit(rng.normal(size=(2000, 3)))
    u = rng.random((2000, 2))
    np.testing.assert_allclose(vec.lambertian(n, u), ref.lambertian_ref(n, u[:, 0], u[:, 1]), atol=1e-12)
    np.testing.assert_allclose(vec.isotropic(u), ref.isotropic_ref(u[:, 0], u[:, 1]), atol=1e-12)


@pytest.mark.parametrize("n1,n2", [(1.33, 1.49), (1.49, 1.0)])
def test_fresnel_matches_reference(vec, rng, n1, n2):
    m = 3000
    nrm = _unit(rng.normal(size=(m, 3)))
    d = _unit(rng.normal(size=(m, 3)))
    d = np.where((np.einsum("ij,ij->i", d, nrm) > 0)[:, None], -d, d)  # incoming: dot(n, -d) > 0
    e = _transverse(rng, d)
    u = rng.random((m, 2))
    r, nd, ne = vec.fresnel(d, e, nrm, n1, n2, u)
    rr, rd, re = ref.fresnel_ref(d, e, nrm, n1, n2, u[:, 0], u[:, 1])
    np.testing.assert_array_equal(r, rr)
    np.testing.assert_allclose(nd, rd, atol=1e-9)
    np.testing.assert_allclose(ne, re, atol=1e-9)
    assert r.any() and (~r).any()


def test_interp_and_cdf_sampling_match_reference(vec, rng):
    table = rng.random((3, len(STANDARD_GRID))).astype(np.float32)
    wl = rng.uniform(20, 1100, 5000)  # includes clamped ends
    np.testing.assert_allclose(vec.interp(table, 1, wl), ref.interp_grid_ref(table, 1, wl), rtol=1e-6, atol=1e-7)
    x = np.linspace(300, 600, 50).astype(np.float32)
    cdf = np.cumsum(rng.random((2, 50)), axis=1)
    cdf = (cdf - cdf[:, :1]) / (cdf[:, -1:] - cdf[:, :1])
    u = rng.random(5000)
    np.testing.assert_allclose(vec.sample(x, cdf, 1, u), ref.sample_cdf_ref(x, cdf[1], u), rtol=1e-9)
