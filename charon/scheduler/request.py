"""One event's life in the scheduler: queued, dispatched in one or more pieces, done."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..photons import HitBatch
from ..protocol import Layout, payload_digest


@dataclass
class Route:
    """Where a reply goes: the ROUTER envelope of the requester and the layout it expects."""

    envelope: list  # routing frames, up to and including the empty delimiter
    layout: Layout


@dataclass(eq=False)
class EventRequest:
    event_id: int
    n: int
    rows: list  # 11 float32 [n] arrays, zero-copy views of the request frames
    flags: np.ndarray | None  # [n] uint32 or None (dialect A: zeros)
    key: tuple  # (event_id, n): resend candidates; the payload digest decides
    route: Route  # newest requester: a Lazy-Pirate retry replaces it
    arrival: float  # time.monotonic() at receipt
    dispatched: int = 0  # photons handed to batches so far
    done_photons: int = 0  # photons whose piece has come back
    pieces: dict = field(default_factory=dict)  # first photon index -> HitBatch of that piece
    error: str | None = None
    tag: object = None  # opaque owner data (e.g. the run an async event belongs to)
    _digest: int | None = None

    @property
    def digest(self) -> int:
        if self._digest is None:
            self._digest = payload_digest(self.rows, self.flags)
        return self._digest

    @property
    def complete(self) -> bool:
        return self.done_photons >= self.n

    def add_piece(self, start: int, count: int, hits: HitBatch) -> None:
        self.pieces[start] = hits
        self.done_photons += count

    def hits(self) -> HitBatch:
        """All pieces joined in photon order."""
        return HitBatch.concat([self.pieces[k] for k in sorted(self.pieces)])
