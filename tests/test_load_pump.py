"""The compiled load generator (charon/load_pump.py) against a ROUTER on loopback that the test answers by hand."""

import time

import numpy as np
import pytest
import zmq

from charon import protocol as P
from charon.load_pump import AVAILABLE, LoadPump, warm_up

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="needs Linux and libzmq's C API")


@pytest.fixture(scope="module", autouse=True)
def compiled():
    """Compile the loop before any test's clock starts: on CI's two cores that alone takes seconds, and a
    first ``run`` that compiles would eat a test's whole wait (it did, in CI)."""
    warm_up()


@pytest.fixture
def router():
    """(client factory, ROUTER): the clients are closed with the router, whatever the test did."""
    ctx = zmq.Context()
    r = ctx.socket(zmq.ROUTER)
    r.setsockopt(zmq.LINGER, 0)
    r.bind("tcp://127.0.0.1:*")
    address = r.getsockopt_string(zmq.LAST_ENDPOINT)
    made = []

    def client(kind):
        s = ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(address)
        made.append(s)
        return s

    yield client, r
    for s in [r, *made]:
        s.close(0)
    ctx.term()


def _requests(pump, r, n, deadline):
    """Run the pump in short slices until the router has ``n`` requests; [(envelope, frames)]."""
    got = []
    t_end = time.monotonic() + 20  # a bound for a stuck pump, not a timing: the loop ends when all are in
    while len(got) < n and time.monotonic() < t_end:
        pump.run(deadline, time.monotonic() + 0.02)
        while r.poll(0):
            msg = r.recv_multipart()
            k = msg.index(b"") + 1 if b"" in msg[:2] else 1
            got.append((msg[:k], msg[k:]))
    assert len(got) == n, f"the router got {len(got)} requests of {n}"
    return got


def test_requests_are_dialect_a_photondata_over_the_pool_and_replies_are_counted(router):
    client, r = router
    pool = np.arange(11 * 6, dtype=np.float32).reshape(11, 6)
    sizes = np.array([3, 5, 4, 2])
    pump = LoadPump([client(zmq.DEALER)], True, 2, sizes, 100, pool)
    deadline = time.monotonic() + 30  # the load's end, far past what the test needs
    first = _requests(pump, r, 2, deadline)  # depth 2: two in flight before any reply
    for (env, frames), eid, n in zip(first, (100, 101), (3, 5)):
        assert len(env) == 2 and env[1] == b""  # identity, then the DEALER's empty delimiter
        assert len(frames) == 13 and frames[0] == P.PHOTONDATA and P.META.unpack(frames[1]) == (eid, n)
        for row in range(11):
            np.testing.assert_array_equal(np.frombuffer(frames[2 + row], np.float32), pool[row, :n])
    env = first[0][0]

    def reply(*frames):
        r.send_multipart([*env, *frames])

    reply(P.SIM_COMPLETE, P.u32(100), b"", b"", b"")  # answered
    reply(P.SIM_FAILED, P.u32(101), b"bad input")  # failed: not SIM_COMPLETE
    second = _requests(pump, r, 2, deadline)  # each reply made room for the next request
    assert [P.META.unpack(f[1])[0] for _e, f in second] == [102, 103]
    reply(P.SIM_COMPLETE, P.u32(102), b"", b"", b"")  # answered
    reply(P.SIM_COMPLETE, P.u32(102), b"", b"", b"")  # a second reply for 102: failed
    reply(P.SIM_COMPLETE, P.u32(999), b"", b"", b"")  # an event never sent: failed
    reply(P.SIM_COMPLETE, b"\x01\x02", b"", b"", b"")  # no u32 event id: failed
    reply(P.SIM_COMPLETE_ASYNC, P.u32(103))  # not SIM_COMPLETE, as the Python loop counts it: failed
    t_end = time.monotonic() + 20
    while pump.done < 7 and time.monotonic() < t_end:
        assert not pump.run(deadline, time.monotonic() + 0.02) or pump.done >= pump.sent
    assert (pump.sent, pump.done, pump.failed) == (4, 7, 5)
    sent, rtt, photons = pump.results()
    np.testing.assert_array_equal(photons, [3, 4])
    assert np.all(rtt > 0) and np.all(rtt < 10) and np.all(sent > 0) and sent[0] <= sent[1]
    pump.close()


def test_req_clients_keep_one_request_in_flight_and_stop_at_the_deadline(router):
    client, r = router
    pool = np.ones((11, 4), np.float32)
    socks = [client(zmq.REQ) for _ in range(3)]
    pump = LoadPump(socks, False, 1, np.full(9, 4), 0, pool)
    deadline = time.monotonic() + 30  # the load's end, far past what the test needs
    got = _requests(pump, r, 3, deadline)  # one each, whatever the depth of the event list
    for env, frames in got:
        assert env[1] == b"" and len(frames) == 13  # REQ adds the delimiter itself
        r.send_multipart([*env, P.SIM_COMPLETE, frames[1][:4], b"", b"", b""])
    got = _requests(pump, r, 3, deadline)  # each answered client sent its next request
    assert sorted(P.META.unpack(f[1])[0] for _e, f in got) == [3, 4, 5]
    assert pump.done == 3 and pump.failed == 0
    # Nobody answers now: the run ends at its deadline with those three unanswered.
    t0 = time.monotonic()
    assert pump.run(t0 + 0.2, t0 + 5)
    assert 0.15 < time.monotonic() - t0 < 2
    assert pump.sent - pump.done == 3 and len(pump.results()[0]) == 3
    pump.close()


def test_pool_must_hold_the_largest_event():
    with pytest.raises(ValueError, match=r"pool must be \[11, >= the largest event\]"):
        LoadPump([], True, 1, np.array([5]), 0, np.zeros((11, 4), np.float32))


def test_a_client_thinks_before_its_next_request_and_the_wait_is_not_in_its_round_trip(router):
    """--think-ms in the compiled loop: the request after the k-th reply leaves think[k] after it, as in the
    Python loop; round trips run from a request to its reply and leave the pause out."""
    client, r = router
    pool = np.ones((11, 4), np.float32)
    think = np.array([0.3, 0.0, 0.0, 0.0])  # after the 1st reply: 300 ms; after the 2nd: at once
    pump = LoadPump([client(zmq.REQ)], False, 1, np.full(4, 4), 0, pool, think)
    deadline = time.monotonic() + 30  # the load's end, far past what the test needs
    (env, frames), = _requests(pump, r, 1, deadline)
    r.send_multipart([*env, P.SIM_COMPLETE, frames[1][:4], b"", b"", b""])
    answered = time.monotonic()
    (env, frames), = _requests(pump, r, 1, deadline)
    assert time.monotonic() - answered >= 0.3  # not before the think time
    assert P.META.unpack(frames[1])[0] == 1 and pump.sent == 2
    r.send_multipart([*env, P.SIM_COMPLETE, frames[1][:4], b"", b"", b""])
    (env, frames), = _requests(pump, r, 1, deadline)  # no think time after the 2nd reply
    assert P.META.unpack(frames[1])[0] == 2
    # The slots hold the 300 ms until it is over: the run is not over while a request waits in one.
    r.send_multipart([*env, P.SIM_COMPLETE, frames[1][:4], b"", b"", b""])
    (env, frames), = _requests(pump, r, 1, deadline)
    r.send_multipart([*env, P.SIM_COMPLETE, frames[1][:4], b"", b"", b""])
    t_end = time.monotonic() + 20
    while not pump.run(deadline, time.monotonic() + 0.02) and time.monotonic() < t_end:
        pass
    assert (pump.sent, pump.done, pump.failed) == (4, 4, 0)
    _sent, rtt, _photons = pump.results()
    assert len(rtt) == 4 and rtt.max() < 0.3  # the pause is the client's, not the round trip's
    pump.close()


def test_a_think_time_is_held_past_an_idle_wait_and_dropped_at_the_deadline(router):
    """A request still thinking at the deadline is never sent; the run ends at the deadline, not after."""
    client, r = router
    pool = np.ones((11, 4), np.float32)
    pump = LoadPump([client(zmq.DEALER)], True, 1, np.full(3, 4), 0, pool, np.full(3, 5.0))
    t0 = time.monotonic()
    deadline = t0 + 0.5
    (env, frames), = _requests(pump, r, 1, deadline)
    r.send_multipart([*env, P.SIM_COMPLETE, frames[1][:4], b"", b"", b""])
    while not pump.run(deadline, time.monotonic() + 0.02):
        assert time.monotonic() - t0 < 5  # the 5 s think time would outlast the deadline
    assert pump.sent == 1 and pump.done == 1 and not r.poll(0)


def test_think_times_must_match_the_events_and_be_finite():
    for bad in (np.zeros(2), np.array([0.1, -1.0, 0.0]), np.array([0.0, np.inf, 0.0])):
        with pytest.raises(ValueError, match="think must be"):
            LoadPump([], True, 1, np.full(3, 4), 0, np.zeros((11, 4), np.float32), bad)
