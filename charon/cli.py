"""Command-line entry points. Flags are generated from the component config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys

from .server import DISPATCH_RULES, ENGINE_DRIVERS, GPUS_SHARE, INTAKES, BatchServer, ServerConfig, default_log_config

OUTPUT_IDLE_HELP = (
    "with --output-dir: close a run whose client has sent nothing for this long and has no event in flight, as "
    "if RUN_END had come, so that a client that died mid-run leaves a finished, readable file and frees its name; "
    "the client's later PHOTONDATA in that run is refused with the reason, and its RUN_END is acknowledged if "
    "nothing was refused (0: never)")

HELP = {
    "bind": "ZeroMQ address to listen on (ROUTER); port 0 picks a free port",
    "detector": "built-in detector name (demo, large, sphere), a charon .npz detector file, or an STL/mesh file",
    "engine": "propagation engine: auto (CUDA when a GPU is usable, else CPU), cpu, cuda or chroma",
    "seed": "run seed; every photon's random stream is a function of (seed, event id, photon index)",
    "max_batch_photons": "photons per engine call (accepts 5e6); larger events are split across batches",
    "max_batch_events": "events per engine call at most (0: no limit; 1 serves one event per call, as ChAR0N)",
    "max_wait_ms": "with --dispatch wait, longest the oldest queued event waits for a batch to fill while the "
    "engine is idle; with --procs, also how long a front end whose earlier batch is still in the shared engine "
    "gathers the next one. While the engine is busy, events accumulate for the next batch anyway (continuous "
    "batching), so a short wait suffices. Fractions are honoured (e.g. 0.5): the socket loop sleeps in the "
    "kernel for exactly the time left",
    "dispatch": "when a batch that is not full goes to the engine: idle (at once whenever the engine has no "
    "batch of this process, so an event on a quiet server does not wait for company; under load batches still "
    "grow while the engine runs; with --procs, each front end judges by its own batches in the shared engine) "
    "or wait (once its oldest event has waited --max-wait-ms: fewer, larger engine calls at low load, each "
    "event later by that wait)",
    "max_queued_photons": "backpressure: photons allowed to wait; beyond it requests get a 'busy' SIM_FAILED",
    "max_event_photons": "largest event accepted; larger requests get SIM_FAILED",
    "max_steps": "propagation steps per photon before it is abandoned (Chroma's max_steps)",
    "engine_lanes": "CUDA engine: batches on the GPU at once, each with its own device buffers and stream. Behind "
    "--procs, the shared engine starts the next batch while the running one finishes, once it is as large; on H100 "
    "hosts --engine-lanes 2 --max-batch-photons 7e4 kept the GPU busy 0.9-0.96 of the time and served the most "
    "1000-photon events, while at large caps 2 lanes did not beat 1. In one process, an event that arrives while "
    "a batch runs starts beside it on a free lane (when the queue is as large as the latest batch): 2 lanes cut "
    "the tail at light load (H100, ~260 events/s: p99 4.7-5.0 to 3.3-3.5 ms) and cost a saturated process 0-11 %% "
    "of its events/s, by host; 3 measured worse than 2 (benchmarks/RESULTS.md)",
    "engine_driver": "what runs the engine's batches in one process: thread (an engine thread, which wakes the "
    "socket loop with each batch's results), loop (the socket loop itself, through the CUDA engine's "
    "asynchronous calls: no hand-off between threads, and once a batch is nearly due the loop turns without "
    "sleeping, spending a CPU core while the GPU finishes it; on six H100 hosts at ~250 events/s the clients' "
    "p50 was 0.2-0.5 ms lower, and a saturated process served 10-42 %% more events, benchmarks/RESULTS.md; "
    "--engine cuda, without --procs) or auto (loop for the CUDA engine of one process that is not a router's "
    "worker, thread otherwise)",
    "ping_reply": "reply to PING: PONG (ratpac-two, seed text) or ACK (ChAR0N client branch)",
    "reply_layout": "auto (13-frame request -> compact, 14-frame -> full), compact or full",
    "queue_policy": "queue policy for choosing the next events to batch",
    "metrics_port": "serve Prometheus metrics over HTTP on this port (off when not given)",
    "output_dir": "directory for server-side run output: PHOTONDATA between RUN_BEGIN and RUN_END is "
    "answered SIM_COMPLETE_ASYNC and its hits go to DIR/<name>.charon.ntuple.root (off when not given)",
    "output_basket_events": "events per ROOT basket written with --output-dir",
    "output_idle_seconds": OUTPUT_IDLE_HELP,
    "log_level": "logging level (DEBUG, INFO, WARNING, ERROR)",
    "device": "CUDA device ordinal for --engine cuda",
    "connect": "worker mode: connect to a charon-router backend (e.g. tcp://router-host:6667) instead of binding; "
    "for charon-router --procs R, its R backends, comma-separated, with --procs N >= R here (front end k is a "
    "worker of router k mod R)",
    "heartbeat_interval": "worker mode: seconds between heartbeats with the router",
    "heartbeat_liveness": "worker mode: heartbeats missed before the router is presumed dead (then reconnect)",
    "drain_seconds": "on SIGTERM or Ctrl-C, read no more requests but answer those already received, for at most "
    "this long, before exiting (a second signal exits at once); 0: exit at once, leaving them to the clients' "
    "retries",
    "gpus": "comma-separated GPU ordinals: start one worker process per GPU behind a local router on --bind "
    "(with --procs N: N front-end processes per GPU, sharing that GPU's engine)",
    "gpus_routers": "with --gpus (--gpus-share router): R local routers sharing --bind (charon-router --procs R, "
    "SO_REUSEPORT), for more events/s than one router's Python loop passes on (~10-12k of 1000 photons; four "
    "routers served 33k on an H200 x2 host); needs --procs N >= R, since each GPU's front end k is a worker of "
    "router k mod R",
    "gpus_share": "with --gpus, how the GPUs share --bind: router (a local charon-router hands each event to a GPU "
    "worker and re-sends the events of a worker that dies; its one Python loop serves ~10-12k events/s, so it "
    "limits a host for small events; --gpus-routers R runs R of them) or port (each GPU gets its own server, "
    "with --procs N front ends, and all of them listen on the --bind port with SO_REUSEPORT, the kernel "
    "spreading client connections over them: no extra hop; a process that dies loses its in-flight events to "
    "the clients' retries, as --procs does)",
    "procs": "front-end processes sharing --bind, so that the per-event Python work (decode, batching, "
    "replies) runs in parallel; their batches are merged into one engine in the launcher (one CUDA context, "
    "large batches). With --connect: N workers of the router sharing one engine here. 1: a single process",
    "accept": "with --procs, how the front ends share --bind: reuseport (each listens on the same TCP port "
    "with SO_REUSEPORT and the kernel spreads client connections; no extra hop), proxy (a C-level zmq.proxy "
    "in the launcher forwards every message; any transport), auto (reuseport for tcp:// on Linux, else proxy)",
    "io_threads": "ZeroMQ I/O threads: of the proxy with --accept proxy, which carries every client message "
    "twice (0: one per front end plus one, at most 8); with --gpus, of the local router and of each worker; "
    "of each process otherwise (0: one)",
    "engine_io_threads": "with --procs: ZeroMQ I/O threads of the shared engine, which receives every photon "
    "from the front ends (0: one per front end, at most 8)",
    "engine_cpus": "with --procs: CPUs (Linux list, e.g. 0 or 0-1) for the shared engine's thread alone; the "
    "front ends and every other thread of the server run on the remaining CPUs. The thread that launches "
    "batches and collects results then never waits for a core behind the front ends. With --gpus 0,1 "
    "--gpus-share port, the list is cut in ascending order into equal shares, one per GPU's engine thread "
    "(e.g. 0,16: GPU 0's on CPU 0, GPU 1's on CPU 16), and every front end keeps off all of them (off when not "
    "given)",
    "handoff": "with --procs, how front ends hand photons to the shared engine: shm (each front end assembles "
    "its batches in shared memory that the engine maps and, on a GPU, pins and copies to the device from; "
    "the socket carries only per-event arrays), socket (every photon through the internal socket), "
    "auto (shm where /dev/shm is usable, else socket)",
    "parent": "internal: the launcher that started this process; it stops when the launcher ends (Linux), and "
    "with --procs its front ends join the port that launcher reserved (--gpus-share port)",
    "engine_cpus_all": "internal (--gpus-share port with --engine-cpus): every GPU's engine CPUs, which this GPU's "
    "front ends keep off",
    "upstream": "internal: the proxy backend a --procs front end connects to",
    "engine_service": "internal: the shared engine a --procs front end sends its batches to",
    "intake": "how requests are taken off the client socket: python (pyzmq frames, the Python decoder) or "
    "compiled (one numba pass per request through libzmq's C API, into a preallocated arena; same checks and "
    "error replies; a --connect worker reads the router's messages in Python either way)",
}
CHOICES = {
    "engine": ("auto", "cpu", "cuda", "chroma"),
    "ping_reply": ("PONG", "ACK"),
    "reply_layout": ("auto", "compact", "full"),
    "queue_policy": ("fcfs",),
    "dispatch": DISPATCH_RULES,
    "gpus_share": GPUS_SHARE,
    "accept": ("auto", "reuseport", "proxy"),
    "handoff": ("auto", "shm", "socket"),
    "intake": INTAKES,
    "engine_driver": ENGINE_DRIVERS,
}


def count(text: str) -> int:
    """An integer count that may be written in float notation: 5e6, 1e4."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(value)


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, help_text: dict, choices: dict | None = None):
    choices = choices or {}
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        # A field whose default is None takes its type from the annotation ("int | None").
        kind = type(default) if default is not None else {"int": int, "float": float}.get(str(f.type).split()[0], str)
        typ = {int: count, float: float, str: str}[kind]
        parser.add_argument(flag, dest=f.name, type=typ, default=default, choices=choices.get(f.name),
                            help=f"{help_text.get(f.name, '')} (default: {default})")  # fmt: skip


def config_from_args(cls, args):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def args_from_config(config) -> list[str]:
    """The inverse of :func:`config_from_args`: the flags of ``config``'s fields that differ from their defaults."""
    out = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is not None and value != f.default:
            out += ["--" + f.name.replace("_", "-"), str(value)]
    return out


def batch_parser() -> argparse.ArgumentParser:
    # No abbreviated flags: the launchers (--procs, --gpus) pass argv on to their children and drop or replace
    # flags by their full names, which an abbreviation (--output-d) would slip past.
    p = argparse.ArgumentParser(
        prog="charon-batch",
        description="Batching optical-photon server, wire-compatible with ChAR0N clients (ratpac-two).",
        allow_abbrev=False,
    )
    add_dataclass_flags(p, ServerConfig, HELP, CHOICES)
    return p


def batch_main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = batch_parser().parse_args(argv)
    config = config_from_args(ServerConfig, args)
    default_log_config(config.log_level)
    if config.parent is not None:
        from .lifetime import end_with_parent

        end_with_parent(config.parent)
    if config.gpus or config.procs > 1:
        try:
            config.validate()
        except ValueError as exc:
            logging.getLogger("charon").error("cannot start: %s", exc)
            return 2
        if config.gpus:
            return multi_gpu_main(config, argv)
        return multi_proc_main(config, argv)
    try:
        import zmq

        ctx = zmq.Context(io_threads=config.io_threads) if config.io_threads > 0 else None
        server = BatchServer(config, context=ctx)
    except Exception as exc:
        logging.getLogger("charon").error("cannot start: %s", exc)
        return 2

    def _stop(signum, frame):
        if config.parent is not None and server._stop.is_set():
            # A launcher's child may get the same stop twice (Ctrl-C reaches the whole process group, and
            # the launcher passes it on; systemd signals the whole cgroup): only the launcher cuts a drain
            # short, by SIGKILL after its grace or on a second signal of its own.
            return
        logging.getLogger("charon").info("signal %d: stopping", signum)
        server.stop()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever()
    except Exception as exc:
        logging.getLogger("charon").error("server failed: %s", exc)
        return 1
    server.ctx.destroy(linger=server.flush_ms())  # the last replies leave before the process ends
    return 3 if server.refused else 0


def _strip_flags(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """argv without the given flags (and their values)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in names:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def worker_metrics_port(config: ServerConfig, i: int) -> int:
    """--gpus: the first metrics port of worker i. With --procs N each worker uses N + 1 ports (its front
    ends, then its shared engine), so the workers' ranges follow one another."""
    return config.metrics_port + i * (config.procs + 1 if config.procs > 1 else 1)


def router_metrics_port(config: ServerConfig) -> int:
    """--gpus behind local routers: the first router's metrics port, after every worker's range (router k of
    --gpus-routers on this + k)."""
    return worker_metrics_port(config, len([g for g in config.gpus.split(",") if g.strip()]))


def _parent() -> list[str]:
    """The flag that makes a child process end with this launcher (lifetime.py)."""
    import os

    return ["--parent", str(os.getpid())]


def _per_gpu_starter(config: ServerConfig, gpus: list[int], base: list[str], where):
    """``start(i)`` for --gpus: GPU i's process, with ``base`` flags, ``where(i)`` (how it reaches its clients
    and what else it alone gets), its device, its metrics ports, and an end with this launcher."""
    import subprocess

    engine = [] if config.engine != "auto" else ["--engine", "cuda"]  # a GPU worker does not fall back to the CPU

    def start(i):
        cmd = [sys.executable, "-m", "charon.cli", *base, *engine, *where(i), "--device", str(gpus[i]), *_parent()]
        if config.metrics_port is not None:
            cmd += ["--metrics-port", str(worker_metrics_port(config, i))]
        return subprocess.Popen(cmd)

    return start


def multi_gpu_main(config: ServerConfig, argv: list[str]) -> int:
    """``--gpus 0,1,..``: one worker process per GPU, restarted if it dies; behind a router on --bind
    (``--gpus-share router``) or each listening on --bind itself (``--gpus-share port``)."""
    from .router import run_router_in_thread

    log = logging.getLogger("charon")
    gpus = [int(g) for g in config.gpus.split(",") if g.strip()]
    if config.gpus_share == "port":
        return _gpus_on_one_port_main(config, argv, gpus)
    if config.gpus_routers > 1:
        return _gpus_behind_routers_main(config, argv, gpus)
    router_config = _local_router_config(config, "tcp://127.0.0.1:0")
    try:
        router_config.validate()
    except ValueError as exc:
        log.error("cannot start: %s", exc)
        return 2
    router, thread = run_router_in_thread(router_config)
    # The router writes the runs (it sees every reply of a run, whichever worker answered it).
    base = _strip_flags(argv, ("--gpus", "--bind", "--connect", "--device", "--metrics-port", "--output-dir",
                               "--output-basket-events", "--output-idle-seconds", "--parent"))  # fmt: skip
    start = _per_gpu_starter(config, gpus, base, lambda i: ["--connect", router.backend_address])
    log.info("charon-batch: %d workers (GPUs %s)%s behind %s", len(gpus), gpus,
             f", each {config.procs} front-end processes sharing its GPU" if config.procs > 1 else "",
             router.frontend_address)  # fmt: skip
    try:
        # On the way out the router stops taking events at once, and passes on the workers' replies to
        # those it took while they drain.
        return _supervise("GPU worker", start, len(gpus), needs=("the local router", thread.is_alive),
                          grace=_grace(config, nested=True), before_stop=router.stop)
    finally:
        router.stop()
        thread.join(config.drain_seconds + 10)


def _local_router_config(config: ServerConfig, backend: str, procs: int = 1):
    """The settings of the local router(s) of --gpus, from charon-batch's: the client port, the workers'
    heartbeats, the run output (the routers write the runs) and, with --metrics-port, the ports after the
    workers' (:func:`router_metrics_port`)."""
    from .router import RouterConfig

    return RouterConfig(frontend=config.bind, backend=backend, procs=procs, ping_reply=config.ping_reply,
                        heartbeat_interval=config.heartbeat_interval, heartbeat_liveness=config.heartbeat_liveness,
                        output_dir=config.output_dir, output_basket_events=config.output_basket_events,
                        output_idle_seconds=config.output_idle_seconds, max_event_photons=config.max_event_photons,
                        io_threads=config.io_threads, drain_seconds=config.drain_seconds, log_level=config.log_level,
                        metrics_port=None if config.metrics_port is None else router_metrics_port(config))  # fmt: skip


def _gpus_behind_routers_main(config: ServerConfig, argv: list[str], gpus: list[int]) -> int:
    """``--gpus 0,1 --gpus-routers R --procs N``: ``charon-router --procs R`` on --bind (a child launcher that
    restarts its routers), and one worker per GPU whose N front ends connect to all R routers' backends on
    loopback. As with one local router, a worker that dies has its events re-sent by the routers, and the
    routers write the runs; R routers lift the ~10-12k events/s that one router's loop allows."""
    import subprocess

    from .ports import free_port_range
    from .reuseport import tcp_endpoint

    log = logging.getLogger("charon")
    n = config.gpus_routers
    first = free_port_range(n)  # router k's workers connect on first + k
    backends = [tcp_endpoint("127.0.0.1", first + k) for k in range(n)]
    router_config = _local_router_config(config, backends[0], procs=n)
    try:
        router_config.validate()
    except ValueError as exc:
        log.error("cannot start: %s", exc)
        return 2
    cmd = [sys.executable, "-m", "charon.cli", "router", *args_from_config(router_config), *_parent()]
    routers = subprocess.Popen(cmd)
    base = _strip_flags(argv, ("--gpus", "--gpus-routers", "--bind", "--connect", "--device", "--metrics-port",
                               "--output-dir", "--output-basket-events", "--output-idle-seconds",
                               "--parent"))  # fmt: skip
    start = _per_gpu_starter(config, gpus, base, lambda i: ["--connect", ",".join(backends)])
    log.info("charon-batch: %d workers (GPUs %s), each %d front-end processes sharing its GPU, behind %d routers "
             "on %s", len(gpus), gpus, config.procs, n, config.bind)  # fmt: skip

    def stop_routers():  # they stop taking events at once and pass on the replies of those taken
        if routers.poll() is None:
            routers.terminate()

    try:
        return _supervise("GPU worker", start, len(gpus), needs=("the local routers", lambda: routers.poll() is None),
                          grace=_grace(config, nested=True), before_stop=stop_routers)  # fmt: skip
    finally:
        stop_routers()
        try:
            routers.wait(_grace(config, nested=True))
        except subprocess.TimeoutExpired:
            routers.kill()
            routers.wait()


def _gpus_on_one_port_main(config: ServerConfig, argv: list[str], gpus: list[int]) -> int:
    """``--gpus 0,1 --gpus-share port``: one server per GPU (itself --procs N front ends sharing that GPU's
    engine when N > 1), every front end listening on --bind with SO_REUSEPORT. This launcher reserves the
    port, as a --procs launcher does, and restarts a GPU's server that dies. No router: an event never
    crosses a Python loop that every event crosses."""
    log = logging.getLogger("charon")
    if (reserved := _reserve("--bind", config.bind)) is None:
        return 2
    hold, bind = reserved
    base = _strip_flags(argv, ("--gpus", "--gpus-share", "--bind", "--device", "--metrics-port", "--accept",
                               "--parent", "--engine-cpus", "--engine-cpus-all"))  # fmt: skip
    pinned = [[] for _ in gpus]  # GPU i's engine thread on its share of --engine-cpus; every front end off all
    if config.engine_cpus:
        from .cpus import engine_cpus_per_gpu

        pinned = [["--engine-cpus", share, "--engine-cpus-all", config.engine_cpus]
                  for share in engine_cpus_per_gpu(config.engine_cpus, len(gpus))]  # fmt: skip
    start = _per_gpu_starter(config, gpus, base, lambda i: ["--bind", bind, "--accept", "reuseport", *pinned[i]])
    each = f", each {config.procs} front-end processes sharing its GPU" if config.procs > 1 else ""
    log.info("charon-batch: %d GPU servers (GPUs %s)%s, all listening on %s (SO_REUSEPORT)", len(gpus), gpus,
             each, bind)  # fmt: skip
    try:
        return _supervise("GPU server", start, len(gpus), grace=_grace(config, nested=True))
    finally:
        hold.close()


def _grace(config, nested: bool = False) -> float:
    """Seconds a child gets after SIGTERM: its --drain-seconds, and time to stop (more for a child that is
    itself a launcher: its own children drain first)."""
    return config.drain_seconds + (40.0 if nested else 20.0)


def _reserve(flag: str, endpoint: str):
    """The shared port of ``endpoint`` held for a launcher's processes (reuseport.reserve): (hold, endpoint
    with the actual port), or None, logged, when it is taken (another charon too) or not a tcp:// address."""
    from .reuseport import reserve

    try:
        return reserve(endpoint)
    except (OSError, ValueError) as exc:
        logging.getLogger("charon").error("cannot start: %s %s: %s", flag, endpoint, exc)
        return None


def _supervise(name: str, start, n: int, on_exit=None, needs=None, grace: float = 30.0, before_stop=None,
               second_signal_kills: bool = True) -> int:
    """Start ``n`` worker processes, restart any that dies, stop them all on SIGINT/SIGTERM.

    ``on_exit(pid)`` is called for each process that died, before it is restarted. ``needs``
    ((what, is_alive)): a thread of this launcher that the processes cannot serve without (the
    shared engine, the local router); if it ends, everything stops with exit status 1, so that
    whoever started the launcher sees the failure instead of processes that take events and never
    answer them (under --gpus-share port, the launcher above restarts this one). On the way out each
    process gets SIGTERM and ``grace`` seconds (its --drain-seconds and more) before SIGKILL;
    ``before_stop()`` is called just before. A second signal kills them at once, unless
    ``second_signal_kills`` is off (a launcher that is itself a launcher's child: it may get one
    stop twice, from its process group and from its launcher)."""
    import subprocess
    import time

    log = logging.getLogger("charon")
    procs = [start(i) for i in range(n)]
    stopping = []

    def on_signal(signum, frame):
        if stopping and second_signal_kills:  # a second signal: no more waiting for the processes to drain
            log.warning("signal %d again: killing the %s processes", signum, name)
            for p in procs:
                p.kill()
        stopping.append(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stopping:
            time.sleep(0.5)
            if needs is not None and not needs[1]():
                log.error("%s stopped: stopping the %s processes", needs[0], name)
                return 1
            for i, p in enumerate(procs):
                rc = p.poll()
                if rc is not None and not stopping:
                    if rc in (2, 3):  # bad configuration or refused: restarting would not help
                        log.error("%s %d exited with %d", name, i, rc)
                        return rc
                    log.warning("%s %d exited with %s: restarting it", name, i, rc)
                    if on_exit is not None:
                        on_exit(p.pid)
                    procs[i] = start(i)
    finally:
        if before_stop is not None:
            before_stop()
        for p in procs:
            p.terminate()
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s %d did not stop within %g s: killing it", name, procs.index(p), grace)
                p.kill()
    return 0


def multi_proc_main(config: ServerConfig, argv: list[str]) -> int:
    """``--procs N``: N front-end processes on one address, sharing ONE engine in this process.

    Each front end receives, decodes, batches and replies on its own, and hands
    its batches to the engine service here, which merges them into one engine
    call (one CUDA context, large batches). The front ends share --bind either
    through the kernel (``--accept reuseport``: every front end listens on the
    same TCP port, each client connection goes to one of them) or through a
    C-level zmq.proxy here (``--accept proxy``: round-robin per message, one more
    hop each way). No cross-process resend de-duplication, and a dying front
    end's queued events are recovered only by the clients' retries (it is
    restarted): for failover across machines use charon-router. Metrics: front
    end i on --metrics-port + i, the shared engine on --metrics-port + N. With
    --connect the front ends are workers of that router instead, and nothing binds.
    """
    if config.connect:
        return _worker_front_ends_main(config, argv)
    if config.accept_mode() == "reuseport":
        return _reuseport_main(config, argv)
    return _proxy_main(config, argv)


def _start_engine_service(config: ServerConfig):
    """The shared engine in this process (its thread compiles kernels before any front end starts)."""
    import tempfile

    import zmq

    from .cpus import pin_all_threads, split_engine_cpus
    from .engine_service import EngineService
    from .handoff import remove_orphans
    from .server import engine_setup

    n, nbytes = remove_orphans()
    if n:
        logging.getLogger("charon").warning("removed %d shared-memory segment(s), %.1f MB, left in /dev/shm by charon "
                                            "processes that were killed", n, nbytes / 2**20)  # fmt: skip
    _detector, factory = engine_setup(config)
    split = split_engine_cpus(config.engine_cpus, config.engine_cpus_all)
    if split is not None:
        # Every thread so far; those started from here on (the engine's I/O threads, the front ends,
        # the proxy) inherit the rest, and the engine's thread moves to its own CPUs once started.
        pin_all_threads(split[1])
    sockdir = tempfile.mkdtemp(prefix="charon-")
    address = f"ipc://{sockdir}/engine" if zmq.has("ipc") else "tcp://127.0.0.1:*"
    # A context of its own, so that the engine's traffic never queues behind the clients'. Every
    # photon crosses it (~1 GB/s at 25k events/s of 1000 photons), and the front ends send their
    # batches at nearly the same moment (when the previous merged batch returns): with one I/O
    # thread per front end the transfers run side by side instead of one after another.
    io = config.engine_io_threads or min(8, config.procs)
    service = EngineService(factory, address, config.max_batch_photons, context=zmq.Context(io_threads=io),
                            max_batch_events=config.max_batch_events, cpus=split[0] if split else None)  # fmt: skip
    service.start()
    metrics_server = service.metrics.serve(config.metrics_port + config.procs) if config.metrics_port is not None \
        else None  # fmt: skip
    return service, metrics_server, sockdir


def _stop_engine_service(service, metrics_server, sockdir) -> None:
    import contextlib
    import os

    from .handoff import remove_leftovers
    from .metrics import stop_serving

    service.stop()
    service.join(30)
    remove_leftovers()  # segments of front ends that were killed before removing their own
    if metrics_server is not None:
        stop_serving(metrics_server)
    for name in ("engine", "upstream"):
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(sockdir, name))
    with contextlib.suppress(OSError):
        os.rmdir(sockdir)


def _remove_segments(pid: int) -> None:
    from .handoff import remove_leftovers

    if n := remove_leftovers(child_pid=pid):
        logging.getLogger("charon").info("removed %d shared-memory segment(s) of front end %d", n, pid)


_FRONT_END_FLAGS = ("--procs", "--io-threads", "--bind", "--upstream", "--metrics-port", "--engine-service", "--accept",
                    "--engine-io-threads", "--engine-cpus", "--engine-cpus-all", "--parent")


def _front_ends_main(config: ServerConfig, argv: list[str], where, what: str) -> int:
    """The shared engine here and ``--procs`` front-end processes, front end i started with ``where(i)``
    (how it reaches its clients), restarted if they die; ``what`` names them in the log."""
    import subprocess

    log = logging.getLogger("charon")
    try:
        service, metrics_server, sockdir = _start_engine_service(config)
    except Exception as exc:
        log.error("cannot start: %s", exc)
        return 2
    base = _strip_flags(argv, _FRONT_END_FLAGS)
    io = ["--io-threads", str(config.io_threads)] if config.io_threads > 0 else []

    def start(i):
        cmd = [sys.executable, "-m", "charon.cli", *base, *io, *where(i), "--engine-service", service.address,
               *_parent()]  # fmt: skip
        if config.metrics_port is not None:
            cmd += ["--metrics-port", str(config.metrics_port + i)]
        return subprocess.Popen(cmd)

    log.info("charon-batch: %d %s, one shared %s engine", config.procs, what, service.engine.name)
    try:
        return _supervise("front-end process", start, config.procs, on_exit=_remove_segments,
                          needs=("the shared engine", service.is_alive), grace=_grace(config),
                          second_signal_kills=config.parent is None)
    finally:
        _stop_engine_service(service, metrics_server, sockdir)


def _reuseport_main(config: ServerConfig, argv: list[str]) -> int:
    if config.parent is not None:  # one GPU's server under --gpus-share port: that launcher holds the port
        return _front_ends_main(config, argv, lambda i: ["--bind", config.bind, "--accept", "reuseport"],
                                f"front-end processes joining {config.bind} (SO_REUSEPORT, GPU {config.device})")
    if (reserved := _reserve("--bind", config.bind)) is None:
        return 2
    hold, bind = reserved
    try:
        return _front_ends_main(config, argv, lambda i: ["--bind", bind, "--accept", "reuseport"],
                                f"front-end processes sharing {bind} (SO_REUSEPORT)")  # fmt: skip
    finally:
        hold.close()


def _worker_front_ends_main(config: ServerConfig, argv: list[str]) -> int:
    """``--connect ROUTER --procs N``: N workers of the router (each registers on its own and takes
    its share of the events) that share one engine here, so that one GPU behind a router gets the
    front ends' parallel decode and replies. Nothing binds --bind.

    With the R backends of ``charon-router --procs R`` in --connect, front end i is a worker of router
    i mod R: every router then has workers on every GPU host, and re-sends a dead host's events to the
    others, as a single router does."""
    routers = config.routers()
    return _front_ends_main(config, _strip_flags(argv, ("--connect",)),
                            lambda i: ["--connect", routers[i % len(routers)]],
                            f"workers of router{'s' if len(routers) > 1 else ''} {', '.join(routers)}")


def _proxy_main(config: ServerConfig, argv: list[str]) -> int:
    """--accept proxy: the C-level zmq.proxy (ROUTER on --bind, DEALER backend) forwards every message."""
    import subprocess
    import threading

    import zmq

    from .threads import set_native_thread_name

    log = logging.getLogger("charon")
    # Every client message crosses two sockets here (the proxy), and its I/O threads do the
    # socket reads and writes: one I/O thread saturated at ~24k events/s of 1000 photons
    # (H200 host, benchmarks/RESULTS.md).
    io_threads = config.io_threads or min(8, config.procs + 1)
    ctx = zmq.Context(io_threads=io_threads)
    try:
        service, metrics_server, sockdir = _start_engine_service(config)
    except Exception as exc:
        log.error("cannot start: %s", exc)
        return 2
    use_ipc = service.address.startswith("ipc://")

    front = ctx.socket(zmq.ROUTER)
    back = ctx.socket(zmq.DEALER)
    for s in (front, back):
        s.setsockopt(zmq.SNDHWM, 0)
        s.setsockopt(zmq.RCVHWM, 0)
    front.bind(config.bind)
    if use_ipc:  # a Unix socket costs the I/O threads less than loopback TCP
        upstream = f"ipc://{sockdir}/upstream"
        back.bind(upstream)
    else:
        upstream = f"tcp://127.0.0.1:{back.bind_to_random_port('tcp://127.0.0.1')}"

    def proxy():
        set_native_thread_name("charon-proxy")
        try:
            zmq.proxy(front, back)
        except zmq.ZMQError:  # the sockets were closed at shutdown
            pass

    threading.Thread(target=proxy, name="charon-proxy", daemon=True).start()
    base = _strip_flags(argv, _FRONT_END_FLAGS)

    def start(i):
        cmd = [sys.executable, "-m", "charon.cli", *base, "--upstream", upstream, "--engine-service", service.address,
               *_parent()]  # fmt: skip
        if config.metrics_port is not None:
            cmd += ["--metrics-port", str(config.metrics_port + i)]
        return subprocess.Popen(cmd)

    log.info("charon-batch: %d front-end processes behind %s (%d I/O threads), one shared %s engine",
             config.procs, config.bind, io_threads, service.engine.name)  # fmt: skip
    try:
        return _supervise("front-end process", start, config.procs, on_exit=_remove_segments,
                          needs=("the shared engine", service.is_alive), grace=_grace(config),
                          second_signal_kills=config.parent is None)
    finally:
        front.close(0)
        back.close(0)
        _stop_engine_service(service, metrics_server, sockdir)


ROUTER_HELP = {
    "frontend": "address clients connect to (ROUTER)",
    "backend": "address workers connect to (charon-batch --connect)",
    "heartbeat_interval": "seconds between heartbeats with workers",
    "heartbeat_liveness": "heartbeats a worker may miss before it is presumed dead and its events re-sent",
    "ping_reply": "reply to PING: PONG or ACK",
    "hold_seconds": "how long a request waits for a worker when none is registered before NO_WORKERS",
    "output_dir": "directory for server-side run output: PHOTONDATA between RUN_BEGIN and RUN_END is "
    "answered SIM_COMPLETE_ASYNC and the router writes its hits, from whichever worker, to "
    "DIR/<name>.charon.ntuple.root (off when not given: RUN_BEGIN/RUN_END are acknowledged and hits go back)",
    "output_basket_events": "events per ROOT basket written with --output-dir",
    "output_idle_seconds": OUTPUT_IDLE_HELP,
    "max_event_photons": "with --output-dir: largest event accepted into a run (checked here, since the client is "
    "answered before a worker sees it)",
    "io_threads": "ZeroMQ I/O threads of the router, which carry every photon twice (client to router, router "
    "to worker); 0: the process's shared context (one thread)",
    "procs": "router processes sharing --frontend's port (SO_REUSEPORT: the kernel spreads client connections "
    "over them), restarted if they die; router k takes workers on --backend's port + k, so workers connect to "
    "all of them (charon-batch --connect tcp://HOST:P,tcp://HOST:P+1,... --procs N >= R). One router's Python "
    "loop serves ~10k events/s of 1000 photons",
    "metrics_port": "serve Prometheus metrics (charon_router_*) over HTTP on this port; with --procs, router k "
    "on this port + k (off when not given)",
    "drain_seconds": "on SIGTERM or Ctrl-C, read no more client requests but pass on the replies to those "
    "already taken, for at most this long, before exiting (a second signal exits at once); 0: exit at once",
    "log_level": "logging level",
    "accept": "internal (charon-router --procs): reuseport makes this router join the client port its launcher "
    "reserved",
    "parent": "internal: the launcher that started this router; it stops when the launcher ends (Linux)",
}


def router_backends(config) -> list[str]:
    """charon-router --procs R: router k's backend, --backend's port + k (the addresses workers --connect to)."""
    from .reuseport import parse_tcp, tcp_endpoint

    host, port = parse_tcp(config.backend)
    return [tcp_endpoint(host, port + k) for k in range(config.procs)]


def _routers_main(config, argv: list[str]) -> int:
    """``charon-router --procs R``: R routers on one client port, each with its own backend port.

    One router's loop is the limit of many GPUs serving small events (benchmarks/RESULTS.md). Each
    router here is a whole router (its workers, its in-flight copies, its runs); a client's connection
    stays with one of them, and a worker host's front ends spread over all of them. A router that dies
    is restarted on the same ports; its workers register again, and its clients' in-flight events
    come back through their retries, as with a --procs front end."""
    import subprocess

    log = logging.getLogger("charon")
    if (reserved := _reserve("--frontend", config.frontend)) is None:
        return 2
    hold, frontend = reserved

    backends = router_backends(config)
    base = _strip_flags(argv, ("--procs", "--frontend", "--backend", "--accept", "--parent", "--metrics-port"))

    def start(k):
        cmd = [sys.executable, "-m", "charon.cli", "router", *base, "--frontend", frontend, "--accept", "reuseport",
               "--backend", backends[k], *_parent()]  # fmt: skip
        if config.metrics_port is not None:
            cmd += ["--metrics-port", str(config.metrics_port + k)]
        return subprocess.Popen(cmd)

    log.info("charon-router: %d routers sharing %s (SO_REUSEPORT); workers: charon-batch --connect %s --procs N "
             "(N >= %d)", config.procs, frontend, ",".join(backends), config.procs)  # fmt: skip
    try:
        return _supervise("router", start, config.procs, grace=_grace(config))
    finally:
        hold.close()


def router_main(argv=None) -> int:
    from .router import Router, RouterConfig

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="charon-router", description="Router in front of charon-batch workers "
                                "(--connect), one per GPU, on any number of hosts.", allow_abbrev=False)  # fmt: skip
    add_dataclass_flags(p, RouterConfig, ROUTER_HELP, {"ping_reply": ("PONG", "ACK"),
                                                       "accept": ("bind", "reuseport")})  # fmt: skip
    config = config_from_args(RouterConfig, p.parse_args(argv))
    default_log_config(config.log_level)
    log = logging.getLogger("charon")
    if config.parent is not None:
        from .lifetime import end_with_parent

        end_with_parent(config.parent)
    try:
        config.validate()
        if config.procs > 1:
            return _routers_main(config, argv)
        router = Router(config)
    except ValueError as exc:
        log.error("cannot start: %s", exc)
        return 2
    def on_signal(signum, frame):
        if config.parent is not None and router._stop.is_set():  # the same stop twice: see batch_main
            return
        router.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        router.serve_forever()
        if not router.ctx.closed:
            router.ctx.destroy(linger=router.flush_ms())  # the last replies leave before the process ends
    except Exception as exc:
        if router.started.is_set():
            log.error("router failed: %s", exc)
            return 1
        log.error("cannot start: %s", exc)  # an address taken or invalid: restarting would not help
        return 2
    return 0


if __name__ == "__main__":
    # The launchers start their children as `python -m charon.cli ...`: charon-batch's, and
    # charon-router --procs's with `router` first.
    if sys.argv[1:2] == ["router"]:
        sys.exit(router_main(sys.argv[2:]))
    sys.exit(batch_main())
