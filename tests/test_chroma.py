"""Chroma backend and import, against the stand-in in tests/chroma_standin (see its README)."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from charon import protocol as P
from charon.client import DealerClient, ReqClient
from charon.engines import EngineError
from charon.geometry import load_detector
from charon.geometry.chroma_import import CHROMA_NEEDED, convert_main, from_chroma
from charon.geometry.optics import STANDARD_GRID
from charon.photons import SURFACE_DETECT
from charon.server import BatchServer, ServerConfig, run_in_thread
from charon.sources import random_event

STANDIN = os.path.join(os.path.dirname(__file__), "chroma_standin")


@pytest.fixture
def chroma(monkeypatch):
    monkeypatch.syspath_prepend(STANDIN)
    for m in [m for m in sys.modules if m == "chroma" or m.startswith("chroma.") or m == "demo_geometry"]:
        monkeypatch.delitem(sys.modules, m)
    import chroma

    assert chroma.STANDIN
    yield chroma
    for m in [m for m in sys.modules if m == "chroma" or m.startswith("chroma.") or m == "demo_geometry"]:
        monkeypatch.delitem(sys.modules, m, raising=False)


# ---------------------------------------------------------------- without Chroma


def test_nothing_in_charon_imports_chroma():
    code = ("import sys, charon.server, charon.cli, charon.router, charon.bench, charon.engines.cpu, "
            "charon.geometry; print('chroma' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_engine_chroma_without_chroma_fails_at_once_with_the_way_out(tmp_path):
    with pytest.raises(EngineError) as err:
        BatchServer(ServerConfig(bind="tcp://127.0.0.1:0", engine="chroma", detector="Eos.pkl"))
    assert "needs Chroma" in str(err.value) and "--engine cpu" in str(err.value)


def test_convert_without_chroma_exits_2_with_message(tmp_path, capsys):
    assert convert_main(["Eos.pkl", "-o", str(tmp_path / "x.npz")]) == 2
    assert CHROMA_NEEDED in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


# ---------------------------------------------------------------- conversion


def test_conversion_reports_what_it_drops_and_validates(chroma):
    import demo_geometry

    det, report = from_chroma(demo_geometry.build())
    assert det.n_channels == 6
    # Channel positions are the PMT centres (centroid of each PMT solid).
    np.testing.assert_allclose(sorted(map(tuple, np.round(det.channel_position))),
                               sorted(map(tuple, np.round(np.vstack([np.eye(3), -np.eye(3)]) * 2000.0))), atol=1.0)
    assert list(det.channel_type) == [0, 1, 0, 1, 0, 1]
    # Properties resampled on the standard grid; a tabulated one keeps its values at grid points.
    m = list(det.material_names).index("water")
    np.testing.assert_allclose(det.material_absorption_length[m], np.linspace(1e4, 3e4, len(STANDARD_GRID)), rtol=1e-5)
    assert np.all(det.material_refractive_index[m] == np.float32(1.33))
    k = list(det.surface_names).index("cathode")
    assert np.all(det.surface_detect[k] == 0.25) and np.all(det.surface_reflect_diffuse[k] == 0.5)
    text = "\n".join(report)
    assert "surface 'coated': model 2" in text
    assert "material 'glass': comp_reemission_prob" in text
    det.validate()


def test_convert_cli_from_pickle_and_from_module_function(chroma, tmp_path, capsys, monkeypatch):
    import demo_geometry

    pkl = tmp_path / "det.pkl"
    with open(pkl, "wb") as fh:
        pickle.dump(demo_geometry.build(), fh)
    for source, out in ((str(pkl), tmp_path / "a.npz"), ("demo_geometry:build", tmp_path / "b.npz")):
        assert convert_main([source, "-o", str(out)]) == 0
        det = load_detector(out)  # passes charon's validation on reload
        assert det.n_channels == 6
    printed = capsys.readouterr().out
    assert "not modelled: surface 'coated'" in printed and "wrote" in printed
    assert convert_main(["no_such_module:f", "-o", str(tmp_path / "c.npz")]) == 1


def test_converted_detector_runs_on_charons_own_engine(chroma):
    import demo_geometry

    from charon.engines.cpu import CPUEngine
    from charon.photons import PhotonBatch

    det, _ = from_chroma(demo_geometry.build())
    hits = CPUEngine(det).propagate(PhotonBatch.from_events([random_event(20000, np.random.default_rng(0), 500.0)], [1]))
    assert hits.n_hits > 0 and set(np.unique(hits.channel)) <= set(range(6))


# ---------------------------------------------------------------- the engine


def test_chroma_engine_one_call_per_batch_and_hits_grouped_by_event(chroma):
    import chroma.gpu.photon as gp

    gp.CALLS.clear()
    srv, th = run_in_thread(ServerConfig(bind="tcp://127.0.0.1:0", engine="chroma", detector="demo_geometry:build",
                                         max_wait_ms=200, dispatch="wait", max_batch_photons=100_000))  # fmt: skip
    d = DealerClient(srv.address)
    c = ReqClient(srv.address, timeout_ms=5000, retries=0)
    try:
        pos, typ = c.detector_info()
        assert len(pos) == 6
        rng = np.random.default_rng(3)
        tables = {i: random_event(int(rng.integers(10, 300)), rng, 500.0) for i in range(10)}
        for i, t in tables.items():
            d.submit(i, t, np.zeros(t.shape[1], np.uint32))
        replies = {r.event_id: r for r in (d.recv(10_000) for _ in tables)}
        assert len(gp.CALLS) == 1  # all ten events in one Chroma propagation
        n, evidx = gp.CALLS[0]
        assert n == sum(t.shape[1] for t in tables.values())
        assert list(np.unique(evidx)) == list(range(10))
        for i, t in tables.items():
            r = replies[i]
            assert r.kind == P.SIM_COMPLETE
            up = np.flatnonzero(t[5] > 0)  # the stand-in's rule: dz > 0 is a hit, time + 1
            np.testing.assert_allclose(np.sort(r.hits["time"]), np.sort(t[10, up] + 1.0))
            np.testing.assert_allclose(np.sort(r.hits["dz"]), np.sort(t[5, up]))
            assert np.all(r.hits["flags"] & SURFACE_DETECT)
    finally:
        d.close()
        c.close()
        srv.stop()
        th.join(10)
    assert chroma.gpu.CONTEXTS[-1].popped  # engine released its context
