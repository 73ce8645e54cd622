"""Python clients of the ChAR0N protocol, used by the tests and the benchmarks.

* :class:`ReqClient`: blocking ``REQ`` with Lazy-Pirate retries, as ratpac-two does
  (poll with a timeout; on silence close the socket, open a new one, resend).
* :class:`DealerClient`: one ``DEALER`` with many events in flight, replies in
  completion order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zmq

from . import protocol as P
from .photons import N_ROWS


def photondata_frames(event_id: int, table: np.ndarray, flags: np.ndarray | None = None) -> list:
    """A PHOTONDATA request: 13 frames (dialect A) or 14 with ``flags`` (dialect B)."""
    table = np.asarray(table, dtype="<f4")
    if table.shape[0] != N_ROWS:
        raise ValueError(f"photon table must have {N_ROWS} rows")
    n = table.shape[1]
    frames = [P.PHOTONDATA, np.array([event_id, n], dtype="<u4").tobytes()]
    frames += [np.ascontiguousarray(table[r]).tobytes() for r in range(N_ROWS)]
    if flags is not None:
        frames.append(np.asarray(flags, dtype="<u4").tobytes())
    return frames


@dataclass
class Reply:
    kind: bytes  # SIM_COMPLETE, SIM_FAILED, ...
    event_id: int | None
    hits: dict | None  # name -> array (channel, time, wavelength, [dx.., flags])
    reason: str | None = None
    frames: list | None = None


def decode_reply(frames: list) -> Reply:
    frames = [bytes(f) for f in frames]
    kind = frames[0]
    eid = int(np.frombuffer(frames[1], "<u4")[0]) if len(frames) > 1 and len(frames[1]) == 4 else None
    if kind == P.SIM_COMPLETE and len(frames) == 5:
        hits = dict(channel=np.frombuffer(frames[2], "<u4"), time=np.frombuffer(frames[3], "<f4"),
                    wavelength=np.frombuffer(frames[4], "<f4"))  # fmt: skip
        return Reply(kind, eid, hits, frames=frames)
    if kind == P.SIM_COMPLETE and len(frames) == 12:
        names = ("dx", "dy", "dz", "polx", "poly", "polz", "wavelength", "time")
        hits = dict(channel=np.frombuffer(frames[2], "<u4"), flags=np.frombuffer(frames[11], "<u4"))
        hits.update({k: np.frombuffer(f, "<f4") for k, f in zip(names, frames[3:11])})
        return Reply(kind, eid, hits, frames=frames)
    if kind == P.SIM_FAILED:
        return Reply(kind, eid, None, frames[2].decode("utf-8", "replace") if len(frames) > 2 else None, frames)
    return Reply(kind, eid, None, frames=frames)


class ReqClient:
    """Lazy-Pirate REQ client: the ratpac-two behaviour, retries included."""

    def __init__(self, address: str, timeout_ms: int = 2500, retries: int = 3, context: zmq.Context | None = None):
        self.address = address
        self.timeout_ms = timeout_ms
        self.retries = retries
        self.ctx = context or zmq.Context.instance()
        self.resends = 0
        self._sock = None
        self._connect()

    def _connect(self):
        if self._sock is not None:
            self._sock.close(0)
        self._sock = self.ctx.socket(zmq.REQ)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.address)

    def request(self, frames: list) -> list:
        """Send and wait; on timeout reopen and resend, up to ``retries`` times. Raises TimeoutError."""
        for attempt in range(self.retries + 1):
            if attempt:
                self.resends += 1
                self._connect()
            self._sock.send_multipart(frames)
            if self._sock.poll(self.timeout_ms, zmq.POLLIN):
                return self._sock.recv_multipart()
        self._connect()
        raise TimeoutError(f"no reply from {self.address} after {self.retries} retries")

    def ping(self) -> bytes:
        return self.request([P.PING])[0]

    def detector_info(self):
        f = self.request([P.DETECTOR_INFO])
        pos = np.stack([np.frombuffer(f[i], "<f4") for i in (1, 2, 3)], axis=1)
        return pos, np.frombuffer(f[4], "<i4")

    def simulate(self, event_id: int, table: np.ndarray, flags: np.ndarray | None = None) -> Reply:
        return decode_reply(self.request(photondata_frames(event_id, table, flags)))

    def close(self):
        self._sock.close(0)


class DealerClient:
    """Many events in flight on one DEALER; send an empty delimiter like REQ so any server accepts it."""

    def __init__(self, address: str, context: zmq.Context | None = None):
        self.ctx = context or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def send(self, frames: list) -> None:
        self.sock.send_multipart([b""] + list(frames))

    def submit(self, event_id: int, table: np.ndarray, flags: np.ndarray | None = None) -> None:
        self.send(photondata_frames(event_id, table, flags))

    def recv(self, timeout_ms: int = 10_000) -> Reply:
        if not self.sock.poll(timeout_ms, zmq.POLLIN):
            raise TimeoutError(f"no reply within {timeout_ms} ms")
        frames = self.sock.recv_multipart()
        if frames and frames[0] == b"":
            frames = frames[1:]
        return decode_reply(frames)

    def close(self):
        self.sock.close(0)
