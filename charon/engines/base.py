"""The engine interface: propagate one batch, return its hits grouped by event."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field, replace

import numpy as np

from ..geometry import Detector
from ..photons import HitBatch, PhotonBatch


class EngineError(RuntimeError):
    """An engine could not be created or could not run a batch."""


@dataclass
class EngineConfig:
    """Settings shared by every engine (``charon-batch`` flags of the same names)."""

    seed: int = 0  # run seed: first half of every photon's RNG key
    max_steps: int = 100  # propagation steps before a photon is left where it is (as Chroma)
    device: int = 0  # CUDA device ordinal
    max_batch_photons: int = 5_000_000  # preallocated capacity (CUDA)
    lanes: int = 1  # CUDA: batches launched and not yet finished at once, each with its own device buffers
    # CUDA: blocks of the propagation kernel that must fit on one SM at once (its launch bound), which caps
    # its registers per thread; 0 leaves the compiler's own choice. Not a charon-batch flag: bounds measured
    # no faster (benchmarks/RESULTS.md, twenty-second session); engine_bench.py --min-blocks sets it.
    min_blocks_per_sm: int = 0


@dataclass
class StageTimes:
    """Seconds spent in each stage of the last batch (GPU stages timed with CUDA events)."""

    copy_in: float = 0.0
    propagate: float = 0.0
    demux: float = 0.0
    copy_out: float = 0.0
    # Of ``total``, the seconds during which batches collected before this one were still on
    # the device (several lanes run batches concurrently): not counted twice in busy time.
    overlap: float = 0.0
    # Of ``propagate + demux`` (the kernels), the seconds other batches' kernels already covered.
    compute_overlap: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.copy_in + self.propagate + self.demux + self.copy_out

    @property
    def busy(self) -> float:
        """This batch's share of the union of device-busy intervals (busy fraction numerator)."""
        return max(0.0, self.total - self.overlap)

    def snapshot(self) -> "StageTimes":
        """A copy that the engine's next batch does not overwrite (results are read later, on another thread)."""
        return replace(self, extra=dict(self.extra))

    @property
    def compute_busy(self) -> float:
        """This batch's share of the union of its kernels' intervals: no copies, no host queueing."""
        return max(0.0, self.propagate + self.demux - self.compute_overlap)


class Engine(abc.ABC):
    """One propagation call per batch. Implementations must be thread-compatible:
    the server calls :meth:`propagate` from a single engine thread."""

    name: str = "abstract"
    # True when propagate() takes a table whose rows are strided (a [N_ROWS, n] view of a
    # larger preallocated buffer); otherwise the caller passes a contiguous table.
    strided_rows: bool = False

    def __init__(self, detector: Detector, config: EngineConfig):
        self.detector = detector
        self.config = config
        self.last_times = StageTimes()

    @abc.abstractmethod
    def propagate(self, batch: PhotonBatch, keep_photons: bool = False) -> HitBatch:
        """Propagate every photon of ``batch`` and return the hits grouped by event slot
        (``hits.offsets`` has ``batch.n_events + 1`` entries).

        ``batch.table``/``batch.flags`` may be overwritten. With ``keep_photons`` they
        hold every photon's final state afterwards (Chroma's ``keep_photons_end``; for
        tests and diagnostics: on a GPU it costs a full copy back)."""

    def warm_up(self) -> None:
        """Compile kernels ahead of the first request (optional)."""

    def close(self) -> None:
        """Release device resources."""
