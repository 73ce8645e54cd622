import numpy as np
import pytest
import trimesh

from charon.geometry import Detector, DetectorError, load_detector, resolve_detector, save_detector
from charon.geometry.builtin import builtin_detector, sphere_detector
from charon.geometry.detector import ALL_KEYS, REQUIRED_KEYS


@pytest.fixture(scope="module")
def det():
    return sphere_detector(300.0, subdivisions=1)


def test_round_trip_is_exact(det, tmp_path):
    p = tmp_path / "d.npz"
    save_detector(det, p)
    with np.load(p, allow_pickle=False) as z:
        assert set(z.files) == set(REQUIRED_KEYS)
    back = load_detector(p)
    for k, v in det.arrays().items():
        np.testing.assert_array_equal(getattr(back, k), v)
        assert getattr(back, k).dtype == v.dtype


def _bad(det, tmp_path, **changes):
    arrays = det.arrays()
    for k, v in changes.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(DetectorError) as err:
        load_detector(p)
    return err.value


T = 80  # triangles of icosphere(1)


@pytest.mark.parametrize(
    "key,value,problem",
    [
        ("vertices", None, "missing"),
        ("vertices", np.zeros((0, 3), np.float32), "empty"),
        ("vertices", np.zeros((5, 2), np.float32), "shape"),
        ("vertices", "nan", "non-finite"),
        ("triangles", np.zeros((0, 3), np.int32), "empty"),
        ("triangles", "oob", "out of range"),
        ("triangles", "float", "dtype"),
        ("inner_material", np.zeros(T - 1, np.int32), "length"),
        ("outer_material", np.full(T, 7, np.int32), "out of range"),
        ("surface", np.full(T, -2, np.int32), "out of range"),
        ("solid", np.full(T, 3, np.int32), "out of range"),
        ("solid_channel", np.array([5], np.int32), "out of range"),
        ("channel_type", np.zeros(4, np.int32), "length"),
        ("channel_position", np.full((1, 3), np.inf, np.float32), "non-finite"),
        ("wavelength", "decreasing", "increasing"),
        ("wavelength", np.zeros(0, np.float32), "empty"),
        ("material_names", np.array([], dtype=str), "empty"),
        ("material_refractive_index", "zero", "> 0"),
        ("material_absorption_length", "wrongshape", "shape"),
        ("surface_detect", "over1", "[0, 1]"),
        ("surface_absorb", "sum", "> 1"),
        ("material_reemission_prob", "partial", "all together"),
        ("bogus_key", np.zeros(1), "unknown"),
    ],
)
def test_every_rejection_names_key_and_problem(det, tmp_path, key, value, problem):
    a = det.arrays()
    if isinstance(value, str):
        v = {
            "nan": lambda: np.where(np.arange(len(a["vertices"]))[:, None] == 3, np.nan, a["vertices"]),
            "oob": lambda: a["triangles"] + len(a["vertices"]),
            "float": lambda: a["triangles"].astype(np.float32),
            "decreasing": lambda: a["wavelength"][::-1].copy(),
            "zero": lambda: np.zeros_like(a["material_refractive_index"]),
            "wrongshape": lambda: a["material_absorption_length"][:, :-1],
            "over1": lambda: a["surface_detect"] * 2,
            "sum": lambda: np.full_like(a["surface_absorb"], 0.5),
            "partial": lambda: np.zeros_like(a["material_refractive_index"]),
        }[value]()
    else:
        v = value
    err = _bad(det, tmp_path, **{key: v})
    assert key in str(err) and problem in str(err), str(err)


def test_unreadable_file_and_pickled_objects_are_refused(tmp_path):
    p = tmp_path / "junk.npz"
    p.write_bytes(b"not a zip")
    with pytest.raises(DetectorError, match="cannot read"):
        load_detector(p)
    q = tmp_path / "obj.npz"
    np.savez(q, vertices=np.array([object()], dtype=object))
    with pytest.raises(DetectorError):
        load_detector(q)


def test_builtin_demo_and_unknown_name():
    demo = builtin_detector("demo")
    assert demo.n_channels == 53 and demo.n_triangles > 300_000
    r = np.linalg.norm(demo.channel_position, axis=1)
    np.testing.assert_allclose(r, 2000.0, rtol=1e-6)
    with pytest.raises(KeyError, match="unknown built-in"):
        builtin_detector("nope")
    with pytest.raises(DetectorError, match="neither a built-in"):
        resolve_detector("/no/such/file.npz")


def test_stl_import_makes_one_channel_per_body(tmp_path):
    a = trimesh.creation.icosphere(subdivisions=1, radius=50.0)
    b = a.copy()
    b.apply_translation([300.0, 0, 0])
    p = tmp_path / "two.stl"
    trimesh.util.concatenate([a, b]).export(p)
    d = resolve_detector(str(p))
    assert isinstance(d, Detector) and d.n_channels == 2 and d.n_triangles == 160
    np.testing.assert_allclose(sorted(d.channel_position[:, 0]), [0.0, 300.0], atol=1e-3)
    bad = tmp_path / "empty.stl"
    bad.write_text("solid x\nendsolid x\n")
    with pytest.raises(DetectorError):
        resolve_detector(str(bad))


def test_fingerprint_identifies_the_whole_detector(det):
    same = sphere_detector(300.0, subdivisions=1)
    assert det.fingerprint() == same.fingerprint() and len(det.fingerprint()) == 16
    moved = Detector.from_arrays({**det.arrays(), "vertices": det.vertices * 1.001})
    assert moved.fingerprint() != det.fingerprint()
    # identical channel lists (what DETECTOR_INFO shows) but a different mesh: still different
    assert sphere_detector(900.0, subdivisions=1).fingerprint() != det.fingerprint()
