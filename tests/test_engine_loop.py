"""The engine driven from the socket loop (engine_loop.py), on its own: launch order, a batch waiting for a lane,
when the loop must look at the GPU, stopping, and the engines it refuses. The server with it: test_server.py's
lanes tests, which run with both drivers."""

import threading
import time

import numpy as np
import pytest

from charon.engine_loop import LoopEngine
from charon.engines.base import EngineConfig, StageTimes
from charon.engines.cpu import CPUEngine
from charon.geometry.builtin import sphere_detector
from charon.geometry.optics import constant_surface
from charon.metrics import BusyClock
from charon.photons import N_ROWS, PhotonBatch
from charon.scheduler.batcher import HostBuffer, Slot, assemble
from charon.scheduler.request import EventRequest
from charon.sources import random_event
from standins import LanedEngine


@pytest.fixture(scope="module")
def det():
    wall = constant_surface("grey", detect=0.3, absorb=0.5, reflect_diffuse=0.2)
    return sphere_detector(1000.0, wall_surface=wall, subdivisions=2)


def _batch(event_id, n=150):
    t = random_event(n, np.random.default_rng(event_id), radius=500.0)
    rows = [np.ascontiguousarray(t[r]) for r in range(N_ROWS)]
    req = EventRequest(event_id, n, rows, None, (event_id, n), None, 0.0)
    return assemble([Slot(req, 0, n)], HostBuffer(), n), t


def _started(det, lanes=2, fail_at=None):
    made = {}

    def factory():
        made["e"] = LanedEngine(CPUEngine(det, EngineConfig(seed=3)), lanes=lanes, fail_at=fail_at)
        return made["e"]

    busy = BusyClock()
    le = LoopEngine(factory, busy)
    le.start()
    return le, made["e"], busy


def test_batches_finish_in_launch_order_and_a_waiting_one_takes_the_freed_lane(det):
    le, eng, busy = _started(det)
    assert (le.lanes, le.max_in_flight, le.wake_socket) == (2, 3, None)
    assert le.due_ms() is None  # nothing runs: no reason to look at the GPU
    batches = [_batch(i) for i in range(3)]
    for b, _ in batches:
        le.submit(b)
    assert eng.running == 2 and len(eng.launched) == 2 and le.in_flight == 3  # the third waits for a lane
    assert busy._busy_since is not None
    eng.gates[1].set()  # the second is done first: it is not collected before the first
    le.poll_results()
    assert not le.results and eng.running == 2
    eng.gates[0].set()
    le.poll_results()
    assert [r.batch for r in le.results] == [batches[0][0], batches[1][0]]
    assert len(eng.launched) == 3 and eng.running == 1  # the waiting batch was launched on a freed lane
    eng.gates[2].set()
    le.poll_results()
    assert len(le.results) == 3 and le.due_ms() is None and busy._busy_since is None
    assert sum(r.parts[0].hits.n_hits for r in le.results) > 0  # the comparison below compares hits
    ref = CPUEngine(det, EngineConfig(seed=3))
    for res, (b, t) in zip(le.results, batches):
        want = ref.propagate(PhotonBatch.from_events([t], [int(b.photons.event_id[0])]))
        (part,) = res.parts
        assert part.error is None and part.slots == b.slots
        np.testing.assert_array_equal(part.hits.channel, want.channel)
        np.testing.assert_array_equal(part.hits.table, want.table)
    le.stop()


def test_the_loop_looks_at_the_gpu_once_most_of_a_usual_batch_time_has_passed(det):
    le, eng, _ = _started(det)
    le.submit(_batch(1)[0])
    assert le.due_ms() == 0.0  # no batch measured yet: look at every turn
    eng.last_times = StageTimes(copy_in=0.001, propagate=0.008, demux=0.0005, copy_out=0.0005)  # 10 ms on the device
    eng.gates[0].set()
    le.poll_results()
    assert le._device_s == pytest.approx(0.010)
    before = time.perf_counter()
    le.submit(_batch(2)[0])
    due = le.due_ms()
    assert 8.0 - 1e3 * (time.perf_counter() - before) <= due <= 8.0  # spin_share 0.8 of the usual 10 ms
    batch, handle, _ = le._running[0]
    le._running[0] = (batch, handle, time.perf_counter() - 0.009)  # as if launched 9 ms ago: look now
    assert le.due_ms() == 0.0
    eng.gates[1].set()
    le.stop()


def test_stop_finishes_every_submitted_batch_then_closes_the_engine(det):
    le, eng, _ = _started(det, lanes=1)
    closed = []
    eng.close = lambda: closed.append(True)
    for i in range(3):
        le.submit(_batch(i)[0])
    assert eng.running == 1 and len(le._waiting) == 2

    def open_gate():
        g = threading.Event()
        g.set()
        return g

    eng._event = open_gate  # the two waiting batches run at once when stop launches them
    eng.gates[0].set()
    le.stop()
    assert [int(r.batch.photons.event_id[0]) for r in le.results] == [0, 1, 2]
    assert all(r.parts[0].error is None for r in le.results) and closed == [True] and eng.running == 0


def test_an_engine_without_asynchronous_calls_is_refused_and_closed(det):
    closed = []

    class SyncOnly:
        name = "cpu"

        def warm_up(self):
            raise AssertionError("not warmed up: refused first")

        def close(self):
            closed.append(True)

    with pytest.raises(ValueError, match="--engine-driver loop needs an engine with asynchronous calls.*'cpu'"):
        LoopEngine(SyncOnly, BusyClock()).start()
    assert closed == [True]


def test_server_config_refuses_the_loop_driver_where_it_cannot_drive_the_engine():
    from charon.cli import batch_parser
    from charon.server import ServerConfig

    for kw, reason in (({"engine": "cpu"}, "--engine cpu has none"), ({"engine": "chroma"}, "--engine chroma"),
                       ({"engine": "cuda", "procs": 2}, "share one engine process"),
                       ({"engine_driver": "fast"}, "must be one of auto, thread, loop")):  # fmt: skip
        with pytest.raises(ValueError, match=reason):
            ServerConfig(**{"engine_driver": "loop", **kw}).validate()
    ServerConfig(engine="cuda", engine_driver="loop").validate()
    ServerConfig(engine="auto", engine_driver="loop").validate()  # refused at start if auto finds no GPU
    assert batch_parser().parse_args(["--engine-driver", "loop"]).engine_driver == "loop"
    with pytest.raises(SystemExit):
        batch_parser().parse_args(["--engine-driver", "fast"])


def test_auto_driver_is_the_loop_for_one_plain_cuda_process_only(monkeypatch):
    import charon.engines as engines
    from charon.cli import batch_parser
    from charon.server import ServerConfig

    assert ServerConfig().engine_driver == batch_parser().parse_args([]).engine_driver == "auto"
    for kw, want in (({"engine": "cuda"}, "loop"), ({"engine": "cpu"}, "thread"), ({"engine": "chroma"}, "thread"),
                     ({"engine": "cuda", "procs": 2}, "thread"),  # front ends share one engine process
                     ({"engine": "cuda", "engine_service": "ipc:///tmp/x"}, "thread"),  # one of those front ends
                     ({"engine": "cuda", "connect": "tcp://127.0.0.1:5556"}, "thread"),  # a router's worker
                     ({"engine": "cuda", "upstream": "ipc:///tmp/y"}, "thread"),  # a worker behind the proxy
                     ({"engine": "cuda", "engine_driver": "thread"}, "thread"),  # as given
                     ({"engine": "cpu", "engine_driver": "loop"}, "loop")):  # as given (validate() refuses it)
        assert ServerConfig(**kw).resolved_engine_driver() == want, kw
    for usable, want in ((True, "loop"), (False, "thread")):  # --engine auto: whatever it will find
        monkeypatch.setattr(engines, "cuda_usable", lambda u=usable: u)
        assert ServerConfig(engine="auto").resolved_engine_driver() == want
