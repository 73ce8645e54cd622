"""Front ends sharing one TCP port (``--procs N --accept reuseport``): reservation, listeners, refusals."""

import select
import socket

import pytest

from charon import reuseport
from charon.server import ServerConfig

pytestmark = pytest.mark.skipif(not reuseport.AVAILABLE, reason="SO_REUSEPORT is Linux-only")


@pytest.mark.parametrize("endpoint, want", [
    ("tcp://127.0.0.1:5555", ("127.0.0.1", 5555)),
    ("tcp://*:7000", ("*", 7000)),
    ("tcp://localhost:0", ("localhost", 0)),
    ("tcp://[::1]:6000", ("::1", 6000)),
])
def test_parse_tcp(endpoint, want):
    assert reuseport.parse_tcp(endpoint) == want


@pytest.mark.parametrize("endpoint, problem", [
    ("ipc:///tmp/x", "needs a tcp:// address"),
    ("tcp://127.0.0.1", "no valid port"),
    ("tcp://127.0.0.1:http", "no valid port"),
    ("tcp://127.0.0.1:99999", "no valid port"),
    ("tcp://eth0;10.0.0.1:5555", "source-address syntax"),
])
def test_parse_tcp_names_the_problem(endpoint, problem):
    with pytest.raises(ValueError, match=problem):
        reuseport.parse_tcp(endpoint)


def test_reserve_resolves_port_zero_and_refuses_a_taken_port():
    hold, endpoint = reuseport.reserve("tcp://127.0.0.1:0")
    try:
        host, port = reuseport.parse_tcp(endpoint)
        assert host == "127.0.0.1" and port > 0
        # A second launcher on the same port is refused, although the first uses SO_REUSEPORT.
        with pytest.raises(OSError):
            reuseport.reserve(endpoint)
    finally:
        hold.close()
    plain = socket.socket()
    plain.bind(("127.0.0.1", 0))
    plain.listen(1)
    try:
        with pytest.raises(OSError):
            reuseport.reserve(f"tcp://127.0.0.1:{plain.getsockname()[1]}")
    finally:
        plain.close()


def test_listeners_share_the_port_and_the_reservation_gets_no_connection():
    hold, endpoint = reuseport.reserve("tcp://127.0.0.1:0")
    fds = [reuseport.listener(endpoint) for _ in range(2)]
    listeners = [socket.socket(fileno=fd) for fd in fds]
    clients = []
    try:
        port = reuseport.parse_tcp(endpoint)[1]
        for _ in range(32):
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            clients.append(c)
        accepted = [0, 0]
        while sum(accepted) < 32:
            ready, _, _ = select.select(listeners, [], [], 5)
            assert ready, f"only {sum(accepted)} of 32 connections reached a listener"
            for s in ready:
                conn, _ = s.accept()
                conn.close()
                accepted[listeners.index(s)] += 1
        assert sum(accepted) == 32  # every connection reached a listening front end
    finally:
        for c in clients:
            c.close()
        for s in listeners:
            s.close()
        hold.close()


def test_listener_needs_an_explicit_port():
    with pytest.raises(ValueError, match="explicitly"):
        reuseport.listener("tcp://127.0.0.1:0")


def test_accept_flag_is_validated():
    with pytest.raises(ValueError, match="--accept must be"):
        ServerConfig(accept="magic").validate()
    with pytest.raises(ValueError, match="tcp://"):
        ServerConfig(accept="reuseport", bind="ipc:///tmp/charon-x").validate()
    ServerConfig(accept="reuseport", bind="tcp://127.0.0.1:5555").validate()


def test_accept_auto_is_reuseport_for_tcp_else_proxy():
    assert ServerConfig(procs=2, bind="tcp://127.0.0.1:5555").accept_mode() == "reuseport"
    assert ServerConfig(procs=2, bind="ipc:///tmp/x").accept_mode() == "proxy"
    assert ServerConfig(procs=2, accept="proxy").accept_mode() == "proxy"


@pytest.mark.parametrize("layout", [["--procs", "2"], ["--gpus", "0,1", "--gpus-share", "port"]])
def test_shared_port_launchers_refuse_a_taken_port_before_starting_anything(layout):
    from charon.cli import batch_main

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        rc = batch_main([*layout, "--engine", "cpu", "--detector", "sphere", "--log-level", "ERROR",
                         "--bind", f"tcp://127.0.0.1:{taken.getsockname()[1]}"])  # fmt: skip
        assert rc == 2
    finally:
        taken.close()


@pytest.mark.parametrize("kw, problem", [
    (dict(gpus="0,1", gpus_share="magic"), "--gpus-share must be one of router, port"),
    (dict(gpus_share="port"), "add --gpus"),
    (dict(gpus="0,1", gpus_share="port", accept="proxy"), "drop --accept proxy"),
    (dict(gpus="0,1", gpus_share="port", bind="ipc:///tmp/charon-x"), "tcp://"),
])  # fmt: skip
def test_gpus_share_port_refusals_name_the_problem(kw, problem):
    with pytest.raises(ValueError, match=problem):
        ServerConfig(**kw).validate()
    ServerConfig(gpus="0,1", gpus_share="port", bind="tcp://127.0.0.1:5555").validate()


@pytest.mark.parametrize("argv, problem", [
    (["--gpus-share", "port"], "add --gpus"),  # one process: refused by the server's own check
    (["--gpus", "0,1", "--gpus-share", "port", "--accept", "proxy"], "drop --accept proxy"),
])  # fmt: skip
def test_gpus_share_refusals_reach_the_command_line(argv, problem, caplog):
    from charon.cli import batch_main

    with caplog.at_level("ERROR", logger="charon"):
        assert batch_main([*argv, "--engine", "cpu", "--bind", "tcp://127.0.0.1:0"]) == 2
    assert problem in caplog.text
