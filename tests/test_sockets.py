"""The multipart send and receive every hop uses: parts, order and contents survive, copied or not."""

import threading
import time

import numpy as np
import pytest
import zmq

from charon.sockets import poll, recv_message, send_message


@pytest.fixture
def pair(zmq_pair):
    return zmq_pair(zmq.PAIR, zmq.PAIR)


def _recv(sock):
    assert sock.poll(5000), "nothing arrived"
    return recv_message(sock)


@pytest.mark.parametrize("copy", [True, False])
def test_parts_arrive_whole_and_in_order(pair, copy):
    a, b = pair
    big = np.arange(100_000, dtype="<f4")  # over pyzmq's copy threshold: sent by reference when copy=False
    frame = zmq.Frame(np.arange(10, dtype="<u4").tobytes(), copy=False)
    parts = [b"", b"HDR", memoryview(big).cast("B"), frame, np.arange(3, dtype="<f4")]
    send_message(a, parts, copy=copy)
    send_message(a, [frame], copy=copy)  # a Frame can be sent again
    got = _recv(b)
    assert [f.bytes for f in got] == [b"", b"HDR", big.tobytes(), frame.bytes, np.arange(3, dtype="<f4").tobytes()]
    assert [f.bytes for f in _recv(b)] == [frame.bytes]
    with pytest.raises(zmq.Again):
        recv_message(b)


def test_a_str_part_is_refused(pair):
    a, _ = pair
    with pytest.raises(TypeError):
        send_message(a, ["text"])


def _poller(*socks):
    p = zmq.Poller()
    for s in socks:
        p.register(s, zmq.POLLIN)
    return p


def test_poll_waits_a_fractional_timeout_and_reports_nothing(pair):
    a, b = pair
    p = _poller(b)
    t0 = time.perf_counter()
    assert poll(p, 2.5) == {}
    took = time.perf_counter() - t0
    # Not rounded down to 2 ms (ZeroMQ's poll), nor up to a whole cap; the upper bound is loose for busy CI hosts.
    assert 0.0025 <= took < 1.0


def test_poll_a_message_during_a_fractional_wait_ends_it(pair):
    a, b = pair
    p = _poller(b)
    timer = threading.Timer(0.05, lambda: send_message(a, [b"late"]))
    timer.start()
    try:
        t0 = time.perf_counter()
        events = {}
        while not events and time.perf_counter() - t0 < 5:  # an fd may also signal a command: callers loop
            events = poll(p, 10_000.5)
        took = time.perf_counter() - t0
    finally:
        timer.join()
    assert events == {b: zmq.POLLIN}
    assert took < 5  # woken by the message, not by the 10 s timeout
    assert [f.bytes for f in recv_message(b)] == [b"late"]


def test_poll_a_plain_fd_during_a_fractional_wait_ends_it(pair):
    """A pipe's read end polled with the sockets (how run output tells the loop a file was closed)."""
    import os

    a, b = pair
    r, w = os.pipe()
    try:
        p = _poller(b)
        p.register(r, zmq.POLLIN)
        timer = threading.Timer(0.05, lambda: os.write(w, b"\0"))
        timer.start()
        try:
            t0 = time.perf_counter()
            events = {}
            while not events and time.perf_counter() - t0 < 5:
                events = poll(p, 10_000.5)
            took = time.perf_counter() - t0
        finally:
            timer.join()
        assert events == {r: zmq.POLLIN} and took < 5
    finally:
        os.close(r)
        os.close(w)


def test_poll_reports_what_is_already_there_without_waiting(pair):
    a, b = pair
    send_message(a, [b"x"])
    p = _poller(b)
    assert b.poll(5000)  # arrived
    for timeout in (0, 0.4, 3, 7.5):
        assert poll(p, timeout) == {b: zmq.POLLIN}
    recv_message(b)
    assert poll(p, 0) == {}


def test_poll_falls_back_to_whole_milliseconds_when_select_cannot_take_the_fds(pair, monkeypatch):
    import charon.sockets as sockets_mod

    def too_many(*_):
        raise ValueError("filedescriptor out of range in select()")

    a, b = pair
    monkeypatch.setattr(sockets_mod.select, "select", too_many)
    t0 = time.perf_counter()
    assert poll(_poller(b), 1.5) == {}
    assert time.perf_counter() - t0 >= 0.0015  # rounded up to 2 ms, not skipped
