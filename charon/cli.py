"""Command-line entry points. Flags are generated from the component config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys

from .server import BatchServer, ServerConfig, default_log_config

HELP = {
    "bind": "ZeroMQ address to listen on (ROUTER); port 0 picks a free port",
    "detector": "built-in detector name (demo, large, sphere), a charon .npz detector file, or an STL/mesh file",
    "engine": "propagation engine: auto (CUDA when a GPU is usable, else CPU), cpu, cuda or chroma",
    "seed": "run seed; every photon's random stream is a function of (seed, event id, photon index)",
    "max_batch_photons": "photons per engine call (accepts 5e6); larger events are split across batches",
    "max_batch_events": "events per engine call at most (0: no limit; 1 serves one event per call, as ChAR0N)",
    "max_wait_ms": "longest the oldest queued event waits for a batch to fill while the engine is idle; "
    "while the engine is busy, events accumulate for the next batch anyway (continuous batching), "
    "so a short wait suffices",
    "max_queued_photons": "backpressure: photons allowed to wait; beyond it requests get a 'busy' SIM_FAILED",
    "max_event_photons": "largest event accepted; larger requests get SIM_FAILED",
    "max_steps": "propagation steps per photon before it is abandoned (Chroma's max_steps)",
    "ping_reply": "reply to PING: PONG (ratpac-two, seed text) or ACK (ChAR0N client branch)",
    "reply_layout": "auto (13-frame request -> compact, 14-frame -> full), compact or full",
    "queue_policy": "queue policy for choosing the next events to batch",
    "metrics_port": "serve Prometheus metrics over HTTP on this port (off when not given)",
    "output_dir": "directory for server-side run output: PHOTONDATA between RUN_BEGIN and RUN_END is "
    "answered SIM_COMPLETE_ASYNC and its hits go to DIR/<name>.charon.ntuple.root (off when not given)",
    "output_basket_events": "events per ROOT basket written with --output-dir",
    "log_level": "logging level (DEBUG, INFO, WARNING, ERROR)",
    "device": "CUDA device ordinal for --engine cuda",
}
CHOICES = {
    "engine": ("auto", "cpu", "cuda", "chroma"),
    "ping_reply": ("PONG", "ACK"),
    "reply_layout": ("auto", "compact", "full"),
    "queue_policy": ("fcfs",),
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
        typ = {int: count, float: float, str: str}.get(type(default), count if "port" in f.name else str)
        parser.add_argument(flag, dest=f.name, type=typ, default=default, choices=choices.get(f.name),
                            help=f"{help_text.get(f.name, '')} (default: {default})")  # fmt: skip


def config_from_args(cls, args):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def batch_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="charon-batch",
        description="Batching optical-photon server, wire-compatible with ChAR0N clients (ratpac-two).",
    )
    add_dataclass_flags(p, ServerConfig, HELP, CHOICES)
    return p


def batch_main(argv=None) -> int:
    args = batch_parser().parse_args(argv)
    config = config_from_args(ServerConfig, args)
    default_log_config(config.log_level)
    try:
        server = BatchServer(config)
    except Exception as exc:
        logging.getLogger("charon").error("cannot start: %s", exc)
        return 2

    def _stop(signum, frame):
        logging.getLogger("charon").info("signal %d: stopping", signum)
        server.stop()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever()
    except Exception as exc:
        logging.getLogger("charon").error("server failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(batch_main())
