"""PHYSICS.md "Checks with known answers", as statistical tests.

Fixed seeds; every tolerance is a multiple of the standard error of the
estimate (4 sigma: a correct engine fails one check in ~16000).
"""

import numba
import numpy as np
import pytest
from scipy import stats

from charon.engines import create_engine
from charon.engines.base import EngineConfig
from charon.geometry.builtin import sphere_detector
from charon.geometry.optics import constant_material, constant_surface
from charon.kernels.physics import SPEED_OF_LIGHT
from charon.kernels.reference import fresnel_reflectance
from charon.photons import (
    BULK_ABSORB,
    NAN_ABORT,
    NO_HIT,
    RAYLEIGH_SCATTER,
    REFLECT_DIFFUSE,
    REFLECT_SPECULAR,
    SURFACE_ABSORB,
    SURFACE_DETECT,
    PhotonBatch,
)
from charon.sources import point_source

Z = 4.0  # tolerance in standard errors


def close(k, n, p):
    """Observed k of n against probability p, within Z binomial standard errors."""
    se = np.sqrt(p * (1 - p) / n)
    assert abs(k / n - p) <= Z * se + 1e-12, f"observed {k / n:.5f}, expected {p:.5f} +- {Z}*{se:.5f}"


# The same checks run on the CUDA engine on a real GPU (CHARON_TEST_REAL_GPU=1).
ENGINES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module", params=ENGINES)
def kind(request):
    return request.param


def run(det, table, seed=1, max_steps=100, event_id=0, kind="cpu"):
    eng = create_engine(kind, det, EngineConfig(seed=seed, max_steps=max_steps, max_batch_photons=table.shape[1]))
    b = PhotonBatch.from_events([table], [event_id])
    hits = eng.propagate(b, keep_photons=True)
    return b, hits


@pytest.fixture(scope="module")
def black_sphere_first_leg(kind):
    d, la, ls, n = 1000.0, 2000.0, 1500.0, 1.33
    det = sphere_detector(d, constant_material("liquid", n, la, ls), constant_surface("black", absorb=1.0), subdivisions=5)
    N = 60_000
    b, _ = run(det, point_source(N, np.random.default_rng(3)), max_steps=1, kind=kind)
    return b, (d, la, ls, n, N)


def test_first_leg_probabilities_in_black_sphere(black_sphere_first_leg):
    b, (d, la, ls, n, N) = black_sphere_first_leg
    mu_a, mu_s = 1 / la, 1 / ls
    mu_t = mu_a + mu_s
    p_wall = np.exp(-mu_t * d)
    f = b.flags
    close(np.count_nonzero(f & RAYLEIGH_SCATTER), N, mu_s / mu_t * (1 - p_wall))
    close(np.count_nonzero(f & BULK_ABSORB), N, mu_a / mu_t * (1 - p_wall))
    close(np.count_nonzero(f & SURFACE_ABSORB), N, p_wall)
    # The three outcomes are exclusive and exhaustive after one step.
    assert np.count_nonzero(f & (RAYLEIGH_SCATTER | BULK_ABSORB | SURFACE_ABSORB)) == N


def test_direct_arrival_time_is_distance_times_n_over_c(black_sphere_first_leg):
    b, (d, la, ls, n, N) = black_sphere_first_leg
    direct = (b.flags & SURFACE_ABSORB) != 0
    r = np.linalg.norm(b.table[0:3, direct], axis=0)
    np.testing.assert_allclose(b.table[10, direct], r * n / SPEED_OF_LIGHT, rtol=1e-5)
    assert np.all(r > 0.999 * d) and np.all(r <= d * 1.0001)


@pytest.fixture(scope="module")
def sample(cpu):
    rayleigh, lambertian, fresnel = cpu.rayleigh, cpu.lambertian, cpu.fresnel

    @numba.njit
    def rayleigh_many(d, e, u):
        out = np.empty((d.shape[0], 6))
        for i in range(d.shape[0]):
            out[i] = rayleigh(d[i, 0], d[i, 1], d[i, 2], e[i, 0], e[i, 1], e[i, 2], u[i, 0], u[i, 1], u[i, 2])
        return out

    @numba.njit
    def lambert_cos(n, u):
        c = np.empty(n.shape[0])
        for i in range(n.shape[0]):
            x, y, z = lambertian(n[i, 0], n[i, 1], n[i, 2], u[i, 0], u[i, 1])
            c[i] = x * n[i, 0] + y * n[i, 1] + z * n[i, 2]
        return c

    @numba.njit
    def fresnel_reflected(d, e, n, n1, n2, u):
        k = 0
        for i in range(d.shape[0]):
            r = fresnel(d[i, 0], d[i, 1], d[i, 2], e[i, 0], e[i, 1], e[i, 2], n[0], n[1], n[2], n1, n2, u[i, 0], u[i, 1])
            k += r[0]
        return k

    return rayleigh_many, lambert_cos, fresnel_reflected


def _chi2_ok(samples, pdf_integral, bins=20):
    edges = np.linspace(-1, 1, bins + 1)
    obs, _ = np.histogram(samples, edges)
    exp = len(samples) * np.diff(pdf_integral(edges))
    chi2 = np.sum((obs - exp) ** 2 / exp)
    assert chi2 < stats.chi2.ppf(0.9999, bins - 1), chi2


def test_rayleigh_angular_distributions_and_transverse_polarization(sample, rng):
    rayleigh_many = sample[0]
    N = 200_000
    d = rng.normal(size=(N, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    e = np.cross(d, rng.normal(size=(N, 3)))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    out = rayleigh_many(d, e, rng.random((N, 3)))
    nd, ne = out[:, :3], out[:, 3:]
    # Relative to the old polarization: pdf 3/4 (1 - c^2); CDF = (3c - c^3 + 2) / 4
    _chi2_ok(np.einsum("ij,ij->i", nd, e), lambda c: (3 * c - c**3 + 2) / 4)
    # Relative to the old direction, unpolarized: pdf 3/8 (1 + c^2); CDF = (3c + c^3 + 4) / 8
    _chi2_ok(np.einsum("ij,ij->i", nd, d), lambda c: (3 * c + c**3 + 4) / 8)
    assert np.max(np.abs(np.einsum("ij,ij->i", nd, ne))) < 1e-9
    np.testing.assert_allclose(np.linalg.norm(ne, axis=1), 1, atol=1e-9)


def test_lambertian_mean_cosine_is_two_thirds(sample, rng):
    N = 200_000
    n = rng.normal(size=(N, 3))
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    c = sample[1](n, rng.random((N, 2)))
    assert np.all(c >= 0)
    assert abs(c.mean() - 2 / 3) < Z * np.sqrt(1 / 18 / N)  # var of cos under pdf 2c is 1/18


@pytest.mark.parametrize(
    "theta_deg,n1,n2,f_s",
    [(0.0, 1.33, 1.49, 0.5), (30.0, 1.0, 1.49, 1.0), (30.0, 1.0, 1.49, 0.0), (60.0, 1.0, 1.5, 0.3),
     (42.0, 1.49, 1.0, 0.5), (42.3, 1.49, 1.0, 0.5), (70.0, 1.49, 1.0, 0.8)],
)  # fmt: skip
def test_fresnel_average_reflectance(sample, rng, theta_deg, n1, n2, f_s):
    N = 100_000
    th = np.radians(theta_deg)
    n = np.array([0.0, 0.0, 1.0])
    d = np.tile([np.sin(th), 0.0, -np.cos(th)], (N, 1))
    ipn = np.array([0.0, 1.0, 0.0])  # normalize(cross(d, n)) for this geometry
    other = np.cross(ipn, d[0])
    e = np.tile(np.sqrt(f_s) * ipn + np.sqrt(1 - f_s) * other, (N, 1))
    k = sample[2](d, e, n, n1, n2, rng.random((N, 2)))
    if theta_deg == 0.0:
        assert k == 0  # Chroma quirk: exactly normal incidence always transmits
        return
    p = fresnel_reflectance(th, n1, n2, f_s)
    if p == 1.0:
        assert k == N  # beyond the critical angle (42.16 deg for 1.49 -> 1)
    else:
        close(k, N, p)


def test_diffuse_detecting_sphere(kind):
    d, a, r = 0.2, 0.3, 0.5
    wall = constant_surface("grey", detect=d, absorb=a, reflect_diffuse=r)
    det = sphere_detector(800.0, constant_material("clear", 1.0, 1e12, 1e12), wall, subdivisions=3)
    N = 40_000
    b, hits = run(det, point_source(N, np.random.default_rng(5)), max_steps=500, kind=kind)
    close(hits.n_hits, N, d / (d + a))
    assert np.count_nonzero(b.flags & SURFACE_DETECT) == hits.n_hits
    # Number of wall hits is geometric: P(still alive after k hits) = r^k, so its mean is 1/(1-r).
    for k in (1, 2, 3):
        bk, _ = run(det, point_source(N, np.random.default_rng(10 + k)), max_steps=k, kind=kind)
        alive = np.count_nonzero((bk.flags & (SURFACE_DETECT | SURFACE_ABSORB)) == 0)
        close(alive, N, r**k)
        assert np.all((bk.flags[(bk.flags & (SURFACE_DETECT | SURFACE_ABSORB)) == 0] & REFLECT_DIFFUSE) != 0)


def test_reemission_probability_wavelength_and_delay(kind):
    from charon.geometry.builder import DetectorBuilder
    from charon.geometry.builtin import _icosphere
    from charon.geometry.detector import Detector

    scint = constant_material("scint", 1.5, 50.0, 1e12)
    b = DetectorBuilder()
    v, f = _icosphere(3, 1000.0)
    b.add_solids(v, f, np.zeros((1, 3)), scint, scint, constant_surface("black", absorb=1.0))
    arrays = b.build().arrays()
    W = len(arrays["wavelength"])
    p_re = 0.6
    arrays["material_reemission_prob"] = np.full((1, W), p_re, np.float32)
    # Re-emission spectrum uniform in [450, 500] nm; delay CDF exponential with tau = 5 ns.
    arrays["material_reemission_wavelength_cdf"] = np.clip((arrays["wavelength"] - 450) / 50, 0, 1)[None, :]
    tgrid = np.linspace(0, 100, 2001).astype(np.float32)
    arrays["reemission_time"] = tgrid
    tc = 1 - np.exp(-tgrid / 5.0)
    arrays["material_reemission_time_cdf"] = (tc / tc[-1])[None, :]
    det = Detector.from_arrays(arrays)
    N = 40_000
    src = point_source(N, np.random.default_rng(8), wavelength=400.0)
    bt, _ = run(det, src, max_steps=1, kind=kind)  # one step: absorbed within 50 mm mean, then re-emitted or not
    from charon.photons import BULK_REEMIT

    reemitted = (bt.flags & BULK_REEMIT) != 0
    absorbed = (bt.flags & BULK_ABSORB) != 0
    assert np.count_nonzero(reemitted | absorbed) > 0.99 * N
    close(np.count_nonzero(reemitted), np.count_nonzero(reemitted | absorbed), p_re)
    wl = bt.table[9, reemitted]
    assert wl.min() >= 450 - 1e-3 and wl.max() <= 500 + 1e-3
    assert abs(wl.mean() - 475) < Z * 50 / np.sqrt(12 * wl.size)
    # Delay = time - travel time n*d/c; mean 5 ns (grid truncation at 100 ns is negligible).
    travelled = np.linalg.norm(bt.table[0:3, reemitted], axis=0)
    delay = bt.table[10, reemitted] - travelled * 1.5 / SPEED_OF_LIGHT
    assert abs(delay.mean() - 5.0) < Z * 5.0 / np.sqrt(delay.size) + 0.01


def test_nan_abort_no_hit_and_max_steps(kind):
    det = sphere_detector(500.0, constant_material("clear", 1.0, 1e12, 1e12), constant_surface("m", reflect_specular=1.0),
                          subdivisions=2)  # fmt: skip
    tab = point_source(3, np.random.default_rng(0))
    tab[3, 0] = np.nan  # NaN direction
    tab[0:3, 1] = [2000.0, 0, 0]  # outside, pointing away
    tab[3:6, 1] = [1.0, 0, 0]
    before = tab[0:3, 1].copy()
    b, hits = run(det, tab, max_steps=7, kind=kind)  # photon 2 bounces on a mirror forever
    assert b.flags[0] & NAN_ABORT and b.flags[0] & NO_HIT
    assert b.flags[1] == NO_HIT
    np.testing.assert_array_equal(b.table[0:3, 1], before)  # position not advanced
    # Still travelling after max_steps: specular bounces recorded, no terminal flag, not a hit.
    assert b.flags[2] & REFLECT_SPECULAR
    assert not b.flags[2] & (NO_HIT | SURFACE_DETECT | SURFACE_ABSORB | BULK_ABSORB)
    assert hits.n_hits == 0
