"""charon-batch: the multi-event batching server loop.

Data flows one way:

    ROUTER socket -> decode (protocol) -> queue (scheduler.queue) -> batch (scheduler.batcher)
    -> engine thread (engine_thread; or the loop itself, engine_loop) -> hits + per-event offsets
    -> demux (per request) -> encode -> socket

The loop owns the sockets and every scheduler structure; the engine thread
only sees finished batches. A request identical to one still queued or in
flight (Lazy-Pirate resend) joins it instead of being simulated again.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from dataclasses import dataclass

import zmq

from . import protocol as P
from .engine_loop import LoopEngine
from .engine_thread import BatchResult, EngineThread
from .engines import EngineConfig, create_engine
from .geometry import Detector, resolve_detector
from .metrics import BusyClock, Metrics, stop_serving
from .photons import HitBatch, empty_hits
from .protocol import Layout, RequestError
from .scheduler.batcher import Batcher
from .scheduler.queue import make_queue
from .run_output import RunBook
from .scheduler.request import EventRequest, Route
from .sockets import poll, recv_message, send_message

log = logging.getLogger("charon.server")


# When a batch that is not full goes to the engine (--dispatch). "idle" (default): at once whenever the
# engine has none of this process's batches, so that an event on a quiet server is not held back for
# company; under load the engine is never idle and batches still grow while it runs (continuous batching),
# so only latency below saturation changes (benchmarks/RESULTS.md, fifteenth session). "wait": once its
# oldest event has waited --max-wait-ms and the engine can take it: fewer, larger engine calls at low load.
DISPATCH_RULES = ("idle", "wait")
FLUSH_MS = 2000  # after a drain: how long the last replies may take to leave (a gone client's are dropped at once)
# How the GPUs of --gpus share the client port. "router": a local charon-router hands each event to a GPU
# worker and re-sends a dead worker's events; its one Python loop limits a host to ~10-12k events/s of
# 1000 photons (benchmarks/RESULTS.md, fifteenth session). "port": each GPU's server listens on the port
# itself (SO_REUSEPORT, reuseport.py) and the kernel spreads the client connections over all of them.
GPUS_SHARE = ("router", "port")
INTAKES = ("python", "compiled")  # how the client socket's requests are received and checked (intake.py)
# What runs the engine's batches in one process: "thread", an engine thread that wakes the socket loop with
# results (engine_thread.py), or "loop", the socket loop itself through the CUDA engine's asynchronous calls,
# with no hand-off between threads (engine_loop.py).
ENGINE_DRIVERS = ("auto", "thread", "loop")


@dataclass
class ServerConfig:
    """Settings of charon-batch; each field is the CLI flag of the same name."""

    bind: str = "tcp://*:5555"
    detector: str = "demo"
    engine: str = "auto"
    seed: int = 0
    max_batch_photons: int = 5_000_000
    max_batch_events: int = 0
    max_wait_ms: float = 1.0
    dispatch: str = "idle"
    max_queued_photons: int = 50_000_000
    max_event_photons: int = 50_000_000
    max_steps: int = 100
    engine_lanes: int = 1
    engine_driver: str = "auto"  # auto: loop for one plain process's CUDA engine, else thread (resolved_engine_driver)
    ping_reply: str = "PONG"
    reply_layout: str = "auto"
    queue_policy: str = "fcfs"
    metrics_port: int | None = None
    output_dir: str | None = None
    output_basket_events: int = 1000
    output_idle_seconds: float = 3600.0
    log_level: str = "INFO"
    device: int = 0
    connect: str | None = None
    procs: int = 1
    accept: str = "auto"
    io_threads: int = 0
    engine_io_threads: int = 0
    engine_cpus: str | None = None
    handoff: str = "auto"
    upstream: str | None = None
    engine_service: str | None = None
    heartbeat_interval: float = 1.0
    heartbeat_liveness: int = 3
    drain_seconds: float = 10.0
    gpus: str | None = None
    gpus_share: str = "router"
    gpus_routers: int = 1
    parent: int | None = None
    engine_cpus_all: str | None = None
    intake: str = "python"

    def resolved_engine_driver(self) -> str:
        """What runs the engine's batches: ``engine_driver``, with ``auto`` read as ``loop`` for the CUDA engine
        (``--engine cuda``, or ``auto`` finding a GPU) of one plain process, and ``thread`` otherwise: the
        front ends of --procs hand their batches to a shared engine, and a router's workers (--connect) and
        the CPU and Chroma engines were not measured with it or cannot be driven so. On six H100 hosts
        the loop driver gave the lower median latency at light load every time, and a saturated process
        more events/s (benchmarks/RESULTS.md, twenty-sixth and twenty-seventh sessions)."""
        if self.engine_driver != "auto":
            return self.engine_driver
        if self.procs > 1 or self.engine_service or self.connect is not None or self.upstream:
            return "thread"
        if self.engine == "cuda":
            return "loop"
        if self.engine == "auto":
            from .engines import cuda_usable

            return "loop" if cuda_usable() else "thread"
        return "thread"

    def validate(self) -> None:
        if self.max_batch_photons < 1:
            raise ValueError("--max-batch-photons must be >= 1")
        if self.max_queued_photons < 1 or self.max_event_photons < 1:
            raise ValueError("--max-queued-photons and --max-event-photons must be >= 1")
        if self.max_wait_ms < 0:
            raise ValueError("--max-wait-ms must be >= 0")
        if self.dispatch not in DISPATCH_RULES:
            raise ValueError(f"--dispatch must be one of {', '.join(DISPATCH_RULES)}")
        if self.ping_reply not in ("PONG", "ACK"):
            raise ValueError("--ping-reply must be PONG or ACK")
        if self.reply_layout not in ("auto", "compact", "full"):
            raise ValueError("--reply-layout must be auto, compact or full")
        if self.output_dir is not None and not os.path.isdir(self.output_dir):
            raise ValueError(f"--output-dir {self.output_dir!r} is not a directory")
        if self.output_idle_seconds < 0:
            raise ValueError("--output-idle-seconds must be >= 0 (0: never close a silent client's run)")
        if self.output_basket_events < 1:
            raise ValueError("--output-basket-events must be >= 1")
        if self.procs < 1:
            raise ValueError("--procs must be >= 1")
        if self.drain_seconds < 0:
            raise ValueError("--drain-seconds must be >= 0")
        if self.engine_lanes < 1:
            raise ValueError("--engine-lanes must be >= 1")
        if self.engine_driver not in ENGINE_DRIVERS:
            raise ValueError(f"--engine-driver must be one of {', '.join(ENGINE_DRIVERS)}")
        if self.engine_driver == "loop":
            if self.engine in ("cpu", "chroma"):
                raise ValueError(f"--engine-driver loop needs the CUDA engine's asynchronous calls; --engine "
                                 f"{self.engine} has none: use --engine cuda or --engine-driver thread")  # fmt: skip
            if self.procs > 1:
                raise ValueError("--engine-driver loop drives the engine of one process; the front ends of "
                                 "--procs share one engine process: leave --procs out or use --engine-driver thread")
        if self.accept not in ("auto", "reuseport", "proxy"):
            raise ValueError("--accept must be auto, reuseport or proxy")
        if self.accept == "reuseport":
            from .reuseport import AVAILABLE, parse_tcp

            if not AVAILABLE:
                raise ValueError("--accept reuseport needs SO_REUSEPORT (Linux); use --accept proxy")
            parse_tcp(self.bind)  # ValueError naming the problem
        if self.handoff not in ("auto", "shm", "socket"):
            raise ValueError("--handoff must be auto, shm or socket")
        if self.intake not in INTAKES:
            raise ValueError(f"--intake must be one of {', '.join(INTAKES)}")
        if self.intake == "compiled":
            from .intake import AVAILABLE as INTAKE_AVAILABLE

            if not INTAKE_AVAILABLE:
                raise ValueError("--intake compiled calls libzmq's C API through pyzmq (Linux), which was not found: "
                                 "use --intake python")  # fmt: skip
        if self.io_threads < 0 or self.engine_io_threads < 0:
            raise ValueError("--io-threads and --engine-io-threads must be >= 0")
        if self.engine_cpus:
            if self.procs < 2:
                raise ValueError("--engine-cpus pins the shared engine of --procs N (N >= 2): add --procs")
            from .cpus import engine_cpus_per_gpu, split_engine_cpus

            if self.gpus and self.gpus_share != "port":
                raise ValueError("--engine-cpus with --gpus would put every GPU's engine thread on the same CPUs: "
                                 "add --gpus-share port (each GPU's engine thread gets its share of the list), or "
                                 "start one charon-batch --connect --procs N --engine-cpus LIST per GPU")  # fmt: skip
            if self.gpus:
                engine_cpus_per_gpu(self.engine_cpus, len([g for g in self.gpus.split(",") if g.strip()]))
            split_engine_cpus(self.engine_cpus, self.engine_cpus_all)  # ValueError naming the problem
        if self.gpus_share not in GPUS_SHARE:
            raise ValueError(f"--gpus-share must be one of {', '.join(GPUS_SHARE)}")
        if self.gpus_routers < 1:
            raise ValueError("--gpus-routers must be >= 1")
        if self.gpus_routers > 1:
            if not self.gpus or self.gpus_share != "router":
                raise ValueError("--gpus-routers R runs R local routers in front of the GPUs of --gpus "
                                 "(--gpus-share router): add --gpus")  # fmt: skip
            if self.procs < self.gpus_routers:
                raise ValueError(f"--gpus-routers {self.gpus_routers}: add --procs N with N >= {self.gpus_routers}; "
                                 "each GPU's front end k is a worker of router k mod R, so each router gets one "
                                 "of every GPU")  # fmt: skip
            from .reuseport import AVAILABLE, parse_tcp

            if not AVAILABLE:
                raise ValueError("--gpus-routers shares --bind through SO_REUSEPORT (Linux): use one router")
            parse_tcp(self.bind)  # ValueError naming the problem
        if self.gpus_share == "port":
            if not self.gpus:
                raise ValueError("--gpus-share port says how the GPUs of --gpus share --bind: add --gpus")
            if self.accept == "proxy":
                raise ValueError("--gpus-share port shares --bind through SO_REUSEPORT: drop --accept proxy")
            from .reuseport import AVAILABLE, parse_tcp

            if not AVAILABLE:
                raise ValueError("--gpus-share port needs SO_REUSEPORT (Linux); use --gpus-share router")
            parse_tcp(self.bind)  # ValueError naming the problem
        if self.connect is not None:
            routers = self.routers()
            if not routers:
                raise ValueError(f"--connect needs a router's backend address, got {self.connect!r}")
            if len(routers) > 1 and self.procs < len(routers):
                raise ValueError(f"--connect lists {len(routers)} routers: add --procs N with N >= {len(routers)}; "
                                 f"front end k is a worker of router k mod {len(routers)}, so each router "
                                 "gets one")  # fmt: skip
        if self.connect and self.output_dir:
            raise ValueError("--output-dir goes on charon-router when workers --connect: the router writes the runs")
        if self.procs > 1 and self.output_dir and not self.gpus and self.accept_mode() != "reuseport":
            raise ValueError("--output-dir with --procs needs --accept reuseport (tcp:// on Linux), where each client "
                             "stays with one front end: the proxy spreads a run's events over all of them")

    def routers(self) -> list[str]:
        """--connect as a list: the backends of charon-router --procs N (one address for a single router)."""
        return [a.strip() for a in (self.connect or "").split(",") if a.strip()]

    def accept_mode(self) -> str:
        """How --procs front ends share --bind: 'reuseport' or 'proxy' (``--accept auto`` resolved)."""
        from .reuseport import AVAILABLE

        if self.accept != "auto":
            return self.accept
        return "reuseport" if AVAILABLE and self.bind.startswith("tcp://") else "proxy"


def split_envelope(frames: list) -> tuple[list, list]:
    """Split a ROUTER message into (envelope, body).

    REQ peers (and charon's DEALER client) put an empty delimiter after their
    identity; a bare DEALER does not. Headers are never empty, so an empty
    second frame can only be the delimiter.
    """
    if len(frames) > 1 and len(frames[1]) == 0:
        return frames[:2], frames[2:]
    return frames[:1], frames[1:]


def engine_setup(config: ServerConfig, detector: Detector | None = None):
    """The detector and a factory for the configured engine (called in the thread that will own it).

    With ``--engine chroma`` the Chroma detector is loaded here, so a missing
    Chroma fails at once, before any socket is opened."""
    chroma_detector = None
    if config.engine == "chroma" and detector is None:
        from .engines import EngineError
        from .geometry.chroma_import import ChromaUnavailable, from_chroma, load_chroma_detector

        try:
            chroma_detector = load_chroma_detector(config.detector)
        except ChromaUnavailable as exc:
            raise EngineError(f"--engine chroma: {exc}") from None
        detector, report = from_chroma(chroma_detector)  # channel positions/types for DETECTOR_INFO
        for line in report:
            log.info("Chroma detector: %s (affects charon's own engines only)", line)
    detector = detector if detector is not None else resolve_detector(config.detector)
    engine_config = EngineConfig(seed=config.seed, max_steps=config.max_steps, device=config.device,
                                 max_batch_photons=config.max_batch_photons, lanes=config.engine_lanes)  # fmt: skip

    def factory():
        return create_engine(config.engine, detector, engine_config, chroma_detector=chroma_detector)

    return detector, factory


class BatchServer:
    def __init__(self, config: ServerConfig, detector: Detector | None = None, engine_factory=None,
                 context: zmq.Context | None = None):  # fmt: skip
        config.validate()
        self.config = config
        self.detector, factory = engine_setup(config, detector)
        self.ctx = context or zmq.Context.instance()
        self.busy = BusyClock()
        self.metrics = Metrics(self.busy)
        self.batcher = Batcher(make_queue(config.queue_policy), config.max_batch_photons, config.max_batch_events)
        self._dispatch_idle = config.dispatch == "idle"
        self._batches_moved = 0  # batches submitted plus results collected: whether a turn did any work
        # Queued or in-flight requests by (event_id, n), for resend de-duplication.
        self.by_key: dict[tuple, list[EventRequest]] = {}
        self.runs = RunBook(config.output_dir, config.output_basket_events, self._reply,
                            lambda: (self.detector.channel_position, self.detector.channel_type),
                            config.output_idle_seconds, self.metrics.runs_closed_idle.inc) \
            if config.output_dir else None  # open runs of client identities (--output-dir)  # fmt: skip
        self._ping = P.PONG if config.ping_reply == "PONG" else P.ACK
        self._detector_info = P.encode_detector_info(self.detector.channel_position, self.detector.channel_type)
        self._fingerprint = self.detector.fingerprint() if config.connect else b""
        self._stop = threading.Event()
        self._abort = threading.Event()  # a second stop(): skip the drain
        self._left: bool | None = None  # a worker that is stopping: whether the router confirmed its LEAVING
        self._buffers: list = []
        self._engine_factory = engine_factory or factory
        self.socket = None
        self.address = None
        self.refused: str | None = None
        self.started = threading.Event()
        self._metrics_server = None

    # ---------------------------------------------------------------- setup
    def _open_worker_socket(self):
        """Worker mode: a DEALER to the router's backend, announced with READY (credit + detector)."""
        from .router import READY

        if self.socket is not None:
            self.socket.close(0)
        self.socket = self.ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.connect(self.config.routers()[0])  # one router (validate(): a list needs --procs)
        # Credit: a running batch plus a full one behind it, within the queue bound.
        credit = min(2 * self.config.max_batch_photons, self.config.max_queued_photons)
        info = self._detector_info[1:]
        send_message(self.socket, [READY, P.u32(credit), self._fingerprint, *info])
        self._router_expiry = time.monotonic() + self.config.heartbeat_interval * self.config.heartbeat_liveness
        self._next_heartbeat = time.monotonic() + self.config.heartbeat_interval

    def _worker_housekeeping(self, reconnect: bool = True):
        """Heartbeats to the router, and (``reconnect``) a new connection when it has been silent too long."""
        from .router import HEARTBEAT

        now = time.monotonic()
        if now >= self._next_heartbeat:
            send_message(self.socket, [HEARTBEAT])
            self._next_heartbeat = now + self.config.heartbeat_interval
        if reconnect and now > self._router_expiry:
            log.warning("router %s silent for %d heartbeats: reconnecting", self.address,
                        self.config.heartbeat_liveness)  # fmt: skip
            self._poller.unregister(self.socket)
            self._open_worker_socket()
            self._poller.register(self.socket, zmq.POLLIN)

    def _from_router(self, msg):
        from .router import HEARTBEAT, LEAVING, REFUSED, REPLY, REQUEST, REQUEST_FULL

        self._router_expiry = time.monotonic() + self.config.heartbeat_interval * self.config.heartbeat_liveness
        kind = bytes(msg[0])
        if kind == REQUEST:
            self._handle_body([REPLY, msg[1]], msg[2:])
        elif kind == REQUEST_FULL:  # the router writes this event to a run file: every hit field is needed
            self._handle_body([REPLY, msg[1]], msg[2:], Layout.FULL)
        elif kind == REFUSED:
            reason = bytes(msg[1]).decode("utf-8", "replace") if len(msg) > 1 else ""
            if reason.startswith("unknown worker") and self._left is not None:  # stopping: the router forgot us
                self._left = True
            elif reason.startswith("unknown worker"):  # the router restarted: register again
                self._poller.unregister(self.socket)
                self._open_worker_socket()
                self._poller.register(self.socket, zmq.POLLIN)
            else:
                log.error("router %s refused this worker: %s", self.address, reason)
                self.refused = reason
                self._stop.set()
        elif kind == LEAVING:  # the router took our LEAVING: every request for us came before this
            self._left = True
        elif kind != HEARTBEAT:
            log.debug("unexpected message from router: %r", kind[:20])

    def _open(self):
        P.warm_up()
        if self.config.engine_service:
            # One of --procs front ends: batches go to the launcher's shared engine.
            from .engine_service import ServiceLink

            self.engine_thread = ServiceLink(self.ctx, self.config.engine_service, handoff=self.config.handoff)
        elif self.config.resolved_engine_driver() == "loop":
            self.engine_thread = LoopEngine(self._engine_factory, self.busy)
        else:
            self.engine_thread = EngineThread(self.ctx, self._engine_factory, self.busy)
        engine = self.engine_thread.start()
        if self.config.connect:
            self._open_worker_socket()
            self.address = self.config.routers()[0]
        elif self.config.upstream:
            # One of --procs workers behind the launcher's zmq.proxy: a DEALER sees the same
            # [client identity, '', body] messages a bound ROUTER would.
            self.socket = self.ctx.socket(zmq.DEALER)
            self.socket.setsockopt(zmq.LINGER, 0)
            self.socket.setsockopt(zmq.SNDHWM, 0)
            self.socket.setsockopt(zmq.RCVHWM, 0)
            self.socket.connect(self.config.upstream)
            self.address = self.config.upstream
        else:
            self._open_router_socket()
        self._finish_open(engine)

    def _open_router_socket(self):
        self.socket = self.ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        if self.config.accept == "reuseport":
            # One of --procs front ends sharing the port: the kernel spreads connections (reuseport.py).
            from .reuseport import bind_shared

            self.address = bind_shared(self.socket, self.config.bind)
            return
        if self.config.bind.endswith(":0"):  # random port (tests)
            port = self.socket.bind_to_random_port(self.config.bind[: self.config.bind.rfind(":")])
            self.address = self.config.bind[: self.config.bind.rfind(":")].replace("*", "127.0.0.1") + f":{port}"
            return
        self.socket.bind(self.config.bind)
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def _finish_open(self, engine):
        self.intake = None
        if self.config.intake == "compiled" and not self.config.connect:  # a worker's socket carries the router's
            from .intake import Intake                                    # framing: read in Python

            self.intake = Intake(self.socket, self.config.max_event_photons)
            self.intake.warm_up()
        self._buffers = [self.engine_thread.host_buffer() for _ in range(self.engine_thread.max_in_flight)]
        if self.config.metrics_port is not None:
            self._metrics_server = self.metrics.serve(self.config.metrics_port)
        log.info(
            "charon-batch %s %s: detector %s (%d triangles, %d channels), engine %s, "
            "max batch %d photons, dispatch %s, max wait %g ms%s",
            "worker of router" if self.config.connect else "listening on", self.address, self.config.detector,
            self.detector.n_triangles, self.detector.n_channels, engine.name,
            self.config.max_batch_photons, self.config.dispatch, self.config.max_wait_ms,
            f", metrics on :{self.config.metrics_port}" if self.config.metrics_port is not None else "",
        )  # fmt: skip

    def stop(self):
        """Stop taking requests; those already accepted are answered first (``--drain-seconds``). A second
        call (a second SIGTERM or Ctrl-C) stops at once."""
        if self._stop.is_set():
            self._abort.set()
        self._stop.set()

    # ----------------------------------------------------------------- loop
    def serve_forever(self):
        # Thousands of small request objects are alive at any time: full GC passes
        # over them every few hundred allocations would dominate the per-event cost.
        gc.set_threshold(50_000, 20, 100)
        self._open()
        self.started.set()
        poller = self._poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        wake = self.engine_thread.wake_socket  # None: the loop drives the engine and looks at it every turn
        if wake is not None:
            poller.register(wake, zmq.POLLIN)
        runs_closed = self.runs.wake_fd if self.runs is not None else None  # a run's file closed off the loop
        if runs_closed is not None:
            poller.register(runs_closed, zmq.POLLIN)
        self._wakes = (wake, runs_closed)
        try:
            while not self._stop.is_set():
                events = poll(poller, self._poll_timeout_ms())
                t_busy = time.perf_counter()
                if self._turn(events):  # a turn that only looked at the GPU is waiting, not host work
                    self.metrics.host_seconds.inc(time.perf_counter() - t_busy)
            self._drain()
        finally:
            self._close()

    def _turn(self, events: dict, read: bool = True, draining: bool = False) -> bool:
        """One turn of the loop: finished batches, closed run files, then (``read``) requests, then dispatch.
        False when it found nothing to do (no socket ready, no batch finished or dispatched)."""
        wake, runs_closed = self._wakes
        moved = self._batches_moved
        if wake is None or wake in events:
            self.engine_thread.poll_results()
            self._collect_results()
        if runs_closed is not None:
            if runs_closed in events:
                self.runs.collect_closed()
            self.runs.close_idle()
        if read and self.socket in events:
            if self.intake is not None:
                self._take_from_intake()
            else:
                handle = self._from_router if self.config.connect else self._handle
                # Take what is there, but bounded, so results and dispatch interleave.
                for _ in range(1000):
                    try:
                        frames = recv_message(self.socket)
                    except zmq.Again:
                        break
                    handle(frames)
        self._maybe_dispatch()
        if self.config.connect:
            self._worker_housekeeping(reconnect=not draining)
        return bool(events) or self._batches_moved != moved

    def flush_ms(self) -> int:
        """How long the client socket may keep sending once closed: after a drain, its last replies are
        still queued in ZeroMQ (closed with no linger they were dropped, and a test caught it); the process
        then ends its context with the same wait (``cli.batch_main``)."""
        return 0 if self._abort.is_set() or self.config.drain_seconds <= 0 else FLUSH_MS

    def _engine_gone(self) -> bool:
        """A --procs front end whose launcher, and with it the shared engine, has ended (lifetime.py sent the
        SIGTERM): nothing would answer its events, so it does not wait for them."""
        return self.config.engine_service is not None and self.config.parent is not None and \
            os.getppid() != self.config.parent  # fmt: skip

    def _drain(self):
        """After stop(): take no new requests, but answer those already accepted (queued, batched or in
        flight) within --drain-seconds, so that a restart (SIGTERM) loses no event that reached this server.

        Listening for clients, the server reads nothing more; its socket stays open, so replies reach the
        clients still connected, and requests that arrive meanwhile stay unread, for the clients' retries.
        A router's worker says LEAVING instead and keeps reading: the router sends it nothing new and
        confirms, and every request that came before the confirmation is answered (a router silent for
        --heartbeat-liveness intervals is not waited for)."""
        worker = bool(self.config.connect)
        if self.config.drain_seconds <= 0 or self._abort.is_set() or self._engine_gone():
            return
        if worker:
            from .router import LEAVING

            self._left = False
            send_message(self.socket, [LEAVING])
        elif not self.by_key:
            return
        else:
            self._poller.unregister(self.socket)
        log.info("stopping: answering the %d event(s) already received first (at most %g s; stop again to skip)",
                 sum(len(reqs) for reqs in self.by_key.values()), self.config.drain_seconds)  # fmt: skip
        deadline = time.monotonic() + self.config.drain_seconds
        while not self._abort.is_set() and not self._engine_gone():
            router_may_send = worker and not self._left and time.monotonic() < self._router_expiry
            if not self.by_key and not router_may_send:
                break
            left_ms = (deadline - time.monotonic()) * 1e3
            if left_ms <= 0:
                break
            self._turn(poll(self._poller, min(self._poll_timeout_ms(), left_ms, 100.0)), read=worker, draining=True)

    def _close(self):
        self.engine_thread.stop()
        if self.engine_thread.results:
            self._collect_results()
        lost = [r.event_id for reqs in self.by_key.values() for r in reqs if r.tag is None]
        if lost:
            log.warning("shutting down with %d event(s) unanswered: %s", len(lost), lost[:20])
        self._close_all_runs()
        self.socket.close(self.flush_ms())
        if self._metrics_server is not None:
            stop_serving(self._metrics_server)

    def _poll_timeout_ms(self) -> float:
        """Milliseconds until the next batch is due (0: now), or a cap when only a message can change that."""
        cap = 100.0 if not self.config.connect else max(1.0, self.config.heartbeat_interval * 500)
        et = self.engine_thread
        due = et.due_ms()  # None unless the loop drives the engine: then it looks at the GPU by then
        if due is not None:
            cap = min(cap, due)
        oldest = self.batcher.queue.oldest_arrival()
        beside = self._lane_free_for_queue()
        if oldest is None or (et.in_flight and not et.pipelined and not beside) or et.in_flight >= et.max_in_flight:
            return cap  # a result wakes the loop
        if self._dispatch_idle and (et.in_flight == 0 or beside):
            return 0.0
        left = oldest + self.config.max_wait_ms / 1e3 - time.monotonic()
        return max(0.0, min(cap, left * 1e3))

    # ------------------------------------------------------------- requests
    def _reply(self, envelope, frames):
        send_message(self.socket, list(envelope) + frames)

    def _handle(self, msg):
        envelope, body = split_envelope(msg)
        if body:
            self._handle_body(envelope, body)

    def _handle_body(self, envelope, body, layout: Layout | None = None):
        header = bytes(body[0])
        if header == P.PHOTONDATA:
            self._handle_photondata(envelope, body, layout)
        elif header == P.PING and len(body) == 1:
            self._reply(envelope, [self._ping])
        elif header == P.DETECTOR_INFO and len(body) == 1:
            self._reply(envelope, self._detector_info)
        elif header == P.RUN_BEGIN and len(body) == 2:
            self._run_begin(envelope, bytes(body[1]))
        elif header == P.RUN_END and len(body) == 1:
            self._run_end(envelope)
        else:
            self.metrics.failed.labels("unknown_request").inc()
            log.info("unknown request header %r (%d frames)", header[:40], len(body))
            self._reply(envelope, [P.UNKNOWN_REQUEST])

    def _layout(self, requested: Layout) -> Layout:
        if self.config.reply_layout == "auto":
            return requested
        return Layout(self.config.reply_layout)

    def _take_from_intake(self):
        """Requests through the compiled intake (--intake compiled): those it checked into its arena go
        straight to :meth:`_accept_photondata`, any other message to :meth:`_handle` as plain frames.
        Bounded like the Python loop (~1000 messages a turn), so results and dispatch interleave."""
        intake = self.intake
        for _ in range(max(1, 1000 // intake.max_requests)):
            taken = intake.take()
            for envelope, pd in taken:
                if pd is None:
                    self._handle(envelope)  # the whole message, envelope included
                else:
                    self._accept_photondata(envelope, pd)
            # Fewer than asked and none held for Python: the socket is empty.
            if len(taken) < intake.max_requests and (not taken or taken[-1][1] is not None):
                break

    def _handle_photondata(self, envelope, body, layout: Layout | None = None):
        """``layout``: the reply layout whatever the request's dialect and --reply-layout (the router's runs)."""
        try:
            pd = P.decode_photondata(body, self.config.max_event_photons)
        except RequestError as exc:
            self._fail(envelope, exc.event_id, exc.reason, "bad_request")
            return
        self._accept_photondata(envelope, pd, layout)

    def _accept_photondata(self, envelope, pd: P.PhotonData, layout: Layout | None = None):
        """A checked request: its run, resend joining, the queue's limits, then the queue."""
        run = self.runs.run_of(envelope) if self.runs is not None else None
        if run is not None and run.error is not None:
            self._fail(envelope, pd.event_id, f"run output unavailable: {run.error}", "run_output")
            return
        # In a run (asynchronous mode) the client is acknowledged only once the event is
        # accepted or joined, so a refused event gets its SIM_FAILED and nothing else.
        route = None if run is not None else Route(envelope, layout or self._layout(pd.layout))
        if pd.n == 0:  # a valid event with no photons has no hits
            self.metrics.events.inc()
            if run is None:
                self._reply(envelope, P.encode_hits(pd.event_id, empty_hits(1).event(0), route.layout))
            else:
                self.runs.write_now(run, pd.event_id, empty_hits(1).event(0))
                self._ack_async(envelope, pd.event_id)
            return
        candidates = self.by_key.get(pd.key)
        if candidates:
            digest = P.payload_digest(pd.rows, pd.flags)
            for same in candidates:
                if same.digest == digest and (same.tag is run):
                    if route is not None:
                        same.route = route  # the newest requester is the one still listening
                    else:
                        self._ack_async(envelope, pd.event_id)
                    self.metrics.duplicates.inc()
                    log.debug("event %d resent: joined the copy already queued or in flight", pd.event_id)
                    return
        if pd.n > self.config.max_queued_photons:
            self._fail(envelope, pd.event_id,
                       f"event has {pd.n} photons, more than --max-queued-photons={self.config.max_queued_photons}",
                       "bad_request")  # fmt: skip
            return
        if self.batcher.queued_photons + pd.n > self.config.max_queued_photons:
            self._fail(envelope, pd.event_id,
                       f"busy: queue full ({self.batcher.queued_photons} photons queued, "
                       f"limit {self.config.max_queued_photons}); retry later", "busy")  # fmt: skip
            return
        req = EventRequest(pd.event_id, pd.n, pd.rows, pd.flags, pd.key, route, time.monotonic(), tag=run)
        if candidates:
            req._digest = digest
        self.by_key.setdefault(pd.key, []).append(req)
        self.batcher.add(req)
        self.metrics.accepted.inc()
        self.metrics.queued_photons.set(self.batcher.queued_photons)
        if run is not None:
            self.runs.accepted(run, req)
            self._ack_async(envelope, pd.event_id)

    def _ack_async(self, envelope, event_id):
        self._reply(envelope, [P.SIM_COMPLETE_ASYNC, P.u32(event_id)])

    def _fail(self, envelope, event_id, reason, label):
        self.metrics.failed.labels(label).inc()
        log.info("event %d failed: %s", event_id, reason)
        self._reply(envelope, P.encode_failed(event_id, reason))

    # ------------------------------------------------------------- batching
    def _maybe_dispatch(self):
        """Dispatch when the engine can take a batch and it is full, or its oldest event waited long enough
        (``--dispatch wait``), or at once when the engine has nothing of this process's (``--dispatch idle``).

        At most one batch waits behind the running one (double buffering): it is
        assembled while the engine runs, but only when full, so that a partial
        batch keeps accepting events until the engine frees up. With --engine-lanes
        L > 1 (CUDA, one process) up to L batches run at once: one that is not full
        starts on a free lane once it is as large as the latest one submitted.
        """
        et = self.engine_thread
        while et.in_flight < et.max_in_flight and self.batcher.queued_photons > 0:
            full = self.batcher.queued_photons >= self.config.max_batch_photons or (
                0 < self.config.max_batch_events <= len(self.batcher.queue)
            )
            oldest = self.batcher.queue.oldest_arrival()
            waited = oldest is not None and time.monotonic() - oldest >= self.config.max_wait_ms / 1e3
            # A shared engine (pipelined) coalesces what every front end sends while it
            # runs, so a front end hands over what waited long enough at once.
            beside = self._lane_free_for_queue()
            due = waited and (et.in_flight == 0 or et.pipelined or beside)
            if not (full or due or (self._dispatch_idle and (et.in_flight == 0 or beside))):
                return
            slots = self.batcher.take()
            buf = self._buffers.pop(0)
            batch = self.batcher.assemble(slots, buf)
            batch.dispatched = time.monotonic()
            if oldest is not None:
                self.metrics.dispatch_wait_seconds.observe(batch.dispatched - oldest)
            et.submit(batch)
            self._batches_moved += 1
            self.metrics.queued_photons.set(self.batcher.queued_photons)

    def _lane_free_for_queue(self) -> bool:
        """With --engine-lanes L > 1 in this process: a lane is free beside the running batches, and the
        queue holds at least as many photons as the latest batch submitted, so it may start at once.

        The size condition is the shared engine's rule (engine_service.py): launching whatever had
        arrived behind a running batch shrank the batches until per-batch host work limited the
        server. Below saturation a lone event is as large as the lone event ahead of it, so it
        starts at once instead of waiting for that one to finish."""
        et = self.engine_thread
        return (0 < et.in_flight < et.lanes
                and min(self.batcher.queued_photons, self.config.max_batch_photons) >= et.last_submitted)  # fmt: skip

    def _collect_results(self):
        et = self.engine_thread
        while et.results:
            res: BatchResult = et.results.popleft()
            et.in_flight -= 1
            self._batches_moved += 1
            self.metrics.engine_roundtrip_seconds.observe(time.monotonic() - res.batch.dispatched)
            self._buffers.append(res.batch.buffer)
            self._demux(res)

    def _demux(self, res: BatchResult):
        # The batch is counted before its replies go out, so that a client that has its reply
        # finds the batch in the metrics too.
        self._record_batch(res)
        for part in res.parts:
            for s, slot in enumerate(part.slots):
                req = slot.request
                if part.hits is None:
                    req.error = part.error
                    req.add_piece(slot.start, slot.count, empty_hits(1).event(0))
                else:
                    req.add_piece(slot.start, slot.count, part.hits.event(s))
                if req.complete:
                    self._finish(req)

    def _record_batch(self, res: BatchResult):
        if self.engine_thread.remote:  # the shared engine records its own (merged) batches
            return
        photons = res.batch.photons.n_photons
        n_hits = sum(int(p.hits.offsets[-1] - p.hits.offsets[0]) for p in res.parts if p.hits is not None)
        m = self.metrics
        m.batches.inc()
        m.photons.inc(photons)
        m.hits.inc(n_hits)
        m.batch_photons.observe(photons)
        m.batch_seconds.observe(res.engine_seconds)
        # Device time where the engine measures it (CUDA events), else the engine thread's wall time.
        m.engine_seconds.inc(res.times.busy if res.times.total > 0 else res.engine_seconds)
        if res.times.total > 0:  # an engine that times its stages (every real one)
            m.engine_compute_seconds.inc(res.times.compute_busy)
        m.batch_photons_max.set(max(photons, m.max_batch_seen))
        m.max_batch_seen = max(photons, m.max_batch_seen)
        log.info(
            "batch: %d events, %d photons, %d hits, engine %.1f ms (%.2f Mphotons/s), queue %d events / %d photons",
            len(res.batch.slots), photons, n_hits, res.engine_seconds * 1e3,
            photons / max(res.engine_seconds, 1e-9) / 1e6, len(self.batcher.queue), self.batcher.queued_photons,
        )  # fmt: skip

    def _finish(self, req: EventRequest):
        same = self.by_key.get(req.key)
        if same is not None:
            same.remove(req)
            if not same:
                del self.by_key[req.key]
        if req.tag is not None:
            self._finish_async(req)
            return
        if req.error is not None:
            self._fail(req.route.envelope, req.event_id, req.error, "engine_error")
            return
        hits: HitBatch = req.hits()
        self.metrics.events.inc()  # counted before the reply leaves, as the batch is
        self._reply(req.route.envelope, P.encode_hits(req.event_id, hits, req.route.layout))
        self.metrics.event_seconds.observe(time.monotonic() - req.arrival)

    # ------------------------------------------------------------ run output
    def _finish_async(self, req: EventRequest):
        self.runs.finished(req.tag, req, req.event_id, None if req.error else req.hits(), req.error)
        if req.error is None:
            self.metrics.events.inc()

    def _run_begin(self, envelope, filename: bytes):
        if self.runs is None:
            self._reply(envelope, [P.ACK])
            return
        self.runs.begin(envelope, filename)

    def _run_end(self, envelope):
        if self.runs is None:
            self._reply(envelope, [P.ACK])
            return
        reason = self.runs.end(envelope)
        if reason is not None:
            self._fail(envelope, P.UNKNOWN_EVENT, reason, "run_output")

    def _close_all_runs(self):
        """Server stop: keep what was written readable and say which events were lost."""
        if self.runs is not None:
            self.runs.close_all(lambda run: [r.event_id for r in run.pending])


def run_in_thread(config: ServerConfig, **kw) -> tuple[BatchServer, threading.Thread]:
    """Start a server on a background thread (tests, benchmarks); waits until it listens."""
    server = BatchServer(config, **kw)
    errors = []

    def target():
        try:
            server.serve_forever()
        except BaseException as exc:  # surfaced to the caller below
            errors.append(exc)
            server.started.set()
            raise

    th = threading.Thread(target=target, name="charon-server", daemon=True)
    th.start()
    server.started.wait(120)
    if errors:
        raise errors[0]
    return server, th


def default_log_config(level: str):
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
