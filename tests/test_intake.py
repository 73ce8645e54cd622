"""The compiled intake against its reference, the Python path (recv_message + split_envelope + decode_photondata)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from charon import protocol as P
from charon.client import photondata_frames
from charon.intake import AVAILABLE, MAX_PARTS, Intake
from charon.server import split_envelope
from charon.sources import random_event

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="needs libzmq's C API through pyzmq (Linux)")


@pytest.fixture
def pair(zmq_pair):
    """A ROUTER (the server's side) and a DEALER sending with an empty delimiter, as REQ does; random port."""
    return zmq_pair(zmq.ROUTER, zmq.DEALER)


def take_all(intake: Intake, expected: int, timeout: float = 10.0) -> list:
    out, deadline = [], time.monotonic() + timeout
    while len(out) < expected:
        assert time.monotonic() < deadline, f"took {len(out)} of {expected} messages"
        got = intake.take()
        if not got:
            time.sleep(0.005)
        out += got
    return out


def messages(seed: int, count: int) -> list[list[bytes]]:
    """A mixed stream: good requests of both dialects and many sizes, and what the fast path hands back."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        n = int(rng.integers(1, 3000))
        table = random_event(n, rng)
        flags = rng.integers(0, 2**32, n, dtype=np.uint32) if k % 3 == 0 else None
        frames = photondata_frames(k, table, flags)
        kind = rng.integers(0, 10)
        if kind == 0:  # a refused value somewhere in the event
            bad = table.copy()
            bad[int(rng.integers(0, 11)), int(rng.integers(0, n))] = np.nan
            frames = photondata_frames(k, bad, flags)
        elif kind == 1:
            frames = [P.PING]
        elif kind == 2:  # ragged
            frames[4] = frames[4][:-4]
        elif kind == 3:
            frames = [P.RUN_BEGIN, b"run.root"]
        out.append([b""] + frames)  # the delimiter
    return out


def test_every_message_taken_as_the_python_path_takes_it(pair):
    """Fast requests carry exactly the rows, flags, id and layout the Python decoder gives; every other message
    comes back with exactly the frames that were sent, envelope included. In order, with a small arena so that
    requests also land at its end and across arenas."""
    router, dealer = pair
    sent = messages(1, 300)
    for m in sent:
        dealer.send_multipart(m)
    intake = Intake(router, max_photons=2500, capacity=8000, max_requests=16)
    intake.warm_up()
    taken = take_all(intake, len(sent))
    assert len(taken) == len(sent)
    fast = 0
    for m, (envelope, pd) in zip(sent, taken):
        assert envelope[1:2] == [b""] and len(envelope[0]) > 0  # the DEALER's routing id, then the delimiter
        if pd is None:
            env, body = split_envelope(envelope)
            assert [bytes(f) for f in body] == m[1:]
            continue
        fast += 1
        want = P.decode_photondata(m[1:], 2500)  # the reference
        assert (pd.event_id, pd.n, pd.layout) == (want.event_id, want.n, want.layout)
        np.testing.assert_array_equal(np.asarray(pd.rows), np.asarray(want.rows))
        if want.flags is None:
            assert pd.flags is None
        else:
            np.testing.assert_array_equal(pd.flags, want.flags)
        assert pd.key == want.key and P.payload_digest(pd.rows, pd.flags) == P.payload_digest(want.rows, want.flags)
    # Everything good and within max_photons took the fast path; events over 2500 photons did not.
    good_small = sum(1 for m in sent if len(m) >= 14 and _decodes(m[1:], 2500))
    assert fast == good_small > 100


def _decodes(frames, limit) -> bool:
    try:
        P.decode_photondata(frames, limit)
        return True
    except P.RequestError:
        return False


def test_rows_stay_intact_while_held_and_arenas_are_reused_once_released(pair):
    router, dealer = pair
    intake = Intake(router, max_photons=1000, capacity=4000, max_requests=64)
    intake.warm_up()
    rng = np.random.default_rng(2)
    tables = [random_event(1000, rng) for _ in range(12)]
    for k, t in enumerate(tables):
        dealer.send_multipart([b""] + photondata_frames(k, t))
    kept = [pd for _, pd in take_all(intake, 12)]
    assert all(pd is not None for pd in kept)  # 1000-photon events fill each 4000-photon arena exactly
    arenas = len(intake._pool)
    assert arenas >= 3
    # More requests while all twelve are held: new arenas, and the held rows are untouched.
    more = [random_event(1000, rng) for _ in range(8)]
    for k, t in enumerate(more):
        dealer.send_multipart([b""] + photondata_frames(100 + k, t))
    later = [pd for _, pd in take_all(intake, 8)]
    for pd, t in zip(kept, tables):
        np.testing.assert_array_equal(np.asarray(pd.rows), t)
    grown = len(intake._pool)
    assert grown > arenas
    # Released (as a server drops answered requests): the next arenas are taken from the pool.
    del kept, later, pd
    for k, t in enumerate(more):
        dealer.send_multipart([b""] + photondata_frames(200 + k, t))
    again = [pd for _, pd in take_all(intake, 8)]
    assert len(intake._pool) == grown
    for pd, t in zip(again, more):
        np.testing.assert_array_equal(np.asarray(pd.rows), t)


def test_more_parts_than_held_come_back_with_their_count(pair):
    router, dealer = pair
    intake = Intake(router, max_photons=100)
    intake.warm_up()
    parts = [b"", P.PHOTONDATA, np.array([3, 1], "<u4").tobytes()] + [b"abcd"] * (MAX_PARTS + 4)
    dealer.send_multipart(parts)
    dealer.send_multipart([b"", P.PING])
    (frames, pd), (ping, none) = take_all(intake, 2)
    assert pd is None and none is None
    assert len(frames) == 1 + len(parts) and frames[1:4] == parts[:3]  # routing id, then what was sent
    with pytest.raises(P.RequestError, match=f"got {len(parts) - 1}"):
        P.decode_photondata(split_envelope(frames)[1], 100)
    assert ping[1:] == [b"", P.PING]
