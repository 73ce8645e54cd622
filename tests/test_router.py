"""charon-router with charon-batch workers (--connect) on loopback."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq

from charon import protocol as P
from charon.client import DealerClient, ReqClient, photondata_frames
from charon.engines.base import EngineConfig
from charon.engines.cpu import CPUEngine
from charon.geometry import resolve_detector
from charon import handoff
from charon.handoff import available as shm_available
from charon.geometry.builtin import sphere_detector
from charon.geometry.optics import constant_surface
from charon.metrics import _mallinfo2
from charon.photons import PhotonBatch
from charon.ports import free_port_range
from charon.router import HEARTBEAT, READY, REPLY, REQUEST, RouterConfig, run_router_in_thread
from charon.server import ServerConfig, recv_message, run_in_thread, send_message
from charon.sources import random_event
from processes import gone_pids
from standins import GatedEngine

SEED = 31
BEAT = 0.1  # heartbeat interval for tests (s)
LIVENESS = 8  # missed heartbeats before expiry: 0.8 s, well clear of scheduling hiccups on a loaded CI machine


@pytest.fixture(scope="module")
def det():
    wall = constant_surface("grey", detect=0.3, absorb=0.5, reflect_diffuse=0.2)
    return sphere_detector(700.0, wall_surface=wall, subdivisions=2)


@pytest.fixture(scope="module")
def reference(det):
    return CPUEngine(det, EngineConfig(seed=SEED))


def expected(ref, eid, t):
    return ref.propagate(PhotonBatch.from_events([t.copy()], [eid])).event(0)


class Cluster:
    def __init__(self, det, **router_kw):
        self.det = det
        self.router, self.router_thread = run_router_in_thread(
            RouterConfig(frontend="tcp://127.0.0.1:0", backend="tcp://127.0.0.1:0", heartbeat_interval=BEAT,
                         heartbeat_liveness=LIVENESS, hold_seconds=30, **router_kw)  # fmt: skip
        )
        self.workers = []
        self.clients = []

    def add_worker(self, det=None, engine_factory=None, **kw):
        cfg = ServerConfig(connect=self.router.backend_address, engine="cpu", seed=SEED, heartbeat_interval=BEAT,
                           heartbeat_liveness=LIVENESS, **kw)  # fmt: skip
        srv, th = run_in_thread(cfg, detector=det or self.det, engine_factory=engine_factory)
        self.workers.append((srv, th))
        return srv, th

    def wait_workers(self, n, timeout=10):
        deadline = time.monotonic() + timeout
        while len(self.router.workers) != n:
            assert time.monotonic() < deadline, f"{len(self.router.workers)} workers registered, want {n}"
            time.sleep(0.02)

    def dealer(self):
        c = DealerClient(self.router.frontend_address)
        self.clients.append(c)
        return c

    def req(self, **kw):
        c = ReqClient(self.router.frontend_address, **kw)
        self.clients.append(c)
        return c

    def close(self):
        for c in self.clients:
            c.close()
        for srv, th in self.workers:
            srv.stop()
            th.join(10)
        self.router.stop()
        self.router_thread.join(10)


@pytest.fixture
def cluster(det):
    c = Cluster(det)
    yield c
    c.close()


def ev(n, seed):
    return random_event(n, np.random.default_rng(seed), radius=300.0)


def test_no_workers_then_ping_and_info_from_router(cluster, det):
    c = cluster.req(timeout_ms=5000, retries=0)
    assert c.ping() == b"PONG"  # the router answers PING itself
    r = c.simulate(1, ev(10, 1))
    assert r.kind == P.NO_WORKERS
    cluster.add_worker()
    cluster.wait_workers(1)
    pos, typ = c.detector_info()
    np.testing.assert_array_equal(pos, det.channel_position)


def test_events_spread_over_workers_all_answered_correctly(cluster, reference):
    for _ in range(3):
        cluster.add_worker(max_batch_photons=3000)
    cluster.wait_workers(3)
    d = cluster.dealer()
    tables = {i: ev(400, i) for i in range(40)}
    for i, t in tables.items():
        d.submit(i, t)
    got = {}
    for _ in tables:
        r = d.recv(20_000)
        got[r.event_id] = r
    assert sorted(got) == sorted(tables)
    for i, t in tables.items():
        np.testing.assert_array_equal(got[i].hits["time"], expected(reference, i, t).table[7])
    served = [srv.metrics.registry.get_sample_value("charon_events_total") for srv, _ in cluster.workers]
    assert sum(served) == 40 and sum(1 for s in served if s > 0) >= 2  # dispatch used several workers


def test_worker_killed_mid_run_loses_nothing(cluster, det, reference):
    stuck = threading.Event()  # never set: this worker's events never finish
    dead, dead_th = cluster.add_worker(engine_factory=lambda: GatedEngine(CPUEngine(det, EngineConfig(seed=SEED)), stuck),
                                       max_batch_photons=100_000)  # fmt: skip
    cluster.wait_workers(1)
    d = cluster.dealer()
    tables = {i: ev(300, 100 + i) for i in range(12)}
    for i, t in tables.items():
        d.submit(i, t)
    deadline = time.monotonic() + 10
    while not cluster.router.inflight:  # they sit at the stuck worker
        assert time.monotonic() < deadline, "no event reached the stuck worker"
        time.sleep(0.01)
    cluster.add_worker()  # a healthy worker joins
    cluster.wait_workers(2)
    # The stuck worker hangs: no heartbeats and no replies from now on (a dead process looks the same).
    dead._reply = lambda *a, **k: None
    dead._worker_housekeeping = lambda **kw: None
    got = {d.recv(20_000).event_id for _ in tables}
    stuck.set()  # let its engine finish; whatever it produces goes nowhere
    assert got == set(tables)
    assert cluster.router.reassigned >= 1
    with pytest.raises(TimeoutError):
        d.recv(500)  # nothing is delivered twice


def fake_worker(ctx, backend, det, credit=10_000):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(backend)
    info = P.encode_detector_info(det.channel_position, det.channel_type)[1:]
    send_message(s, [READY, P.u32(credit), det.fingerprint(), *info])
    return s


def test_heartbeat_expiry_and_late_reply_not_delivered_twice(cluster, det):
    ctx = zmq.Context.instance()
    fake = fake_worker(ctx, cluster.router.backend_address, det)
    cluster.wait_workers(1)
    d = cluster.dealer()
    d.submit(5, ev(100, 5))
    assert fake.poll(5000)
    msg = recv_message(fake)
    while bytes(msg[0]) == HEARTBEAT:
        assert fake.poll(5000)
        msg = recv_message(fake)
    assert bytes(msg[0]) == REQUEST
    rid = bytes(msg[1])
    # The fake worker goes silent: after LIVENESS intervals the router drops it; with no worker the request waits.
    time.sleep(2 * BEAT * LIVENESS)
    assert len(cluster.router.workers) == 0 and cluster.router.waiting
    r2 = cluster.req(timeout_ms=3000, retries=0).simulate(6, ev(10, 6))
    assert r2.kind == P.NO_WORKERS  # none registered
    cluster.add_worker()
    first = d.recv(10_000)
    assert first.event_id == 5 and first.kind == P.SIM_COMPLETE
    # The "dead" worker's late reply for the same request is dropped.
    send_message(fake, [REPLY, rid, P.SIM_COMPLETE, P.u32(5), b"", b"", b""])
    with pytest.raises(TimeoutError):
        d.recv(500)
    fake.close(0)


def test_worker_with_other_detector_is_refused(cluster, det):
    cluster.add_worker()
    cluster.wait_workers(1)
    other = sphere_detector(900.0, subdivisions=1)
    srv, th = cluster.add_worker(det=other)
    th.join(10)
    assert not th.is_alive() and srv.refused and "detector differs" in srv.refused
    assert len(cluster.router.workers) == 1
    pos, _ = cluster.req(timeout_ms=5000, retries=0).detector_info()
    np.testing.assert_array_equal(pos, det.channel_position)


def _free_port():
    """A free port below the ephemeral range (charon.ports.free_port_range): one from bind(0) can be given
    to an outgoing connection before the server under test binds it."""
    return free_port_range(1)


def _metric(port: int, name: str) -> float:
    """One sample of a Prometheus text endpoint on loopback; OSError while it is not up."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return float(next(ln.split()[1] for ln in text.splitlines() if ln.startswith(name + " ")))


def _wait_bindable(port, timeout=10):
    """Until a listener can bind ``port`` again (a closed ZeroMQ listener lets go of it asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libzmq's listeners do
            try:
                s.bind(("127.0.0.1", port))
                return
            except OSError:
                assert time.monotonic() < deadline, f"port {port} still taken"
        time.sleep(0.05)


def test_router_restart_workers_reconnect(det):
    # Below the ephemeral range, so that no outgoing connection takes a port while the router is down.
    fport = free_port_range(2)
    bport = fport + 1
    cfg = RouterConfig(frontend=f"tcp://127.0.0.1:{fport}", backend=f"tcp://127.0.0.1:{bport}",
                       heartbeat_interval=BEAT, heartbeat_liveness=LIVENESS)  # fmt: skip
    router, rth = run_router_in_thread(cfg)
    srv, th = run_in_thread(ServerConfig(connect=f"tcp://127.0.0.1:{bport}", engine="cpu", heartbeat_interval=BEAT,
                                         heartbeat_liveness=LIVENESS), detector=det)  # fmt: skip
    c = None
    try:
        deadline = time.monotonic() + 10
        while not router.workers:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        router.stop()
        rth.join(10)
        _wait_bindable(fport)
        _wait_bindable(bport)
        router, rth = run_router_in_thread(cfg)  # same addresses, no state
        deadline = time.monotonic() + 15
        while not router.workers:
            assert time.monotonic() < deadline, "worker did not re-register"
            time.sleep(0.05)
        c = ReqClient(f"tcp://127.0.0.1:{fport}", timeout_ms=10_000, retries=0)
        assert c.simulate(3, ev(100, 3)).kind == P.SIM_COMPLETE
    finally:
        if c is not None:
            c.close()
        srv.stop()
        th.join(10)
        router.stop()
        rth.join(10)


def wait_first_answer(client, timeout):
    """Retry one event until a worker answers (workers compile at start); returns the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = client.simulate(1, ev(200, 1))
        except TimeoutError:
            r = None
        if r is not None and r.kind == P.SIM_COMPLETE:
            return deadline
        assert time.monotonic() < deadline, "no worker answered"
        time.sleep(0.5)


def kill_a_child_with_events_in_flight(proc, dealer, tables, n_children=2, timeout=60):
    """SIGKILL one of ``proc``'s two child processes while ``tables`` (event id -> photons) are in flight:
    every event is still answered, and the launcher starts a new child in its place."""

    def children():
        return subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()

    before = children()
    assert len(before) == n_children
    for i, t in tables.items():
        dealer.submit(i, t)
    os.kill(int(before[0]), signal.SIGKILL)
    assert sorted(dealer.recv(60_000).event_id for _ in tables) == sorted(tables)
    deadline = time.monotonic() + timeout
    while len(set(children()) - {before[0]}) < n_children:
        assert time.monotonic() < deadline, "the killed process was not restarted"
        time.sleep(0.2)


def _children(pid: int) -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]


def _descendants(pid: int) -> list[int]:
    out = []
    for c in _children(pid):
        out += [c, *_descendants(c)]
    return out


def _wait_gone(pids, timeout, what):
    deadline = time.monotonic() + timeout
    while alive := [p for p in pids if os.path.exists(f"/proc/{p}") and _state(p) != "Z"]:
        assert time.monotonic() < deadline, f"{what} still running: {alive}"
        time.sleep(0.2)


def _state(pid) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "X"


def kill_launcher_and_expect_every_child_to_end(proc, port, timeout=30):
    """SIGKILL the launcher itself (no clean-up runs): every process it started, and theirs, ends too
    (lifetime.py), and the client port is free again."""
    below = _descendants(proc.pid)
    assert below
    proc.kill()
    proc.wait(10)
    _wait_gone(below, timeout, "children of a killed launcher")
    with socket.socket() as s:  # nothing listens on the port any more (the address may be in TIME_WAIT)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(1)


@pytest.mark.slow
def test_gpus_flag_starts_local_router_and_workers():
    port = free_port_range(4)
    mport = port + 1  # the workers on mport and mport + 1, the local router after them
    proc = subprocess.Popen([sys.executable, "-m", "charon.cli", "--gpus", "0,1", "--engine", "cpu", "--detector",
                             "sphere", "--bind", f"tcp://127.0.0.1:{port}", "--metrics-port", str(mport),
                             "--log-level", "WARNING"])  # fmt: skip
    c = ReqClient(f"tcp://127.0.0.1:{port}", timeout_ms=2000, retries=0)
    try:
        deadline = wait_first_answer(c, 120)
        d = DealerClient(f"tcp://127.0.0.1:{port}")
        for i in range(20):
            d.submit(i, ev(200, i))
        assert sorted(d.recv(20_000).event_id for _ in range(20)) == list(range(20))
        assert _metric(mport + 2, "charon_router_events_total") >= 21  # the router's own figures
        # SIGKILL one worker process with events in flight: nothing is lost, the launcher restarts it.
        kill_a_child_with_events_in_flight(proc, d, {i: ev(20_000, i) for i in range(100, 140)})
        d.close()
        kill_launcher_and_expect_every_child_to_end(proc, port)
    finally:
        c.close()
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_gpus_behind_several_local_routers_lose_no_event_when_a_gpu_worker_dies():
    """--gpus 0,1 --gpus-routers 2 --procs 2: a charon-router launcher with two routers on the client port,
    and two GPU workers whose front ends each join one router. Every client connection (spread over the
    two routers by the kernel) is served, so every router has workers; a GPU worker killed outright with
    events in flight loses none of them and is restarted; killing the launcher ends everything."""
    port = free_port_range(9)
    mport = port + 1  # each GPU worker: mport + 3i .. + 3i + 2 (two front ends, its engine); routers mport + 6, + 7
    proc = subprocess.Popen([sys.executable, "-m", "charon.cli", "--gpus", "0,1", "--gpus-routers", "2", "--procs",
                             "2", "--engine", "cpu", "--detector", "sphere", "--bind", f"tcp://127.0.0.1:{port}",
                             "--metrics-port", str(mport), "--heartbeat-interval", "0.2",
                             "--log-level", "WARNING"])  # fmt: skip
    c = ReqClient(f"tcp://127.0.0.1:{port}", timeout_ms=2000, retries=0)
    dealers = []  # closed however the test ends (a failure once left them to the garbage collector's warning)

    def cmdline(pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read().split(b"\0")
        except OSError:  # it ended meanwhile
            return []

    try:
        deadline = wait_first_answer(c, 180)
        kids = _children(proc.pid)
        routers = [k for k in kids if b"router" in cmdline(k)]
        workers = [k for k in kids if b"--connect" in cmdline(k)]
        assert len(routers) == 1 and len(workers) == 2 and len(kids) == 3
        assert len(_children(routers[0])) == 2  # the two routers
        for w in workers:  # each GPU worker: two front ends, one per router
            # Started once the worker's engine is compiled. A child caught between fork and exec still shows
            # its parent's command line (with both routers in --connect): wait until both have exec'd.
            while len(fronts := [f for f in _children(w) if cmdline(f) not in ([], cmdline(w))]) < 2:
                assert time.monotonic() < deadline, f"GPU worker {w} started {len(fronts)} front ends, not 2"
                time.sleep(0.2)
            assert len(fronts) == 2, fronts
            connects = {cmdline(f)[cmdline(f).index(b"--connect") + 1] for f in fronts}
            assert len(connects) == 2 and all(b"," not in a for a in connects)  # one router each, both routers
        # A front end that has exec'd may not have registered yet, and a router without workers answers
        # NO_WORKERS (once, on CI): wait until each router has one front end of each GPU worker.
        while True:
            try:
                if all(_metric(mport + 6 + k, "charon_router_workers") == 2 for k in (0, 1)):
                    break
            except OSError:  # a router's metrics endpoint not up yet
                pass
            assert time.monotonic() < deadline, "the front ends did not register with both routers"
            time.sleep(0.2)
        dealers += [DealerClient(f"tcp://127.0.0.1:{port}") for _ in range(24)]
        for k in range(48):
            dealers[k % 24].submit(k, ev(200, k))
        replies = [d.recv(30_000) for d in dealers for _ in range(2)]
        assert sorted(r.event_id for r in replies) == list(range(48))
        assert all(r.kind == P.SIM_COMPLETE for r in replies)
        per_router = [_metric(mport + 6 + k, "charon_router_events_total") for k in (0, 1)]
        assert all(n > 0 for n in per_router) and sum(per_router) >= 48  # both routers took clients' events
        # SIGKILL one GPU worker with events in flight through both routers: none is lost.
        tables = {i: ev(20_000, i) for i in range(100, 148)}
        for k, (i, t) in enumerate(tables.items()):
            dealers[k % 24].submit(i, t)
        os.kill(workers[0], signal.SIGKILL)
        got = [d.recv(60_000) for d in dealers for _ in range(2)]
        assert sorted(r.event_id for r in got) == sorted(tables) and all(r.kind == P.SIM_COMPLETE for r in got)
        while len(set(w for w in _children(proc.pid) if b"--connect" in cmdline(w)) - {workers[0]}) < 2:
            assert time.monotonic() < deadline + 60, "the killed GPU worker was not restarted"
            time.sleep(0.2)
        kill_launcher_and_expect_every_child_to_end(proc, port)
    finally:
        for d in dealers:
            d.close()
        c.close()
        proc.terminate()
        proc.wait(30)


def test_router_settings_survive_the_trip_through_argv():
    """--gpus-routers hands the local routers' settings to charon-router as flags (cli.args_from_config)."""
    import argparse

    from charon.cli import ROUTER_HELP, _local_router_config, add_dataclass_flags, args_from_config, config_from_args

    config = ServerConfig(gpus="0,1", procs=4, gpus_routers=4, bind="tcp://127.0.0.1:7000", metrics_port=9000,
                          output_dir="/tmp", output_idle_seconds=2.5, heartbeat_interval=0.2, ping_reply="ACK")
    want = _local_router_config(config, "tcp://127.0.0.1:7100", procs=4)
    assert want.metrics_port == 9010 and want.output_idle_seconds == 2.5 and want.procs == 4
    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, RouterConfig, ROUTER_HELP)
    assert config_from_args(RouterConfig, parser.parse_args(args_from_config(want))) == want


def test_gpus_routers_is_refused_where_it_cannot_work():
    for kw, text in [(dict(gpus_routers=0), ">= 1"), (dict(gpus_routers=2, procs=2), "add --gpus"),
                     (dict(gpus="0,1", gpus_routers=2, gpus_share="port", procs=2), "add --gpus"),
                     (dict(gpus="0,1", gpus_routers=3, procs=2), "--procs N with N >= 3"),
                     (dict(gpus="0,1", gpus_routers=2, procs=2, bind="ipc:///tmp/x"), "tcp")]:  # fmt: skip
        with pytest.raises(ValueError, match=text):
            ServerConfig(**kw).validate()


@pytest.mark.slow
def test_gpus_share_port_gives_each_gpu_its_own_front_ends_on_the_one_port():
    """--gpus 0,1 --gpus-share port --procs 2: no router; each GPU's server has two front ends on the client
    port and its own engine; both engines get events; a GPU server killed outright takes its front ends
    with it and is restarted; killing the launcher ends everything."""
    port = free_port_range(7)
    mport = port + 1  # metrics on mport + i
    proc = subprocess.Popen([sys.executable, "-m", "charon.cli", "--gpus", "0,1", "--gpus-share", "port", "--procs",
                             "2", "--engine", "cpu", "--detector", "sphere", "--seed", str(SEED), "--bind",
                             f"tcp://127.0.0.1:{port}", "--metrics-port", str(mport),
                             "--log-level", "WARNING"])  # fmt: skip
    c = ReqClient(f"tcp://127.0.0.1:{port}", timeout_ms=2000, retries=0)

    def events_through(first_id):
        dealers = [DealerClient(f"tcp://127.0.0.1:{port}") for _ in range(24)]
        tables = {first_id + i: random_event(300, np.random.default_rng(first_id + i), radius=100.0)
                  for i in range(48)}  # fmt: skip
        for k, (i, t) in enumerate(tables.items()):
            dealers[k % 24].submit(i, t)
        replies = {r.event_id: r for d in dealers for r in (d.recv(30_000), d.recv(30_000))}
        for d in dealers:
            d.close()
        assert sorted(replies) == sorted(tables) and all(r.kind == P.SIM_COMPLETE for r in replies.values())
        return tables, replies

    try:
        deadline = wait_first_answer(c, 180)
        # GPU i's server: front ends on mport + 3i and + 3i + 1, its engine on + 3i + 2 (worker_metrics_port).
        for k in (0, 1, 3, 4):
            while True:
                try:
                    _metric(mport + k, "charon_events_total")
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"front end on metrics port {mport + k} did not come up"
                    time.sleep(0.3)
        servers = _children(proc.pid)
        assert len(servers) == 2 and all(len(_children(s)) == 2 for s in servers)  # no router, two per GPU
        tables, replies = events_through(0)
        sphere = CPUEngine(resolve_detector("sphere"), EngineConfig(seed=SEED))
        for i in (0, 23, 47):
            np.testing.assert_array_equal(replies[i].hits["channel"], expected(sphere, i, tables[i]).channel)
        # 24 connections over four listeners: all on one GPU's two has probability 2 * 2^-24.
        assert _metric(mport + 2, "charon_batches_total") >= 1 and _metric(mport + 5, "charon_batches_total") >= 1
        assert sum(_metric(mport + k, "charon_events_total") for k in (0, 1, 3, 4)) >= 48

        victim = servers[0]
        its_front_ends = _children(victim)
        os.kill(victim, signal.SIGKILL)
        _wait_gone(its_front_ends, 30, "front ends of a killed GPU server")
        while len(set(_children(proc.pid)) - {victim}) < 2:
            assert time.monotonic() < deadline + 60, "the killed GPU server was not restarted"
            time.sleep(0.2)
        # Clients connect to whichever listeners are there (the restarted server's once it is up).
        events_through(1000)
        kill_launcher_and_expect_every_child_to_end(proc, port)
    finally:
        c.close()
        proc.terminate()
        proc.wait(30)


def test_a_child_whose_launcher_is_gone_does_not_start():
    """--parent names the launcher; a child that finds another parent (the launcher died before it asked
    the kernel to be told) exits at once instead of serving with nothing behind it."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux-only")
    r = subprocess.run([sys.executable, "-m", "charon.cli", "--parent", str(os.getpid() + 10**6), "--engine", "cpu",
                        "--bind", "tcp://127.0.0.1:0"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 1 and "is gone; not starting" in r.stderr


def test_router_io_threads_get_a_context_of_their_own(det, reference):
    c = Cluster(det, io_threads=3)
    try:
        assert c.router.ctx is not zmq.Context.instance() and c.router.ctx.get(zmq.IO_THREADS) == 3
        c.add_worker()
        c.wait_workers(1)
        t = ev(300, 5)
        r = c.req(timeout_ms=10_000, retries=0).simulate(5, t)
        np.testing.assert_array_equal(r.hits["channel"], expected(reference, 5, t).channel)
    finally:
        c.close()
    assert c.router.ctx.closed  # terminated with the router
    with pytest.raises(ValueError, match="--io-threads must be >= 0"):
        RouterConfig(io_threads=-1).validate()


@pytest.mark.slow
def test_connect_with_procs_runs_workers_that_share_one_engine():
    """--connect ROUTER --procs 2: two workers register with the router and share the launcher's engine;
    --bind is left alone; a front end killed with events in flight loses none of them and is restarted."""
    router, rth = run_router_in_thread(RouterConfig(frontend="tcp://127.0.0.1:0", backend="tcp://127.0.0.1:0",
                                                    heartbeat_interval=BEAT, heartbeat_liveness=LIVENESS,
                                                    hold_seconds=30))  # fmt: skip
    port = free_port_range(7)
    mport = port + 1  # metrics on mport + i
    # The CPU engine seeded as `reference` on the same detector as `det`: hits can be compared exactly.
    proc = subprocess.Popen([sys.executable, "-m", "charon.cli", "--connect", router.backend_address, "--procs", "2",
                             "--engine", "cpu", "--detector", "sphere", "--seed", str(SEED), "--bind",
                             f"tcp://127.0.0.1:{port}", "--metrics-port", str(mport),
                             "--heartbeat-interval", str(BEAT), "--heartbeat-liveness", str(LIVENESS),
                             "--log-level", "WARNING"])  # fmt: skip
    c = ReqClient(router.frontend_address, timeout_ms=2000, retries=0)
    try:
        deadline = wait_first_answer(c, 120)
        while len(router.workers) < 2:
            assert time.monotonic() < deadline, "both front ends did not register"
            time.sleep(0.2)
        with socket.socket() as s:  # nothing holds --bind: a worker host listens for no client
            s.bind(("127.0.0.1", port))

        d = DealerClient(router.frontend_address)
        tables = {i: random_event(300, np.random.default_rng(i), radius=100.0) for i in range(40)}
        for i, t in tables.items():
            d.submit(i, t)
        replies = {r.event_id: r for r in (d.recv(30_000) for _ in range(40))}
        sphere = CPUEngine(resolve_detector("sphere"), EngineConfig(seed=SEED))
        for i in (0, 17, 39):
            assert replies[i].kind == P.SIM_COMPLETE
            np.testing.assert_array_equal(replies[i].hits["channel"], expected(sphere, i, tables[i]).channel)
        assert all(r.kind == P.SIM_COMPLETE for r in replies.values())
        served = [_metric(mport + k, "charon_events_total") for k in range(2)]
        assert min(served) > 0 and sum(served) >= 40  # the router gave both workers a share
        # one engine
        assert _metric(mport + 2, "charon_batches_total") >= 1 and _metric(mport, "charon_batches_total") == 0
        kill_a_child_with_events_in_flight(
            proc, d, {i: random_event(5000, np.random.default_rng(i), radius=100.0) for i in range(100, 130)})
        d.close()
    finally:
        c.close()
        proc.terminate()
        proc.wait(30)
        router.stop()
        rth.join(10)


def test_gpus_with_procs_give_each_worker_its_own_metrics_ports():
    from charon.cli import worker_metrics_port

    cfg = ServerConfig(gpus="0,1,2", procs=3, metrics_port=9000)
    # worker 0: front ends 9000-9002, engine 9003; worker 1 from 9004; worker 2 from 9008
    assert [worker_metrics_port(cfg, i) for i in range(3)] == [9000, 9004, 9008]
    cfg = ServerConfig(gpus="0,1", metrics_port=9000)
    assert [worker_metrics_port(cfg, i) for i in range(2)] == [9000, 9001]


@pytest.mark.slow
@pytest.mark.parametrize("accept", ["reuseport", "proxy"])
def test_procs_flag_runs_front_ends_behind_one_address_sharing_one_engine(tmp_path, accept):
    port = free_port_range(7)
    mport = port + 1  # metrics on mport + i
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    # --engine-cpus (reuseport run, where at least two CPUs): the engine thread gets the first CPU to itself.
    pinned = accept == "reuseport" and len(allowed) >= 2
    # A segment left by a process tree killed at once (launcher and front end gone): the launcher removes it.
    orphan = None
    if handoff.available():
        d1, d2 = gone_pids(2)
        orphan = os.path.join(handoff.SHM_DIR, f"charon-{d1}-{d2}-0")
        with open(orphan, "wb") as f:
            f.write(b"\0" * 4096)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "charon.cli", "--procs", "2", "--engine", "cpu", "--detector",
                             "sphere", "--bind", f"tcp://127.0.0.1:{port}", "--metrics-port", str(mport),
                             "--log-level", "WARNING", "--accept", accept]
                            + (["--engine-cpus", str(allowed[0])] if pinned else []))  # fmt: skip
    c = ReqClient(f"tcp://127.0.0.1:{port}", timeout_ms=2000, retries=0)
    try:
        deadline = wait_first_answer(c, 120)
        import urllib.request

        for k in range(2):  # wait until both worker processes are up
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{mport + k}/metrics", timeout=5).read()
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"worker {k} did not come up"
                    time.sleep(0.3)
        if pinned:
            threads = {t: _thread_name(proc.pid, t) for t in os.listdir(f"/proc/{proc.pid}/task")}
            # One thread on the engine's CPU, and it is the engine's (the CPU engine's numba workers
            # inherit its name, not its CPU); every other thread of the launcher is kept off that CPU.
            on_it = [t for t in threads if allowed[0] in os.sched_getaffinity(int(t))]
            assert len(on_it) == 1 and threads[on_it[0]] == "charon-engine"
            assert os.sched_getaffinity(int(on_it[0])) == {allowed[0]} and len(threads) > 1
            fronts = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            assert len(fronts) == 2 and all(os.sched_getaffinity(int(f)) == set(allowed[1:]) for f in fronts)
        # wait_first_answer may have sent more than one request (each is answered): count from here.
        before = [_metric(mport + k, "charon_events_total") for k in range(2)]
        # Several connections: with reuseport the kernel assigns each connection (not each
        # message) to a front end, so 24 of them all landing on one has probability 2^-23.
        dealers = [DealerClient(f"tcp://127.0.0.1:{port}") for _ in range(24)]
        for i in range(48):
            dealers[i % 24].submit(i, ev(300, i))
        got = [d.recv(30_000).event_id for d in dealers for _ in range(2)]
        assert sorted(got) == list(range(48))
        for d in dealers:
            d.close()
        served = [_metric(mport + k, "charon_events_total") - before[k] for k in range(2)]
        assert sum(served) >= 48 and min(served) > 0  # both front ends served
        assert orphan is None or not os.path.exists(orphan)
        # One shared engine (metrics on mport + 2) ran every batch; the front ends ran none.
        assert _metric(mport + 2, "charon_batches_total") >= 1 and _metric(mport, "charon_batches_total") == 0
        assert _metric(mport + 2, "charon_photons_total") >= 48 * 300 + 200  # + the first answer (maybe resent)
        # Latency shares: each front end times its events; the shared engine times the batches it held.
        assert sum(_metric(mport + k, "charon_event_seconds_count") for k in range(2)) >= 48
        assert _metric(mport + 2, "charon_engine_residence_seconds_count") >= 1
        assert _metric(mport + 2, "charon_engine_residence_seconds_sum") > 0
        # The shared engine's thread counts the time it worked on those batches.
        assert 0 < _metric(mport + 2, "charon_engine_thread_seconds_total") < time.monotonic() - started
        if shm_available():  # photons reached the shared engine through the front ends' shared memory
            assert _metric(mport + 2, 'charon_handoff_batches_total{path="shm"}') >= 1
            fronts = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            mine = [f for f in os.listdir("/dev/shm") if f.startswith(f"charon-{proc.pid}-")]
            victim = next(p for p in fronts if any(f.startswith(f"charon-{proc.pid}-{p}-") for f in mine))
            # A front end killed outright leaves its segments; the launcher removes them when it restarts it.
            os.kill(int(victim), signal.SIGKILL)
            while True:
                now = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
                if len(now) == 2 and victim not in now:
                    break
                assert time.monotonic() < deadline, "killed front end was not restarted"
                time.sleep(0.2)
            assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"charon-{proc.pid}-{victim}-")]
    finally:
        c.close()
        proc.terminate()
        proc.wait(30)
    if shm_available():  # every segment removed at exit
        assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"charon-{proc.pid}-")]


def test_procs_refuses_output_dir_behind_the_proxy(tmp_path, caplog):
    """The proxy spreads one client's messages over the front ends, so a run's events would reach several writers."""
    from charon.cli import batch_main

    with caplog.at_level("ERROR", logger="charon"):
        rc = batch_main(["--procs", "2", "--accept", "proxy", "--output-dir", str(tmp_path), "--engine", "cpu"])
    assert rc == 2
    assert any("--accept reuseport" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("argv, problem", [
    (["--engine-cpus", "0"], "add --procs"),  # one process has no shared engine to pin
    (["--procs", "2", "--engine-cpus", "0-"], "bad CPU list"),
    (["--procs", "2", "--engine-cpus", "100000"], "may not use"),
    (["--gpus", "0,1", "--procs", "2", "--engine-cpus", "0"], "every GPU's engine thread on the same CPUs"),
    (["--gpus", "0,1", "--gpus-share", "port", "--procs", "2", "--engine-cpus", "0"],
     "the same number of CPUs for each GPU's engine thread (1 listed)"),
])  # fmt: skip
def test_engine_cpus_refusals_name_the_problem(argv, problem, caplog):
    from charon.cli import batch_main

    with caplog.at_level("ERROR", logger="charon"):
        assert batch_main([*argv, "--engine", "cpu", "--bind", "tcp://127.0.0.1:0"]) == 2
    assert problem in caplog.text


def test_engine_cpus_must_leave_cpus_for_the_front_ends():
    from charon.cpus import split_engine_cpus

    allowed = sorted(os.sched_getaffinity(0))
    spec = ",".join(map(str, allowed))
    with pytest.raises(ValueError, match="leaves no CPU for the front ends"):
        split_engine_cpus(spec)
    assert split_engine_cpus(None) is None
    if len(allowed) >= 2:
        assert split_engine_cpus(str(allowed[-1])) == ({allowed[-1]}, set(allowed[:-1]))


def test_engine_cpus_are_shared_out_among_the_gpus_and_kept_off_by_every_front_end():
    """--gpus-share port --engine-cpus LIST: each GPU's engine thread gets an equal share of LIST in
    ascending order; a GPU's front ends keep off every GPU's engine CPUs, not only their own."""
    from charon.cpus import engine_cpus_per_gpu, split_engine_cpus

    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs two CPUs")
    a, b = allowed[0], allowed[1]
    assert engine_cpus_per_gpu(f"{b},{a}", 2) == [str(a), str(b)]
    assert engine_cpus_per_gpu(f"{a}-{b}", 1) == [f"{a},{b}"]
    with pytest.raises(ValueError, match=r"same number of CPUs for each GPU's engine thread \(2 listed\)"):
        engine_cpus_per_gpu(f"{a},{b}", 3)
    rest = set(allowed) - {a, b}
    if rest:
        assert split_engine_cpus(str(a), keep_off=f"{a},{b}") == ({a}, rest)
    else:  # two CPUs: both taken by engine threads, none left for the front ends
        with pytest.raises(ValueError, match="leaves no CPU for the front ends"):
            split_engine_cpus(str(a), keep_off=f"{a},{b}")
    assert split_engine_cpus(str(a)) == ({a}, set(allowed) - {a})


@pytest.mark.slow
def test_gpus_share_port_pins_each_gpus_engine_thread_and_keeps_the_front_ends_off():
    """The launcher hands each GPU's server its share of --engine-cpus and the whole list; that server's
    engine thread runs on its share and its front ends on what is left (one GPU: two CPUs suffice)."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs two CPUs")
    cpu = allowed[-1]
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "charon.cli", "--gpus", "0", "--gpus-share", "port", "--procs", "2",
                             "--engine-cpus", str(cpu), "--engine", "cpu", "--detector", "sphere", "--bind",
                             f"tcp://127.0.0.1:{port}", "--log-level", "WARNING"])  # fmt: skip
    c = ReqClient(f"tcp://127.0.0.1:{port}", timeout_ms=2000, retries=0)
    try:
        deadline = wait_first_answer(c, 120)
        (server,) = _children(proc.pid)
        with open(f"/proc/{server}/cmdline") as f:
            argv = f.read().split("\0")
        assert argv[argv.index("--engine-cpus") + 1] == str(cpu)
        assert argv[argv.index("--engine-cpus-all") + 1] == str(cpu)
        while len(_children(server)) < 2:
            assert time.monotonic() < deadline, "front ends did not start"
            time.sleep(0.2)
        assert all(os.sched_getaffinity(f) == set(allowed) - {cpu} for f in _children(server))
        pinned = [t for t in os.listdir(f"/proc/{server}/task") if os.sched_getaffinity(int(t)) == {cpu}]
        assert [_thread_name(server, t) for t in pinned] == ["charon-engine"]
    finally:
        c.close()
        proc.terminate()
        proc.wait(30)


def _thread_name(pid, tid) -> str:
    """A thread's name, or "" for one that ended since /proc was listed (other tests' threads wind down)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            return f.read().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def test_launcher_stops_everything_when_a_thread_its_processes_need_ends():
    """_supervise with needs=(what, is_alive): once the shared engine's (or the local router's) thread has
    ended, the launcher stops its processes and exits 1, instead of keeping processes that take events
    that nothing will answer."""
    from charon.cli import _supervise

    started, alive = [], threading.Event()
    alive.set()

    def start(i):
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        started.append(p)
        return p

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threading.Timer(1.0, alive.clear).start()
    # Cannot hang: should the launcher miss it, a SIGTERM ends _supervise (with 0) after 15 s.
    guard = threading.Timer(15.0, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        guard.start()
        assert _supervise("test process", start, 2, needs=("the test's engine", alive.is_set)) == 1
    finally:
        guard.cancel()
        for s, h in handlers.items():
            signal.signal(s, h)
    assert len(started) == 2 and all(p.poll() is not None for p in started)  # stopped, not restarted


def test_router_metrics_count_events_replies_and_workers(det):
    mport = _free_port()
    c = Cluster(det, metrics_port=mport)
    try:
        assert c.req(timeout_ms=5000, retries=0).simulate(1, ev(10, 1)).kind == P.NO_WORKERS
        c.add_worker()
        c.wait_workers(1)
        d = c.dealer()
        for i in range(5):
            d.submit(i, ev(200, i))
        d.submit(0, ev(200, 0))  # a resend of event 0 from the same client: joined, or answered twice
        replies = [d.recv(20_000).event_id for _ in range(5)]
        assert sorted(set(replies)) == list(range(5))
        events = _metric(mport, "charon_router_events_total")
        dup = _metric(mport, "charon_router_duplicate_requests_total")
        assert events + dup == 6 and events >= 5
        deadline = time.monotonic() + 10
        while _metric(mport, "charon_router_replies_total") < events:
            assert time.monotonic() < deadline, "replies not counted"
            time.sleep(0.05)
        assert _metric(mport, "charon_router_workers") == 1
        assert _metric(mport, "charon_router_no_workers_total") == 1
        assert _metric(mport, "charon_router_inflight_events") == 0
        assert _metric(mport, "charon_router_host_seconds_total") > 0
        if sys.platform.startswith("linux"):  # the router process's own memory, as a server's endpoint gives
            assert _metric(mport, "process_resident_memory_bytes") > 1e7
            if _mallinfo2() is not None:
                assert _metric(mport, "process_malloc_in_use_bytes") > 1e5
    finally:
        c.close()


@pytest.mark.parametrize("kw, problem", [
    (dict(procs=2, backend="tcp://127.0.0.1:0"), "explicit port"),
    (dict(procs=2, backend="ipc:///tmp/charon-be"), "--backend with --procs"),
    (dict(procs=2, frontend="ipc:///tmp/charon-fe"), "tcp://"),
    (dict(procs=0), "--procs"),
    (dict(accept="proxy"), "--accept"),
])  # fmt: skip
def test_router_procs_refusals_name_the_problem(kw, problem):
    with pytest.raises(ValueError, match=problem):
        RouterConfig(**kw).validate()


@pytest.mark.parametrize("connect, procs, problem", [
    ("tcp://127.0.0.1:7001,tcp://127.0.0.1:7002", 1, "--procs N with N >= 2"),
    ("tcp://127.0.0.1:7001,tcp://127.0.0.1:7002,tcp://127.0.0.1:7003", 2, "N >= 3"),
    (" , ", 1, "--connect needs"),
])  # fmt: skip
def test_worker_connect_list_refusals_name_the_problem(connect, procs, problem):
    with pytest.raises(ValueError, match=problem):
        ServerConfig(connect=connect, procs=procs).validate()


def test_router_procs_refuse_a_taken_client_or_backend_port(caplog):
    from charon.cli import router_main

    port = free_port_range(3)  # client port, then backends port + 1, port + 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen(1)
        argv = ["--procs", "2", "--frontend", f"tcp://127.0.0.1:{port}", "--backend", f"tcp://127.0.0.1:{port + 1}"]
        assert router_main(argv) == 2
    assert "Address already in use" in caplog.text
    with socket.socket() as s:  # router 1's backend is taken: it cannot start, and neither does the launcher
        s.bind(("127.0.0.1", port + 2))
        s.listen(1)
        proc = subprocess.run([sys.executable, "-m", "charon.cli", "router", *argv], capture_output=True, text=True,
                              timeout=60)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"{port + 2}" in proc.stderr and "cannot start" in proc.stderr


@pytest.mark.slow
def test_router_procs_share_the_client_port_and_each_gets_workers_from_every_host():
    """charon-router --procs 2 on one client port; a worker host --connect to both backends with --procs 2
    (front end k a worker of router k). Clients' connections spread over both routers, every event comes
    back right; a router killed outright is restarted on its ports, its worker registers again, and
    clients that were on it get their events answered through their retries."""
    port = free_port_range(6)
    fe, be, mport = port, port + 1, port + 3  # backends be, be + 1; router metrics mport, mport + 1
    beat = ["--heartbeat-interval", str(BEAT), "--heartbeat-liveness", str(LIVENESS)]
    routers = subprocess.Popen([sys.executable, "-m", "charon.cli", "router", "--procs", "2", "--frontend",
                                f"tcp://127.0.0.1:{fe}", "--backend", f"tcp://127.0.0.1:{be}", "--metrics-port",
                                str(mport), *beat, "--log-level", "WARNING"])  # fmt: skip
    workers = subprocess.Popen([sys.executable, "-m", "charon.cli", "--connect",
                                f"tcp://127.0.0.1:{be},tcp://127.0.0.1:{be + 1}", "--procs", "2", "--engine", "cpu",
                                "--detector", "sphere", "--seed", str(SEED), *beat,
                                "--log-level", "WARNING"])  # fmt: skip
    clients = []
    try:
        def workers_of_each_router():
            try:
                return [_metric(mport + k, "charon_router_workers") for k in range(2)]
            except OSError:  # a router not up yet
                return None

        deadline = time.monotonic() + 120
        while workers_of_each_router() != [1, 1]:
            assert time.monotonic() < deadline, "each router did not get its worker"
            assert workers.poll() is None and routers.poll() is None
            time.sleep(0.2)
        sphere = CPUEngine(resolve_detector("sphere"), EngineConfig(seed=SEED))
        # 24 connections: all on one of two listeners has a chance of 2 / 2**24.
        clients = [DealerClient(f"tcp://127.0.0.1:{fe}") for _ in range(24)]
        tables = {i: random_event(200, np.random.default_rng(i), radius=100.0) for i in range(48)}
        for i, t in tables.items():
            clients[i % 24].submit(i, t)
        for k, c in enumerate(clients):
            for r in (c.recv(30_000), c.recv(30_000)):
                assert r.kind == P.SIM_COMPLETE and r.event_id % 24 == k
                np.testing.assert_array_equal(r.hits["channel"], expected(sphere, r.event_id,
                                                                          tables[r.event_id]).channel)  # fmt: skip
        served = [_metric(mport + k, "charon_router_replies_total") for k in range(2)]
        assert sum(served) == 48 and min(served) > 0, served
        for c in clients:
            c.close()
        clients = []
        # SIGKILL router 0 (the launcher's first child) while Lazy-Pirate clients have events in flight.
        first = _children(routers.pid)
        assert len(first) == 2
        clients = [ReqClient(f"tcp://127.0.0.1:{fe}", timeout_ms=3000, retries=5) for _ in range(8)]
        answers = {}

        def ask(k):
            answers[k] = clients[k].simulate(200 + k, tables[k])

        threads = [threading.Thread(target=ask, args=(k,)) for k in range(8)]
        os.kill(first[0], signal.SIGKILL)
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(answers) == list(range(8)) and all(r.kind == P.SIM_COMPLETE for r in answers.values())
        deadline = time.monotonic() + 60
        while workers_of_each_router() != [1, 1] or \
                len(set(_children(routers.pid)) - {first[0]}) < 2:  # fmt: skip
            assert time.monotonic() < deadline, "router 0 was not restarted with its worker back"
            time.sleep(0.2)
        kill_launcher_and_expect_every_child_to_end(routers, fe)
    finally:
        for c in clients:
            c.close()
        for p in (workers, routers):
            p.terminate()
            p.wait(30)


def test_router_stop_passes_on_the_replies_to_what_it_took(cluster, det):
    """stop() while its worker holds three events: the router reads no more requests but passes on the
    three replies when they come, then ends."""
    gate = threading.Event()
    cluster.add_worker(engine_factory=lambda: GatedEngine(CPUEngine(det, EngineConfig(seed=SEED)), gate))
    cluster.wait_workers(1)
    d = cluster.dealer()
    for i in range(3):
        d.submit(i, ev(200, i))
    deadline = time.monotonic() + 10
    while len(cluster.router.inflight) < 3:
        assert time.monotonic() < deadline, "the events did not reach the worker"
        time.sleep(0.01)
    cluster.router.stop()
    time.sleep(0.2)
    d.submit(99, ev(200, 99))  # after the stop: left unread
    threading.Timer(0.3, gate.set).start()
    assert sorted(d.recv(10_000).event_id for _ in range(3)) == [0, 1, 2]
    cluster.router_thread.join(10)
    assert not cluster.router_thread.is_alive()
    with pytest.raises(TimeoutError):
        d.recv(200)


@pytest.mark.slow
@pytest.mark.parametrize("to", ["launcher", "process group"])
def test_sigterm_to_a_procs_launcher_answers_the_events_in_flight_first(to):
    """charon-batch --procs 2 gets SIGTERM with ~2 s of CPU work in flight: its front ends answer every
    event they had received (the shared engine stays up for them), then everything exits with status 0.
    Sent to the whole process group (as systemd does, or Ctrl-C in a terminal), each front end gets the
    stop twice, once more from the launcher, and must not take the second as "skip the drain"."""
    port = free_port_range(4)
    mport = port + 1  # front ends' metrics on mport, mport + 1
    # A generous drain: what is tested is that nothing received is dropped, not how fast CI's cores are.
    proc = subprocess.Popen([sys.executable, "-m", "charon.cli", "--procs", "2", "--engine", "cpu", "--detector",
                             "sphere", "--seed", str(SEED), "--bind", f"tcp://127.0.0.1:{port}", "--metrics-port",
                             str(mport), "--drain-seconds", "120", "--log-level", "WARNING"],
                            start_new_session=True)  # fmt: skip
    c = ReqClient(f"tcp://127.0.0.1:{port}", timeout_ms=2000, retries=0)
    dealers = []
    try:
        deadline = wait_first_answer(c, 120)

        def counts(name):
            while True:
                try:
                    return sum(_metric(mport + k, name) for k in range(2))
                except OSError:  # a front end's endpoint not up yet
                    assert time.monotonic() < deadline, "front ends' metrics did not come up"
                    time.sleep(0.2)

        before = counts("charon_accepted_events_total")
        dealers = [DealerClient(f"tcp://127.0.0.1:{port}") for _ in range(8)]
        tables = {i: random_event(40_000, np.random.default_rng(i), radius=100.0) for i in range(16)}
        for i, t in tables.items():
            dealers[i % 8].submit(i, t)
        # Requests still unread when the stop comes are left to the clients' retries: wait until the
        # front ends have taken all sixteen, and check that work is still in flight then.
        while counts("charon_accepted_events_total") < before + 16:
            assert time.monotonic() < deadline, "the front ends did not take the events"
            time.sleep(0.05)
        assert counts("charon_events_total") < before + 16
        if to == "launcher":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGTERM)
        replies = {r.event_id: r for d in dealers for r in (d.recv(120_000), d.recv(120_000))}
        assert sorted(replies) == sorted(tables) and all(r.kind == P.SIM_COMPLETE for r in replies.values())
        sphere = CPUEngine(resolve_detector("sphere"), EngineConfig(seed=SEED))
        np.testing.assert_array_equal(replies[5].hits["channel"], expected(sphere, 5, tables[5]).channel)
        assert proc.wait(60) == 0
    finally:
        for d in dealers:
            d.close()
        c.close()
        proc.terminate()
        proc.wait(30)


def test_a_stopping_worker_answers_what_it_was_sent_and_is_sent_nothing_new(cluster, det, reference):
    """stop() on one of two workers (a rolling restart) while it holds events: it says LEAVING, the router
    sends it nothing new, it answers what it had, and nothing is re-sent or lost."""
    gate = threading.Event()
    leaving, leaving_th = cluster.add_worker(
        engine_factory=lambda: GatedEngine(CPUEngine(det, EngineConfig(seed=SEED)), gate))
    cluster.wait_workers(1)
    d = cluster.dealer()
    first = {i: ev(200, i) for i in range(4)}
    for i, t in first.items():
        d.submit(i, t)
    deadline = time.monotonic() + 10
    while len(leaving.by_key) < 4:  # all four at the gated worker (the only one so far)
        assert time.monotonic() < deadline, "the events did not reach the worker"
        time.sleep(0.01)
    cluster.add_worker(max_batch_photons=3000)  # less room than the gated one: only LEAVING keeps events off it
    cluster.wait_workers(2)
    leaving.stop()
    deadline = time.monotonic() + 10
    while not any(w.leaving for w in cluster.router.workers.values()):
        assert time.monotonic() < deadline, "the router did not hear LEAVING"
        time.sleep(0.01)
    later = {i: ev(200, i) for i in range(10, 20)}
    for i, t in later.items():
        d.submit(i, t)
    later_replies = {r.event_id: r for r in (d.recv(10_000) for _ in later)}  # from the other worker
    assert sorted(later_replies) == sorted(later) and leaving_th.is_alive()  # still holding the first four
    gate.set()
    got = {r.event_id: r for r in (d.recv(10_000) for _ in first)}
    assert sorted(got) == sorted(first)
    for i, t in first.items():
        np.testing.assert_array_equal(got[i].hits["time"], expected(reference, i, t).table[7])
    leaving_th.join(10)
    assert not leaving_th.is_alive()
    assert cluster.router.reassigned == 0  # nothing had to be re-sent
    assert leaving.metrics.registry.get_sample_value("charon_events_total") == 4


def test_a_stopping_worker_does_not_wait_for_a_router_that_is_gone(det):
    """No router answers LEAVING: the worker waits no longer than the router's liveness, not --drain-seconds."""
    srv, th = run_in_thread(ServerConfig(connect=f"tcp://127.0.0.1:{_free_port()}", engine="cpu",
                                         heartbeat_interval=BEAT, heartbeat_liveness=LIVENESS,
                                         drain_seconds=60), detector=det)  # fmt: skip
    t0 = time.monotonic()
    srv.stop()
    th.join(10)
    assert not th.is_alive() and time.monotonic() - t0 < 3 * BEAT * LIVENESS
