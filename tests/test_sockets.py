"""The multipart send and receive every hop uses: parts, order and contents survive, copied or not."""

import numpy as np
import pytest
import zmq

from charon.sockets import recv_message, send_message


@pytest.fixture
def pair():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    for s in (a, b):
        s.setsockopt(zmq.LINGER, 0)
    port = a.bind_to_random_port("tcp://127.0.0.1")
    b.connect(f"tcp://127.0.0.1:{port}")
    yield a, b
    a.close(0)
    b.close(0)
    ctx.term()


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
