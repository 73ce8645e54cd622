"""The shared engine of ``--procs``: codec, merge bookkeeping, and front ends on real sockets.

Front ends are ordinary servers (threads here) whose batches go to one
EngineService over ipc/tcp loopback; every reply must equal the event
propagated alone (batch invariance), however the service merged it.
"""

import contextlib
import os
import re
import threading

import numpy as np
import pytest
import zmq

from charon import protocol as P
from charon.client import DealerClient, ReqClient
from charon.kernels.reference import photon_slots_ref
from charon.engine_service import (BATCH, HITS, REFUSED, RELEASE, EngineService, MappedSegment, MergeBuffer,
                                   SubBatch, decode_batch, decode_batch_shm, decode_hits, encode_batch,
                                   encode_batch_shm, encode_hits)  # fmt: skip
from charon.handoff import Segment, SharedHostBuffer
from charon.handoff import available as shm_available
from charon.engines.base import EngineConfig
from charon.engines.cpu import CPUEngine
from charon.geometry.builtin import sphere_detector
from charon.geometry.optics import constant_surface
from charon.photons import N_ROWS, HitBatch, PhotonBatch
from charon.server import ServerConfig, run_in_thread
from charon.sources import random_event

SEED = 77


@pytest.fixture(scope="module")
def det():
    wall = constant_surface("grey", detect=0.3, absorb=0.5, reflect_diffuse=0.2)
    return sphere_detector(1000.0, wall_surface=wall, subdivisions=2)


@pytest.fixture(scope="module")
def ref(det):
    return CPUEngine(det, EngineConfig(seed=SEED))


def ev(n, seed):
    return random_event(n, np.random.default_rng(seed), radius=500.0)


def alone(ref, eid, table) -> HitBatch:
    return ref.propagate(PhotonBatch.from_events([table.copy()], [eid])).event(0)


def sub_of(tables, ids, first=None):
    b = PhotonBatch.from_events(tables, ids, first_index=first)
    frames = encode_batch(5, b)
    _, sub = decode_batch([bytes(memoryview(f)) for f in frames[1:]])
    return sub


# ------------------------------------------------------------------ codec
def test_batch_and_hits_codec_round_trip():
    b = PhotonBatch.from_events([ev(30, 1), ev(7, 2)], [11, 12], first_index=[0, 40])
    bid, sub = decode_batch([bytes(memoryview(f)) for f in encode_batch(9, b)[1:]])
    assert bid == 9 and sub.n_events == 2 and sub.n_photons == 37
    np.testing.assert_array_equal(sub.table, b.table)
    np.testing.assert_array_equal(sub.event_id, [11, 12])
    np.testing.assert_array_equal(sub.first_index, [0, 40])
    hits = HitBatch(np.arange(3, dtype=np.uint32), np.arange(24, dtype=np.float32).reshape(8, 3),
                    np.ones(3, np.uint32), np.array([0, 1, 3]))  # fmt: skip
    frames = encode_hits(4, hits, np.array([False, True]), "boom", 0.5)
    bid, h, failed, err, sec = decode_hits([bytes(memoryview(f)) for f in frames[1:]])
    assert (bid, err, sec) == (4, "boom", 0.5) and failed.tolist() == [False, True]
    for name in ("channel", "table", "flags", "offsets"):
        np.testing.assert_array_equal(getattr(h, name), getattr(hits, name))
    # Nothing failed: neither the failed slots nor the error travel.
    for none_failed in (None, np.zeros(2, bool)):
        frames = encode_hits(5, hits, none_failed, "", 0.25)
        assert len(frames) == 2  # HITS, body
        bid, h, failed, err, sec = decode_hits([bytes(memoryview(f)) for f in frames[1:]])
        assert (bid, failed, err, sec) == (5, None, "", 0.25)
        for name in ("channel", "table", "flags", "offsets"):
            np.testing.assert_array_equal(getattr(h, name), getattr(hits, name))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda f: f[:-1], "expected 7"),
        (lambda f: [f[0][:5], *f[1:]], "head has 5 bytes"),
        (lambda f: [f[0], f[1][:-4], *f[2:]], "table frame"),
        (lambda f: [*f[:2], f[2] + b"\0\0\0\0", *f[3:]], "flags frame"),
        (lambda f: [*f[:3], np.array([0, 9, 3], np.int64).tobytes(), *f[4:]], "offsets are not"),
        (lambda f: [*f[:3], np.array([0, 1, 2], np.int64).tobytes(), *f[4:]], "offsets are not"),
        (lambda f: [*f[:4], f[4][:4], f[5]], "event_id frame"),
        (lambda f: [*f[:5], b""], "first_index frame"),
    ],
)
def test_decode_batch_rejects_malformed_frames(mutate, message):
    b = PhotonBatch.from_events([ev(2, 1), ev(1, 2)], [1, 2])
    frames = [bytes(memoryview(f)) for f in encode_batch(1, b)[1:]]
    with pytest.raises(ValueError, match=message):
        decode_batch(mutate(frames))


def test_decode_hits_rejects_malformed_frames():
    import charon.engine_service as es

    hits = HitBatch(np.zeros(2, np.uint32), np.zeros((8, 2), np.float32), np.zeros(2, np.uint32), np.array([0, 2]))
    body, failed, error = [bytes(memoryview(f)) for f in encode_hits(1, hits, np.ones(1, bool), "x", 0.0)[1:]]
    assert len(body) == 32 + 8 * 2 + 40 * 2
    for frames, message in [
        ([body, failed], "has 3 frames, expected 2"),
        ([body, failed, error, b""], "has 5 frames, expected 2"),
        ([body[:-4], failed, error], "body has 124 bytes, expected 128"),
        ([body + bytes(8)], "body has 136 bytes, expected 128"),
        ([body[:3]], "3 bytes, shorter than its 32-byte head"),
        ([es._HITS_HEAD.pack(1, 1, 3, 0.0) + body[32:]], "expected 168"),  # the head claims a third hit
        ([es._HITS_HEAD.pack(1, 2, 2, 0.0) + body[32:]], "expected 136"),  # ... or a second slot
        ([body, b"", error], "failed frame"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            decode_hits(frames)
    assert decode_hits([body])[1].n_hits == 2  # the same body, well formed, decodes


# ------------------------------------------------------------------ merging
def test_merge_buffer_equals_concatenation_and_engine_results_split_back(ref):
    tables = [ev(40, i) for i in range(5)]
    subs = [sub_of(tables[:2], [0, 1]), sub_of(tables[2:3], [2], first=[100]), sub_of(tables[3:], [3, 4])]
    buf = MergeBuffer(1000)
    for s in subs:
        assert buf.fits(s)
        buf.append(s)
    merged = buf.seal(contiguous=True).photons
    want = PhotonBatch.from_events(tables, [0, 1, 2, 3, 4], first_index=[0, 0, 100, 0, 0])
    for name in ("table", "flags", "slot", "offsets", "event_id", "first_index"):
        np.testing.assert_array_equal(getattr(merged, name), getattr(want, name), err_msg=name)
    strided = MergeBuffer(1000)
    for s in subs:
        strided.append(s)
    np.testing.assert_array_equal(strided.seal(contiguous=False).photons.table, want.table)
    # Hits of the merged call, sliced per sub-batch and per slot, equal each event alone.
    hits = ref.propagate(merged)
    e = 0
    for s in subs:
        part = hits.slot_range(e, e + s.n_events)
        for k in range(s.n_events):
            a = alone(ref, e + k, tables[e + k]) if e + k != 2 else None
            if a is not None:
                np.testing.assert_array_equal(part.event(k).channel, a.channel)
        e += s.n_events
    assert not buf.fits(sub_of([ev(900, 9)], [9]))


def test_merge_buffer_event_limit_keeps_one_event_per_call():
    buf = MergeBuffer(1000, max_events=1)
    one, two = sub_of([ev(5, 1)], [1]), sub_of([ev(5, 2)], [2])
    assert buf.fits(one)
    buf.append(one)
    assert not buf.fits(two)
    assert MergeBuffer(1000, max_events=2).fits(two)


def test_concat_slots_inverts_slot_range():
    hits = HitBatch(np.arange(6, dtype=np.uint32), np.zeros((8, 6), np.float32), np.zeros(6, np.uint32),
                    np.array([0, 2, 2, 5, 6]))  # fmt: skip
    back = HitBatch.concat_slots([hits.slot_range(0, 1), hits.slot_range(1, 3), hits.slot_range(3, 4)])
    np.testing.assert_array_equal(back.offsets, hits.offsets)
    np.testing.assert_array_equal(back.channel, hits.channel)


# ------------------------------------------------------- service + front ends
class Recording:
    """Wraps an engine: records each call's events; fails on wavelength 666 nm; may hold calls at a gate."""

    def __init__(self, inner, gate=None):
        self.inner, self.gate = inner, gate
        self.name, self.last_times = "recording", inner.last_times
        self.calls: list[np.ndarray] = []

    def warm_up(self):
        pass

    def propagate(self, batch):
        self.calls.append(batch.event_id.copy())
        if self.gate is not None:
            assert self.gate.wait(30)
        if np.any(batch.table[9] == 666.0):
            raise RuntimeError("simulated device fault")
        return self.inner.propagate(batch)

    def close(self):
        pass


class Shared:
    """An EngineService and ``n`` front-end servers in threads, as ``--procs n`` runs them in processes."""

    def __init__(self, det, n=2, gate=None, max_batch_photons=50_000, max_wait_ms=1.0, handoff="auto"):
        self.engine = Recording(CPUEngine(det, EngineConfig(seed=SEED)), gate)
        self.service = EngineService(lambda: self.engine, "tcp://127.0.0.1:*", max_batch_photons)
        self.service.start(30)
        self.fronts = [run_in_thread(ServerConfig(bind="tcp://127.0.0.1:0", engine="cpu", seed=SEED,
                                                  max_batch_photons=max_batch_photons, max_wait_ms=max_wait_ms,
                                                  engine_service=self.service.address, handoff=handoff),
                                     detector=det)
                       for _ in range(n)]  # fmt: skip
        self.clients = []

    def dealer(self, i):
        c = DealerClient(self.fronts[i][0].address)
        self.clients.append(c)
        return c

    def stop(self):
        for c in self.clients:
            c.close()
        for srv, th in self.fronts:
            srv.stop()
            th.join(10)
            assert not th.is_alive()
        self.service.stop()
        self.service.join(10)
        assert not self.service.is_alive()


@pytest.mark.parametrize("handoff", [
    pytest.param("shm", marks=pytest.mark.skipif(not shm_available(), reason="needs /dev/shm")), "socket"])
def test_front_ends_batches_are_merged_into_one_engine_call(det, ref, handoff):
    gate = threading.Event()
    sh = Shared(det, n=2, gate=gate, handoff=handoff)
    try:
        a, b = sh.dealer(0), sh.dealer(1)
        tables = {i: ev(300, i) for i in range(8)}
        a.submit(0, tables[0])  # occupies the engine until the gate opens
        deadline = 100
        while not sh.engine.calls and deadline:
            threading.Event().wait(0.05)
            deadline -= 1
        for i in range(1, 8):
            (a if i % 2 else b).submit(i, tables[i])
        threading.Event().wait(0.5)  # both front ends hand their batches over while the engine is held
        gate.set()
        replies = {r.event_id: r for r in (c.recv(20_000) for c in [a] * 5 + [b] * 3)}
        assert sorted(replies) == list(range(8))
        for i, r in replies.items():
            assert r.kind == P.SIM_COMPLETE
            np.testing.assert_array_equal(r.hits["channel"], alone(ref, i, tables[i]).channel)
            np.testing.assert_array_equal(r.hits["time"], alone(ref, i, tables[i]).table[7])
        # Call 0 had event 0 alone; call 1 merged the other seven from both front ends.
        assert [sorted(c.tolist()) for c in sh.engine.calls] == [[0], list(range(1, 8))]
        m = sh.service.metrics.registry.get_sample_value
        assert m("charon_batches_total") == 2 and m("charon_photons_total") == 2400
        # The CPU engine's stages are all compute: kernel time and busy time agree (both counted by the service).
        busy = m("charon_engine_seconds_total")
        assert busy > 0 and m("charon_engine_compute_seconds_total") == pytest.approx(busy)
        fm = sh.fronts[0][0].metrics.registry.get_sample_value
        assert fm("charon_batches_total") == 0 and fm("charon_events_total") == 5  # engine figures live in the service
        other = {"shm": "socket", "socket": "shm"}[handoff]
        assert m("charon_handoff_batches_total", {"path": handoff}) >= 3  # event 0, then each front end's
        assert m("charon_handoff_batches_total", {"path": other}) in (None, 0.0)
    finally:
        gate.set()
        sh.stop()


def test_engine_error_in_merged_batch_fails_only_the_guilty_event(det, ref):
    gate = threading.Event()
    sh = Shared(det, n=2, gate=gate)
    try:
        a, b = sh.dealer(0), sh.dealer(1)
        a.submit(100, ev(50, 100))
        threading.Event().wait(0.3)
        tables = {i: ev(200, i) for i in range(6)}
        tables[4][9, 7] = 666.0
        for i, t in tables.items():
            (a if i < 3 else b).submit(i, t)
        threading.Event().wait(0.5)
        gate.set()
        replies = {r.event_id: r for r in (c.recv(20_000) for c in [a] * 4 + [b] * 3)}
        assert replies[4].kind == P.SIM_FAILED and "simulated device fault" in replies[4].reason
        for i in (0, 1, 2, 3, 5):
            assert replies[i].kind == P.SIM_COMPLETE
            np.testing.assert_array_equal(replies[i].hits["channel"], alone(ref, i, tables[i]).channel)
        # The front end that sent event 4 still serves.
        b.submit(50, ev(100, 50))
        assert b.recv(20_000).kind == P.SIM_COMPLETE
    finally:
        gate.set()
        sh.stop()


def test_service_refuses_malformed_batch_and_keeps_serving(det, ref):
    sh = Shared(det, n=1)
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(sh.service.address)
    try:
        good = [bytes(memoryview(f)) for f in encode_batch(3, PhotonBatch.from_events([ev(5, 1)], [1]))]
        raw.send_multipart([BATCH, good[1], good[2][:-4], *good[3:]])
        assert raw.poll(10_000)
        kind, head, reason = raw.recv_multipart()
        assert kind == REFUSED and int.from_bytes(head, "little") == 3 and b"table frame" in reason
        too_big = [bytes(memoryview(f)) for f in encode_batch(4, PhotonBatch.from_events([ev(60_000, 1)], [1]))]
        raw.send_multipart(too_big)
        assert raw.poll(10_000)
        kind, head, reason = raw.recv_multipart()
        assert kind == REFUSED and b"exceed" in reason
        raw.send_multipart(good)  # the same socket is still served
        assert raw.poll(20_000)
        frames = raw.recv_multipart()
        assert frames[0] == HITS
        c = ReqClient(sh.fronts[0][0].address, timeout_ms=20_000, retries=0)
        t = ev(300, 9)
        r = c.simulate(9, t)
        c.close()
        np.testing.assert_array_equal(r.hits["channel"], alone(ref, 9, t).channel)
    finally:
        raw.close(0)
        sh.stop()


def test_split_event_across_merged_batches(det, ref):
    sh = Shared(det, n=2, max_batch_photons=700)
    try:
        a = sh.dealer(0)
        t = ev(2000, 3)  # larger than a batch: split by the front end, pieces merged by the service
        a.submit(3, t)
        r = a.recv(30_000)
        assert r.kind == P.SIM_COMPLETE
        np.testing.assert_array_equal(r.hits["channel"], alone(ref, 3, t).channel)
        np.testing.assert_array_equal(r.hits["time"], alone(ref, 3, t).table[7])
    finally:
        sh.stop()


def test_front_end_survives_bad_answers_from_the_engine_side(det, ref):
    """A stand-in service answers garbage first; the front end logs it and still serves the event."""
    ctx = zmq.Context.instance()
    fake = ctx.socket(zmq.ROUTER)
    fake.setsockopt(zmq.LINGER, 0)
    port = fake.bind_to_random_port("tcp://127.0.0.1")
    hello = {}

    def answer_hello():  # the front end waits for it before it binds; the socket is used here only until joined
        if fake.poll(10_000):
            hello["peer"], *hello["msg"] = fake.recv_multipart()  # HELLO [, shared-memory probe]
            fake.send_multipart([hello["peer"], b"ENGINE", b"fake"])  # no mode: photons over the socket

    greeter = threading.Thread(target=answer_hello)
    greeter.start()
    srv, th = run_in_thread(ServerConfig(bind="tcp://127.0.0.1:0", engine="cpu", seed=SEED, max_wait_ms=0,
                                         engine_service=f"tcp://127.0.0.1:{port}"), detector=det)  # fmt: skip
    greeter.join(15)
    assert hello.get("msg", [None])[0] == b"HELLO"
    peer = hello["peer"]
    client = DealerClient(srv.address)
    try:
        t = ev(200, 5)
        client.submit(5, t)
        assert fake.poll(10_000)
        frames = fake.recv_multipart()
        bid, sub = decode_batch(frames[2:])
        hits = ref.propagate(sub.photons(0, sub.n_events))
        good = encode_hits(bid, hits, np.zeros(1, bool), "", 0.0)
        fake.send_multipart([peer, HITS, bytes(good[1])[:-4]])  # truncated HITS
        fake.send_multipart([peer, HITS, (bid + 7).to_bytes(8, "little") + bytes(good[1])[8:]])  # unknown id
        fake.send_multipart([peer, REFUSED, b"\0"])  # malformed REFUSED
        fake.send_multipart([peer, *good])
        r = client.recv(10_000)
        assert r.kind == P.SIM_COMPLETE and r.event_id == 5
        np.testing.assert_array_equal(r.hits["channel"], alone(ref, 5, t).channel)
    finally:
        client.close()
        srv.stop()
        th.join(10)
        fake.close(0)


class _AsyncStandIn:
    """An asynchronous engine (launch/ready/finish) whose batch completes when the test says so."""

    name = "async-stand-in"

    def __init__(self):
        from charon.engines.base import StageTimes

        self.last_times = StageTimes()
        self.launched: list[int] = []  # events per launch
        self.done = threading.Event()

    def warm_up(self):
        pass

    def launch(self, batch):
        self.launched.append(batch.n_events)
        return batch.n_events

    def ready(self, handle):
        return self.done.is_set()

    def finish(self, handle):
        from charon.photons import empty_hits

        return empty_hits(handle)

    def close(self):
        pass


@contextlib.contextmanager
def _service_and_socket(engine):
    """An EngineService around ``engine`` and a raw DEALER connected to it, as a front end would be."""
    svc = EngineService(lambda: engine, "tcp://127.0.0.1:*", 10_000)
    svc.start(30)
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(svc.address)
    try:
        yield svc, raw
    finally:
        raw.close(0)
        svc.stop()
        svc.join(10)


def _wait_launched(engine, k):
    for _ in range(250):
        if len(engine.launched) >= k:
            return
        threading.Event().wait(0.02)
    raise AssertionError(f"{len(engine.launched)} launches, expected {k}")


def _send(raw, batch_id, sizes, ids):
    raw.send_multipart(encode_batch(batch_id, PhotonBatch.from_events([ev(n, i) for n, i in zip(sizes, ids)], ids)))


def _answered_ids(raw, k):
    ids = []
    for _ in range(k):
        assert raw.poll(10_000)
        ids.append(decode_hits(raw.recv_multipart()[1:])[0])
    return ids


def test_batch_finishing_during_a_burst_launches_nothing_empty():
    """A batch that completes while the service handles a message that adds no events (HELLO) is
    collected and answered; no empty batch is launched after it."""
    from charon.engine_service import ENGINE, HELLO

    eng = _AsyncStandIn()
    with _service_and_socket(eng) as (svc, raw):
        handle = svc._handle

        def handle_then_finish(frames):  # the batch completes exactly while a HELLO is being handled
            handle(frames)
            if frames[1].bytes == HELLO:
                eng.done.set()

        svc._handle = handle_then_finish
        _send(raw, 8, [5, 7], [1, 2])
        _wait_launched(eng, 1)
        assert eng.launched == [2]
        raw.send(HELLO)
        got = {}
        for _ in range(2):
            assert raw.poll(10_000)
            frames = raw.recv_multipart()
            got[frames[0]] = frames
        assert got[ENGINE][1] == b"async-stand-in"
        batch_id, hits, failed, error, _ = decode_hits(got[HITS][1:])
        assert batch_id == 8 and len(hits.offsets) == 3 and failed is None and error == ""
        threading.Event().wait(0.2)
        assert eng.launched == [2]  # nothing launched after it: no events were waiting


class _TwoLaneStandIn(_AsyncStandIn):
    """Two lanes; each launched batch completes when the test sets its event."""

    lanes = (0, 1)

    def __init__(self):
        super().__init__()
        self.finish_flags: list[threading.Event] = []

    def launch(self, batch):
        self.launched.append(batch.n_events)
        self.finish_flags.append(threading.Event())
        return (len(self.finish_flags) - 1, batch.n_events)

    def ready(self, handle):
        return self.finish_flags[handle[0]].is_set()

    def finish(self, handle):
        from charon.photons import empty_hits

        return empty_hits(handle[1])


def test_two_lanes_keep_two_batches_in_flight_and_answer_in_launch_order():
    eng = _TwoLaneStandIn()
    with _service_and_socket(eng) as (svc, raw):
        for bid, n_events in ((1, 1), (2, 2)):  # each launched before the next is sent: two batches, not one
            _send(raw, bid, [4] * n_events, list(range(n_events)))
            _wait_launched(eng, bid)
        _send(raw, 3, [4] * 3, list(range(3)))
        threading.Event().wait(0.2)
        assert eng.launched == [1, 2]  # two in flight; the third waits for a lane
        eng.finish_flags[1].set()  # the second finishes first: answers keep launch order
        threading.Event().wait(0.2)
        assert not raw.poll(0) and eng.launched == [1, 2]
        eng.finish_flags[0].set()
        assert _answered_ids(raw, 2) == [1, 2]
        _wait_launched(eng, 3)
        assert eng.launched == [1, 2, 3]
        eng.finish_flags[2].set()
        assert _answered_ids(raw, 1) == [3]
        m = svc.metrics.registry.get_sample_value
        assert m("charon_batches_total") == 3


def test_second_lane_waits_until_the_building_batch_is_as_large_as_the_running_one():
    eng = _TwoLaneStandIn()
    with _service_and_socket(eng) as (_svc, raw):
        _send(raw, 1, [4] * 5, list(range(5)))
        _wait_launched(eng, 1)
        _send(raw, 2, [4], [9])  # 4 photons < 20 running
        threading.Event().wait(0.3)
        assert eng.launched == [5]  # a lane is free, but the small batch keeps filling
        _send(raw, 3, [16], [8])  # now 20 photons: launch
        _wait_launched(eng, 2)
        assert eng.launched == [5, 2]
        for f in eng.finish_flags:
            f.set()
        assert _answered_ids(raw, 3) == [1, 2, 3]


class _OrderedTwoLanes(_TwoLaneStandIn):
    """Two lanes that log the order of launches and finishes."""

    def __init__(self):
        super().__init__()
        self.log: list[tuple[str, int]] = []

    def launch(self, batch):
        handle = super().launch(batch)
        self.log.append(("launch", handle[0]))
        return handle

    def finish(self, handle):
        self.log.append(("finish", handle[0]))
        return super().finish(handle)


def test_when_the_last_running_batch_ends_the_next_is_launched_before_it_is_collected():
    """The GPU would idle while a batch's hits are copied out and answered: with a free lane, the building
    batch (however small) is launched first. The thread's work time counts only passes that did something."""
    eng = _OrderedTwoLanes()
    with _service_and_socket(eng) as (svc, raw):
        work = lambda: svc.metrics.registry.get_sample_value("charon_engine_thread_seconds_total")  # noqa: E731
        _send(raw, 1, [4] * 5, list(range(5)))
        _wait_launched(eng, 1)
        _send(raw, 2, [4], [9])  # smaller than the running batch: it keeps filling while that one runs
        threading.Event().wait(0.3)
        assert eng.launched == [5]
        busy = work()
        threading.Event().wait(0.5)  # the thread polls the running batch: waiting, not work
        assert busy > 0 and work() == busy
        eng.finish_flags[0].set()
        assert _answered_ids(raw, 1) == [1]
        assert eng.log == [("launch", 0), ("launch", 1), ("finish", 0)]
        eng.finish_flags[1].set()
        assert _answered_ids(raw, 1) == [2]
        assert eng.log[3:] == [("finish", 1)] and work() > busy


# ------------------------------------------------------ shared-memory hand-off
needs_shm = pytest.mark.skipif(not shm_available(), reason="needs a writable /dev/shm (Linux)")


def _in_shared(buf: SharedHostBuffer, tables, ids) -> PhotonBatch:
    """Assemble events into ``buf`` as a front end's batcher does (at the start of its segment)."""
    b = PhotonBatch.from_events(tables, ids)
    n = b.n_photons
    buf.reserve(n, 1 << 20)
    rows = buf.rows(n)  # table rows, then the flags' bits
    rows[:N_ROWS] = b.table
    rows[N_ROWS].view(np.uint32)[:] = b.flags
    return PhotonBatch(rows[:N_ROWS], rows[N_ROWS].view(np.uint32), b.slot, b.offsets, b.event_id, b.first_index,
                       rows=rows)  # fmt: skip


@needs_shm
def test_merge_buffer_gathers_shared_pieces_without_copying_them():
    tables = [ev(30, i) for i in range(4)]
    shared = SharedHostBuffer()
    try:
        photons = _in_shared(shared, tables[1:3], [1, 2])
        frames = [bytes(memoryview(f)) for f in encode_batch_shm(7, photons, shared)[1:]]
        bid, shm_sub = decode_batch_shm(frames, lambda name: MappedSegment(b"", Segment.attach(name)))
        assert bid == 7 and shm_sub.mapped is not None
        subs = [sub_of(tables[:1], [0]), shm_sub, sub_of(tables[3:], [3])]
        gather, copy = MergeBuffer(500, gather=True), MergeBuffer(500)
        for sub in subs:
            gather.append(sub)
            copy.append(sub)
        g, c = gather.seal(contiguous=False).photons, copy.seal(contiguous=False).photons
        assert c.pieces is None and [p.first for p in g.pieces] == [0, 30, 90]
        # The shared photons were not copied: the piece views the engine side's mapping of the segment.
        assert np.shares_memory(g.pieces[1].table, np.frombuffer(shm_sub.mapped.segment.mm, np.uint8))
        assert not np.shares_memory(g.pieces[1].table, gather.table)
        rebuilt = np.concatenate([p.table for p in g.pieces], axis=1)
        np.testing.assert_array_equal(rebuilt, c.table)
        np.testing.assert_array_equal(np.concatenate([p.flags for p in g.pieces]), c.flags)
        # Each piece is also one block of N_ROWS + 1 equal-stride rows (table, then the flags' bits),
        # which the engine copies to the device in one go; the merge buffer's own pieces too.
        for p in g.pieces:
            assert p.rows.shape == (N_ROWS + 1, p.table.shape[1]) and p.rows.strides[1] == 4
            assert np.shares_memory(p.rows, p.table) and np.shares_memory(p.rows, p.flags)
            np.testing.assert_array_equal(p.rows[:N_ROWS], p.table)
            np.testing.assert_array_equal(p.rows[N_ROWS].view(np.uint32), p.flags)
        # Copied in, not gathered: the rows are the merge buffer's, for one copy of the whole batch.
        assert c.rows is not None and np.shares_memory(c.rows, copy.table)
        np.testing.assert_array_equal(c.rows[N_ROWS].view(np.uint32), c.flags)
        # No slot numbers for an engine that gathers: it derives them from the offsets (kernels/slots.py).
        assert g.slot.shape == (0,) and c.slot.shape == (120,)
        np.testing.assert_array_equal(photon_slots_ref(g.offsets), c.slot)
        np.testing.assert_array_equal(c.table, PhotonBatch.from_events(tables, [0, 1, 2, 3]).table)
    finally:
        shared.close()


@needs_shm
def test_shm_batch_is_answered_like_a_socket_batch(det, ref):
    shared = SharedHostBuffer()
    with _service_and_socket(CPUEngine(det, EngineConfig(seed=SEED))) as (svc, raw):
        try:
            tables = [ev(200, 1), ev(150, 2)]
            raw.send_multipart(encode_batch_shm(11, _in_shared(shared, tables, [1, 2]), shared))
            assert raw.poll(20_000)
            frames = raw.recv_multipart()
            assert frames[0] == HITS
            bid, hits, failed, _, _ = decode_hits(frames[1:])
            assert bid == 11 and failed is None
            for k, t in enumerate(tables):
                np.testing.assert_array_equal(hits.event(k).channel, alone(ref, k + 1, t).channel)
                np.testing.assert_array_equal(hits.event(k).table, alone(ref, k + 1, t).table)
            _send(raw, 12, [200, 150], [1, 2])  # the same events over the socket
            assert raw.poll(20_000)
            _, by_socket, _, _, _ = decode_hits(raw.recv_multipart()[1:])
            np.testing.assert_array_equal(by_socket.channel, hits.channel)
            m = svc.metrics.registry.get_sample_value
            assert m("charon_handoff_batches_total", {"path": "shm"}) == 1
            assert m("charon_handoff_batches_total", {"path": "socket"}) == 1
        finally:
            shared.close()


@needs_shm
def test_service_refuses_bad_shm_batches_and_keeps_serving(det, monkeypatch):
    import charon.engine_service as es

    monkeypatch.setattr(es, "MAX_SEGMENTS_PER_PEER", 2)
    bufs = [SharedHostBuffer() for _ in range(3)]
    with _service_and_socket(CPUEngine(det, EngineConfig(seed=SEED))) as (_svc, raw):
        try:
            good = [bytes(memoryview(f)) for f in encode_batch_shm(3, _in_shared(bufs[0], [ev(5, 1)], [1]), bufs[0])]
            good = good[1:]  # after the kind
            head = es._SHM_HEAD
            missing = f"charon-{os.getppid()}-{os.getpid()}-999999"
            body, name = good
            assert len(body) == 32 + 16 * 1 + 8
            cap = head.unpack_from(body)[3]
            rest = body[32:]  # offsets [2] int64, event_id [1], first_index [1] uint32
            bad = [  # (frames, message); the head's batch id (3) comes back when the body has 8 bytes or more
                (good[:-1], "has 2 frames, expected 3"),
                ([body[:9], name], "body has 9 bytes, shorter than its 32-byte head"),
                ([body[:-1], name], "body has 55 bytes, expected 56"),
                ([head.pack(3, 2, 5, cap) + rest, name], "expected 72"),  # the head claims a second event
                ([head.pack(3, 1, 2000, 1024) + rest, name], "2000 photons in a buffer laid out for 1024"),
                ([head.pack(3, 1, 5, 10**6) + rest, name], "needs .* bytes"),
                ([body, b"../../etc/passwd"], "not a charon shared-memory segment name"),
                ([body, missing.encode()], "cannot open shared-memory segment"),
                ([body[:32] + np.array([0, 4], np.int64).tobytes() + body[48:], name], "offsets are not"),
                (encode_batch_shm(3, _in_shared(bufs[2], [ev(10_001, 4)], [4]), bufs[2])[1:],
                 "exceed the shared engine's batch of 10000"),
            ]  # fmt: skip
            for frames, message in bad:
                raw.send_multipart([es.BATCH_SHM, *frames])
                assert raw.poll(10_000), message
                kind, bid, reason = raw.recv_multipart()
                assert kind == REFUSED and int.from_bytes(bid, "little") == 3, message
                assert re.search(message, reason.decode()), (message, reason)
            # Two segments are mapped now (the limit here): a third is refused until one is released.
            raw.send_multipart([es.BATCH_SHM, *good])
            assert raw.poll(10_000) and raw.recv_multipart()[0] == HITS
            third = encode_batch_shm(5, _in_shared(bufs[1], [ev(5, 3)], [3]), bufs[1])
            raw.send_multipart(third)
            assert raw.poll(10_000)
            kind, _, reason = raw.recv_multipart()
            assert kind == REFUSED and b"may have 2 shared-memory segments" in reason
            raw.send_multipart([RELEASE, bufs[2].segment.name.encode()])
            raw.send_multipart(third)
            assert raw.poll(10_000) and raw.recv_multipart()[0] == HITS
        finally:
            for b in bufs:
                b.close()


@needs_shm
def test_released_segment_is_unmapped_only_once_its_batch_is_answered():
    eng = _AsyncStandIn()
    shared = SharedHostBuffer()
    with _service_and_socket(eng) as (svc, raw):
        try:
            raw.send_multipart(encode_batch_shm(1, _in_shared(shared, [ev(9, 1)], [1]), shared))
            _wait_launched(eng, 1)
            name = shared.segment.name
            assert [k[1] for k in svc._segments] == [name]
            raw.send_multipart([RELEASE, name.encode()])  # while its batch still runs
            raw.send_multipart([RELEASE, b"charon-1-2-3"])  # never used: logged, ignored
            threading.Event().wait(0.3)
            assert [k[1] for k in svc._segments] == [name]
            eng.done.set()
            assert _answered_ids(raw, 1) == [1]
            for _ in range(100):
                if not svc._segments:
                    break
                threading.Event().wait(0.02)
            assert not svc._segments
        finally:
            shared.close()


@needs_shm
def test_hello_probe_says_whether_photons_can_come_by_shared_memory(det):
    from charon.engine_service import ENGINE, HELLO

    probe = Segment.create(4096)
    with _service_and_socket(CPUEngine(det, EngineConfig(seed=SEED))) as (_svc, raw):
        try:
            raw.send_multipart([HELLO, probe.name.encode()])
            assert raw.poll(10_000)
            assert raw.recv_multipart() == [ENGINE, b"cpu", b"shm", b""]
            raw.send_multipart([HELLO, b"not-a-segment"])
            assert raw.poll(10_000)
            kind, _, mode, reason = raw.recv_multipart()
            assert (kind, mode) == (ENGINE, b"socket") and b"not a charon" in reason
            raw.send(HELLO)
            assert raw.poll(10_000) and raw.recv_multipart() == [ENGINE, b"cpu"]
        finally:
            probe.close()


@needs_shm
def test_handoff_modes_of_the_front_end_link(det, monkeypatch):
    import charon.engine_service as es
    from charon.engines.base import EngineError
    from charon.scheduler.batcher import HostBuffer

    ctx = zmq.Context.instance()
    with _service_and_socket(CPUEngine(det, EngineConfig(seed=SEED))) as (svc, _raw):
        link = es.ServiceLink(ctx, svc.address, handoff="shm")
        link.start(10)
        assert link.shm and isinstance(link.host_buffer(), SharedHostBuffer)
        link.stop()
        link = es.ServiceLink(ctx, svc.address, handoff="socket")
        link.start(10)
        assert not link.shm and type(link.host_buffer()) is HostBuffer
        link.stop()

        def cannot_map(name, directory=None):
            raise ValueError("mapped in another namespace")

        monkeypatch.setattr(es.Segment, "attach", staticmethod(cannot_map))  # the service cannot see it
        link = es.ServiceLink(ctx, svc.address, handoff="auto")
        link.start(10)
        assert not link.shm and type(link.host_buffer()) is HostBuffer
        link.stop()
        link = es.ServiceLink(ctx, svc.address, handoff="shm")
        with pytest.raises(EngineError, match="cannot map this front end's memory: mapped in another namespace"):
            link.start(10)
        link.stop()
        monkeypatch.setattr(es, "shm_available", lambda: False)
        link = es.ServiceLink(ctx, svc.address, handoff="shm")
        with pytest.raises(EngineError, match="--handoff shm: /dev/shm is not usable"):
            link.start(10)
        link.stop()
    with pytest.raises(ValueError, match="handoff must be"):
        es.ServiceLink(ctx, "tcp://127.0.0.1:1", handoff="pipe")


@needs_shm
def test_front_end_buffers_grow_and_release_their_old_segments(det, ref):
    sh = Shared(det, n=1, handoff="shm")
    try:
        c = sh.dealer(0)
        sizes = [100] * 8 + [3000, 3000]  # the pool has 8 buffers; the 9th and 10th events regrow two
        tables = {i: ev(n, 40 + i) for i, n in enumerate(sizes)}
        for i, t in tables.items():  # one at a time: each batch uses the next buffer of the pool
            c.submit(i, t)
            r = c.recv(20_000)
            assert r.kind == P.SIM_COMPLETE and r.event_id == i
            np.testing.assert_array_equal(r.hits["channel"], alone(ref, i, t).channel)
        mapped = [name for _, name in sh.service._segments]
        assert len(mapped) == 8  # two retired segments were released and unmapped
        live = {b.segment.name for b in sh.fronts[0][0]._buffers}
        assert set(mapped) == live
        # Counted for operators: every segment mapped (the 8 first and the 2 regrown), and the thread's time on it.
        reg = sh.service.metrics.registry
        assert reg.get_sample_value("charon_handoff_segments_mapped_total") == 10
        assert reg.get_sample_value("charon_handoff_pin_seconds_total") > 0
    finally:
        sh.stop()


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two CPUs")  # fmt: skip
def test_engine_cpus_pin_the_serving_thread_alone():
    """--engine-cpus: the service's thread runs on its CPUs, where it polls the engine without sleeping; the
    starting thread and ZeroMQ's I/O threads stay where they were. Batches are answered as before."""
    cpu = max(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    ctx = zmq.Context(io_threads=1)
    eng = _AsyncStandIn()
    svc = EngineService(lambda: eng, "tcp://127.0.0.1:*", 10_000, context=ctx, cpus={cpu})
    assert svc.spin_sleep == 0 and EngineService.spin_sleep > 0  # only the pinned service spins
    svc.start(30)
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(svc.address)
    try:
        assert os.sched_getaffinity(svc._thread.native_id) == {cpu}
        assert os.sched_getaffinity(0) == before
        tids = [int(t) for t in os.listdir(f"/proc/{os.getpid()}/task")]
        io = [t for t in tids if _thread_name(os.getpid(), t).startswith("ZMQbg/IO")]
        assert io and all(os.sched_getaffinity(t) == before for t in io)
        _send(raw, 4, [5, 7], [1, 2])
        _wait_launched(eng, 1)
        eng.done.set()
        assert _answered_ids(raw, 1) == [4]
    finally:
        raw.close(0)
        svc.stop()
        svc.join(10)
        ctx.term()


def _thread_name(pid, tid) -> str:
    """A thread's name, or "" for one that ended since /proc was listed (other tests' threads wind down)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            return f.read().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""
