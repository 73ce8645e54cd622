"""In-memory layout of photons and hits, and the history flags.

Photons of a batch live in one float32 table ``[N_ROWS, n]`` (structure of
arrays: one row per wire frame), so that decoding a request is one copy per
frame into a row slice, the GPU copy-in is one contiguous transfer, and hits
are gathered with a single fancy index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

# Rows of the photon table, in PHOTONDATA frame order (frames 2..12).
X, Y, Z, DX, DY, DZ, PX, PY, PZ, WAVELENGTH, TIME = range(11)
N_ROWS = 11
ROW_NAMES = ("x", "y", "z", "dx", "dy", "dz", "polx", "poly", "polz", "wavelength", "t")
# Hit rows are photon rows DX..TIME: what the full reply carries besides channel and flags.
HIT_ROWS = slice(DX, TIME + 1)
H_DX, H_DY, H_DZ, H_PX, H_PY, H_PZ, H_WAVELENGTH, H_TIME = range(8)

# History flags (bit values as in Chroma).
NO_HIT = 0x1
BULK_ABSORB = 0x2
SURFACE_DETECT = 0x4
SURFACE_ABSORB = 0x8
RAYLEIGH_SCATTER = 0x10
REFLECT_DIFFUSE = 0x20
REFLECT_SPECULAR = 0x40
SURFACE_REEMIT = 0x80
SURFACE_TRANSMIT = 0x100
BULK_REEMIT = 0x200
CHERENKOV = 0x400
SCINTILLATION = 0x800
NAN_ABORT = 0x80000000


def split_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(table [N_ROWS, k] float32, flags [k] uint32) views of a block of N_ROWS + 1 rows whose last
    row holds the flags' bits (scheduler/batcher.py HostBuffer, PhotonBatch.rows, Piece.rows)."""
    return rows[:N_ROWS], rows[N_ROWS].view(np.uint32)


class Piece(NamedTuple):
    """A column range of a merged batch, where its photons really are (PhotonBatch.pieces)."""

    first: int  # first column of the merged batch
    rows: np.ndarray  # [N_ROWS + 1, k] float32 view: the table's rows, then the flags' bits (PhotonBatch.rows)

    @property
    def table(self) -> np.ndarray:  # [N_ROWS, k] float32
        return split_rows(self.rows)[0]

    @property
    def flags(self) -> np.ndarray:  # [k] uint32
        return split_rows(self.rows)[1]


@dataclass
class PhotonBatch:
    """Photons of many events, grouped contiguously by event slot (awkward-style offsets).

    The RNG stream of photon ``i`` is keyed by ``(seed, event_id[s], first_index[s] + i - offsets[s])``
    with ``s = slot[i]``: an event split across batches keeps its photon numbering.
    """

    table: np.ndarray  # [N_ROWS, n] float32: x,y,z mm; dx,dy,dz; polx,poly,polz; wavelength nm; t ns
    flags: np.ndarray  # [n] uint32, history flags (client's CHERENKOV/SCINTILLATION bits kept)
    slot: np.ndarray  # [n] int32, event slot of each photon
    offsets: np.ndarray  # [E+1] int64, photons of slot s are offsets[s]:offsets[s+1]
    event_id: np.ndarray  # [E] uint32, RNG key per slot
    first_index: np.ndarray  # [E] uint32, index within its event of the slot's first photon
    # The shared engine's merged batch for an engine that gathers (CUDA): where each column range
    # of the table really is (a list of Piece), so that photons in front ends' shared memory go
    # to the device without a host copy.
    # Such a batch's ``slot`` is empty: that engine numbers slots from ``offsets`` itself.
    pieces: list | None = None
    # [N_ROWS + 1, n] float32 when table and flags lie in one block of equal-stride rows (the
    # flags' bits as the last row: scheduler/batcher.py HostBuffer), else None. An engine copies
    # it to the device in one go.
    rows: np.ndarray | None = None

    @property
    def n_photons(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_events(self) -> int:
        return int(self.event_id.shape[0])

    def slot_range(self, a: int, b: int) -> "PhotonBatch":
        """Slots ``a:b`` as a batch of their own (copies: an engine may overwrite its input)."""
        lo, hi = int(self.offsets[a]), int(self.offsets[b])
        counts = np.diff(self.offsets[a : b + 1])
        return PhotonBatch(
            table=np.array(self.table[:, lo:hi], order="C"),  # always a copy, even of a whole contiguous table
            flags=self.flags[lo:hi].copy(),
            slot=np.repeat(np.arange(b - a, dtype=np.int32), counts),
            offsets=self.offsets[a : b + 1] - lo,
            event_id=self.event_id[a:b].copy(),
            first_index=self.first_index[a:b].copy(),
        )

    @classmethod
    def from_events(cls, tables, event_ids, flags=None, first_index=None) -> "PhotonBatch":
        """Concatenate per-event tables ([N_ROWS, n_e] each). For tests and tools, not the server hot path."""
        counts = np.array([t.shape[1] for t in tables], dtype=np.int64)
        offsets = np.zeros(len(tables) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        table = np.concatenate(tables, axis=1).astype(np.float32) if tables else np.zeros((N_ROWS, 0), np.float32)
        if flags is None:
            fl = np.zeros(offsets[-1], np.uint32)
        else:
            fl = np.concatenate(flags).astype(np.uint32)
        return cls(
            table=np.ascontiguousarray(table),
            flags=fl,
            slot=np.repeat(np.arange(len(tables), dtype=np.int32), counts),
            offsets=offsets,
            event_id=np.asarray(event_ids, dtype=np.uint32),
            first_index=np.zeros(len(tables), np.uint32) if first_index is None else np.asarray(first_index, np.uint32),
        )


@dataclass
class HitBatch:
    """Hits of a batch grouped by event slot: hits of slot s are offsets[s]:offsets[s+1]."""

    channel: np.ndarray  # [H] uint32, channel id
    table: np.ndarray  # [8, H] float32: dx,dy,dz; polx,poly,polz; wavelength nm; time ns
    flags: np.ndarray  # [H] uint32, accumulated history
    offsets: np.ndarray  # [E+1] int64

    @property
    def n_hits(self) -> int:
        return int(self.channel.shape[0])

    def event(self, s: int) -> "HitBatch":
        """Hits of one slot as a one-event HitBatch (views, no copy)."""
        a, b = int(self.offsets[s]), int(self.offsets[s + 1])
        return HitBatch(self.channel[a:b], self.table[:, a:b], self.flags[a:b], np.array([0, b - a], np.int64))

    def slot_range(self, a: int, b: int) -> "HitBatch":
        """Hits of slots ``a:b`` with their own offsets (array views, no copy)."""
        lo, hi = int(self.offsets[a]), int(self.offsets[b])
        return HitBatch(self.channel[lo:hi], self.table[:, lo:hi], self.flags[lo:hi], self.offsets[a : b + 1] - lo)

    @classmethod
    def concat_slots(cls, parts: list["HitBatch"]) -> "HitBatch":
        """Join HitBatches of consecutive slot ranges (or single events) into one, offsets shifted."""
        if not parts:
            return empty_hits(0)
        if len(parts) == 1:
            return parts[0]
        shifts = np.cumsum([0] + [p.n_hits for p in parts[:-1]])
        offsets = np.concatenate([np.zeros(1, np.int64)] + [p.offsets[1:] + h for p, h in zip(parts, shifts)])
        return cls(
            np.concatenate([p.channel for p in parts]),
            np.concatenate([p.table for p in parts], axis=1),
            np.concatenate([p.flags for p in parts]),
            offsets.astype(np.int64),
        )

    @classmethod
    def concat(cls, parts: list["HitBatch"]) -> "HitBatch":
        """Join single-event hit pieces (a split event) into one event."""
        if len(parts) == 1:
            return parts[0]
        n = sum(p.n_hits for p in parts)
        return cls(
            np.concatenate([p.channel for p in parts]),
            np.concatenate([p.table for p in parts], axis=1),
            np.concatenate([p.flags for p in parts]),
            np.array([0, n], np.int64),
        )




def empty_hits(n_events: int) -> HitBatch:
    return HitBatch(
        np.zeros(0, np.uint32), np.zeros((8, 0), np.float32), np.zeros(0, np.uint32), np.zeros(n_events + 1, np.int64)
    )
