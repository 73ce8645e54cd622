"""charon-batch over real ZeroMQ sockets on random loopback ports.

Every receive has a timeout, so a broken server fails a test instead of hanging it.
"""

import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
import zmq

from charon import protocol as P
from charon.client import DealerClient, ReqClient, decode_reply, photondata_frames
from charon.engines.base import EngineConfig
from charon.engines.cpu import CPUEngine
from charon.geometry.builtin import sphere_detector
from charon.geometry.optics import constant_surface
from charon.intake import AVAILABLE as INTAKE_AVAILABLE
from charon.metrics import _mallinfo2
from charon.photons import CHERENKOV, SURFACE_DETECT, HitBatch, PhotonBatch
from charon.server import ServerConfig, run_in_thread
from charon.sources import point_source, random_event
from standins import Gate, GatedEngine, LanedEngine

SEED = 4242


@pytest.fixture(scope="module")
def det():
    wall = constant_surface("grey", detect=0.3, absorb=0.5, reflect_diffuse=0.2)
    return sphere_detector(1000.0, wall_surface=wall, subdivisions=2)


@pytest.fixture(scope="module")
def reference_engine(det):
    return CPUEngine(det, EngineConfig(seed=SEED))


def expected_hits(engine, event_id, table, flags=None):
    """Hits of one event propagated alone: what the server must return (batch invariance)."""
    b = PhotonBatch.from_events([table.copy()], [event_id], flags=None if flags is None else [flags])
    return engine.propagate(b).event(0)


class Server:
    def __init__(self, det, engine_factory=None, **kw):
        cfg = ServerConfig(**{"bind": "tcp://127.0.0.1:0", "engine": "cpu", "seed": SEED, **kw})
        self.srv, self.thread = run_in_thread(cfg, detector=det, engine_factory=engine_factory)
        self.address = self.srv.address
        self.clients = []

    def req(self, **kw):
        c = ReqClient(self.address, **kw)
        self.clients.append(c)
        return c

    def dealer(self):
        c = DealerClient(self.address)
        self.clients.append(c)
        return c

    def metric(self, name, **labels):
        v = self.srv.metrics.registry.get_sample_value(name, labels or None)
        return 0.0 if v is None else v

    def stop(self):
        for c in self.clients:
            c.close()
        self.srv.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()


# Both ways of taking requests off the client socket (intake.py): every test of this module that uses the
# ``server`` fixture or ``intake`` runs with each.
INTAKES = ["python", pytest.param("compiled", marks=pytest.mark.skipif(not INTAKE_AVAILABLE,
                                                                       reason="needs libzmq's C API via pyzmq"))]


@pytest.fixture(params=INTAKES)
def intake(request):
    return request.param


@pytest.fixture
def server(det, intake):
    s = Server(det, max_batch_photons=20_000, max_wait_ms=5, intake=intake)
    yield s
    s.stop()


def ev(n, seed):
    return random_event(n, np.random.default_rng(seed), radius=500.0)


def assert_good_request_still_served(address, reference_engine, event_id=999):
    table = ev(300, event_id)
    c = ReqClient(address, timeout_ms=10_000, retries=0)
    r = c.simulate(event_id, table)
    c.close()
    assert r.kind == P.SIM_COMPLETE and r.event_id == event_id
    np.testing.assert_array_equal(r.hits["channel"], expected_hits(reference_engine, event_id, table).channel)


# ------------------------------------------------------------------ message types


def test_ping_detector_info_run_begin_end_unknown(server, det):
    c = server.req(timeout_ms=5000, retries=0)
    assert c.ping() == b"PONG"
    pos, typ = c.detector_info()
    np.testing.assert_array_equal(pos, det.channel_position)
    np.testing.assert_array_equal(typ, det.channel_type)
    assert c.request([P.RUN_BEGIN, b"run.root"]) == [b"ACK"]
    assert c.request([P.RUN_END]) == [b"ACK"]
    assert c.request([b"HELLO"]) == [b"UNKNOWN_REQUEST"]
    assert c.request([P.PING, b"extra"]) == [b"UNKNOWN_REQUEST"]
    assert server.metric("charon_failed_total", reason="unknown_request") == 2
    c.close()


def test_ping_ack_option(det):
    s = Server(det, ping_reply="ACK")
    try:
        assert s.req(timeout_ms=5000, retries=0).ping() == b"ACK"
    finally:
        s.stop()


def test_compact_reply_for_13_frames_matches_engine(server, reference_engine):
    table = ev(2000, 1)
    r = server.req(timeout_ms=10_000, retries=0).simulate(7, table)
    assert r.kind == P.SIM_COMPLETE and r.event_id == 7 and len(r.frames) == 5
    want = expected_hits(reference_engine, 7, table)
    assert want.n_hits > 100
    np.testing.assert_array_equal(r.hits["channel"], want.channel)
    np.testing.assert_array_equal(r.hits["time"], want.table[7])
    np.testing.assert_array_equal(r.hits["wavelength"], want.table[6])


def test_full_reply_for_14_frames_keeps_client_flags(server, reference_engine):
    table = ev(1500, 2)
    flags = np.full(1500, CHERENKOV, np.uint32)
    r = server.req(timeout_ms=10_000, retries=0).simulate(8, table, flags)
    assert r.kind == P.SIM_COMPLETE and len(r.frames) == 12
    want = expected_hits(reference_engine, 8, table, flags)
    np.testing.assert_array_equal(r.hits["channel"], want.channel)
    np.testing.assert_array_equal(r.hits["flags"], want.flags)
    assert np.all(r.hits["flags"] & CHERENKOV) and np.all(r.hits["flags"] & SURFACE_DETECT)
    for i, k in enumerate(("dx", "dy", "dz", "polx", "poly", "polz", "wavelength", "time")):
        np.testing.assert_array_equal(r.hits[k], want.table[i])


@pytest.mark.parametrize("forced,frames", [("full", 12), ("compact", 5)])
def test_forced_reply_layout(det, forced, frames, intake):
    s = Server(det, intake=intake, reply_layout=forced)
    try:
        c = s.req(timeout_ms=10_000, retries=0)
        r13 = c.simulate(1, ev(200, 3))
        r14 = c.simulate(2, ev(200, 4), np.zeros(200, np.uint32))
        assert len(r13.frames) == frames and len(r14.frames) == frames
    finally:
        s.stop()


def test_zero_photon_event_is_valid_and_has_no_hits(server):
    r = server.req(timeout_ms=5000, retries=0).simulate(3, np.zeros((11, 0), np.float32))
    assert r.kind == P.SIM_COMPLETE and r.event_id == 3 and r.hits["channel"].size == 0


# ------------------------------------------------------------------ batching


def test_many_concurrent_clients_each_get_exactly_their_events(server, reference_engine):
    n_clients, per_client = 12, 4
    results, errors = {}, []

    def client(k):
        try:
            c = server.req(timeout_ms=20_000, retries=0)
            for j in range(per_client):
                eid = 1000 * k + j
                table = ev(500 + 37 * k, eid)
                r = c.simulate(eid, table)
                results[eid] = (r, table)
            c.close()
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(results) == n_clients * per_client
    for eid, (r, table) in results.items():
        assert r.event_id == eid
        np.testing.assert_array_equal(r.hits["channel"], expected_hits(reference_engine, eid, table).channel)
        np.testing.assert_array_equal(r.hits["time"], expected_hits(reference_engine, eid, table).table[7])


def test_pipelined_dealer_events_come_back_out_of_order_and_coalesced(det, reference_engine):
    gate = threading.Event()
    s = Server(det, engine_factory=lambda: GatedEngine(CPUEngine(det, EngineConfig(seed=SEED)), gate),
               max_batch_photons=2000, max_wait_ms=50)  # fmt: skip
    try:
        d = s.dealer()
        big = ev(9000, 50)  # split over 5 batches
        d.submit(50, big)
        small = {i: ev(100, i) for i in range(51, 71)}
        for i, t in small.items():
            d.submit(i, t)
        d.submit(71, np.zeros((11, 0), np.float32))  # needs no engine: overtakes everything in flight
        first = d.recv(5000)
        assert first.event_id == 71 and first.kind == P.SIM_COMPLETE
        gate.set()
        order = [d.recv(20_000) for _ in range(21)]
        assert sorted(r.event_id for r in order) == list(range(50, 71))
        by_id = {r.event_id: r for r in order}
        np.testing.assert_array_equal(by_id[50].hits["channel"], expected_hits(reference_engine, 50, big).channel)
        np.testing.assert_array_equal(by_id[50].hits["time"], expected_hits(reference_engine, 50, big).table[7])
        for i, t in small.items():
            np.testing.assert_array_equal(by_id[i].hits["time"], expected_hits(reference_engine, i, t).table[7])
        assert s.metric("charon_events_total") == 22
        assert s.metric("charon_photons_total") == 9000 + 2000
        assert s.metric("charon_batches_total") == 6  # 11000 photons in batches of 2000: coalesced
        assert s.metric("charon_batch_photons_count") == s.metric("charon_batches_total")
    finally:
        gate.set()
        s.stop()


def test_oversized_event_is_split_and_reassembled(det, reference_engine, intake):
    s = Server(det, intake=intake, max_batch_photons=1000, max_wait_ms=1)
    try:
        table = ev(3500, 9)
        r = s.req(timeout_ms=20_000, retries=0).simulate(9, table)
        want = expected_hits(reference_engine, 9, table)
        np.testing.assert_array_equal(r.hits["channel"], want.channel)
        np.testing.assert_array_equal(r.hits["time"], want.table[7])
        assert s.metric("charon_batches_total") == 4
    finally:
        s.stop()


def test_identical_resent_request_is_simulated_once_and_answers_newest(det, reference_engine, intake):
    gate = Gate()
    s = Server(det, intake=intake, max_batch_photons=100_000, max_wait_ms=0,
               engine_factory=lambda: GatedEngine(CPUEngine(det, EngineConfig(seed=SEED)), gate))  # fmt: skip
    try:
        blocker = s.dealer()
        blocker.submit(1, ev(100, 1))  # occupies the engine until the gate opens
        gate.wait_entered(1)
        table = ev(400, 2)
        first, second, third = s.dealer(), s.dealer(), s.dealer()
        first.submit(2, table)  # queued behind the blocker
        _wait_for(lambda: s.metric("charon_queued_photons") == 400, "the first request was not queued")
        second.submit(2, table)  # a Lazy-Pirate resend from a new socket: joins
        third.submit(2, ev(400, 3))  # same event id, different photons: a different request
        _wait_for(lambda: s.metric("charon_queued_photons") == 800, "the third request was not queued")
        _wait_for(lambda: s.metric("charon_duplicate_requests_total") == 1, "the resend was not joined")
        gate.set()
        r = second.recv(10_000)
        np.testing.assert_array_equal(r.hits["time"], expected_hits(reference_engine, 2, table).table[7])
        assert third.recv(10_000).event_id == 2
        with pytest.raises(TimeoutError):
            first.recv(300)  # the superseded requester gets nothing
        blocker.recv(10_000)
        assert s.metric("charon_photons_total") == 100 + 400 + 400
        for c in (blocker, first, second, third):
            c.close()
    finally:
        gate.set()
        s.stop()


def test_lazy_pirate_client_retry_is_joined(det, intake):
    class Slow(GatedEngine):
        def propagate(self, batch):
            time.sleep(0.6)
            return self.inner.propagate(batch)

    s = Server(det, intake=intake, max_wait_ms=0,
               engine_factory=lambda: Slow(CPUEngine(det, EngineConfig(seed=SEED)), None))  # fmt: skip
    try:
        c = s.req(timeout_ms=250, retries=20)  # resends while the 0.6 s batch runs; room for a slow CI host
        r = c.simulate(77, ev(300, 77))
        assert r.kind == P.SIM_COMPLETE and r.event_id == 77 and c.resends >= 1
        assert s.metric("charon_duplicate_requests_total") >= 1
        assert s.metric("charon_photons_total") == 300
    finally:
        s.stop()


# ------------------------------------------------------------------ bad input


def _good_frames(n=50, eid=5, flags=False):
    t = ev(n, eid)
    return photondata_frames(eid, t, np.zeros(n, np.uint32) if flags else None), t


def _mutations():
    """(name, frames, expected reason fragment)."""
    f, t = _good_frames()
    out = []
    out.append(("12 frames", f[:12], "13 or 14 frames"))
    out.append(("15 frames", f + [b"x" * 200, b"y"], "13 or 14 frames"))
    out.append(("20 frames", f + [b"z" * 8] * 7, "13 or 14 frames"))  # more parts than the compiled intake holds
    out.append(("1 frame", f[:1], "13 or 14 frames"))
    out.append(("short meta", [f[0], f[1][:4]] + f[2:], "meta frame must be 8 bytes"))
    g = list(f)
    g[5] = g[5][:-4]
    out.append(("ragged", g, "frame 'dx' has 49 values"))
    g = list(f)
    g[7] = g[7] + b"\x00\x00"
    out.append(("not multiple of 4", g, "not a multiple of 4"))
    g = list(f)
    g[1] = np.array([5, 60], "<u4").tobytes()
    out.append(("count mismatch", g, "meta says n_photons=60"))
    for row, val, why in [(0, np.nan, "non-finite"), (10, np.inf, "non-finite"), (9, 0.0, "non-positive wavelength"),
                          (9, -3.0, "non-positive wavelength")]:  # fmt: skip
        bad = t.copy()
        bad[row, 17] = val
        out.append((why, photondata_frames(5, bad), why))
    bad = t.copy()
    bad[3:6, 4] = 0
    out.append(("zero direction", photondata_frames(5, bad), "zero-length direction"))
    bad = t.copy()
    bad[6:9, 4] = 0
    out.append(("zero polarization", photondata_frames(5, bad), "zero-length polarization"))
    g = list(_good_frames(flags=True)[0])
    g[13] = g[13][:-4]
    out.append(("short flags", g, "frame 'flags'"))
    return out


@pytest.mark.parametrize("name,frames,reason", _mutations(), ids=[m[0] for m in _mutations()])
def test_malformed_request_gets_sim_failed_then_good_request_works(server, reference_engine, name, frames, reason):
    c = server.req(timeout_ms=5000, retries=0)
    r = decode_reply(c.request(frames))
    assert r.kind == P.SIM_FAILED, name
    assert reason in r.reason, (name, r.reason)
    if len(frames) > 1 and len(frames[1]) >= 4:
        assert r.event_id == 5
    else:
        assert r.event_id == P.UNKNOWN_EVENT
    assert server.metric("charon_failed_total", reason="bad_request") == 1
    assert_good_request_still_served(server.address, reference_engine)


def test_event_over_photon_limit(det, reference_engine, intake):
    s = Server(det, intake=intake, max_event_photons=1000)
    try:
        r = s.req(timeout_ms=5000, retries=0).simulate(4, ev(1001, 4))
        assert r.kind == P.SIM_FAILED and "over the limit of 1000" in r.reason and r.event_id == 4
        assert_good_request_still_served(s.address, reference_engine)
    finally:
        s.stop()


def test_full_queue_answers_busy_at_once_and_loses_nothing(det, reference_engine, intake):
    gate = Gate()
    s = Server(det, intake=intake, max_batch_photons=100_000, max_queued_photons=1000, max_wait_ms=0,
               engine_factory=lambda: GatedEngine(CPUEngine(det, EngineConfig(seed=SEED)), gate))  # fmt: skip
    try:
        d = s.dealer()
        d.submit(1, ev(600, 1))  # goes to the engine (blocked)
        gate.wait_entered(1)
        d.submit(2, ev(600, 2))  # queued: 600 of 1000 (one socket: read before the next)
        d.submit(3, ev(600, 3))  # would make 1200: busy
        r = d.recv(2000)
        assert r.kind == P.SIM_FAILED and r.event_id == 3 and r.reason.startswith("busy")
        # an event too big for the queue at all is refused with its own reason
        d.submit(4, ev(1001, 4))
        r4 = d.recv(2000)
        assert r4.kind == P.SIM_FAILED and "max-queued-photons" in r4.reason
        gate.set()
        assert sorted(d.recv(10_000).event_id for _ in range(2)) == [1, 2]
        assert s.metric("charon_failed_total", reason="busy") == 1
        assert_good_request_still_served(s.address, reference_engine)
        d.close()
    finally:
        gate.set()
        s.stop()


class FaultyEngine(GatedEngine):
    """Fails any batch containing a photon of wavelength 666 nm."""

    def propagate(self, batch):
        self.calls += 1
        if np.any(batch.table[9] == 666.0):
            raise RuntimeError("simulated device fault")
        return self.inner.propagate(batch)


def assert_only_the_guilty_failed(s, replies, tables, guilty, reason, reference_engine):
    """The guilty event is answered SIM_FAILED with the engine's error; every other gets its own hits."""
    assert replies[guilty].kind == P.SIM_FAILED and reason in replies[guilty].reason
    for i in set(tables) - {guilty}:
        assert replies[i].kind == P.SIM_COMPLETE
        np.testing.assert_array_equal(replies[i].hits["time"], expected_hits(reference_engine, i, tables[i]).table[7])
    assert s.metric("charon_failed_total", reason="engine_error") == 1


def test_engine_error_fails_only_the_guilty_event(det, reference_engine):
    holder = {}

    def factory():
        holder["e"] = FaultyEngine(CPUEngine(det, EngineConfig(seed=SEED)), None)
        return holder["e"]

    s = Server(det, engine_factory=factory, max_batch_photons=100_000, max_wait_ms=200)
    try:
        d = s.dealer()
        tables = {i: ev(200, i) for i in range(10)}
        tables[6][9, 3] = 666.0
        for i, t in tables.items():
            d.submit(i, t)
        replies = {r.event_id: r for r in (d.recv(20_000) for _ in range(10))}
        assert_only_the_guilty_failed(s, replies, tables, 6, "simulated device fault", reference_engine)
        assert holder["e"].calls > 2  # bisected
        assert_good_request_still_served(s.address, reference_engine)
        d.close()
    finally:
        s.stop()


def test_bare_dealer_without_delimiter_is_answered(server):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.address)
    sock.send_multipart([P.PING])
    assert sock.poll(5000)
    assert sock.recv_multipart() == [b"PONG"]
    sock.close(0)


def test_latency_split_metrics_time_the_wait_for_a_batch_and_the_engine_round_trip(det):
    """One event on an idle server with --max-wait-ms 60 --dispatch wait: its batch waits the full 60 ms for
    company, then the engine round trip; both are observed once, and together they fit in the event's time."""
    s = Server(det, max_wait_ms=60.0, dispatch="wait")
    try:
        t0 = time.monotonic()
        s.req(timeout_ms=5000, retries=0).simulate(1, ev(100, 1))
        took = time.monotonic() - t0
        m = s.srv.metrics.registry.get_sample_value
        deadline = time.monotonic() + 5  # the event's time is observed just after its reply is sent
        while m("charon_event_seconds_count") != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        # The server stops the event's clock after its send, so a descheduled server thread may stop it
        # after the client has its reply: the bound is the time until the count was seen (CI, under load).
        observed = time.monotonic() - t0
        assert m("charon_dispatch_wait_seconds_count") == 1 and m("charon_engine_roundtrip_seconds_count") == 1
        wait, trip = m("charon_dispatch_wait_seconds_sum"), m("charon_engine_roundtrip_seconds_sum")
        assert 0.06 <= wait < took
        assert 0 < trip and wait + trip <= m("charon_event_seconds_sum") <= observed
    finally:
        s.stop()


def test_dispatch_idle_sends_a_lone_event_at_once(det):
    """--dispatch idle (the default): the same lone event as above goes to the idle engine without waiting 60 ms."""
    s = Server(det, max_wait_ms=60.0, dispatch="idle")
    try:
        s.req(timeout_ms=5000, retries=0).simulate(1, ev(100, 1))
        m = s.srv.metrics.registry.get_sample_value
        assert m("charon_dispatch_wait_seconds_count") == 1
        assert m("charon_dispatch_wait_seconds_sum") < 0.03
    finally:
        s.stop()


def test_dispatch_idle_still_coalesces_while_the_engine_runs(det, reference_engine):
    """Under load nothing changes: what arrives while a batch runs waits for the engine and goes as one batch."""
    gate = threading.Event()
    s = Server(det, engine_factory=lambda: GatedEngine(CPUEngine(det, EngineConfig(seed=SEED)), gate),
               max_batch_photons=100_000, max_wait_ms=0, dispatch="idle")  # fmt: skip
    try:
        d = s.dealer()
        tables = {i: ev(100, i) for i in range(21)}
        d.submit(0, tables[0])
        deadline = time.monotonic() + 10  # the first event is in the engine (held by the gate) on its own
        while s.metric("charon_dispatch_wait_seconds_count") < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        for i in range(1, 21):
            d.submit(i, tables[i])
        deadline = time.monotonic() + 10
        while s.metric("charon_queued_photons") < 2000 and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.05)  # the busy engine holds them back: none may leave the queue meanwhile
        assert s.metric("charon_queued_photons") == 2000 and s.metric("charon_dispatch_wait_seconds_count") == 1
        gate.set()
        replies = {r.event_id: r for r in (d.recv(20_000) for _ in range(21))}
        for i, t in tables.items():
            assert replies[i].kind == P.SIM_COMPLETE
            np.testing.assert_array_equal(replies[i].hits["time"], expected_hits(reference_engine, i, t).table[7])
        assert s.metric("charon_batches_total") == 2
        assert s.metric("charon_batch_photons_sum") == 2100
    finally:
        s.stop()


# What runs a laned engine's batches (engine_thread.py, engine_loop.py): each lanes test runs with both.
DRIVERS = ["thread", "loop"]


def _laned_server(det, lanes=2, fail_at=None, **kw):
    holder = {}

    def factory():
        holder["e"] = LanedEngine(CPUEngine(det, EngineConfig(seed=SEED)), lanes=lanes, fail_at=fail_at)
        return holder["e"]

    if kw.get("engine_driver") == "loop":
        kw["engine"] = "cuda"  # the stand-in plays the CUDA engine's asynchronous calls (a config with cpu is refused)
    s = Server(det, engine_factory=factory, max_batch_photons=100_000, **kw)
    return s, holder["e"]


def _wait_for(cond, what, timeout=10):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


@pytest.mark.parametrize("driver", DRIVERS)
def test_lanes_start_a_lone_event_beside_the_running_one(det, reference_engine, driver):
    """--engine-lanes 2 in one process: an event that arrives while another's batch runs starts on the
    second lane at once (the GPU runs both), instead of waiting for the first to finish."""
    s, eng = _laned_server(det, max_wait_ms=60.0, engine_driver=driver)
    try:
        assert s.srv.engine_thread.lanes == 2 and s.srv.engine_thread.max_in_flight == 3
        d = s.dealer()
        tables = {i: ev(100, i) for i in range(3)}
        d.submit(0, tables[0])
        _wait_for(lambda: len(eng.launched) == 1, "the first event was not launched")
        d.submit(1, tables[1])
        _wait_for(lambda: len(eng.launched) == 2, "the second event waited for the first")
        assert eng.running == 2 and eng.launched == [1, 1]
        # Both lanes busy: a third waits in the queue, whatever its size.
        d.submit(2, tables[2])
        _wait_for(lambda: s.metric("charon_queued_photons") == 100, "the third event was not queued")
        time.sleep(0.05)
        assert len(eng.launched) == 2
        eng.gates[0].set()
        _wait_for(lambda: len(eng.launched) == 3, "the third event did not take the freed lane")
        for g in eng.gates:
            g.set()
        replies = {r.event_id: r for r in (d.recv(20_000) for _ in range(3))}
        for i, t in tables.items():
            assert replies[i].kind == P.SIM_COMPLETE
            np.testing.assert_array_equal(replies[i].hits["time"], expected_hits(reference_engine, i, t).table[7])
        # The loop counts a batch before sending its replies, so the third is counted once it is read.
        assert eng.max_running == 2 and s.metric("charon_batches_total") == 3
    finally:
        for g in eng.gates:
            g.set()
        s.stop()


@pytest.mark.parametrize("driver", DRIVERS)
def test_lanes_do_not_start_a_smaller_batch_beside_a_running_one(det, driver):
    """Behind a running batch, a free lane takes the queue only once it is as large as the latest batch
    submitted (the shared engine's rule): under load, batches do not shrink to whatever just arrived."""
    s, eng = _laned_server(det, max_wait_ms=0.0, engine_driver=driver)
    try:
        d = s.dealer()
        d.submit(0, ev(100, 0))
        _wait_for(lambda: len(eng.launched) == 1, "first launch")
        d.submit(1, ev(100, 1))
        _wait_for(lambda: len(eng.launched) == 2, "second launch")
        for i in range(2, 8):  # both lanes busy: six events queue up
            d.submit(i, ev(100, i))
        _wait_for(lambda: s.metric("charon_queued_photons") == 600, "six queued")
        eng.gates[0].set()  # a lane frees: the six go together
        _wait_for(lambda: len(eng.launched) == 3, "the six did not take the freed lane")
        assert eng.launched[2] == 6
        eng.gates[1].set()
        _wait_for(lambda: eng.running == 1, "second batch finished")
        d.submit(8, ev(100, 8))  # one event beside a batch of six: it waits
        _wait_for(lambda: s.metric("charon_queued_photons") == 100, "queued")
        time.sleep(0.05)
        assert len(eng.launched) == 3
        for i in range(9, 14):  # now six queued, as large as the running batch: they start beside it
            d.submit(i, ev(100, i))
        _wait_for(lambda: len(eng.launched) == 4, "six queued events did not start beside six")
        assert eng.launched[3] == 6 and eng.running == 2
        for g in eng.gates:
            g.set()
        assert sorted(d.recv(20_000).event_id for _ in range(14)) == list(range(14))
    finally:
        for g in eng.gates:
            g.set()
        s.stop()


def test_lanes_look_at_a_long_batch_less_often_as_it_runs(det):
    """A batch running beside a free lane: the engine thread checks it after 50 us, then after a
    sixteenth of its time so far, so half a second costs ~130 checks (each takes the GIL from the
    socket loop), not one per 50 us."""
    s, eng = _laned_server(det, max_wait_ms=0.0)
    try:
        d = s.dealer()
        d.submit(0, ev(100, 0))
        _wait_for(lambda: len(eng.launched) == 1, "first launch")
        t0 = time.monotonic()
        time.sleep(0.5)
        calls = eng.ready_calls
        eng.gates[0].set()
        assert d.recv(10_000).event_id == 0
        elapsed = time.monotonic() - t0
        # Checked all along, but not every 50 us (10 000 in 0.5 s). ~150 on an idle host; a starved thread
        # oversleeps each check and makes fewer, hence the low floor.
        assert 5 < calls < 400, calls
        assert elapsed < 0.5 + 1.0  # noticed soon after the gate opened (about a sixteenth of its time; slack for CI)
    finally:
        for g in eng.gates:
            g.set()
        s.stop()


def test_loop_driver_spins_while_a_batch_runs_but_counts_no_host_time_for_it(det, reference_engine):
    """--engine-driver loop: while a batch runs the loop turns without sleeping (it checks the GPU, ~1000s
    of times here), and those turns are waiting, not host work: charon_host_seconds grows by what the event
    itself cost, not by the half second the batch was held."""
    s, eng = _laned_server(det, max_wait_ms=0.0, engine_driver="loop")
    try:
        d = s.dealer()
        table = ev(100, 0)
        d.submit(0, table)
        _wait_for(lambda: len(eng.launched) == 1, "first launch")
        host0, checks0 = s.metric("charon_host_seconds_total"), eng.ready_calls
        time.sleep(0.5)
        held_host, checks = s.metric("charon_host_seconds_total") - host0, eng.ready_calls - checks0
        eng.gates[0].set()
        r = d.recv(10_000)
        assert r.kind == P.SIM_COMPLETE
        np.testing.assert_array_equal(r.hits["time"], expected_hits(reference_engine, 0, table).table[7])
        assert checks > 100, checks  # it looked at the GPU all along (the thread driver: ~150 in 0.5 s at most)
        assert held_host < 0.05, held_host
    finally:
        for g in eng.gates:
            g.set()
        s.stop()


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("fail_at", ["launch", "finish"])
def test_lanes_engine_error_fails_only_the_guilty_event(det, reference_engine, fail_at, driver):
    s, eng = _laned_server(det, fail_at=fail_at, max_wait_ms=100.0, dispatch="wait", engine_driver=driver)
    try:
        d = s.dealer()
        tables = {i: ev(200, i) for i in range(6)}
        tables[4][9, 3] = 666.0
        for i, t in tables.items():
            d.submit(i, t)
        for g in eng.gates:  # gates of launches made so far; later ones are opened as they come
            g.set()
        replies = {}
        deadline = time.monotonic() + 20
        while len(replies) < 6:
            assert time.monotonic() < deadline, "not every event was answered"
            for g in eng.gates:
                g.set()
            if d.sock.poll(20):
                r = d.recv(1000)
                replies[r.event_id] = r
        assert_only_the_guilty_failed(s, replies, tables, 4, f"simulated {fail_at} fault", reference_engine)
    finally:
        for g in eng.gates:
            g.set()
        s.stop()


def _engine_state(**kw):
    """What _poll_timeout_ms reads of an engine thread, with no result due at a given time (due_ms None)."""
    from types import SimpleNamespace

    return SimpleNamespace(due_ms=lambda: None, **kw)


def test_poll_timeout_until_the_next_batch_is_due(det, monkeypatch):
    """Milliseconds until the oldest event's wait is over (fractions kept: charon.sockets.poll waits them)."""
    from types import SimpleNamespace

    import charon.server as server_mod
    from charon.server import BatchServer

    srv = BatchServer(ServerConfig(bind="tcp://127.0.0.1:0", engine="cpu", max_wait_ms=1.0, dispatch="wait"),
                      detector=det)  # fmt: skip
    srv.engine_thread = _engine_state(in_flight=0, pipelined=False, max_in_flight=2, lanes=1, last_submitted=0)
    monkeypatch.setattr(server_mod.time, "monotonic", lambda: 100.0)
    monkeypatch.setattr(srv.batcher.queue, "oldest_arrival", lambda: 100.0 - 0.0007)
    assert srv._poll_timeout_ms() == pytest.approx(0.3)
    monkeypatch.setattr(srv.batcher.queue, "oldest_arrival", lambda: 100.0 - 0.002)
    assert srv._poll_timeout_ms() == 0.0  # overdue: dispatch now

    # --dispatch idle: due at once while none of this process's batches is in the engine, else as before.
    srv._dispatch_idle = True
    monkeypatch.setattr(srv.batcher.queue, "oldest_arrival", lambda: 100.0 - 0.0007)
    assert srv._poll_timeout_ms() == 0.0
    for pipelined in (False, True):
        srv.engine_thread = _engine_state(in_flight=1, pipelined=pipelined, max_in_flight=8, lanes=1,
                                            last_submitted=0)  # fmt: skip
        assert srv._poll_timeout_ms() == (pytest.approx(0.3) if pipelined else 100.0)
    # --engine-lanes 2 in one process: a free lane beside the running batch takes the queue at once when
    # it holds as many photons as the batch submitted last, else the queue waits for a result.
    monkeypatch.setattr(srv.batcher, "queued_photons", 500)
    for last, want in ((500, 0.0), (501, 100.0)):
        srv.engine_thread = _engine_state(in_flight=1, pipelined=False, max_in_flight=3, lanes=2, last_submitted=last)
        assert srv._poll_timeout_ms() == want
    srv.engine_thread = _engine_state(in_flight=2, pipelined=False, max_in_flight=3, lanes=2, last_submitted=1)
    assert srv._poll_timeout_ms() == 100.0  # both lanes busy
    monkeypatch.setattr(srv.batcher.queue, "oldest_arrival", lambda: None)
    assert srv._poll_timeout_ms() == 100.0  # nothing queued: only a message or a result can wake it
    # --engine-driver loop: nothing wakes the loop when a batch is done, so it sleeps no longer than the
    # engine says (engine_loop.py), whatever else it waits for.
    srv.engine_thread = SimpleNamespace(due_ms=lambda: 0.4, in_flight=2, pipelined=False, max_in_flight=3, lanes=2,
                                        last_submitted=1)  # fmt: skip
    assert srv._poll_timeout_ms() == pytest.approx(0.4)
    monkeypatch.setattr(srv.batcher.queue, "oldest_arrival", lambda: 100.0 - 0.0007)
    srv._dispatch_idle = False
    srv.engine_thread.in_flight = 1
    assert srv._poll_timeout_ms() == pytest.approx(0.3)  # the queue's wait ends first


def test_metrics_endpoint_serves_prometheus_text(det):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    s = Server(det, metrics_port=port)
    try:
        s.req(timeout_ms=5000, retries=0).simulate(1, ev(100, 1))
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        for name in ("charon_events_total 1.0", "charon_photons_total 100.0", "charon_hits_total",
                     "charon_batches_total 1.0", "charon_failed_total", "charon_duplicate_requests_total",
                     "charon_queued_photons", "charon_batch_photons_bucket", "charon_batch_seconds_bucket",
                     "charon_engine_busy_fraction"):  # fmt: skip
            assert name in text, name
        if sys.platform.startswith("linux"):  # the process's own figures, which prometheus-client reads from /proc
            from prometheus_client.parser import text_string_to_metric_families

            samples = [x for fam in text_string_to_metric_families(text) for x in fam.samples]
            value = {x.name: x.value for x in samples if not x.labels}
            assert 1e7 < value["process_resident_memory_bytes"] < 1e11 and value["process_open_fds"] > 3
            # Each thread's CPU time and wait for a CPU, by thread (label values may hold spaces: "Thread-1 (...)")
            cpu = {x.labels["thread"]: x.value for x in samples if x.name == "process_thread_cpu_seconds_total"}
            wait = {x.labels["thread"]: x.value for x in samples if x.name == "process_thread_wait_seconds_total"}
            assert cpu["MainThread"] > 0 and wait.keys() == cpu.keys() and min(wait.values()) >= 0
            if _mallinfo2() is not None:  # the C heap's own account (glibc)
                assert 1e5 < value["process_malloc_in_use_bytes"] < value["process_resident_memory_bytes"]
                assert value["process_malloc_free_bytes"] >= 0 and value["process_malloc_arena_bytes"] > 0
    finally:
        s.stop()


def test_value_check_is_compiled_before_the_first_request():
    """A fresh server compiles the request check at start-up, for the arrays requests arrive as
    (float32 views of zmq.Frames): the first event then finds it compiled and adds no signature."""
    code = """
import zmq
from charon import protocol as P
from charon.client import photondata_frames
from charon.geometry.builtin import sphere_detector
from charon.server import ServerConfig, run_in_thread
from charon.sources import random_event
import numpy as np
assert not P._check_values.signatures
srv, th = run_in_thread(ServerConfig(bind="tcp://127.0.0.1:0", engine="cpu", metrics_port=None),
                        detector=sphere_detector(500.0, subdivisions=1))
try:
    compiled = list(P._check_values.signatures)
    frames = [zmq.Frame(f) for f in photondata_frames(3, random_event(10, np.random.default_rng(1)))]
    P.decode_photondata(frames, 100)
    print(len(compiled), len(P._check_values.signatures))
finally:
    srv.stop()
    th.join(10)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "1"]


def test_full_hits_round_trip_and_malformed_replies_are_named():
    """decode_full_hits (the router reading a worker's reply for a run file) against encode_hits."""
    rng = np.random.default_rng(3)
    n = 7
    hits = HitBatch(rng.integers(0, 50, n).astype(np.uint32), rng.random((8, n), dtype=np.float32),
                    rng.integers(0, 1 << 12, n).astype(np.uint32), np.array([0, n], np.int64))  # fmt: skip
    frames = [bytes(memoryview(f)) for f in P.encode_hits(9, hits, P.Layout.FULL)]
    got = P.decode_full_hits(frames)
    np.testing.assert_array_equal(got.channel, hits.channel)
    np.testing.assert_array_equal(got.table, hits.table)
    np.testing.assert_array_equal(got.flags, hits.flags)
    np.testing.assert_array_equal(got.offsets, [0, n])
    compact = [bytes(memoryview(f)) for f in P.encode_hits(9, hits, P.Layout.COMPACT)]
    for bad, problem in [(compact, "not a full-layout"), (frames[:2] + [b"abc"] + frames[3:], "not a multiple of 4"),
                         (frames[:5] + [frames[5][:-4]] + frames[6:], "frame 5 has 24 bytes")]:  # fmt: skip
        with pytest.raises(ValueError, match=problem):
            P.decode_full_hits(bad)


def test_server_config_and_cli_refuse_an_unknown_dispatch_rule():
    from charon.cli import batch_parser

    with pytest.raises(ValueError, match="--dispatch must be one of idle, wait"):
        ServerConfig(dispatch="eager").validate()
    assert ServerConfig().dispatch == "idle"
    for rule in ("wait", "idle"):
        ServerConfig(dispatch=rule).validate()
        assert batch_parser().parse_args(["--dispatch", rule]).dispatch == rule
    with pytest.raises(SystemExit):
        batch_parser().parse_args(["--dispatch", "eager"])


def test_abbreviated_flags_are_refused(capsys):
    """The launchers hand argv on to their children and drop flags by full name (cli._strip_flags): an
    abbreviation such as --output-d would reach a --gpus worker, which refuses --output-dir."""
    from charon.cli import _strip_flags, batch_main, router_main

    argv = ["--gpus", "0,1", "--output-dir=/tmp", "--output-idle-seconds", "5", "--engine", "cpu"]
    assert _strip_flags(argv, ("--gpus", "--output-dir", "--output-idle-seconds")) == ["--engine", "cpu"]
    for main, flag in ((batch_main, "--output-d"), (router_main, "--front")):
        with pytest.raises(SystemExit) as exc:
            main([flag, "x"])
        assert exc.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def _stopping(s: Server, gate=None, at=0.3):
    """Stop the server from another thread (as a signal handler would), opening ``gate`` ``at`` s later."""
    s.srv.stop()
    if gate is not None:
        threading.Timer(at, gate.set).start()


def test_stop_answers_the_events_already_received_before_it_exits(det, reference_engine):
    """SIGTERM (stop()) while a batch runs and more events wait: every event the server had received is
    answered, as if it kept running; a request sent after the stop is not read; then the loop ends."""
    gate = threading.Event()
    s = Server(det, engine_factory=lambda: GatedEngine(CPUEngine(det, EngineConfig(seed=SEED)), gate),
               max_batch_photons=300)  # fmt: skip
    try:
        d = s.dealer()
        tables = {i: ev(200, i) for i in range(5)}  # a 300-photon cap: several batches, the first held
        for i, t in tables.items():
            d.submit(i, t)
        deadline = time.monotonic() + 10
        while len(s.srv.by_key) < 5:  # all five received (len() of the loop's dict: safe from here)
            assert time.monotonic() < deadline, "the events did not arrive"
            time.sleep(0.01)
        _stopping(s, gate)
        time.sleep(0.1)
        d.submit(99, ev(200, 99))  # after the stop: left unread
        got = {r.event_id: r for r in (d.recv(10_000) for _ in tables)}
        assert sorted(got) == sorted(tables)
        for i, t in tables.items():
            np.testing.assert_array_equal(got[i].hits["channel"], reference_engine.propagate(
                PhotonBatch.from_events([t.copy()], [i])).event(0).channel)  # fmt: skip
        s.thread.join(10)
        assert not s.thread.is_alive()
        with pytest.raises(TimeoutError):
            d.recv(200)
    finally:
        gate.set()
        s.stop()


@pytest.mark.parametrize("how", ["deadline", "second stop", "no drain"])
def test_stop_waits_no_longer_than_drain_seconds_and_a_second_stop_ends_it_at_once(det, how):
    gate = threading.Event()  # opened only once the drain is over: until then the event cannot finish
    drain = {"deadline": 0.5, "second stop": 60.0, "no drain": 0.0}[how]
    s = Server(det, engine_factory=lambda: GatedEngine(CPUEngine(det, EngineConfig(seed=SEED)), gate),
               drain_seconds=drain)  # fmt: skip
    closing = []  # when the loop gave up waiting and began to close (the engine call itself cannot be cut)
    close = s.srv._close
    s.srv._close = lambda: (closing.append(time.monotonic()), close())
    try:
        d = s.dealer()
        d.submit(1, ev(200, 1))
        deadline = time.monotonic() + 10
        while not s.srv.by_key:
            assert time.monotonic() < deadline, "the event did not arrive"
            time.sleep(0.01)
        t0 = time.monotonic()
        s.srv.stop()
        if how == "second stop":
            time.sleep(0.3)
            assert not closing  # still draining
            s.srv.stop()
        while not closing:
            assert time.monotonic() < t0 + 10, "the loop did not stop"
            time.sleep(0.01)
        took = closing[0] - t0
        assert took < {"deadline": 3.0, "second stop": 3.0, "no drain": 2.0}[how]
        if how == "deadline":
            assert took >= 0.5
    finally:
        gate.set()
        s.stop()


def test_drain_seconds_must_not_be_negative():
    with pytest.raises(ValueError, match="--drain-seconds"):
        ServerConfig(drain_seconds=-1).validate()
