"""Demultiplexing: hits of a batch grouped by event slot, then sliced per request.

Photons of a batch are contiguous per event slot, so one exclusive scan of the
hit indicator gives both each hit's output position and, evaluated at the
event boundaries, the per-event hit offsets: a stable counting sort with no
per-event loop or mask. The CUDA engine does the same scan on the GPU
(:mod:`charon.kernels.scatter`); this numpy version is its reference.
"""

from __future__ import annotations

import numpy as np

from ..photons import HIT_ROWS, HitBatch


def hit_offsets(hit_channel: np.ndarray, photon_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the hits in photon order, and per-slot hit offsets.

    ``hit_channel`` [n] int32, channel or -1; ``photon_offsets`` [E+1] int64.
    Returns ``(hit_index [H] int64, offsets [E+1] int64)``.
    """
    is_hit = hit_channel >= 0
    scan = np.zeros(len(is_hit) + 1, np.int64)
    np.cumsum(is_hit, out=scan[1:])
    return np.flatnonzero(is_hit), scan[photon_offsets]


def gather_hits(table: np.ndarray, flags: np.ndarray, hit_channel: np.ndarray, photon_offsets: np.ndarray) -> HitBatch:
    """Build the HitBatch of a propagated batch (host engines)."""
    index, offsets = hit_offsets(hit_channel, photon_offsets)
    return HitBatch(
        channel=hit_channel[index].astype(np.uint32),
        table=table[HIT_ROWS][:, index],
        flags=flags[index],
        offsets=offsets,
    )


def group_by_slot(slot: np.ndarray, n_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Stable counting sort of hits that arrive in any order with their slot (e.g. Chroma's flat hits).

    Returns ``(order [H], offsets [n_slots+1])``: hits ``order[offsets[s]:offsets[s+1]]`` are slot s's,
    in their original relative order.
    """
    slot = np.asarray(slot, np.int64)
    if slot.size and (slot.min() < 0 or slot.max() >= n_slots):
        raise ValueError(f"hit slot out of range [0, {n_slots})")
    offsets = np.zeros(n_slots + 1, np.int64)
    np.cumsum(np.bincount(slot, minlength=n_slots), out=offsets[1:])
    return np.argsort(slot, kind="stable"), offsets
