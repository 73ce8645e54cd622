"""Server-side run output (ChAR0N's asynchronous mode): hits written to ROOT files with uproot.

Between ``[RUN_BEGIN, filename]`` and ``[RUN_END]`` a client's PHOTONDATA is
answered at once with ``[SIM_COMPLETE_ASYNC, event_id]``; the events still go
through normal batching, and their hits are written to
``DIR/<name>.charon.ntuple.root`` with two trees, as the ChAR0N client reads
them back (PROTOCOL.md, dialect B):

* ``detinfo``: one entry per channel: ``pmt_x, pmt_y, pmt_z`` (f32), ``pmt_type`` (i32)
* ``output``: one entry per event: ``event_id`` (u32) and jagged ``channel_id`` (u32),
  ``time, wavelength, u, v, w, pol_x, pol_y, pol_z`` (f32), ``flag`` (u32),
  each with its counter branch (``nchannel_id``, ``ntime``, ...)

Events are buffered and written in baskets of many events (one ``extend`` per
basket, built from offsets with ``ak.unflatten``: no per-event loop).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np

from .photons import HitBatch

log = logging.getLogger("charon.output")

SUFFIX = ".charon.ntuple.root"
JAGGED_F32 = ("time", "wavelength", "u", "v", "w", "pol_x", "pol_y", "pol_z")
# hit-table row of each float branch (see charon.photons: dx,dy,dz,polx,poly,polz,wavelength,time)
_ROW = {"u": 0, "v": 1, "w": 2, "pol_x": 3, "pol_y": 4, "pol_z": 5, "wavelength": 6, "time": 7}


class RunOutputError(ValueError):
    pass


def output_path(directory: str, requested: str) -> str:
    """``DIR/<name>.charon.ntuple.root`` for a RUN_BEGIN filename, never outside ``directory``.

    The name loses any directory part (either slash) and its ``.root``/``.ntuple`` suffixes.
    """
    if "\x00" in requested:
        raise RunOutputError("output filename contains a NUL byte")
    name = requested.replace("\\", "/").rsplit("/", 1)[-1]
    while True:
        stripped = name.removesuffix(".root").removesuffix(".ntuple")
        if stripped == name:
            break
        name = stripped
    if name in ("", ".", ".."):
        raise RunOutputError(f"output filename {requested!r} leaves no usable name")
    path = os.path.join(os.path.abspath(directory), name + SUFFIX)
    if os.path.dirname(path) != os.path.abspath(directory):  # belt and braces
        raise RunOutputError(f"output filename {requested!r} escapes the output directory")
    return path


@dataclass(eq=False)
class Run:
    """One client's open run: its file, the events not yet written, the RUN_END waiting for them."""

    name: str
    path: str
    error: str | None = None  # set when the file could not be created
    pending: set = field(default_factory=set)  # EventRequests accepted, not yet written
    end_envelope: list | None = None  # RUN_END requester, answered once pending == 0
    lost: list = field(default_factory=list)  # event ids that failed in the engine
    written: int = 0
    writer: "RunWriter | None" = None


class RunWriter:
    def __init__(self, path: str, channel_position: np.ndarray, channel_type: np.ndarray, basket_events: int):
        import uproot  # optional dependency: only needed with --output-dir

        self.path = path
        self.basket_events = basket_events
        self._file = uproot.recreate(path)
        pos = np.asarray(channel_position, np.float32)
        self._file["detinfo"] = {
            "pmt_x": pos[:, 0].copy(),
            "pmt_y": pos[:, 1].copy(),
            "pmt_z": pos[:, 2].copy(),
            "pmt_type": np.asarray(channel_type, np.int32),
        }
        types = {"event_id": "uint32", "channel_id": "var * uint32"}
        types.update({k: "var * float32" for k in JAGGED_F32})
        types["flag"] = "var * uint32"
        self._file.mktree("output", types)
        self._ids: list[int] = []
        self._hits: list[HitBatch] = []

    def add(self, event_id: int, hits: HitBatch) -> None:
        self._ids.append(event_id)
        self._hits.append(hits)
        if len(self._ids) >= self.basket_events:
            self.flush()

    def flush(self) -> None:
        if not self._ids:
            return
        import awkward as ak

        hits = HitBatch.concat_slots(self._hits)
        counts = np.diff(hits.offsets)
        data = {"event_id": np.asarray(self._ids, np.uint32), "channel_id": ak.unflatten(hits.channel, counts)}
        for name, row in _ROW.items():
            data[name] = ak.unflatten(np.ascontiguousarray(hits.table[row]), counts)
        data["flag"] = ak.unflatten(hits.flags, counts)
        self._file["output"].extend(data)
        self._ids, self._hits = [], []

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._file.close()
