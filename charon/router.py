"""charon-router: many batching workers (one per GPU, any host) behind one client address.

Worker protocol on the backend (worker DEALER -> router ROUTER), extending
ChAR0N's Paranoid Pirate (1-byte READY/HEARTBEAT, liveness in intervals)::

    worker -> router  [READY b"\\x01", credit u32, detector fingerprint, x f32[C], y f32[C], z f32[C], type i32[C]]
                      [HEARTBEAT b"\\x02"]
                      [REPLY b"\\x05", request_id u64, *reply frames]
                      [LEAVING b"\\x08"]                        (stopping: send nothing new)
    router -> worker  [HEARTBEAT b"\\x02"]
                      [LEAVING b"\\x08"]                        (understood: every request sent came before)
                      [REQUEST b"\\x04", request_id u64, *client request frames]
                      [REQUEST_FULL b"\\x07", request_id u64, *client request frames]  (reply in the full layout)
                      [REFUSED b"\\x06", reason utf-8]          (detector differs from the first worker's)

Dispatch is by capacity, not by idleness: each worker advertises a credit (the
photons it can hold: a running batch plus a full one queued behind it) and the
router keeps every worker's outstanding photons up to its credit, choosing the
least loaded, so each worker still forms full batches. The router keeps a copy
of every request in flight; when a worker stops heartbeating, its requests go
to other workers (or wait for one), and a late reply from the dead worker is
dropped because its request id is no longer outstanding. A worker that is being
stopped (SIGTERM) says LEAVING: the router sends it nothing new and confirms,
the worker answers every request that came before the confirmation, and then
exits, so a rolling restart of the workers re-sends nothing and loses nothing.

Server-side run output (``--output-dir``, ChAR0N's asynchronous mode) is the
router's: it is where every reply of a client's run arrives, whichever worker
simulated the event. A PHOTONDATA inside a run is checked here, answered
``SIM_COMPLETE_ASYNC`` at once and sent as REQUEST_FULL; the worker's full hits
are written to the run's file (``charon.run_output``) instead of going back.

One router's Python loop forwards ~10k events/s of 1000 photons. ``charon-router
--procs R`` (``cli._routers_main``) runs R of these, each a whole router, on one
client port (``SO_REUSEPORT``; ``accept="reuseport"`` here), router k on
backend port + k; a worker host's front ends spread over all of them
(``charon-batch --connect`` with the R backends).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import zmq

from . import protocol as P
from .metrics import RouterMetrics, stop_serving
from .photons import empty_hits
from .protocol import RequestError
from .run_output import Run, RunBook, RunOutputError
from .server import split_envelope
from .sockets import recv_message, send_message

log = logging.getLogger("charon.router")

READY = b"\x01"
HEARTBEAT = b"\x02"
REQUEST = b"\x04"
REPLY = b"\x05"
REFUSED = b"\x06"
REQUEST_FULL = b"\x07"
LEAVING = b"\x08"


@dataclass
class RouterConfig:
    """Settings of charon-router; each field is the CLI flag of the same name."""

    frontend: str = "tcp://*:5555"
    backend: str = "tcp://*:6667"
    heartbeat_interval: float = 1.0
    heartbeat_liveness: int = 3
    ping_reply: str = "PONG"
    hold_seconds: float = 60.0
    output_dir: str | None = None
    output_basket_events: int = 1000
    output_idle_seconds: float = 3600.0
    max_event_photons: int = 50_000_000
    io_threads: int = 0
    procs: int = 1
    metrics_port: int | None = None
    drain_seconds: float = 10.0
    log_level: str = "INFO"
    accept: str = "bind"
    parent: int | None = None

    def validate(self) -> None:
        import os

        if self.io_threads < 0:
            raise ValueError("--io-threads must be >= 0")
        if self.procs < 1:
            raise ValueError("--procs must be >= 1")
        if self.drain_seconds < 0:
            raise ValueError("--drain-seconds must be >= 0")
        if self.accept not in ("bind", "reuseport"):
            raise ValueError("--accept must be bind or reuseport")
        if self.procs > 1 or self.accept == "reuseport":
            from .reuseport import AVAILABLE, parse_tcp

            if not AVAILABLE:
                raise ValueError("several routers on one port need SO_REUSEPORT (Linux): use --procs 1")
            parse_tcp(self.frontend)  # ValueError naming the problem
        if self.procs > 1:
            from .reuseport import parse_tcp

            try:
                _, port = parse_tcp(self.backend)
            except ValueError as exc:
                raise ValueError(f"--backend with --procs: {exc}") from None
            if port == 0 or port + self.procs - 1 > 65535:
                raise ValueError(f"--backend with --procs {self.procs} needs an explicit port with the next "
                                 f"{self.procs - 1} free above it (router k takes workers on port + k), got "
                                 f"{self.backend!r}")  # fmt: skip
        if self.output_dir is not None and not os.path.isdir(self.output_dir):
            raise ValueError(f"--output-dir {self.output_dir!r} is not a directory")
        if self.output_basket_events < 1 or self.max_event_photons < 1:
            raise ValueError("--output-basket-events and --max-event-photons must be >= 1")
        if self.output_idle_seconds < 0:
            raise ValueError("--output-idle-seconds must be >= 0 (0: never close a silent client's run)")


@dataclass(eq=False)
class Worker:
    identity: bytes
    credit: int  # photons it can hold
    outstanding: int = 0  # photons dispatched and not answered
    expiry: float = 0.0
    requests: set = field(default_factory=set)  # request ids in flight there
    leaving: bool = False  # said LEAVING: takes nothing new, answers what it has

    @property
    def room(self) -> int:
        return self.credit - self.outstanding


@dataclass(eq=False)
class Pending:
    rid: int
    envelope: list  # client routing frames
    body: list  # the client's request frames (kept to re-send if the worker dies)
    photons: int
    key: tuple | None
    arrival: float
    worker: Worker | None = None
    run: Run | None = None  # the client's open run: the reply is written there, not sent back
    event_id: int = P.UNKNOWN_EVENT


class Router:
    def __init__(self, config: RouterConfig, context: zmq.Context | None = None):
        config.validate()
        self.config = config
        # Every photon crosses the router twice (client to router, router to worker), on its
        # context's I/O threads; a context of its own when more than the shared one's single thread is asked.
        self._own_ctx = context is None and config.io_threads > 0
        self.ctx = context or (zmq.Context(io_threads=config.io_threads) if self._own_ctx else zmq.Context.instance())
        self.workers: dict[bytes, Worker] = {}
        self.inflight: dict[int, Pending] = {}
        self.waiting: collections.deque[Pending] = collections.deque()  # no worker had room
        self.by_key: dict[tuple, Pending] = {}
        self.detector_info: list | None = None
        self.digest: bytes | None = None
        self.duplicates = 0
        self.reassigned = 0
        self._next_rid = 1
        self._stop = threading.Event()
        self._abort = threading.Event()  # a second stop(): skip the drain
        self.started = threading.Event()
        self.frontend_address = None
        self.backend_address = None
        self._ping = P.PONG if config.ping_reply == "PONG" else P.ACK
        self.metrics = RouterMetrics(lambda: len(self.inflight), lambda: len(self.waiting), lambda: len(self.workers))
        self.runs = RunBook(config.output_dir, config.output_basket_events, self._to_client, self._channels,
                            config.output_idle_seconds, self.metrics.runs_closed_idle.inc) \
            if config.output_dir else None  # fmt: skip
        if self.runs is not None:
            P.warm_up()  # runs' events are checked here: compile the check before the first one waits for numba

    def stop(self):
        """Stop taking requests; replies to those already taken are passed on first (``--drain-seconds``).
        A second call stops at once."""
        if self._stop.is_set():
            self._abort.set()
        self._stop.set()

    def _bind(self, sock, addr):
        if addr.endswith(":0"):
            base = addr[: addr.rfind(":")]
            port = sock.bind_to_random_port(base)
            return base.replace("*", "127.0.0.1") + f":{port}"
        sock.bind(addr)
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def serve_forever(self):
        fe = self.frontend = self.ctx.socket(zmq.ROUTER)
        be = self.backend = self.ctx.socket(zmq.ROUTER)
        for s in (fe, be):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 0)
            s.setsockopt(zmq.RCVHWM, 0)
        metrics_server = None
        try:
            if self.config.accept == "reuseport":  # one of charon-router --procs N: the launcher reserved the port
                from .reuseport import bind_shared

                self.frontend_address = bind_shared(fe, self.config.frontend)
            else:
                self.frontend_address = self._bind(fe, self.config.frontend)
            self.backend_address = self._bind(be, self.config.backend)
            metrics_server = self.metrics.serve(self.config.metrics_port) if self.config.metrics_port is not None \
                else None  # fmt: skip
            log.info("charon-router: clients on %s, workers on %s", self.frontend_address, self.backend_address)
            self.started.set()
            poller = zmq.Poller()
            poller.register(fe, zmq.POLLIN)
            poller.register(be, zmq.POLLIN)
            runs_closed = self.runs.wake_fd if self.runs is not None else None  # a run's file closed off the loop
            if runs_closed is not None:
                poller.register(runs_closed, zmq.POLLIN)
            self._runs_closed, self._next_beat = runs_closed, time.monotonic()
            while not self._stop.is_set():
                events = dict(poller.poll(max(1, int(min(self.config.heartbeat_interval, 0.1) * 1000))))
                t_busy = time.perf_counter()
                self._turn(events)
                self.metrics.host_seconds.inc(time.perf_counter() - t_busy)
            self._drain(poller)
        finally:
            if metrics_server is not None:
                stop_serving(metrics_server)
            if self.runs is not None:
                self.runs.close_all(lambda run: [p.event_id for p in run.pending])
            linger = self.flush_ms()
            fe.close(linger)
            be.close(linger)
            if self._own_ctx:
                self.ctx.term()

    def flush_ms(self) -> int:
        """How long the sockets may keep sending once closed: the replies passed on last (see the server's)."""
        from .server import FLUSH_MS

        return 0 if self._abort.is_set() or self.config.drain_seconds <= 0 else FLUSH_MS

    def _turn(self, events: dict, read_clients: bool = True):
        """One turn of the loop: closed run files, workers' messages, (``read_clients``) clients' requests,
        heartbeats, expiry of silent workers, and requests waiting for room."""
        fe, be = self.frontend, self.backend
        if self._runs_closed is not None:
            if self._runs_closed in events:
                self.runs.collect_closed()
            self.runs.close_idle()
        if be in events:
            for _ in range(1000):
                try:
                    self._from_worker(recv_message(be))
                except zmq.Again:
                    break
        if read_clients and fe in events:
            for _ in range(1000):
                try:
                    self._from_client(recv_message(fe))
                except zmq.Again:
                    break
        now = time.monotonic()
        if now >= self._next_beat:
            for w in list(self.workers.values()):
                send_message(be, [w.identity, HEARTBEAT])
            self._next_beat = now + self.config.heartbeat_interval
        self._expire(now)
        self._dispatch_waiting()

    def _drain(self, poller):
        """After stop(): read no more client requests, but pass on the replies to those already taken (at
        workers or waiting for one) within --drain-seconds, so that restarting the router loses none."""
        if self.config.drain_seconds <= 0 or self._abort.is_set() or not (self.inflight or self.waiting):
            return
        log.info("stopping: passing on the replies to %d request(s) first (at most %g s; stop again to skip)",
                 len(self.inflight) + len(self.waiting), self.config.drain_seconds)  # fmt: skip
        poller.unregister(self.frontend)
        deadline = time.monotonic() + self.config.drain_seconds
        while (self.inflight or self.waiting) and not self._abort.is_set():
            left_ms = (deadline - time.monotonic()) * 1e3
            if left_ms <= 0:
                log.warning("stopping with %d request(s) unanswered", len(self.inflight) + len(self.waiting))
                break
            self._turn(dict(poller.poll(max(1, int(min(left_ms, 100))))), read_clients=False)

    def _no_workers(self, envelope):
        self.metrics.no_workers.inc()
        send_message(self.frontend, envelope + [P.NO_WORKERS])

    def _to_client(self, envelope, frames):
        send_message(self.frontend, list(envelope) + frames)

    def _channels(self):
        """Channel positions [C, 3] float32 (mm) and types [C] int32, from the first worker's READY."""
        if self.detector_info is None:
            raise RunOutputError("no worker has registered yet, so the detector is not known; begin the run "
                                 "once DETECTOR_INFO is answered")  # fmt: skip
        x, y, z = (np.frombuffer(f, "<f4") for f in self.detector_info[1:4])
        return np.stack([x, y, z], axis=1), np.frombuffer(self.detector_info[4], "<i4")

    # ---------------------------------------------------------------- clients
    def _from_client(self, msg):
        envelope, body = split_envelope(msg)
        if not body:
            return
        header = bytes(body[0])
        if header == P.PING and len(body) == 1:
            send_message(self.frontend, envelope + [self._ping])
        elif header == P.DETECTOR_INFO and len(body) == 1:
            if self.detector_info is None:
                self._no_workers(envelope)
            else:
                send_message(self.frontend, envelope + self.detector_info)
        elif self.runs is not None and header == P.RUN_BEGIN and len(body) == 2:
            self.runs.begin(envelope, bytes(body[1]))
        elif self.runs is not None and header == P.RUN_END and len(body) == 1:
            reason = self.runs.end(envelope)
            if reason is not None:
                self._to_client(envelope, P.encode_failed(P.UNKNOWN_EVENT, reason))
        elif header in (P.RUN_BEGIN, P.RUN_END):  # no --output-dir: hits go back to the client, as without a run
            send_message(self.frontend, envelope + [P.ACK])
        elif header == P.PHOTONDATA:
            self._photondata(envelope, body)
        else:
            send_message(self.frontend, envelope + [P.UNKNOWN_REQUEST])

    def _photondata(self, envelope, body):
        run = self.runs.run_of(envelope) if self.runs is not None else None
        if not self.workers:
            self._no_workers(envelope)
            return
        if run is not None:
            self._run_photondata(envelope, body, run)
            return
        meta = bytes(body[1]) if len(body) > 1 else b""
        key = None
        photons = 0
        if len(meta) == 8:
            eid, photons = P.META.unpack(meta)
            key = (eid, photons, len(body))
            same = self.by_key.get(key)
            # Payload bytes are compared only on such a collision (a likely Lazy-Pirate resend).
            if same is not None and same.run is None and _same_payload(same.body, body):
                same.envelope = envelope  # the newest requester gets the reply
                self.duplicates += 1
                self.metrics.duplicates.inc()
                return
        p = Pending(self._next_rid, envelope, body, photons, key, time.monotonic())
        self._next_rid += 1
        self.metrics.events.inc()
        if key is not None:
            self.by_key[key] = p
        self._assign(p)

    def _run_photondata(self, envelope, body, run: Run):
        """An event of a run: checked here, since the client is answered before any worker sees it."""
        try:
            pd = P.decode_photondata(body, self.config.max_event_photons)
        except RequestError as exc:
            self._to_client(envelope, P.encode_failed(exc.event_id, exc.reason))
            return
        if run.error is not None:
            self._to_client(envelope, P.encode_failed(pd.event_id, f"run output unavailable: {run.error}"))
            return
        ack = [P.SIM_COMPLETE_ASYNC, P.u32(pd.event_id)]
        if pd.n == 0:
            self.runs.write_now(run, pd.event_id, empty_hits(1).event(0))
            self._to_client(envelope, ack)
            return
        key = (pd.event_id, pd.n, len(body))
        same = self.by_key.get(key)
        if same is not None and same.run is run and _same_payload(same.body, body):
            self.duplicates += 1  # resent within the run: written once, acknowledged again
            self.metrics.duplicates.inc()
            self._to_client(envelope, ack)
            return
        p = Pending(self._next_rid, envelope, body, pd.n, key, time.monotonic(), run=run, event_id=pd.event_id)
        self._next_rid += 1
        self.metrics.events.inc()
        self.by_key[key] = p
        self.runs.accepted(run, p)
        self._assign(p)
        self._to_client(envelope, ack)

    def _pick(self, photons: int) -> Worker | None:
        """The least-loaded worker with room for ``photons``; a worker holding nothing takes any size."""
        best = max((w for w in self.workers.values() if not w.leaving), key=lambda w: w.room, default=None)
        if best is not None and (best.room >= photons or best.outstanding == 0):
            return best
        return None

    def _assign(self, p: Pending):
        """Send to the least-loaded worker with room, else queue (FIFO) until one has room."""
        w = self._pick(p.photons)
        if w is None:
            p.worker = None
            self.waiting.append(p)
        else:
            self._send(p, w)

    def _send(self, p: Pending, w: Worker):
        p.worker = w
        w.outstanding += p.photons
        w.requests.add(p.rid)
        self.inflight[p.rid] = p
        kind = REQUEST if p.run is None else REQUEST_FULL
        send_message(self.backend, [w.identity, kind, p.rid.to_bytes(8, "little"), *p.body])

    def _dispatch_waiting(self):
        now = time.monotonic()
        while self.waiting:
            p = self.waiting[0]
            if not self.workers:
                if now - p.arrival <= self.config.hold_seconds:
                    return
                self.waiting.popleft()
                self._drop_key(p)
                if p.run is not None:  # already acknowledged: the run loses it, and says so when it ends
                    self.runs.finished(p.run, p, p.event_id, None, f"no worker within {self.config.hold_seconds} s")
                else:
                    self._no_workers(p.envelope)
                continue
            w = self._pick(p.photons)
            if w is None:  # nobody has room yet: keep FIFO order
                return
            self.waiting.popleft()
            self._send(p, w)

    def _drop_key(self, p: Pending):
        if p.key is not None and self.by_key.get(p.key) is p:
            del self.by_key[p.key]

    # ---------------------------------------------------------------- workers
    def _from_worker(self, msg):
        identity, kind = bytes(msg[0]), bytes(msg[1]) if len(msg) > 1 else b""
        w = self.workers.get(identity)
        if kind == READY:
            self._register(identity, msg[2:])
            return
        if w is None:
            if kind == REPLY:
                log.debug("reply from unregistered worker %r dropped", identity)
            elif kind == HEARTBEAT:  # a worker the router forgot (router restart): ask it to re-register
                send_message(self.backend, [identity, REFUSED, b"unknown worker: send READY"])
            return
        w.expiry = time.monotonic() + self.config.heartbeat_interval * self.config.heartbeat_liveness
        if kind == LEAVING:
            w.leaving = True
            send_message(self.backend, [identity, LEAVING])  # after every request sent to it
            log.info("worker %r leaving: %d request(s) to answer, nothing new", identity, len(w.requests))
            return
        if kind == REPLY:
            rid = int.from_bytes(bytes(msg[2]), "little")
            p = self.inflight.get(rid)
            if p is None or p.worker is not w:
                log.info("late or duplicate reply for request %d from %r dropped", rid, identity)
                return
            del self.inflight[rid]
            self.metrics.replies.inc()
            w.requests.discard(rid)
            w.outstanding -= p.photons
            self._drop_key(p)
            if p.run is not None:
                self._write_reply(p, msg[3:])
            else:
                send_message(self.frontend, p.envelope + list(msg[3:]))

    def _write_reply(self, p: Pending, frames):
        """A worker's answer to an event of a run: its hits go to the run's file."""
        kind = bytes(frames[0]) if frames else b""
        if kind == P.SIM_COMPLETE:
            try:
                hits = P.decode_full_hits(frames)
            except ValueError as exc:
                self.runs.finished(p.run, p, p.event_id, None, f"unreadable worker reply: {exc}")
                return
            self.runs.finished(p.run, p, p.event_id, hits)
            return
        reason = bytes(frames[2]).decode("utf-8", "replace") if kind == P.SIM_FAILED and len(frames) > 2 else \
            f"worker answered {kind[:40]!r}"  # fmt: skip
        self.runs.finished(p.run, p, p.event_id, None, reason)

    def _register(self, identity: bytes, frames):
        credit = int(np.frombuffer(bytes(frames[0]), "<u4")[0])
        digest = bytes(frames[1])
        info = [P.DETECTOR_INFO] + [bytes(f) for f in frames[2:6]]
        if self.digest is None:
            self.digest, self.detector_info = digest, info
        elif digest != self.digest:
            log.warning("worker %r refused: its detector differs from the first worker's", identity)
            send_message(self.backend, [identity, REFUSED, b"detector differs from the router's (first worker's)"])
            return
        w = self.workers.get(identity)
        if w is None:
            w = self.workers[identity] = Worker(identity, credit)
            log.info("worker %r ready: credit %d photons (%d workers)", identity, credit, len(self.workers))
        w.credit = credit
        w.expiry = time.monotonic() + self.config.heartbeat_interval * self.config.heartbeat_liveness

    def _expire(self, now: float):
        for w in [w for w in self.workers.values() if w.expiry < now]:
            del self.workers[w.identity]
            lost = [self.inflight.pop(rid) for rid in sorted(w.requests) if rid in self.inflight]
            log.warning("worker %r silent for %d heartbeats: removed; re-sending its %d request(s)",
                        w.identity, self.config.heartbeat_liveness, len(lost))  # fmt: skip
            self.reassigned += len(lost)
            self.metrics.reassigned.inc(len(lost))
            for p in lost:
                p.worker = None
            self.waiting.extendleft(reversed(lost))  # oldest first, ahead of newer requests


def _same_payload(a: list, b: list) -> bool:
    """Byte equality of two requests' photon frames (only called for equal event id and count)."""
    return all(bytes(x) == bytes(y) for x, y in zip(a[2:], b[2:]))


def run_router_in_thread(config: RouterConfig, **kw) -> tuple[Router, threading.Thread]:
    r = Router(config, **kw)
    th = threading.Thread(target=r.serve_forever, name="charon-router", daemon=True)
    th.start()
    r.started.wait(30)
    return r, th
