import json
import os
import subprocess
import sys

import pytest

from charon.bench import main, parse_sizes, parse_think
from charon.geometry.builtin import sphere_detector
from charon.server import ServerConfig, run_in_thread

KEYS = {"events_per_s", "photons_per_s", "latency_ms", "engine_busy_fraction", "batch_photons", "host_us_per_event"}


def test_event_size_distributions():
    import numpy as np

    rng = np.random.default_rng(0)
    assert list(parse_sizes("1e3")(rng, 3)) == [1000, 1000, 1000]
    s = parse_sizes("lognormal:1000,0.5")(rng, 20000)
    assert s.min() >= 1 and abs(np.median(s) / 1000 - 1) < 0.05


def test_think_time_distributions_and_bad_specs():
    import numpy as np

    rng = np.random.default_rng(0)
    assert not parse_think("0")(rng, 4).any()
    assert list(parse_think("2.5")(rng, 2)) == [0.0025, 0.0025]
    pauses = parse_think("exp:10")(rng, 20000)
    # The sample mean of an exponential has standard error mean / sqrt(n): 0.7 % here; allow 4 of them.
    assert pauses.min() >= 0 and abs(pauses.mean() / 0.010 - 1) < 4 / np.sqrt(20000)
    for bad in ("abc", "exp:", "exp:x", "-1", "exp:-2"):
        with pytest.raises(ValueError, match="think-ms"):
            parse_think(bad)
    with pytest.raises(SystemExit):
        main(["--address", "tcp://127.0.0.1:1", "--think-ms", "soon"])


def test_load_loop_runs_without_garbage_collection_and_restores_it():
    import gc

    from charon.bench import _gc_paused

    assert gc.isenabled()
    with _gc_paused():
        assert not gc.isenabled() and gc.get_freeze_count() > 0
    assert gc.isenabled() and gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), _gc_paused():
        raise RuntimeError("the load loop failed")
    assert gc.isenabled() and gc.get_freeze_count() == 0


@pytest.mark.parametrize("driver", ["python", "compiled"])
def test_bench_clients_pause_between_events(tmp_path, driver):
    if driver == "compiled":
        from charon.load_pump import AVAILABLE

        if not AVAILABLE:
            pytest.skip("needs Linux and libzmq's C API")
    srv, th = run_in_thread(ServerConfig(bind="tcp://127.0.0.1:0", engine="cpu"),
                            detector=sphere_detector(500.0, subdivisions=1))  # fmt: skip
    try:
        common = ["--address", srv.address, "--clients", "2", "--event-size", "50", "--load-procs", "1",
                  "--no-progress", "--load-driver", driver]  # fmt: skip
        assert main(common + ["--events", "4"]) == 0  # the engine compiles on its first batch, not in the timed run
        out = tmp_path / "r.json"
        assert main(common + ["--events", "20", "--think-ms", "50", "--warmup", "0", "--json", str(out)]) == 0
        doc = json.loads(out.read_text())
        r = doc["batched"]
        assert r["events"] == 20 and r["failed"] == 0 and r["unanswered"] == 0
        # Each client sent 10 events, pausing 50 ms after each of its first 9 replies: 0.45 s at least
        # (without the pauses the warm server answers the 20 events in well under that).
        assert r["wall_s"] >= 9 * 0.050
        # Latency runs from a request to its reply: the pauses are not in it.
        assert r["latency_ms"]["p50"] < 50
        assert doc["meta"]["config"]["think_ms"] == "50" and doc["meta"]["config"]["load_driver"] == driver
    finally:
        srv.stop()
        th.join(10)


def test_bench_leaves_the_warm_up_out_of_the_measured_window(tmp_path):
    srv, th = run_in_thread(ServerConfig(bind="tcp://127.0.0.1:0", engine="cpu"),
                            detector=sphere_detector(500.0, subdivisions=1))  # fmt: skip
    try:
        common = ["--address", srv.address, "--clients", "2", "--event-size", "50", "--load-procs", "1",
                  "--no-progress"]  # fmt: skip
        # The engine compiles on its first batch: not in this run, whose first replies must come well within
        # its 1.6 s for the window to open (a full-suite run on CI's 2 cores once took longer, and failed).
        assert main(common + ["--events", "4"]) == 0
        out = tmp_path / "r.json"
        assert main(common + ["--events", "1000000", "--duration", "1.6", "--warmup", "0.5", "--json",
                              str(out)]) == 0  # fmt: skip
        r = json.loads(out.read_text())["batched"]
        whole = r["whole_run"]
        # The window opened once the first replies were 0.5 s old, and the run went on after it.
        assert 0.5 <= r["warmup_s"] < whole["wall_s"]
        assert r["wall_s"] == pytest.approx(whole["wall_s"] - r["warmup_s"])
        assert 0 < r["events"] < whole["events"]
        assert r["events_per_s"] == pytest.approx(r["events"] / r["wall_s"])
        assert r["photons_per_s"] == pytest.approx(50 * r["events_per_s"])
        assert len(r["latency_p99_ms_by_second"]) >= 2  # events were sent in the first and the second second
    finally:
        srv.stop()
        th.join(10)


def _start_gated_drive(address, start, cfg=None):
    """``_drive`` of a 2-client load process in a thread, behind the ``start`` barrier: (thread, outcome)."""
    import threading

    from charon.bench import BenchConfig, _drive

    cfg = cfg or BenchConfig(clients=2, events=2, event_size="10", duration=0.3, progress=False)
    outcome = {}

    def run():
        try:
            outcome["figures"] = _drive(cfg, address, 0, 2, 2, 1, start=start)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, outcome


def test_load_processes_send_nothing_until_every_one_is_ready():
    """The load processes start together: one connected early sends nothing while another is still getting
    ready (compiling, in a real run), and starts once the last one reaches the barrier."""
    import threading
    import time

    import zmq

    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    start = threading.Barrier(2)
    th, outcome = _start_gated_drive(f"tcp://127.0.0.1:{port}", start)
    try:
        assert router.poll(400) == 0  # connected, and waiting for the other process
        assert th.is_alive() and start.n_waiting == 1
        t_release = time.monotonic()
        start.wait(5)  # the last process is ready
        assert router.poll(5000) == zmq.POLLIN  # now the clients send
        th.join(10)
        fig = outcome["figures"]
        assert fig["t0"] >= t_release and fig["unanswered"] == 2  # unanswered: the router never replies
    finally:
        router.close(0)


def test_a_load_process_that_fails_before_the_start_releases_the_others():
    import threading

    start = threading.Barrier(3)
    waiting, w_out = _start_gated_drive("tcp://127.0.0.1:1", start)  # connects (nothing listens), then waits
    failing, f_out = _start_gated_drive("tcp://no-port-given", start)  # its connect fails
    failing.join(10)
    waiting.join(10)
    assert not waiting.is_alive() and not failing.is_alive()
    assert "no-port-given" in str(f_out["error"])  # its own error, as it was
    assert isinstance(w_out["error"], RuntimeError) and "another load process failed" in str(w_out["error"])
    assert start.broken


def test_bench_against_running_server_reports_every_figure(tmp_path):
    import socket
    import time

    import numpy as np

    with socket.socket() as p:
        p.bind(("127.0.0.1", 0))
        mport = p.getsockname()[1]
    srv, th = run_in_thread(ServerConfig(bind="tcp://127.0.0.1:0", engine="cpu", metrics_port=mport),
                            detector=sphere_detector(500.0, subdivisions=1))  # fmt: skip
    try:
        out = tmp_path / "r.json"
        rc = main(["--address", srv.address, "--metrics-url", f"http://127.0.0.1:{mport}/metrics", "--clients", "6",
                   "--client-mode", "dealer", "--in-flight", "3", "--events", "60", "--event-size", "200",
                   "--load-procs", "2", "--trace", str(tmp_path / "t.npz"),
                   "--warmup", "0", "--json", str(out), "--no-progress"])  # fmt: skip
        assert rc == 0
        r = json.loads(out.read_text())["batched"]
        assert "_trace" not in r
        # The server's threads over the window (Linux): its socket loop worked, and waits are times, not negative.
        if r["server_threads"][0]:
            main_thread = r["server_threads"][0]["MainThread"]
            assert main_thread["cpu_ms"] > 0 and main_thread["wait_ms"] >= 0
            assert r["server_wait_ms"] >= main_thread["wait_ms"]
        assert r["load_wait_ms"] >= 0 and (r["host_steal_ms"] is None or r["host_steal_ms"] >= 0)
        with np.load(tmp_path / "t.npz") as t:  # the same events as the figures, each with its load process
            assert sorted(t.files) == [f"batched_1_{f}" for f in ("photons", "proc", "rtt", "sent", "start_unix",
                                                                  "window")]
            assert np.bincount(t["batched_1_proc"]).tolist() == [30, 30] and (t["batched_1_photons"] == 200).all()
            assert float(t["batched_1_window"]) == 0 and t["batched_1_sent"].min() >= 0
            assert abs(float(t["batched_1_start_unix"]) - time.time()) < 600  # the wall clock's, for vmstat -t
            assert np.percentile(t["batched_1_rtt"], 99) * 1e3 == pytest.approx(r["latency_ms"]["p99"])
        assert KEYS <= set(r)
        assert r["events"] == 60 and r["failed"] == 0 and r["load_processes"] == 2
        starts = r["load_starts_s"]  # s after the first process began sending, one per process
        assert len(starts) == 2 and starts[0] == 0 and 0 <= starts[1] < r["whole_run"]["wall_s"]
        assert r["warmup_s"] == 0 and r["whole_run"]["events"] == 60  # --warmup 0: the window is the whole run
        assert r["whole_run"]["latency_ms"] == r["latency_ms"]
        by_second = r["latency_p99_ms_by_second"]
        assert by_second and all(v is None or v > 0 for v in by_second)
        assert r["photons_per_s"] == pytest.approx(200 * r["events_per_s"])
        assert 0 < r["engine_busy_fraction"] <= 1.0
        assert 0 < r["engine_compute_fraction"] <= r["engine_busy_fraction"]  # the kernels alone: less
        assert r["batch_photons"]["mean"] >= 200 and r["batch_photons"]["max"] >= r["batch_photons"]["mean"]
        assert r["latency_ms"]["p50"] <= r["latency_ms"]["p95"] <= r["latency_ms"]["p99"]
        # The server's share of the latency: positive, and within what the clients saw (it is part of it).
        assert 0 < r["server_latency_ms_mean"] <= r["latency_ms"]["p99"]
        # Tails over 3, 10 and 30 ms, the clients' and the server's own (from its histogram's buckets).
        for share in (r["latency_share_over_ms"], r["server_latency_share_over_ms"]):
            assert set(share) == {"3", "10", "30"} and 0 <= share["30"] <= share["10"] <= share["3"] <= 1
        assert r["server_latency_share_over_ms"]["30"] < 0.5  # the buckets were read (a missing one reads as 1)
        # Its percentiles from the same buckets: ordered, and none above the bucket bound over the clients' own
        # (every event's time in the server is part of its round trip; the estimate stays in its bucket).
        from charon.metrics import _EVENT_BUCKETS

        inside = r["server_latency_ms"]
        assert 0 < inside["p50"] <= inside["p95"] <= inside["p99"]
        for p in ("p50", "p99"):
            assert inside[p] <= 1e3 * min(b for b in _EVENT_BUCKETS if 1e3 * b >= r["latency_ms"][p])
        assert r["engine_residence_ms_mean"] is None  # one process: no shared engine
        assert r["engine_thread_busy_fraction"] is None
        assert r["events_by_endpoint"] == [60]  # one endpoint answered every event
        fe = r["front_end_busy_fraction"]  # its socket loop's work over the window: some, not more than all
        assert 0 < fe["mean"] == fe["max"] < 1.0
        # The generator's own CPU: positive, the main thread's share within it, and no more than its
        # two processes' threads (main and one ZeroMQ I/O thread each) could use.
        assert 0 < r["load_main_thread_us_per_event"] <= r["load_cpu_us_per_event"]
        assert 0 < r["load_cpu_cores"] <= 2 * 2
        assert r["handoff_shm_fraction"] is None  # one process: no hand-off to a shared engine
        assert r["front_end_batches_per_engine_call"] is None
        assert r["handoff_segments_mapped"] is None and r["handoff_pin_ms"] is None
        # Per batch: the oldest event's wait for dispatch and the engine round trip, both within
        # the server-side share (each batch's oldest event waited both).
        assert r["dispatch_wait_ms_mean"] >= 0 and r["engine_roundtrip_ms_mean"] > 0
    finally:
        srv.stop()
        th.join(10)


@pytest.mark.slow
def test_spawned_servers_compare_per_event_and_sweep(tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["--spawn-server", "--clients", "8", "--events", "80", "--event-size", "300", "--compare-per-event",
               "--sweep-batch", "600", "--rounds", "2", "--json", str(out), "--plot", str(png), "--no-progress",
               "--warmup", "0", "--", "--engine", "cpu", "--detector", "sphere"])  # fmt: skip
    assert rc == 0
    r = json.loads(out.read_text())
    assert KEYS <= set(r["batched"]) and KEYS <= set(r["per_event"])
    assert r["per_event"]["batch_photons"]["max"] == 300  # one event per engine call
    assert r["batched@600"]["batch_photons"]["max"] <= 600
    assert len(r["sweep"]) == 1 and png.stat().st_size > 10_000
    # --rounds 2: every mode twice; each reports its slower run (the lower median of two), a run it made.
    assert {m: len(runs) for m, runs in r["rounds"].items()} == {"batched": 2, "batched@600": 2, "per_event": 2}
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731 (NaN != NaN)
    for mode, runs in r["rounds"].items():
        assert same(r[mode], min(runs, key=lambda x: x["events_per_s"]))
    assert len(r["sweep"]) == 1 and same(r["sweep"][0], r["batched@600"])
    servers = [run["server"] for runs in r["rounds"].values() for run in runs]
    assert len(set(servers)) == 6  # a fresh server for every run
    by_round = [b["events_per_s"] / p["events_per_s"] for b, p in zip(r["rounds"]["batched"], r["rounds"]["per_event"])]
    assert r["speedup"]["by_round"] == pytest.approx(by_round)
    assert r["speedup"]["of_medians"] == pytest.approx(r["batched"]["events_per_s"] / r["per_event"]["events_per_s"])
    for mode in ("batched", "per_event", "batched@600"):  # default --max-wait-ms 1 plus two batch times
        m = r[mode]
        assert m["p99_bound_ms"] == pytest.approx(1.0 + 2e3 * m["batch_seconds_mean"])
        assert m["p99_within_bound"] == (m["latency_ms"]["p99"] < m["p99_bound_ms"])


def test_front_end_busy_counts_only_the_endpoints_that_answered_events():
    from charon.bench import front_end_busy

    before = [{"charon_host_seconds_total": 1.0},  # front end 0
              {"charon_host_seconds_total": 0.0},  # front end 1
              {"charon_host_seconds_total": 5.0}]  # a shared engine: its work, no events  # fmt: skip
    after = [{"charon_host_seconds_total": 3.0}, {"charon_host_seconds_total": 4.0},
             {"charon_host_seconds_total": 9.0}]  # fmt: skip
    events = [40.0, 70.0, 0.0]
    assert front_end_busy(before, after, events, 4.0) == {"mean": 0.75, "max": 1.0}  # 2/4 and 4/4; engine left out
    assert front_end_busy(before[2:], after[2:], events[2:], 4.0) is None


def test_engine_busy_is_per_engine_over_the_endpoints_that_ran_batches():
    from charon.bench import engine_busy

    def m(batches, seconds, compute):
        return {"charon_batches_total": batches, "charon_engine_seconds_total": seconds,
                "charon_engine_compute_seconds_total": compute}  # fmt: skip

    # Two GPUs' engines (busy 3 and 1 s of a 4 s window; kernels 2 and 0.4 s of it) and a front end behind one
    # of them (no batches).
    before = [m(10, 1.0, 0.5), m(0, 0.0, 0.0), m(5, 2.0, 1.0)]
    after = [m(30, 4.0, 2.5), m(0, 0.0, 0.0), m(9, 3.0, 1.4)]
    got = engine_busy(before, after, 4.0)
    assert got.pop("engine_compute_fraction") == pytest.approx(0.3)  # (2 / 4 + 0.4 / 4) / 2
    assert got == {"engine_busy_fraction": 0.5, "engine_busy_by_engine": [0.75, 0.25], "engines": 2}
    assert engine_busy(before[1:2], after[1:2], 4.0)["engines"] == 0


def test_p99_bound_reads_the_servers_max_wait():
    from charon.bench import with_p99_bound

    r = with_p99_bound({"batch_seconds_mean": 0.002, "latency_ms": {"p99": 7.5}}, ["--max-wait-ms", "4"])
    assert r["p99_bound_ms"] == pytest.approx(8.0) and r["p99_within_bound"] is True
    r = with_p99_bound({"batch_seconds_mean": 0.002, "latency_ms": {"p99": 7.5}}, ["--engine", "cpu"])
    assert r["p99_bound_ms"] == pytest.approx(5.0) and r["p99_within_bound"] is False
    assert "p99_bound_ms" not in with_p99_bound({"latency_ms": {"p99": 1.0}}, [])  # no server figures


def test_metrics_endpoints_read_the_flags_as_charon_batch_does():
    from charon.bench import metrics_endpoints

    assert metrics_endpoints(["--engine", "cpu"]) == 1
    assert metrics_endpoints(["--procs", "1"]) == 1
    assert metrics_endpoints(["--procs", "7"]) == 8  # seven front ends, then the shared engine
    assert metrics_endpoints(["--procs", "7", "--procs", "8"]) == 9  # a repeated flag: the last counts
    assert metrics_endpoints(["--procs=3"]) == 4
    assert metrics_endpoints(["--gpus", "0,1,2"]) == 3
    assert metrics_endpoints(["--gpus", "0,1", "--procs", "4"]) == 10  # per GPU: four front ends and its engine
    assert metrics_endpoints(["--gpus", "0,1", "--gpus-share", "port", "--procs", "4"]) == 10  # the same ports


def test_metrics_ports_add_the_local_routers_after_the_servers():
    from charon.bench import metrics_ports
    from charon.cli import batch_parser, router_metrics_port, worker_metrics_port

    assert metrics_ports(["--procs", "7"]) == 8  # no router
    assert metrics_ports(["--gpus", "0,1", "--gpus-share", "port", "--procs", "4"]) == 10  # no router either
    assert metrics_ports(["--gpus", "0,1", "--procs", "4"]) == 11  # the one local router after both GPUs' ten
    assert metrics_ports(["--gpus", "0,1", "--procs", "4", "--gpus-routers", "4"]) == 14
    config = batch_parser().parse_args(["--gpus", "0,1", "--procs", "4", "--metrics-port", "9000"])
    assert [worker_metrics_port(config, i) for i in (0, 1)] == [9000, 9005] and router_metrics_port(config) == 9010


@pytest.mark.slow
def test_kept_servers_serve_every_round_of_their_mode(tmp_path):
    """--keep-servers: one server per mode for all the rounds, each run's figures still its own window's."""
    out = tmp_path / "r.json"
    rc = main(["--spawn-server", "--keep-servers", "--clients", "8", "--events", "60", "--event-size", "300",
               "--compare-per-event", "--rounds", "2", "--json", str(out), "--no-progress", "--warmup", "0", "--",
               "--engine", "cpu", "--detector", "sphere"])  # fmt: skip
    assert rc == 0
    r = json.loads(out.read_text())
    assert {m: len({run["server"] for run in runs}) for m, runs in r["rounds"].items()} == {"batched": 1,
                                                                                            "per_event": 1}
    assert r["rounds"]["batched"][0]["server"] != r["rounds"]["per_event"][0]["server"]
    for mode, runs in r["rounds"].items():
        for run in runs:  # the second round counts only its own events and batches, not the first's too
            assert 0 < run["batches"] <= 60 and sum(run["events_by_endpoint"]) <= 60, (mode, run["batches"])
    assert all(run["batches"] == sum(run["events_by_endpoint"]) for run in r["rounds"]["per_event"])
    assert r["per_event"]["batch_photons"]["max"] == 300


def test_bench_refuses_compare_without_spawn():
    with pytest.raises(SystemExit):
        main(["--address", "tcp://127.0.0.1:1", "--compare-per-event"])


@pytest.mark.parametrize("args, says", [(["--address", "tcp://127.0.0.1:1", "--rounds", "2"], "add --spawn-server"),
                                        (["--spawn-server", "--rounds", "0"], "--rounds must be at least 1"),
                                        (["--address", "tcp://127.0.0.1:1", "--keep-servers"], "add --spawn-server")])
def test_bench_refuses_rounds_it_cannot_run(args, says, capsys):
    with pytest.raises(SystemExit):
        main(args)
    assert says in capsys.readouterr().err


def test_median_run_and_speed_up_by_round():
    from charon.bench import median_run, speedup

    runs = [{"events_per_s": v, "k": k} for k, v in enumerate((50.0, 40.0, 60.0))]
    assert median_run(runs)["k"] == 0 and median_run(runs[:2])["k"] == 1  # odd: the middle; even: the lower
    per_event = [{"events_per_s": v} for v in (1.0, 2.0, 1.5)]
    got = speedup({"batched": runs, "per_event": per_event})
    assert got["by_round"] == [50.0, 20.0, 40.0] and got["of_medians"] == 50.0 / 1.5
    assert speedup({"batched": runs}) is None  # no per-event run yet


def test_bench_fails_fast_without_a_server():
    assert main(["--address", "tcp://127.0.0.1:9", "--events", "1", "--no-progress"]) == 2


def test_free_port_range_gives_consecutive_free_ports():
    import socket

    from charon.ports import free_port_range

    from charon.ports import _ephemeral_ports

    base = free_port_range(6)
    for i in range(6):  # each is bindable (the --procs front ends' and engine's metrics ports)
        with socket.socket() as s:
            s.bind(("0.0.0.0", base + i))
    lo, hi = _ephemeral_ports()
    assert base + 5 < lo or base > hi  # outside the ports the kernel gives outgoing connections


def test_results_table_shows_the_latency_split_only_where_the_server_reported_it():
    from charon.bench import results_table

    row = {"events_per_s": 1000.0, "photons_per_s": 1e6, "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0},
           "engine_busy_fraction": 0.5, "engine_compute_fraction": 0.375, "batch_photons": {"mean": 5000.0},
           "host_us_per_event": 40.0}  # fmt: skip
    plain = results_table({"batched": row}).splitlines()
    assert len(plain) == 2 and "trip" not in plain[0]
    busiest = results_table({"batched": row | {"front_end_busy_fraction": {"mean": 0.5, "max": 0.93}}}).splitlines()
    assert "kern" in busiest[0] and "fe busy" in busiest[0]
    assert busiest[1].split()[6:9] == ["0.50", "0.38", "0.93"]  # the engine's busy, its kernels', the front ends'
    split = results_table({"a_1": row | {"dispatch_wait_ms_mean": 1.25, "engine_roundtrip_ms_mean": 3.5,
                                         "engine_residence_ms_mean": None,
                                         "server_latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 2.75}}}).splitlines()
    assert split[0].split()[-5:] == ["wait", "trip", "resid", "srv", "p99"]
    assert split[1].split()[0] == "a_1" and split[1].split()[-4:] == ["1.25", "3.50", "0.00", "2.75"]


def test_cpu_lists_parse_and_name_what_is_wrong():
    from charon.cpus import parse_cpus

    mine = sorted(os.sched_getaffinity(0))
    assert parse_cpus(None) is None and parse_cpus("") is None
    assert parse_cpus(f"{mine[0]}") == {mine[0]}
    assert parse_cpus(f"{mine[0]}-{mine[0]}") == {mine[0]}
    if len(mine) > 1:
        assert parse_cpus(f"{mine[0]},{mine[1]}") == {mine[0], mine[1]}
        if mine[1] == mine[0] + 1:
            assert parse_cpus(f"{mine[0]}-{mine[1]}") == {mine[0], mine[1]}
    assert parse_cpus(f"{mine[0]},{mine[0]}") == {mine[0]}
    for bad, words in (("a-3", "not N or N-M"), ("3-1", "increasing"), ("0,,1", "not N or N-M"),
                       (f"{mine[-1] + 4096}", "may not use")):
        with pytest.raises(ValueError, match=words):
            parse_cpus(bad)


def test_popen_pinned_runs_the_child_on_the_cpus_and_leaves_the_parent_as_it_was():
    from charon.bench import popen_pinned

    show = [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]
    before = os.sched_getaffinity(0)
    one = {max(before)}
    out, _ = popen_pinned(show, one, stdout=subprocess.PIPE, text=True).communicate(timeout=30)
    assert out.strip() == str(sorted(one))
    assert os.sched_getaffinity(0) == before  # the parent is back on its own CPUs
    out, _ = popen_pinned(show, None, stdout=subprocess.PIPE, text=True).communicate(timeout=30)
    assert out.strip() == str(sorted(before))


def test_bench_pins_its_load_processes(tmp_path):
    srv, thread = run_in_thread(ServerConfig(bind="tcp://127.0.0.1:0", engine="cpu", metrics_port=None),
                                detector=sphere_detector(500.0, subdivisions=1))  # fmt: skip
    try:
        one = min(os.sched_getaffinity(0))
        out = tmp_path / "r.json"
        rc = main(["--address", srv.address, "--clients", "2", "--events", "6", "--event-size", "50",
                   "--load-cpus", str(one), "--no-progress", "--json", str(out)])  # fmt: skip
        assert rc == 0
        assert json.loads(out.read_text())["batched"]["load_cpus"] == [one]
    finally:
        srv.stop()
        thread.join(10)


def test_bench_lowers_its_load_processes_priority(tmp_path):
    srv, thread = run_in_thread(ServerConfig(bind="tcp://127.0.0.1:0", engine="cpu", metrics_port=None),
                                detector=sphere_detector(500.0, subdivisions=1))  # fmt: skip
    try:
        out = tmp_path / "r.json"
        rc = main(["--address", srv.address, "--clients", "2", "--events", "6", "--event-size", "50",
                   "--load-nice", "5", "--no-progress", "--json", str(out)])  # fmt: skip
        assert rc == 0
        res = json.loads(out.read_text())["batched"]
        assert res["load_nice"] == os.nice(0) + 5  # the load ran at the lower priority; this process did not
        assert res["events"] == 6 and res["failed"] == 0
    finally:
        srv.stop()
        thread.join(10)
    with pytest.raises(SystemExit):  # niceness beyond what the load may be given
        main(["--address", srv.address, "--load-nice", "25"])


def test_bench_refuses_server_cpus_without_spawn():
    with pytest.raises(SystemExit):
        main(["--address", "tcp://127.0.0.1:1", "--server-cpus", "0"])


def _benchmark_module(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pyspy_shares_counts_only_stacks_through_the_root(tmp_path):
    mod = _benchmark_module("pyspy_shares")
    raw = tmp_path / "spy.txt"
    raw.write_text(
        'process 1:"python3 -m charon.cli";thread (0x1);main (cli.py:3);loop (s.py:10);recv (k.py:5) 6\n'
        'process 1:"python3 -m charon.cli";thread (0x1);main (cli.py:3);loop (s.py:11);decode (p.py:7) 3\n'
        'process 1:"python3 -m charon.cli";thread (0x1);main (cli.py:3);loop (s.py:12) 1\n'
        'process 2:"python3 other";thread (0x2);main (o.py:1);work (o.py:2) 90\n'
    )
    total, own, incl, by_line = mod.shares(str(raw), "loop")
    assert total == 10  # the other process's 90 samples do not pass through loop
    assert own == {"recv (k.py)": 6, "decode (p.py)": 3, "loop (s.py)": 1}
    assert incl["loop (s.py)"] == 10 and "main (cli.py)" not in incl
    assert by_line["recv (k.py:5)"] == 6


def test_soak_fits_memory_against_events_after_the_settling_part_and_names_the_process_that_grew():
    growth = _benchmark_module("soak").growth

    def sample(t, events, a, b):
        return {"t": t, "events": events, "rss_mb": a + b, "rss_anon_mb": 120.0, "fds": 9, "threads": 4,
                "shm_mb": 1.0, "rss_mb_by_pid": {"11": a, "12": b}}  # fmt: skip

    # Process 12 grows by 2 MB per million events after a first sample that jumps (buffers reaching size):
    # the jump is in the settling part and left out of the fit. Its heap stays flat: the growth is in
    # pages of its shared-memory buffers, which the fit of the anonymous part tells apart.
    samples = [sample(0, 0, 100.0, 50.0)] + [sample(10 * k, k * 1e6, 100.0, 80.0 + 2.0 * k) for k in range(1, 11)]
    g = growth(samples, settle=0.15)
    assert g["mb_per_million_events"] == pytest.approx(2.0)
    assert g["anon_mb_per_million_events"] == pytest.approx(0.0, abs=1e-9)
    assert g["samples"] == 9 and g["events"] == 8e6
    assert g["rss_growth_mb_by_pid"] == {"11": 0.0, "12": 16.0}
    flat = [sample(10 * k, k * 1e6, 100.0, 80.0) for k in range(6)]
    assert growth(flat, settle=0.2)["mb_per_million_events"] == pytest.approx(0.0, abs=1e-9)
    assert growth(flat[:2], settle=0.2)["mb_per_million_events"] is None  # too few samples to fit
    assert g["malloc_in_use_mb_per_million_events"] is None  # no sample has the C heap's account
    # With it: memory in use flat, the allocator's free memory growing by 1.5 MB per million events
    # (fragmentation), each fitted on its own.
    for s in samples:
        s["malloc_in_use_mb"], s["malloc_free_mb"] = 60.0, 3.0 + 1.5 * s["events"] / 1e6
    g = growth(samples, settle=0.15)
    assert g["malloc_in_use_mb_per_million_events"] == pytest.approx(0.0, abs=1e-9)
    assert g["malloc_free_mb_per_million_events"] == pytest.approx(1.5)


@pytest.mark.parametrize("mode,size", [("req", "200"), ("dealer", "lognormal:200,0.5")])
def test_compiled_load_driver_answers_as_the_python_loop(tmp_path, mode, size):
    """--load-driver compiled against a real server: every event answered and counted, photons per event
    the sizes drawn (log-normal too), and the same figures as the Python loop's on the same load."""
    import numpy as np

    from charon.load_pump import AVAILABLE

    if not AVAILABLE:
        pytest.skip("needs Linux and libzmq's C API")
    srv, th = run_in_thread(ServerConfig(bind="tcp://127.0.0.1:0", engine="cpu"),
                            detector=sphere_detector(500.0, subdivisions=1))  # fmt: skip
    try:
        out = {}
        for driver in ("compiled", "python"):
            path = tmp_path / f"{driver}.json"
            rc = main(["--address", srv.address, "--clients", "5", "--client-mode", mode, "--in-flight", "3",
                       "--events", "50", "--event-size", size, "--load-procs", "2", "--warmup", "0",
                       "--load-driver", driver, "--json", str(path), "--no-progress"])  # fmt: skip
            assert rc == 0
            out[driver] = json.loads(path.read_text())["batched"]
        c, p = out["compiled"], out["python"]
        assert c["events"] == p["events"] == 50 and c["failed"] == p["failed"] == 0
        assert c["unanswered"] == 0 and c["load_processes"] == 2
        # The same seeds draw the same sizes in each load process: the same photons went out.
        assert c["photons_per_s"] * c["wall_s"] == pytest.approx(p["photons_per_s"] * p["wall_s"])
        if size == "200":
            assert c["photons_per_s"] == pytest.approx(200 * c["events_per_s"])
        assert 0 < c["latency_ms"]["p50"] <= c["latency_ms"]["p99"] < 10_000
        assert 0 < c["load_main_thread_us_per_event"] <= c["load_cpu_us_per_event"]
        assert np.isfinite(c["load_cpu_cores"])
    finally:
        srv.stop()
        th.join(10)


def test_compiled_load_driver_counts_refused_events_as_failed(tmp_path):
    from charon.load_pump import AVAILABLE

    if not AVAILABLE:
        pytest.skip("needs Linux and libzmq's C API")
    srv, th = run_in_thread(ServerConfig(bind="tcp://127.0.0.1:0", engine="cpu", max_event_photons=150),
                            detector=sphere_detector(500.0, subdivisions=1))  # fmt: skip
    try:
        path = tmp_path / "r.json"
        rc = main(["--address", srv.address, "--clients", "3", "--client-mode", "dealer", "--events", "12",
                   "--event-size", "200", "--load-procs", "1", "--warmup", "0", "--load-driver", "compiled",
                   "--json", str(path), "--no-progress"])  # fmt: skip
        assert rc == 0
        r = json.loads(path.read_text())["batched"]
        assert r["events"] == 0 and r["failed"] == 12 and r["unanswered"] == 0  # SIM_FAILED: over the limit
    finally:
        srv.stop()
        th.join(10)



def test_latency_shares_are_read_at_bucket_bounds_of_the_servers_histogram():
    """A threshold that is not one of charon_event_seconds' bucket bounds would read as no events under it
    (a share of 1) rather than fail: each must be a bound, and its label the one prometheus-client writes."""
    from prometheus_client import generate_latest

    from charon.bench import SHARE_OVER_MS
    from charon.metrics import _EVENT_BUCKETS, BusyClock, Metrics

    m = Metrics(BusyClock())
    m.event_seconds.observe(0.002)
    text = generate_latest(m.registry).decode()  # the histogram charon-bench reads
    for ms in SHARE_OVER_MS:
        assert float(ms) / 1e3 in _EVENT_BUCKETS
        assert f'charon_event_seconds_bucket{{le="{float(ms) / 1e3}"}} 1.0' in text


def test_histogram_quantile_reads_buckets_as_promql_does():
    """Checked against hand-worked values and against numpy's percentile of the observations binned."""
    import numpy as np

    from charon.bench import histogram_quantile, server_latency_ms
    from charon.metrics import _EVENT_BUCKETS

    inf = float("inf")
    # 100 events in (1, 2] ms, 100 in (2, 4]: the median sits at the 2 ms bound, p75 half-way into (2, 4].
    bounds, cum = [0.001, 0.002, 0.004, inf], [0, 100, 200, 200]
    assert histogram_quantile(bounds, cum, 0.5) == pytest.approx(0.002)
    assert histogram_quantile(bounds, cum, 0.75) == pytest.approx(0.003)
    assert histogram_quantile(bounds, cum, 0.25) == pytest.approx(0.0015)
    assert histogram_quantile([0.001, inf], [10, 10], 0.5) == pytest.approx(0.0005)  # the first bucket from 0
    assert histogram_quantile([0.001, inf], [0, 10], 0.5) == 0.001  # in +Inf: the largest finite bound
    assert histogram_quantile([0.001, inf], [0, 0], 0.5) is None
    # Observations from a known distribution: each estimate lies in the bucket of the true percentile.
    rng = np.random.default_rng(5)
    x = rng.lognormal(np.log(2e-3), 0.4, 20000)
    bounds = [*_EVENT_BUCKETS, inf]
    cum = [float((x <= b).sum()) for b in bounds]
    for q in (0.5, 0.95, 0.99):
        true = np.quantile(x, q)
        i = int(np.searchsorted(bounds, true))
        lo = 0.0 if i == 0 else bounds[i - 1]
        assert lo <= histogram_quantile(bounds, cum, q) <= bounds[i]
    # The window's counts: the scrape after minus the one before, keyed as scrape_each keeps them.
    key = "charon_event_seconds_bucket:"
    before = {f"{key}0.001": 5.0, f"{key}0.002": 5.0, f"{key}+Inf": 5.0}
    after = {f"{key}0.001": 5.0, f"{key}0.002": 105.0, f"{key}+Inf": 105.0}
    assert server_latency_ms(before, after)["p50"] == pytest.approx(1.5)


def test_thread_times_over_a_window_leave_out_threads_that_ended():
    from charon.bench import thread_times

    cpu, wait = "process_thread_cpu_seconds_total:", "process_thread_wait_seconds_total:"
    before = {cpu + "MainThread": 1.0, wait + "MainThread": 0.5, cpu + "ZMQbg/IO/0": 2.0, wait + "ZMQbg/IO/0": 0.1,
              cpu + "Thread-3": 9.0, wait + "Thread-3": 1.0, "charon_events_total": 5.0}  # fmt: skip
    after = {cpu + "MainThread": 1.25, wait + "MainThread": 0.5, cpu + "ZMQbg/IO/0": 2.5, wait + "ZMQbg/IO/0": 0.125,
             cpu + "Thread-3": 0.5, wait + "Thread-3": 0.0, "charon_events_total": 9.0}  # fmt: skip
    got = thread_times(before, after)
    assert got == {"MainThread": {"cpu_ms": 250.0, "wait_ms": 0.0},
                   "ZMQbg/IO/0": {"cpu_ms": 500.0, "wait_ms": pytest.approx(25.0)}}


def test_host_steal_reads_the_cpu_line_of_proc_stat():
    from charon.bench import host_steal_s

    got = host_steal_s()
    if not os.path.exists("/proc/stat"):
        assert got is None
    else:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
        assert got == pytest.approx(int(fields[8]) / os.sysconf("SC_CLK_TCK"), abs=0.5)


def test_hiccup_meter_records_a_stop_it_did_not_wait_for(tmp_path):
    """A process stopped for 150 ms did not run and did not wait for a CPU either (it was not runnable): the
    meter sees a gap of that length with no guest wait, as it would for a CPU its hypervisor took away."""
    import signal
    import time
    from pathlib import Path

    import numpy as np

    script = Path(__file__).parent.parent / "benchmarks" / "hiccups.py"
    cpu = min(os.sched_getaffinity(0))
    out = tmp_path / "h.json"
    p = subprocess.Popen([sys.executable, str(script), "--cpus", str(cpu), "--seconds", "1.5", "--json", str(out)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, text=True)  # fmt: skip
    try:
        assert "watching 1 CPUs" in p.stderr.readline()  # the meter spins from here
        time.sleep(0.2)
        t_stop = time.time()
        os.killpg(p.pid, signal.SIGSTOP)
        time.sleep(0.15)
        os.killpg(p.pid, signal.SIGCONT)
        assert p.wait(60) == 0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        p.stderr.close()
    doc = json.loads(out.read_text())
    (c,) = doc["per_cpu"]
    gaps = np.array(c["gap_s"])
    k = int(gaps.argmax())
    assert 0.14 < gaps[k] < 1.0 and abs(c["gap_start_unix"][k] - t_stop) < 0.1
    assert c["wait_s"] < 0.05  # stopped is not waiting for a CPU
    s = doc["summary"]
    assert s["cpus"] == 1 and s["gap_ms_max"] == pytest.approx(1e3 * gaps[k]) and 0 < s["gap_share"] < 0.5
