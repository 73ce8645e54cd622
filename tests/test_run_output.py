"""RUN_BEGIN / RUN_END with --output-dir: ROOT files read back with uproot."""

import os
import time

import numpy as np
import pytest

uproot = pytest.importorskip("uproot")  # a test dependency; absent on the GPU machine

from charon import protocol as P
from charon.client import DealerClient, ReqClient, photondata_frames
from charon.engines.base import EngineConfig
from charon.engines.cpu import CPUEngine
from charon.geometry.builtin import sphere_detector
from charon.geometry.optics import constant_surface
from charon.photons import CHERENKOV
from charon.run_output import RunOutputError, output_path
from charon.server import ServerConfig, run_in_thread
from charon.sources import random_event
from standins import GatedEngine

SEED = 77


@pytest.fixture(scope="module")
def det():
    wall = constant_surface("grey", detect=0.3, absorb=0.5, reflect_diffuse=0.2)
    return sphere_detector(800.0, wall_surface=wall, subdivisions=2)


@pytest.fixture
def server(det, tmp_path):
    out = tmp_path / "runs"
    out.mkdir()
    srv, th = run_in_thread(ServerConfig(bind="tcp://127.0.0.1:0", engine="cpu", seed=SEED, output_dir=str(out),
                                         output_basket_events=3, max_batch_photons=5000),
                            detector=det)  # fmt: skip
    clients = []

    def dealer():
        c = DealerClient(srv.address)
        clients.append(c)
        return c

    yield srv, out, dealer
    for c in clients:
        c.close()
    srv.stop()
    th.join(10)


def ask(d, frames, timeout=10_000):
    d.send(frames)
    return d.recv(timeout)


def events(n, seed):
    rng = np.random.default_rng(seed)
    return {1000 + i: random_event(int(rng.integers(50, 600)), rng, radius=400.0) for i in range(n)}


def test_run_file_matches_synchronous_hits_branch_by_branch(server, det):
    srv, out, dealer = server
    d = dealer()
    assert ask(d, [P.RUN_BEGIN, b"/some/where/run_17.ntuple.root"]).kind == b"ACK"
    evs = events(8, 1)
    evs[1003] = np.zeros((11, 0), np.float32)  # an empty event is written as an entry with no hits
    for eid, t in evs.items():
        r = ask(d, photondata_frames(eid, t, np.full(t.shape[1], CHERENKOV, np.uint32)))
        assert r.kind == P.SIM_COMPLETE_ASYNC and r.event_id == eid and len(r.frames) == 2
    assert ask(d, [P.RUN_END]).kind == b"ACK"  # only after every event is written
    path = out / "run_17.charon.ntuple.root"
    assert sorted(os.listdir(out)) == [path.name]
    with uproot.open(path) as f:
        info = f["detinfo"].arrays(library="np")
        np.testing.assert_array_equal(info["pmt_x"], det.channel_position[:, 0])
        np.testing.assert_array_equal(info["pmt_z"], det.channel_position[:, 2])
        np.testing.assert_array_equal(info["pmt_type"], det.channel_type)
        tree = f["output"]
        assert set(tree.keys()) >= {"event_id", "channel_id", "nchannel_id", "time", "ntime", "wavelength", "u", "v",
                                    "w", "pol_x", "pol_y", "pol_z", "flag", "nflag"}  # fmt: skip
        arr = tree.arrays(library="ak")
    assert sorted(arr["event_id"].tolist()) == sorted(evs)
    ref = CPUEngine(det, EngineConfig(seed=SEED))
    from charon.photons import PhotonBatch

    rows = {"u": 0, "v": 1, "w": 2, "pol_x": 3, "pol_y": 4, "pol_z": 5, "wavelength": 6, "time": 7}
    for k, eid in enumerate(arr["event_id"].tolist()):
        t = evs[eid]
        want = ref.propagate(PhotonBatch.from_events([t.copy()], [eid], flags=[np.full(t.shape[1], CHERENKOV, np.uint32)])).event(0)
        np.testing.assert_array_equal(np.asarray(arr["channel_id"][k]), want.channel)
        np.testing.assert_array_equal(np.asarray(arr["flag"][k]), want.flags)
        assert int(arr["nchannel_id"][k]) == want.n_hits
        for name, row in rows.items():
            np.testing.assert_array_equal(np.asarray(arr[name][k]), want.table[row])


def test_two_clients_with_their_own_runs_and_a_sync_client_alongside(server):
    srv, out, dealer = server
    a, b, c = dealer(), dealer(), dealer()
    assert ask(a, [P.RUN_BEGIN, b"alpha.root"]).kind == b"ACK"
    assert ask(b, [P.RUN_BEGIN, b"beta"]).kind == b"ACK"
    for eid, t in events(4, 2).items():
        assert ask(a, photondata_frames(eid, t)).kind == P.SIM_COMPLETE_ASYNC
    for eid, t in events(5, 3).items():
        assert ask(b, photondata_frames(eid + 100, t)).kind == P.SIM_COMPLETE_ASYNC
    r = ask(c, photondata_frames(5, random_event(100, np.random.default_rng(0), radius=100.0)))
    assert r.kind == P.SIM_COMPLETE and r.event_id == 5  # no run: synchronous as usual
    assert ask(a, [P.RUN_END]).kind == b"ACK" and ask(b, [P.RUN_END]).kind == b"ACK"
    with uproot.open(out / "alpha.charon.ntuple.root") as f:
        assert f["output"].num_entries == 4
    with uproot.open(out / "beta.charon.ntuple.root") as f:
        assert sorted(f["output"]["event_id"].array(library="np")) == list(range(1100, 1105))


def test_path_escape_is_confined_to_the_output_directory(server, tmp_path):
    srv, out, dealer = server
    d = dealer()
    assert ask(d, [P.RUN_BEGIN, b"../../escape.root"]).kind == b"ACK"
    assert ask(d, [P.RUN_END]).kind == b"ACK"
    assert os.listdir(out) == ["escape.charon.ntuple.root"]
    assert not (tmp_path / "escape.charon.ntuple.root").exists()
    assert not os.path.exists(os.path.join(os.path.dirname(tmp_path), "escape.charon.ntuple.root"))


@pytest.mark.parametrize(
    "name,expected",
    [("run.root", "run"), ("run.ntuple.root", "run"), ("a/b/c.root", "c"), ("..\\..\\w.root", "w"), ("x", "x")],
)
def test_output_path_rules(tmp_path, name, expected):
    assert output_path(str(tmp_path), name) == os.path.join(str(tmp_path), expected + ".charon.ntuple.root")


@pytest.mark.parametrize("bad", ["", "..", "/", ".root", "a/..", "x\x00y"])
def test_output_path_rejects_unusable_names(tmp_path, bad):
    with pytest.raises(RunOutputError):
        output_path(str(tmp_path), bad)


def test_failures_get_clear_replies_and_others_keep_working(server):
    srv, out, dealer = server
    d = dealer()
    r = ask(d, [P.RUN_END])
    assert r.kind == P.SIM_FAILED and "without an open run" in r.reason
    assert ask(d, [P.RUN_BEGIN, b".."]).kind == b"ACK"  # always acknowledged ...
    r = ask(d, photondata_frames(9, random_event(50, np.random.default_rng(1), radius=100.0)))
    assert r.kind == P.SIM_FAILED and r.event_id == 9 and "cannot create the output file" in r.reason
    r = ask(d, [P.RUN_END])
    assert r.kind == P.SIM_FAILED and "cannot create" in r.reason
    # a good run right after still works
    assert ask(d, [P.RUN_BEGIN, b"good.root"]).kind == b"ACK"
    assert ask(d, photondata_frames(10, random_event(50, np.random.default_rng(2), radius=100.0))).kind == P.SIM_COMPLETE_ASYNC
    assert ask(d, [P.RUN_END]).kind == b"ACK"
    with uproot.open(out / "good.charon.ntuple.root") as f:
        assert f["output"]["event_id"].array(library="np").tolist() == [10]


def test_unwritable_output_directory_fails_the_run_not_the_server(det, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    srv, th = run_in_thread(ServerConfig(bind="tcp://127.0.0.1:0", engine="cpu", output_dir=str(out)), detector=det)
    try:
        os.chmod(out, 0o500)
        if os.access(out, os.W_OK):  # root ignores permissions: make creation fail another way
            os.chmod(out, 0o700)
            (out / "blocked.charon.ntuple.root").mkdir()
        d = DealerClient(srv.address)
        assert ask(d, [P.RUN_BEGIN, b"blocked.root"]).kind == b"ACK"
        r = ask(d, photondata_frames(1, random_event(20, np.random.default_rng(0), radius=100.0)))
        assert r.kind == P.SIM_FAILED and "cannot create the output file" in r.reason
        c = ReqClient(srv.address, timeout_ms=5000, retries=0)
        assert c.ping() == b"PONG"
        c.close()
        d.close()
    finally:
        os.chmod(out, 0o700)
        srv.stop()
        th.join(10)


def test_server_stop_with_run_open_leaves_a_readable_file(det, tmp_path, caplog):
    out = tmp_path / "runs"
    out.mkdir()
    srv, th = run_in_thread(ServerConfig(bind="tcp://127.0.0.1:0", engine="cpu", output_dir=str(out),
                                         output_basket_events=2), detector=det)  # fmt: skip
    d = DealerClient(srv.address)
    assert ask(d, [P.RUN_BEGIN, b"crash.root"]).kind == b"ACK"
    for eid, t in events(5, 4).items():
        assert ask(d, photondata_frames(eid, t)).kind == P.SIM_COMPLETE_ASYNC
    deadline = time.monotonic() + 10
    while srv.metrics.registry.get_sample_value("charon_events_total") < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    with caplog.at_level("WARNING", logger="charon.server"):
        srv.stop()
        th.join(10)
    d.close()
    with uproot.open(out / "crash.charon.ntuple.root") as f:
        assert f["output"].num_entries == 5
    assert any("server stopping with the run open" in r.getMessage() for r in caplog.records)


def test_async_events_refused_at_admission_get_one_failure_reply_not_an_ack(det, tmp_path):
    import threading

    out = tmp_path / "runs"
    out.mkdir()
    gate = threading.Event()
    srv, th = run_in_thread(ServerConfig(bind="tcp://127.0.0.1:0", engine="cpu", output_dir=str(out),
                                         max_queued_photons=1000, max_batch_photons=100_000, max_wait_ms=0),
                            detector=det, engine_factory=lambda: GatedEngine(CPUEngine(det, EngineConfig()), gate))  # fmt: skip
    d = DealerClient(srv.address)
    try:
        assert ask(d, [P.RUN_BEGIN, b"full.root"]).kind == b"ACK"
        rng = np.random.default_rng(0)
        assert ask(d, photondata_frames(1, random_event(600, rng, 100.0))).kind == P.SIM_COMPLETE_ASYNC  # in engine
        time.sleep(0.2)
        assert ask(d, photondata_frames(2, random_event(600, rng, 100.0))).kind == P.SIM_COMPLETE_ASYNC  # queued
        r = ask(d, photondata_frames(3, random_event(600, rng, 100.0)))  # would overfill the queue
        assert r.kind == P.SIM_FAILED and r.event_id == 3 and r.reason.startswith("busy")
        r = ask(d, photondata_frames(4, random_event(1001, rng, 100.0)))  # can never fit
        assert r.kind == P.SIM_FAILED and "max-queued-photons" in r.reason
        with pytest.raises(TimeoutError):
            d.recv(300)  # exactly one reply each
        gate.set()
        assert ask(d, [P.RUN_END]).kind == b"ACK"
        with uproot.open(out / "full.charon.ntuple.root") as f:
            assert sorted(f["output"]["event_id"].array(library="np").tolist()) == [1, 2]
    finally:
        gate.set()
        d.close()
        srv.stop()
        th.join(10)
